"""The generation API the CLI and the server build on.

    events = generate(forward, tokenizer, GenerationRequest(prompt_ids=ids, max_tokens=256))
    for event in events:
        if isinstance(event, TokenEvent): print(event.text, end="")
        else: print(event.finish_reason, event.stats.to_dict())

Contract:
- Each next() runs at most one decode cycle (the first one also runs the prefill), so a
  server can interleave requests by calling next() round-robin; closing the generator stops
  it at once.
- TokenEvent.ids are the newly generated ids (EOS is never included); TokenEvent.text is
  the stream-safe text delta (stop strings already cut, unfinished characters and possible
  stop-string starts held back); with request.logprobs set, TokenEvent.logprobs has one
  entry per id (runtime/logprobs.py). With request.prompt_logprobs set, the first event is
  a TokenEvent without ids whose prompt_logprobs score every prompt token but the first
  (None: nothing precedes it). The last event is always one DoneEvent.
- The forward may arrive with a prefix of prompt_ids already cached (KV reuse across chat
  turns): only prompt_ids[forward.length:] is prefilled; a fully cached prompt is truncated
  one token back so there is a row to sample from. When the generator finishes or is closed,
  the cache holds a prefix of prompt_ids + the generated ids, so the caller can reuse it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from trimode.runtime.decode import (Cycle, DecodeParams, ar_cycle, diffusion_cycle, prefill,
                                    spec_cycle)
from trimode.runtime.forward import MAX_BLOCK, Forward
from trimode.runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, token_logprobs
from trimode.runtime.sampling import Sampler, SamplingParams
from trimode.runtime.spec_pace import SpecPace
from trimode.runtime.stops import Detokenizer, Stops

__all__ = ["SamplingParams", "DecodeParams", "GenerationRequest", "TokenEvent", "DoneEvent",
           "Stats", "RequestError", "cached_prefix", "generate"]

FINISH_REASONS = ("stop", "length", "loop", "context")


def cached_prefix(cached_ids, cache_length: int, prompt_ids) -> int:
    """How many leading ids of prompt_ids a sequence's cache already holds, when it holds the
    K/V of cached_ids[:cache_length] (what the caller truncates the forward to before
    generate())."""
    n = 0
    for a, b in zip(cached_ids[:cache_length], prompt_ids):
        if a != b:
            break
        n += 1
    return n


class RequestError(ValueError):
    """A generation request the engine cannot honour; the message is one sentence."""


@dataclass(frozen=True)
class GenerationRequest:
    """prompt_ids: the whole prompt, template and BOS already applied. stop: strings that end
    generation (cut from the text). suppress_ids: ids never generated (e.g. <think> and
    </think> when reasoning is off). first_ids and prompt_tail come from token healing
    (runtime/healing.py): the first generated token is one of first_ids (empty: any), and
    the prompt_tail bytes it starts with, which the prompt's text already had, are not
    emitted again. logprobs: None, or report each token's logprob and this many of the most
    likely ids at its place; prompt_logprobs: the same for the prompt's tokens (its whole
    cache recomputed: every prompt token needs its row)."""
    prompt_ids: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    decode: DecodeParams = DecodeParams()
    stop: tuple[str, ...] = ()
    loop_detection: bool = True
    suppress_ids: tuple[int, ...] = ()
    first_ids: tuple[int, ...] = ()
    prompt_tail: bytes = b""
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def problem(self) -> str | None:
        if not self.prompt_ids:
            return "the prompt is empty: at least one token is needed"
        if self.max_tokens < 0:
            return f"max_tokens must be >= 0, got {self.max_tokens}"
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
                return f"{name} (top alternatives) must be in [0, {MAX_TOP_LOGPROBS}], got {n}"
        return self.sampling.problem() or self.decode.problem()


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0      # prompt tokens found in the cache (not prefilled)
    generated_tokens: int = 0
    forwards: int = 0           # every forward pass, the prefill included
    cycles: int = 0             # decode cycles after the first token
    spec_cycles: int = 0        # self-speculation: cycles that drafted (the others AR steps)
    drafted_tokens: int = 0     # self-speculation: draft tokens proposed
    accepted_tokens: int = 0    # ... and accepted by verify
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0         # request start to first token, compute time only

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else 0.0

    @property
    def accepted_per_cycle(self) -> float:
        return self.accepted_tokens / self.spec_cycles if self.spec_cycles else 0.0

    @property
    def prefill_tok_s(self) -> float:
        done = self.prompt_tokens - self.cached_tokens
        return done / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes from the prefill; the decode phase makes the rest.
        after_first = max(self.generated_tokens - 1, 0)
        return after_first / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict:
        out = dict(vars(self))
        for name in ("tokens_per_forward", "accepted_per_cycle", "prefill_tok_s", "decode_tok_s"):
            out[name] = getattr(self, name)
        return out


@dataclass
class TokenEvent:
    ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class DoneEvent:
    finish_reason: str          # one of FINISH_REASONS
    stats: Stats
    message: str = ""           # a sentence for the user when the reason needs one
    tokens: list[int] = field(default_factory=list)  # all generated ids


def _run_cycle(fwd: Forward, sampler: Sampler, history: list[int], room: int,
               params: DecodeParams, pace: SpecPace | None) -> Cycle:
    """One cycle of the chosen mode, sized so it emits at most `room` tokens."""
    cfg = fwd.config
    if params.mode == "spec":
        k = min(pace.next_k() if pace else params.draft_length, room - 1)
        return spec_cycle(fwd, sampler, history, k, cfg.mask_token_id, cfg.shift_logits)
    if params.mode == "diffusion":
        b = min(params.block_length, room)
        return diffusion_cycle(fwd, sampler, history, b, params.threshold, cfg.mask_token_id,
                               cfg.eos_token_id, cfg.shift_logits)
    return ar_cycle(fwd, sampler, history)


def _scored(fwd: Forward, history: list[int], cycle: Cycle, taken: list[int], n_top: int,
            stats: Stats) -> list[TokenLogprob]:
    """The logprobs of `taken` (a prefix of the cycle's tokens, which follow `history`)."""
    if not taken:
        return []
    step = cycle.causal
    if step is None:  # one causal pass over the tokens scores them (and caches a prefix)
        step = fwd.causal([history[-1]] + taken[:-1])
        stats.forwards += 1
    return token_logprobs(step, taken, n_top)


def _scored_prompt(fwd: Forward, prompt: list[int], n_top: int,
                   stats: Stats) -> list[TokenLogprob | None]:
    """Every prompt token's logprob but the first's, from causal passes over all of the
    prompt but its last token (which the prefill then runs, for the first generated token)."""
    fwd.truncate(0)
    scored: list[TokenLogprob | None] = [None]
    for start in range(0, len(prompt) - 1, MAX_BLOCK):  # the all-rows entries' largest block
        chunk = prompt[start:min(start + MAX_BLOCK, len(prompt) - 1)]
        scored += token_logprobs(fwd.causal(chunk), prompt[start + 1:start + 1 + len(chunk)], n_top)
        stats.forwards += 1
    return scored


def _id_problem(request: GenerationRequest, vocab: int) -> str | None:
    for what, ids in (("prompt", request.prompt_ids), ("suppress_ids", request.suppress_ids),
                      ("penalty_ids", request.sampling.penalty_ids), ("first_ids", request.first_ids),
                      ("logit_bias", [i for i, _ in request.sampling.logit_bias])):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            return f"{what} holds token id {bad[0]}, outside the vocabulary of {vocab}"
    return None


def generate(forward: Forward, tokenizer: Detokenizer,
             request: GenerationRequest) -> Iterator[TokenEvent | DoneEvent]:
    """Generate from `request` on `forward` (see the module docstring for the contract).
    Raises RequestError at the first next() for a request that makes no sense."""
    problem = request.problem() or _id_problem(request, forward.config.vocab)
    if problem:
        raise RequestError(problem)
    prompt = list(request.prompt_ids)
    n_ctx = forward.n_ctx
    stats = Stats(prompt_tokens=len(prompt))
    stops = Stops(tokenizer, forward.config.eos_token_id, request.stop, request.max_tokens,
                  request.loop_detection, request.prompt_tail)
    if len(prompt) >= n_ctx:
        yield DoneEvent("context", stats, f"the prompt ({len(prompt)} tokens) does not fit in "
                        f"the context ({n_ctx} tokens); nothing was generated")
        return
    sampler = Sampler(request.sampling, request.suppress_ids)
    history = list(prompt)
    decode = request.decode
    pace = SpecPace(decode.draft_length) if decode.mode == "spec" and decode.adaptive else None

    def keep_prefix() -> None:
        # Leave a cache that is a prefix of prompt + generated ids, whatever happened.
        forward.truncate(min(forward.length, len(prompt) + len(stops.tokens)))

    try:
        clock = time.perf_counter()
        if request.prompt_logprobs is not None:  # nothing cached: every prompt row is needed
            scored = _scored_prompt(forward, prompt, request.prompt_logprobs, stats)
            stats.prefill_s = time.perf_counter() - clock
            yield TokenEvent([], "", prompt_logprobs=scored)
            clock = time.perf_counter()
        else:
            stats.cached_tokens = min(forward.length, len(prompt) - 1)
        if request.max_tokens == 0:
            yield DoneEvent("length", stats)
            return
        cycle = prefill(forward, prompt, sampler, request.first_ids)
        stats.prefill_s += time.perf_counter() - clock
        stats.ttft_s = stats.prefill_s
        while True:
            stats.forwards += cycle.forwards
            taken, text = stops.feed(cycle.tokens)
            scored = None
            if request.logprobs is not None:
                clock = time.perf_counter()
                scored = _scored(forward, history, cycle, taken, request.logprobs, stats)
                stats.decode_s += time.perf_counter() - clock
            history.extend(taken)
            stats.generated_tokens = len(stops.tokens)
            if stops.finish is None and len(history) >= n_ctx:
                stops.end("context", f"the context is full ({n_ctx} tokens); "
                          "a larger context would let generation go on")
            if stops.finish is not None:
                text += stops.flush()
            if taken or text:
                yield TokenEvent(taken, text, scored)
            if stops.finish is not None:
                break
            clock = time.perf_counter()
            room = min(request.max_tokens - len(stops.tokens), n_ctx - len(history))
            cycle = _run_cycle(forward, sampler, history, room, decode, pace)
            seconds = time.perf_counter() - clock
            if pace:
                pace.record(cycle.drafted, cycle.accepted, seconds)
            stats.cycles += 1
            stats.spec_cycles += cycle.drafted > 0
            stats.drafted_tokens += cycle.drafted
            stats.accepted_tokens += cycle.accepted
            stats.decode_s += seconds
        keep_prefix()
        yield DoneEvent(stops.finish, stats, stops.message, list(stops.tokens))
    finally:
        keep_prefix()  # also when the caller closes the generator early
