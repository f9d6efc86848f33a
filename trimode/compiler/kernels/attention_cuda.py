"""Split-KV flash attention over the shared cache, scheduled for CUDA.

Same contract as attention.attention_cpu: query row t (absolute position pos + t) sees cache
positions [0, pos) of its layer and the block's own keys k_new[j] for j <= t (causal) or every
j (bidirectional); GQA head h reads kv head h // (n_heads / n_kv_heads); the cache is only read.

The keys a row may see form one virtual sequence of pos + T keys: the cache, then the block.
Each thread block (CTA) takes `rows_per_cta` query rows of one kv head -- the (t, q head) pairs
that share that head's K/V, so every K/V tile loaded is used by all of them -- and one split of
the key sequence. It walks its split tile by tile with an online softmax (fp32, base 2) and
writes a partial output with its log-sum-exp; a second stage merges the splits by LSE. Decode
has only G = n_heads / n_kv_heads rows per kv head, so the splits are what fill the GPU
(flash-decoding); a prefill has row tiles enough and uses one split.

`attention_cuda_unscheduled` is the same TIR without thread bindings and with every scratch
buffer in global memory: it runs on llvm, which is how the tiling, the split arithmetic, the
masks and the LSE merge are tested on a machine without a GPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.script import tirx as T

from trimode.model.config import ModelConfig, ModelError

LOG2E = math.log2(math.e)
# Running max before any key was seen; finite so that exp2(NEG - NEG) stays 1, not NaN.
NEG = -1e30


@dataclass(frozen=True)
class AttentionPlan:
    """Tiling of one attention kernel; every field is a schedule parameter for tuning."""
    rows_per_cta: int   # query rows ((t, q head) pairs of one kv head) per thread block
    keys_per_tile: int  # keys loaded to shared memory per step of the online softmax
    threads: int        # threads per block (a multiple of 32)
    target_ctas: int    # splits are added until about this many blocks run (fills the GPU)
    max_splits: int     # upper bound on splits of the key sequence
    min_tiles_per_split: int  # fewer key tiles than this per split cost more in merging
    vector: int         # elements per vectorised load (16 bytes of fp16 = 8)


def default_plan(n_heads: int, n_kv_heads: int, rows: str, head_dim: int) -> AttentionPlan:
    """rows: "one" (decode), "block" (verify/draft, T <= 64), "many" (prefill)."""
    group = n_heads // n_kv_heads
    if rows == "one":
        # G rows per kv head, nothing to tile: the cache splits are the parallelism.
        return fitted(AttentionPlan(rows_per_cta=max(group, 4), keys_per_tile=64, threads=128,
                                    target_ctas=132 * 4, max_splits=128, min_tiles_per_split=2,
                                    vector=8), head_dim)
    # 64 rows x 32 keys keeps q, k, v and the score tile under 48 KB of static shared memory.
    if rows == "block":
        return fitted(AttentionPlan(rows_per_cta=64, keys_per_tile=32, threads=256,
                                    target_ctas=132 * 2, max_splits=64, min_tiles_per_split=2,
                                    vector=8), head_dim)
    if rows == "many":
        return fitted(AttentionPlan(rows_per_cta=64, keys_per_tile=32, threads=256,
                                    target_ctas=132 * 2, max_splits=16, min_tiles_per_split=4,
                                    vector=8), head_dim)
    raise ModelError(f"unknown row class {rows!r}: expected 'one', 'block' or 'many'")


def fitted(plan: AttentionPlan, head_dim: int) -> AttentionPlan:
    """The plan with each register grid (rows x head_dim of the output, rows x keys of the
    scores) dividing evenly over its threads: a few more rows per block first (rows past the
    query's are masked), else fewer threads. The default model's decode (3 rows of a kv head,
    head_dim 48) takes 8 rows: 4 x 48 does not divide over 128 threads."""
    def divides(rows: int, threads: int) -> bool:
        return (rows * head_dim) % threads == 0 and (rows * plan.keys_per_tile) % threads == 0

    for rows in range(plan.rows_per_cta, 2 * plan.rows_per_cta + 1):
        if divides(rows, plan.threads):
            return dataclasses.replace(plan, rows_per_cta=rows)
    for threads in range(plan.threads - 32, 0, -32):
        if divides(plan.rows_per_cta, threads):
            return dataclasses.replace(plan, threads=threads)
    raise ModelError(f"no thread count divides a {plan.rows_per_cta}-row tile of head_dim {head_dim}")


def plan_candidates(n_heads: int, n_kv_heads: int, rows: str, head_dim: int) -> list[AttentionPlan]:
    """The decode plans `trimode tune` measures (blocks and prefill run attention_mma where
    head_dim allows): keys per tile, the CTAs the splits aim at, the most splits."""
    default = default_plan(n_heads, n_kv_heads, rows, head_dim)
    plans = [default]
    for keys_per_tile in (32, 64, 128):
        for target_ctas in (264, 528, 1056):
            for max_splits in (128, 256):
                plan = fitted(AttentionPlan(default.rows_per_cta, keys_per_tile, 128, target_ctas,
                                            max_splits, default.min_tiles_per_split, default.vector), head_dim)
                if plan not in plans:
                    plans.append(plan)
    return plans


def _rows_class(t) -> str:
    if t == 1:
        return "one"
    if isinstance(t, int):
        return "block" if t <= 64 else "many"
    return "many"


def _check_geometry(n_heads: int, n_kv_heads: int, head_dim: int, plan: AttentionPlan):
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ModelError(f"{n_heads} query heads cannot share {n_kv_heads} kv heads evenly.")
    if head_dim % plan.vector or plan.keys_per_tile % plan.vector:
        raise ModelError(f"head_dim {head_dim} and keys_per_tile {plan.keys_per_tile} must be "
                         f"multiples of the load vector {plan.vector}.")
    if plan.threads % 32:
        raise ModelError(f"threads per block ({plan.threads}) must be a multiple of 32.")


def scratch_rows(n_heads: int, n_kv_heads: int, plan: AttentionPlan, t: int) -> int:
    """Rows of part_out / part_lse that attention at up to `t` query rows needs at any cache
    size: the largest split count times T (split_count in _attention_tir, without its
    cache-size bound)."""
    group = n_heads // n_kv_heads
    rows = 0
    for n_t in range(1, t + 1):
        ctas_per_split = -(-n_t * group // plan.rows_per_cta) * n_kv_heads
        splits = max(min(-(-plan.target_ctas // ctas_per_split), plan.max_splits), 1)
        rows = max(rows, splits * n_t)
    return rows


def scratch_rows_at(n_heads: int, n_kv_heads: int, plan: AttentionPlan, t):
    """The same bound at exactly T rows, T symbolic (prefill: its scratch grows with T but
    not by max_splits, which at T = 32k would be gigabytes)."""
    group = n_heads // n_kv_heads
    ctas_per_split = tirx.floordiv(t * group + plan.rows_per_cta - 1, plan.rows_per_cta) * n_kv_heads
    splits = tirx.floordiv(plan.target_ctas + ctas_per_split - 1, ctas_per_split)
    return tirx.max(tirx.min(splits, plan.max_splits), 1) * t


def splits_for(plan: AttentionPlan, group: int, n_kv_heads: int, ctx, n_t):
    """Splits of the key sequence (an int64 TIR expression): enough to fill the GPU, none
    shorter than min_tiles_per_split at a full cache. The grid depends on the cache size,
    never on pos (a CUDA graph replays one grid at every position); splits past the keys at
    this pos exit at once."""
    key_tiles = T.ceildiv(ctx, T.int64(plan.keys_per_tile))
    ctas_per_split = T.ceildiv(n_t * T.int64(group), T.int64(plan.rows_per_cta)) * T.int64(n_kv_heads)
    wanted = T.min(T.ceildiv(T.int64(plan.target_ctas), ctas_per_split),
                   T.ceildiv(key_tiles, T.int64(plan.min_tiles_per_split)))
    return T.max(T.min(wanted, T.int64(plan.max_splits)), T.int64(1))


def _attention_tir(n_heads: int, n_kv_heads: int, head_dim: int, causal: bool, dtype: str,
                   t, max_ctx, plan: AttentionPlan, on_gpu: bool):
    _check_geometry(n_heads, n_kv_heads, head_dim, plan)
    group = n_heads // n_kv_heads
    HQ, HKV, D = T.int64(n_heads), T.int64(n_kv_heads), T.int64(head_dim)
    TX, TZ = T.int64(plan.rows_per_cta), T.int64(plan.keys_per_tile)
    G = T.int64(group)
    score_scale = LOG2E / math.sqrt(head_dim)  # scores in base 2: exp2 is one instruction
    shared = "shared" if on_gpu else "global"
    local = "local" if on_gpu else "global"
    # Static sizes are constants, dynamic ones variables bound by the buffers' shapes.
    n_t = T.int64(t) if isinstance(t, int) else tirx.Var("n_t", "int64")
    ctx = T.int64(max_ctx) if isinstance(max_ctx, int) else tirx.Var("ctx", "int64")

    def split_count(ctx, n_t):
        return splits_for(plan, group, n_kv_heads, ctx, n_t)

    def causal_stop(key_end, own_key_end):
        return T.min(key_end, own_key_end) if causal else key_end

    def sees(key, key_stop, qt, n_t, pos):
        inside = tirx.all(key < key_stop, qt < n_t)
        return tirx.all(inside, key <= pos + qt) if causal else inside

    @T.prim_func(private=True, s_tir=True)
    def split_kv_attention(var_q: T.handle, var_kv: T.handle, layer: T.int64, var_pos: T.handle,
                           var_k: T.handle, var_v: T.handle, var_out: T.handle,
                           var_part_out: T.handle, var_part_lse: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_layers, n_part = T.int64(), T.int64()
        q = T.match_buffer(var_q, (n_t, HQ, D), dtype)
        kv = T.match_buffer(var_kv, (n_layers, T.int64(2), HKV, ctx, D), dtype)
        pos_buf = T.match_buffer(var_pos, (T.int64(1),), "int32")
        k_new = T.match_buffer(var_k, (n_t, HKV, D), dtype)
        v_new = T.match_buffer(var_v, (n_t, HKV, D), dtype)
        out = T.match_buffer(var_out, (n_t, HQ, D), dtype)
        # Each split's partial rows, row s * n_t + t (>= split_count * n_t rows: the caller
        # allocates them, so a CUDA graph owns them; see scratch_rows).
        part_out = T.match_buffer(var_part_out, (n_part, HQ, D), "float32")
        part_lse = T.match_buffer(var_part_lse, (n_part, HQ), "float32")

        for split, head, row_tile in T.grid(split_count(ctx, n_t), HKV, T.ceildiv(n_t * G, TX)):
            with T.sblock("cta"):
                s, h, rt = T.axis.remap("SSS", [split, head, row_tile])
                T.reads(q[:, :, :], kv[layer, :, h, :, :], k_new[:, h, :], v_new[:, h, :], pos_buf[0])
                T.writes(part_out[s * n_t:s * n_t + n_t, :, :], part_lse[s * n_t:s * n_t + n_t, :])
                q_tile = T.sblock_alloc_buffer((TX, D), dtype, scope=shared)
                k_tile = T.sblock_alloc_buffer((TZ, D), dtype, scope=shared)
                v_tile = T.sblock_alloc_buffer((TZ, D), dtype, scope=shared)
                score_acc = T.sblock_alloc_buffer((TX, TZ), "float32", scope=local)
                prob = T.sblock_alloc_buffer((TX, TZ), "float32", scope=shared)
                row_max = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                new_max = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                next_max = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                next_sum = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                carry = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                row_sum = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                new_sum = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                acc = T.sblock_alloc_buffer((TX, D), "float32", scope=local)

                pos: T.let[T.int64] = T.Cast("int64", pos_buf[0])
                row0: T.let[T.int64] = rt * TX
                split_keys: T.let[T.int64] = T.ceildiv(T.ceildiv(pos + n_t, TZ), split_count(ctx, n_t)) * TZ
                key_begin: T.let[T.int64] = s * split_keys
                key_end: T.let[T.int64] = T.min(key_begin + split_keys, pos + n_t)
                # Causal: no row of this tile sees past its last row's own key.
                last_t: T.let[T.int64] = T.min(T.ceildiv(row0 + TX, G), n_t) - T.int64(1)
                key_stop: T.let[T.int64] = causal_stop(key_end, pos + last_t + T.int64(1))
                n_steps: T.let[T.int64] = T.ceildiv(T.max(key_stop - key_begin, T.int64(0)), TZ)

                for i, d in T.grid(TX, D):
                    with T.sblock("q_load"):
                        vi, vd = T.axis.remap("SS", [i, d])
                        qt: T.let[T.int64] = (row0 + vi) // G
                        qh: T.let[T.int64] = h * G + (row0 + vi) % G
                        q_tile[vi, vd] = T.if_then_else(qt < n_t, q[T.min(qt, n_t - T.int64(1)), qh, vd],
                                                        T.Cast(dtype, 0))
                for i in T.serial(TX):
                    with T.sblock("state_init"):
                        vi = T.axis.remap("S", [i])
                        row_max[vi] = T.float32(NEG)
                        row_sum[vi] = T.float32(0)
                for i, d in T.grid(TX, D):
                    with T.sblock("acc_init"):
                        vi, vd = T.axis.remap("SS", [i, d])
                        acc[vi, vd] = T.float32(0)

                for step in T.serial(n_steps):
                    tile0: T.let[T.int64] = key_begin + step * TZ
                    for j, d in T.grid(TZ, D):
                        with T.sblock("kv_load"):
                            vj, vd = T.axis.remap("SS", [j, d])
                            key: T.let[T.int64] = tile0 + vj
                            # Cache keys, then the block's own; clamped so no read leaves a buffer.
                            if key < pos:
                                k_tile[vj, vd] = kv[layer, T.int64(0), h, key, vd]
                                v_tile[vj, vd] = kv[layer, T.int64(1), h, key, vd]
                            else:
                                k_tile[vj, vd] = k_new[T.min(key - pos, n_t - T.int64(1)), h, vd]
                                v_tile[vj, vd] = v_new[T.min(key - pos, n_t - T.int64(1)), h, vd]
                    with T.sblock("score_scope"):  # its own scope: the schedule stages q/k slices in it
                        for i, j, d in T.grid(TX, TZ, D):
                            with T.sblock("score"):
                                vi, vj, vd = T.axis.remap("SSR", [i, j, d])
                                with T.init():
                                    score_acc[vi, vj] = T.float32(0)
                                score_acc[vi, vj] = score_acc[vi, vj] + (
                                    T.Cast("float32", q_tile[vi, vd]) * T.Cast("float32", k_tile[vj, vd]))
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("score_mask"):
                            vi, vj = T.axis.remap("SS", [i, j])
                            prob[vi, vj] = T.if_then_else(
                                sees(tile0 + vj, key_stop, (row0 + vi) // G, n_t, pos),
                                score_acc[vi, vj] * T.float32(score_scale), T.float32(NEG))
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("tile_max"):
                            vi, vj = T.axis.remap("SR", [i, j])
                            with T.init():  # the max reducer's identity (cross-thread lowering needs it)
                                new_max[vi] = T.min_value("float32")
                            new_max[vi] = T.max(new_max[vi], prob[vi, vj])
                    for i in T.serial(TX):
                        with T.sblock("rescale"):
                            vi = T.axis.remap("S", [i])
                            next_max[vi] = T.max(row_max[vi], new_max[vi])
                            carry[vi] = T.exp2(row_max[vi] - T.max(row_max[vi], new_max[vi]))
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("exp"):
                            vi, vj = T.axis.remap("SS", [i, j])
                            # Masked keys weigh 0, also in a row that sees none of this tile.
                            prob[vi, vj] = T.if_then_else(
                                sees(tile0 + vj, key_stop, (row0 + vi) // G, n_t, pos),
                                T.exp2(score_acc[vi, vj] * T.float32(score_scale) - next_max[vi]),
                                T.float32(0))
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("tile_sum"):
                            vi, vj = T.axis.remap("SR", [i, j])
                            with T.init():
                                new_sum[vi] = T.float32(0)
                            new_sum[vi] = new_sum[vi] + prob[vi, vj]
                    for i in T.serial(TX):
                        with T.sblock("sum_next"):
                            vi = T.axis.remap("S", [i])
                            next_sum[vi] = row_sum[vi] * carry[vi] + new_sum[vi]
                    for i in T.serial(TX):
                        with T.sblock("state_update"):
                            vi = T.axis.remap("S", [i])
                            row_sum[vi] = next_sum[vi]
                            row_max[vi] = next_max[vi]
                    with T.sblock("pv_scope"):  # its own scope: the only writer of acc in it
                        for i, d, j in T.grid(TX, D, TZ):
                            with T.sblock("pv"):
                                vi, vd, vj = T.axis.remap("SSR", [i, d, j])
                                with T.init():
                                    acc[vi, vd] = acc[vi, vd] * carry[vi]
                                acc[vi, vd] = acc[vi, vd] + prob[vi, vj] * T.Cast("float32", v_tile[vj, vd])

                for i, d in T.grid(TX, D):
                    with T.sblock("part_store"):
                        vi, vd = T.axis.remap("SS", [i, d])
                        qt: T.let[T.int64] = (row0 + vi) // G
                        qh: T.let[T.int64] = h * G + (row0 + vi) % G
                        if qt < n_t:
                            part_out[s * n_t + qt, qh, vd] = T.if_then_else(
                                row_sum[vi] > T.float32(0), acc[vi, vd] / row_sum[vi], T.float32(0))
                for i in T.serial(TX):
                    with T.sblock("lse_store"):
                        vi = T.axis.remap("S", [i])
                        qt: T.let[T.int64] = (row0 + vi) // G
                        qh: T.let[T.int64] = h * G + (row0 + vi) % G
                        if qt < n_t:
                            # A split where this row sees no key gets weight exp2(NEG) = 0.
                            part_lse[s * n_t + qt, qh] = T.if_then_else(
                                row_sum[vi] > T.float32(0), row_max[vi] + T.log2(row_sum[vi]),
                                T.float32(NEG))

        for i, hq, d in T.grid(n_t, HQ, D):
            with T.sblock("merge"):
                vi, vh, vd = T.axis.remap("SSS", [i, hq, d])
                T.reads(part_lse[:, vh], part_out[:, vh, vd])
                T.writes(out[vi, vh, vd])
                # Merge the splits by LSE: weights exp2(lse_s - max lse), normalised.
                top = T.sblock_alloc_buffer((1,), "float32", scope=local)
                total = T.sblock_alloc_buffer((1,), "float32", scope=local)
                merged = T.sblock_alloc_buffer((1,), "float32", scope=local)
                top[0] = T.float32(NEG)
                for sp in T.serial(split_count(ctx, n_t)):
                    top[0] = T.max(top[0], part_lse[sp * n_t + vi, vh])
                total[0] = T.float32(0)
                merged[0] = T.float32(0)
                for sp in T.serial(split_count(ctx, n_t)):
                    total[0] = total[0] + T.exp2(part_lse[sp * n_t + vi, vh] - top[0])
                    merged[0] = merged[0] + (T.exp2(part_lse[sp * n_t + vi, vh] - top[0])
                                             * part_out[sp * n_t + vi, vh, vd])
                out[vi, vh, vd] = T.Cast(dtype, merged[0] / total[0])

    return split_kv_attention


def attention_cuda_unscheduled(n_heads: int, n_kv_heads: int, head_dim: int, causal: bool,
                               dtype: str, t, max_ctx="symbolic",
                               plan: AttentionPlan | None = None):
    """The CUDA kernel's algorithm and tiling with no thread bindings, for llvm (tests)."""
    plan = plan or default_plan(n_heads, n_kv_heads, _rows_class(t), head_dim)
    return _attention_tir(n_heads, n_kv_heads, head_dim, causal, dtype, t, max_ctx, plan,
                          on_gpu=False)


def attention_cuda(n_heads: int, n_kv_heads: int, head_dim: int, causal: bool, dtype: str,
                   t, max_ctx="symbolic", plan: AttentionPlan | None = None):
    """The attention PrimFunc for CUDA, thread-bound.

    Buffers (same order as attention.attention_cpu): q [T, Hq, D], kv [L, 2, Hkv, C, D],
    layer int64, pos int32 [1] (on the device, so a CUDA graph serves every position),
    k_new / v_new [T, Hkv, D], out [T, Hq, D], then the split scratch part_out [R, Hq, D] and
    part_lse [R, Hq] fp32 with R >= scratch_rows(...) (or scratch_rows_at(..., T)). `t` is an int
    (static T) or "dynamic"; `max_ctx` an int or "symbolic" (C). The plan defaults by T: 1 -> decode,
    static T <= 64 -> block, otherwise prefill; pass default_plan(..., "block", head_dim) for a verify or
    draft entry whose T is dynamic.
    """
    plan = plan or default_plan(n_heads, n_kv_heads, _rows_class(t), head_dim)
    func = _attention_tir(n_heads, n_kv_heads, head_dim, causal, dtype, t, max_ctx, plan,
                          on_gpu=True)
    sch = s_tir.Schedule(func)
    _schedule_cta(sch, plan, head_dim)
    _schedule_merge(sch, head_dim)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _thread_tile(rows: int, cols: int, threads: int) -> tuple[int, int]:
    """Per-thread tile (rows, cols) of a rows x cols grid shared by `threads` threads: as
    square as divisibility allows, the column side (the contiguous one) taken first."""
    if (rows * cols) % threads:
        raise ModelError(f"a {rows}x{cols} tile does not divide over {threads} threads.")
    each = rows * cols // threads
    best = None
    for tc in range(1, each + 1):
        tr = each // tc
        if each % tc or cols % tc or rows % tr:
            continue
        if best is None or abs(tc - tr) < abs(best[1] - best[0]) or (
                abs(tc - tr) == abs(best[1] - best[0]) and tc > best[1]):
            best = (tr, tc)
    if best is None:
        raise ModelError(f"no per-thread tile splits {rows}x{cols} over {threads} threads.")
    return best


def _schedule_cta(sch: s_tir.Schedule, plan: AttentionPlan, head_dim: int):
    warps = plan.threads // 32
    rows, keys = plan.rows_per_cta, plan.keys_per_tile

    split, head, row_tile = sch.get_loops("cta")
    sch.bind(row_tile, "blockIdx.x")
    sch.bind(head, "blockIdx.y")
    sch.bind(split, "blockIdx.z")

    def bind_threads(loop):
        ty, tx = sch.split(loop, [warps, 32])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

    def copy(block):
        # 16-byte vector loads, consecutive threads on consecutive vectors (coalesced). Each
        # vector stays inside one row: its row-dependent lets are then the same for every lane
        # (fusing rows and d first left them per lane, which TVM cannot vectorise at d = 48).
        i, d = sch.get_loops(block)[-2:]
        d_outer, vec = sch.split(d, [None, plan.vector])
        _, thread = sch.split(sch.fuse(i, d_outer), [None, plan.threads])
        bind_threads(thread)
        sch.vectorize(vec)

    def rows_only(block):
        loop = sch.get_loops(block)[-1]
        _, thread = sch.split(loop, [None, plan.threads])
        bind_threads(thread)

    def tiled(block, n_rows, n_cols, reduce=False):
        # Each thread owns a fixed (tr x tc) piece of a grid kept in registers; every block
        # touching that grid uses this same mapping, so the grid never leaves the thread.
        tr, tc = _thread_tile(n_rows, n_cols, plan.threads)
        loops = sch.get_loops(block)
        i, j = loops[-3:-1] if reduce else loops[-2:]
        io, ii = sch.split(i, [None, tr])
        jo, jj = sch.split(j, [None, tc])
        sch.reorder(io, jo, ii, jj)
        bind_threads(sch.fuse(io, jo))
        # Register arrays need compile-time indices: unrolled, or they spill to local memory.
        sch.unroll(ii)
        sch.unroll(jj)
        return ii, jj

    def row_reduce(block):
        # One warp per row, the row's keys over its 32 lanes: shuffles, not a serial walk.
        i, j = sch.get_loops(block)[-2:]
        _, ty = sch.split(i, [None, warps])
        _, tx = sch.split(j, [None, 32])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

    # Pad K and V rows by one vector: 8 rows read at the same column hit 8 distinct banks.
    sch.storage_align("kv_load", 0, 0, head_dim, plan.vector)
    sch.storage_align("kv_load", 1, 0, head_dim, plan.vector)
    sch.storage_align("q_load", 0, 0, head_dim, plan.vector)
    copy("q_load")
    copy("kv_load")
    rows_only("state_init")
    tiled("acc_init", rows, head_dim)

    score = sch.get_sblock("score")
    ii, jj = tiled(score, rows, keys, reduce=True)
    red = sch.get_loops(score)[-1]
    ro, rv = sch.split(red, [None, plan.vector])
    sch.reorder(ro, ii, jj, rv)
    for buffer_index in (0, 1):  # q and k slices: one 16-byte shared load each
        cached = sch.cache_read(score, buffer_index, "local")
        sch.compute_at(cached, ro)
        sch.vectorize(sch.get_loops(cached)[-1])
    sch.unroll(rv)
    sch.decompose_reduction(score, ro)
    tiled("score_mask", rows, keys)
    row_reduce("tile_max")
    rows_only("rescale")
    tiled("exp", rows, keys)
    row_reduce("tile_sum")
    rows_only("sum_next")
    rows_only("state_update")

    pv = sch.get_sblock("pv")
    tiled(pv, rows, head_dim, reduce=True)
    sch.decompose_reduction(pv, sch.get_loops(pv)[-3])
    tiled("part_store", rows, head_dim)
    rows_only("lse_store")


def _schedule_merge(sch: s_tir.Schedule, head_dim: int):
    # One block per (t, q head), one thread per output element; each thread redoes the
    # row's LSE statistics (a few dozen splits) instead of a shared-memory round.
    i, h, d = sch.get_loops("merge")
    sch.bind(sch.fuse(i, h), "blockIdx.x")
    sch.bind(d, "threadIdx.x")
