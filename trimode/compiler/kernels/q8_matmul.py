"""y[m, n] = sum_k x[m, k] * q[n, k] * scale[n, k // 32]: the Q8_0 dequant-matmul.

Weights stay 8-bit in memory (int8 values, fp16 scale per 32) and are dequantized inside the
kernel. This is the CPU loop nest; the CUDA kernels are in q8_matmul_cuda.py.
"""
from __future__ import annotations

from tvm.script import tirx as T

from trimode.model.weights import Q8_BLOCK

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
