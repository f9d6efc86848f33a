"""From API bodies to GenerationRequests: the chat template, think handling, the previous
reply's repetition penalty, token limits and mode fields."""
from __future__ import annotations

import pytest

from trimode.model.tokenizer import Tokenizer
from trimode.runtime.decode import DecodeParams
from trimode.runtime.server.errors import APIError
from trimode.runtime.server.prompts import (PREVIOUS_REPLY_PENALTY, chat_request, completion_request,
                                            settings_from_metadata)
from trimode.runtime.server.schemas import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_metadata(tiny_model.metadata)


def settings(model, reasoning=False, slot_ctx=100, decode=DecodeParams(mode="ar")):
    return settings_from_metadata(model.metadata, reasoning, slot_ctx, decode)


def chat(**fields):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_reasoning_off_closes_the_think_block_and_suppresses_think_tokens(tiny_model, tokenizer):
    req = chat_request(chat(), tokenizer, settings(tiny_model, reasoning=False))
    ids = list(req.prompt_ids)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n</think>\n")
    assert tokenizer.think_open_id in ids and tokenizer.think_close_id in ids
    assert set(req.suppress_ids) == {tokenizer.think_open_id, tokenizer.think_close_id}


def test_reasoning_on_leaves_the_think_block_open(tiny_model, tokenizer):
    req = chat_request(chat(), tokenizer, settings(tiny_model, reasoning=True))
    assert tokenizer.decode(list(req.prompt_ids)).endswith("<|im_start|>assistant\n<think>\n")
    assert req.suppress_ids == ()


def test_a_request_can_switch_thinking(tiny_model, tokenizer):
    on = chat_request(chat(chat_template_kwargs={"enable_thinking": True}), tokenizer,
                      settings(tiny_model, reasoning=False))
    assert tokenizer.decode(list(on.prompt_ids)).endswith("<think>\n") and on.suppress_ids == ()
    off = chat_request(chat(chat_template_kwargs={"enable_thinking": False}), tokenizer,
                       settings(tiny_model, reasoning=True))
    assert tokenizer.decode(list(off.prompt_ids)).endswith("</think>\n") and off.suppress_ids


def test_previous_reply_tokens_are_penalized(tiny_model, tokenizer):
    reply = "The sea is wide and deep."
    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "sea?"}, {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": reply},
        {"role": "user", "content": "again"}]})
    req = chat_request(body, tokenizer, settings(tiny_model))
    assert req.sampling.ids_penalty == PREVIOUS_REPLY_PENALTY == 1.3
    assert set(req.sampling.penalty_ids) == set(tokenizer.encode(reply))
    assert req.sampling.repetition_penalty == 1.0  # the recent tokens only when asked
    first_turn = chat_request(chat(), tokenizer, settings(tiny_model))
    assert first_turn.sampling.ids_penalty == 1.0 and first_turn.sampling.penalty_ids == ()
    # a request's own repetition penalty applies to its window beside the reply's
    asked = body.model_copy(update={"repeat_penalty": 1.1, "repeat_last_n": 16})
    req = chat_request(asked, tokenizer, settings(tiny_model))
    assert (req.sampling.repetition_penalty, req.sampling.penalty_last_n, req.sampling.ids_penalty) == (1.1, 16, 1.3)


def test_penalties_and_logit_bias_reach_the_sampler(tiny_model, tokenizer):
    """OpenAI's frequency/presence penalties and logit_bias, llama-server's repeat_penalty
    and repeat_last_n (-1: the slot's context; 64 when not given), vLLM's repetition_penalty."""
    s = settings(tiny_model, slot_ctx=100)
    body = CompletionRequest.model_validate({
        "prompt": [1, 2, 3], "frequency_penalty": 0.5, "presence_penalty": -0.25,
        "repeat_penalty": 1.2, "logit_bias": {"17": -100, "4": 2.5}})
    got = completion_request(body, body.prompt, tokenizer, s).sampling
    assert (got.frequency_penalty, got.presence_penalty, got.repetition_penalty) == (0.5, -0.25, 1.2)
    assert got.penalty_last_n == 64 and got.logit_bias == ((17, -100.0), (4, 2.5))
    whole = CompletionRequest.model_validate({"prompt": [1], "repeat_last_n": -1, "repetition_penalty": 1.3})
    got = completion_request(whole, whole.prompt, tokenizer, s).sampling
    assert got.penalty_last_n == 100 and got.repetition_penalty == 1.3
    plain = completion_request(CompletionRequest.model_validate({"prompt": [1]}), [1], tokenizer, s).sampling
    assert not plain.penalizes_window and not plain.lifts and plain.logit_bias == ()


def test_text_parts_are_joined(tiny_model, tokenizer):
    parts = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]})
    plain = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hello"}]})
    s = settings(tiny_model)
    assert chat_request(parts, tokenizer, s).prompt_ids == chat_request(plain, tokenizer, s).prompt_ids


def test_token_limit_is_clamped_to_the_slot(tiny_model, tokenizer):
    s = settings(tiny_model, slot_ctx=50)
    body = CompletionRequest.model_validate({"prompt": [1, 2, 3]})
    assert completion_request(body, body.prompt, tokenizer, s).max_tokens == 47
    body = CompletionRequest.model_validate({"prompt": [1, 2, 3], "max_tokens": 1000})
    assert completion_request(body, body.prompt, tokenizer, s).max_tokens == 47
    body = CompletionRequest.model_validate({"prompt": [1, 2, 3], "max_tokens": 5})
    assert completion_request(body, body.prompt, tokenizer, s).max_tokens == 5
    with pytest.raises(APIError, match="50 per slot"):
        completion_request(CompletionRequest.model_validate({"prompt": [1] * 50}), [1] * 50, tokenizer, s)


def test_mode_fields_and_defaults(tiny_model, tokenizer):
    s = settings(tiny_model, decode=DecodeParams(mode="ar", draft_length=4))
    default = completion_request(CompletionRequest.model_validate({"prompt": [1, 2]}), [1, 2], tokenizer, s)
    assert default.decode == DecodeParams(mode="ar", draft_length=4)
    chosen = completion_request(CompletionRequest.model_validate(
        {"prompt": [1, 2], "mode": "diffusion", "block_length": 8, "threshold": 0.5}), [1, 2], tokenizer, s)
    assert chosen.decode == DecodeParams(mode="diffusion", draft_length=4, block_length=8, threshold=0.5)


def test_a_request_that_names_a_draft_length_pins_it(tiny_model, tokenizer):
    """The server's default draft length is paced (spec_pace.py); a request's own is not."""
    s = settings(tiny_model, decode=DecodeParams(mode="spec", draft_length=3, adaptive=True))
    default = completion_request(CompletionRequest.model_validate({"prompt": [1, 2]}), [1, 2], tokenizer, s)
    assert default.decode == DecodeParams(mode="spec", draft_length=3, adaptive=True)
    pinned = completion_request(CompletionRequest.model_validate({"prompt": [1, 2], "draft_length": 5}),
                                [1, 2], tokenizer, s)
    assert pinned.decode == DecodeParams(mode="spec", draft_length=5, adaptive=False)


def test_sampling_fields(tiny_model, tokenizer):
    body = CompletionRequest.model_validate({"prompt": [1, 2], "temperature": 0.7, "top_k": 5,
                                             "top_p": 0.9, "min_p": 0.1, "seed": 3, "stop": "x"})
    req = completion_request(body, body.prompt, tokenizer, settings(tiny_model))
    p = req.sampling
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (0.7, 5, 0.9, 0.1, 3)
    assert req.stop == ("x",)
    random_seed = CompletionRequest.model_validate({"prompt": [1, 2], "seed": -1})
    assert completion_request(random_seed, [1, 2], tokenizer, settings(tiny_model)).sampling.seed is None


def test_a_completion_prompt_that_starts_with_bos_gets_one_bos():
    from trimode.model.chat import encode_prompt
    from trimode.model.tokenizer import Tokenizer
    from trimode.model.vocab import make_vocab

    tok = Tokenizer.from_metadata(make_vocab(2048).to_metadata())
    plain = encode_prompt(tok, "def f():", add_bos=True)
    assert plain[0] == tok.bos_id and plain.count(tok.bos_id) == 1
    assert encode_prompt(tok, "<s>def f():", add_bos=True) == plain
    assert encode_prompt(tok, "def f():", add_bos=False) == plain[1:]


def test_fields_left_at_their_neutral_values_are_accepted(tiny_model, tokenizer):
    """What OpenAI clients send by default (response_format text, tool_choice none, ...)
    passes; llama-server's n_predict is max_tokens."""
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"},
        "tool_choice": "none", "typical_p": 1.0, "top_logprobs": 0, "n_predict": 3, "user": "u"})
    assert chat_request(body, tokenizer, settings(tiny_model)).max_tokens == 3
    both = body.model_validate({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
                                "n_predict": 4})
    assert chat_request(both, tokenizer, settings(tiny_model)).max_tokens == 4  # as llama-server
