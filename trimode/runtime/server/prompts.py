"""From an API request body to a GenerationRequest: prompt ids, sampling, mode, stops.

Chat prompts follow the llama.cpp fork (MODEL.md section 6): the GGUF's template with its
multi-turn cleanup (trimode.model.chat), think tokens suppressed when reasoning is off, and
the previous assistant reply's tokens penalized 1.3x so the model does not repeat itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from trimode.model.chat import PREVIOUS_REPLY_PENALTY, encode_prompt, previous_reply_ids, render_chat
from trimode.model.config import ModelError
from trimode.model.tokenizer import Tokenizer
from trimode.runtime.generation import DecodeParams, GenerationRequest, SamplingParams
from trimode.runtime.healing import heal
from trimode.runtime.server.errors import APIError
from trimode.runtime.server.schemas import (ChatCompletionRequest, CompletionRequest,
                                            SamplingFields)

# llama-server's window for the penalties when a request names none.
DEFAULT_REPEAT_LAST_N = 64


@dataclass(frozen=True)
class PromptSettings:
    template: str | None
    add_bos: bool
    reasoning: bool
    slot_ctx: int           # tokens one slot's KV cache holds
    decode: DecodeParams    # for requests that do not choose their own mode


def settings_from_metadata(metadata: dict, reasoning: bool, slot_ctx: int,
                           decode: DecodeParams) -> PromptSettings:
    return PromptSettings(template=metadata.get("tokenizer.chat_template") or None,
                          add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
                          reasoning=reasoning, slot_ctx=slot_ctx, decode=decode)


def chat_request(body: ChatCompletionRequest, tokenizer: Tokenizer,
                 settings: PromptSettings) -> GenerationRequest:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    reasoning = body.reasoning(settings.reasoning)
    try:
        text = render_chat(settings.template, messages, add_generation_prompt=True,
                           reasoning=reasoning, template_vars={"bos_token": _bos(tokenizer)})
    except ModelError as err:
        raise APIError(400, str(err), "messages") from None
    ids = encode_prompt(tokenizer, text, settings.add_bos)
    penalized = previous_reply_ids(tokenizer, messages)
    suppress = () if reasoning else tuple(
        i for i in (tokenizer.think_open_id, tokenizer.think_close_id) if i is not None)
    return _generation_request(body, ids, body.token_limit(), settings, penalized, suppress,
                               len(tokenizer))


def completion_request(body: CompletionRequest, prompt: str | list[int], tokenizer: Tokenizer,
                       settings: PromptSettings) -> GenerationRequest:
    """The request of one of the body's prompts."""
    if isinstance(prompt, str):
        ids = encode_prompt(tokenizer, prompt, settings.add_bos)
    else:
        ids = list(prompt)
        if max(ids) >= len(tokenizer):
            raise APIError(400, f"prompt token id {max(ids)} is outside the vocabulary of "
                           f"{len(tokenizer)}", "prompt")
    request = _generation_request(body, ids, body.token_limit(), settings, (), (), len(tokenizer))
    request = replace(request, prompt_logprobs=body.prompt_logprob_count())
    return heal(tokenizer, request) if body.token_healing and isinstance(prompt, str) else request


def choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """One request per choice: a given seed s becomes s, s + 1, ... (the first choice is what
    n = 1 gives), no seed stays a random one each."""
    seed = request.sampling.seed
    return [request if i == 0 or seed is None else replace(request, sampling=replace(request.sampling, seed=seed + i))
            for i in range(n)]


def _bos(tokenizer: Tokenizer) -> str:
    return tokenizer.tokens[tokenizer.bos_id]


def _generation_request(body: SamplingFields, ids: list[int], max_tokens: int | None,
                        settings: PromptSettings, penalized: tuple[int, ...],
                        suppress: tuple[int, ...], vocab: int) -> GenerationRequest:
    bias = body.biases()
    largest = max((i for i, _ in bias), default=-1)
    if largest >= vocab:
        raise APIError(400, f"logit_bias names token id {largest}, outside the vocabulary of {vocab}",
                       "logit_bias")
    if not ids:
        raise APIError(400, "the prompt is empty: at least one token is needed", "prompt")
    room = settings.slot_ctx - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds "
                       f"{settings.slot_ctx} per slot (-c / -np); shorten the prompt", "messages")
    last_n = _given(body.repeat_last_n, DEFAULT_REPEAT_LAST_N)
    defaults = SamplingParams()
    sampling = SamplingParams(
        temperature=_given(body.temperature, defaults.temperature),
        top_k=_given(body.top_k, defaults.top_k),
        top_p=_given(body.top_p, defaults.top_p),
        min_p=_given(body.min_p, defaults.min_p),
        # A negative seed asks for a random one, as in llama-server.
        seed=body.seed if body.seed is not None and body.seed >= 0 else None,
        repetition_penalty=_given(body.repeat_penalty, defaults.repetition_penalty),
        frequency_penalty=_given(body.frequency_penalty, defaults.frequency_penalty),
        presence_penalty=_given(body.presence_penalty, defaults.presence_penalty),
        penalty_last_n=settings.slot_ctx if last_n == -1 else last_n,
        penalty_ids=penalized, ids_penalty=PREVIOUS_REPLY_PENALTY if penalized else 1.0,
        logit_bias=bias)
    d = settings.decode
    decode = DecodeParams(mode=_given(body.mode, d.mode),
                          draft_length=_given(body.draft_length, d.draft_length),
                          adaptive=d.adaptive and body.draft_length is None,
                          block_length=_given(body.block_length, d.block_length),
                          threshold=_given(body.threshold, d.threshold))
    request = GenerationRequest(prompt_ids=tuple(ids),
                                max_tokens=room if max_tokens is None else min(max_tokens, room),
                                sampling=sampling, decode=decode,
                                stop=tuple(body.stop_strings()), suppress_ids=suppress,
                                logprobs=body.logprob_count())
    problem = request.problem()
    if problem:
        raise APIError(400, problem)
    return request


def _given(value, default):
    return default if value is None else value
