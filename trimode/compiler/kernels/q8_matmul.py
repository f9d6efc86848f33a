"""y[m, n] = sum_k x[m, k] * q[n, k] * scale[n, k // 32]: the Q8_0 dequant-matmul.

Weights stay 8-bit in memory (int8 values, fp16 scale per 32) and are dequantized inside the
kernel. Two factories: a hand-scheduled CPU loop nest, and the plain dequant + matmul blocks
that dlight's GPU rules schedule (the CUDA fallback when no tuned kernel applies).
"""
from __future__ import annotations

from tvm.script import tirx as T

Q8_BLOCK = 32
CPU_LANES = 8  # fp32 lanes of one AVX2 register: the reduction is kept as 8 partial sums
# Below this many weights a matmul runs on one thread: waking the pool costs more than the
# work (and on a loaded machine a descheduled worker stalls the whole step).
CPU_PARALLEL_MIN_WEIGHTS = 1 << 20


def q8_matmul_cpu(n: int, k: int) -> "T.PrimFunc":
    """fp32 activations, any number of rows m. Each output feature's weight row is
    dequantized once into a local buffer and reused for every row of x."""
    assert k % Q8_BLOCK == 0 and k % CPU_LANES == 0
    n_blocks, n_chunks = k // Q8_BLOCK, k // CPU_LANES
    rows_loop = T.parallel if n * k >= CPU_PARALLEL_MIN_WEIGHTS else T.serial

    @T.prim_func(private=True)
    def q8_matmul(var_x: T.handle, q: T.Buffer((n, k), "int8"),
                  scale: T.Buffer((n, n_blocks), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for j in rows_loop(n):
            w = T.decl_buffer((k,), "float32")
            acc = T.decl_buffer((CPU_LANES,), "float32")
            for b in range(n_blocks):
                for i in T.vectorized(Q8_BLOCK):
                    w[b * Q8_BLOCK + i] = T.Cast("float32", q[j, b * Q8_BLOCK + i]) * T.Cast(
                        "float32", scale[j, b])
            for r in range(m):
                for i in T.vectorized(CPU_LANES):
                    acc[i] = T.float32(0)
                for c in range(n_chunks):
                    for i in T.vectorized(CPU_LANES):
                        acc[i] = acc[i] + x[r, c * CPU_LANES + i] * w[c * CPU_LANES + i]
                y[r, j] = T.float32(0)
                for i in range(CPU_LANES):
                    y[r, j] = y[r, j] + acc[i]

    return q8_matmul


def q8_matmul_blocks(n: int, k: int, dtype: str, m: int | None = None) -> "T.PrimFunc":
    """Unscheduled dequant + matmul blocks with fp32 accumulation, for dlight (GPU).
    m=None leaves the row count symbolic."""
    n_blocks = k // Q8_BLOCK

    @T.prim_func(private=True, s_tir=True)
    def q8_matmul(var_x: T.handle, q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                  scale: T.Buffer((T.int64(n), T.int64(n_blocks)), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64() if m is None else T.int64(m)
        x = T.match_buffer(var_x, (rows, T.int64(k)), dtype)
        y = T.match_buffer(var_y, (rows, T.int64(n)), dtype)
        w = T.sblock_alloc_buffer((T.int64(n), T.int64(k)), dtype)
        acc = T.sblock_alloc_buffer((rows, T.int64(n)), "float32")
        for j, c in T.grid(T.int64(n), T.int64(k)):
            with T.sblock("dequant"):
                vj, vc = T.axis.remap("SS", [j, c])
                w[vj, vc] = T.Cast(dtype, q[vj, vc]) * T.Cast(dtype, scale[vj, vc // Q8_BLOCK])
        for r, j, c in T.grid(rows, T.int64(n), T.int64(k)):
            with T.sblock("matmul"):
                vr, vj, vc = T.axis.remap("SSR", [r, j, c])
                with T.init():
                    acc[vr, vj] = T.float32(0)
                acc[vr, vj] = acc[vr, vj] + T.Cast("float32", x[vr, vc]) * T.Cast("float32", w[vj, vc])
        for r, j in T.grid(rows, T.int64(n)):
            with T.sblock("cast"):
                vr, vj = T.axis.remap("SS", [r, j])
                y[vr, vj] = T.Cast(dtype, acc[vr, vj])

    return q8_matmul
