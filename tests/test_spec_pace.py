"""The pace of self-speculation (runtime/spec_pace.py) on simulated cycles: drafts accepted
at a per-slot rate, cycles costing what a pass of their rows costs on a CPU or a GPU. It
settles on the draft length with the most tokens per second, AR steps included (with a probe
every PROBE_EVERY of them), follows the text when it changes, and one slow first cycle (a
CUDA graph's capture) does not decide."""
from __future__ import annotations

from collections import Counter

import numpy as np

from trimode.runtime.spec_pace import PROBE_EVERY, SpecPace


def cpu_cost(k: int) -> float:
    """Seconds of a cycle of k drafts in decode steps: two passes of k + 1 rows, each
    1 + 0.075 x rows steps (the 3B's int8 CPU build: 4 rows ~1.3 steps, 16 rows ~2.2)."""
    return 1.0 if k == 0 else 2 * (1 + 0.075 * (k + 1))


def gpu_cost(k: int) -> float:
    """A pass of up to 32 rows near a decode step's cost (issue 7's target)."""
    return 1.0 if k == 0 else 2 * (1 + 0.01 * (k + 1))


def drive(pace: SpecPace, cycles: int, acceptance, cost=cpu_cost, seed: int = 0) -> list[int]:
    """Runs `cycles` cycles as the pace says; acceptance(i): the per-slot rate at cycle i."""
    rng, ks = np.random.default_rng(seed), []
    for i in range(cycles):
        k = pace.next_k()
        accepted = 0
        while accepted < k and rng.random() < acceptance(i):
            accepted += 1
        pace.record(k, accepted, cost(k))
        ks.append(k)
    return ks


def settled(ks: list[int]) -> int:
    return Counter(ks).most_common(1)[0][0]


def best(a: float, cost) -> int:
    return max((0, 1, 3, 7, 15, 31), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / cost(k))


def test_drafts_that_are_never_accepted_give_way_to_ar_steps_and_a_probe():
    ks = drive(SpecPace(3), 120, lambda i: 0.0)
    assert ks[:4] == [3, 3, 0, 0]  # the start and AR steps are each timed twice first
    later = "".join("x" if k else "0" for k in ks[20:])
    assert set(later.strip("0").split("x")) <= {"", "0" * PROBE_EVERY}  # a probe per PROBE_EVERY steps
    assert later.count("x") >= 100 // (PROBE_EVERY + 1) - 1


def test_it_settles_on_the_fastest_draft_length():
    for a, cost, start in ((0.85, cpu_cost, 3), (0.85, gpu_cost, 15), (0.6, cpu_cost, 3),
                           (0.95, gpu_cost, 15), (0.3, gpu_cost, 15)):
        want = best(a, cost)
        ks = drive(SpecPace(start), 300, lambda i: a, cost)
        assert settled(ks[100:]) == want, (a, cost.__name__, want, Counter(ks[100:]))
    assert best(0.85, cpu_cost) == 7 and best(0.85, gpu_cost) == 15  # the cases differ


def test_the_pace_follows_the_text():
    ks = drive(SpecPace(3), 300, lambda i: 0.0 if i < 100 else 0.85)
    assert settled(ks[50:100]) == 0 and settled(ks[200:]) == 7


def test_a_slow_first_cycle_does_not_decide():
    """The first cycle of each length 100x slower (a CUDA graph captured)."""
    seen = set()

    def cost(k):
        first = k not in seen
        seen.add(k)
        return cpu_cost(k) * (100 if first else 1)
    ks = drive(SpecPace(3), 200, lambda i: 0.85, cost)
    assert settled(ks[100:]) == 7


def test_cycles_of_other_lengths_are_not_learned_from():
    pace = SpecPace(3)
    pace.record(2, 2, 0.1)  # cut short by max_tokens
    assert not any(pace.seconds.values()) and pace.accepted == 0
