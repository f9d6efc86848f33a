"""The one primitive every decode loop is built on (MODEL.md section 4).

A Forward owns the shared KV cache of one sequence. `causal` appends its tokens' K/V
(prefill, AR decode, verify, commit); `bidirectional` sees the cache plus the whole block and
leaves the cache as it was (draft, denoise); `truncate(n)` drops everything after the
first n cached tokens. Implemented by the compiled runtime (runtime/engine.py) and, for
tests, by the float64 reference (model/reference.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from trimode.model.config import ModelConfig


# The most tokens one bidirectional pass (or one compiled causal all-rows pass) takes: the
# verify/draft entries are compiled for blocks of up to this many rows.
MAX_BLOCK = 64
# Each row's largest logits a GPU build hands the sampler (with their ids) in place of the
# row: top-k sampling below this k needs nothing else of it (the last may tie one left out).
TOP_CANDIDATES = 64
# A GPU build hands a sampler without top-k each row's softmax mass per chunk of this many
# logits (StepResult.masses), and the logits of the chunk a draw lands in.
MASS_CHUNK = 1024


def mass_chunks(vocab: int) -> int:
    """Chunks of MASS_CHUNK logits in a row of `vocab` (the last may be short)."""
    return -(-vocab // MASS_CHUNK)


# KV tokens a sequence gets when the user does not say (-c), or the model's context if shorter.
DEFAULT_CTX = 4096


class ContextFull(ValueError):
    """The sequence would not fit in the KV cache."""


@dataclass
class StepResult:
    """Per-row argmax and its softmax probability; logit rows fetched only on demand (from a
    GPU, a row of a 131072-token vocabulary is 512 KB over PCIe)."""
    argmax: np.ndarray  # int64 [T]
    prob: np.ndarray    # float32 [T]
    fetch_rows: Callable[[int, int], np.ndarray]  # (start, stop) -> float32 [stop - start, V]
    # () -> (values float32 [T, TOP_CANDIDATES], ids int32 [T, TOP_CANDIDATES]): each row's
    # largest logits, falling, ties by the smaller id (id -1 past a row shorter than that);
    # GPU builds only
    fetch_top: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    # inverse temperature -> (chunk max, chunk sum) float32 [T, chunks]: per MASS_CHUNK logits
    # of each row their largest m and sum of exp((l - m) * inverse temperature); GPU builds only
    fetch_mass: Callable[[float], tuple[np.ndarray, np.ndarray]] | None = None
    # (row, start, stop) -> float32 logits[row, start:stop] (stop clamped to the row's end);
    # by default cut from fetch_rows
    fetch_span: Callable[[int, int, int], np.ndarray] | None = None
    _top: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)
    _masses: dict = field(default_factory=dict, init=False, repr=False)

    def logits(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop-1 of the logits (all by default)."""
        stop = len(self.argmax) if stop is None else stop
        if not 0 <= start < stop <= len(self.argmax):
            raise IndexError(f"rows {start}..{stop - 1} of a {len(self.argmax)}-row step")
        return self.fetch_rows(start, stop)

    def top(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Each row's top candidates (fetched once), or None where the step has none."""
        if self._top is None and self.fetch_top is not None:
            self._top = self.fetch_top()
        return self._top

    def masses(self, inv_temperature: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Each row's chunk masses at this inverse temperature (fetched once), or None where
        the step has none."""
        if self.fetch_mass is None:
            return None
        if inv_temperature not in self._masses:
            self._masses[inv_temperature] = self.fetch_mass(inv_temperature)
        return self._masses[inv_temperature]

    def span(self, row: int, start: int, stop: int) -> np.ndarray:
        """Logits start..stop-1 of one row (fewer where the row ends first)."""
        if not 0 <= row < len(self.argmax) or not 0 <= start < stop:
            raise IndexError(f"logits {start}..{stop - 1} of row {row} of a {len(self.argmax)}-row step")
        if self.fetch_span is None:
            return self.logits(row, row + 1)[0, start:stop]
        return self.fetch_span(row, start, stop)

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> "StepResult":
        logits = np.asarray(logits)
        top = logits.argmax(axis=-1)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        prob = 1.0 / np.exp(shifted).sum(axis=-1)
        as_f32 = logits.astype(np.float32)
        return cls(argmax=top.astype(np.int64), prob=prob.astype(np.float32),
                   fetch_rows=lambda start, stop: as_f32[start:stop])


class Forward(Protocol):
    config: ModelConfig
    n_ctx: int

    @property
    def length(self) -> int: ...

    def causal(self, tokens: Sequence[int], last_only: bool = False) -> StepResult: ...

    def bidirectional(self, tokens: Sequence[int]) -> StepResult: ...

    def truncate(self, n: int) -> None: ...
