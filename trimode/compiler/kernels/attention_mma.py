"""Attention of blocks and prefills over the shared cache on tensor cores (CUDA, mma.sync).

Same contract and split-KV layout as attention_cuda (its TIR kernel keeps decode, where one
row per kv head group leaves tensor cores nothing to share): query row t (position pos + t)
sees cache positions [0, pos) and the block's own keys k_new[j] for j <= t (causal) or all j;
q head h reads kv head h // G; the cache is only read; splits of the key sequence write fp32
partials with their log-sum-exp, and a merge kernel combines them.

One hand-written CUDA C++ device function per stage, launched through `T.cuda.func_call`
(tests/cuda_emulator.h runs the same source on the CPU):

- `split`: a CTA takes 16 * warps query rows -- (t, q head) pairs of one kv head, so every K/V
  tile it loads serves all of them -- and one split of the keys. K and V tiles of 32 keys go
  to shared memory by cp.async, one tile ahead. Each warp owns 16 rows: S = Q K^T with
  mma.sync m16n8k16 (Q fragments held in registers, K fragments by ldmatrix), the online
  softmax in fp32 on the S fragments (base 2), then O += P V with P reused from the S
  accumulators as fp16 A fragments (FlashAttention-2's register trick) and V fragments by
  ldmatrix.trans.
- `merge`: one block per (t, q head), one thread per d, weighting the splits by exp2(lse).

Why: a verify/draft pass of T rows is T * G rows per K/V element; with CUDA-core FMAs that
made a T = 32 block at 4k context cost ~20x decode's attention (BENCHMARKS.md); on tensor
cores it is bound by reading the cache again.
"""
from __future__ import annotations

import math

from trimode.compiler.kernels.attention_cuda import LOG2E, NEG, AttentionPlan, splits_for
from trimode.compiler.kernels.cuda_ptx import ptx_helpers
from trimode.model.config import ModelError

KEYS_PER_TILE = 32   # keys per shared-memory stage (two stages of K and V fit 48 KB at d = 128)


def default_plan(n_heads: int, n_kv_heads: int, rows: str, head_dim: int) -> AttentionPlan:
    """rows: "block" (verify/draft, T <= 64) or "many" (prefill)."""
    if not supports(head_dim):
        raise ModelError(f"tensor-core attention needs head_dim a multiple of 16, not {head_dim}")
    if rows == "block":
        return AttentionPlan(rows_per_cta=64, keys_per_tile=KEYS_PER_TILE, threads=128,
                             target_ctas=132 * 2, max_splits=64, min_tiles_per_split=2, vector=8)
    if rows == "many":
        return AttentionPlan(rows_per_cta=64, keys_per_tile=KEYS_PER_TILE, threads=128,
                             target_ctas=132 * 2, max_splits=16, min_tiles_per_split=4, vector=8)
    raise ModelError(f"tensor-core attention serves 'block' and 'many' rows, not {rows!r}")


def plan_candidates(n_heads: int, n_kv_heads: int, rows: str, head_dim: int) -> list[AttentionPlan]:
    """The plans `trimode tune` measures: rows per CTA (warps of 16 rows), how many CTAs the
    splits aim at, and the most splits."""
    default = default_plan(n_heads, n_kv_heads, rows, head_dim)
    most_splits = (32, 64, 128) if rows == "block" else (1, 4, 16)
    plans = [default]
    for rows_per_cta in (32, 64, 128):
        for target_ctas in (132, 264, 528):
            for max_splits in most_splits:
                plan = AttentionPlan(rows_per_cta, KEYS_PER_TILE, 2 * rows_per_cta, target_ctas, max_splits,
                                     default.min_tiles_per_split, default.vector)
                if plan not in plans:
                    plans.append(plan)
    return plans


def supports(head_dim: int) -> bool:
    """mma k-steps and ldmatrix tiles are 16 wide over d."""
    return head_dim % 16 == 0


def _check(n_heads, n_kv_heads, head_dim, plan: AttentionPlan):
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ModelError(f"{n_heads} query heads cannot share {n_kv_heads} kv heads evenly.")
    if not supports(head_dim):
        raise ModelError(f"tensor-core attention needs head_dim a multiple of 16, not {head_dim}.")
    if plan.keys_per_tile != KEYS_PER_TILE or plan.threads != 2 * plan.rows_per_cta \
            or plan.rows_per_cta % 16 or not 16 <= plan.rows_per_cta <= 256:
        raise ModelError(f"tensor-core attention takes 16 rows per warp and {KEYS_PER_TILE}-key "
                         f"tiles; plan {plan} does not fit")
    if 4 * KEYS_PER_TILE * (head_dim + 8) * 2 > 48 * 1024:
        raise ModelError(f"head_dim {head_dim}: two stages of K and V exceed 48 KB of shared memory")


_PACK = r"""
__device__ __forceinline__ unsigned NAME_pack(float lo, float hi) {
  const half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}
"""


def attention_source(name: str, n_heads: int, n_kv_heads: int, head_dim: int, causal: bool,
                     plan: AttentionPlan) -> str:
    """CUDA C++ of `{name}_split(...)` (parameters: see the TIR wrapper in attention_mma)."""
    _check(n_heads, n_kv_heads, head_dim, plan)
    hq, hkv, d, group = n_heads, n_kv_heads, head_dim, n_heads // n_kv_heads
    scale = LOG2E / math.sqrt(head_dim)
    return ptx_helpers(name) + _PACK.replace("NAME", name) + rf"""
// Split stage. Grid (row tiles, kv heads, splits); 32 * W threads; warp w owns rows
// r0 + 16w .. +16 of this kv head, row r being (t = r / G, q head h * G + r % G).
__device__ __forceinline__ void {name}_split(
    const half* __restrict__ q, const half* __restrict__ kv, long long layer,
    const int* __restrict__ pos_ptr, const half* __restrict__ k_new, const half* __restrict__ v_new,
    float* __restrict__ part_out, float* __restrict__ part_lse, int n_t, int ctx) {{
  constexpr int HQ = {hq}, HKV = {hkv}, D = {d}, G = {group}, W = {plan.rows_per_cta // 16};
  constexpr int KT = {KEYS_PER_TILE}, ROWS = 16 * W, THREADS = 32 * W, DP = D + 8;  // DP: padded rows
  constexpr bool CAUSAL = {"true" if causal else "false"};
  constexpr float SCALE = {scale!r}f, NEG = {NEG!r}f;
  __shared__ __align__(16) half ks[2][KT][DP];
  __shared__ __align__(16) half vs[2][KT][DP];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int pos = *pos_ptr, n_keys = pos + n_t;
  const int r0 = blockIdx.x * ROWS;
  const int split_keys = ((n_keys + KT - 1) / KT + splits - 1) / splits * KT;
  const int key_begin = split * split_keys, key_end = min(key_begin + split_keys, n_keys);
  // causal: no row of this CTA sees past its last row's own key
  const int last_t = min((r0 + ROWS + G - 1) / G, n_t) - 1;
  const int key_stop = CAUSAL ? min(key_end, pos + last_t + 1) : key_end;
  const int n_steps = key_stop > key_begin ? (key_stop - key_begin + KT - 1) / KT : 0;

  // this thread's two rows: g and g + 8 of its warp's 16
  int row[2], row_t[2];
  bool row_ok[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {{
    row[e] = r0 + 16 * warp + g + 8 * e;
    row_ok[e] = row[e] < n_t * G;
    row_t[e] = row_ok[e] ? row[e] / G : 0;
  }}
  // Q as A fragments for every 16-wide k-step over d: register i is row g + 8 (i & 1),
  // d 16s + 8 (i >> 1) + 2t, +1
  unsigned qa[D / 16][4];
#pragma unroll
  for (int s = 0; s < D / 16; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {{
      const int e = i & 1;
      const half* p = q + ((size_t)row_t[e] * HQ + h * G + row[e] % G) * D + 16 * s + 8 * (i >> 1) + 2 * t;
      qa[s][i] = row_ok[e] ? *reinterpret_cast<const unsigned*>(p) : 0u;
    }}

  const half* k_cache = kv + ((size_t)(layer * 2 + 0) * HKV + h) * ctx * D;
  const half* v_cache = kv + ((size_t)(layer * 2 + 1) * HKV + h) * ctx * D;
  auto copy_tile = [&](int step, int buffer) {{
    const int tile0 = key_begin + step * KT;
    for (int piece = threadIdx.x; piece < 2 * KT * (D / 8); piece += THREADS) {{
      const int is_v = piece / (KT * (D / 8)), rest = piece % (KT * (D / 8));
      const int j = rest / (D / 8), col = rest % (D / 8) * 8, key = tile0 + j;
      const half* source = k_cache;  // any valid address: nothing is read when key >= key_stop
      if (key < key_stop)
        source = key < pos ? (is_v ? v_cache : k_cache) + (size_t)key * D + col
                           : (is_v ? v_new : k_new) + ((size_t)(key - pos) * HKV + h) * D + col;
      {name}_copy16(is_v ? &vs[buffer][j][col] : &ks[buffer][j][col], source, key < key_stop ? 16 : 0);
    }}
    {name}_copy_commit();
  }};

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
  float m[2] = {{NEG, NEG}}, l[2] = {{0.f, 0.f}};  // running max (base 2) and this thread's partial sum
  const int matrix = lane >> 3;  // ldmatrix: the 8x8 matrix whose row this lane addresses

  if (n_steps > 0) copy_tile(0, 0);
  for (int step = 0; step < n_steps; ++step) {{
    const int buffer = step & 1, tile0 = key_begin + step * KT;
    if (step + 1 < n_steps) copy_tile(step + 1, buffer ^ 1);
    else {name}_copy_commit();  // an empty group keeps "all but the newest one" meaning this tile
    {name}_copy_wait_pending<1>();
    __syncthreads();  // every thread's share of this tile has landed

    // S = Q K^T: 16 rows x KT keys per warp, n-tiles of 8 keys
    float sc[KT / 8][4];
#pragma unroll
    for (int j = 0; j < KT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = 0.f;
#pragma unroll
    for (int s = 0; s < D / 16; ++s)
#pragma unroll
      for (int j2 = 0; j2 < KT / 16; ++j2) {{
        unsigned b[4];  // keys 16 j2 + 8 (matrix >> 1) + row, d 16 s + 8 (matrix & 1)
        {name}_ldmatrix(b, &ks[buffer][16 * j2 + 8 * (matrix >> 1) + (lane & 7)][16 * s + 8 * (matrix & 1)]);
        {name}_mma(sc[2 * j2], qa[s], b[0], b[1]);
        {name}_mma(sc[2 * j2 + 1], qa[s], b[2], b[3]);
      }}

    // online softmax on the fragments: element e of n-tile j is row g + 8 (e >> 1), key
    // tile0 + 8j + 2t + (e & 1); a row's 4 lanes t share its max through two shuffles
    unsigned visible = 0u;
    float tile_max[2] = {{NEG, NEG}};
#pragma unroll
    for (int j = 0; j < KT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {{
        const int r = e >> 1, key = tile0 + 8 * j + 2 * t + (e & 1);
        const bool sees = row_ok[r] && key < key_stop && (!CAUSAL || key <= pos + row_t[r]);
        visible |= (sees ? 1u : 0u) << (4 * j + e);
        sc[j][e] = sees ? sc[j][e] * SCALE : NEG;
        tile_max[r] = fmaxf(tile_max[r], sc[j][e]);
      }}
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {{
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float next = fmaxf(m[r], tile_max[r]);
      alpha[r] = exp2f(m[r] - next);
      m[r] = next;
      l[r] *= alpha[r];
    }}
#pragma unroll
    for (int j = 0; j < KT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {{
        // masked keys weigh 0, also in a row that has seen no key yet
        sc[j][e] = (visible >> (4 * j + e)) & 1u ? exp2f(sc[j][e] - m[e >> 1]) : 0.f;
        l[e >> 1] += sc[j][e];
      }}
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e >> 1];

    // O += P V: P's accumulators are the A fragments of 16-key k-steps
#pragma unroll
    for (int s2 = 0; s2 < KT / 16; ++s2) {{
      const unsigned pa[4] = {{{name}_pack(sc[2 * s2][0], sc[2 * s2][1]), {name}_pack(sc[2 * s2][2], sc[2 * s2][3]),
                              {name}_pack(sc[2 * s2 + 1][0], sc[2 * s2 + 1][1]),
                              {name}_pack(sc[2 * s2 + 1][2], sc[2 * s2 + 1][3])}};
#pragma unroll
      for (int j2 = 0; j2 < D / 16; ++j2) {{
        unsigned b[4];  // transposed: keys 16 s2 + 8 (matrix & 1) + row, d 16 j2 + 8 (matrix >> 1)
        {name}_ldmatrix_trans(b, &vs[buffer][16 * s2 + 8 * (matrix & 1) + (lane & 7)][16 * j2 + 8 * (matrix >> 1)]);
        {name}_mma(o[2 * j2], pa, b[0], b[1]);
        {name}_mma(o[2 * j2 + 1], pa, b[2], b[3]);
      }}
    }}
    __syncthreads();  // nobody reads this buffer any more: the next copy may overwrite it
  }}

#pragma unroll
  for (int r = 0; r < 2; ++r) {{
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }}
#pragma unroll
  for (int r = 0; r < 2; ++r) {{
    if (!row_ok[r]) continue;
    const size_t out_row = ((size_t)split * n_t + row_t[r]) * HQ + h * G + row[r] % G;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {{
      part_out[out_row * D + 8 * j + 2 * t] = o[j][2 * r] * inv;
      part_out[out_row * D + 8 * j + 2 * t + 1] = o[j][2 * r + 1] * inv;
    }}
    // a split where this row sees no key gets weight exp2(NEG) = 0 in the merge
    if (t == 0) part_lse[out_row] = l[r] > 0.f ? m[r] + log2f(l[r]) : NEG;
  }}
}}
"""


def merge_source(name: str, n_heads: int, head_dim: int) -> str:
    """CUDA C++ of `{name}_merge(part_out, part_lse, out, n_t, splits)`."""
    hq, d = n_heads, head_dim
    return rf"""
// Merge stage. Grid n_t * HQ, D threads: out = sum_s exp2(lse_s - top) out_s / sum_s exp2(lse_s - top).
__device__ __forceinline__ void {name}_merge(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                                             half* __restrict__ out, int n_t, int splits) {{
  constexpr int HQ = {hq}, D = {d};
  constexpr float NEG = {NEG!r}f;
  const int row = blockIdx.x, t = row / HQ, head = row % HQ, d = threadIdx.x;
  float top = NEG;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, part_lse[((size_t)s * n_t + t) * HQ + head]);
  float total = 0.f, merged = 0.f;
  for (int s = 0; s < splits; ++s) {{
    const size_t at = ((size_t)s * n_t + t) * HQ + head;
    const float weight = exp2f(part_lse[at] - top);
    total += weight;
    merged += weight * part_out[at * D + d];
  }}
  out[((size_t)t * HQ + head) * D + d] = __float2half_rn(merged / total);
}}
"""


def attention_mma(n_heads: int, n_kv_heads: int, head_dim: int, causal: bool, dtype: str,
                  rows: str, plan: AttentionPlan | None = None):
    """The attention PrimFunc (buffers as attention_cuda.attention_cuda's) for `rows` "block"
    or "many": T dynamic, cache size symbolic."""
    from tvm import tirx
    from tvm.script import tirx as T

    if dtype != "float16":
        raise ModelError(f"tensor-core attention takes float16, not {dtype}")
    plan = plan or default_plan(n_heads, n_kv_heads, rows, head_dim)
    group = n_heads // n_kv_heads
    name = (f"trimode_attention_mma_h{n_heads}_kv{n_kv_heads}_d{head_dim}_{'causal' if causal else 'bidir'}"
            f"_r{plan.rows_per_cta}_s{plan.target_ctas}x{plan.max_splits}x{plan.min_tiles_per_split}")
    source = attention_source(name, n_heads, n_kv_heads, head_dim, causal, plan)
    HQ, HKV, D = T.int64(n_heads), T.int64(n_kv_heads), T.int64(head_dim)
    n_t_var = tirx.Var("n_t", "int64")
    ctx_var = tirx.Var("ctx", "int64")
    splits = splits_for(plan, group, n_kv_heads, ctx_var, n_t_var)
    row_tiles = T.ceildiv(n_t_var * T.int64(group), T.int64(plan.rows_per_cta))

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_kv: T.handle, layer: T.int64, var_pos: T.handle,
                  var_k: T.handle, var_v: T.handle, var_out: T.handle, var_part_out: T.handle,
                  var_part_lse: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        n_layers, n_part = T.int64(), T.int64()
        q = T.match_buffer(var_q, (n_t_var, HQ, D), "float16")
        kv = T.match_buffer(var_kv, (n_layers, T.int64(2), HKV, ctx_var, D), "float16")
        pos = T.match_buffer(var_pos, (T.int64(1),), "int32")
        k_new = T.match_buffer(var_k, (n_t_var, HKV, D), "float16")
        v_new = T.match_buffer(var_v, (n_t_var, HKV, D), "float16")
        out = T.match_buffer(var_out, (n_t_var, HQ, D), "float16")
        part_out = T.match_buffer(var_part_out, (n_part, HQ, D), "float32")
        part_lse = T.match_buffer(var_part_lse, (n_part, HQ), "float32")
        with T.launch_thread("blockIdx.x", T.Cast("int32", row_tiles)):
            with T.launch_thread("blockIdx.y", n_kv_heads):
                with T.launch_thread("blockIdx.z", T.Cast("int32", splits)):
                    with T.launch_thread("threadIdx.x", plan.threads):
                        T.evaluate(T.cuda.func_call(
                            f"{name}_split", q.data, kv.data, layer, pos.data, k_new.data, v_new.data,
                            part_out.data, part_lse.data, T.Cast("int32", n_t_var), T.Cast("int32", ctx_var),
                            source_code=source))
        with T.launch_thread("blockIdx.x", T.Cast("int32", n_t_var * HQ)):
            with T.launch_thread("threadIdx.x", head_dim):
                T.evaluate(T.cuda.func_call(
                    f"{name}_merge", part_out.data, part_lse.data, out.data, T.Cast("int32", n_t_var),
                    T.Cast("int32", splits), source_code=merge_source(name, n_heads, head_dim)))

    return attention
