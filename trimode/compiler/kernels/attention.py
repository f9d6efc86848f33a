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


# Keys per tile: the scores of a tile are computed first, then the running softmax is
# rescaled once per tile (not once per key) and the tile's values are summed, vectorized.
KEY_TILE = 32
LANES = 8  # fp32 lanes of one AVX2 register


def attention_cpu(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  causal: bool) -> "T.PrimFunc":
    L, HQ, HKV, D = T.int64(n_layers), T.int64(n_heads), T.int64(n_kv_heads), T.int64(head_dim)
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    lanes = LANES if head_dim % LANES == 0 else 1
    chunks = head_dim // lanes

    @T.macro
    def keys_in_tiles(keys, values, n_keys, qs, acc, scores, part, best, total, rescale):
        # keys/values: [n, D] views; n_keys of them. best/total: the running softmax.
        for jt in range((n_keys + KEY_TILE - 1) // KEY_TILE):
            size = T.min(n_keys - jt * KEY_TILE, KEY_TILE)
            rescale[0] = best[0]
            for jj in range(size):
                for c in T.vectorized(lanes):
                    part[c] = T.float32(0)
                for b in range(chunks):
                    for c in T.vectorized(lanes):
                        part[c] = part[c] + qs[b * lanes + c] * keys[jt * KEY_TILE + jj, b * lanes + c]
                scores[jj] = T.float32(0)
                for c in T.unroll(lanes):
                    scores[jj] = scores[jj] + part[c]
                rescale[0] = T.max(rescale[0], scores[jj])
            # rescale[0] holds the new running max; fold the old one into what was summed.
            total[0] = total[0] * T.exp(best[0] - rescale[0])
            for d in T.vectorized(D):
                acc[d] = acc[d] * T.exp(best[0] - rescale[0])
            best[0] = rescale[0]
            for jj in range(size):
                scores[jj] = T.exp(scores[jj] - best[0])
                total[0] = total[0] + scores[jj]
                for d in T.vectorized(D):
                    acc[d] = acc[d] + scores[jj] * values[jt * KEY_TILE + jj, d]

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
            # This head's keys and values: the cache's [0, pos) and the block's own.
            cache_k = T.decl_buffer((ctx, D), "float32", data=kv.data,
                                    elem_offset=((layer * 2 + 0) * HKV + g) * ctx * D)
            cache_v = T.decl_buffer((ctx, D), "float32", data=kv.data,
                                    elem_offset=((layer * 2 + 1) * HKV + g) * ctx * D)
            block_k = T.decl_buffer((t, D), "float32", data=k_new.data, elem_offset=g * D,
                                    strides=(HKV * D, T.int64(1)))
            block_v = T.decl_buffer((t, D), "float32", data=v_new.data, elem_offset=g * D,
                                    strides=(HKV * D, T.int64(1)))
            qs = T.decl_buffer((D,), "float32")
            acc = T.decl_buffer((D,), "float32")
            scores = T.decl_buffer((KEY_TILE,), "float32")
            part = T.decl_buffer((lanes,), "float32")
            best = T.decl_buffer((1,), "float32")
            total = T.decl_buffer((1,), "float32")
            rescale = T.decl_buffer((1,), "float32")
            for d in T.vectorized(D):
                qs[d] = q[i, h, d] * T.float32(scale)
                acc[d] = T.float32(0)
            best[0] = T.float32(-3.0e38)
            total[0] = T.float32(0)
            keys_in_tiles(cache_k, cache_v, T.Cast("int64", pos_buf[0]), qs, acc, scores, part,
                          best, total, rescale)
            keys_in_tiles(block_k, block_v, i + 1 if causal else t, qs, acc, scores, part,
                          best, total, rescale)
            for d in T.vectorized(D):
                out[i, h, d] = acc[d] / total[0]

    return attention
