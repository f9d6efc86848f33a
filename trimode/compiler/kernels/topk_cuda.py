"""Each row's TOP_CANDIDATES largest logits and their ids, on CUDA: what a sampler with top-k
needs of a row, a few hundred bytes instead of the whole row (512 KB at the 14B vocabulary).

Cut as argmax_cuda.py cuts a row: chunks of THREADS * 32 logits, one block each. A block
picks its chunk's K largest by K rounds of a block-wide argmax, each thread holding its 32
(value, id) pairs in registers and a mask of those already picked; the row's last block to
finish (a ticket) picks the row's K among the chunks' the same way. Order: falling value,
ties by the smaller id, so the result does not depend on timing. Slots past the row's
tokens (vocab < K) hold id -1.
"""
from __future__ import annotations

from trimode.runtime.forward import MAX_BLOCK, TOP_CANDIDATES

THREADS = 256
PER_THREAD = 32           # logits per thread, as in argmax_cuda: eight 16-byte loads
MAX_ROWS = MAX_BLOCK
K = TOP_CANDIDATES


def chunks(vocab: int, threads: int = THREADS) -> int:
    return -(-vocab // (threads * PER_THREAD))


def source(name: str, vocab: int, threads: int = THREADS) -> str:
    n_chunks = chunks(vocab, threads)
    merge_per_thread = -(-n_chunks * K // threads)
    if merge_per_thread > 32:  # one 32-bit mask of picked pairs per thread
        raise ValueError(f"top-{K} of a {vocab}-token row needs more than {32 * threads // K} chunks")
    select_into_output = rf"""
  {name}_select<PER_THREAD>(v, at, values + (size_t)row * K, ids + (size_t)row * K, true);"""
    if n_chunks > 1:
        select_into_output = rf"""
  {name}_select<PER_THREAD>(v, at, {name}_values + (row * CHUNKS + chunk) * K,
                            {name}_ids + (row * CHUNKS + chunk) * K, false);
  __shared__ bool last;
  if (threadIdx.x == 0) {{
    __threadfence();
    last = atomicAdd(&{name}_tickets[row], 1u) == CHUNKS - 1;
  }}
  __syncthreads();
  if (!last) return;
  __threadfence();
  constexpr int MERGE = {merge_per_thread};
  float mv[MERGE];
  int mat[MERGE];
#pragma unroll
  for (int u = 0; u < MERGE; ++u) {{
    const int i = u * THREADS + threadIdx.x;
    mv[u] = i < CHUNKS * K ? __ldcg(&{name}_values[row * CHUNKS * K + i]) : NONE_VALUE;
    mat[u] = i < CHUNKS * K ? __ldcg(&{name}_ids[row * CHUNKS * K + i]) : NONE_ID;
  }}
  {name}_select<MERGE>(mv, mat, values + (size_t)row * K, ids + (size_t)row * K, true);
  if (threadIdx.x == 0) {name}_tickets[row] = 0u;  // the next launch finds zeros"""
    scratch = "" if n_chunks == 1 else rf"""
// each chunk's K pairs, [row][chunk][K], and per row how many chunks have finished
__device__ float {name}_values[{MAX_ROWS * n_chunks * K}];
__device__ int {name}_ids[{MAX_ROWS * n_chunks * K}];
__device__ unsigned {name}_tickets[{MAX_ROWS}];
"""
    return scratch + rf"""
// (value, id) pairs in the order picked: a larger value first, then the smaller id
__device__ __forceinline__ bool {name}_before(float v, int i, float w, int j) {{
  return v > w || (v == w && i < j);
}}
template <int N>
__device__ __forceinline__ void {name}_best(const float (&v)[N], const int (&at)[N], unsigned taken,
                                            float& best, int& best_at) {{
  best = -3.402823466e38f;
  best_at = 0x7fffffff;
#pragma unroll
  for (int u = 0; u < N; ++u)
    if (!((taken >> u) & 1u) && {name}_before(v[u], at[u], best, best_at)) {{
      best = v[u];
      best_at = at[u];
    }}
}}
// K rounds of a block-wide argmax over every thread's N pairs: thread 0 writes the block's
// first K pairs in order (ids of pairs that are none as -1 when `final`)
template <int N>
__device__ __forceinline__ void {name}_select(const float (&v)[N], const int (&at)[N], float* out_values,
                                              int* out_ids, bool final) {{
  constexpr int THREADS = {threads}, WARPS = THREADS / 32, K = {K};
  __shared__ float picked_value[WARPS + 1];
  __shared__ int picked_id[WARPS + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned taken = 0u;
  float best;
  int best_at;
  {name}_best<N>(v, at, taken, best, best_at);
  for (int r = 0; r < K; ++r) {{
    float b = best;
    int bi = best_at;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {{
      const float b2 = __shfl_xor_sync(0xffffffffu, b, offset);
      const int bi2 = __shfl_xor_sync(0xffffffffu, bi, offset);
      if ({name}_before(b2, bi2, b, bi)) {{
        b = b2;
        bi = bi2;
      }}
    }}
    if (lane == 0) {{
      picked_value[warp] = b;
      picked_id[warp] = bi;
    }}
    __syncthreads();
    if (threadIdx.x == 0) {{
      for (int w = 1; w < WARPS; ++w)
        if ({name}_before(picked_value[w], picked_id[w], b, bi)) {{
          b = picked_value[w];
          bi = picked_id[w];
        }}
      picked_value[WARPS] = b;
      picked_id[WARPS] = bi;
      out_values[r] = b;
      out_ids[r] = final && bi == 0x7fffffff ? -1 : bi;
    }}
    __syncthreads();
    const int won = picked_id[WARPS];
    if (won == best_at && won != 0x7fffffff) {{  // ids are unique: this thread held the pick
#pragma unroll
      for (int u = 0; u < N; ++u) taken |= (at[u] == won ? 1u : 0u) << u;
      {name}_best<N>(v, at, taken, best, best_at);
    }}
  }}
}}
__device__ __forceinline__ void {name}(const float* __restrict__ logits, float* __restrict__ values,
                                       int* __restrict__ ids) {{
  constexpr int V = {vocab}, THREADS = {threads}, CHUNKS = {n_chunks}, K = {K};
  constexpr int PER_THREAD = {PER_THREAD}, CHUNK = THREADS * PER_THREAD;
  constexpr float NONE_VALUE = -3.402823466e38f;
  constexpr int NONE_ID = 0x7fffffff;
  const int row = blockIdx.x, chunk = blockIdx.y;
  if (row >= {MAX_ROWS}) __trap();  // the scratch holds MAX_ROWS rows
  const float* l = logits + (size_t)row * V;
  const int begin = chunk * CHUNK;
  float v[PER_THREAD];
  int at[PER_THREAD];
  if (V % 4 == 0) {{  // 16-byte loads (every row starts 16-byte aligned), all issued first
#pragma unroll
    for (int u = 0; u < PER_THREAD / 4; ++u) {{
      const int a = begin + 4 * (u * THREADS + threadIdx.x);
      const float4 x = a < V ? __ldg(reinterpret_cast<const float4*>(l + a)) : make_float4(NONE_VALUE, NONE_VALUE, NONE_VALUE, NONE_VALUE);
      v[4 * u] = x.x;
      v[4 * u + 1] = x.y;
      v[4 * u + 2] = x.z;
      v[4 * u + 3] = x.w;
#pragma unroll
      for (int j = 0; j < 4; ++j) at[4 * u + j] = a < V ? a + j : NONE_ID;
    }}
  }} else {{
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {{
      const int a = begin + u * THREADS + threadIdx.x;
      v[u] = a < V ? __ldg(l + a) : NONE_VALUE;
      at[u] = a < V ? a : NONE_ID;
    }}
  }}{select_into_output}
}}
"""


def top_candidates_cuda(vocab: int):
    """PrimFunc: logits float32 [t, vocab] (t <= MAX_ROWS) -> values float32 [t, K] and ids
    int32 [t, K], each row's K largest logits in falling order (ties: the smaller id first)."""
    from tvm.script import tirx as T

    name = f"trimode_top_candidates_v{vocab}"
    code = source(name, vocab)

    @T.prim_func(private=True, s_tir=True)
    def top_candidates(logits_handle: T.handle, values_handle: T.handle, ids_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        t = T.int64()
        logits = T.match_buffer(logits_handle, (t, T.int64(vocab)), "float32")
        values = T.match_buffer(values_handle, (t, T.int64(K)), "float32")
        ids = T.match_buffer(ids_handle, (t, T.int64(K)), "int32")
        with T.sblock("root"):
            T.reads(logits[0:t, 0:vocab])
            T.writes(values[0:t, 0:K], ids[0:t, 0:K])
            bx = T.launch_thread("blockIdx.x", T.Cast("int32", t))
            by = T.launch_thread("blockIdx.y", chunks(vocab))
            tx = T.launch_thread("threadIdx.x", THREADS)
            T.evaluate(T.cuda.func_call(name, logits.data, values.data, ids.data, source_code=code))

    return top_candidates
