"""Splits the fused qkv projection into q, k, v and applies rotary embeddings.

Rotate-half (NEOX) pairing i <-> i + d/2 at absolute position pos + t, pos read from an int32
[1] device tensor (so one CUDA graph serves every position). cos/sin come from
host-computed float64 YaRN tables [ctx, d/2]; the long-context query scale [ctx] multiplies q
only (MODEL.md section 1). fp32 arithmetic, stored in the activation dtype.
"""
from __future__ import annotations

from tvm.script import tirx as T


def at(pos, row):
    """Absolute position of block row `row` (inlined: a let inside a block breaks its regions)."""
    return T.Cast("int64", pos[0]) + row


def rope_split(n_heads: int, n_kv_heads: int, head_dim: int, dtype: str) -> "T.PrimFunc":
    half = head_dim // 2
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    D, HQ, HKV = T.int64(head_dim), T.int64(n_heads), T.int64(n_kv_heads)

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
        k = T.match_buffer(var_k, (t, HKV, D), dtype)
        v = T.match_buffer(var_v, (t, HKV, D), dtype)
        for i, h, d in T.grid(t, HQ, D):
            with T.sblock("rope_q"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                q[vi, vh, vd] = T.Cast(dtype, qscale[at(pos, vi)] * (
                    T.Cast("float32", qkv[vi, vh * D + vd]) * cos[at(pos, vi), vd % half]
                    + T.if_then_else(vd < half, -T.Cast("float32", qkv[vi, vh * D + vd + half]),
                                     T.Cast("float32", qkv[vi, vh * D + vd - half]))
                    * sin[at(pos, vi), vd % half]))
        for i, h, d in T.grid(t, HKV, D):
            with T.sblock("rope_k"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                k[vi, vh, vd] = T.Cast(dtype, (
                    T.Cast("float32", qkv[vi, q_dim + vh * D + vd]) * cos[at(pos, vi), vd % half]
                    + T.if_then_else(vd < half, -T.Cast("float32", qkv[vi, q_dim + vh * D + vd + half]),
                                     T.Cast("float32", qkv[vi, q_dim + vh * D + vd - half]))
                    * sin[at(pos, vi), vd % half]))
        for i, h, d in T.grid(t, HKV, D):
            with T.sblock("split_v"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                v[vi, vh, vd] = qkv[vi, q_dim + kv_dim + vh * D + vd]

    return rope_split
