"""rope_split(_append) for a q8_0 K/V cache (CPU builds; model/kv_cache.py has the row layout).

The same contract as rope.py's kernels, but each k and v row is stored as Q8_0 blocks:
head_dim int8 values, then head_dim / 32 fp32 scales, written through an fp32 view of the
same bytes. The block's own K/V (what its rows attend to before the cache has them) are quantized
the same way, so a row sees its block's keys exactly as a later step reads them from the
cache: greedy self-speculation stays AR's.
"""
from __future__ import annotations

from tvm.script import tirx as T

from trimode.compiler.kernels.rope import at, rotated
from trimode.model.kv_cache import kv_row
from trimode.model.weights import Q8_BLOCK


def _kernel_parts(n_heads: int, n_kv_heads: int, head_dim: int, dtype: str):
    half, quarter = head_dim // 2, head_dim // 4
    D, HQ, HKV = T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)
    blocks = head_dim // Q8_BLOCK

    @T.macro
    def quantize(row, out, out_scales, i, h, top):
        # row [D] fp32 -> out[i, h] as Q8_0 (kv_cache.kv_round is the same arithmetic)
        for b in range(blocks):
            top[0] = T.float32(0)
            for j in range(Q8_BLOCK):
                top[0] = T.max(top[0], T.fabs(row[b * Q8_BLOCK + j]))
            top[1] = top[0] / T.float32(127)
            out_scales[i, h, quarter + b] = top[1]
            top[2] = T.Select(top[1] > T.float32(0), T.float32(1) / top[1], T.float32(0))
            for j in T.vectorized(Q8_BLOCK):
                out[i, h, b * Q8_BLOCK + j] = T.Cast("int8", T.max(T.min(
                    T.round(row[b * Q8_BLOCK + j] * top[2]), T.float32(127)), T.float32(-127)))

    @T.macro
    def split_row(qkv, cos, sin, qscale, pos, q, k, v, k_scales, v_scales, i, row, top):
        # row i of the block: its q heads rotated and scaled, its k and v heads quantized
        for h in range(HQ):
            for d in T.vectorized(D):
                q[i, h, d] = T.Cast(dtype, qscale[at(pos, i)] * rotated(qkv, cos, sin, pos, i, h * D, d, half))
        for h in range(HKV):
            for d in T.vectorized(D):
                row[d] = rotated(qkv, cos, sin, pos, i, (HQ + h) * D, d, half)
            quantize(row, k, k_scales, i, h, top)
            for d in T.vectorized(D):
                row[d] = T.Cast("float32", qkv[i, (HQ + HKV + h) * D + d])
            quantize(row, v, v_scales, i, h, top)

    return split_row


def rope_split_q8(n_heads: int, n_kv_heads: int, head_dim: int, dtype: str) -> "T.PrimFunc":
    """q, k, v of a block that leaves the cache alone (bidirectional draft)."""
    half = head_dim // 2
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    D, HQ, HKV = T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)
    ROW = T.int64(kv_row("q8_0", head_dim))
    split_row = _kernel_parts(n_heads, n_kv_heads, head_dim, dtype)

    @T.prim_func(private=True)
    def rope_split(var_qkv: T.handle, var_cos: T.handle, var_sin: T.handle, var_qscale: T.handle,
                   var_pos: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle):
        T.func_attr({"tirx.noalias": True})
        t, ctx = T.int64(), T.int64()
        pos = T.match_buffer(var_pos, (T.int64(1),), "int32")
        qkv = T.match_buffer(var_qkv, (t, T.int64(q_dim + 2 * kv_dim)), dtype)
        cos = T.match_buffer(var_cos, (ctx, T.int64(half)), "float32")
        sin = T.match_buffer(var_sin, (ctx, T.int64(half)), "float32")
        qscale = T.match_buffer(var_qscale, (ctx,), "float32")
        q = T.match_buffer(var_q, (t, HQ, D), dtype)
        k = T.match_buffer(var_k, (t, HKV, ROW), "int8")
        v = T.match_buffer(var_v, (t, HKV, ROW), "int8")
        k_scales = T.decl_buffer((t, HKV, ROW // 4), "float32", data=k.data)
        v_scales = T.decl_buffer((t, HKV, ROW // 4), "float32", data=v.data)
        for i in T.parallel(t):
            row = T.decl_buffer((D,), "float32")
            top = T.decl_buffer((3,), "float32")
            split_row(qkv, cos, sin, qscale, pos, q, k, v, k_scales, v_scales, i, row, top)

    return rope_split


def rope_split_append_q8(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                         dtype: str) -> "T.PrimFunc":
    """rope_split_q8 that also copies the quantized k and v rows into the cache of `layer`
    at positions pos..pos+T-1 (causal passes; the cache is updated in place)."""
    half = head_dim // 2
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    L, D, HQ, HKV = T.int64(n_layers), T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)
    ROW = T.int64(kv_row("q8_0", head_dim))
    split_row = _kernel_parts(n_heads, n_kv_heads, head_dim, dtype)

    @T.prim_func(private=True)
    def rope_split_append(var_qkv: T.handle, var_cos: T.handle, var_sin: T.handle,
                          var_qscale: T.handle, var_pos: T.handle, var_kv: T.handle, layer: T.int64,
                          var_q: T.handle, var_k: T.handle, var_v: T.handle):
        T.func_attr({"tirx.noalias": True})
        t, ctx = T.int64(), T.int64()
        pos = T.match_buffer(var_pos, (T.int64(1),), "int32")
        qkv = T.match_buffer(var_qkv, (t, T.int64(q_dim + 2 * kv_dim)), dtype)
        cos = T.match_buffer(var_cos, (ctx, T.int64(half)), "float32")
        sin = T.match_buffer(var_sin, (ctx, T.int64(half)), "float32")
        qscale = T.match_buffer(var_qscale, (ctx,), "float32")
        kv = T.match_buffer(var_kv, (L, T.int64(2), HKV, ctx, ROW), "int8")
        q = T.match_buffer(var_q, (t, HQ, D), dtype)
        k = T.match_buffer(var_k, (t, HKV, ROW), "int8")
        v = T.match_buffer(var_v, (t, HKV, ROW), "int8")
        k_scales = T.decl_buffer((t, HKV, ROW // 4), "float32", data=k.data)
        v_scales = T.decl_buffer((t, HKV, ROW // 4), "float32", data=v.data)
        for i in T.parallel(t):
            row = T.decl_buffer((D,), "float32")
            top = T.decl_buffer((3,), "float32")
            split_row(qkv, cos, sin, qscale, pos, q, k, v, k_scales, v_scales, i, row, top)
            for h in range(HKV):
                for c in T.vectorized(ROW):
                    kv[layer, T.int64(0), h, at(pos, i), c] = k[i, h, c]
                    kv[layer, T.int64(1), h, at(pos, i), c] = v[i, h, c]

    return rope_split_append
