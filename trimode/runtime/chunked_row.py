"""The softmax of one logit row at a temperature, known by its chunk masses (a GPU build's
chunk_mass entry, StepResult.masses) and fetched a chunk of MASS_CHUNK logits at a time
where a draw lands or a probability is asked: 1 KB and a 4 KB chunk instead of a 512 KB row
at the 14B vocabulary, and host work on ~1200 numbers instead of 131072.

Weights are the whole-row sampler's (float32 exp of (l - max) / temperature, max over the
adjusted row), and a draw walks the same blocks of MASS_CHUNK in id order, so a draw gives
the token the whole row gives for the same random number (unless it lands within float32
rounding of a block's edge).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from trimode.runtime.forward import MASS_CHUNK, StepResult


class ChunkedRow:
    """Row `row` of `step` at `inv_temperature`. adjust(start, logits): the logits of the
    chunk starting at `start` after the repetition penalty and suppression; `adjusted`: the
    ids that changes (their chunks are fetched up front and their masses recomputed)."""

    def __init__(self, step: StepResult, row: int, inv_temperature: float,
                 adjust: Callable[[int, np.ndarray], np.ndarray], adjusted: np.ndarray):
        chunk_max, chunk_sum = (np.asarray(a[row], np.float64) for a in step.masses(inv_temperature))
        self.step, self.row, self.adjust = step, row, adjust
        self.inv_t = np.float32(inv_temperature)
        self._logits: dict[int, np.ndarray] = {}
        touched = np.unique(np.asarray(adjusted, np.int64) // MASS_CHUNK)
        clean = np.ones(len(chunk_max), bool)
        clean[touched] = False
        # the adjusted row's max: the clean chunks' maxima and the adjusted chunks' logits
        tops = [chunk_max[clean].max()] if clean.any() else []
        self.ref = np.float32(max(tops + [self._chunk_logits(c).max() for c in touched]))
        self.mass = chunk_sum * np.exp((chunk_max - float(self.ref)) * float(self.inv_t))
        self._weights: dict[int, np.ndarray] = {}
        for c in touched:
            self.mass[c] = self._chunk_weights(c).sum(dtype=np.float64)
        self.total = float(self.mass.sum())

    def _chunk_logits(self, c: int) -> np.ndarray:
        if c not in self._logits:
            start = c * MASS_CHUNK
            span = self.step.span(self.row, start, start + MASS_CHUNK)  # the last is short
            self._logits[c] = self.adjust(start, np.asarray(span, np.float32))
        return self._logits[c]

    def _chunk_weights(self, c: int) -> np.ndarray:
        if c not in self._weights:
            self._weights[c] = np.exp((self._chunk_logits(c) - self.ref) * self.inv_t)
        return self._weights[c]

    def prob(self, token: int) -> float:
        c = token // MASS_CHUNK
        return float(self._chunk_weights(c)[token - c * MASS_CHUNK]) / self.total

    def of(self, tokens) -> np.ndarray:
        """Probabilities of `tokens` (an array of ids): from the whole row, as the residual
        of a rejected draft against a row that had no chunk masses needs."""
        return self.dense()[np.asarray(tokens, np.int64)]

    def draw(self, u: float) -> tuple[int, float]:
        """The token where u (in [0, 1)) falls in the running sum of probabilities, never one
        of probability 0, and its probability."""
        cdf = np.cumsum(self.mass)
        x = u * cdf[-1]
        c = min(int(np.searchsorted(cdf, x, side="right")), len(cdf) - 1)
        while self.mass[c] == 0:  # x at the very end: the last chunk with any mass
            c -= 1
        weights = self._chunk_weights(c)
        local = np.cumsum(weights, dtype=np.float64)
        x -= cdf[c - 1] if c else 0.0
        at = min(int(np.searchsorted(local, x, side="right")), len(local) - 1)
        if weights[at] == 0:  # past the chunk's own sum (its device mass rounds higher)
            at = int(np.flatnonzero(weights)[-1])
        return c * MASS_CHUNK + at, float(weights[at]) / self.total

    def dense(self, vocab: int | None = None) -> np.ndarray:
        """Every token's probability (the whole row fetched)."""
        logits = self.adjust(0, np.asarray(self.step.logits(self.row, self.row + 1)[0], np.float32))
        weights = np.exp((logits - self.ref) * self.inv_t).astype(np.float64)
        return weights / weights.sum()
