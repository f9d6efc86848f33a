"""Q8_0 matmul on CUDA: y[m, n] = sum_k x[m, k] * (q[n, k] * scale[n, k // 32]).

x float16 [m, k], q int8 [n, k] (row n = output feature, k contiguous), scale float16
[n, k // 32], fp32 accumulation, y float16 [m, n].

Two hand-written kernels, each a CUDA C++ device function that TVM launches through
`T.cuda.func_call` (TVM owns the launch, the argument passing and the packaging; the library
carries the compiled fatbin and loads with the runtime libraries alone):

- `gemv` (m <= 4, decode): CUDA cores. Each lane streams 16-byte int8 loads of `rows_per_warp`
  weight rows; the warps of a block split K (split-K inside the block), so small N still fills
  the GPU. int8 -> float by the exponent trick (one byte-permute and one add per element).
- `mma` (blocks of m <= 64, and prefill in 64-row slabs): tensor cores, mma.sync m16n8k16
  fp16 x fp16 -> fp32. Each thread loads 16 contiguous int8 of one weight row and 16
  contiguous fp16 of two x rows, and both operands use the same permutation of k inside each
  64-k chunk, so the fragments come straight from 16-byte loads (no shared memory, no
  ldmatrix). Weights are dequantized to fp16 in registers once for all m rows (the reason the
  block pass costs about what decode costs). K is split over the warps of a block.

Tiling is chosen in plain Python below (`default_schedule`); `trimode tune` measures other
schedules and `trimode.schedules.lookup` hands them back as the `schedule` dict.
"""
from __future__ import annotations

from trimode.model.config import ModelError
from trimode.model.weights import Q8_BLOCK

MMA_ROWS = 16          # rows of x per mma m-tile
MMA_COLS = 8           # weight rows (output features) per mma n-tile
MMA_K_CHUNK = 64       # k covered by one 16-byte load per thread of a 4-thread group
GEMV_K_CHUNK = 32 * 16  # k covered by one 16-byte load per lane of a warp
GEMV_MAX_M = 4
MMA_MAX_M = 64         # rows of x one block handles (4 m-tiles); prefill tiles m by this
STATIC_SHARED_BYTES = 48 * 1024
KINDS = ("gemv", "mma")


def default_schedule(n: int, k: int, m) -> dict:
    """The schedule used when the GPU has no tuned entry: decode reads with CUDA cores,
    everything else with tensor cores; split K further when N alone gives too few blocks."""
    few_rows = n < 8192  # o, qkv, down at 14B: N/8 warps would not fill 132 SMs deeply
    if m != "dynamic" and m <= 1:
        return {"kind": "gemv", "rows_per_warp": 2, "k_warps": 4 if few_rows else 2}
    return {"kind": "mma", "n_tiles": 2 if few_rows else 4, "k_warps": 4}


def q8_matmul(n: int, k: int, m, dtype: str = "float16", target=None, schedule: dict | None = None):
    """PrimFunc (no global symbol) computing y[m, n] from x [m, k], q [n, k], scale [n, k/32].

    m: an int (1 for decode, <= 64 for a verify/draft block) or "dynamic" (prefill; symbolic
    rows). target is accepted for the factory interface; the code is sm_80+ CUDA C++.
    """
    _check_shape(n, k, m, dtype)
    schedule = dict(schedule or default_schedule(n, k, m))
    kind = schedule.get("kind")
    if kind == "gemv":
        if m == "dynamic" or m > GEMV_MAX_M:
            raise ModelError(f"the gemv kernel handles m <= {GEMV_MAX_M}, not m={m}")
        return _q8_gemv(n, k, m, schedule["rows_per_warp"], schedule["k_warps"])
    if kind == "mma":
        return _q8_mma(n, k, m, schedule["n_tiles"], schedule["k_warps"])
    raise ModelError(f"unknown q8 matmul schedule kind {kind!r} (expected one of {KINDS})")


def schedule_candidates(n: int, k: int, m) -> list[dict]:
    """The schedules `trimode tune` measures for one shape and m."""
    candidates = []
    if m != "dynamic" and m <= GEMV_MAX_M:
        for rows in (1, 2, 4):
            for k_warps in (2, 4, 8):
                candidates.append({"kind": "gemv", "rows_per_warp": rows, "k_warps": k_warps})
    m_tiles = _m_tiles(m)
    # 8 n-tiles halve the x re-reads per weight byte but need 64 more registers: m <= 32 only
    for n_tiles in (1, 2, 4) if m_tiles > 2 else (1, 2, 4, 8):
        for k_warps in (2, 4, 8):
            if _mma_shared_bytes(m_tiles, n_tiles, k_warps) <= STATIC_SHARED_BYTES:
                candidates.append({"kind": "mma", "n_tiles": n_tiles, "k_warps": k_warps})
    return candidates


def schedule_name(schedule: dict) -> str:
    """A short stable name for a schedule, e.g. 'mma_nt4_kw4'."""
    if schedule["kind"] == "gemv":
        return f"gemv_r{schedule['rows_per_warp']}_kw{schedule['k_warps']}"
    return f"mma_nt{schedule['n_tiles']}_kw{schedule['k_warps']}"


def _check_shape(n, k, m, dtype):
    if dtype != "float16":
        raise ModelError(f"the CUDA Q8_0 matmul takes float16 activations, not {dtype}")
    if n < 1 or k < Q8_BLOCK or k % Q8_BLOCK:
        raise ModelError(f"Q8_0 matmul needs n >= 1 and k a positive multiple of 32, got n={n} k={k}")
    if m != "dynamic" and not (isinstance(m, int) and 1 <= m <= MMA_MAX_M):
        raise ModelError(f"m must be 1..{MMA_MAX_M} or 'dynamic', got {m!r}")


def _m_tiles(m) -> int:
    rows = MMA_MAX_M if m == "dynamic" else m
    return -(-rows // MMA_ROWS)


def _mma_shared_bytes(m_tiles, n_tiles, k_warps) -> int:
    # warps 1.. of a block park their fp32 fragments (4 per thread per tile) for warp 0 to sum
    return max(k_warps - 1, 0) * m_tiles * n_tiles * 4 * 32 * 4


# ---------------------------------------------------------------------------------------------
# CUDA C++ sources. Each device function is fully specialized (its name carries every constant)
# so several shapes can share one module without clashing definitions.

_COMMON = r"""
// int8 weights arrive as 4 bytes per word; x ^ 0x80 turns each into u = q + 128 in [0, 255].
__device__ __forceinline__ float trimode_q8_byte_as_float(unsigned u, unsigned selector) {
  // bytes [u_i, 0, 0, 0x4B] is the float 2^23 + u_i exactly; subtract 2^23 + 128 to get q_i
  return __uint_as_float(__byte_perm(u, 0x4B000000u, selector)) - 8388736.0f;
}
__device__ __forceinline__ unsigned trimode_q8_pair_as_half2(unsigned u, unsigned selector) {
  // bytes [u_i, 0x64, u_j, 0x64] is the half2 (1024 + u_i, 1024 + u_j) exactly
  return __byte_perm(u, 0x64646464u, selector);
}
"""


def _gemv_source(name, n, k, m, rows_per_warp, k_warps):
    return _COMMON.replace("trimode_q8_", f"{name}_") + rf"""
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y) {{
  constexpr int N = {n}, K = {k}, M = {m}, R = {rows_per_warp}, KW = {k_warps};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * R;
  float acc[M][R];
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.f;
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = min(n0 + r, N - 1);  // tail rows recompute row N-1

#pragma unroll 2
  for (int kk = (warp * 32 + lane) * 16; kk < K; kk += KW * 32 * 16) {{
    uint4 w[R];
    float sc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {{
      w[r] = __ldg(reinterpret_cast<const uint4*>(q + (size_t)rows[r] * K + kk));
      sc[r] = __half2float(__ldg(s + (size_t)rows[r] * (K / 32) + kk / 32));
    }}
#pragma unroll
    for (int i = 0; i < M; ++i) {{
      float xf[16];
      const uint4 xa = __ldg(reinterpret_cast<const uint4*>(x + (size_t)i * K + kk));
      const uint4 xb = __ldg(reinterpret_cast<const uint4*>(x + (size_t)i * K + kk + 8));
      const unsigned xw[8] = {{xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w}};
#pragma unroll
      for (int j = 0; j < 8; ++j) {{
        const float2 f = __half22float2(*reinterpret_cast<const half2*>(&xw[j]));
        xf[2 * j] = f.x;
        xf[2 * j + 1] = f.y;
      }}
#pragma unroll
      for (int r = 0; r < R; ++r) {{
        const unsigned ww[4] = {{w[r].x ^ 0x80808080u, w[r].y ^ 0x80808080u,
                                 w[r].z ^ 0x80808080u, w[r].w ^ 0x80808080u}};
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {{
          part = fmaf(xf[4 * j + 0], {name}_byte_as_float(ww[j], 0x7540u), part);
          part = fmaf(xf[4 * j + 1], {name}_byte_as_float(ww[j], 0x7541u), part);
          part = fmaf(xf[4 * j + 2], {name}_byte_as_float(ww[j], 0x7542u), part);
          part = fmaf(xf[4 * j + 3], {name}_byte_as_float(ww[j], 0x7543u), part);
        }}
        acc[i][r] = fmaf(sc[r], part, acc[i][r]);
      }}
    }}
  }}

#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[i][r] += __shfl_xor_sync(0xffffffffu, acc[i][r], off);

  __shared__ float parts[KW][M * R];
  if (lane == 0) {{
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
      for (int r = 0; r < R; ++r) parts[warp][i * R + r] = acc[i][r];
  }}
  __syncthreads();
  if (threadIdx.x < M * R) {{
    const int i = threadIdx.x / R, r = threadIdx.x % R;
    float total = 0.f;
#pragma unroll
    for (int v = 0; v < KW; ++v) total += parts[v][threadIdx.x];
    if (n0 + r < N) y[(size_t)i * N + n0 + r] = __float2half_rn(total);
  }}
}}
"""


def _mma_source(name, n, k, m_tiles, n_tiles, k_warps):
    shared_floats = max(_mma_shared_bytes(m_tiles, n_tiles, k_warps) // 4, 1)
    return _COMMON.replace("trimode_q8_", f"{name}_") + rf"""
__device__ __forceinline__ void {name}_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {{
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, {{%8, %9}}, {{%0, %1, %2, %3}};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}}

// Rows [blockIdx.y * 16 * MT, +16 * MT) of x and y; weight rows [blockIdx.x * 8 * NT, +8 * NT).
// mma fragment layout (PTX ISA, m16n8k16 f16): lane = 4 * g + t. A holds (row g | g + 8,
// k 2t, 2t+1 | 2t+8, 2t+9), B holds (k 2t, 2t+1 | 2t+8, 2t+9, col g), C holds (row g | g + 8,
// col 2t, 2t+1). Here logical k (2t + e | 2t + 8 + e) of step j is physical k
// chunk + 16t + 4j + (e | 2 + e): the same bijection for A and B, so the sum is unchanged and
// every thread's operands are 16 contiguous elements.
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y, int m) {{
  constexpr int N = {n}, K = {k}, MT = {m_tiles}, NT = {n_tiles}, KW = {k_warps};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 8 * NT;
  const int m0 = blockIdx.y * 16 * MT;
  float c[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;
  int wrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) wrow[j] = min(n0 + 8 * j + g, N - 1);  // tail: recompute N-1
  int xrow[MT][2];
  bool xok[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {{
      const int row = m0 + 16 * i + 8 * h + g;
      xok[i][h] = row < m;
      xrow[i][h] = xok[i][h] ? row : 0;
    }}
  const unsigned half2_1152 = 0x64806480u;  // (1152, 1152) = 1024 + 128

  for (int chunk = warp; chunk * 64 < K; chunk += KW) {{
    const int kk = chunk * 64 + 16 * t;
    const bool kok = kk < K;  // K % 32 == 0, so a started 16-element run is whole
    uint4 raw[NT];
    unsigned sc2[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {{
      raw[j] = kok ? __ldg(reinterpret_cast<const uint4*>(q + (size_t)wrow[j] * K + kk))
                   : make_uint4(0x80808080u, 0x80808080u, 0x80808080u, 0x80808080u);
      const half sh = kok ? __ldg(s + (size_t)wrow[j] * (K / 32) + kk / 32) : __float2half_rn(0.f);
      const half2 s2 = __halves2half2(sh, sh);
      sc2[j] = *reinterpret_cast<const unsigned*>(&s2);
    }}
    // dequantize: b[j][2 * w + h] holds bytes (2h, 2h + 1) of word w, times the block scale
    unsigned b[NT][8];
#pragma unroll
    for (int j = 0; j < NT; ++j) {{
      const unsigned ww[4] = {{raw[j].x ^ 0x80808080u, raw[j].y ^ 0x80808080u,
                               raw[j].z ^ 0x80808080u, raw[j].w ^ 0x80808080u}};
#pragma unroll
      for (int w = 0; w < 4; ++w) {{
#pragma unroll
        for (int h = 0; h < 2; ++h) {{
          const unsigned biased = {name}_pair_as_half2(ww[w], h ? 0x4342u : 0x4140u);
          half2 v = __hsub2(*reinterpret_cast<const half2*>(&biased),
                            *reinterpret_cast<const half2*>(&half2_1152));
          v = __hmul2(v, *reinterpret_cast<const half2*>(&sc2[j]));
          b[j][2 * w + h] = *reinterpret_cast<const unsigned*>(&v);
        }}
      }}
    }}
#pragma unroll
    for (int i = 0; i < MT; ++i) {{
      unsigned a[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {{
        uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
        if (kok && xok[i][h]) {{
          const half* p = x + (size_t)xrow[i][h] * K + kk;
          lo = __ldg(reinterpret_cast<const uint4*>(p));
          hi = __ldg(reinterpret_cast<const uint4*>(p + 8));
        }}
        a[h][0] = lo.x; a[h][1] = lo.y; a[h][2] = lo.z; a[h][3] = lo.w;
        a[h][4] = hi.x; a[h][5] = hi.y; a[h][6] = hi.z; a[h][7] = hi.w;
      }}
#pragma unroll
      for (int step = 0; step < 4; ++step) {{
        const unsigned frag[4] = {{a[0][2 * step], a[1][2 * step], a[0][2 * step + 1], a[1][2 * step + 1]}};
#pragma unroll
        for (int j = 0; j < NT; ++j) {name}_mma(c[i][j], frag, b[j][2 * step], b[j][2 * step + 1]);
      }}
    }}
  }}

  if (KW > 1) {{
    __shared__ float parts[{shared_floats}];
    if (warp > 0) {{
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) parts[(((warp - 1) * MT + i) * NT * 4 + j * 4 + e) * 32 + lane] = c[i][j][e];
    }}
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int v = 1; v < KW; ++v)
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) c[i][j][e] += parts[(((v - 1) * MT + i) * NT * 4 + j * 4 + e) * 32 + lane];
  }}
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {{
      if (!xok[i][h]) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {{
          const int col = n0 + 8 * j + 2 * t + e;
          if (col < N) y[(size_t)xrow[i][h] * N + col] = __float2half_rn(c[i][j][2 * h + e]);
        }}
    }}
}}
"""


# ---------------------------------------------------------------------------------------------
# TIR wrappers: launch the grid, hand the buffers to the device function.

def _q8_gemv(n, k, m, rows_per_warp, k_warps):
    from tvm.script import tirx as T

    name = f"trimode_q8_gemv_n{n}_k{k}_m{m}_r{rows_per_warp}_kw{k_warps}"
    source = _gemv_source(name, n, k, m, rows_per_warp, k_warps)
    blocks = -(-n // rows_per_warp)
    threads = 32 * k_warps

    @T.prim_func(private=True)
    def q8_gemv(x: T.Buffer((T.int64(m), T.int64(k)), "float16"),
                q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"),
                y: T.Buffer((T.int64(m), T.int64(n)), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        bx = T.launch_thread("blockIdx.x", blocks)
        tx = T.launch_thread("threadIdx.x", threads)
        T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data, source_code=source))

    return q8_gemv


def _q8_mma(n, k, m, n_tiles, k_warps):
    from tvm.script import tirx as T

    m_tiles = _m_tiles(m)
    if _mma_shared_bytes(m_tiles, n_tiles, k_warps) > STATIC_SHARED_BYTES:
        raise ModelError(f"mma schedule n_tiles={n_tiles} k_warps={k_warps} needs more than 48 KB "
                         "of shared memory")
    rows_tag = "dyn" if m == "dynamic" else str(m)
    name = f"trimode_q8_mma_n{n}_k{k}_m{rows_tag}_nt{n_tiles}_kw{k_warps}"
    source = _mma_source(name, n, k, m_tiles, n_tiles, k_warps)
    blocks = -(-n // (MMA_COLS * n_tiles))
    threads = 32 * k_warps
    slab = MMA_ROWS * m_tiles

    if m == "dynamic":
        @T.prim_func(private=True)
        def q8_mma(x_handle: T.handle, q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                   s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"), y_handle: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
            rows = T.int64()
            x = T.match_buffer(x_handle, (rows, T.int64(k)), "float16")
            y = T.match_buffer(y_handle, (rows, T.int64(n)), "float16")
            bx = T.launch_thread("blockIdx.x", blocks)
            by = T.launch_thread("blockIdx.y", T.Cast("int32", (rows + slab - 1) // slab))
            tx = T.launch_thread("threadIdx.x", threads)
            T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data, T.Cast("int32", rows),
                                        source_code=source))

        return q8_mma

    @T.prim_func(private=True)
    def q8_mma(x: T.Buffer((T.int64(m), T.int64(k)), "float16"),
               q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
               s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"),
               y: T.Buffer((T.int64(m), T.int64(n)), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        bx = T.launch_thread("blockIdx.x", blocks)
        by = T.launch_thread("blockIdx.y", 1)
        tx = T.launch_thread("threadIdx.x", threads)
        T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data, m, source_code=source))

    return q8_mma
