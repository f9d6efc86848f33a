"""When generation ends, and which text is safe to show before it does.

`Stops` takes a cycle's tokens one at a time and ends the request on EOS, a stop string, the
token limit or a repetition loop (MODEL.md section 6). Text goes out only once it can no
longer change: a token that ends inside a UTF-8 character waits for the rest (the
tokenizer's incremental decoder), and text that could still be the start of a stop string
is held back, so a stop string is cut correctly even when it spans tokens or a cycle's
accepted block. Loops are checked after every token, so where generation stops does not
depend on how a mode groups tokens into cycles.
"""
from __future__ import annotations

from collections import Counter
from typing import Protocol, Sequence

from trimode.model.chat import loop_period


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Detokenizer(Protocol):
    """What generation needs of a tokenizer (trimode.model.tokenizer.Tokenizer has it):
    a streaming decoder whose push() returns only whole characters, and which leaves out
    the `skip` bytes the stream starts with (a healed prompt's tail)."""
    def incremental_decoder(self, skip: bytes = b"") -> StreamDecoder: ...


def periodic_loop(tokens: Sequence[int]) -> bool:
    """At >= 16 tokens: the last `period` tokens equal the `period` before them, for some
    period in 4..min(32, n // 2) (the same rule the chat cleanup cuts earlier turns by)."""
    return loop_period(tokens) is not None


def ngram_loop(tokens: Sequence[int]) -> bool:
    """In the last min(n, 300) tokens, when that is >= 60: some 6-gram occurs >= 6 times."""
    window = list(tokens[-300:])
    if len(window) < 60:
        return False
    counts = Counter(tuple(window[i:i + 6]) for i in range(len(window) - 5))
    return max(counts.values()) >= 6


def loop_found(tokens: Sequence[int]) -> bool:
    return periodic_loop(tokens) or ngram_loop(tokens)


class NgramWindow:
    """ngram_loop, kept up to date one token at a time (it runs after every generated token):
    counts of the 6-grams inside the last 300 tokens. Once the window holds 60 tokens, every
    earlier check came out false, so only the newest 6-gram's count can have reached 6."""
    SIZE, GRAM, MIN_WINDOW, REPEATS = 300, 6, 60, 6

    def __init__(self):
        self.counts: Counter = Counter()

    def push(self, tokens: Sequence[int]) -> bool:
        """tokens: every token so far, the newest last. True when the rule fires."""
        n = len(tokens)
        if n >= self.GRAM:
            self.counts[tuple(tokens[n - self.GRAM:])] += 1
        if n > self.SIZE:  # the gram starting just before the window left it
            self.counts[tuple(tokens[n - self.SIZE - 1:n - self.SIZE - 1 + self.GRAM])] -= 1
        if n < self.MIN_WINDOW:
            return False
        if n == self.MIN_WINDOW:
            return max(self.counts.values()) >= self.REPEATS
        return self.counts[tuple(tokens[n - self.GRAM:])] >= self.REPEATS


def held_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Stops:
    """One request's end conditions over its generated tokens.

    `feed(ids)` returns the ids taken (EOS and anything after an end are dropped) and the
    text now safe to show; once `finish` is set, `flush()` gives the held text that remains
    (nothing after a stop string). `shown`: bytes the first tokens repeat from the prompt's
    text (token healing); they are neither shown nor searched for stop strings."""

    def __init__(self, tokenizer: Detokenizer, eos_id: int, stop_strings: Sequence[str],
                 max_tokens: int, loop_detection: bool, shown: bytes = b""):
        self.text = tokenizer.incremental_decoder(shown)
        self.eos_id = eos_id
        self.stop_strings = [s for s in stop_strings if s]
        self.max_tokens = max_tokens
        self.loop_detection = loop_detection
        self.tokens: list[int] = []
        self.ngrams = NgramWindow()
        self.pending = ""  # decoded, not shown: may be the start of a stop string
        self.finish: str | None = None
        self.message = ""
        self.stop_string_hit = False

    def end(self, reason: str, message: str = "") -> None:
        if self.finish is None:
            self.finish, self.message = reason, message

    def feed(self, ids: Sequence[int]) -> tuple[list[int], str]:
        taken: list[int] = []
        shown = ""
        for token in ids:
            if self.finish is not None:
                break
            if token == self.eos_id:
                self.end("stop")
                break
            taken.append(token)
            self.tokens.append(token)
            self.pending += self.text.push(token)
            cut = self._first_stop(self.pending)
            if cut is not None:
                shown += self.pending[:cut]
                self.pending = ""
                self.stop_string_hit = True
                self.end("stop")
            elif self.loop_detection and (self.ngrams.push(self.tokens) or periodic_loop(self.tokens)):
                self.end("loop", f"stopped: a repetition loop after {len(self.tokens)} tokens")
            elif len(self.tokens) >= self.max_tokens:
                self.end("length")
        if self.finish is None:
            keep = held_prefix(self.pending, self.stop_strings)
            shown += self.pending[:len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
        return taken, shown

    def flush(self) -> str:
        if self.stop_string_hit:
            return ""  # nothing after a stop string is shown
        rest = self.pending + self.text.flush()
        self.pending = ""
        cut = self._first_stop(rest)
        return rest if cut is None else rest[:cut]

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
