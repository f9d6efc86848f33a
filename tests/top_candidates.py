"""What a GPU build's top_candidates entry gives, in numpy, for steps of the CPU forwards:
each row's TOP_CANDIDATES largest logits, falling, ties by the smaller id, id -1 past a row
shorter than that."""
from __future__ import annotations

import numpy as np

from trimode.runtime.forward import TOP_CANDIDATES, StepResult


def top_of(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, np.float32)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_CANDIDATES]
    values = np.full((len(logits), TOP_CANDIDATES), -3.4e38, np.float32)
    ids = np.full((len(logits), TOP_CANDIDATES), -1, np.int32)
    values[:, :order.shape[1]] = np.take_along_axis(logits, order, 1)
    ids[:, :order.shape[1]] = order
    return values, ids


def with_top(step: StepResult, fetches: list | None = None) -> StepResult:
    """`step` with top candidates beside its rows; `fetches` records every fetch of either."""
    fetches = [] if fetches is None else fetches

    def rows(start, stop):
        fetches.append(("rows", start, stop))
        return step.logits(start, stop)

    def top():
        fetches.append(("top",))
        return top_of(step.logits())
    return StepResult(step.argmax, step.prob, rows, top)
