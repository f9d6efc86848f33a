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
    values, ids = top
    out = []
    for r, token in enumerate(tokens):
        found = np.flatnonzero(ids[r] == token)
        logit = values[r, found[0]] if len(found) else step.span(r, token, token + 1)[0]
        best = tuple((int(i), float(v) - log_total[r])
                     for i, v in zip(ids[r, :n_top], values[r, :n_top]) if i >= 0)
        out.append(TokenLogprob(int(token), float(logit) - log_total[r], best))
    return out


def _from_row(row: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    row = np.asarray(row, np.float64)
    peak = row.max()
    log_total = peak + np.log(np.exp(row - peak).sum())
    best: tuple[tuple[int, float], ...] = ()
    if n_top:
        n = min(n_top, len(row))
        # every id at or above the n-th largest logit (ties included), then by logit, ties by id
        near = np.flatnonzero(row >= np.partition(row, len(row) - n)[len(row) - n])
        near = near[np.lexsort((near, -row[near]))][:n]
        best = tuple((int(i), float(row[i] - log_total)) for i in near)
    return TokenLogprob(int(token), float(row[token] - log_total), best)
