"""The CUDA top-candidates kernel (topk_cuda.py), its CUDA C++ run on the CPU
(cuda_emulator.h), against numpy: each row's 64 largest logits in falling order, ties by the
smaller id (across chunks too), rows shorter than 64 padded with id -1."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from trimode.compiler.kernels import topk_cuda
from trimode.model.reference import top_candidates

if shutil.which("g++") is None:
    pytest.skip("g++ is not installed", allow_module_level=True)

from cuda_emulator import EmulatedFunction  # noqa: E402

PARAMS = ["const float*", "float*", "int*"]
THREADS = 64  # 2 warps: the shuffle and the shared-memory pick both run; chunks of 2048
K = topk_cuda.K


def run(logits: np.ndarray, order=(False, False), launches=1):
    t, vocab = logits.shape
    values, ids = np.full((t, K), np.nan, np.float32), np.full((t, K), -7, np.int32)
    source = topk_cuda.source("topk", vocab, THREADS)
    EmulatedFunction(source, "topk", PARAMS)((t, topk_cuda.chunks(vocab, THREADS)), (THREADS,), logits,
                                             values, ids, reverse=order[0], greedy=order[1], launches=launches)
    return values, ids


@pytest.mark.parametrize("order", [(False, False), (True, True)], ids=["forward", "reverse-greedy"])
@pytest.mark.parametrize("vocab", [8192, 5000, 1003])  # 4 chunks; 3, the last short; one, scalar loads
def test_top_candidates_match_numpy(vocab, order):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((4, vocab)) * 4).astype(np.float32)
    logits[1, rng.choice(vocab, 100, replace=False)] = 9.0  # 100 ties at the top, in every chunk
    logits[2] = np.round(logits[2])                         # ties everywhere, the cut among them
    logits[3, :70] = 50.0 - np.arange(70)                   # the top all in the first chunk
    # two launches: the second finds the tickets the first one's last blocks reset
    values, ids = run(logits, order, launches=2)
    want_values, want_ids = top_candidates(logits)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)


def test_a_row_shorter_than_k_pads_with_id_minus_one():
    logits = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    values, ids = run(logits)
    want_values, want_ids = top_candidates(logits)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
    assert (ids[:, 40:] == -1).all()


def test_the_cuda_primfunc_covers_the_14b_vocabulary_in_16_chunks():
    pytest.importorskip("tvm")
    assert topk_cuda.chunks(131072) == 16
    func = topk_cuda.top_candidates_cuda(131072)
    assert func.attrs["tirx.is_scheduled"]
    assert "trimode_top_candidates_v131072" in func.script()
