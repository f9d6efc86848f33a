"""The CUDA argmax/prob kernel (argmax_cuda.py), its CUDA C++ run on the CPU
(cuda_emulator.h), against numpy: the first index of each row's maximum (ties, a maximum in
the last or first slot) and 1 / sum exp(l - max), vectorised and scalar rows."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from trimode.compiler.kernels import argmax_cuda

if shutil.which("g++") is None:
    pytest.skip("g++ is not installed", allow_module_level=True)

from cuda_emulator import EmulatedFunction  # noqa: E402

PARAMS = ["const float*", "int*", "float*"]
THREADS = 64  # 2 warps: the shuffle and the shared-memory merge both run; chunks of 2048


def run(logits: np.ndarray, order=(False, False, False), launches=1):
    t, vocab = logits.shape
    argmax, prob = np.full(t, -1, np.int32), np.full(t, np.nan, np.float32)
    source = argmax_cuda.source("amax", vocab, THREADS)
    reverse, greedy, _ = order
    EmulatedFunction(source, "amax", PARAMS)((t, argmax_cuda.chunks(vocab, THREADS)), (THREADS,), logits,
                                             argmax, prob, reverse=reverse, greedy=greedy, launches=launches)
    return argmax, prob


@pytest.mark.parametrize("order", [(False, False, False), (True, True, False)], ids=["forward", "reverse-greedy"])
@pytest.mark.parametrize("vocab", [8192, 5000, 1003])  # 4 chunks; 3, the last short; one, scalar loads
def test_argmax_and_prob_match_numpy(vocab, order):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((5, vocab)) * 4).astype(np.float32)
    logits[1, [17, 900, vocab - 1]] = 50.0        # ties (in different chunks): the first index wins
    logits[2, vocab - 1] = 60.0                   # the maximum in the last slot
    logits[3, 0] = 60.0                           # and in the first
    logits[4] = -3.0                              # a flat row: argmax 0, prob 1 / vocab
    # two launches: the second finds the tickets the first one's last blocks reset
    argmax, prob = run(logits, order, launches=2)
    np.testing.assert_array_equal(argmax, logits.argmax(axis=1))
    ref = 1 / np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True)).sum(axis=1)
    np.testing.assert_allclose(prob, ref, rtol=1e-5)


def test_the_cuda_primfunc_covers_the_14b_vocabulary_in_16_chunks():
    pytest.importorskip("tvm")
    assert argmax_cuda.chunks(131072) == 16
    func = argmax_cuda.argmax_prob_cuda(131072)
    assert func.attrs["tirx.is_scheduled"]
    assert "trimode_argmax_prob_v131072" in func.script()
