"""The softmax of logit rows at a temperature, known by their chunk masses (a GPU build's
chunk_mass entry, StepResult.masses) and fetched a chunk of MASS_CHUNK logits at a time
where a draw lands or a probability is asked: 1 KB and a 4 KB chunk instead of a 512 KB row
at the 14B vocabulary, and host work on ~1200 numbers instead of 131072.

Weights are the whole-row sampler's (float32 exp of (l - max) / temperature, max over the
adjusted row), and a draw walks the same blocks of MASS_CHUNK in id order, so a draw gives
the token the whole row gives for the same random number (unless it lands within float32
rounding of a block's edge).

Chunks are fetched lazily, possibly after later passes (a draft row's chunk for a rejected
draft's residual, after the verify pass): a StepResult's logits are its own tensor, which
the StepResult keeps alive, not a buffer a later pass reuses (tests/test_step_inputs.py;
on CUDA the kernels writing the returned tensors run outside the graphs).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from trimode.runtime.forward import MASS_CHUNK, StepResult

# adjust(start, logits): the logits of the chunk starting at id `start` after the logit bias,
# the penalties and suppression
Adjust = Callable[[int, np.ndarray], np.ndarray]


def chunked_rows(step: StepResult, rows: Sequence[int], inv_temperature: float,
                 adjustments: Sequence[tuple[Adjust, np.ndarray] | None]) -> list["ChunkedRow"]:
    """A ChunkedRow for each of the step's `rows`; adjustments[i]: row i's adjust() and the
    ids it changes, or None. The masses of rows nothing adjusts are scaled as one array."""
    chunk_max, chunk_sum = step.masses(inv_temperature)
    top = np.asarray(chunk_max[list(rows)], np.float64)
    total = np.asarray(chunk_sum[list(rows)], np.float64)
    ref = top.max(axis=1)
    mass = total * np.exp((top - ref[:, None]) * float(np.float32(inv_temperature)))
    cdf = np.cumsum(mass, axis=1)
    return [ChunkedRow(step, row, inv_temperature, ref[i], mass[i], cdf[i]) if adjusted is None
            else ChunkedRow.adjusted(step, row, inv_temperature, top[i], total[i], *adjusted)
            for i, (row, adjusted) in enumerate(zip(rows, adjustments))]


class ChunkedRow:
    """Row `row` of `step` at `inv_temperature`: `ref` the adjusted row's max, `mass` each
    chunk's sum of weights exp((l - ref) * inv_temperature), `cdf` its running sum."""

    def __init__(self, step: StepResult, row: int, inv_temperature: float, ref: float,
                 mass: np.ndarray, cdf: np.ndarray, adjust: Adjust | None = None):
        self.step, self.row, self.adjust = step, row, adjust
        self.inv_t, self.ref = np.float32(inv_temperature), np.float32(ref)
        self.mass, self.cdf, self.total = mass, cdf, float(cdf[-1])
        self._logits: dict[int, np.ndarray] = {}
        self._weights: dict[int, np.ndarray] = {}

    @classmethod
    def adjusted(cls, step: StepResult, row: int, inv_temperature: float, chunk_max: np.ndarray,
                 chunk_sum: np.ndarray, adjust: Adjust, ids: np.ndarray) -> "ChunkedRow":
        """The row after `adjust`, which changes `ids`: their chunks are fetched up front and
        their masses recomputed from their logits."""
        self = cls(step, row, inv_temperature, 0.0, chunk_sum, chunk_sum, adjust)
        touched = np.unique(np.asarray(ids, np.int64) // MASS_CHUNK)
        clean = np.ones(len(chunk_max), bool)
        clean[touched] = False
        # the adjusted row's max: the clean chunks' maxima and the adjusted chunks' logits
        tops = [chunk_max[clean].max()] if clean.any() else []
        self.ref = np.float32(max(tops + [self._chunk_logits(c).max() for c in touched]))
        self.mass = chunk_sum * np.exp((chunk_max - float(self.ref)) * float(self.inv_t))
        for c in touched:
            self.mass[c] = self._chunk_weights(c).sum(dtype=np.float64)
        self.cdf = np.cumsum(self.mass)
        self.total = float(self.cdf[-1])
        return self

    def _chunk_logits(self, c: int) -> np.ndarray:
        if c not in self._logits:
            start = c * MASS_CHUNK
            span = np.asarray(self.step.span(self.row, start, start + MASS_CHUNK), np.float32)
            self._logits[c] = span if self.adjust is None else self.adjust(start, span)  # the last is short
        return self._logits[c]

    def _chunk_weights(self, c: int) -> np.ndarray:
        if c not in self._weights:
            self._weights[c] = np.exp((self._chunk_logits(c) - self.ref) * self.inv_t)
        return self._weights[c]

    def prob(self, token: int) -> float:
        if self.adjust is None and token == self.step.argmax[self.row]:
            return 1.0 / self.total  # the max's weight is exp(0) = 1: no chunk to copy
        c = token // MASS_CHUNK
        return float(self._chunk_weights(c)[token - c * MASS_CHUNK]) / self.total

    def of(self, tokens) -> np.ndarray:
        """Probabilities of `tokens` (an array of ids): from the whole row, as the residual
        of a rejected draft against a row that had no chunk masses needs."""
        return self.dense()[np.asarray(tokens, np.int64)]

    def draw(self, u: float) -> tuple[int, float]:
        """The token where u (in [0, 1)) falls in the running sum of probabilities, never one
        of probability 0, and its probability."""
        x = u * self.total
        c = min(int(self.cdf.searchsorted(x, side="right")), len(self.cdf) - 1)
        while self.mass[c] == 0:  # x at the very end: the last chunk with any mass
            c -= 1
        weights = self._chunk_weights(c)
        local = np.cumsum(weights, dtype=np.float64)
        x -= self.cdf[c - 1] if c else 0.0
        at = min(int(local.searchsorted(x, side="right")), len(local) - 1)
        if weights[at] == 0:  # past the chunk's own sum (its device mass rounds higher)
            at = int(np.flatnonzero(weights)[-1])
        return c * MASS_CHUNK + at, float(weights[at]) / self.total

    def dense(self, vocab: int | None = None) -> np.ndarray:
        """Every token's probability (the whole row fetched)."""
        logits = np.asarray(self.step.logits(self.row, self.row + 1)[0], np.float32)
        if self.adjust is not None:
            logits = self.adjust(0, logits)
        weights = np.exp((logits - self.ref) * self.inv_t).astype(np.float64)
        return weights / weights.sum()
