"""Stops: EOS, stop strings across tokens, cycles and split characters, token limit, and the
fork's two loop rules (MODEL.md section 6)."""
from __future__ import annotations

import codecs

import numpy as np
import pytest

from trimode.runtime.stops import Stops, held_prefix, loop_found, ngram_loop, periodic_loop

EOS = 0


class PieceTokenizer:
    """Id i stands for the UTF-8 bytes of PIECES[i]; some pieces split a character."""
    PIECES = [b"", b"he", b"llo", b" wor", b"ld", b"<", b"/s", b">", b"\xc3", b"\xa9", b"!", b"x"]

    def incremental_decoder(self, skip=b""):
        assert not skip, "this fake does not heal prompts"
        return _Decoder(self.PIECES)


class _Decoder:
    def __init__(self, pieces):
        self.pieces = pieces
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.utf8.decode(self.pieces[token_id])

    def flush(self):
        return self.utf8.decode(b"", final=True)


def stops(stop_strings=(), max_tokens=100, loop=False) -> Stops:
    return Stops(PieceTokenizer(), EOS, stop_strings, max_tokens, loop)


def feed_all(s: Stops, cycles) -> tuple[list[int], str]:
    ids, text = [], ""
    for cycle in cycles:
        taken, shown = s.feed(cycle)
        ids += taken
        text += shown
        if s.finish:
            break
    return ids, text + (s.flush() if s.finish else "")


def test_stop_string_across_tokens():
    s = stops(["o w"])
    ids, text = feed_all(s, [[1], [2], [3], [4]])
    assert (text, s.finish, ids) == ("hell", "stop", [1, 2, 3])


def test_stop_string_across_cycles_is_held_back_then_cut():
    s = stops(["</s>"])
    taken, shown = s.feed([1, 2, 5])  # "hello<": "<" may start the stop string
    assert shown == "hello" and s.finish is None
    taken, shown = s.feed([6, 7, 10])  # "/s>" completes it inside this accepted block
    assert (taken, shown, s.finish) == ([6, 7], "", "stop")
    assert s.flush() == ""


def test_held_text_is_released_when_it_is_not_a_stop():
    s = stops(["</s>"])
    assert s.feed([1, 5])[1] == "he"
    assert s.feed([10])[1] == "<!"


def test_split_character_waits_for_its_bytes():
    s = stops()
    assert s.feed([8])[1] == ""
    assert s.feed([9, 10])[1] == "\u00e9!"


def test_stop_string_with_a_split_character():
    s = stops(["\u00e9"])
    ids, text = feed_all(s, [[1, 8], [9, 2]])
    assert (ids, text, s.finish) == ([1, 8, 9], "he", "stop")


def test_eos_ends_and_flushes_held_text():
    s = stops(["</s>"])
    ids, text = feed_all(s, [[1, 5, EOS, 2]])
    assert (ids, text, s.finish) == ([1, 5], "he<", "stop")


def test_max_tokens_inside_a_cycle():
    s = stops(max_tokens=3)
    ids, text = feed_all(s, [[1, 2], [3, 4, 10]])
    assert (ids, text, s.finish) == ([1, 2, 3], "hello wor", "length")


def test_end_flushes_an_unfinished_character():
    s = stops()
    s.feed([1, 8])
    s.end("context", "full")
    assert s.flush() == "\ufffd" and s.finish == "context" and s.message == "full"


def test_held_prefix():
    assert held_prefix("abc</", ["</s>"]) == 2
    assert held_prefix("abc", ["</s>"]) == 0
    assert held_prefix("ab", ["bcd", "abx"]) == 2


# --- loop detection -----------------------------------------------------------------------

def control_sequence(n: int, seed: int = 0) -> list[int]:
    """Pseudo-random tokens from a large vocabulary: no period, no repeated 6-gram."""
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 50000, n)]


def test_periodic_loop_fires_on_a_period():
    text = control_sequence(10)
    for period in (4, 7, 32):
        unit = control_sequence(period, seed=period)
        seq = text + unit * 2
        assert periodic_loop(seq) and not periodic_loop(seq[:-1]), period


def test_periodic_loop_boundaries():
    unit = [5, 6, 7]  # period 3 is below the rule's minimum of 4 ...
    assert not periodic_loop(control_sequence(20) + unit * 3)
    assert periodic_loop(control_sequence(20) + unit * 4)  # ... until it repeats at period 6
    unit = control_sequence(33, seed=1)  # period 33 is above its maximum of 32
    assert not periodic_loop(control_sequence(5) + unit * 2)
    assert not periodic_loop([1, 2, 3, 4] * 3)  # only 12 tokens: below 16


def test_ngram_loop_fires_on_six_repeats():
    gram = [7, 8, 9, 10, 11, 12]
    filler = control_sequence(200)
    seq, at = [], 0
    for n in (3, 5, 8, 4, 6, 9):  # fillers of different lengths: no period
        seq += filler[at:at + n] + gram
        at += n
    seq = control_sequence(40, seed=1) + seq
    assert not periodic_loop(seq) and ngram_loop(seq)
    assert not ngram_loop(seq[:-1])  # five whole copies are not enough


def test_ngram_loop_needs_sixty_tokens_and_looks_at_the_last_300():
    gram = [7, 8, 9, 10, 11, 12]
    assert not ngram_loop(gram * 6 + [13])  # six copies, but only 37 tokens
    old = [x for i in range(6) for x in control_sequence(4 + i, seed=10 + i) + gram]
    assert ngram_loop(old + control_sequence(20, seed=1))
    assert not ngram_loop(old + control_sequence(400, seed=1))


def test_control_never_fires():
    seq = control_sequence(1000)
    assert not any(loop_found(seq[:n]) for n in range(1, 1001, 7))


def test_loop_detection_ends_generation_on_the_token_that_makes_the_loop():
    s = Stops(PieceTokenizer(), EOS, (), 100, loop_detection=True)
    ids = [1, 2, 3, 4, 10, 11, 5, 6, 7, 2, 3, 4, 11]
    taken, _ = s.feed(ids + [1, 2, 1, 2] * 2 + [1, 2, 1, 2])
    assert s.finish == "loop" and periodic_loop(taken) and not periodic_loop(taken[:-1])
    off = Stops(PieceTokenizer(), EOS, (), 100, loop_detection=False)
    off.feed(ids + [1, 2, 1, 2] * 4)
    assert off.finish is None
