"""The CPU attention kernel alone, built for llvm, against float64 numpy: causal and
bidirectional, cache fills that end inside and on key tiles, block lengths across query
tiles (the last one partial), grouped and ungrouped heads, a head size the vector lanes do
not divide, at AVX2's and AVX-512's register widths; the cache and the block's K/V (fp16, as
the engine keeps them) are only read."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from trimode.compiler.kernels.attention import KEY_TILE, QUERY_TILE, attention_cpu  # noqa: E402
from trimode.model.kv_cache import kv_round, q8_0_rows  # noqa: E402
from test_attention_cuda import attention_reference  # noqa: E402

LAYERS, LAYER, CTX = 2, 1, 160


@pytest.fixture(scope="module")
def built():
    cache = {}

    def build(n_heads, n_kv_heads, d, causal, lanes, cache_type="f16"):
        key = n_heads, n_kv_heads, d, causal, lanes, cache_type
        if key not in cache:
            func = attention_cpu(LAYERS, n_heads, n_kv_heads, d, causal, cache_type, lanes)
            func = func.with_attr("global_symbol", "attn")
            cache[key] = tvm.compile(func, target="llvm")["attn"]
        return cache[key]

    return build


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_heads, n_kv_heads, d", [(6, 2, 48), (4, 4, 16), (8, 1, 12), (2, 1, 40)])
@pytest.mark.parametrize("t, pos", [(1, 0), (1, 1), (1, KEY_TILE), (1, 77), (3, 5), (4, 64),
                                    (QUERY_TILE, 31), (QUERY_TILE + 1, 0), (2 * QUERY_TILE + 5, 40),
                                    (70, 0)])
def test_attention_equals_float64(built, lanes, causal, n_heads, n_kv_heads, d, t, pos):
    rng = np.random.default_rng(t * 1000 + pos)
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    kv = rng.standard_normal((LAYERS, 2, n_kv_heads, CTX, d)).astype(np.float16)
    k_new = rng.standard_normal((t, n_kv_heads, d)).astype(np.float16)
    v_new = rng.standard_normal((t, n_kv_heads, d)).astype(np.float16)
    args = [tvm.runtime.tensor(a) for a in (q, kv)]
    extra = [tvm.runtime.tensor(a) for a in (k_new, v_new)]
    out = tvm.runtime.tensor(np.full((t, n_heads, d), np.nan, np.float32))
    built(n_heads, n_kv_heads, d, causal, lanes)(*args, LAYER, tvm.runtime.tensor(np.array([pos], np.int32)),
                                          *extra, out)
    want = attention_reference(q.astype(np.float64), kv.astype(np.float64), LAYER, pos,
                               k_new.astype(np.float64), v_new.astype(np.float64), causal)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    for before, after in ((kv, args[1]), (k_new, extra[0]), (v_new, extra[1])):
        np.testing.assert_array_equal(after.numpy(), before)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_heads, n_kv_heads, d", [(8, 2, 128), (4, 1, 32), (2, 2, 64)])
@pytest.mark.parametrize("t, pos", [(1, 0), (1, 77), (4, 64), (QUERY_TILE + 1, 31), (40, 0)])
def test_attention_over_a_q8_0_cache(built, lanes, causal, n_heads, n_kv_heads, d, t, pos):
    """With a q8_0 cache (model/kv_cache.py) the kernel reads each row's int8 values times
    its blocks' fp16 scales: it equals float64 attention over the dequantized K/V, the cache's
    and the block's alike, and leaves both as they were."""
    rng = np.random.default_rng(t * 1000 + pos + d)
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    # blocks of different sizes, so each row's scales matter
    spread = np.repeat(rng.uniform(0.1, 8.0, d // 32), 32)
    kv_values = rng.standard_normal((LAYERS, 2, n_kv_heads, CTX, d)) * spread
    new = rng.standard_normal((2, t, n_kv_heads, d)) * spread
    kv, k_new, v_new = q8_0_rows(kv_values), q8_0_rows(new[0]), q8_0_rows(new[1])
    args = [tvm.runtime.tensor(a) for a in (q, kv)]
    extra = [tvm.runtime.tensor(a) for a in (k_new, v_new)]
    out = tvm.runtime.tensor(np.full((t, n_heads, d), np.nan, np.float32))
    built(n_heads, n_kv_heads, d, causal, lanes, "q8_0")(
        *args, LAYER, tvm.runtime.tensor(np.array([pos], np.int32)), *extra, out)
    want = attention_reference(q.astype(np.float64), kv_round("q8_0", kv_values), LAYER, pos,
                               kv_round("q8_0", new[0]), kv_round("q8_0", new[1]), causal)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5 * spread.max())
    # the quantization is coarser than the tolerance: the scales are read, not guessed
    unquantized = attention_reference(q.astype(np.float64), kv_values, LAYER, pos, new[0], new[1], causal)
    assert np.abs(unquantized - want).max() > 1e-4 * spread.max()
    for before, after in ((kv, args[1]), (k_new, extra[0]), (v_new, extra[1])):
        np.testing.assert_array_equal(after.numpy(), before)


def test_exp_approx_is_float32_exp():
    """The attention's vectorizable e^x: within 2e-7 relative of e^x over float32's range,
    the softmax's e^(very negative) a denormal-free ~0."""
    from tvm.script import tirx as T

    from trimode.compiler.kernels.cpu_math import exp_approx

    n = 1 << 16

    @T.prim_func
    def apply(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in range(n // 8):
            for j in T.vectorized(8):
                y[i * 8 + j] = exp_approx(x[i * 8 + j])

    f = tvm.compile(apply.with_attr("global_symbol", "apply"), target="llvm")["apply"]
    x = np.concatenate([np.linspace(-87.3, 88.3, n - 4), [-1e30, -np.inf, 0.0, -100.0]]).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    f(tvm.runtime.tensor(x), y)
    y = y.numpy()
    want = np.exp(x[:-4].astype(np.float64))
    assert np.max(np.abs(y[:-4] - want) / want) < 2e-7
    assert y[-2] == 1.0 and all(0 <= v <= 2.0 ** -126 for v in y[[-4, -3, -1]])


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_scores_far_apart(built, lanes, causal):
    """Scores hundreds apart, the keys growing with position so the running max jumps by more
    than the flush cutoff between tiles: the weights the kernel drops (under e^-69 of the max,
    so their products stay in fp32's normal range) change nothing the float64 softmax keeps."""
    n_heads, n_kv_heads, d, t, pos = 6, 2, 48, 5, 3 * KEY_TILE + 7
    rng = np.random.default_rng(7)
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    kv = rng.standard_normal((LAYERS, 2, n_kv_heads, CTX, d))
    kv[:, 0] *= (4.0 + np.arange(CTX) * 1.5)[None, None, :, None]  # scores' spread ~ 4 to 250
    kv = kv.astype(np.float16)
    k_new = (rng.standard_normal((t, n_kv_heads, d)) * 300).astype(np.float16)
    v_new = rng.standard_normal((t, n_kv_heads, d)).astype(np.float16)
    scores = np.einsum("hd,jd->hj", q[0, :2].astype(np.float64), kv[LAYER, 0, 0, :pos]) / np.sqrt(d)
    assert np.ptp(scores) > 300  # the case this test is for
    out = tvm.runtime.tensor(np.full((t, n_heads, d), np.nan, np.float32))
    built(n_heads, n_kv_heads, d, causal, lanes)(
        *(tvm.runtime.tensor(a) for a in (q, kv)), LAYER, tvm.runtime.tensor(np.array([pos], np.int32)),
        *(tvm.runtime.tensor(a) for a in (k_new, v_new)), out)
    want = attention_reference(q.astype(np.float64), kv.astype(np.float64), LAYER, pos,
                               k_new.astype(np.float64), v_new.astype(np.float64), causal)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target, lanes", [({"mcpu": "sapphirerapids"}, 16), ({"mcpu": "skylake-avx512"}, 16),
                                           ({"mcpu": "alderlake"}, 8), ({"mcpu": "haswell"}, 8),
                                           ({"mcpu": "neoverse-n1", "mtriple": "aarch64-linux-gnu"}, 8)])
def test_register_lanes_follow_the_target(target, lanes):
    """The CPU build's attention is written for the target's registers: 16 lanes where it
    has AVX-512 (the 16-key score groups need its 32 registers), 8 elsewhere."""
    from trimode.compiler.pipeline import register_lanes

    assert register_lanes(tvm.target.Target({"kind": "llvm", **target})) == lanes
