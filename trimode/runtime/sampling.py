"""Turning one logit row into a token: greedy, temperature, top-k, top-p, min-p, repetition
penalty and suppressed ids, with a seeded numpy Generator (same seed, same output).

Greedy never copies logits off the device unless it must: StepResult already carries each
row's argmax and its probability, and an adjustment (penalty, suppression) can only move the
argmax when it touches the argmax itself, so full rows are fetched only for those rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trimode.runtime.forward import StepResult


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.
    repetition_penalty applies (llama.cpp style: positive logits divided, negative multiplied)
    to `penalty_ids` and to the last `penalty_last_n` tokens of prompt + generated text."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    penalty_ids: tuple[int, ...] = ()
    penalty_last_n: int = 0

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
        if not self.repetition_penalty > 0:
            return f"repetition_penalty must be > 0, got {self.repetition_penalty}"
        if self.penalty_last_n < 0:
            return f"penalty_last_n must be >= 0, got {self.penalty_last_n}"
        return None


def softmax64(row: np.ndarray) -> np.ndarray:
    row = np.asarray(row, np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


class Sampler:
    """One request's sampling state: its parameters, suppressed ids and random stream.

    `history` arguments are the ids that precede the predicted token (prompt + generated),
    or any list ending the same way that `context()` returned; only the repetition
    penalty's window reads them."""

    def __init__(self, params: SamplingParams, suppress_ids: Sequence[int] = ()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.suppress = np.array(sorted(set(suppress_ids)), np.int64)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def context(self, history: Sequence[int], extra: Sequence[int] = ()) -> list[int]:
        """The part of history + extra the penalty can see (nothing when it is off), so
        callers never copy a long history for nothing."""
        n = self.params.penalty_last_n
        if self.params.repetition_penalty == 1.0 or n == 0:
            return []
        return (list(history[-n:]) + list(extra))[-n:]

    def _penalized(self, history: Sequence[int]) -> np.ndarray:
        p = self.params
        if p.repetition_penalty == 1.0:
            return np.zeros(0, np.int64)
        recent = list(history[-p.penalty_last_n:]) if p.penalty_last_n else []
        return np.array(sorted(set(p.penalty_ids).union(recent)), np.int64)

    def adjust(self, row: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Logit row after the repetition penalty and suppression (float64 copy)."""
        row = np.array(row, np.float64)
        ids = self._penalized(history)
        if len(ids):
            hit = row[ids]
            row[ids] = np.where(hit > 0, hit / self.params.repetition_penalty,
                                hit * self.params.repetition_penalty)
        if len(self.suppress):
            row[self.suppress] = -np.inf
        return row

    def distribution(self, row: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The probabilities a sample is drawn from: adjusted logits / temperature, softmax,
        then top-k, top-p (smallest set reaching p) and min-p (>= min_p * top prob) filters,
        renormalized. Temperature 0 gives a one-hot on the adjusted argmax."""
        p = self.params
        row = self.adjust(row, history)
        if self.greedy:
            probs = np.zeros_like(row)
            probs[int(row.argmax())] = 1.0
            return probs
        probs = softmax64(row / p.temperature)
        order = np.argsort(-probs, kind="stable")
        keep = np.ones(len(order), bool)  # over `order`
        if p.top_k:
            keep[p.top_k:] = False
        if p.top_p < 1.0:
            before = np.cumsum(probs[order]) - probs[order]  # mass strictly above each token
            keep &= before < p.top_p
        if p.min_p > 0:
            keep &= probs[order] >= p.min_p * probs[order[0]]
        filtered = np.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        return filtered / filtered.sum()

    def draw(self, probs: np.ndarray) -> int:
        """One id from `probs` using this request's random stream."""
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"),
                       len(probs) - 1))

    def choose(self, step: StepResult, rows: Sequence[int],
               histories: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
        """A token per row and its confidence (its probability under the distribution it was
        chosen from). Greedy reads argmax/prob; a full row is fetched only where the argmax
        itself is penalized or suppressed. Sampling fetches the logits."""
        if not self.greedy:
            logits = step.logits()
            ids, conf = [], []
            for r, hist in zip(rows, histories):
                probs = self.distribution(logits[r], hist)
                token = self.draw(probs)
                ids.append(token)
                conf.append(float(probs[token]))
            return ids, conf
        ids = [int(step.argmax[r]) for r in rows]
        conf = [float(step.prob[r]) for r in rows]
        logits = None
        for i, (r, hist) in enumerate(zip(rows, histories)):
            touched = np.concatenate([self.suppress, self._penalized(hist)])
            if ids[i] in touched:
                logits = step.logits() if logits is None else logits
                adjusted = self.adjust(logits[r], hist)
                ids[i] = int(adjusted.argmax())
                conf[i] = float(softmax64(adjusted)[ids[i]])
        return ids, conf
