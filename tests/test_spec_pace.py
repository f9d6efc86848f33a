"""The pace of self-speculation (runtime/spec_pace.py) on scripted cycles: AR steps while the
drafts do not pay for their passes, a spec cycle every PROBE_EVERY of them, back to drafting
when the drafts pay again; one slow first cycle (a CUDA graph's capture) does not decide."""
from __future__ import annotations

from trimode.runtime.spec_pace import PROBE_EVERY, SpecPace

AR_SECONDS, SPEC_SECONDS = 1.0, 2.7  # a K = 3 cycle at 2.7 decode steps (the default model, CPU)


def drive(pace: SpecPace, cycles: int, accepted_of, spec_seconds=lambda i: SPEC_SECONDS) -> list[int]:
    """Runs `cycles` cycles as the pace says; accepted_of(i): drafts accepted at cycle i."""
    ks = []
    for i in range(cycles):
        k = pace.next_k()
        pace.record(k, accepted_of(i) if k else 0, spec_seconds(i) if k else AR_SECONDS)
        ks.append(k)
    return ks


def test_drafts_that_are_never_accepted_give_way_to_ar_steps_and_a_probe():
    ks = drive(SpecPace(3), 100, lambda i: 0)
    assert ks[:4] == [3, 3, 0, 0]  # each kind timed twice first
    # then PROBE_EVERY AR steps, a spec cycle to probe, and so on
    runs_of_ar = "".join(map(str, ks[4:])).split("3")
    assert runs_of_ar[0] == "0" * (PROBE_EVERY - 2) and set(runs_of_ar[1:-1]) == {"0" * PROBE_EVERY}


def test_drafts_that_pay_keep_the_draft_length():
    # 3 accepted: 4 tokens a cycle at 2.7 steps
    assert drive(SpecPace(3), 60, lambda i: 3)[4:] == [3] * 56
    # 1 accepted, then rejected: ~2 tokens a cycle, less than 2.7 steps buy
    assert drive(SpecPace(3), 60, lambda i: 1)[10:].count(3) < 10


def test_the_pace_drafts_again_when_the_text_gets_easier():
    ks = drive(SpecPace(3), 200, lambda i: 0 if i < 100 else 3)
    assert ks[60:100].count(0) > 30 and ks[170:] == [3] * 30


def test_a_slow_first_cycle_does_not_decide():
    """The first spec cycle 100x slower (a CUDA graph captured): drafts that pay still run."""
    ks = drive(SpecPace(3), 40, lambda i: 3, spec_seconds=lambda i: 270.0 if i == 0 else SPEC_SECONDS)
    assert ks[4:] == [3] * 36


def test_cycles_of_other_lengths_and_no_drafts():
    pace = SpecPace(3)
    pace.record(2, 2, 0.1)  # cut short by max_tokens: not learned from
    assert not any(pace.seconds.values())
    assert drive(SpecPace(0), 5, lambda i: 0) == [0] * 5
