"""Whether a self-speculation cycle pays for itself: each cycle's draft length, K or 0.

A cycle of K drafts costs a draft pass and a verify pass of K + 1 rows and yields
(1 - a^(K+1)) / (1 - a) tokens at per-slot acceptance a; an AR step (K = 0) costs one decode
pass and yields 1. Where drafts are seldom accepted, self-speculation is slower than AR (the
small default model on a CPU: ~1.9 tokens a K = 3 cycle that costs ~2.7 decode steps). Either
way the output is the same (greedy: the verify pass is AR's) or from the same distribution
(sampled: rejection sampling), so the pace runs AR steps while a spec cycle's expected
tokens per second are under AR's, and a spec cycle every PROBE_EVERY steps to see whether the
text has become easier to draft. Costs are the fastest of each kind's last few cycles, as
timed by the caller, host work included (a cycle is only slower than that when interrupted,
and a first call may carry a one-off cost such as a CUDA graph's capture).
"""
from __future__ import annotations

from collections import deque

PROBE_EVERY = 8  # AR steps between spec cycles while AR is the faster
RECENT = 4  # cycles of each kind whose fastest is its cost
DECAY = 0.7  # weight the acceptance counts keep at each spec cycle (the text changes)


class SpecPace:
    def __init__(self, k: int):
        self.k = k
        self.accepted = 0.0  # decayed counts: drafts accepted, and cycles that rejected one
        self.rejected = 0.0
        self.seconds = {k: deque(maxlen=RECENT), 0: deque(maxlen=RECENT)}
        self.ar_steps = 0  # since the last spec cycle

    def acceptance(self) -> float:
        """Per-slot acceptance, from the recent cycles (a geometric run of accepted drafts
        ended by a rejection, or by the end of the block), with one of each as a prior."""
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def tokens_per_cycle(self) -> float:
        a = self.acceptance()
        return (1 - a ** (self.k + 1)) / (1 - a)

    def next_k(self) -> int:
        spec, ar = self.seconds[self.k], self.seconds[0]
        if self.k == 0 or len(spec) < 2:  # two: the first may carry a one-off cost
            return self.k
        if len(ar) < 2:
            return 0
        if min(spec) <= self.tokens_per_cycle() * min(ar) or self.ar_steps >= PROBE_EVERY:
            return self.k
        return 0

    def record(self, k: int, accepted: int, seconds: float) -> None:
        """A cycle run at draft length k (as next_k said, or 0); another k (a cycle cut short
        by max_tokens) is not this pace's to learn from."""
        if k not in self.seconds:
            return
        self.seconds[k].append(seconds)
        if k == 0:
            self.ar_steps += 1
            return
        self.ar_steps = 0
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < k)
