"""The CUDA attention kernel: its algorithm on llvm against float64 numpy, its CUDA build here.

Numerics cannot run without a GPU, so the kernel's TIR without thread bindings (same blocks,
same tiling, same split and merge arithmetic) runs on llvm; the scheduled CUDA variants are
built for sm_90a, which checks that the thread-bound TIR is valid and lowers to machine code.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from trimode.compiler.kernels.attention_cuda import (  # noqa: E402
    AttentionPlan, attention_cuda, attention_cuda_unscheduled, default_plan, scratch_rows, scratch_rows_at)
from trimode.model.config import ModelError  # noqa: E402

HQ, HKV, D = 4, 1, 32  # the tiny test models' heads
CTX, LAYERS, LAYER = 256, 2, 1
# Small tiles, so a few hundred keys already take several splits of several tiles each, and
# 16 rows of 4 query heads fill several row tiles, the last one partly.
SMALL = AttentionPlan(rows_per_cta=8, keys_per_tile=16, threads=128, target_ctas=64,
                      max_splits=8, min_tiles_per_split=2, vector=8)


def attention_reference(q, kv, layer, pos, k_new, v_new, causal):
    """float64: row t sees cache[0:pos] and block keys 0..t (causal) or all of them."""
    n_t, n_heads, d = q.shape
    group = n_heads // k_new.shape[1]
    out = np.zeros(q.shape)
    for t in range(n_t):
        seen = t + 1 if causal else n_t
        for h in range(n_heads):
            g = h // group
            keys = np.concatenate([kv[layer, 0, g, :pos], k_new[:seen, g]])
            values = np.concatenate([kv[layer, 1, g, :pos], v_new[:seen, g]])
            scores = keys @ q[t, h] / np.sqrt(d)
            weights = np.exp(scores - scores.max())
            out[t, h] = weights @ values / weights.sum()
    return out


def _build_llvm(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       target="llvm")


def _check(lib, rng, n_t, pos, causal, plan, n_kv_heads=HKV):
    q = rng.standard_normal((n_t, HQ, D)).astype("float32")
    kv = rng.standard_normal((LAYERS, 2, n_kv_heads, CTX, D)).astype("float32")
    k_new = rng.standard_normal((n_t, n_kv_heads, D)).astype("float32")
    v_new = rng.standard_normal((n_t, n_kv_heads, D)).astype("float32")
    out = tvm.runtime.tensor(np.full((n_t, HQ, D), np.nan, "float32"))  # poisoned
    # The split scratch as the model sizes it, poisoned too: splits past the keys at this pos
    # (the grid is sized by the cache, not pos) must write what the merge weighs as nothing.
    rows = int(scratch_rows_at(HQ, n_kv_heads, plan, n_t))  # the tight bound, at this T
    assert rows <= scratch_rows(HQ, n_kv_heads, plan, n_t)  # what a block entry allocates
    part_out = tvm.runtime.tensor(np.full((rows, HQ, D), np.nan, "float32"))
    part_lse = tvm.runtime.tensor(np.full((rows, HQ), np.nan, "float32"))
    kv_dev = tvm.runtime.tensor(kv)
    lib["main"](tvm.runtime.tensor(q), kv_dev, LAYER, tvm.runtime.tensor(np.array([pos], "int32")),
                tvm.runtime.tensor(k_new), tvm.runtime.tensor(v_new), out, part_out, part_lse)
    got = out.numpy()
    want = attention_reference(q.astype(float), kv.astype(float), LAYER, pos,
                               k_new.astype(float), v_new.astype(float), causal)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_array_equal(kv_dev.numpy(), kv)  # the cache is only read


@pytest.mark.parametrize("causal", [True, False])
def test_split_kv_algorithm_matches_float64(causal):
    lib = _build_llvm(attention_cuda_unscheduled(HQ, HKV, D, causal, "float32", "dynamic",
                                                 plan=SMALL))
    rng = np.random.default_rng(7 if causal else 8)
    for n_t in (1, 3, 16):
        for pos in (0, 5, 200):
            _check(lib, rng, n_t, pos, causal, SMALL)


def test_decode_plan_and_gqa_head_mapping():
    # The decode tiling as shipped (static T = 1), with two kv heads: q heads 0-1 read kv head
    # 0 and q heads 2-3 kv head 1.
    lib = _build_llvm(attention_cuda_unscheduled(HQ, 2, D, True, "float32", 1))
    rng = np.random.default_rng(9)
    for pos in (0, 5, 200):
        _check(lib, rng, 1, pos, True, default_plan(HQ, 2, "one", D), n_kv_heads=2)


def test_block_plan_bidirectional():
    lib = _build_llvm(attention_cuda_unscheduled(HQ, HKV, D, False, "float32", "dynamic",
                                                 plan=default_plan(HQ, HKV, "block", D)))
    rng = np.random.default_rng(10)
    for n_t, pos in ((3, 5), (16, 200)):
        _check(lib, rng, n_t, pos, False, default_plan(HQ, HKV, "block", D))


def test_bad_geometry_is_a_model_error():
    with pytest.raises(ModelError, match="share"):
        attention_cuda(6, 4, 32, True, "float16", 1)
    with pytest.raises(ModelError, match="row class"):
        default_plan(32, 8, "huge", 128)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
H100 = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})


@needs_nvcc
@pytest.mark.parametrize("t,causal,rows", [(1, True, "one"), ("dynamic", False, "block"),
                                           ("dynamic", True, "many")])
def test_cuda_variant_builds_to_gpu_code(tmp_path, t, causal, rows):
    from trimode.compiler.cuda_env import cuda_build_context, library_has_gpu_binary

    func = attention_cuda(HQ, HKV, D, causal, "float16", t, plan=default_plan(HQ, HKV, rows, D))
    with cuda_build_context(H100):
        lib = tvm.compile(tvm.IRModule({"attention": func.with_attr("global_symbol", "attention")}),
                          target=H100)
    path = tmp_path / "attention.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)


def test_the_tuning_measurement_checks_attention_against_float64():
    # measure_attention (run on the GPU box by `trimode tune`) on the llvm twin of the kernel:
    # the inputs it builds, its float64 reference and its error figure
    from types import SimpleNamespace

    from trimode.schedules.measure_attention import measure_attention

    class CpuRuntime:
        cuda = SimpleNamespace(synchronize=lambda: None)

        def upload(self, array):
            return tvm.runtime.tensor(array)

        def download(self, tensor, shape, dtype):
            return tensor.numpy().astype(dtype).reshape(shape)

    func = _build_llvm(attention_cuda_unscheduled(HQ, HKV, D, True, "float16", "dynamic", plan=SMALL))["main"]
    entry = {"heads": [HQ, HKV, D], "rows": [5], "fill": 40, "schedule": {"max_splits": SMALL.max_splits}}
    calls = []
    result = measure_attention(CpuRuntime(), func, entry, np.random.default_rng(0),
                               lambda call: (call(0), call(1), calls.append(2), 4.0)[-1])
    assert result["ok"] and result["rel_err"] < 1e-2 and result["time_us"] == 4.0
    broken = measure_attention(CpuRuntime(), lambda *args: None, entry, np.random.default_rng(0), lambda call: 1.0)
    assert not broken["ok"]  # an output never written stays NaN
