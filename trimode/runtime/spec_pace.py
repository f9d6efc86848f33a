"""How many slots a self-speculation cycle drafts, chosen from what the cycles measured.

A cycle of K drafts costs a draft pass and a verify pass of K + 1 rows and yields
(1 - a^(K+1)) / (1 - a) tokens at per-slot acceptance a; an AR step (K = 0) costs one decode
pass and yields 1. Which K is fastest depends on the model's drafts and on how a pass's cost
grows with its rows: where drafts are seldom accepted (the small default model on a CPU:
~1.9 tokens a K = 3 cycle that costs ~2.7 decode steps) AR steps are; where most are
accepted, a longer draft than the default can be, if its passes stay cheap. Any K gives the
same output (greedy: the verify pass is AR's) or a sample of the same distribution (sampled:
rejection sampling), so the pace picks, each cycle, the draft length of LADDER with the most
expected tokens per second among those it has timed, and times a neighbour on the ladder
when the estimate says it may be worth it. While AR steps are the fastest, a spec cycle of
the default length every PROBE_EVERY steps keeps the acceptance estimate current. A cost is
the fastest of a length's last few cycles as the caller timed them, host work included (a
cycle is only slower than that when interrupted, and a first call may carry a one-off cost
such as a CUDA graph's capture).
"""
from __future__ import annotations

from collections import deque

LADDER = (0, 1, 3, 7, 15, 31)  # draft lengths the pace moves between; 0: an AR step
PROBE_EVERY = 8  # AR steps between spec cycles while AR steps are the faster
RECENT = 4  # cycles of each length whose fastest is its cost
TIMED = 2  # cycles a length runs before its cost counts (the first may carry a one-off cost)
DECAY = 0.9  # weight the acceptance counts keep at each cycle (the text changes)
WORTH_LONGER, WORTH_SHORTER = 1.25, 0.8  # token ratios that make a neighbour worth timing


class SpecPace:
    def __init__(self, k: int):
        """k: where to start, the target's default draft length."""
        self.ladder = sorted(set(LADDER) | {k})
        self.k = self.probe = k  # AR steps probe with the default: up to k acceptances to see
        self.accepted = 0.0  # decayed counts: drafts accepted, and cycles that rejected one
        self.rejected = 0.0
        self.seconds = {length: deque(maxlen=RECENT) for length in self.ladder}
        self.ar_steps = 0  # since the last spec cycle

    def acceptance(self) -> float:
        """Per-slot acceptance, from the recent cycles (a geometric run of accepted drafts
        ended by a rejection, or by the end of the block), with half of each as a prior."""
        return (self.accepted + 0.5) / (self.accepted + self.rejected + 1)

    def tokens(self, k: int) -> float:
        """Expected tokens of a cycle of k drafts."""
        a = self.acceptance()
        return (1 - a ** (k + 1)) / (1 - a)

    def timed(self, k: int) -> bool:
        return len(self.seconds[k]) >= TIMED

    def rate(self, k: int) -> float:
        return self.tokens(k) / min(self.seconds[k])

    def next_k(self) -> int:
        if not self.timed(self.k):
            return self.k
        if not self.timed(0):  # AR steps are always a candidate
            return 0
        neighbour = self.untimed_neighbour() if self.k else None
        if neighbour is not None:
            return neighbour
        self.k = max((k for k in self.ladder if self.timed(k)), key=self.rate)
        if self.k == 0 and self.ar_steps >= PROBE_EVERY:
            return self.probe
        return self.k

    def untimed_neighbour(self) -> int | None:
        """k's neighbour on the ladder, not yet timed, that may beat it: the longer when it
        would bring WORTH_LONGER x the tokens, the shorter when it keeps WORTH_SHORTER x."""
        i, here = self.ladder.index(self.k), self.tokens(self.k)
        if i + 1 < len(self.ladder):
            longer = self.ladder[i + 1]
            if not self.timed(longer) and self.tokens(longer) >= WORTH_LONGER * here:
                return longer
        shorter = self.ladder[i - 1]  # i > 0: k is not 0
        if not self.timed(shorter) and self.tokens(shorter) >= WORTH_SHORTER * here:
            return shorter
        return None

    def record(self, k: int, accepted: int, seconds: float) -> None:
        """A cycle run at draft length k (as next_k said, or 0); another k (a cycle cut short
        by max_tokens) is not this pace's to learn from."""
        if k not in self.seconds:
            return
        self.seconds[k].append(seconds)
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (0 < k and accepted < k)
        self.ar_steps = self.ar_steps + 1 if k == 0 else 0
