"""Writes a block's K/V into the shared cache [layers, 2, kv_heads, ctx, head_dim] at
positions pos..pos+T-1 of one layer, in place (causal passes only). pos is an int32 [1]
device tensor, so one compiled call (or CUDA graph) serves every position."""
from __future__ import annotations

from tvm.script import tirx as T

from trimode.compiler.kernels.rope import at


def kv_append(n_layers: int, n_kv_heads: int, head_dim: int, dtype: str) -> "T.PrimFunc":
    L, HKV, D = T.int64(n_layers), T.int64(n_kv_heads), T.int64(head_dim)

    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_kv: T.handle, var_k: T.handle, var_v: T.handle, layer: T.int64,
                  var_pos: T.handle):
        t, ctx = T.int64(), T.int64()
        kv = T.match_buffer(var_kv, (L, T.int64(2), HKV, ctx, D), dtype)
        k = T.match_buffer(var_k, (t, HKV, D), dtype)
        v = T.match_buffer(var_v, (t, HKV, D), dtype)
        pos = T.match_buffer(var_pos, (T.int64(1),), "int32")
        for i, h, d in T.grid(t, HKV, D):
            with T.sblock("append"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                kv[layer, T.int64(0), vh, at(pos, vi), vd] = k[vi, vh, vd]
                kv[layer, T.int64(1), vh, at(pos, vi), vd] = v[vi, vh, vd]

    return kv_append
