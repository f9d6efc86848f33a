"""The CUDA Q8_0 matmul kernels, their own CUDA C++ source run on the CPU (cuda_emulator.h),
against float64: every kernel kind, odd shapes, row counts around the tiles, splits that do
not divide K, several thread orders, two launches in a row (the split-K tickets reset)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from trimode.compiler.kernels import q8_matmul_cuda as q8
from trimode.model.reference import swiglu_of_pairs

if shutil.which("g++") is None:
    pytest.skip("g++ is not installed", allow_module_level=True)

from cuda_emulator import EmulatedFunction, EmulationError  # noqa: E402

GEMV_PARAMS = ["const half*", "const signed char*", "const half*", "half*"]
ROWS_PARAMS = GEMV_PARAMS + ["int"]
# thread orders: (reverse, greedy, early_copies); see EmulatedFunction.__call__
ORDERS = [(False, False, False), (True, True, True)]
# x and y: what the previous kernel in the stream writes or reads. Every kernel here issues
# its own griddepcontrol.wait (the decode and block ones after asking for weights); until then
# the emulator poisons these (a read sees NaN, a write is lost).
X_AND_Y = (0, 3)


def _problem(rng, n, k, m):
    x = rng.standard_normal((m, k)).astype(np.float16)
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16)
    w = q.astype(np.float64) * np.repeat(scale.astype(np.float64), 32, axis=1)
    return x, q, scale, x.astype(np.float64) @ w.T


def _check(y, ref):
    assert not np.isnan(y).any(), f"{np.isnan(y).sum()} outputs never written"
    err = np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert err < 2e-3, err  # fp16 output rounding is ~3e-4


def _run_rows_kernel(name, source, grid, threads, n, k, m, order=ORDERS[0], launches=1, seed=0,
                     gated=False):
    x, q, scale, ref = _problem(np.random.default_rng(seed), n, k, m)
    ref = swiglu_of_pairs(ref) if gated else ref
    y = np.full(ref.shape, np.nan, np.float16)
    reverse, greedy, early = order
    EmulatedFunction(source, name, ROWS_PARAMS)(grid, (threads,), x, q, scale, y, m, reverse=reverse,
                                                greedy=greedy, early_copies=early, launches=launches,
                                                written_before=X_AND_Y)
    return y, ref


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "wait-first"])
@pytest.mark.parametrize("n, k, m, rows_per_warp, k_warps", [
    (100, 160, 1, 2, 4), (100, 160, 3, 4, 2), (96, 96, 1, 1, 8), (64, 1024, 4, 2, 2), (257, 512, 1, 4, 4),
])
def test_gemv_matches_float64(n, k, m, rows_per_warp, k_warps, prefetch):
    name = "gemv"
    source = q8._gemv_source(name, n, k, m, rows_per_warp, k_warps, prefetch=prefetch)
    x, q, scale, ref = _problem(np.random.default_rng(1), n, k, m)
    y = np.full((m, n), np.nan, np.float16)
    EmulatedFunction(source, name, GEMV_PARAMS)((-(-n // rows_per_warp),), (32 * k_warps,), x, q, scale, y,
                                                written_before=X_AND_Y)
    _check(y, ref)


@pytest.mark.parametrize("n, k, m, rows_per_warp, k_warps", [(100, 160, 1, 2, 4), (64, 1024, 3, 4, 2)])
def test_gated_gemv_writes_silu_gate_times_up(n, k, m, rows_per_warp, k_warps):
    name = "gemv"
    source = q8._gemv_source(name, n, k, m, rows_per_warp, k_warps, gated=True)
    x, q, scale, ref = _problem(np.random.default_rng(1), n, k, m)
    y = np.full((m, n // 2), np.nan, np.float16)
    EmulatedFunction(source, name, GEMV_PARAMS)((-(-n // rows_per_warp),), (32 * k_warps,), x, q, scale, y,
                                                written_before=X_AND_Y)
    _check(y, swiglu_of_pairs(ref))


def test_a_gated_gemv_needs_row_pairs():
    with pytest.raises(q8.ModelError, match="even"):
        q8._gemv_source("gemv", 100, 160, 1, 1, 4, gated=True)
    assert q8.gated_schedule({"kind": "gemv", "rows_per_warp": 1, "k_warps": 4})["rows_per_warp"] == 2
    with pytest.raises(q8.ModelError, match="even"):
        q8.q8_matmul(99, 160, 1, gated=True)


@pytest.mark.parametrize("n, k, m, n_tiles, k_warps", [
    (100, 160, 5, 2, 4), (64, 512, 33, 4, 2), (96, 96, 64, 1, 8), (40, 256, 100, 2, 2), (72, 320, 17, 8, 2),
])
def test_slab_mma_matches_float64(n, k, m, n_tiles, k_warps):
    # prefill's kernel: rows in 64-row slabs, the last slab partly empty
    name = "mma"
    source = q8._mma_source(name, n, k, q8._m_tiles("dynamic"), n_tiles, k_warps)
    grid = (-(-n // (8 * n_tiles)), -(-m // 64))
    y, ref = _run_rows_kernel(name, source, grid, 32 * k_warps, n, k, m)
    _check(y, ref)


def test_gated_slab_mma_writes_silu_gate_times_up():
    name = "mma"
    n, k, m, n_tiles, k_warps = 72, 320, 17, 2, 2
    source = q8._mma_source(name, n, k, q8._m_tiles("dynamic"), n_tiles, k_warps, gated=True)
    grid = (-(-n // (8 * n_tiles)), -(-m // 64))
    _check(*_run_rows_kernel(name, source, grid, 32 * k_warps, n, k, m, gated=True))


GEMM_PLANS = [q8.GemmPlan(128, 2), q8.GemmPlan(128, 4), q8.GemmPlan(64, 3), q8.GemmPlan(128, 3, 64),
              q8.GemmPlan(64, 2, 64),
              # Hopper's wgmma: two stages (the shallowest ring), both tile widths, both stage depths
              q8.GemmPlan(128, 2, 32, True), q8.GemmPlan(128, 3, 64, True), q8.GemmPlan(128, 4, 32, True, 256)]


def _plan_id(plan: q8.GemmPlan) -> str:
    return f"t{plan.tile_m}_s{plan.stages}_k{plan.k_stage}" + (f"_wg{plan.tile_n}" if plan.wgmma else "")


GEMM_CASES = [(200, 256, 130, False), (128, 96, 257, False), (75, 64, 65, False), (100, 160, 128, False),
              (200, 96, 130, True), (200, 192, 130, True)]


@pytest.mark.parametrize("order", ORDERS, ids=["forward", "reverse-greedy-early"])
@pytest.mark.parametrize("n, k, m, gated, plan", [
    case + (plan,) for case in GEMM_CASES for plan in GEMM_PLANS if case[1] % plan.k_stage == 0],
    ids=lambda v: _plan_id(v) if isinstance(v, q8.GemmPlan) else None)
def test_prefill_gemm_matches_float64(n, k, m, gated, plan, order):
    # row and column tiles, the last ones partly empty; odd N (a pair's second half past the
    # edge, unaligned pairs stored one by one); K of 1 to 8 stages, fewer than a deep
    # pipeline's prologue in some (its empty commits)
    _check(*_run_gemm(n, k, m, gated, plan, order))


def _run_gemm(n, k, m, gated, plan, order=ORDERS[0], edit=None):
    name = "gemm"
    x, q, scale, ref = _problem(np.random.default_rng(0), n, k, m)
    ref = swiglu_of_pairs(ref) if gated else ref
    y = np.full(ref.shape, np.nan, np.float16)
    smem = np.zeros(plan.shared_bytes(), np.uint8)  # the emulator's guard bytes catch an overrun
    reverse, greedy, early = order
    source = (q8._wgmma_gemm_source if plan.wgmma else q8._gemm_source)(name, n, k, plan, gated)
    if edit:
        old, new = edit
        assert old in source
        source = source.replace(old, new)
    EmulatedFunction(source, name, ROWS_PARAMS + ["unsigned char*"])(
        (-(-m // plan.tile_m), -(-n // plan.tile_n)), (plan.threads(),), x, q, scale, y, m, smem,
        reverse=reverse, greedy=greedy, early_copies=early, written_before=X_AND_Y)
    return y, ref


def test_gemm_plans_fit_the_shared_memory_a_block_may_take():
    plans = [q8.GemmPlan.of(c) for c in q8.schedule_candidates(5120, 16384, "dynamic") if c["kind"] == "gemm"]
    assert {(p.tile_m, p.stages, p.k_stage) for p in plans} == {
        (t, s, kk) for t in (64, 128) for s in (2, 3, 4) for kk in (32, 64)}
    # a K that is not a multiple of 64 is offered one-block stages only
    assert {q8.GemmPlan.of(c).k_stage for c in q8.schedule_candidates(100, 96, "dynamic")} == {32}
    with pytest.raises(q8.ModelError, match="not a multiple of its k_stage"):
        q8.q8_matmul(100, 96, "dynamic", schedule={"kind": "gemm", "tile_m": 128, "stages": 2, "k_stage": 64})
    assert all(p.shared_bytes() <= q8.GEMM_MAX_SHARED for p in plans)
    assert q8.GemmPlan(128, 2).shared_bytes() == 2 * (128 * 40 * 2 + 128 * 32) + 128 * 40 * 2
    assert q8.GemmPlan(128, 3, 64).shared_bytes() == 3 * (128 * 72 * 2 + 128 * 64) + 128 * 72 * 2
    with pytest.raises(q8.ModelError, match="stages 2 to 4"):
        q8.GemmPlan.of({"kind": "gemm", "tile_m": 128, "stages": 5})
    with pytest.raises(q8.ModelError, match="tile_m is 64 or 128"):
        q8.q8_matmul(256, 512, "dynamic", schedule={"kind": "gemm", "tile_m": 96, "stages": 2})


def _run_splitk(n, k, m, schedule, order=ORDERS[0], launches=1, edit=None, gated=False):
    """The split-K kernel of `schedule` (its splits reduced to those holding work), its
    source passed through `edit` first (the tests that break it on purpose)."""
    plan = q8.SplitKPlan.of(n, k, schedule)
    name = "splitk"
    source = (q8._splitk_wgmma_source if plan.wgmma else q8._splitk_source)(name, n, k, plan, gated)
    if edit is not None:
        edited = edit(source)
        assert edited != source
        source = edited
    return _run_rows_kernel(name, source, (plan.column_tiles(n), plan.splits), 32 * plan.warps, n, k, m,
                            order=order, launches=launches, gated=gated)


SPLITK_CASES = [
    # n, k, m, n_tiles, warps, k_group, splits
    (100, 160, 5, 2, 8, 2, 1),     # one split: fp16 written directly; K not a multiple of 64
    (100, 160, 17, 1, 4, 1, 3),    # K = 160 in 64-k groups over 3 splits; odd N
    (200, 1024, 33, 4, 4, 2, 3),   # 1024 / 3 rounds up to 384 per split, the last one short
    (256, 1024, 64, 2, 8, 2, 4),   # every m-tile full
    (136, 2048, 16, 1, 8, 1, 16),  # many splits, the default block T (draft length 15 + 1)
    (96, 96, 1, 2, 8, 2, 2),       # a one-row block; two splits asked, one holds work
]


@pytest.mark.parametrize("order", ORDERS, ids=["forward", "reverse-greedy-early"])
@pytest.mark.parametrize("n, k, m, n_tiles, warps, k_group, splits", SPLITK_CASES)
def test_splitk_matches_float64_in_every_order_and_launch(n, k, m, n_tiles, warps, k_group, splits, order):
    # the second launch proves the last block reset the tickets the first one used
    schedule = {"n_tiles": n_tiles, "warps": warps, "k_group": k_group, "splits": splits}
    _check(*_run_splitk(n, k, m, schedule, order=order, launches=2))


@pytest.mark.parametrize("prefetch_groups", [2, 4])
@pytest.mark.parametrize("n, k, m, n_tiles, warps, k_group, splits", [SPLITK_CASES[i] for i in (1, 2, 4)])
def test_splitk_prefetching_weights_into_l2_matches_float64(n, k, m, n_tiles, warps, k_group, splits,
                                                            prefetch_groups):
    # prefetches past a split's last group or past K would name memory outside the weights
    # (the emulator refuses those); the results are those of the plain kernel
    schedule = {"n_tiles": n_tiles, "warps": warps, "k_group": k_group, "splits": splits,
                "prefetch_groups": prefetch_groups}
    _check(*_run_splitk(n, k, m, schedule, order=ORDERS[1], launches=2))


WGMMA_SPLITK_CASES = [
    # n, k, m, warps, k_group, splits, prefetch_groups: each of m's three MMA widths (16, 32,
    # 64), one split (direct stores) and several (partials), K not a multiple of the group, odd N
    (100, 160, 5, 4, 1, 1, 0),
    (100, 160, 17, 8, 2, 3, 2),
    (200, 1024, 33, 4, 2, 3, 0),
    (256, 1024, 64, 8, 1, 4, 4),
    (136, 2048, 16, 8, 1, 16, 0),
    (96, 96, 1, 4, 2, 2, 0),
]


@pytest.mark.parametrize("order", ORDERS, ids=["forward", "reverse-greedy-early"])
@pytest.mark.parametrize("n, k, m, warps, k_group, splits, prefetch_groups", WGMMA_SPLITK_CASES)
def test_wgmma_splitk_matches_float64(n, k, m, warps, k_group, splits, prefetch_groups, order):
    schedule = {"n_tiles": 2, "warps": warps, "k_group": k_group, "splits": splits,
                "prefetch_groups": prefetch_groups, "mma": "wgmma"}
    _check(*_run_splitk(n, k, m, schedule, order=order, launches=2))


@pytest.mark.parametrize("splits", [1, 3])
def test_gated_wgmma_splitk_writes_silu_gate_times_up(splits):
    schedule = {"n_tiles": 2, "warps": 8, "k_group": 2, "splits": splits, "mma": "wgmma"}
    _check(*_run_splitk(200, 1024, 33, schedule, order=ORDERS[1], gated=True))


def test_the_emulator_holds_register_wgmma_to_its_asynchrony():
    schedule = {"n_tiles": 2, "warps": 4, "k_group": 1, "splits": 3, "mma": "wgmma"}

    def edited(old, new):
        return lambda s: s.replace(old, new)
    # a fragment register touched while the tensor cores may still read it
    with pytest.raises(EmulationError, match="A registers of a wgmma changed"):
        _run_splitk(200, 1024, 33, schedule, edit=edited(
            "    splitk_wgmma_commit();\n", "    splitk_wgmma_commit();\n    a[0][0][0] ^= 1u;\n"))
    # the next group's x stored before the products reading the other buffer are waited for
    with pytest.raises(EmulationError, match="changed between its issue and its wait_group"):
        _run_splitk(200, 1024, 33, schedule, edit=edited(
            "    splitk_wgmma_commit();\n    splitk_wgmma_wait<0>();",
            "    splitk_wgmma_commit();\n    if (group + 1 < groups) store_x(buffer);\n    splitk_wgmma_wait<0>();"))
    # no barrier between the group's x stores and the next wgmma: one warpgroup is no barrier
    with pytest.raises(EmulationError, match="changed between its issue and its wait_group"):
        _run_splitk(200, 1024, 33, schedule, edit=edited("    __syncthreads();  // this group's x is read by all", "    //"))


def test_the_emulator_refuses_a_prefetch_outside_the_weights():
    schedule = {"n_tiles": 2, "warps": 4, "k_group": 1, "splits": 3, "prefetch_groups": 2}
    unguarded = lambda s: s.replace("if (group < groups && kk < k_end) splitk_prefetch_l2", "splitk_prefetch_l2")  # noqa: E731
    with pytest.raises(EmulationError, match="outside every argument buffer"):
        _run_splitk(200, 1024, 33, schedule, edit=unguarded)


@pytest.mark.parametrize("order", ORDERS, ids=["forward", "reverse-greedy-early"])
@pytest.mark.parametrize("splits", [1, 3])
def test_gated_splitk_writes_silu_gate_times_up(splits, order):
    # one split: the fragments' epilogue; three: the last block's reduction of the partials
    schedule = {"n_tiles": 2, "warps": 4, "k_group": 1, "splits": splits}
    _check(*_run_splitk(200, 1024, 33, schedule, order=order, launches=2, gated=True))


def test_the_default_block_tilings_of_the_14b_are_right_at_small_k():
    # the tilings (n-tiles per warp, warps, groups) the 14B's shapes get, at a K the emulator
    # runs quickly
    from trimode.model.config import GEOMETRIES

    tilings = {tuple(q8.default_schedule(n, k, "block")[key] for key in ("n_tiles", "warps", "k_group"))
               for n, k in GEOMETRIES["14b"].matmul_shapes().values()}
    for n_tiles, warps, k_group in sorted(tilings):
        schedule = {"n_tiles": n_tiles, "warps": warps, "k_group": k_group, "splits": 2}
        _check(*_run_splitk(264, 512, 16, schedule))


def test_the_emulator_catches_a_missing_barrier():
    # without the barrier that ends a group, a warp running ahead overwrites x in shared
    # memory before the other warps have read it: the greedy, early-copy order shows it
    schedule = {"n_tiles": 4, "warps": 4, "k_group": 2, "splits": 3}
    no_barrier = lambda s: s.replace("    __syncthreads();  // nobody reads this buffer any more", "    //")  # noqa: E731
    _check(*_run_splitk(200, 1024, 33, schedule, order=ORDERS[0], edit=no_barrier))  # lockstep hides it
    with pytest.raises(AssertionError):
        _check(*_run_splitk(200, 1024, 33, schedule, order=ORDERS[1], edit=no_barrier))


def test_the_emulator_catches_a_read_before_the_copy_wait_and_a_deadlock():
    schedule = {"n_tiles": 2, "warps": 8, "k_group": 2, "splits": 1}
    with pytest.raises(EmulationError, match="never waited"):
        _run_splitk(100, 160, 5, schedule, edit=lambda s: s.replace("    splitk_copy_wait_pending<1>();\n", "\n"))
    with pytest.raises(EmulationError, match="deadlock"):
        _run_splitk(100, 160, 5, schedule, edit=lambda s: s.replace(
            "  if (m > 16 * MT) __trap();", "  if (threadIdx.x == 0) __syncthreads();"))


def test_the_emulator_catches_x_read_before_the_previous_kernel_is_done():
    # the block kernel's x copy moved above its griddepcontrol.wait: the copy reads poison
    schedule = {"n_tiles": 2, "warps": 4, "k_group": 1, "splits": 3}
    early_x = lambda s: s.replace(  # noqa: E731
        "  splitk_wait_previous_kernels();\n  copy_x(0, 0);\n", "  copy_x(0, 0);\n  splitk_wait_previous_kernels();\n")
    _check(*_run_splitk(200, 1024, 33, schedule))
    with pytest.raises(AssertionError, match="never written|nan"):
        _check(*_run_splitk(200, 1024, 33, schedule, order=ORDERS[1], edit=early_x))
    # a decode kernel that never waits: its grid would race the kernel before it
    name, (n, k, m) = "gemv", (100, 160, 1)
    source = q8._gemv_source(name, n, k, m, 2, 4).replace("  gemv_wait_previous_kernels();\n", "")
    x, q, scale, _ = _problem(np.random.default_rng(1), n, k, m)
    with pytest.raises(EmulationError, match="never waited for the previous kernel"):
        EmulatedFunction(source, name, GEMV_PARAMS)((50,), (128,), x, q, scale, np.zeros((m, n), np.float16),
                                                    written_before=X_AND_Y)


def test_the_emulator_holds_wgmma_to_its_asynchrony():
    plan = q8.GemmPlan(128, 3, 32, True)
    # refilling x while the previous stage's products may still read it
    with pytest.raises(EmulationError, match="changed between its issue and its wait_group"):
        _run_gemm(200, 256, 257, False, plan, edit=("gemm_wgmma_wait<0>();       // the previous", "// "))
    # accumulators touched by other instructions (the previous wait handed them back) unfenced
    with pytest.raises(EmulationError, match="without a wgmma.fence"):
        _run_gemm(200, 256, 257, False, plan, edit=("gemm_wgmma_fence();\n", "\n"))
    # the epilogue reading accumulators whose products never landed
    with pytest.raises(EmulationError, match="never waited for"):
        _run_gemm(200, 256, 257, False, plan, edit=("  gemm_wgmma_wait<0>();\n  gemm_hold", "  gemm_hold"))
    # the descriptors' two strides exchanged: the operands are read in the wrong order
    with pytest.raises(AssertionError):
        _check(*_run_gemm(200, 256, 257, False, plan, edit=("2 * ks * 128, LBO, SBO)", "2 * ks * 128, SBO, LBO)")))
