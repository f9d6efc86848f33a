"""out[t, h] = softmax(q[t, h] . keys / sqrt(d)) . values over the shared cache and the block.

Query row t (absolute position pos + t) sees cache positions [0, pos) of its layer and the
block's own keys k_new[j] for j <= t (causal) or for every j (bidirectional). The block's K/V
come in as separate tensors, so a bidirectional (draft) pass never touches the cache. pos is
an int32 [1] tensor, read by the kernel: one compiled call (or CUDA graph) serves every position.
GQA: q head h reads kv head h // (n_heads / n_kv_heads). This is the CPU kernel; the CUDA one
(attention_cuda.py) has the same signature.
"""
from __future__ import annotations

import functools
import math

from tvm.script import tirx as T

from trimode.compiler.kernels.cpu_math import softmax_weight
from trimode.model.kv_cache import kv_dtype, kv_row
from trimode.model.weights import Q8_BLOCK


# Keys per tile: the scores of a tile are computed first, then the running softmax is
# rescaled once per tile (not once per key) and the tile's values are summed, vectorized
# by the register's lanes (a loop vectorized by the whole head, <48 x float>, spilled its
# lanes every key).
KEY_TILE = 32
# Query positions per task. A task takes one kv head and up to this many positions, i.e. the
# group x positions query rows that read that head, and runs each key tile through all of
# them while it is in L1: the cache is read once per task, not once per query row (a decode
# read each kv head `group` times, a block pass group x T times).
QUERY_TILE = 16
ACC_VECTORS = 8  # registers of a row's value sums at a time (of AVX2's 16)
# A task with more query rows than a register's lanes takes them as the lanes: its scores
# are a small GEMM (each key's element broadcast times a register of rows' q elements), its
# softmax elementwise, its value sums another (each value element broadcast times a register of
# rows' weights), in register blocks of two row vectors x BLOCK_ACCUMULATORS / 2 keys or head
# elements: each load feeds two FMAs or more, where a row at a time (decode's few rows) loads
# a key vector for every FMA and sums each key's products across lanes.
BLOCK_ACCUMULATORS = {16: 16, 8: 8}  # of AVX-512's 32 registers, AVX2's 16


def tree_sum(terms: list, op=lambda a, b: a + b):
    """The sum (or `op`) of PrimExprs as a tree: log2(len) dependent steps, not len - 1."""
    while len(terms) > 1:
        half = len(terms) // 2
        terms = [op(terms[c], terms[c + half]) for c in range(half)] + terms[2 * half:]
    return terms[0]


def chain(terms: list):
    """The sum of PrimExprs left to right: products added to a sum become FMAs."""
    return functools.reduce(lambda a, b: a + b, terms)


def lane_pairs(lanes: int, width: int) -> list[int]:
    """Shuffle indices of two `lanes`-wide vectors x, y (y's elements from `lanes` on) that
    take the first of each adjacent pair of `width`-element chunks: within each 4-element
    quarter for width 1 (x's two pairs, then y's: what x86's haddps pairs), across the whole
    vector for width 4 (x's chunks, then y's). The second of each pair: these + width."""
    if width == 1:
        return [4 * g + 2 * m if m < 2 else lanes + 4 * g + 2 * (m - 2)
                for g in range(lanes // 4) for m in range(4)]
    n = lanes // 4
    return [8 * o + m if o < n // 2 else lanes + 8 * (o - n // 2) + m
            for o in range(n) for m in range(4)]


def transposed_sum(vectors: list, lanes: int):
    """The vector of each of `lanes` vectors' sums (element i: vectors[i]'s), by pairwise
    shuffles and adds: 2 + log2(lanes / 4) levels of lanes - 1 vector adds in all, where a
    horizontal sum per vector (tree_sum) costs log2(lanes) shuffles each."""
    for width in [1, 1] + [4] * ((lanes // 4).bit_length() - 1):
        first = lane_pairs(lanes, width)
        second = [i + width for i in first]
        vectors = [T.Shuffle([x, y], first) + T.Shuffle([x, y], second)
                   for x, y in zip(vectors[0::2], vectors[1::2])]
    return vectors[0]


def attention_cpu(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  causal: bool, kv_cache: str = "f16", register_lanes: int = 8) -> "T.PrimFunc":
    """q, out fp32; the cache and the block's k, v rows as the cache type keeps them
    (model/kv_cache.py: f16, or q8_0 blocks with their scales), converted as they are read.
    register_lanes: fp32 lanes of the target's vector register (8: AVX2; 16: AVX-512)."""
    L, HQ, HKV, D = T.int64(n_layers), T.int64(n_heads), T.int64(n_kv_heads), T.int64(head_dim)
    storage, ROW = kv_dtype(kv_cache), T.int64(kv_row(kv_cache, head_dim))
    quantized = kv_cache == "q8_0"
    group = n_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    # lanes: the vector a head's products are summed in; register_lanes where the head size
    # allows (scalar where it is not a multiple of 8). A score group is one key a lane, so its
    # partial sums are transposed into the group's scores by vector shuffles (transposed_sum):
    # one horizontal sum a key and query row cost as much as its 16 FMAs (perf: 9 shuffles)
    lanes = next(w for w in (register_lanes, 8, 1) if head_dim % w == 0)
    group_keys = max(lanes, 8)
    W = register_lanes
    chunks = head_dim // lanes
    acc_chunks = max(c for c in range(1, ACC_VECTORS + 1) if chunks % c == 0)

    def vec(buf, row, col):  # buf[row, col:col + lanes]
        return buf[row, T.ramp(col, 1, lanes)]

    max_rows = group * QUERY_TILE

    @T.macro
    def key_tile(keys, values, first, size, r, qs, acc, best, total, tile):
        # Row r's running softmax (best, total, acc) takes keys [first, first + size); `tile`:
        # the scratch of one tile (scores, rescale, lane, row_acc).
        scores, rescale, lane, row_acc = tile
        # The scores, group_keys keys at a time (independent FMA chains), each key's products
        # one expression: as an array of 16 x 16 partial sums (1 KB, a heap workspace) they
        # stayed in registers or not depending on what else the module held (2x on a block
        # pass). A partial group's key index is held at the last real key.
        for jg in range((size + group_keys - 1) // group_keys):
            if lanes == group_keys:
                scores[T.ramp(jg * group_keys, 1, lanes)] = transposed_sum(
                    [chain([vec(qs, r, b * lanes)
                            * vec(keys, first + T.min(jg * group_keys + jj, size - 1), b * lanes)
                            for b in range(chunks)]) for jj in range(group_keys)], lanes)
            else:
                for jj in T.unroll(group_keys):
                    scores[jg * group_keys + jj] = chain(
                        [qs[r, d] * keys[first + T.min(jg * group_keys + jj, size - 1), d]
                         for d in range(head_dim)])
        # The tile's max and its weights' sum, a register at a time (not a dependent chain a
        # key): entries past `size` are scored -3e38, so their weights flush to 0.
        for jj in range(size, KEY_TILE):
            scores[jj] = T.float32(-3.0e38)
        for c in T.vectorized(W):
            lane[c] = tree_sum([scores[jg * W + c] for jg in range(KEY_TILE // W)], T.max)
        rescale[0] = T.max(best[r], tree_sum([lane[c] for c in range(W)], T.max))
        # rescale[0] holds the new running max; fold the old one into what was summed.
        for jg in T.unroll(KEY_TILE // W):
            for jj in T.vectorized(W):
                scores[jg * W + jj] = softmax_weight(scores[jg * W + jj] - rescale[0])
        for c in T.vectorized(W):
            lane[c] = tree_sum([scores[jg * W + c] for jg in range(KEY_TILE // W)])
        total[r] = (total[r] * softmax_weight(best[r] - rescale[0], T.exp)
                    + tree_sum([lane[c] for c in range(W)]))
        # The values, acc_chunks vectors of the row's sums at a time in row_acc (a small
        # array LLVM keeps in registers: all of a 128-wide head's would spill).
        for a in range(chunks // acc_chunks):
            for b in T.unroll(acc_chunks):
                for c in T.vectorized(lanes):
                    row_acc[b * lanes + c] = (acc[r, (a * acc_chunks + b) * lanes + c]
                                              * softmax_weight(best[r] - rescale[0], T.exp))
            for jj in range(size):
                for b in T.unroll(acc_chunks):
                    for c in T.vectorized(lanes):
                        row_acc[b * lanes + c] = row_acc[b * lanes + c] + scores[jj] * values[
                            first + jj, (a * acc_chunks + b) * lanes + c]
            for b in T.unroll(acc_chunks):
                for c in T.vectorized(lanes):
                    acc[r, (a * acc_chunks + b) * lanes + c] = row_acc[b * lanes + c]
        best[r] = rescale[0]

    # rows as lanes (a block pass): rows padded to register pairs; state transposed to [D, rows]
    pair = 2 * W
    padded_rows = -(-max_rows // pair) * pair
    block_keys = BLOCK_ACCUMULATORS.get(W, 8) // 2
    block_dims = max(c for c in range(1, block_keys + 1) if head_dim % c == 0)

    def lane_sees(j, n, key_first, masked, last_key):
        # key j of a tile of n, block key key_first + j where masked, seen by a row whose
        # position's last key is last_key
        return j < n if not masked else T.And(j < n, key_first + j <= last_key)

    @T.macro
    def row_lanes_tile(keys, values, n, key_first, masked, pairs, lane_state):
        # Every row of the task takes keys [0, n) of the converted tile (block key key_first + j
        # where masked: seen by the rows whose position is at or past it). part0 / part1: the
        # register block's accumulators, one array a row vector: TVM puts an array of 1 KB or
        # more on the heap, where LLVM keeps it in memory (tests/test_cpu_scratch.py).
        q_t, acc_t, best, total, last_key, scores, fresh, rescale, part0, part1 = lane_state
        for p in range(pairs):
            r0: T.let[T.int64] = p * pair
            for jb in range((n + block_keys - 1) // block_keys):
                for i in T.unroll(block_keys):
                    for c in T.vectorized(W):
                        part0[i * W + c] = T.float32(0)
                        part1[i * W + c] = T.float32(0)
                for d in range(D):
                    for jj in T.unroll(block_keys):
                        for c in T.vectorized(W):
                            part0[jj * W + c] = part0[jj * W + c] + keys[
                                T.min(jb * block_keys + jj, n - 1), d] * q_t[d, r0 + c]
                            part1[jj * W + c] = part1[jj * W + c] + keys[
                                T.min(jb * block_keys + jj, n - 1), d] * q_t[d, r0 + W + c]
                for jj in T.unroll(block_keys):
                    for c in T.vectorized(W):
                        scores[jb * block_keys + jj, r0 + c] = T.Select(lane_sees(
                            jb * block_keys + jj, n, key_first, masked, last_key[r0 + c]),
                            part0[jj * W + c], T.float32(-3.0e38))
                        scores[jb * block_keys + jj, r0 + W + c] = T.Select(lane_sees(
                            jb * block_keys + jj, n, key_first, masked, last_key[r0 + W + c]),
                            part1[jj * W + c], T.float32(-3.0e38))
            for j in range((n + block_keys - 1) // block_keys * block_keys, KEY_TILE):
                for c in T.vectorized(pair):
                    scores[j, r0 + c] = T.float32(-3.0e38)
            # the running softmax, a lane a row: max, weights, their sum, the old sums' rescale
            for c in T.vectorized(pair):
                fresh[c] = T.max(best[r0 + c], tree_sum([scores[j, r0 + c] for j in range(KEY_TILE)], T.max))
            for j in T.unroll(KEY_TILE):
                for c in T.vectorized(pair):
                    scores[j, r0 + c] = softmax_weight(scores[j, r0 + c] - fresh[c])
            for c in T.vectorized(pair):
                rescale[c] = softmax_weight(best[r0 + c] - fresh[c])
                total[r0 + c] = total[r0 + c] * rescale[c] + tree_sum([scores[j, r0 + c] for j in range(KEY_TILE)])
                best[r0 + c] = fresh[c]
            for db in range(head_dim // block_dims):
                for dd in T.unroll(block_dims):
                    for c in T.vectorized(W):
                        part0[dd * W + c] = acc_t[db * block_dims + dd, r0 + c] * rescale[c]
                        part1[dd * W + c] = acc_t[db * block_dims + dd, r0 + W + c] * rescale[W + c]
                for j in range(n):
                    for dd in T.unroll(block_dims):
                        for c in T.vectorized(W):
                            part0[dd * W + c] = part0[dd * W + c] + values[j, db * block_dims + dd] * scores[j, r0 + c]
                            part1[dd * W + c] = part1[dd * W + c] + values[j, db * block_dims + dd] * scores[
                                j, r0 + W + c]
                for dd in T.unroll(block_dims):
                    for c in T.vectorized(W):
                        acc_t[db * block_dims + dd, r0 + c] = part0[dd * W + c]
                        acc_t[db * block_dims + dd, r0 + W + c] = part1[dd * W + c]

    def converted(rows, scales, j, b, c):
        # element b * lanes + c of row j as fp32; a q8_0 row's scales follow its values, read
        # through an fp32 view of the same bytes (lanes divide 32: one scale a vector)
        value = T.Cast("float32", rows[j, b * lanes + c])
        if not quantized:
            return value
        return value * scales[j, head_dim // 4 + b * lanes // Q8_BLOCK]

    @T.macro
    def keys_in_tiles(key_views, value_views, n_keys, rows, first_t, masked, qs, acc, best, total, tile,
                      tile_kv, lane_state):
        # keys/values: ([n, ROW] views of the rows, their fp32 views for q8_0's scales), n_keys;
        # each tile is converted to fp32 once (tile_kv) and run through every row of the
        # task. masked: row r (position first_t + r // group) sees only keys up to its own.
        tile_k, tile_v = tile_kv
        (keys, key_scales), (values, value_scales) = key_views, value_views
        for jt in range((n_keys + KEY_TILE - 1) // KEY_TILE):
            for j in range(T.min(n_keys - jt * KEY_TILE, KEY_TILE)):
                for b in T.unroll(chunks):
                    for c in T.vectorized(lanes):
                        tile_k[j, b * lanes + c] = converted(keys, key_scales, jt * KEY_TILE + j, b, c)
                        tile_v[j, b * lanes + c] = converted(values, value_scales, jt * KEY_TILE + j, b, c)
            if rows > W:
                row_lanes_tile(tile_k, tile_v, T.min(n_keys - jt * KEY_TILE, KEY_TILE), jt * KEY_TILE,
                               masked, (rows + pair - 1) // pair, lane_state)
            else:
                for r in range(rows):
                    if masked:
                        size: T.let[T.int64] = T.min(first_t + r // group + 1 - jt * KEY_TILE, KEY_TILE)
                        if size > 0:
                            key_tile(tile_k, tile_v, 0, size, r, qs, acc, best, total, tile)
                    else:
                        key_tile(tile_k, tile_v, 0, T.min(n_keys - jt * KEY_TILE, KEY_TILE),
                                 r, qs, acc, best, total, tile)

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_kv: T.handle, layer: T.int64,
                  pos_buf: T.Buffer((T.int64(1),), "int32"),
                  var_k: T.handle, var_v: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        t, ctx = T.int64(), T.int64()
        q = T.match_buffer(var_q, (t, HQ, D), "float32")
        kv = T.match_buffer(var_kv, (L, T.int64(2), HKV, ctx, ROW), storage)
        k_new = T.match_buffer(var_k, (t, HKV, ROW), storage)
        v_new = T.match_buffer(var_v, (t, HKV, ROW), storage)
        out = T.match_buffer(var_out, (t, HQ, D), "float32")
        t_tiles: T.let[T.int64] = (t + QUERY_TILE - 1) // QUERY_TILE
        for task in T.parallel(HKV * t_tiles):
            g: T.let[T.int64] = task // t_tiles
            first_t: T.let[T.int64] = task % t_tiles * QUERY_TILE
            # the task's row r: position first_t + r // group, query head g * group + r % group
            rows: T.let[T.int64] = T.min(t - first_t, QUERY_TILE) * group
            # This head's keys and values: the cache's [0, pos) and the block's own, each
            # with an fp32 view of the same bytes (a q8_0 row's scales; an f16 build reads none).
            cache_k = (T.decl_buffer((ctx, ROW), storage, data=kv.data,
                                     elem_offset=((layer * 2 + 0) * HKV + g) * ctx * ROW),
                       T.decl_buffer((ctx, ROW // 4), "float32", data=kv.data,
                                     elem_offset=((layer * 2 + 0) * HKV + g) * ctx * (ROW // 4)))
            cache_v = (T.decl_buffer((ctx, ROW), storage, data=kv.data,
                                     elem_offset=((layer * 2 + 1) * HKV + g) * ctx * ROW),
                       T.decl_buffer((ctx, ROW // 4), "float32", data=kv.data,
                                     elem_offset=((layer * 2 + 1) * HKV + g) * ctx * (ROW // 4)))
            block_k = (T.decl_buffer((t, ROW), storage, data=k_new.data, elem_offset=g * ROW,
                                     strides=(HKV * ROW, T.int64(1))),
                       T.decl_buffer((t, ROW // 4), "float32", data=k_new.data,
                                     elem_offset=g * (ROW // 4), strides=(HKV * (ROW // 4), T.int64(1))))
            block_v = (T.decl_buffer((t, ROW), storage, data=v_new.data, elem_offset=g * ROW,
                                     strides=(HKV * ROW, T.int64(1))),
                       T.decl_buffer((t, ROW // 4), "float32", data=v_new.data,
                                     elem_offset=g * (ROW // 4), strides=(HKV * (ROW // 4), T.int64(1))))
            qs = T.decl_buffer((padded_rows, D), "float32")
            acc = T.decl_buffer((padded_rows, D), "float32")
            best = T.decl_buffer((padded_rows,), "float32")
            total = T.decl_buffer((padded_rows,), "float32")
            tile = (T.decl_buffer((KEY_TILE,), "float32"),  # scores
                    T.decl_buffer((1,), "float32"),         # rescale
                    T.decl_buffer((W,), "float32"),         # lane
                    T.decl_buffer((acc_chunks * lanes,), "float32"))  # row_acc
            tile_kv = (T.decl_buffer((KEY_TILE, D), "float32"), T.decl_buffer((KEY_TILE, D), "float32"))
            # rows as lanes: q and the value sums as [D, rows], in the row path's storage (a
            # task takes one path), the scores as [key, rows]
            q_t = T.decl_buffer((D, padded_rows), "float32", data=qs.data)
            acc_t = T.decl_buffer((D, padded_rows), "float32", data=acc.data)
            last_key = T.decl_buffer((padded_rows,), "int64")
            lane_state = (q_t, acc_t, best, total, last_key,
                          T.decl_buffer((KEY_TILE, padded_rows), "float32"),  # scores
                          T.decl_buffer((pair,), "float32"),               # fresh
                          T.decl_buffer((pair,), "float32"),               # rescale
                          T.decl_buffer((block_keys * W,), "float32"),     # part0
                          T.decl_buffer((block_keys * W,), "float32"))     # part1
            for r in range(T.int64(padded_rows)):
                best[r] = T.float32(-3.0e38)
                total[r] = T.float32(0)
            if rows > W:
                # padding rows (past `rows`) score 0 against every key and are never stored
                for r in range(T.int64(padded_rows)):
                    last_key[r] = first_t + r // group
                    for d in range(D):
                        q_t[d, r] = T.Select(r < rows, q[T.min(first_t + r // group, t - 1),
                                                         g * group + r % group, d], T.float32(0)) * T.float32(scale)
                        acc_t[d, r] = T.float32(0)
            else:
                for r in range(rows):
                    for d in T.vectorized(D):
                        qs[r, d] = q[first_t + r // group, g * group + r % group, d] * T.float32(scale)
                        acc[r, d] = T.float32(0)
            keys_in_tiles(cache_k, cache_v, T.Cast("int64", pos_buf[0]), rows, first_t, False,
                          qs, acc, best, total, tile, tile_kv, lane_state)
            keys_in_tiles(block_k, block_v, T.min(first_t + QUERY_TILE, t) if causal else t, rows,
                          first_t, causal, qs, acc, best, total, tile, tile_kv, lane_state)
            if rows > W:
                for r in range(rows):
                    for d in range(D):
                        out[first_t + r // group, g * group + r % group, d] = acc_t[d, r] / total[r]
            else:
                for r in range(rows):
                    for d in T.vectorized(D):
                        out[first_t + r // group, g * group + r % group, d] = acc[r, d] / total[r]

    return attention
