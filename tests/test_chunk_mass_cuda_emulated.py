"""The CUDA chunk-mass kernel (chunk_mass_cuda.py), its CUDA C++ run on the CPU
(cuda_emulator.h), against numpy: per chunk of a row its largest logit and its sum of
exp((l - max) / temperature), the last chunk short."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from trimode.compiler.kernels import chunk_mass_cuda
from trimode.model.reference import chunk_masses

if shutil.which("g++") is None:
    pytest.skip("g++ is not installed", allow_module_level=True)

from cuda_emulator import EmulatedFunction  # noqa: E402

PARAMS = ["const float*", "const float*", "float*", "float*"]


def run(logits: np.ndarray, inv_temperature: float, order=(False, False)):
    t, vocab = logits.shape
    n = chunk_mass_cuda.chunks(vocab)
    top, total = np.full((t, n), np.nan, np.float32), np.full((t, n), np.nan, np.float32)
    source = chunk_mass_cuda.source("mass", vocab)
    EmulatedFunction(source, "mass", PARAMS)((t, n), (chunk_mass_cuda.THREADS,), logits,
                                             np.array([inv_temperature], np.float32), top, total,
                                             reverse=order[0], greedy=order[1])
    return top, total


@pytest.mark.parametrize("order", [(False, False), (True, True)], ids=["forward", "reverse-greedy"])
@pytest.mark.parametrize("vocab,inv_temperature", [(4096, 1.0), (3000, 1 / 0.7), (700, 4.0)])
def test_chunk_masses_match_numpy(vocab, inv_temperature, order):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((3, vocab)) * 3).astype(np.float32)
    logits[1, 5] = 40.0                                    # one chunk's mass is nearly the row's
    logits[2] = np.round(logits[2])                        # ties for the max
    top, total = run(logits, inv_temperature, order)
    want_top, want_total = chunk_masses(logits, inv_temperature)
    np.testing.assert_array_equal(top, want_top.astype(np.float32))
    np.testing.assert_allclose(total, want_total, rtol=2e-6)
    assert (total >= 1).all()  # the max's own term


def test_the_cuda_primfunc_covers_the_14b_vocabulary_in_128_chunks():
    pytest.importorskip("tvm")
    assert chunk_mass_cuda.chunks(131072) == 128
    func = chunk_mass_cuda.chunk_mass_cuda(131072)
    assert func.attrs["tirx.is_scheduled"]
    assert "trimode_chunk_mass_v131072" in func.script()
