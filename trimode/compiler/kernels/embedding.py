"""x[t, :] = dequantized row ids[t] of the Q8_0 embedding table (the table is gathered, never
dequantized as a whole). ids may be longer than x: the first T are used (a block entry reads
its tokens from a fixed-size device buffer)."""
from __future__ import annotations

from tvm.script import tirx as T

from trimode.model.weights import Q8_BLOCK



def q8_embedding(vocab: int, hidden: int, dtype: str) -> "T.PrimFunc":
    @T.prim_func(private=True, s_tir=True)
    def embed(var_ids: T.handle, q: T.Buffer((T.int64(vocab), T.int64(hidden)), "int8"),
              scale: T.Buffer((T.int64(vocab), T.int64(hidden // Q8_BLOCK)), "float16"),
              var_x: T.handle):
        t, n_ids = T.int64(), T.int64()
        ids = T.match_buffer(var_ids, (n_ids,), "int32")
        x = T.match_buffer(var_x, (t, T.int64(hidden)), dtype)
        for i, c in T.grid(t, T.int64(hidden)):
            with T.sblock("embed"):
                vi, vc = T.axis.remap("SS", [i, c])
                x[vi, vc] = T.Cast(dtype, T.Cast("float32", q[ids[vi], vc])
                                   * T.Cast("float32", scale[ids[vi], vc // Q8_BLOCK]))

    return embed


def float_embedding(vocab: int, hidden: int, dtype: str) -> "T.PrimFunc":
    @T.prim_func(private=True, s_tir=True)
    def embed(var_ids: T.handle, table: T.Buffer((T.int64(vocab), T.int64(hidden)), dtype),
              var_x: T.handle):
        t, n_ids = T.int64(), T.int64()
        ids = T.match_buffer(var_ids, (n_ids,), "int32")
        x = T.match_buffer(var_x, (t, T.int64(hidden)), dtype)
        for i, c in T.grid(t, T.int64(hidden)):
            with T.sblock("embed"):
                vi, vc = T.axis.remap("SS", [i, c])
                x[vi, vc] = table[ids[vi], vc]

    return embed
