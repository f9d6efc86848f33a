"""Each row's softmax mass at a temperature, chunk by chunk, on CUDA: what a sampler without
top-k needs of a row (1 KB at the 14B vocabulary instead of 512 KB), the row itself fetched
only a chunk at a time, where a draw lands.

A block per (row, chunk of MASS_CHUNK logits): the chunk's max m and its sum of
exp((l - m) / temperature). Chunks are independent (no scratch, no ticket): the host scales
them to a common reference, max over chunks, in float64.
"""
from __future__ import annotations

import math

from trimode.runtime.forward import MASS_CHUNK, mass_chunks as chunks  # noqa: F401 (chunks: the grid)

THREADS = 128
PER_THREAD = MASS_CHUNK // THREADS  # coalesced scalar loads: a row's chunk is 4 KB
LOG2E = math.log2(math.e)


def source(name: str, vocab: int) -> str:
    return rf"""
__device__ __forceinline__ void {name}(const float* __restrict__ logits,
                                       const float* __restrict__ inv_temperature,
                                       float* __restrict__ chunk_max, float* __restrict__ chunk_sum) {{
  constexpr int V = {vocab}, THREADS = {THREADS}, WARPS = THREADS / 32, CHUNKS = {chunks(vocab)};
  constexpr int PER_THREAD = {PER_THREAD}, CHUNK = {MASS_CHUNK};
  constexpr float LOWEST = -3.402823466e38f;  // not -inf: (LOWEST - m) * s is finite or -inf, never NaN
  const int row = blockIdx.x, chunk = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* l = logits + (size_t)row * V + chunk * CHUNK;
  const int n = min(CHUNK, V - chunk * CHUNK);
  __shared__ float partial[WARPS];
  float v[PER_THREAD];
  float m = LOWEST;
#pragma unroll
  for (int u = 0; u < PER_THREAD; ++u) {{
    const int i = u * THREADS + threadIdx.x;
    v[u] = i < n ? __ldg(l + i) : LOWEST;
    m = fmaxf(m, v[u]);
  }}
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (lane == 0) partial[warp] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < WARPS; ++w) m = fmaxf(m, partial[w]);
  __syncthreads();  // partial is reused for the sums
  const float scale = inv_temperature[0] * {LOG2E}f;
  float s = 0.f;
#pragma unroll
  for (int u = 0; u < PER_THREAD; ++u) {{
    const int i = u * THREADS + threadIdx.x;
    if (i < n) s += exp2f((v[u] - m) * scale);
  }}
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {{
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += partial[w];
    chunk_max[row * CHUNKS + chunk] = m;
    chunk_sum[row * CHUNKS + chunk] = total;
  }}
}}
"""


def chunk_mass_cuda(vocab: int):
    """PrimFunc: logits float32 [t, vocab], inv_temperature float32 [1] -> chunk_max and
    chunk_sum float32 [t, chunks(vocab)]: each chunk's largest logit m and its sum of
    exp((l - m) * inv_temperature)."""
    from tvm.script import tirx as T

    name = f"trimode_chunk_mass_v{vocab}"
    code = source(name, vocab)
    n_chunks = chunks(vocab)

    @T.prim_func(private=True, s_tir=True)
    def chunk_mass(logits_handle: T.handle, inv_t_handle: T.handle, max_handle: T.handle,
                   sum_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        t = T.int64()
        logits = T.match_buffer(logits_handle, (t, T.int64(vocab)), "float32")
        inv_t = T.match_buffer(inv_t_handle, (T.int64(1),), "float32")
        chunk_max = T.match_buffer(max_handle, (t, T.int64(n_chunks)), "float32")
        chunk_sum = T.match_buffer(sum_handle, (t, T.int64(n_chunks)), "float32")
        with T.sblock("root"):
            T.reads(logits[0:t, 0:vocab], inv_t[0:1])
            T.writes(chunk_max[0:t, 0:n_chunks], chunk_sum[0:t, 0:n_chunks])
            bx = T.launch_thread("blockIdx.x", T.Cast("int32", t))
            by = T.launch_thread("blockIdx.y", n_chunks)
            tx = T.launch_thread("threadIdx.x", THREADS)
            T.evaluate(T.cuda.func_call(name, logits.data, inv_t.data, chunk_max.data,
                                        chunk_sum.data, source_code=code))

    return chunk_mass
