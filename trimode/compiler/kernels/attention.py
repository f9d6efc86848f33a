"""out[t, h] = softmax(q[t, h] . keys / sqrt(d)) . values over the shared cache and the block.

Query row t (absolute position pos + t) sees cache positions [0, pos) of its layer and the
block's own keys k_new[j] for j <= t (causal) or for every j (bidirectional). The block's K/V
come in as separate tensors, so a bidirectional (draft) pass never touches the cache. pos is
an int32 [1] tensor, read by the kernel: one compiled call (or CUDA graph) serves every position.
GQA: q head h reads kv head h // (n_heads / n_kv_heads). This is the CPU kernel; the CUDA one
(attention_cuda.py) has the same signature.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T


def attention_cpu(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  causal: bool) -> "T.PrimFunc":
    L, HQ, HKV, D = T.int64(n_layers), T.int64(n_heads), T.int64(n_kv_heads), T.int64(head_dim)
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim)

    @T.macro
    def online_softmax_step(score, best, total, mix):
        # Running max `best`, running sum `total`; mix[0] rescales what was accumulated so
        # far, mix[1] weighs the new value row.
        mix[0] = T.exp(best[0] - T.max(best[0], score[0]))
        mix[1] = T.exp(score[0] - T.max(best[0], score[0]))
        best[0] = T.max(best[0], score[0])
        total[0] = total[0] * mix[0] + mix[1]

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_kv: T.handle, layer: T.int64,
                  pos_buf: T.Buffer((T.int64(1),), "int32"),
                  var_k: T.handle, var_v: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        t, ctx = T.int64(), T.int64()
        q = T.match_buffer(var_q, (t, HQ, D), "float32")
        kv = T.match_buffer(var_kv, (L, T.int64(2), HKV, ctx, D), "float32")
        k_new = T.match_buffer(var_k, (t, HKV, D), "float32")
        v_new = T.match_buffer(var_v, (t, HKV, D), "float32")
        out = T.match_buffer(var_out, (t, HQ, D), "float32")
        for row in T.parallel(t * HQ):
            i = row // HQ
            h = row % HQ
            g = h // group
            acc = T.decl_buffer((D,), "float32")
            best = T.decl_buffer((1,), "float32")
            total = T.decl_buffer((1,), "float32")
            score = T.decl_buffer((1,), "float32")
            mix = T.decl_buffer((2,), "float32")
            best[0] = T.min_value("float32")
            total[0] = T.float32(0)
            for d in range(D):
                acc[d] = T.float32(0)
            for j in range(T.Cast("int64", pos_buf[0])):
                score[0] = T.float32(0)
                for d in range(D):
                    score[0] = score[0] + q[i, h, d] * kv[layer, 0, g, j, d]
                score[0] = score[0] * T.float32(scale)
                online_softmax_step(score, best, total, mix)
                for d in range(D):
                    acc[d] = acc[d] * mix[0] + mix[1] * kv[layer, 1, g, j, d]
            for j in range(i + 1 if causal else t):
                score[0] = T.float32(0)
                for d in range(D):
                    score[0] = score[0] + q[i, h, d] * k_new[j, g, d]
                score[0] = score[0] * T.float32(scale)
                online_softmax_step(score, best, total, mix)
                for d in range(D):
                    acc[d] = acc[d] * mix[0] + mix[1] * v_new[j, g, d]
            for d in range(D):
                out[i, h, d] = acc[d] / total[0]

    return attention
