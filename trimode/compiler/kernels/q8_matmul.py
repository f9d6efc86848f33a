"""y[m, n] = sum_k x[m, k] * q[n, k] * scale[n, k // 32]: the Q8_0 dequant-matmul.

Weights stay 8-bit in memory (int8 values, fp16 scale per 32) and are dequantized inside the
kernel. This is the CPU loop nest; the CUDA kernels are in q8_matmul_cuda.py.
"""
from __future__ import annotations

import os

from tvm.script import tirx as T

from trimode.model.weights import Q8_BLOCK

CPU_LANES = 8  # fp32 lanes of one AVX2 register: the reduction is kept as 8 partial sums
# Below this much work (weights x rows) a matmul runs on one thread: waking the pool costs
# more than the work (and on a loaded machine a descheduled worker stalls the whole step).
CPU_PARALLEL_MIN_WORK = 1 << 16
# Rows of x multiplied by one converted weight vector (2 x ROW_TILE accumulator registers of
# AVX2's 16).
ROW_TILE = 4
# Rows a block or prefill pass has at least in practice (a verify of 1 row is rare).
TYPICAL_BLOCK_ROWS = 8
# Features one parallel task takes at most, all of them against a row tile before the next
# tile: the tile's x (ROW_TILE x K floats) is then read from L1 once per feature instead of
# streaming from L2 (prefill of 128 rows 1.3-1.45x faster single-threaded, BENCHMARKS.md).
MAX_FEATURE_BLOCK = 64


def feature_block(n: int, rows: str) -> int:
    """Features per task: the largest power of two <= MAX_FEATURE_BLOCK dividing n that still
    leaves two tasks per core; 1 for decode (its one row is read once anyway)."""
    if rows == "one":
        return 1
    tasks = 2 * (os.cpu_count() or 1)
    block = MAX_FEATURE_BLOCK
    while block > 1 and (n % block or n // block < tasks):
        block //= 2
    return block


def q8_matmul_cpu(n: int, k: int, rows: str) -> "T.PrimFunc":
    """fp32 activations, any m. int8 weights are converted to float in registers, 8 at a
    time; each converted vector is multiplied into ROW_TILE rows of x at once (two ROW_TILE x
    CPU_LANES accumulator sets, per 32-value block and in total, in registers), each block's
    sum is scaled once by its fp16 scale, and nothing dequantized is written to memory. Rows
    past the last full tile (the one row of decode) are one smaller tile. Each parallel task
    runs feature_block() features through every row tile. `rows` ("one", "block", "many")
    sets that block and how much work the parallel threshold expects."""
    assert k % Q8_BLOCK == 0 and k % CPU_LANES == 0
    n_blocks, per_block = k // Q8_BLOCK, Q8_BLOCK // CPU_LANES
    rt = ROW_TILE
    assert rt == 4  # the remainder tiles below are written for it
    work = n * k * (1 if rows == "one" else TYPICAL_BLOCK_ROWS)
    rows_loop = T.parallel if work >= CPU_PARALLEL_MIN_WORK else T.serial
    fb = feature_block(n, rows)

    @T.macro
    def rows_times_feature(x, q, scale, y, j, first, count, acc, blk, w):
        for r in T.unroll(count):
            for i in T.vectorized(CPU_LANES):
                acc[r, i] = T.float32(0)
        for b in range(n_blocks):
            for r in T.unroll(count):
                for i in T.vectorized(CPU_LANES):
                    blk[r, i] = T.float32(0)
            for c in T.unroll(per_block):
                for i in T.vectorized(CPU_LANES):
                    w[i] = T.Cast("float32", q[j, b * Q8_BLOCK + c * CPU_LANES + i])
                for r in T.unroll(count):
                    for i in T.vectorized(CPU_LANES):
                        blk[r, i] = blk[r, i] + x[first + r, b * Q8_BLOCK + c * CPU_LANES + i] * w[i]
            for r in T.unroll(count):
                for i in T.vectorized(CPU_LANES):
                    acc[r, i] = acc[r, i] + blk[r, i] * T.Cast("float32", scale[j, b])
        for r in T.unroll(count):
            y[first + r, j] = T.float32(0)
            for i in T.unroll(CPU_LANES):
                y[first + r, j] = y[first + r, j] + acc[r, i]

    @T.prim_func(private=True)
    def q8_matmul(var_x: T.handle, q: T.Buffer((n, k), "int8"),
                  scale: T.Buffer((n, n_blocks), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for jo in rows_loop(n // fb):
            acc = T.decl_buffer((rt, CPU_LANES), "float32")
            blk = T.decl_buffer((rt, CPU_LANES), "float32")
            w = T.decl_buffer((CPU_LANES,), "float32")
            for ro in range(m // rt):
                for ji in range(fb):
                    rows_times_feature(x, q, scale, y, jo * fb + ji, ro * rt, rt, acc, blk, w)
            # the rows past the last full tile as one smaller tile (a verify of 3 rows is one
            # pass over the weights, not three)
            for ji in range(fb):
                if m % rt == 3:
                    rows_times_feature(x, q, scale, y, jo * fb + ji, m - 3, 3, acc, blk, w)
                elif m % rt == 2:
                    rows_times_feature(x, q, scale, y, jo * fb + ji, m - 2, 2, acc, blk, w)
                elif m % rt == 1:
                    rows_times_feature(x, q, scale, y, jo * fb + ji, m - 1, 1, acc, blk, w)

    return q8_matmul
