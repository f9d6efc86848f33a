"""Per-step values on the device (issue 7): position and tokens live in tensors of the
sequence, rewritten before each call, so one compiled call -- on CUDA one captured graph --
serves every position and every T. On llvm the same entries run eagerly; these tests pin the
calling convention: reusing the step tensors across positions, block sizes and interleaved
sequences must give bit-identical logits to a fresh sequence doing the same work."""
from __future__ import annotations

import numpy as np
import pytest

from trimode.model.config import GEOMETRIES
from trimode.model.random_weights import random_weights
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.runtime.engine import MAX_BLOCK, Engine

CFG = GEOMETRIES["tiny"]
CTX = 128


@pytest.fixture(scope="module")
def engine():
    return Engine(CFG, random_weights(CFG, seed=5), "llvm")


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, CFG.vocab, n).tolist()


def test_stale_step_inputs_change_nothing(engine):
    # A 40-token verify leaves 40 ids in the token tensor; the decode, the 3-token verify and
    # the draft after it must read only their own first T.
    history, block = ids(12, 1), [CFG.mask_token_id] * 4 + [9]
    used = engine.new_sequence(CTX)
    used.causal(ids(40, 2))
    used.truncate(0)
    used.causal(history, last_only=True)
    fresh = engine.new_sequence(CTX)
    fresh.causal(history, last_only=True)
    for fwd_step in (lambda f: f.causal([5]), lambda f: f.causal([6, 7, 8]),
                     lambda f: f.bidirectional(block)):
        np.testing.assert_array_equal(fwd_step(used).logits(), fwd_step(fresh).logits())


def test_one_entry_serves_every_position(engine):
    # The same decode call at positions 0..n: each logits row equals the float64 reference's
    # at that position (the position comes from the device tensor, not the call).
    weights = random_weights(CFG, seed=5)
    ref = ReferenceForward(ReferenceModel(CFG, weights), CTX)
    fwd = engine.new_sequence(CTX)
    for tok in ids(70, 3):  # past tiny's 64-position YaRN original context
        got, want = fwd.causal([tok]), ref.causal([tok])
        assert np.abs(got.logits() - want.logits()).max() < 1e-3 * np.abs(want.logits()).max()
    assert fwd.length == 70


def test_interleaved_sequences_keep_their_own_state(engine):
    # Each sequence has its own VM and step tensors (CUDA graphs bake them in): interleaving
    # two sequences step by step gives what each gives alone.
    a_ids, b_ids = ids(30, 4), ids(30, 5)
    alone_a, alone_b = engine.new_sequence(CTX), engine.new_sequence(CTX)
    want_a = [alone_a.causal(a_ids[i:i + 10]).logits() for i in range(0, 30, 10)]
    want_b = [alone_b.causal(b_ids[i:i + 10]).logits() for i in range(0, 30, 10)]
    a, b = engine.new_sequence(CTX), engine.new_sequence(CTX)
    for i, start in enumerate(range(0, 30, 10)):
        np.testing.assert_array_equal(a.causal(a_ids[start:start + 10]).logits(), want_a[i])
        np.testing.assert_array_equal(b.causal(b_ids[start:start + 10]).logits(), want_b[i])


def test_block_limit_and_graph_report_on_llvm(engine):
    fwd = engine.new_sequence(CTX)
    with pytest.raises(ValueError, match=f"at most {MAX_BLOCK}"):
        fwd.bidirectional([1] * (MAX_BLOCK + 1))
    fwd.causal([1, 2, 3])
    report = engine.cuda_graph_report()
    assert report == {"entries": [], "passes": 0, "used": False}  # llvm runs eagerly


def test_row_ranges_of_the_logits_are_the_rows_of_the_whole(engine):
    # A sampler fetches only the rows it reads (a verify row of the 14B is 512 KB over PCIe):
    # every range, from any entry's output, is exactly those rows of the full fetch.
    fwd = engine.new_sequence(CTX)
    fwd.causal(ids(5, 6), last_only=True)
    for step in (fwd.bidirectional([CFG.mask_token_id] * 6 + [4]), fwd.causal(ids(9, 7)), fwd.causal([3])):
        whole, n = step.logits(), len(step.argmax)
        for start, stop in [(0, n), (n - 1, n), (0, 1), (1, max(2, n - 2))]:
            if stop <= n:
                np.testing.assert_array_equal(step.logits(start, stop), whole[start:stop])
        with pytest.raises(IndexError):
            step.logits(0, n + 1)
        # spans of a row (a chunk a draw lands in), the last cut at the row's end
        vocab = whole.shape[1]
        for row, start, stop in [(0, 0, 7), (n - 1, vocab - 5, vocab), (n - 1, vocab - 5, vocab + 1019)]:
            np.testing.assert_array_equal(step.span(row, start, stop), whole[row, start:stop])
        # a CPU build has no top candidates or chunk masses: its rows are host memory
        assert step.top() is None and step.masses(1.0) is None
    assert "top_candidates" not in engine.manifest["entries"]
    assert "chunk_mass" not in engine.manifest["entries"]


def test_a_steps_logits_outlive_later_passes(engine):
    # A chunked row reads its draft row's chunks lazily, after the verify pass (a rejected
    # draft's residual): a step's logits are its own tensor, not a buffer the next pass
    # rewrites (on CUDA the kernels writing the returned tensors run outside the graphs).
    fwd = engine.new_sequence(CTX)
    fwd.causal(ids(5, 6), last_only=True)
    draft = fwd.bidirectional([CFG.mask_token_id] * 5 + [4])
    before = draft.logits().copy()
    fwd.causal(ids(9, 5))
    fwd.bidirectional([CFG.mask_token_id] * 6)
    np.testing.assert_array_equal(draft.span(2, 3, 700), before[2, 3:700])
    np.testing.assert_array_equal(draft.logits(), before)
