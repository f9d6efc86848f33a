"""Steps of the CPU forwards as a GPU build gives them: the rows, and beside them each row's
largest logits (reference.top_candidates) and chunk masses (reference.chunk_masses), the
entries' numpy twins."""
from __future__ import annotations

import numpy as np

from trimode.model.reference import chunk_masses, top_candidates
from trimode.runtime.forward import StepResult


def with_top(step: StepResult, fetches: list | None = None) -> StepResult:
    """`step` with top candidates and chunk masses beside its rows; `fetches` records every
    fetch: ("rows", start, stop), ("top",), ("mass",), ("span", row, start, stop)."""
    fetches = [] if fetches is None else fetches

    def rows(start, stop):
        fetches.append(("rows", start, stop))
        return step.logits(start, stop)

    def top():
        fetches.append(("top",))
        return top_candidates(step.logits())

    def mass(inv_temperature):
        fetches.append(("mass",))
        # as the device computes them: float32 (the chunk sums' rounding is what the host sees)
        return tuple(a.astype(np.float32) for a in chunk_masses(step.logits(), inv_temperature))

    def span(row, start, stop):
        fetches.append(("span", row, start, stop))
        return step.logits(row, row + 1)[0, start:stop]
    return StepResult(step.argmax, step.prob, rows, top, mass, span)
