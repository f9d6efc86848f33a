"""Per-row argmax of the logits and its softmax probability on CUDA.

Same contract as logits.argmax_prob: argmax[t] = the first index of row t's maximum,
prob[t] = 1 / sum_j exp(logits[t, j] - max). dlight schedules that TIR as three passes over
the row by one block of 256 threads, 512 dependent scalar loads per thread and pass: at the
14B vocabulary (131072) tens of microseconds at every decode step, on one multiprocessor.

Here a row is cut into chunks of THREADS * 32 logits, one block each (16 at 131072). A thread
issues all eight of its 16-byte loads first, then folds its 32 values into an online triple
(max, first index of the max, sum of exp(l - max)); warps merge triples by shuffles, the
block through shared memory; the last block of a row to finish (a ticket, as in the split-K
matmul) merges the chunks' triples in chunk order, so the result does not depend on timing.
Rows per call: at most MAX_ROWS (decode 1, a block <= 64, a prefill's last row).
"""
from __future__ import annotations

import math

from trimode.runtime.forward import MAX_BLOCK

THREADS = 256
PER_THREAD = 32           # logits per thread: eight 16-byte loads in flight
MAX_ROWS = MAX_BLOCK
LOG2E = math.log2(math.e)


def chunks(vocab: int, threads: int = THREADS) -> int:
    return -(-vocab // (threads * PER_THREAD))


def source(name: str, vocab: int, threads: int = THREADS) -> str:
    n_chunks = chunks(vocab, threads)
    scratch = "" if n_chunks == 1 else rf"""
// each chunk's triple, [row][chunk], and per row how many chunks have finished (the last
// one resets it, so every launch finds zeros)
__device__ float {name}_tops[{MAX_ROWS * n_chunks}], {name}_totals[{MAX_ROWS * n_chunks}];
__device__ int {name}_firsts[{MAX_ROWS * n_chunks}];
__device__ unsigned {name}_tickets[{MAX_ROWS}];
"""
    publish = r"""
    argmax[row] = first;
    prob[row] = 1.f / total;""" if n_chunks == 1 else rf"""
    {name}_tops[row * CHUNKS + chunk] = top;
    {name}_firsts[row * CHUNKS + chunk] = first;
    {name}_totals[row * CHUNKS + chunk] = total;
    __threadfence();
    if (atomicAdd(&{name}_tickets[row], 1u) == CHUNKS - 1) {{  // the row's last chunk
      __threadfence();
      top = __ldcg(&{name}_tops[row * CHUNKS]);
      first = __ldcg(&{name}_firsts[row * CHUNKS]);
      total = __ldcg(&{name}_totals[row * CHUNKS]);
      for (int c = 1; c < CHUNKS; ++c)
        {name}_merge(top, first, total, __ldcg(&{name}_tops[row * CHUNKS + c]),
                     __ldcg(&{name}_firsts[row * CHUNKS + c]), __ldcg(&{name}_totals[row * CHUNKS + c]));
      argmax[row] = first;
      prob[row] = 1.f / total;
      {name}_tickets[row] = 0u;
    }}"""
    return scratch + rf"""
// (max, first index of it, sum of exp(l - max)): merging two such triples of disjoint index sets
__device__ __forceinline__ void {name}_merge(float& top, int& first, float& total, float top2, int first2, float total2) {{
  const float both = fmaxf(top, top2);
  total = total * exp2f((top - both) * {LOG2E}f) + total2 * exp2f((top2 - both) * {LOG2E}f);
  first = top2 > top ? first2 : (top2 == top ? min(first, first2) : first);
  top = both;
}}
__device__ __forceinline__ void {name}_take(float& top, int& first, float& total, float value, int index) {{
  if (value > top) {{  // a thread's indices increase: ties keep the first
    total = total * exp2f((top - value) * {LOG2E}f) + 1.f;
    top = value;
    first = index;
  }} else {{
    total += exp2f((value - top) * {LOG2E}f);
  }}
}}
__device__ __forceinline__ void {name}(const float* __restrict__ logits, int* __restrict__ argmax,
                                       float* __restrict__ prob) {{
  constexpr int V = {vocab}, THREADS = {threads}, WARPS = THREADS / 32, CHUNKS = {n_chunks};
  constexpr int PER_THREAD = {PER_THREAD}, CHUNK = THREADS * PER_THREAD;
  const int row = blockIdx.x, chunk = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (row >= {MAX_ROWS}) __trap();  // the scratch holds MAX_ROWS rows
  const float* l = logits + (size_t)row * V;
  const int begin = chunk * CHUNK;
  // -FLT_MAX, not -inf: exp2f of (-FLT_MAX) - finite is 0, never inf - inf
  float top = -3.402823466e38f, total = 0.f;
  int first = 0x7fffffff;
  if (V % 4 == 0) {{  // 16-byte loads (every row starts 16-byte aligned), all issued first
    float4 v[PER_THREAD / 4];
#pragma unroll
    for (int u = 0; u < PER_THREAD / 4; ++u) {{
      const int at = begin + 4 * (u * THREADS + threadIdx.x);
      v[u] = at < V ? __ldg(reinterpret_cast<const float4*>(l + at)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }}
#pragma unroll
    for (int u = 0; u < PER_THREAD / 4; ++u) {{
      const int at = begin + 4 * (u * THREADS + threadIdx.x);
      if (at >= V) break;
      {name}_take(top, first, total, v[u].x, at);
      {name}_take(top, first, total, v[u].y, at + 1);
      {name}_take(top, first, total, v[u].z, at + 2);
      {name}_take(top, first, total, v[u].w, at + 3);
    }}
  }} else {{
    float v[PER_THREAD];
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {{
      const int at = begin + u * THREADS + threadIdx.x;
      v[u] = at < V ? __ldg(l + at) : 0.f;
    }}
#pragma unroll
    for (int u = 0; u < PER_THREAD; ++u) {{
      const int at = begin + u * THREADS + threadIdx.x;
      if (at >= V) break;
      {name}_take(top, first, total, v[u], at);
    }}
  }}
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {{
    const float top2 = __shfl_xor_sync(0xffffffffu, top, offset);
    const int first2 = __shfl_xor_sync(0xffffffffu, first, offset);
    const float total2 = __shfl_xor_sync(0xffffffffu, total, offset);
    {name}_merge(top, first, total, top2, first2, total2);
  }}
  __shared__ float tops[WARPS], totals[WARPS];
  __shared__ int firsts[WARPS];
  if (lane == 0) {{
    tops[warp] = top;
    firsts[warp] = first;
    totals[warp] = total;
  }}
  __syncthreads();
  if (threadIdx.x == 0) {{
    for (int w = 1; w < WARPS; ++w) {name}_merge(top, first, total, tops[w], firsts[w], totals[w]);{publish}
  }}
}}
"""


def argmax_prob_cuda(vocab: int):
    """PrimFunc: logits float32 [t, vocab] (t <= MAX_ROWS) -> argmax int32 [t], prob float32 [t]."""
    from tvm.script import tirx as T

    name = f"trimode_argmax_prob_v{vocab}"
    code = source(name, vocab)

    # s_tir: Relax's reshape detection (RewriteDataflowReshape) inspects every one-input
    # kernel and expects the root block s_tir functions have
    @T.prim_func(private=True, s_tir=True)
    def argmax_prob(logits_handle: T.handle, argmax_handle: T.handle, prob_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        t = T.int64()
        logits = T.match_buffer(logits_handle, (t, T.int64(vocab)), "float32")
        argmax = T.match_buffer(argmax_handle, (t,), "int32")
        prob = T.match_buffer(prob_handle, (t,), "float32")
        with T.sblock("root"):
            T.reads(logits[0:t, 0:vocab])
            T.writes(argmax[0:t], prob[0:t])
            bx = T.launch_thread("blockIdx.x", T.Cast("int32", t))
            by = T.launch_thread("blockIdx.y", chunks(vocab))
            tx = T.launch_thread("threadIdx.x", THREADS)
            T.evaluate(T.cuda.func_call(name, logits.data, argmax.data, prob.data, source_code=code))

    return argmax_prob
