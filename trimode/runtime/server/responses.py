"""OpenAI response bodies and stream chunks, plus llama-server's `timings` block."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from trimode.model.tokenizer import Tokenizer
from trimode.runtime.generation import DoneEvent, Stats
from trimode.runtime.logprobs import TokenLogprob

# Our finish reasons -> OpenAI's; the precise one is kept in `stop_type`.
FINISH_REASON = {"stop": "stop", "length": "length", "context": "length", "loop": "stop"}


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def timings(stats: Stats) -> dict:
    """llama-server's fields (ms and tokens/s for prompt and generation) plus how well the
    decoding mode did: forwards, tokens per forward, accepted draft tokens per cycle."""
    prompt_n = stats.prompt_tokens - stats.cached_tokens
    predicted_n = stats.generated_tokens
    prompt_ms, predicted_ms = stats.prefill_s * 1e3, stats.decode_s * 1e3
    return {
        "cache_n": stats.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": stats.prefill_tok_s,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": stats.decode_tok_s,
        "forwards": stats.forwards,
        "tokens_per_forward": stats.tokens_per_forward,
        "cycles": stats.cycles,
        "spec_cycles": stats.spec_cycles,
        "drafted_n": stats.drafted_tokens,
        "accepted_n": stats.accepted_tokens,
        "accepted_per_cycle": stats.accepted_per_cycle,
    }


@dataclass
class Choice:
    """What one choice of a whole reply gathered: its text, its DoneEvent, its logprobs (None:
    not asked for) and its echoed prompt's."""
    text: str
    done: DoneEvent | None
    scored: list[TokenLogprob] | None = None
    prompt_scored: list[TokenLogprob | None] | None = None


def total_usage(dones: list[DoneEvent], n: int) -> dict:
    """OpenAI's usage of a request whose choices ended in `dones`, `n` a prompt: each prompt
    once (its first choice's), every reply."""
    firsts = [d.stats for d in dones[::n]]
    prompt = sum(s.prompt_tokens for s in firsts)
    generated = sum(d.stats.generated_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)}}


class ResponseBuilder:
    """The bodies of one request, chat or text completion, streamed or whole, with its
    choices by index. `logprobs` (whether the request asked for them) puts a choice's
    logprobs in OpenAI's shape for its kind: chat's list of entries with bytes, or the legacy
    completion's parallel lists with each token's text offset in the text. `echoes`: each
    choice's prompt text its text starts with (None: none), its prompt's tokens (`prompt_ids`)
    then listed first in its logprobs (the first one unscored). `n`: choices a prompt."""

    def __init__(self, kind: str, model: str, tokenizer: Tokenizer | None = None,
                 logprobs: bool = False, echoes: list[str | None] | None = None,
                 prompt_ids: list[tuple[int, ...]] | None = None, n: int = 1):
        self.kind = kind  # "chat" | "completion"
        self.model = model
        self.id = new_id(kind)
        self.created = int(time.time())
        self.tokenizer, self.logprobs, self.n = tokenizer, logprobs, n
        self.echoes, self.prompt_ids = echoes or [], prompt_ids or []
        self._offsets: dict[int, int] = {}  # characters of each choice's tokens so far (text_offset)

    def _logprobs(self, index: int, tokens: list[int], scored: list[TokenLogprob | None]) -> dict | None:
        if not self.logprobs:
            return None
        text = self.tokenizer.token_text
        if self.kind == "chat":
            def entry(token: int, logprob: float) -> dict:
                return {"token": text(token), "logprob": logprob,
                        "bytes": list(self.tokenizer.token_bytes(token))}
            return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(*t) for t in s.top]}
                                for s in scored]}
        texts = [text(t) for t in tokens]
        offsets = []
        for piece in texts:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(piece)
        return {"tokens": texts, "token_logprobs": [None if s is None else s.logprob for s in scored],
                "top_logprobs": [None if s is None else self._top_by_text(s) for s in scored],
                "text_offset": offsets}

    def _top_by_text(self, scored: TokenLogprob) -> dict:
        # the chosen token besides the top ones, as OpenAI gives it; a text two ids share
        # keeps the likelier's logprob
        out: dict = {}
        for token, logprob in (*scored.top, (scored.token, scored.logprob)):
            out.setdefault(self.tokenizer.token_text(token), logprob)
        return out

    def _envelope(self, choices: list, chunk: bool) -> dict:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, index: int, text: str | None, done: DoneEvent | None, chunk: bool,
                first: bool = False, logprobs: dict | None = None) -> dict:
        choice: dict = {"index": index}
        if self.kind == "chat":
            if chunk:
                delta = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = FINISH_REASON[done.finish_reason] if done else None
        if done:
            choice["stop_type"] = done.finish_reason
        return choice

    def whole(self, choices: list[Choice]) -> dict:
        """The reply of every choice; `timings` are the first choice's."""
        made = []
        for index, c in enumerate(choices):
            text, tokens, entries = c.text, [], []
            if self.echo(index) is not None:
                text = self.echo(index) + text
                if c.prompt_scored is not None:
                    tokens, entries = list(self.prompt_ids[index]), list(c.prompt_scored)
            logprobs = None
            if c.scored is not None:
                logprobs = self._logprobs(index, tokens + [s.token for s in c.scored], entries + c.scored)
            made.append(self._choice(index, text, c.done, chunk=False, logprobs=logprobs))
        body = self._envelope(made, chunk=False)
        body["usage"] = total_usage([c.done for c in choices], self.n)
        body["timings"] = timings(choices[0].done.stats)
        return body

    def first_chunk(self, index: int) -> dict:
        return self._envelope([self._choice(index, "", None, chunk=True, first=True)], chunk=True)

    def text_chunk(self, index: int, text: str, scored: list[TokenLogprob] | None = None) -> dict:
        logprobs = None if scored is None else self._logprobs(index, [s.token for s in scored], scored)
        return self._envelope([self._choice(index, text, None, chunk=True, logprobs=logprobs)], chunk=True)

    def echo_chunk(self, index: int, prompt_scored: list[TokenLogprob | None] | None) -> dict:
        """A completion stream's first chunk of a choice: the echoed prompt (and its
        logprobs, if scored)."""
        logprobs = None if prompt_scored is None else self._logprobs(index, list(self.prompt_ids[index]),
                                                                     prompt_scored)
        return self._envelope([self._choice(index, self.echo(index), None, chunk=True, logprobs=logprobs)],
                              chunk=True)

    def final_chunk(self, index: int, done: DoneEvent) -> dict:
        """A choice's last chunk: its finish reason and its own timings."""
        last = self._envelope([self._choice(index, None if self.kind == "chat" else "", done, chunk=True)],
                              chunk=True)
        last["timings"] = timings(done.stats)
        return last

    def usage_chunk(self, dones: list[DoneEvent]) -> dict:
        # OpenAI sends usage in one more chunk whose choices are empty.
        tail = self._envelope([], chunk=True)
        tail["usage"] = total_usage(dones, self.n)
        return tail

    def echo(self, index: int) -> str | None:
        return self.echoes[index] if self.echoes else None


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
