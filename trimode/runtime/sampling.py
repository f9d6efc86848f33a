"""Turning one logit row into a token: greedy, temperature, top-k, top-p, min-p, logit bias,
repetition, frequency and presence penalties and suppressed ids, with a seeded numpy
Generator (same seed, same output).

Greedy never copies logits off the device unless it must: StepResult already carries each
row's argmax and its probability, and an adjustment that only lowers logits (penalties,
suppression, a negative bias) can only move the argmax when it touches the argmax itself, so
full rows are fetched only for those rows, or where an adjustment may lift a logit.

Sampling is host work between two GPU steps, once per row (a spec cycle samples ~2K rows), so
a row costs a few passes over the vocabulary and never a sort of it: a 131072-token row sorted
took ~12 ms against a ~4 ms 14B decode step. The filters keep a prefix of the tokens in
falling probability; a threshold finds a prefix that holds theirs, and only it is sorted, or,
for a long one (a flat row's nucleus), only the bucket of weights its cut falls in.
A GPU build also hands over each row's largest logits (StepResult.top): top-k, and top-p or
min-p without it, draw from those alone wherever they provably hold every token the filters
keep, all of a step's rows filtered and drawn as one [rows, 64] array (numpy's per-call
overhead is what such small rows cost); and each row's softmax mass by chunks
(StepResult.masses): top-p's share of the whole row, and for temperature alone the chunk a
draw lands in, the only chunk it copies (chunked_row.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from trimode.runtime.chunked_row import ChunkedRow, chunked_rows
from trimode.runtime.forward import MASS_CHUNK, TOP_CANDIDATES, StepResult


# Under this temperature sampling is greedy: float32 weights exp((l - max) / T) are one-hot
# there but for exact ties (logits a float32 step apart differ by e^-1e23), and past ~3e-39
# 1 / T is no float32 at all.
GREEDY_BELOW = 1e-30
# Penalty factors, penalties and biases beyond this would take float32 logits to infinity
# (then infinity - infinity in the softmax).
MAX_ADJUSTMENT = 1e30


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or under GREEDY_BELOW) is greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.
    The penalties act as llama.cpp's on the ids among the last `penalty_last_n` tokens of
    prompt + generated text: repetition_penalty divides a positive logit and multiplies a
    negative one, then frequency_penalty x the id's count there and presence_penalty are
    subtracted. `penalty_ids` get `ids_penalty` as a repetition factor wherever they are.
    `logit_bias` (id, bias) pairs are added first, as llama.cpp does."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 0
    penalty_ids: tuple[int, ...] = ()
    ids_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def problem(self) -> str | None:
        """The first setting that makes no sense, as a sentence, or None."""
        if not self.temperature >= 0:
            return f"temperature must be >= 0, got {self.temperature}"
        if self.top_k < 0:
            return f"top_k must be >= 0, got {self.top_k}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if not 0 <= self.min_p <= 1:
            return f"min_p must be in [0, 1], got {self.min_p}"
        for name in ("repetition_penalty", "ids_penalty"):
            if not 1 / MAX_ADJUSTMENT <= getattr(self, name) <= MAX_ADJUSTMENT:
                return f"{name} must be > 0 (in [1e-30, 1e30]), got {getattr(self, name)}"
        for name in ("frequency_penalty", "presence_penalty"):
            if not abs(getattr(self, name)) <= MAX_ADJUSTMENT:
                return f"{name} must be a finite number (at most 1e30 either way), got {getattr(self, name)}"
        if self.penalty_last_n < 0:
            return f"penalty_last_n must be >= 0, got {self.penalty_last_n}"
        if any(not abs(bias) <= MAX_ADJUSTMENT for _, bias in self.logit_bias):
            return "logit_bias values must be finite numbers (at most 1e30 either way)"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalizes_window(self) -> bool:
        """Whether the last penalty_last_n tokens change any logit."""
        return self.penalty_last_n > 0 and (self.repetition_penalty != 1 or self.frequency_penalty != 0
                                            or self.presence_penalty != 0)

    @property
    def lifts(self) -> bool:
        """Whether an adjustment may raise a logit (then it may overtake the argmax, or
        enter the top candidates from outside them)."""
        return (self.repetition_penalty < 1 or self.frequency_penalty < 0 or self.presence_penalty < 0
                or (self.ids_penalty < 1 and bool(self.penalty_ids))
                or any(bias > 0 for _, bias in self.logit_bias))


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `ids` is in `sorted_ids` (ascending, not empty), and whether it is there."""
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return at, sorted_ids[at] == ids


def softmax64(row: np.ndarray) -> np.ndarray:
    row = np.asarray(row, np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


@dataclass(frozen=True)
class Distribution:
    """Probabilities over the tokens that can be drawn: `ids` ascending, `probs` summing to
    1; every other token has probability 0."""
    ids: np.ndarray    # int64
    probs: np.ndarray  # float64

    @classmethod
    def one_hot(cls, token: int) -> "Distribution":
        return cls(np.array([token], np.int64), np.ones(1))

    def of(self, tokens) -> np.ndarray:
        """Probabilities of `tokens` (an array of ids)."""
        tokens = np.asarray(tokens, np.int64)
        if len(self.ids) == self.ids[-1] + 1:  # ascending from 0 without a gap: every token
            return self.probs[np.minimum(tokens, len(self.ids) - 1)] * (tokens < len(self.ids))
        at, found = _lookup(self.ids, tokens)
        return np.where(found, self.probs[at], 0.0)

    def prob(self, token: int) -> float:
        at = int(self.ids.searchsorted(token))  # of() for one token, ~10x cheaper
        return float(self.probs[at]) if at < len(self.ids) and self.ids[at] == token else 0.0

    def dense(self, vocab: int) -> np.ndarray:
        out = np.zeros(vocab)
        out[self.ids] = self.probs
        return out


# Thresholds are tested in float32 and the filters applied in float64: a threshold prefix
# is taken only with this much room, so rounding never cuts a token the filters keep.
_MARGIN = 1e-5
# Top-p's thresholds, each 16 times under the last (relative to the top token's weight), before
# taking every token over min-p's: float32 weights under 16^-16 ~ 5e-20 carry no mass.
_THRESHOLD_STEP, _THRESHOLD_TRIES = 16.0, 16
# Past this many candidates the filters' cut comes from weight buckets over them instead of
# a sort of their weights, and top-p stops lowering its threshold (a flat row's nucleus is
# ~100k tokens: a ~0.6 ms sort, as much again in running sums, a pass a threshold).
_BUCKET_CUT_FROM = 4096
# Top-k estimates its threshold from every this-many-th logit.
_TOP_K_STRIDE = 16


def _top_k_ids(row: np.ndarray, k: int) -> np.ndarray:
    """Ascending ids of the logits at or above the k-th largest (ties included). A strided
    sample of the row puts a threshold a little under the k-th largest, so the selection
    runs over the few logits above it; a threshold that catches fewer than k takes the row."""
    sample = row[::_TOP_K_STRIDE]
    m = min(len(sample), k // _TOP_K_STRIDE + 4)
    near = np.flatnonzero(row >= np.partition(sample, len(sample) - m)[len(sample) - m])
    if len(near) < k:
        near = np.arange(len(row))
    values = row[near]
    return near[values >= np.partition(values, len(near) - k)[len(near) - k]]


def _top_p_prefix(weight: np.ndarray, total: float, top_p: float, min_p: float) -> np.ndarray:
    """Ascending ids of the tokens at or above a weight threshold (a prefix of the tokens in
    falling probability) that holds every token top-p and min-p keep: the first of falling
    thresholds whose prefix holds p of the mass, or min-p's own threshold; every id once a
    threshold's prefix is too long to be worth the next."""
    # min-p keeps weight >= min_p, the top token's weight being 1
    floor = np.float32(min_p * (1 - _MARGIN))
    threshold = np.float32(1.0)
    for _ in range(_THRESHOLD_TRIES if top_p < 1.0 else 0):
        threshold /= np.float32(_THRESHOLD_STEP)
        if threshold <= floor:
            break
        candidates = np.flatnonzero(weight >= threshold)
        if len(candidates) > _BUCKET_CUT_FROM:  # lower thresholds cost more than buckets
            return _every_id(len(weight))
        if weight[candidates].sum(dtype=np.float64) >= top_p * total * (1 + _MARGIN):
            return candidates
    return np.flatnonzero(weight >= floor)


def _bucketed_keep(weight: np.ndarray, total: float, top_p: float, min_p: float) -> np.ndarray:
    """Which of `weight` (relative to `total`) top-p and min-p keep, no top-k, as a sort of
    the weights would find them. Buckets are a float32's top 16 bits (sign, exponent, 7
    mantissa bits: monotone in a non-negative weight); a bucket above the one top-p's cut
    falls in is kept whole, none under it, so only that bucket is sorted."""
    n, last = len(weight), None  # None: every token
    if top_p < 1.0:
        keys = np.asarray(weight, np.float32).view(np.int32) >> 16
        mass = np.bincount(keys, weights=weight)[::-1] / total  # by falling bucket
        above = np.cumsum(mass) - mass  # the mass of the buckets above each
        cut = int(np.searchsorted(above, top_p, side="left")) - 1  # the last with room under top_p
        key = len(mass) - 1 - cut
        inside = np.sort(weight[np.flatnonzero(keys == key)])[::-1]
        probs = inside.astype(np.float64) / total
        taken = int(np.searchsorted(above[cut] + np.cumsum(probs) - probs, top_p, side="left"))
        if taken:  # else an empty lowest bucket: rounding left top-p short of the whole row
            n, last = int(np.count_nonzero(keys > key)) + taken, inside[taken - 1]
    if min_p > 0:
        passes = weight >= np.float64(min_p * float(weight.max()))  # compared in float64
        if np.count_nonzero(passes) < n:  # min-p keeps every tie at its cut
            return passes
    return np.ones(len(weight), bool) if last is None else _first_in_falling(weight, n, last)


def _first_in_falling(weight: np.ndarray, n: int, last) -> np.ndarray:
    """The first n of `weight` in falling order, ties by position, `last` the n-th's weight."""
    keep = weight > last
    keep[np.flatnonzero(weight == last)[:n - np.count_nonzero(keep)]] = True
    return keep


# A running sum over a whole vocabulary costs ~0.4 ms (numpy's cumsum is sequential): a draw
# finds its block of this many probabilities from the block sums, then the token inside it
# (the chunks of a GPU build's chunk masses: a draw from those lands on the same token).
_DRAW_BLOCK = MASS_CHUNK
# A row known by chunk masses recomputes each chunk holding a penalized or suppressed id from
# its logits; past this many such chunks the whole row is cheaper to fetch.
_MAX_ADJUSTED_CHUNKS = 32
_WHOLE_ROW = object()


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The index i where u (in [0, 1)) falls in the running sum of probs, never one of
    probability 0."""
    n = len(probs)
    if n > 4 * _DRAW_BLOCK:
        starts = np.arange(0, n, _DRAW_BLOCK)
        block_cdf = np.cumsum(np.add.reduceat(probs, starts))
        x = u * block_cdf[-1]
        b = min(int(np.searchsorted(block_cdf, x, side="right")), len(starts) - 1)
        local = np.cumsum(probs[starts[b]:starts[b] + _DRAW_BLOCK])
        x -= block_cdf[b - 1] if b else 0.0
        at = int(starts[b]) + min(int(np.searchsorted(local, x, side="right")), len(local) - 1)
        if probs[at] > 0:  # else rounding between block and running sums: take the exact way
            return at
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)


def _inverse_cdf_rows(probs: np.ndarray, u: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """_inverse_cdf of each row of `probs` (the first `lengths` of each, zeros after) and u."""
    cdf = np.cumsum(probs, axis=1)
    at = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1)
    return np.minimum(at, lengths - 1)


def _rows_ordered(order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index that takes each row of an array in `order` (an argsort along its rows)."""
    return np.arange(len(order))[:, None], order


def _falling(ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids and keys [rows, n], each row by falling key, ties by the smaller id: sorted only
    where a row is not already (the candidates come that way, and weights follow logits)."""
    later = keys[:, 1:]
    if (later < keys[:, :-1]).all():  # strictly falling: the usual case, one comparison
        return ids, keys
    if not ((later > keys[:, :-1]) | ((later == keys[:, :-1]) & (ids[:, 1:] < ids[:, :-1]))).any():
        return ids, keys
    at = _rows_ordered(np.lexsort((ids, -keys), axis=1))
    return ids[at], keys[at]


@lru_cache(maxsize=4)
def _every_id(vocab: int) -> np.ndarray:
    ids = np.arange(vocab, dtype=np.int64)
    ids.flags.writeable = False
    return ids


@dataclass(frozen=True)
class _Penalties:
    """The penalties of one row: the ids they touch (ascending), each one's repetition
    factor and what is then subtracted from its logit."""
    ids: np.ndarray       # int64
    factor: np.ndarray    # float32
    subtract: np.ndarray  # float32

    def apply(self, logits: np.ndarray, which) -> np.ndarray:
        """`logits` of the ids self.ids[which], penalized."""
        factor = self.factor[which]
        return np.where(logits > 0, logits / factor, logits * factor) - self.subtract[which]


class Sampler:
    """One request's sampling state: its parameters, suppressed ids and random stream.

    `history` arguments are the ids that precede the predicted token (prompt + generated),
    or any list ending the same way that `context()` returned; only the penalties' window
    reads them."""

    def __init__(self, params: SamplingParams, suppress_ids: Sequence[int] = ()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.suppress = np.array(sorted(set(suppress_ids)), np.int64)
        bias = dict(params.logit_bias)  # a repeated id: its last bias, as a JSON object gives
        self.bias_ids = np.array(sorted(bias), np.int64)
        self.bias = np.array([bias[i] for i in self.bias_ids.tolist()], np.float32)
        self.fixed = frozenset(params.penalty_ids) if params.ids_penalty != 1 else frozenset()
        # suppressed and biased ids, touched whatever the history (the fixed penalty ids
        # come with the penalties, _penalized); as a set, for greedy, with the fixed ids too
        self._always = np.union1d(self.suppress, self.bias_ids)
        self._always_set = frozenset(self._always.tolist()) | self.fixed
        fixed = sorted(self.fixed)
        self._fixed_only = _Penalties(np.array(fixed, np.int64), np.full(len(fixed), params.ids_penalty, np.float32),
                                      np.zeros(len(fixed), np.float32))

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def context(self, history: Sequence[int], extra: Sequence[int] = ()) -> list[int]:
        """The part of history + extra the penalty can see (nothing when it is off), so
        callers never copy a long history for nothing."""
        n = self.params.penalty_last_n
        if not self.params.penalizes_window:
            return []
        return (list(history[-n:]) + list(extra))[-n:]

    def _penalized(self, history: Sequence[int]) -> "_Penalties":
        """What the penalties do to a row after `history`."""
        p = self.params
        if not p.penalizes_window:  # every row of most requests: nothing, or the fixed ids
            return self._fixed_only
        # a window is a few dozen ids: Python's Counter and sets beat numpy's per-call cost
        window = history[-p.penalty_last_n:]
        counted = p.frequency_penalty != 0 or p.presence_penalty != 0
        count = Counter(window) if counted else set(window)
        ids = sorted(self.fixed.union(count)) if self.fixed else sorted(count)
        factor = np.full(len(ids), p.repetition_penalty, np.float32)
        if self.fixed:
            factor[[i not in count for i in ids]] = 1.0
            factor[[i in self.fixed for i in ids]] *= np.float32(p.ids_penalty)
        subtract = np.zeros(len(ids), np.float32)
        if counted:
            times = np.array([count[i] for i in ids], np.float32)  # 0: a fixed id outside the window
            subtract = np.where(times > 0, times * np.float32(p.frequency_penalty)
                                + np.float32(p.presence_penalty), subtract)
        return _Penalties(np.array(ids, np.int64), factor, subtract)

    def _touched(self, penalized: "_Penalties") -> np.ndarray:
        """Every id an adjustment changes (ascending)."""
        return np.union1d(penalized.ids, self._always) if len(penalized.ids) else self._always

    def _touched_ids(self, history: Sequence[int]) -> frozenset:
        """The ids of _touched(self._penalized(history)), without building the penalties."""
        p = self.params
        if not p.penalizes_window:
            return self._always_set
        return self._always_set.union(history[-p.penalty_last_n:])

    def adjust(self, row: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Logit row after the logit bias, the penalties and suppression (float32; a copy
        only when they change something)."""
        return self._adjusted_span(0, np.asarray(row, np.float32), self._penalized(history))

    def _adjusted_span(self, start: int, logits: np.ndarray, penalized: "_Penalties") -> np.ndarray:
        """adjust() of the logits of ids start.. (a whole row, or a chunk)."""
        stop = start + len(logits)
        hit = (penalized.ids >= start) & (penalized.ids < stop)
        biased = (self.bias_ids >= start) & (self.bias_ids < stop)
        gone = self.suppress[(self.suppress >= start) & (self.suppress < stop)] - start
        if not hit.any() and not biased.any() and not len(gone):
            return logits
        logits = logits.copy()
        logits[self.bias_ids[biased] - start] += self.bias[biased]
        at = penalized.ids[hit] - start
        logits[at] = penalized.apply(logits[at], hit)
        logits[gone] = -np.inf
        return logits

    def distribution(self, row: np.ndarray, history: Sequence[int]) -> Distribution:
        """What a sample is drawn from: adjusted logits / temperature, softmax, then top-k,
        top-p (the smallest set reaching p of what top-k kept, renormalized, as vLLM and
        transformers apply them) and min-p (>= min_p * top prob), renormalized. Temperature
        0 gives a one-hot on the adjusted argmax."""
        p = self.params
        row = self.adjust(row, history)
        if self.greedy:
            return Distribution.one_hot(int(row.argmax()))
        top_k = p.top_k if p.top_k < len(row) else 0
        if top_k:  # top-p and min-p look only at what top-k keeps: no other logit matters
            candidates = _top_k_ids(row, top_k)
            return self._filtered(candidates, row[candidates], top_k, None)
        # weights relative to the top token (which has weight 1), over the vocabulary
        weight = np.exp((row - row.max()) * np.float32(1.0 / p.temperature))
        total = float(weight.sum(dtype=np.float64))
        if not (p.top_p < 1.0 or p.min_p > 0):
            return Distribution(_every_id(len(row)), np.multiply(weight, 1 / total, dtype=np.float64))
        candidates = _top_p_prefix(weight, total, p.top_p, p.min_p)
        held = weight[candidates] if len(candidates) < len(row) else weight
        return self._filtered(candidates, held, 0, total)

    def distributions_from_top(self, values: np.ndarray, ids: np.ndarray,
                               histories: Sequence[Sequence[int]],
                               totals: np.ndarray | None = None) -> list[Distribution | None]:
        """distribution() of each row known only by its largest logits (`values` [rows, K]
        falling, ties by the smaller id, id -1 past a short row), or None for a row where
        they may not hold every token the filters keep.

        With top-k: fewer than top-k of them, after the adjustments, above the largest logit
        left out (which may equal the last of them) give None. Without top-k, top-p and
        min-p judge the whole row: min-p needs no more (a row where the largest left out
        could reach min-p gives None), top-p needs `totals` [rows], each adjusted row's sum
        of exp((l - max) / temperature) over the vocabulary (its chunk masses; nan where
        unknown), and gives None where the candidates above the largest left out hold less
        than top_p of it. The adjustments only lower logits unless params.lifts: then None
        too. The rows are filtered as one array: numpy's cost per call, not per element, is
        what a few hundred candidates cost, so 16 rows take ~2x one row."""
        p = self.params
        rows, width = values.shape
        nucleus = p.top_k == 0  # top-p and min-p over the whole row, top-p by its mass
        if nucleus:
            served = (p.min_p > 0 or p.top_p < 1) and (p.top_p == 1 or totals is not None)
        else:
            served = p.top_k <= width
        if not served or p.lifts:
            return [None] * rows
        keep = width if nucleus else p.top_k
        ids = ids.astype(np.int64)
        short = not (ids[:, -1] >= 0).all()  # a short row pads its end with id -1
        if short:  # and leaves no token out
            known = ids >= 0
            left_out = np.where(known[:, -1], values[:, -1], -np.inf)[:, None]
            values = np.where(known, values, np.float32(-np.inf))
        else:
            left_out = values[:, -1:]
            values = values.copy()
        reordered = False  # whether an adjustment may have broken the falling order
        for r, history in enumerate(histories):
            penalized = self._penalized(history)
            if not len(penalized.ids):
                continue
            at, hit = _lookup(penalized.ids, ids[r])
            if hit.any():
                values[r, hit] = penalized.apply(values[r, hit], at[hit])
                reordered = True
        if len(self.bias_ids):  # biases here are never positive (params.lifts)
            at, hit = _lookup(self.bias_ids, ids)
            values[hit] += self.bias[at[hit]]
            reordered |= bool(hit.any())
        if len(self.suppress):
            hit = np.isin(ids, self.suppress)
            values[hit] = -np.inf
            reordered |= bool(hit.any())
        above = values > left_out  # certainly ranked above every token left out
        count = above.sum(axis=1)
        everything = (left_out[:, 0] == -np.inf) & (count > 0)
        usable = everything | (count > 0 if nucleus else count >= p.top_k)
        if nucleus and p.top_p < 1:
            usable &= np.isfinite(totals)
        if not usable.all():
            if not usable.any():
                return [None] * rows
            values, ids, count, above = values[usable], ids[usable], count[usable], above[usable]
            left_out, everything = left_out[usable], everything[usable]
            totals = None if totals is None else totals[usable]
        if reordered:  # by logit, ties by id
            values = np.where(above, values, np.float32(-np.inf))
            ids, values = _falling(ids, values)
        ids, values = ids[:, :keep], values[:, :keep]
        inv_t = np.float32(1.0 / p.temperature)
        weight = np.exp((values - values[:, :1]) * inv_t)  # the top one above all left out
        ids, weight = _falling(ids, weight)  # the filters' order: by weight, ties by id
        probs = weight.astype(np.float64)
        if nucleus and p.top_p < 1:
            probs /= totals[:, None]  # over the vocabulary
        else:
            probs /= probs.sum(axis=1, keepdims=True)  # over what top-k keeps: top-p's mass
        n = np.minimum(count, keep)
        # rows whose candidates hold every token the filters keep (top-k's: all that are left)
        held = everything.copy() if nucleus else np.ones(len(n), bool)
        if p.top_p < 1:  # mass strictly above each token < top_p
            mass = np.cumsum(probs, axis=1)
            n = np.minimum(n, (mass - probs < p.top_p).sum(axis=1))
            if nucleus:  # every token left out has the known candidates' mass above it
                held |= mass[np.arange(len(n)), count - 1] >= p.top_p * (1 + _MARGIN)
        if p.min_p > 0:
            n = np.minimum(n, (probs >= p.min_p * probs[:, :1]).sum(axis=1))
            if nucleus:  # the largest left out weighs under min-p
                held |= np.exp((left_out[:, 0] - values[:, 0]) * inv_t) < p.min_p * (1 - _MARGIN)
        kept = np.arange(keep) < n[:, None]
        probs[~kept] = 0.0
        probs /= probs.sum(axis=1, keepdims=True)
        ascending = _rows_ordered(np.argsort(np.where(kept, ids, np.iinfo(np.int64).max), axis=1))
        ids, probs = ids[ascending], probs[ascending]
        made = iter(Distribution(i[:k], q[:k]) if ok else None
                    for i, q, k, ok in zip(ids, probs, n, held))
        return [next(made) if ok else None for ok in usable]

    def _filtered(self, candidates: np.ndarray, weight: np.ndarray, top_k: int,
                  total: float | None) -> Distribution:
        """The filters over `candidates` (ascending ids, a prefix of the tokens in falling
        probability that holds all they keep). weight: the candidates' weights relative to
        the whole row's `total`; or, with total None, their logits (top-k: only ratios among
        what it keeps count)."""
        p = self.params
        if total is None:
            weight = np.exp((weight - weight.max()) * np.float32(1.0 / p.temperature))
            total = float(weight.sum(dtype=np.float64))
        # Each filter keeps a prefix of the tokens in falling probability (ties by id), so
        # together they keep the shortest: its length comes from the sorted weights alone.
        if not top_k and len(weight) > _BUCKET_CUT_FROM:
            keep = _bucketed_keep(weight, total, p.top_p, p.min_p)
        else:
            falling = np.sort(weight)[::-1]  # a sort of values, not of ids: ~30x cheaper
            probs = falling.astype(np.float64) / total
            n = min(len(probs), top_k or len(probs))
            if p.top_p < 1.0:  # mass strictly above each token < top_p, within top-k's tokens
                mass = probs[:n] / probs[:n].sum() if top_k else probs
                n = min(n, int(np.searchsorted(np.cumsum(mass) - mass, p.top_p, side="left")))
            if p.min_p > 0:
                n = min(n, int(np.count_nonzero(probs >= p.min_p * probs[0])))
            keep = _first_in_falling(weight, n, falling[n - 1])
        at = np.flatnonzero(keep)  # indices, not a mask: a scattered mask gathers ~5x slower
        kept = weight[at].astype(np.float64)
        return Distribution(candidates[at], kept / kept.sum())

    def distributions_known(self, step: StepResult, rows: Sequence[int],
                            histories: Sequence[Sequence[int]]) -> list[Distribution | ChunkedRow | None]:
        """distribution() of each of the step's `rows` that a GPU build's extra outputs
        suffice for, None for the others; copies no whole row. Top-k under 64: the row's top
        candidates (a few hundred bytes). Top-p or min-p without top-k: the top candidates
        where they hold all those filters keep, top-p's share of the row from its chunk
        masses. Temperature alone: the row's chunk masses, and then only the chunks a draw or
        a probability reads."""
        p = self.params
        if self.greedy:
            return [None] * len(rows)
        if p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0:
            if step.fetch_mass is None:
                return [None] * len(rows)
            return self._chunked(step, rows, histories)
        if not (0 < p.top_k < TOP_CANDIDATES or p.top_k == 0) or (top := step.top()) is None:
            return [None] * len(rows)
        values, ids = top
        totals = None
        if p.top_k == 0 and p.top_p < 1.0:
            if step.fetch_mass is None:
                return [None] * len(rows)
            totals = np.array([np.nan if row is None else row.total
                               for row in self._chunked(step, rows, histories)])
        return self.distributions_from_top(values[list(rows)], ids[list(rows)], histories, totals)

    def _chunked(self, step: StepResult, rows: Sequence[int],
                 histories: Sequence[Sequence[int]]) -> list[ChunkedRow | None]:
        """A ChunkedRow of each of the step's `rows`, None where adjusting it by chunks
        would cost more than its whole row."""
        adjustments = [self._adjustment(history) for history in histories]
        usable = [i for i, a in enumerate(adjustments) if a is not _WHOLE_ROW]
        out: list[ChunkedRow | None] = [None] * len(rows)
        if usable:
            made = chunked_rows(step, [rows[i] for i in usable], 1.0 / self.params.temperature,
                                [adjustments[i] for i in usable])
            for i, row in zip(usable, made):
                out[i] = row
        return out

    def _adjustment(self, history: Sequence[int]):
        """A chunked row's adjust() and the ids it changes; None where nothing changes,
        _WHOLE_ROW where so many chunks change that the whole row is cheaper."""
        penalized = self._penalized(history)
        adjusted = self._touched(penalized)
        if not len(adjusted):
            return None
        if len(np.unique(adjusted // MASS_CHUNK)) > _MAX_ADJUSTED_CHUNKS:
            return _WHOLE_ROW
        return (lambda start, logits: self._adjusted_span(start, logits, penalized)), adjusted

    def distributions(self, step: StepResult, rows: Sequence[int],
                      histories: Sequence[Sequence[int]]) -> list[Distribution | ChunkedRow]:
        """distribution() of each of the step's `rows`: from its top candidates where they
        suffice, else from the logit rows, the ones from the first to the last still needed
        fetched in one copy."""
        out = self.distributions_known(step, rows, histories)
        missing = [i for i, dist in enumerate(out) if dist is None]
        if missing:
            first = min(rows[i] for i in missing)
            logits = step.logits(first, max(rows[i] for i in missing) + 1)
            for i in missing:
                out[i] = self.distribution(logits[rows[i] - first], histories[i])
        return out

    def draw(self, dist: Distribution | ChunkedRow) -> int:
        """One id from `dist` using this request's random stream."""
        return self.draw_each([dist])[0][0]

    def draw_each(self, dists: Sequence[Distribution | ChunkedRow]) -> tuple[list[int], list[float]]:
        """An id from each of `dists` and its probability: what draw() on each in turn gives
        (the same random numbers), the short ones (top-k's) drawn as one array."""
        u = self.rng.random(len(dists))
        drawn: list[tuple[int, float]] = [(0, 0.0)] * len(dists)
        short = [i for i, d in enumerate(dists)
                 if isinstance(d, Distribution) and len(d.probs) <= TOP_CANDIDATES]
        if len(short) == 1:  # one row (an AR token): the padded array costs more than it saves
            short = []
        if short:
            lengths = np.array([len(dists[i].probs) for i in short])
            padded = np.zeros((len(short), lengths.max()))
            for row, i in zip(padded, short):
                row[:len(dists[i].probs)] = dists[i].probs
            for i, at in zip(short, _inverse_cdf_rows(padded, u[short], lengths)):
                drawn[i] = int(dists[i].ids[at]), float(dists[i].probs[at])
        for i in sorted(set(range(len(dists))) - set(short)):
            d = dists[i]
            if isinstance(d, ChunkedRow):
                drawn[i] = d.draw(u[i])
            else:
                at = _inverse_cdf(d.probs, u[i])
                drawn[i] = int(d.ids[at]), float(d.probs[at])
        return [token for token, _ in drawn], [prob for _, prob in drawn]

    def choose(self, step: StepResult, rows: Sequence[int],
               histories: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
        """A token per row and its confidence (its probability under the distribution it was
        chosen from). Greedy reads argmax/prob; a full row is fetched only where the argmax
        itself is adjusted, or where an adjustment may lift a logit past it (params.lifts).
        Sampling reads distributions()."""
        if not self.greedy:
            return self.draw_each(self.distributions(step, rows, histories))
        ids = [int(step.argmax[r]) for r in rows]
        conf = [float(step.prob[r]) for r in rows]
        for i, (r, hist) in enumerate(zip(rows, histories)):
            touched = self._touched_ids(hist)
            if ids[i] in touched or (self.params.lifts and touched):
                adjusted = self.adjust(step.logits(r, r + 1)[0], hist)
                ids[i] = int(adjusted.argmax())
                conf[i] = float(softmax64(adjusted)[ids[i]])
        return ids, conf
