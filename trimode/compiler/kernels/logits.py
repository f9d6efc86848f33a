"""Small kernels around the output head: the last row of a prefill, and per-row argmax with
its softmax probability (so a decode step copies T ints and T floats to the host, not T x V)."""
from __future__ import annotations

from tvm.script import tirx as T

from trimode.compiler.kernels.cpu_math import softmax_weight

LANES = 16  # fp32 lanes of one AVX-512 register (two AVX2 ones)


def last_row(hidden: int, dtype: str) -> "T.PrimFunc":
    @T.prim_func(private=True, s_tir=True)
    def last_row(var_x: T.handle, var_y: T.handle):
        t = T.int64()
        x = T.match_buffer(var_x, (t, T.int64(hidden)), dtype)
        y = T.match_buffer(var_y, (T.int64(1), T.int64(hidden)), dtype)
        for i, c in T.grid(T.int64(1), T.int64(hidden)):
            with T.sblock("last_row"):
                vi, vc = T.axis.remap("SS", [i, c])
                y[vi, vc] = x[t - 1, vc]

    return last_row


def argmax_prob(vocab: int) -> "T.PrimFunc":
    """CPU: argmax[t] = the first index of row t's maximum; prob[t] = 1 / sum_j exp(logits[t, j]
    - max). Two passes over each row, LANES values at a time: the maximum, then the first index
    holding it with the softmax's sum beside it (the scalar three passes with libm's expf that
    this replaced took 13 us a row at vocab 4096, 420 at 131072). The CUDA kernel is
    argmax_cuda.py."""
    V = T.int64(vocab)
    vectors = vocab // LANES  # the last vocab % LANES values one by one

    # s_tir with a root block: Relax's reshape detection (RewriteDataflowReshape) inspects every
    # one-input kernel and expects one
    @T.prim_func(private=True, s_tir=True)
    def argmax_prob(var_logits: T.handle, var_argmax: T.handle, var_prob: T.handle):
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        logits = T.match_buffer(var_logits, (t, V), "float32")
        argmax = T.match_buffer(var_argmax, (t,), "int32")
        prob = T.match_buffer(var_prob, (t,), "float32")
        with T.sblock("root"):
            T.reads(logits[0:t, 0:vocab])
            T.writes(argmax[0:t], prob[0:t])
            lane_max = T.decl_buffer((LANES,), "float32")
            lane_first = T.decl_buffer((LANES,), "int32")
            lane_sum = T.decl_buffer((LANES,), "float32")
            best = T.decl_buffer((1,), "float32")
            first = T.decl_buffer((1,), "int32")
            total = T.decl_buffer((1,), "float32")
            for i in range(t):
                for c in T.vectorized(LANES):
                    lane_max[c] = T.min_value("float32")
                for j in range(vectors):
                    for c in T.vectorized(LANES):
                        lane_max[c] = T.max(lane_max[c], logits[i, j * LANES + c])
                best[0] = lane_max[0]
                for c in range(1, LANES):
                    best[0] = T.max(best[0], lane_max[c])
                for j in range(vectors * LANES, vocab):
                    best[0] = T.max(best[0], logits[i, j])
                for c in T.vectorized(LANES):
                    lane_first[c] = T.int32(vocab)
                    lane_sum[c] = T.float32(0)
                for j in range(vectors):
                    for c in T.vectorized(LANES):
                        lane_first[c] = T.min(lane_first[c], T.Select(
                            logits[i, j * LANES + c] == best[0], T.Cast("int32", j * LANES + c), T.int32(vocab)))
                        lane_sum[c] = lane_sum[c] + softmax_weight(logits[i, j * LANES + c] - best[0])
                first[0] = lane_first[0]
                total[0] = lane_sum[0]
                for c in range(1, LANES):
                    first[0] = T.min(first[0], lane_first[c])
                    total[0] = total[0] + lane_sum[c]
                for j in range(vectors * LANES, vocab):
                    first[0] = T.min(first[0], T.Select(logits[i, j] == best[0], T.Cast("int32", j), T.int32(vocab)))
                    total[0] = total[0] + softmax_weight(logits[i, j] - best[0])
                argmax[i] = first[0]
                prob[i] = T.float32(1) / total[0]

    return argmax_prob
