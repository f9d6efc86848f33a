"""The int8 Q8_0 matmul of block and prefill passes on Intel AMX (Sapphire Rapids on): the same
arithmetic as q8_matmul.py's vpdpbusd kernel, its block sums made by the tile unit.

One AMX instruction (tdpbsud) multiplies a tile of 16 rows' quantized activations by one pack
(16 features) of a Q8_0 block, 16 x 16 x 32 products: 128 vpdpbusd. The weights need no new
layout: a block of a pack as pack_for_int8_dot lays it out (8 groups of 16 features x 4
inputs, 512 bytes) is the instruction's second tile as it stands, its bytes unsigned and the
activations' signed. Each block's int32 sums are stored to a scratch tile and scaled into fp32
accumulators with AVX-512, exactly as the vpdpbusd kernel scales its own (offset taken out,
then sums x (weight scale x row scale)): a row's result is bit for bit the same whichever
kernel made it, so a pass here and a decode step on the vector kernel agree (greedy
self-speculation stays AR's).

Each Q8_0 block has its own scales, so every block's sums go through memory once, and that
bounds the kernel: built without the scaling, it takes about 2/5 of the vpdpbusd kernel's time
(the 3B's qkv at 128 rows), without the tile instructions about 1/4, and the two do not
overlap (making the next pair of blocks' sums while this pair is scaled measured the same).
So 1.15-1.5x the vpdpbusd kernel at 8-128 rows (BENCHMARKS.md).
"""
from __future__ import annotations

from tvm.script import tirx as T

from trimode.compiler.kernels.q8_matmul import (F, int8_matmul_func, output_store, packed_matmul, packs_per_task,
                                               scaled_in)
from trimode.model.weights import INT8_DOT_GROUP, Q8_BLOCK, packed_shape

TILE_ROWS = 16  # rows of a tile (the unit's most): of activations, and of their sums
HALF_ROWS = TILE_ROWS // 2  # an accumulator array's rows: 512 bytes, under TVM's 1 KB stack limit
GROUPS = Q8_BLOCK // INT8_DOT_GROUP  # a weight tile's rows: a block's groups of 4 inputs
# The kernel's tiles: sums, activations and weights of an even block and of an odd one.
SUMS, ROWS, WEIGHTS = (0, 1), (2, 3), (4, 5)
# The scratch a task works in, int32: two blocks' stored sums, then the 64-byte tile config.
SUMS_WORDS = TILE_ROWS * F
CONFIG_WORD = 2 * SUMS_WORDS
# Rows from which the tiles pay: at 4 (the CPU's default self-speculation block) the vpdpbusd
# kernel is as fast or faster (the 3B's matmuls 0.7-0.98x on tiles), at 8 the tiles are
# 1.1-1.5x faster (BENCHMARKS.md).
AMX_MIN_ROWS = 8
MATTR = ["+amx-tile", "+amx-int8"]  # beside AVX-512 VNNI's (q8_matmul.INT8_DOTS)


def amx(name: str, *args):
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def q8_matmul_amx(n: int, k: int, rows: str, gated: bool = False) -> "T.PrimFunc":
    """q8_matmul_cpu(n, k, rows, gated, int8="avx512vnni")'s function and arguments (xq, xd,
    xsum from quantize_rows, q and scale from pack_for_int8_dot and pack_features, y), on AMX
    from AMX_MIN_ROWS rows, below them on the vpdpbusd kernel of the row class `rows` ("block"
    or "many"). Each parallel task takes packs_per_task() packs through every tile of 16 rows
    (the last one as many as are left); the features of a last, partial pack run after the
    tasks, storing only the real ones."""
    assert k % Q8_BLOCK == 0 and not (gated and n % 2)
    packs, _, _ = packed_shape(n, k)
    full, n_blocks = n // F, k // Q8_BLOCK
    ppt = packs_per_task(full, "many")
    vector_packs = packed_matmul(n, k, rows, gated, "avx512vnni")

    def rows_loop(count):  # a full tile's rows unrolled (its accumulators in registers)
        return T.unroll if count == HALF_ROWS else T.serial

    @T.macro
    def configure(scratch, tile_rows):
        # palette 1; each tile's bytes a row (16-bit, tiles 0-7) and rows (8-bit, tiles 0-7)
        for i in range(16):
            scratch[CONFIG_WORD + i] = 0
        scratch[CONFIG_WORD] = 1
        scratch[CONFIG_WORD + 4] = 64 | (64 << 16)  # sums: 16 int32
        scratch[CONFIG_WORD + 5] = 32 | (32 << 16)  # activations: a block's 32 bytes
        scratch[CONFIG_WORD + 6] = 64 | (64 << 16)  # weights: 16 features x 4 bytes
        scratch[CONFIG_WORD + 12] = T.Cast("int32", tile_rows) * 0x01010101
        scratch[CONFIG_WORD + 13] = GROUPS | (GROUPS << 8)
        amx("ldtilecfg", T.address_of(scratch[CONFIG_WORD]))

    @T.macro
    def block_sums(xq, q, pack, first, b, pair):
        amx("tilezero", T.int8(SUMS[pair]))
        amx("tileloadd64", T.int8(ROWS[pair]), T.address_of(xq[first, b * Q8_BLOCK]), T.int64(k))
        amx("tileloadd64", T.int8(WEIGHTS[pair]), T.address_of(q[pack, b * GROUPS, 0]), T.int64(4 * F))
        amx("tdpbsud", T.int8(SUMS[pair]), T.int8(ROWS[pair]), T.int8(WEIGHTS[pair]))

    @T.macro
    def store_sums(scratch, pair):
        amx("tilestored64", T.int8(SUMS[pair]), T.address_of(scratch[pair * SUMS_WORDS]), T.int64(4 * F))

    @T.macro
    def pair_sums(xq, q, pack, first, bp):
        block_sums(xq, q, pack, first, 2 * bp, 0)
        block_sums(xq, q, pack, first, 2 * bp + 1, 1)

    @T.macro
    def scale_half(xd, xsum, scale, scratch, acc, pack, first, row0, rows, count, b, base):
        for r in rows_loop(count)(rows):
            for f in T.vectorized(F):
                acc[r, f] = scaled_in(acc[r, f], scratch[base + (row0 + r) * F + f] - xsum[first + row0 + r, b],
                                      scale[pack, b, f], xd[first + row0 + r, b])

    @T.macro
    def scale_in(xd, xsum, scale, scratch, lo, hi, pack, first, lo_rows, hi_rows, count, b, pair):
        scale_half(xd, xsum, scale, scratch, lo, pack, first, 0, lo_rows, count, b, pair * SUMS_WORDS)
        scale_half(xd, xsum, scale, scratch, hi, pack, first, HALF_ROWS, hi_rows, count, b, pair * SUMS_WORDS)

    store = output_store(gated)

    @T.macro
    def pack_tile(xq, xd, xsum, q, scale, y, scratch, lo, hi, pack, first, lo_rows, hi_rows, count, width):
        for r in T.unroll(HALF_ROWS):
            for f in T.vectorized(F):
                lo[r, f] = T.float32(0)
                hi[r, f] = T.float32(0)
        for bp in range(n_blocks // 2):
            pair_sums(xq, q, pack, first, bp)
            store_sums(scratch, 0)
            store_sums(scratch, 1)
            scale_in(xd, xsum, scale, scratch, lo, hi, pack, first, lo_rows, hi_rows, count, 2 * bp, 0)
            scale_in(xd, xsum, scale, scratch, lo, hi, pack, first, lo_rows, hi_rows, count, 2 * bp + 1, 1)
        if n_blocks % 2 == 1:
            block_sums(xq, q, pack, first, n_blocks - 1, 0)
            store_sums(scratch, 0)
            scale_in(xd, xsum, scale, scratch, lo, hi, pack, first, lo_rows, hi_rows, count, n_blocks - 1, 0)
        store(y, lo, first, lo_rows, count == HALF_ROWS, pack, width)
        store(y, hi, first + HALF_ROWS, hi_rows, count == HALF_ROWS, pack, width)

    @T.macro
    def packs_times_rows(xq, xd, xsum, q, scale, y, m, first_pack, n_packs, width):
        # the int32 scratch is past the 1 KB TVM keeps on the stack; the accumulators are two
        # stack arrays of 8 rows (512 bytes each), which LLVM keeps in registers
        scratch = T.decl_buffer((CONFIG_WORD + 16,), "int32")
        lo = T.decl_buffer((HALF_ROWS, F), "float32")
        hi = T.decl_buffer((HALF_ROWS, F), "float32")
        if m >= TILE_ROWS:
            configure(scratch, TILE_ROWS)
            for tile in range(m // TILE_ROWS):
                for p in range(n_packs):
                    pack_tile(xq, xd, xsum, q, scale, y, scratch, lo, hi, first_pack + p, tile * TILE_ROWS,
                              HALF_ROWS, HALF_ROWS, HALF_ROWS, width)
        if m % TILE_ROWS != 0:
            configure(scratch, m % TILE_ROWS)
            for p in range(n_packs):
                pack_tile(xq, xd, xsum, q, scale, y, scratch, lo, hi, first_pack + p, m - m % TILE_ROWS,
                          T.min(m % TILE_ROWS, HALF_ROWS), T.max(m % TILE_ROWS - HALF_ROWS, 0), 0, width)
        amx("tilerelease")

    @T.macro
    def tiles_or_vectors(x, q, scale, y, m):
        if m >= AMX_MIN_ROWS:
            for task in T.parallel(full // ppt):
                packs_times_rows(x[0], x[1], x[2], q, scale, y, m, task * ppt, ppt, F)
            if packs > full:
                packs_times_rows(x[0], x[1], x[2], q, scale, y, m, full, 1, n % F)
        else:
            vector_packs(x, q, scale, y, m)

    return int8_matmul_func(n, k, gated, tiles_or_vectors)
