"""The CPU Q8_0 matmul kernels alone, built for llvm, against float64 numpy: the decode kernel
and the register-tiled multi-row kernel, over row counts around its tile (remainder rows
included) and feature counts a feature block does and does not divide."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from trimode.compiler.kernels import q8_matmul  # noqa: E402
from trimode.compiler.kernels.q8_matmul import ROW_TILE, feature_block, q8_matmul_cpu  # noqa: E402
from trimode.model.weights import Q8Matrix  # noqa: E402


@pytest.fixture(scope="module")
def built():
    cache = {}

    def build(n, k, rows):
        if (n, k, rows) not in cache:
            # as on a 2-core machine, whatever this one has: 96 features go 16 to a task
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(q8_matmul.os, "cpu_count", lambda: 2)
                assert feature_block(n, rows) == (1 if rows == "one" or n % 2 else 16)
                cache[n, k, rows] = tvm.compile(q8_matmul_cpu(n, k, rows).with_attr("global_symbol", "mm"),
                                                target="llvm")
        return cache[n, k, rows]

    return build


@pytest.mark.parametrize("rows", ["one", "block", "many"])
@pytest.mark.parametrize("n,k", [(96, 64), (33, 96)])
@pytest.mark.parametrize("m", [1, 2, ROW_TILE - 1, ROW_TILE, ROW_TILE + 1, ROW_TILE + 2, 2 * ROW_TILE + 3, 64])
def test_kernel_equals_float64(built, rows, n, k, m):
    rng = np.random.default_rng(n * 1000 + m)
    w = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.full((m, n), np.nan, np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(y, dev)
    built(n, k, rows)["mm"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w.q, dev),
                            tvm.runtime.tensor(w.scale, dev), out)
    want = x.astype(np.float64) @ w.dequantize(np.float64).T
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
