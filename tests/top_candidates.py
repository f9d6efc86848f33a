"""Steps of the CPU forwards as a GPU build gives them: the rows, and each row's largest
logits beside them (reference.top_candidates, the entry's numpy twin)."""
from __future__ import annotations

from trimode.model.reference import top_candidates
from trimode.runtime.forward import StepResult


def with_top(step: StepResult, fetches: list | None = None) -> StepResult:
    """`step` with top candidates beside its rows; `fetches` records every fetch of either."""
    fetches = [] if fetches is None else fetches

    def rows(start, stop):
        fetches.append(("rows", start, stop))
        return step.logits(start, stop)

    def top():
        fetches.append(("top",))
        return top_candidates(step.logits())
    return StepResult(step.argmax, step.prob, rows, top)
