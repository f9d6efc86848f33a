"""The CPU Q8_0 matmul kernels alone, built for llvm, against float64 numpy: the decode kernel
and the register-tiled multi-row kernels, over row counts around their tiles (every
remainder included), on weights packed 16 features to a vector whose feature count fills its
packs, leaves the last one partial, or has that one alone; their gated form (gate_up's
silu(gate) * up epilogue); and the packing itself."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from trimode.compiler.kernels import q8_matmul  # noqa: E402
from trimode.compiler.kernels.q8_matmul import ROW_TILE, packs_per_task, q8_matmul_cpu  # noqa: E402
from trimode.model.reference import swiglu_of_pairs  # noqa: E402
from trimode.model.weights import FEATURES_PER_PACK, Q8Matrix, pack_features, packed, packed_shape  # noqa: E402

ROW_COUNTS = sorted({1, 64} | {t + d for t in ROW_TILE.values() for d in range(-2, t + 1) if t + d > 0})


@pytest.fixture(scope="module")
def built():
    cache = {}

    def build(n, k, rows, gated=False):
        if (n, k, rows, gated) not in cache:
            # as on a one-core machine, whatever this one has: 96 features (6 packs) go 2 packs
            # to a task in blocks and prefills
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(q8_matmul.os, "cpu_count", lambda: 1)
                func = q8_matmul_cpu(n, k, rows, gated).with_attr("global_symbol", "mm")
                cache[n, k, rows, gated] = tvm.compile(func, target="llvm")
        return cache[n, k, rows, gated]

    return build


def run_kernel(built, rows, n, k, m, gated=False):
    """(the kernel's y, float64 x W^T) for random x [m, k] and a random Q8_0 W [n, k]."""
    rng = np.random.default_rng(n * 1000 + m)
    w = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((m, n // 2 if gated else n), np.nan, np.float32), dev)
    built(n, k, rows, gated)["mm"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(packed(w.q), dev),
                                   tvm.runtime.tensor(packed(w.scale), dev), out)
    return out.numpy(), x.astype(np.float64) @ w.dequantize(np.float64).T


@pytest.mark.parametrize("rows", ["one", "block", "many"])
@pytest.mark.parametrize("n,k", [(96, 64), (33, 96), (9, 32)])
@pytest.mark.parametrize("m", ROW_COUNTS)
def test_kernel_equals_float64(built, rows, n, k, m):
    y, want = run_kernel(built, rows, n, k, m)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("rows", ["one", "block", "many"])
@pytest.mark.parametrize("n", [96, 36, 10])  # full packs; a last pack of 2 pairs; one pack of 5
@pytest.mark.parametrize("m", [1, 3, 4, 7, 13])
def test_gated_kernel_writes_silu_gate_times_up(built, rows, n, m):
    y, want = run_kernel(built, rows, n, 64, m, gated=True)
    want = swiglu_of_pairs(want)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_packs_per_task_leaves_two_tasks_a_core(monkeypatch):
    monkeypatch.setattr(q8_matmul.os, "cpu_count", lambda: 2)
    assert [packs_per_task(p, "block") for p in (16, 32, 8, 6, 2, 0)] == [4, 4, 2, 1, 1, 1]
    assert packs_per_task(16, "many") == 4 and packs_per_task(16, "one") == 1


@pytest.mark.parametrize("n", [16, 40, 7])
def test_pack_features_by_parts_equals_the_layout(n):
    """out[p, c, f] = rows[16 p + f, c], zero past n, whichever packs a call writes (the
    engine packs by chunks on a thread pool)."""
    rows = np.arange(n * 3, dtype=np.int16).reshape(n, 3) + 1
    out = np.full(packed_shape(n, 3), -1, np.int16)
    for first in range(len(out)):
        pack_features(rows, out, slice(first, first + 1))
    for p, c, f in np.ndindex(out.shape):
        feature = p * FEATURES_PER_PACK + f
        assert out[p, c, f] == (rows[feature, c] if feature < n else 0)
    np.testing.assert_array_equal(packed(rows), out)
