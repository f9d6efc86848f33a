"""Splits the fused qkv projection into q, k, v and applies rotary embeddings; causal passes
also append the block's K/V to the shared cache in the same kernel.

Rotate-half (NEOX) pairing i <-> i + d/2 at absolute position pos + t, pos read from an int32
[1] device tensor (so one CUDA graph serves every position). cos/sin come from
host-computed float64 YaRN tables [ctx, d/2]; the long-context query scale [ctx] multiplies q
only (MODEL.md section 1). fp32 arithmetic; q is stored in the activation dtype, k and v in
the cache's (kv_dtype), so the block's own keys are seen at the precision the cache keeps.

Each kernel is one loop over (row, head slot, d) with the slots q heads, then k heads, then v
heads: one launch per layer on a GPU where three blocks (and a separate append) were four.
The cache is [layers, 2, kv_heads, ctx, head_dim], written at positions pos..pos+T-1.
"""
from __future__ import annotations

from tvm.script import tirx as T


def at(pos, row):
    """Absolute position of block row `row` (inlined: a let inside a block breaks its regions)."""
    return T.Cast("int64", pos[0]) + row


def rotated(qkv, cos, sin, pos, row, col, d, half):
    """Element d of the head starting at column `col` of qkv, rotated to row's position (fp32)."""
    return (T.Cast("float32", qkv[row, col + d]) * cos[at(pos, row), d % half]
            + T.if_then_else(d < half, -T.Cast("float32", qkv[row, col + d + half]),
                             T.Cast("float32", qkv[row, col + d - half])) * sin[at(pos, row), d % half])


def _split_heads(n_heads: int, n_kv_heads: int, head_dim: int, dtype: str, kv_dtype: str):
    """The body both kernels share: element vd of head slot vh of row vi into q, k or v."""
    half = head_dim // 2
    D, HQ, HKV = T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)

    @T.macro
    def split_heads(qkv, cos, sin, qscale, pos, q, k, v, vi, vh, vd):
        if vh < HQ:
            q[vi, vh, vd] = T.Cast(dtype, qscale[at(pos, vi)]
                                   * rotated(qkv, cos, sin, pos, vi, vh * D, vd, half))
        elif vh < HQ + HKV:
            k[vi, vh - HQ, vd] = T.Cast(kv_dtype, rotated(qkv, cos, sin, pos, vi, vh * D, vd, half))
        else:
            v[vi, vh - HQ - HKV, vd] = T.Cast(kv_dtype, qkv[vi, vh * D + vd])

    return split_heads


def rope_split(n_heads: int, n_kv_heads: int, head_dim: int, dtype: str,
               kv_dtype: str) -> "T.PrimFunc":
    """q, k, v of a block that leaves the cache alone (bidirectional draft)."""
    half = head_dim // 2
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    D, HQ, HKV = T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)
    split_heads = _split_heads(n_heads, n_kv_heads, head_dim, dtype, kv_dtype)

    @T.prim_func(private=True, s_tir=True)
    def rope_split(var_qkv: T.handle, var_cos: T.handle, var_sin: T.handle, var_qscale: T.handle,
                   var_pos: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle):
        t, ctx = T.int64(), T.int64()
        pos = T.match_buffer(var_pos, (T.int64(1),), "int32")
        qkv = T.match_buffer(var_qkv, (t, T.int64(q_dim + 2 * kv_dim)), dtype)
        cos = T.match_buffer(var_cos, (ctx, T.int64(half)), "float32")
        sin = T.match_buffer(var_sin, (ctx, T.int64(half)), "float32")
        qscale = T.match_buffer(var_qscale, (ctx,), "float32")
        q = T.match_buffer(var_q, (t, HQ, D), dtype)
        k = T.match_buffer(var_k, (t, HKV, D), kv_dtype)
        v = T.match_buffer(var_v, (t, HKV, D), kv_dtype)
        for i, h, d in T.grid(t, HQ + 2 * HKV, D):
            with T.sblock("rope_split"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                T.reads(qkv[vi, 0:q_dim + 2 * kv_dim], cos[at(pos, vi), 0:half],
                        sin[at(pos, vi), 0:half], qscale[at(pos, vi)], pos[0])
                T.writes(q[vi, 0:HQ, vd], k[vi, 0:HKV, vd], v[vi, 0:HKV, vd])
                split_heads(qkv, cos, sin, qscale, pos, q, k, v, vi, vh, vd)

    return rope_split


def rope_split_append(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                      dtype: str, kv_dtype: str) -> "T.PrimFunc":
    """rope_split that also writes k and v into the cache of `layer` (causal passes; the cache
    is updated in place)."""
    half = head_dim // 2
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    L, D, HQ, HKV = T.int64(n_layers), T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)
    split_heads = _split_heads(n_heads, n_kv_heads, head_dim, dtype, kv_dtype)

    @T.prim_func(private=True, s_tir=True)
    def rope_split_append(var_qkv: T.handle, var_cos: T.handle, var_sin: T.handle,
                          var_qscale: T.handle, var_pos: T.handle, var_kv: T.handle, layer: T.int64,
                          var_q: T.handle, var_k: T.handle, var_v: T.handle):
        t, ctx = T.int64(), T.int64()
        pos = T.match_buffer(var_pos, (T.int64(1),), "int32")
        qkv = T.match_buffer(var_qkv, (t, T.int64(q_dim + 2 * kv_dim)), dtype)
        cos = T.match_buffer(var_cos, (ctx, T.int64(half)), "float32")
        sin = T.match_buffer(var_sin, (ctx, T.int64(half)), "float32")
        qscale = T.match_buffer(var_qscale, (ctx,), "float32")
        kv = T.match_buffer(var_kv, (L, T.int64(2), HKV, ctx, D), kv_dtype)
        q = T.match_buffer(var_q, (t, HQ, D), dtype)
        k = T.match_buffer(var_k, (t, HKV, D), kv_dtype)
        v = T.match_buffer(var_v, (t, HKV, D), kv_dtype)
        for i, h, d in T.grid(t, HQ + 2 * HKV, D):
            with T.sblock("rope_split_append"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                T.reads(qkv[vi, 0:q_dim + 2 * kv_dim], cos[at(pos, vi), 0:half],
                        sin[at(pos, vi), 0:half], qscale[at(pos, vi)], pos[0])
                T.writes(q[vi, 0:HQ, vd], k[vi, 0:HKV, vd], v[vi, 0:HKV, vd],
                         kv[layer, 0:2, 0:HKV, at(pos, vi), vd])
                split_heads(qkv, cos, sin, qscale, pos, q, k, v, vi, vh, vd)
                if vh >= HQ + HKV:
                    kv[layer, T.int64(1), vh - HQ - HKV, at(pos, vi), vd] = v[vi, vh - HQ - HKV, vd]
                elif vh >= HQ:
                    kv[layer, T.int64(0), vh - HQ, at(pos, vi), vd] = k[vi, vh - HQ, vd]

    return rope_split_append
