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


def default_plan(n_heads: int, n_kv_heads: int, rows: str) -> AttentionPlan:
    """rows: "one" (decode), "block" (verify/draft, T <= 64), "many" (prefill)."""
    group = n_heads // n_kv_heads
    if rows == "one":
        # G rows per kv head, nothing to tile: the cache splits are the parallelism.
        return AttentionPlan(rows_per_cta=max(group, 4), keys_per_tile=64, threads=128,
                             target_ctas=132 * 4, max_splits=128, min_tiles_per_split=2,
                             vector=8)
    if rows == "block":
        return AttentionPlan(rows_per_cta=64, keys_per_tile=64, threads=128,
                             target_ctas=132 * 2, max_splits=64, min_tiles_per_split=2,
                             vector=8)
    if rows == "many":
        return AttentionPlan(rows_per_cta=64, keys_per_tile=64, threads=128,
                             target_ctas=132 * 2, max_splits=16, min_tiles_per_split=4,
                             vector=8)
    raise ModelError(f"unknown row class {rows!r}: expected 'one', 'block' or 'many'")


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
    static_t = isinstance(t, int)
    static_ctx = isinstance(max_ctx, int)

    def split_count(pos, n_t):
        # Enough splits of the keys to fill the GPU, none shorter than min_tiles_per_split.
        key_tiles = T.ceildiv(pos + n_t, TZ)
        ctas_per_split = T.ceildiv(n_t * G, TX) * HKV
        wanted = T.min(T.ceildiv(T.int64(plan.target_ctas), ctas_per_split),
                       T.ceildiv(key_tiles, T.int64(plan.min_tiles_per_split)))
        return T.max(T.min(wanted, T.int64(plan.max_splits)), T.int64(1))

    def causal_stop(key_end, own_key_end):
        return T.min(key_end, own_key_end) if causal else key_end

    def sees(key, key_stop, qt, n_t, pos):
        inside = tirx.all(key < key_stop, qt < n_t)
        return tirx.all(inside, key <= pos + qt) if causal else inside

    @T.prim_func(private=True, s_tir=True)
    def split_kv_attention(var_q: T.handle, var_kv: T.handle, layer: T.int64, pos: T.int64,
                           var_k: T.handle, var_v: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_layers = T.int64()
        n_t = T.int64(t) if static_t else T.int64()
        ctx = T.int64(max_ctx) if static_ctx else T.int64()
        q = T.match_buffer(var_q, (n_t, HQ, D), dtype)
        kv = T.match_buffer(var_kv, (n_layers, T.int64(2), HKV, ctx, D), dtype)
        k_new = T.match_buffer(var_k, (n_t, HKV, D), dtype)
        v_new = T.match_buffer(var_v, (n_t, HKV, D), dtype)
        out = T.match_buffer(var_out, (n_t, HQ, D), dtype)

        n_keys: T.let[T.int64] = pos + n_t
        row_tiles: T.let[T.int64] = T.ceildiv(n_t * G, TX)
        n_splits: T.let[T.int64] = split_count(pos, n_t)
        tiles_per_split: T.let[T.int64] = T.ceildiv(T.ceildiv(n_keys, TZ), n_splits)

        part_out = T.sblock_alloc_buffer((split_count(pos, n_t), n_t, HQ, D), "float32")
        part_lse = T.sblock_alloc_buffer((split_count(pos, n_t), n_t, HQ), "float32")

        for split, head, row_tile in T.grid(n_splits, HKV, row_tiles):
            with T.sblock("cta"):
                s, h, rt = T.axis.remap("SSS", [split, head, row_tile])
                T.reads(q[:, :, :], kv[layer, :, h, :, :], k_new[:, h, :], v_new[:, h, :])
                T.writes(part_out[s, :, :, :], part_lse[s, :, :])
                q_tile = T.sblock_alloc_buffer((TX, D), dtype, scope=shared)
                k_tile = T.sblock_alloc_buffer((TZ, D), dtype, scope=shared)
                v_tile = T.sblock_alloc_buffer((TZ, D), dtype, scope=shared)
                score_acc = T.sblock_alloc_buffer((TX, TZ), "float32", scope=local)
                prob = T.sblock_alloc_buffer((TX, TZ), "float32", scope=shared)
                row_max = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                new_max = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                carry = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                row_sum = T.sblock_alloc_buffer((TX,), "float32", scope=shared)
                acc = T.sblock_alloc_buffer((TX, D), "float32", scope=local)

                row0: T.let[T.int64] = rt * TX
                key_begin: T.let[T.int64] = s * tiles_per_split * TZ
                key_end: T.let[T.int64] = T.min(key_begin + tiles_per_split * TZ, n_keys)
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
                            key: T.let[T.int64] = tile0 + vj
                            qt: T.let[T.int64] = (row0 + vi) // G
                            visible: T.let[T.bool] = sees(key, key_stop, qt, n_t, pos)
                            prob[vi, vj] = T.if_then_else(
                                visible, score_acc[vi, vj] * T.float32(score_scale), T.float32(NEG))
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("tile_max"):
                            vi, vj = T.axis.remap("SR", [i, j])
                            with T.init():
                                new_max[vi] = row_max[vi]
                            new_max[vi] = T.max(new_max[vi], prob[vi, vj])
                    for i in T.serial(TX):
                        with T.sblock("rescale"):
                            vi = T.axis.remap("S", [i])
                            carry[vi] = T.exp2(row_max[vi] - new_max[vi])
                            row_max[vi] = new_max[vi]
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("exp"):
                            vi, vj = T.axis.remap("SS", [i, j])
                            # Masked scores hold NEG: give them weight 0 even if the whole row is.
                            prob[vi, vj] = T.if_then_else(prob[vi, vj] > T.float32(NEG * 0.5),
                                                          T.exp2(prob[vi, vj] - row_max[vi]),
                                                          T.float32(0))
                    for i, j in T.grid(TX, TZ):
                        with T.sblock("tile_sum"):
                            vi, vj = T.axis.remap("SR", [i, j])
                            with T.init():
                                row_sum[vi] = row_sum[vi] * carry[vi]
                            row_sum[vi] = row_sum[vi] + prob[vi, vj]
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
                            part_out[s, qt, qh, vd] = T.if_then_else(
                                row_sum[vi] > T.float32(0), acc[vi, vd] / row_sum[vi], T.float32(0))
                for i in T.serial(TX):
                    with T.sblock("lse_store"):
                        vi = T.axis.remap("S", [i])
                        qt: T.let[T.int64] = (row0 + vi) // G
                        qh: T.let[T.int64] = h * G + (row0 + vi) % G
                        if qt < n_t:
                            # A split where this row sees no key gets weight exp2(NEG) = 0.
                            part_lse[s, qt, qh] = T.if_then_else(
                                row_sum[vi] > T.float32(0), row_max[vi] + T.log2(row_sum[vi]),
                                T.float32(NEG))

        lse_max = T.sblock_alloc_buffer((n_t, HQ), "float32")
        weight_sum = T.sblock_alloc_buffer((n_t, HQ), "float32")
        merged = T.sblock_alloc_buffer((n_t, HQ, D), "float32")
        for i, hq, sp in T.grid(n_t, HQ, n_splits):
            with T.sblock("merge_max"):
                vi, vh, vs = T.axis.remap("SSR", [i, hq, sp])
                with T.init():
                    lse_max[vi, vh] = T.float32(NEG)
                lse_max[vi, vh] = T.max(lse_max[vi, vh], part_lse[vs, vi, vh])
        for i, hq, sp in T.grid(n_t, HQ, n_splits):
            with T.sblock("merge_sum"):
                vi, vh, vs = T.axis.remap("SSR", [i, hq, sp])
                with T.init():
                    weight_sum[vi, vh] = T.float32(0)
                weight_sum[vi, vh] = weight_sum[vi, vh] + T.exp2(part_lse[vs, vi, vh] - lse_max[vi, vh])
        for i, hq, d, sp in T.grid(n_t, HQ, D, n_splits):
            with T.sblock("merge_out"):
                vi, vh, vd, vs = T.axis.remap("SSSR", [i, hq, d, sp])
                with T.init():
                    merged[vi, vh, vd] = T.float32(0)
                merged[vi, vh, vd] = merged[vi, vh, vd] + part_out[vs, vi, vh, vd] * T.exp2(
                    part_lse[vs, vi, vh] - lse_max[vi, vh])
        for i, hq, d in T.grid(n_t, HQ, D):
            with T.sblock("out_store"):
                vi, vh, vd = T.axis.remap("SSS", [i, hq, d])
                out[vi, vh, vd] = T.Cast(dtype, merged[vi, vh, vd] / weight_sum[vi, vh])

    return split_kv_attention


def attention_cuda_unscheduled(n_heads: int, n_kv_heads: int, head_dim: int, causal: bool,
                               dtype: str, t, max_ctx="symbolic",
                               plan: AttentionPlan | None = None):
    """The CUDA kernel's algorithm and tiling with no thread bindings, for llvm (tests)."""
    plan = plan or default_plan(n_heads, n_kv_heads, _rows_class(t))
    return _attention_tir(n_heads, n_kv_heads, head_dim, causal, dtype, t, max_ctx, plan,
                          on_gpu=False)
