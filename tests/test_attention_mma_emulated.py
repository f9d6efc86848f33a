"""Tensor-core attention (attention_mma): its CUDA C++ run on the CPU (cuda_emulator.h) against
float64, through the same split scratch the model allocates; and its CUDA build here."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("g++") is None:
    pytest.skip("g++ is not installed", allow_module_level=True)

from cuda_emulator import EmulatedFunction  # noqa: E402
from test_attention_cuda import attention_reference  # noqa: E402

from trimode.compiler.kernels import attention_mma  # noqa: E402
from trimode.compiler.kernels.attention_cuda import (  # noqa: E402
    AttentionPlan, scratch_rows, scratch_rows_at, splits_for)
from trimode.model.config import ModelError  # noqa: E402

SPLIT_PARAMS = ["const half*", "const half*", "long long", "const int*", "const half*", "const half*",
                "float*", "float*", "int", "int"]
MERGE_PARAMS = ["const float*", "const float*", "half*", "int", "int"]
CTX, LAYERS, LAYER = 128, 2, 1
# Few CTAs wanted, so a hundred keys already take several splits; two warps of rows, so 16
# rows of 4 heads take two row tiles.
SMALL = AttentionPlan(rows_per_cta=32, keys_per_tile=32, threads=64, target_ctas=8,
                      max_splits=8, min_tiles_per_split=1, vector=8)


def _as_int(expr) -> int:
    return int(expr)  # a TIR expression of constants folds to an IntImm


def run_attention(n_heads, n_kv_heads, head_dim, causal, plan, n_t, pos, seed, order=(False, False, False)):
    rng = np.random.default_rng(seed)
    half = np.float16
    q = rng.standard_normal((n_t, n_heads, head_dim)).astype(half)
    kv = rng.standard_normal((LAYERS, 2, n_kv_heads, CTX, head_dim)).astype(half)
    k_new = rng.standard_normal((n_t, n_kv_heads, head_dim)).astype(half)
    v_new = rng.standard_normal((n_t, n_kv_heads, head_dim)).astype(half)
    group = n_heads // n_kv_heads
    splits = _as_int(splits_for(plan, group, n_kv_heads, tvm.tirx.IntImm("int64", CTX),
                                tvm.tirx.IntImm("int64", n_t)))
    rows = _as_int(scratch_rows_at(n_heads, n_kv_heads, plan, tvm.tirx.IntImm("int64", n_t)))
    assert rows <= scratch_rows(n_heads, n_kv_heads, plan, max(n_t, 1)) and rows >= splits * n_t
    # poisoned: splits past the keys at this pos (the grid follows the cache size) must still
    # write what the merge weighs as nothing, and every output must be written
    part_out = np.full((rows, n_heads, head_dim), np.nan, np.float32)
    part_lse = np.full((rows, n_heads), np.nan, np.float32)
    out = np.full((n_t, n_heads, head_dim), np.nan, half)
    name = "attn"
    split = EmulatedFunction(attention_mma.attention_source(name, n_heads, n_kv_heads, head_dim, causal, plan),
                             f"{name}_split", SPLIT_PARAMS)
    merge = EmulatedFunction(attention_mma.merge_source(name, n_heads, head_dim), f"{name}_merge", MERGE_PARAMS)
    kv_before = kv.copy()
    reverse, greedy, early = order
    row_tiles = -(-n_t * group // plan.rows_per_cta)
    split((row_tiles, n_kv_heads, splits), (plan.threads,), q, kv, LAYER, np.array([pos], np.int32), k_new,
          v_new, part_out, part_lse, n_t, CTX, reverse=reverse, greedy=greedy, early_copies=early)
    merge((n_t * n_heads,), (head_dim,), part_out, part_lse, out, n_t, splits)
    np.testing.assert_array_equal(kv, kv_before)  # the cache is only read
    want = attention_reference(q.astype(float), kv.astype(float), LAYER, pos, k_new.astype(float),
                               v_new.astype(float), causal)
    return out, want


def _check(out, want):
    assert np.isfinite(out.astype(np.float32)).all(), "outputs never written or NaN"
    err = np.linalg.norm(out.astype(np.float64) - want) / np.linalg.norm(want)
    assert err < 5e-3, err  # P and the output round to fp16


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n_t, pos", [(1, 0), (3, 5), (16, 70), (9, 100)])
def test_matches_float64_across_splits_row_tiles_and_masks(causal, n_t, pos):
    _check(*run_attention(4, 1, 32, causal, SMALL, n_t, pos, seed=n_t + pos))


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(8, 2, 48), (6, 2, 48), (4, 4, 16)])
def test_gqa_groups_and_head_dims(n_heads, n_kv_heads, head_dim):
    # G = 4 and G = 3 (the default model's 6 / 2), d = 48 (three k-steps), and no sharing
    _check(*run_attention(n_heads, n_kv_heads, head_dim, True, SMALL, 11, 40, seed=3))


@pytest.mark.parametrize("rows", ["block", "many"])
def test_shipped_plans_in_a_racing_thread_order(rows):
    # the default plans (64 rows per CTA), threads in reverse, the first warp running ahead,
    # copies landing as soon as they are issued
    plan = attention_mma.default_plan(4, 1, rows, 32)
    _check(*run_attention(4, 1, 32, True, plan, 33, 60, seed=5, order=(True, True, True)))
    _check(*run_attention(4, 1, 32, False, plan, 20, 90, seed=6, order=(False, False, False)))


def test_unsupported_geometries_are_model_errors():
    with pytest.raises(ModelError, match="multiple of 16"):
        attention_mma.attention_source("a", 4, 1, 40, True, SMALL)
    with pytest.raises(ModelError, match="evenly"):
        attention_mma.attention_source("a", 6, 4, 32, True, SMALL)
    with pytest.raises(ModelError, match="does not fit"):
        attention_mma.attention_source("a", 4, 1, 32, True, AttentionPlan(64, 16, 128, 8, 8, 1, 8))
    with pytest.raises(ModelError, match="48 KB"):
        attention_mma.attention_source("a", 4, 1, 256, True, SMALL)


def test_cuda_build_embeds_machine_code(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    from trimode.compiler.cuda_env import cuda_build_context, library_has_gpu_binary

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    funcs = {f"a{i}": attention_mma.attention_mma(32, 8, 128, causal, "float16", rows).with_attr(
        "global_symbol", f"a{i}") for i, (causal, rows) in enumerate([(True, "block"), (False, "block"),
                                                                      (True, "many")])}
    with cuda_build_context(target):
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
    path = tmp_path / "attention.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)
