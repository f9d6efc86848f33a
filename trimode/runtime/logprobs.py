"""The model's log-probability of each generated token and its most likely alternatives
(OpenAI's logprobs and top_logprobs), read from the causal pass whose row scored the token.

Every mode reports the causal (AR) distribution: AR's own rows, self-speculation's verify
rows, block diffusion's commit pass (causal over the finished block). So the numbers do not
depend on the mode, and they are what vLLM and llama-server return by default: the
log-softmax of the raw logits, before temperature, penalties, logit bias and filters. A GPU
build's top candidates and chunk masses at temperature 1 give them without copying a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trimode.runtime.forward import StepResult

# OpenAI's limit on top_logprobs (vLLM's default max_logprobs too); under a GPU build's
# TOP_CANDIDATES, so its top candidates hold them.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely ids and their logprobs, falling, ties by id


def token_logprobs(step: StepResult, tokens: Sequence[int], n_top: int) -> list[TokenLogprob]:
    """Row i of `step` is the distribution tokens[i] was generated from: each token's
    logprob and the n_top most likely ids of its row."""
    if not len(tokens):
        return []
    rows = len(tokens)
    top = step.top() if step.fetch_mass is not None else None
    if top is None:
        return [_from_row(row, token, n_top) for row, token in zip(step.logits(0, rows), tokens)]
    chunk_max, chunk_sum = (np.asarray(a[:rows], np.float64) for a in step.masses(1.0))
    ref = chunk_max.max(axis=1)
    log_total = ref + np.log((chunk_sum * np.exp(chunk_max - ref[:, None])).sum(axis=1))
    values, ids = (a[:rows] for a in top)
    wanted = np.asarray(tokens, np.int64)
    match = ids == wanted[:, None]
    logits = values[np.arange(rows), match.argmax(axis=1)].astype(np.float64)
    for r in np.flatnonzero(~match.any(axis=1)):  # a token outside its row's candidates
        logits[r] = step.span(int(r), int(wanted[r]), int(wanted[r]) + 1)[0]
    best = (values[:, :n_top] - log_total[:, None]).tolist()
    return [TokenLogprob(token, logprob, tuple((i, lp) for i, lp in zip(row_ids, row_lps) if i >= 0))
            for token, logprob, row_ids, row_lps in zip(wanted.tolist(), (logits - log_total).tolist(),
                                                        ids[:, :n_top].tolist(), best)]


def _from_row(row: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    row = np.asarray(row, np.float32)
    peak = float(row.max())
    # float32 exp, float64 sum: within ~1e-7 of the float64 log-softmax at half the cost
    log_total = peak + float(np.log(np.exp(row - np.float32(peak)).sum(dtype=np.float64)))
    best: tuple[tuple[int, float], ...] = ()
    if n_top:
        n = min(n_top, len(row))
        # every id at or above the n-th largest logit (ties included), then by logit, ties by id
        near = np.flatnonzero(row >= np.partition(row, len(row) - n)[len(row) - n])
        near = near[np.lexsort((near, -row[near]))][:n]
        best = tuple(zip(near.tolist(), (row[near].astype(np.float64) - log_total).tolist()))
    return TokenLogprob(int(token), float(row[token]) - log_total, best)
