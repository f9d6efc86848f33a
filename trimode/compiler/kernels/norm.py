"""y = x / sqrt(mean(x^2) + eps) * w, the mean accumulated in fp32 whatever the activation dtype."""
from __future__ import annotations

from tvm.script import tirx as T


def rms_norm(hidden: int, eps: float, dtype: str) -> "T.PrimFunc":
    @T.prim_func(private=True, s_tir=True)
    def rms_norm(var_x: T.handle, w: T.Buffer((T.int64(hidden),), "float32"), var_y: T.handle):
        t = T.int64()
        x = T.match_buffer(var_x, (t, T.int64(hidden)), dtype)
        y = T.match_buffer(var_y, (t, T.int64(hidden)), dtype)
        sum_sq = T.sblock_alloc_buffer((t,), "float32")
        for i, c in T.grid(t, T.int64(hidden)):
            with T.sblock("sum_sq"):
                vi, vc = T.axis.remap("SR", [i, c])
                with T.init():
                    sum_sq[vi] = T.float32(0)
                sum_sq[vi] = sum_sq[vi] + T.Cast("float32", x[vi, vc]) * T.Cast("float32", x[vi, vc])
        for i, c in T.grid(t, T.int64(hidden)):
            with T.sblock("normalize"):
                vi, vc = T.axis.remap("SS", [i, c])
                y[vi, vc] = T.Cast(dtype, T.Cast("float32", x[vi, vc])
                                   * T.rsqrt(sum_sq[vi] / T.float32(hidden) + T.float32(eps)) * w[vc])

    return rms_norm


def add_rms_norm(hidden: int, eps: float, dtype: str) -> "T.PrimFunc":
    """The residual stream after a sublayer, s = x + delta, and the next norm of it, in one
    kernel (two launches fewer per layer). s is rounded to the activation dtype before the
    norm reads it, exactly as a separate add would store it."""

    @T.prim_func(private=True, s_tir=True)
    def add_rms_norm(var_x: T.handle, var_delta: T.handle, w: T.Buffer((T.int64(hidden),), "float32"),
                     var_s: T.handle, var_y: T.handle):
        t = T.int64()
        x = T.match_buffer(var_x, (t, T.int64(hidden)), dtype)
        delta = T.match_buffer(var_delta, (t, T.int64(hidden)), dtype)
        s = T.match_buffer(var_s, (t, T.int64(hidden)), dtype)
        y = T.match_buffer(var_y, (t, T.int64(hidden)), dtype)
        sum_sq = T.sblock_alloc_buffer((t,), "float32")
        for i, c in T.grid(t, T.int64(hidden)):
            with T.sblock("sum_sq"):
                vi, vc = T.axis.remap("SR", [i, c])
                with T.init():
                    sum_sq[vi] = T.float32(0)
                sum_sq[vi] = sum_sq[vi] + T.Cast("float32", x[vi, vc] + delta[vi, vc]) \
                    * T.Cast("float32", x[vi, vc] + delta[vi, vc])
        for i, c in T.grid(t, T.int64(hidden)):
            with T.sblock("normalize"):
                vi, vc = T.axis.remap("SS", [i, c])
                s[vi, vc] = x[vi, vc] + delta[vi, vc]
                y[vi, vc] = T.Cast(dtype, T.Cast("float32", x[vi, vc] + delta[vi, vc])
                                   * T.rsqrt(sum_sq[vi] / T.float32(hidden) + T.float32(eps)) * w[vc])

    return add_rms_norm
