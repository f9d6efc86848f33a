"""Small kernels around the output head: the last row of a prefill, and per-row argmax with
its softmax probability (so a decode step copies T ints and T floats to the host, not T x V)."""
from __future__ import annotations

from tvm.script import tirx as T


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
    """argmax[t] = first index of the row maximum; prob[t] = 1 / sum_j exp(logits[t, j] - max)."""
    V = T.int64(vocab)

    @T.prim_func(private=True, s_tir=True)
    def argmax_prob(var_logits: T.handle, var_argmax: T.handle, var_prob: T.handle):
        t = T.int64()
        logits = T.match_buffer(var_logits, (t, V), "float32")
        argmax = T.match_buffer(var_argmax, (t,), "int32")
        prob = T.match_buffer(var_prob, (t,), "float32")
        row_max = T.sblock_alloc_buffer((t,), "float32")
        first_max = T.sblock_alloc_buffer((t,), "int32")
        total = T.sblock_alloc_buffer((t,), "float32")
        for i, j in T.grid(t, V):
            with T.sblock("row_max"):
                vi, vj = T.axis.remap("SR", [i, j])
                with T.init():
                    row_max[vi] = T.min_value("float32")
                row_max[vi] = T.max(row_max[vi], logits[vi, vj])
        for i, j in T.grid(t, V):
            with T.sblock("first_max"):
                vi, vj = T.axis.remap("SR", [i, j])
                with T.init():
                    first_max[vi] = T.max_value("int32")  # min's identity, so dlight sees a reducer
                first_max[vi] = T.min(first_max[vi], T.Select(
                    logits[vi, vj] == row_max[vi], T.Cast("int32", vj), T.int32(vocab)))
        for i, j in T.grid(t, V):
            with T.sblock("sum_exp"):
                vi, vj = T.axis.remap("SR", [i, j])
                with T.init():
                    total[vi] = T.float32(0)
                total[vi] = total[vi] + T.exp(logits[vi, vj] - row_max[vi])
        for i in range(t):
            with T.sblock("write"):
                vi = T.axis.remap("S", [i])
                argmax[vi] = first_max[vi]
                prob[vi] = T.float32(1) / total[vi]

    return argmax_prob
