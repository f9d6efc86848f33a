"""Q8_0 matmul on CUDA: y[m, n] = sum_k x[m, k] * (q[n, k] * scale[n, k // 32]).

x float16 [m, k], q int8 [n, k] (row n = output feature, k contiguous), scale float16
[n, k // 32], fp32 accumulation, y float16 [m, n].

Four hand-written kernels (on Hopper the last two also in a wgmma form), each a CUDA C++
device function that TVM launches through `T.cuda.func_call` (TVM owns the launch, the
argument passing and the packaging; the library carries the compiled fatbin and loads with
the runtime libraries alone). tests/cuda_emulator.h runs the same source on the CPU, which is
how the tests check them without a GPU.

- `gemv` (m <= 4, decode): CUDA cores. Each lane streams 16-byte int8 loads of `rows_per_warp`
  weight rows; the warps of a block split K (split-K inside the block), so small N still fills
  the GPU. int8 -> float by the exponent trick (one byte-permute and one add per element).
  By default each thread prefetches its weight lines into L2 before it waits for the previous
  kernel (grid_dependency.py); `"prefetch": False` waits first (a tuning choice: 8 fewer
  registers).
- `mma` (rows in 64-row slabs; a tuning candidate for blocks): tensor cores,
  mma.sync m16n8k16 fp16 x fp16 -> fp32. Each thread loads 16 contiguous int8 of one weight
  row and 16 contiguous fp16 of two x rows, and both operands use the same permutation of k
  inside each 64-k chunk, so the fragments come straight from 16-byte loads (no shared
  memory, no ldmatrix). Weights are dequantized to fp16 in registers once for all rows of
  the slab. K is split over the warps of a block.
- `mma_splitk` (verify and draft blocks, m <= 64 rows at run time): the same fragments, but
  the warps of a block split N and read x from shared memory (cp.async, one group of k
  ahead), so each x element crosses L2 once per NB = 8 * n_tiles * warps weight rows instead
  of once per 8 * n_tiles; blocks split K to fill the GPU, and the last block of each
  column tile sums the splits' fp32 partials in split order (deterministic). A tuning choice
  (`prefetch_groups`): each thread also asks L2 for its weights 2 or 4 groups ahead of its
  register loads (more bytes in flight than two groups of registers hold; 2 registers more).
  On Hopper (sm_90a) a tuning candidate in a second form: warpgroups of 64 weight rows on
  wgmma, the dequantized weights as its register operand, x from shared memory.
- `gemm` (prefill): 128 weight rows by 128 (or 64) rows of x a block, x and the dequantized
  weights staged in dynamic shared memory (2 to 4 cp.async stages of 32 or 64 k), ldmatrix +
  mma.sync; prompts of <= 64 rows go to an mma_splitk kernel instead. On Hopper (sm_90a) a
  tuning candidate: the same staging feeding wgmma (two warpgroups, 128 or 256 weight rows,
  both operands read from shared memory by the tensor cores).

Gated (gate_up): weight rows alternate gate, up, and every kernel's epilogue writes
silu(gate) * up of each row pair into y [m, n / 2] (`_store_pair`): the FFN activation costs
no launch and no [m, n] intermediate.

Row classes (`m`): an int (a static row count: 1 for decode), "block" (any m <= 64, given at
run time: one kernel serves every verify/draft T) or "dynamic" (any m: prefill).
Tiling is chosen in plain Python below (`default_schedule`); `trimode tune` measures other
schedules and `trimode.schedules.lookup` hands them back as the `schedule` dict.
"""
from __future__ import annotations

from dataclasses import dataclass

from trimode.compiler.kernels.cuda_ptx import WAITS_IN_KERNEL, ptx_helpers, wgmma_helpers
from trimode.model.config import ModelError
from trimode.model.weights import Q8_BLOCK

MMA_ROWS = 16          # rows of x per mma m-tile
MMA_COLS = 8           # weight rows (output features) per mma n-tile
MMA_K_CHUNK = 64       # k covered by one 16-byte load per thread of a 4-thread group
GEMV_K_CHUNK = 32 * 16  # k covered by one 16-byte load per lane of a warp
GEMV_MAX_M = 4
MMA_MAX_M = 64         # rows of x one block handles (4 m-tiles); prefill tiles m by this
STATIC_SHARED_BYTES = 48 * 1024
SPLITK_TARGET_BLOCKS = 2 * 132  # two blocks per multiprocessor of an H100/H200
KINDS = ("gemv", "mma", "mma_splitk", "gemm")
ROW_CLASSES = ("block", "dynamic")  # besides static row counts


@dataclass(frozen=True)
class SplitKPlan:
    """Tiling of the mma_splitk kernel for one (n, k)."""
    n_tiles: int  # mma n-tiles (8 weight rows each) per warp
    warps: int    # warps per block; they split N and share x
    k_group: int  # 64-k chunks per shared-memory stage of x (1 or 2: two stages fit 48 KB)
    splits: int   # blocks along K
    prefetch_groups: int = 0  # groups of weights asked into L2 ahead of the register loads
    wgmma: bool = False  # Hopper: warpgroups of 64 weight rows on wgmma, A (weights) from registers

    def rows_per_block(self) -> int:
        return MMA_COLS * self.n_tiles * self.warps

    def column_tiles(self, n: int) -> int:
        return -(-n // self.rows_per_block())

    def split_k(self, k: int) -> int:
        """k per split: whole groups, so no 64-k chunk straddles two splits."""
        group = MMA_K_CHUNK * self.k_group
        per_split = -(-k // self.splits)
        return -(-per_split // group) * group

    def shared_bytes(self) -> int:
        if self.wgmma:  # two stages of x as core matrices, no padding
            return 2 * MMA_MAX_M * MMA_K_CHUNK * self.k_group * 2
        return 2 * MMA_MAX_M * (MMA_K_CHUNK * self.k_group + 8) * 2  # two stages of x, fp16

    @classmethod
    def of(cls, n: int, k: int, schedule: dict) -> "SplitKPlan":
        """The plan a schedule names, its split count reduced to the splits that hold work."""
        mma = schedule.get("mma", "mma.sync")
        plan = cls(schedule["n_tiles"], schedule["warps"], schedule["k_group"], max(1, schedule["splits"]),
                   schedule.get("prefetch_groups", 0), mma == "wgmma")
        if plan.n_tiles < 1 or plan.warps < 1 or plan.warps * 32 > 1024 or plan.k_group < 1 or plan.prefetch_groups < 0:
            raise ModelError(f"mma_splitk schedule {schedule} is not a valid tiling")
        if mma not in ("mma.sync", "wgmma"):
            raise ModelError(f"mma_splitk schedule {schedule}: mma is 'mma.sync' or 'wgmma'")
        if plan.wgmma and (plan.n_tiles != 2 or plan.warps not in (4, 8) or plan.k_group > 2):
            raise ModelError(f"mma_splitk schedule {schedule}: wgmma takes warpgroups of 64 weight rows "
                             "(n_tiles 2, warps 4 or 8) and k_group 1 or 2")
        if plan.shared_bytes() > STATIC_SHARED_BYTES:
            raise ModelError(f"mma_splitk k_group={plan.k_group} needs more than 48 KB of shared memory")
        return cls(plan.n_tiles, plan.warps, plan.k_group, -(-k // plan.split_k(k)), plan.prefetch_groups, plan.wgmma)


def default_splits(n: int, k: int, n_tiles: int, warps: int, k_group: int) -> int:
    """Splits of K that bring the grid to about SPLITK_TARGET_BLOCKS blocks, none shorter
    than two stages of x."""
    column_tiles = SplitKPlan(n_tiles, warps, k_group, 1).column_tiles(n)
    most = max(1, k // (2 * MMA_K_CHUNK * k_group))
    return max(1, min(-(-SPLITK_TARGET_BLOCKS // column_tiles), most))


def _splitk_schedule(n, k, n_tiles, warps, k_group, splits=None, prefetch_groups=0, wgmma=False) -> dict:
    splits = default_splits(n, k, n_tiles, warps, k_group) if splits is None else splits
    plan = SplitKPlan.of(n, k, {"n_tiles": n_tiles, "warps": warps, "k_group": k_group, "splits": splits})
    schedule = {"kind": "mma_splitk", "n_tiles": n_tiles, "warps": warps, "k_group": k_group,
                "splits": plan.splits}
    if prefetch_groups:
        schedule["prefetch_groups"] = prefetch_groups
    return {**schedule, "mma": "wgmma"} if wgmma else schedule


def default_schedule(n: int, k: int, m) -> dict:
    """The schedule used when the GPU has no tuned entry: decode reads with CUDA cores,
    blocks with the split-K tensor-core kernel, prefill with the tiled GEMM."""
    few_rows = n < 8192  # o, qkv, down at 14B: N/8 warps would not fill 132 SMs deeply
    if m == "dynamic":
        return {"kind": "gemm", "tile_m": 128, "stages": 2, "k_stage": 32}
    if m != "block" and m <= 1:
        # warps split K by 512-k chunks: a count that divides them leaves no warp idle at the
        # end (qkv at 14B: 10 chunks, so 2 warps, not 4)
        chunks = -(-k // GEMV_K_CHUNK)
        k_warps = next(w for w in ((4, 2, 1) if few_rows else (2, 1)) if chunks % w == 0)
        return {"kind": "gemv", "rows_per_warp": 2, "k_warps": k_warps}
    return _splitk_schedule(n, k, n_tiles=2, warps=8, k_group=2)


def q8_matmul(n: int, k: int, m, dtype: str = "float16", target=None, schedule: dict | None = None,
              block_schedule: dict | None = None, gated: bool = False):
    """PrimFunc (no global symbol) computing y[m, n] from x [m, k], q [n, k], scale [n, k/32];
    gated: y[m, n / 2] = silu(gate) * up of weight rows alternating gate, up (gated_schedule
    makes a tuned schedule fit).

    m: an int (1 for decode), "block" (rows <= 64 at run time) or "dynamic" (prefill; any
    rows). A "gemm" schedule runs prompts of <= 64 rows with `block_schedule` when that is an
    mma_splitk schedule (else the block class's default), where 128-row tiles would leave most
    of the GPU idle. target is accepted for the factory interface; the code is sm_80+ CUDA C++.
    """
    _check_shape(n, k, m, dtype)
    if gated and n % 2:
        raise ModelError(f"a gated matmul pairs gate and up rows: n must be even, not {n}")
    schedule = dict(schedule or default_schedule(n, k, m))
    kind = schedule.get("kind")
    if kind == "gemv":
        if m in ROW_CLASSES or m > GEMV_MAX_M:
            raise ModelError(f"the gemv kernel handles m <= {GEMV_MAX_M}, not m={m}")
        return _q8_gemv(n, k, m, schedule["rows_per_warp"], schedule["k_warps"], gated,
                        schedule.get("prefetch", True))
    if kind == "mma":
        return _q8_mma(n, k, m, schedule["n_tiles"], schedule["k_warps"], gated)
    if kind == "mma_splitk":
        if m == "dynamic":
            raise ModelError(f"the mma_splitk kernel handles m <= {MMA_MAX_M} rows, not any m")
        return _q8_mma_splitk(n, k, m, SplitKPlan.of(n, k, schedule), gated)
    if kind == "gemm":
        if m != "dynamic":
            raise ModelError(f"the gemm kernel serves prefill (m='dynamic'), not m={m!r}")
        # a block class tuned to another kernel leaves short prompts the split-K default
        small = block_schedule if (block_schedule or {}).get("kind") == "mma_splitk" else \
            default_schedule(n, k, "block")
        return _q8_gemm(n, k, GemmPlan.of(schedule, k), SplitKPlan.of(n, k, small), gated)
    raise ModelError(f"unknown q8 matmul schedule kind {kind!r} (expected one of {KINDS})")


def gated_schedule(schedule: dict | None) -> dict | None:
    """A schedule measured on the plain kernel, made to fit the gated one: a gemv pairs gate
    and up rows in a block, so an odd rows_per_warp takes one more row (tuning measures the
    plain kernels: the epilogue is a rounding error of their time)."""
    if schedule and schedule.get("kind") == "gemv" and schedule["rows_per_warp"] % 2:
        return {**schedule, "rows_per_warp": schedule["rows_per_warp"] + 1}
    return schedule


# wgmma prefill plans (tile_n, k_stage, stages): 52-104 KB of shared memory; ptxas (sm_90a, 14B
# shapes): 96-97 registers at tile_n 128, k_stage 32 (two blocks an SM), 120-122 at k_stage 64,
# 172-176 at tile_n 256 (one block an SM); no spills
WGMMA_GEMM_PLANS = ((128, 32, 3), (128, 32, 4), (128, 64, 3), (256, 32, 3), (256, 32, 4))


def schedule_candidates(n: int, k: int, m, arch: str = "sm_90a") -> list[dict]:
    """The schedules `trimode tune` measures for one shape and m on a GPU of `arch` (wgmma
    plans only where it is sm_90a)."""
    candidates = []
    if m not in ROW_CLASSES and m <= GEMV_MAX_M:
        for rows in (1, 2, 4):
            for k_warps in (2, 4, 8):
                gemv = {"kind": "gemv", "rows_per_warp": rows, "k_warps": k_warps}
                # weights prefetched before the wait (the default), or 8 registers fewer
                candidates += [gemv, {**gemv, "prefetch": False}]
    # 8 n-tiles halve the x re-reads per weight byte but need 64 more registers: m <= 32 only.
    # Not for prefill (rows > 64 there): the slab kernel reads every weight once per 64 rows,
    # which made the first GPU run's prefill 4,050 tok/s (BENCHMARKS.md); measuring it at 2048
    # rows would be most of the tuning time.
    m_tiles = _m_tiles(m)
    for n_tiles in (() if m in (1, "dynamic") else (1, 2, 4) if m_tiles > 2 else (1, 2, 4, 8)):
        for k_warps in (2, 4, 8):
            if _mma_shared_bytes(m_tiles, n_tiles, k_warps) <= STATIC_SHARED_BYTES:
                candidates.append({"kind": "mma", "n_tiles": n_tiles, "k_warps": k_warps})
    if m == "dynamic":
        candidates[:0] = [{"kind": "gemm", "tile_m": tile_m, "stages": stages, "k_stage": k_stage}
                          for k_stage in (32, 64) if k % k_stage == 0
                          for tile_m in (128, 64) for stages in (2, 3, 4)]

    if m == "block" or m not in ROW_CLASSES and m > 1:
        for n_tiles, warps in ((1, 8), (2, 4), (2, 8), (4, 4), (4, 8)):  # 64 to 256 weight rows a block
            for k_group in (1, 2):
                base = default_splits(n, k, n_tiles, warps, k_group)
                for splits in sorted({max(1, base // 2), base, 2 * base}):
                    schedule = _splitk_schedule(n, k, n_tiles, warps, k_group, splits)
                    if schedule not in candidates:
                        candidates.append(schedule)
                # the default split count with weights asked into L2 2 or 4 groups ahead
                candidates += [_splitk_schedule(n, k, n_tiles, warps, k_group, base, ahead) for ahead in (2, 4)]
        if arch == "sm_90a":  # one or two warpgroups of 64 weight rows on wgmma
            candidates += [_splitk_schedule(n, k, 2, warps, k_group, None, ahead, wgmma=True)
                           for warps in (4, 8) for k_group in (1, 2) for ahead in (0, 2)]
    if m == "dynamic" and arch == "sm_90a":
        candidates += [GemmPlan(128, stages, k_stage, True, tile_n).schedule()
                       for tile_n, k_stage, stages in WGMMA_GEMM_PLANS if k % k_stage == 0]
    return candidates


def schedule_name(schedule: dict) -> str:
    """A short stable name for a schedule, e.g. 'mma_nt4_kw4'."""
    if schedule["kind"] == "gemv":
        return (f"gemv_r{schedule['rows_per_warp']}_kw{schedule['k_warps']}"
                f"{'' if schedule.get('prefetch', True) else '_waitfirst'}")
    if schedule["kind"] == "gemm":
        plan = GemmPlan.of(schedule)
        return f"gemm_t{plan.tile_m}_s{plan.stages}_k{plan.k_stage}{f'_wg{plan.tile_n}' if plan.wgmma else ''}"
    if schedule["kind"] == "mma_splitk":
        return (f"splitk_nt{schedule['n_tiles']}_w{schedule['warps']}_g{schedule['k_group']}"
                f"_s{schedule['splits']}{_prefetch_tag(schedule.get('prefetch_groups', 0))}"
                f"{'_wg' if schedule.get('mma') == 'wgmma' else ''}")
    return f"mma_nt{schedule['n_tiles']}_kw{schedule['k_warps']}"


def _check_shape(n, k, m, dtype):
    if dtype != "float16":
        raise ModelError(f"the CUDA Q8_0 matmul takes float16 activations, not {dtype}")
    if n < 1 or k < Q8_BLOCK or k % Q8_BLOCK:
        raise ModelError(f"Q8_0 matmul needs n >= 1 and k a positive multiple of 32, got n={n} k={k}")
    if m not in ROW_CLASSES and not (isinstance(m, int) and 1 <= m <= MMA_MAX_M):
        raise ModelError(f"m must be 1..{MMA_MAX_M}, 'block' or 'dynamic', got {m!r}")


def _m_tiles(m) -> int:
    rows = MMA_MAX_M if m in ROW_CLASSES else m
    return -(-rows // MMA_ROWS)


def _mma_shared_bytes(m_tiles, n_tiles, k_warps) -> int:
    # warps 1.. of a block park their fp32 fragments (4 per thread per tile) for warp 0 to sum
    return max(k_warps - 1, 0) * m_tiles * n_tiles * 4 * 32 * 4


def _store_pair(name, n, gated):
    """The device function that writes outputs of weight rows col, col + 1 (col even) of one
    row of y. Gated (gate_up, rows alternating gate, up): silu(gate) * up, one output at
    col / 2 of a y [m, n / 2] -- the FFN activation happens in the matmul's epilogue."""
    if gated:
        body = (f"if (col < {n}) y[(size_t)row * {n // 2} + col / 2] = "
                "__float2half_rn(a / (1.f + __expf(-a)) * b);")
    else:  # an even N keeps every pair 4-byte aligned
        body = (f"if ({n} % 2 == 0 && col + 1 < {n}) {{ *reinterpret_cast<half2*>(y + (size_t)row * {n} + col) = "
                f"__floats2half2_rn(a, b); }} else {{ if (col < {n}) y[(size_t)row * {n} + col] = __float2half_rn(a); "
                f"if (col + 1 < {n}) y[(size_t)row * {n} + col + 1] = __float2half_rn(b); }}")
    return rf"""
__device__ __forceinline__ void {name}_store_pair(half* __restrict__ y, int row, int col, float a, float b) {{
  {body}
}}
"""


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
// 16 int8 weights times their block scale, as 8 half2: out[2w + h] holds bytes (2h, 2h + 1)
// of word w, in k order.
__device__ __forceinline__ void trimode_q8_dequant16(uint4 raw, half scale, unsigned* out) {
  const unsigned half2_1152 = 0x64806480u;  // (1152, 1152) = 1024 + 128
  const half2 s2 = __halves2half2(scale, scale);
  const unsigned ww[4] = {raw.x ^ 0x80808080u, raw.y ^ 0x80808080u, raw.z ^ 0x80808080u, raw.w ^ 0x80808080u};
#pragma unroll
  for (int w = 0; w < 4; ++w)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned biased = trimode_q8_pair_as_half2(ww[w], h ? 0x4342u : 0x4140u);
      half2 v = __hsub2(*reinterpret_cast<const half2*>(&biased), *reinterpret_cast<const half2*>(&half2_1152));
      v = __hmul2(v, s2);
      out[2 * w + h] = *reinterpret_cast<const unsigned*>(&v);
    }
}
"""



def _gemv_source(name, n, k, m, rows_per_warp, k_warps, gated=False, prefetch=True):
    """prefetch: ask for this thread's weight lines in L2 before waiting for the previous
    kernel (grid_dependency.py); else wait first (8 fewer registers at the 14B shapes: 40)."""
    if gated and rows_per_warp % 2:
        raise ModelError(f"a gated gemv pairs its rows: rows_per_warp must be even, not {rows_per_warp}")
    store = rf"""
  if (threadIdx.x < M * R / 2) {{  // a (gate, up) pair of rows per thread
    const int i = threadIdx.x / (R / 2), r = 2 * (threadIdx.x % (R / 2));
    float gate = 0.f, up = 0.f;
#pragma unroll
    for (int v = 0; v < KW; ++v) {{
      gate += parts[v][i * R + r];
      up += parts[v][i * R + r + 1];
    }}
    if (n0 + r < N) {name}_store_pair(y, i, n0 + r, gate, up);
  }}""" if gated else r"""
  if (threadIdx.x < M * R) {
    const int i = threadIdx.x / R, r = threadIdx.x % R;
    float total = 0.f;
#pragma unroll
    for (int v = 0; v < KW; ++v) total += parts[v][threadIdx.x];
    if (n0 + r < N) y[(size_t)i * N + n0 + r] = __float2half_rn(total);
  }"""
    wait_first, prefetch_then_wait = f"  {name}_wait_previous_kernels();\n", ""
    if prefetch:  # the weight stream starts while the previous kernel drains; no register holds it
        wait_first, prefetch_then_wait = "", rf"""
  // This thread's weight lines into L2 before waiting for x (the previous kernel's output).
#pragma unroll 1
  for (int kk = (warp * 32 + lane) * 16; kk < K; kk += KW * 32 * 16)
#pragma unroll
    for (int r = 0; r < R; ++r) {name}_prefetch_l2(q + (size_t)rows[r] * K + kk);
  {name}_wait_previous_kernels();
"""
    return _COMMON.replace("trimode_q8_", f"{name}_") + _store_pair(name, n, gated) + ptx_helpers(name) + rf"""
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y) {{
  constexpr int N = {n}, K = {k}, M = {m}, R = {rows_per_warp}, KW = {k_warps};
{wait_first}  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * R;
  float acc[M][R];
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.f;
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = min(n0 + r, N - 1);  // tail rows recompute row N-1
{prefetch_then_wait}
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
  __syncthreads();{store}
}}
"""


def _mma_source(name, n, k, m_tiles, n_tiles, k_warps, gated=False):
    shared_floats = max(_mma_shared_bytes(m_tiles, n_tiles, k_warps) // 4, 1)
    return _COMMON.replace("trimode_q8_", f"{name}_") + _store_pair(name, n, gated) + ptx_helpers(name) + rf"""
// Rows [blockIdx.y * 16 * MT, +16 * MT) of x and y; weight rows [blockIdx.x * 8 * NT, +8 * NT).
// mma fragment layout (PTX ISA, m16n8k16 f16): lane = 4 * g + t. A holds (row g | g + 8,
// k 2t, 2t+1 | 2t+8, 2t+9), B holds (k 2t, 2t+1 | 2t+8, 2t+9, col g), C holds (row g | g + 8,
// col 2t, 2t+1). Here logical k (2t + e | 2t + 8 + e) of step j is physical k
// chunk + 16t + 4j + (e | 2 + e): the same bijection for A and B, so the sum is unchanged and
// every thread's operands are 16 contiguous elements.
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y, int m) {{
  constexpr int N = {n}, K = {k}, MT = {m_tiles}, NT = {n_tiles}, KW = {k_warps};
  // x and weights load together: nothing to start before the previous kernel is done
  {name}_wait_previous_kernels();
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

  for (int chunk = warp; chunk * 64 < K; chunk += KW) {{
    const int kk = chunk * 64 + 16 * t;
    const bool kok = kk < K;  // K % 32 == 0, so a started 16-element run is whole
    uint4 raw[NT];
    half sc[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {{
      raw[j] = kok ? __ldg(reinterpret_cast<const uint4*>(q + (size_t)wrow[j] * K + kk))
                   : make_uint4(0x80808080u, 0x80808080u, 0x80808080u, 0x80808080u);
      sc[j] = kok ? __ldg(s + (size_t)wrow[j] * (K / 32) + kk / 32) : __float2half_rn(0.f);
    }}
    unsigned b[NT][8];
#pragma unroll
    for (int j = 0; j < NT; ++j) {name}_dequant16(raw[j], sc[j], b[j]);
#pragma unroll
    for (int i = 0; i < MT; ++i) {{
      if (16 * i >= m - m0) break;  // uniform: tiles past the last row cost neither loads nor mma
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
      for (int j = 0; j < NT; ++j) {name}_store_pair(y, xrow[i][h], n0 + 8 * j + 2 * t, c[i][j][2 * h], c[i][j][2 * h + 1]);
    }}
}}
"""


def _splitk_weight_stream(name, rows: str) -> str:
    """The split-K kernels' weight stream, `rows` (a constant) weight rows `wrow[]` a thread:
    this group's and the next group's 16-byte loads and scales in registers (indexed by
    constants only), load_w(group) for them, and prefetch_w(group), which asks L2 for a later
    group (PF > 0: more of the weight stream in flight than two groups of registers hold)."""
    return rf"""
  uint4 raw[U][{rows}], raw_next[U][{rows}];
  half sc[U][{rows}], sc_next[U][{rows}];
  auto load_w = [&](int group, uint4 (&into)[U][{rows}], half (&scale_into)[U][{rows}]) {{
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < {rows}; ++r) {{
        const int kk = k_begin + group * KG + 64 * u + 16 * t;
        const bool inside = kk < k_end;
        into[u][r] = inside ? __ldg(reinterpret_cast<const uint4*>(q + (size_t)wrow[r] * K + kk))
                            : make_uint4(0x80808080u, 0x80808080u, 0x80808080u, 0x80808080u);
        scale_into[u][r] = inside ? __ldg(s + (size_t)wrow[r] * (K / 32) + kk / 32) : __float2half_rn(0.f);
      }}
  }};
  auto prefetch_w = [&](int group) {{
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < {rows}; ++r) {{
        const int kk = k_begin + group * KG + 64 * u + 16 * t;
        if (group < groups && kk < k_end) {name}_prefetch_l2(q + (size_t)wrow[r] * K + kk);
      }}
  }};
"""


def _splitk_source(name, n, k, plan: "SplitKPlan", gated=False):
    """Blocks of m <= 64 rows (verify, draft): warps split N and share x through shared memory,
    blocks split K; the last block of each column tile to finish sums the tile's partials."""
    mt, nt, warps, groups_k = MMA_MAX_M // MMA_ROWS, plan.n_tiles, plan.warps, plan.k_group
    tail = _splitk_store_direct(name) if plan.splits == 1 else _splitk_store_partials(name, n, plan)
    scratch = _splitk_scratch(name, n, plan)
    weights = _splitk_weight_stream(name, "NT")
    return _COMMON.replace("trimode_q8_", f"{name}_") + _store_pair(name, n, gated) + ptx_helpers(name) \
        + scratch + rf"""
// Block (bx, split): weight rows [bx * NB, +NB) -- warp w owns n-tiles w * NT .. w * NT + NT - 1
// -- over k in [split * KS, +KS), walked in groups of KG = 64 * U. Each group's x rows are
// copied to shared memory with cp.async one group ahead, and each thread's weights for the
// next group are loaded into registers while this group's mma run. Fragments as in the
// mma kernel above: logical k (2t + e | 2t + 8 + e) of step j is k chunk + 16t + 4j + (e | 2 + e).
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y, int m) {{
  constexpr int N = {n}, K = {k}, MT = {mt}, NT = {nt}, W = {warps}, U = {groups_k}, PF = {plan.prefetch_groups};
  constexpr int NB = 8 * NT * W, KG = 64 * U, KS = {plan.split_k(k)}, THREADS = 32 * W;
  constexpr int XROW = KG + 8;  // halves; 16 bytes of padding per row: no bank conflicts
  __shared__ __align__(16) half xs[2][16 * MT][XROW];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * NB, split = blockIdx.y;
  const int k_begin = split * KS, k_end = min(k_begin + KS, K);
  const int groups = (k_end - k_begin + KG - 1) / KG;
  if (m > 16 * MT) __trap();  // the row class promises m <= 64
  const int tiles = (m + 15) / 16;  // m-tiles holding rows; the rest are skipped
  int wrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) wrow[j] = min(n0 + 8 * (warp * NT + j) + g, N - 1);  // tail: row N-1 again

  auto copy_x = [&](int group, int buffer) {{
    const int k0 = k_begin + group * KG;
    for (int piece = threadIdx.x; piece < 16 * tiles * (KG / 8); piece += THREADS) {{
      const int row = piece / (KG / 8), col = (piece % (KG / 8)) * 8;
      const bool inside = row < m && k0 + col < k_end;  // K % 32 == 0: a piece is whole or absent
      {name}_copy16(&xs[buffer][row][col], inside ? x + (size_t)row * K + k0 + col : x, inside ? 16 : 0);
    }}
    {name}_copy_commit();
  }};
{weights}
  float c[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;

  load_w(0, raw, sc);  // weights before x: the weight stream starts while the previous kernel drains
#pragma unroll
  for (int ahead = 1; ahead <= PF; ++ahead) prefetch_w(ahead);
  {name}_wait_previous_kernels();
  copy_x(0, 0);
  for (int group = 0; group < groups; ++group) {{
    const int buffer = group & 1;
    if (PF > 0) prefetch_w(group + PF + 1);
    if (group + 1 < groups) copy_x(group + 1, buffer ^ 1);
    else {name}_copy_commit();  // an empty group keeps "all but the newest one" meaning this one
    {name}_copy_wait_pending<1>();
    __syncthreads();  // every thread's share of this group's x has landed
    if (group + 1 < groups) load_w(group + 1, raw_next, sc_next);
#pragma unroll
    for (int u = 0; u < U; ++u) {{
      unsigned b[NT][8];
#pragma unroll
      for (int j = 0; j < NT; ++j) {name}_dequant16(raw[u][j], sc[u][j], b[j]);
#pragma unroll
      for (int i = 0; i < MT; ++i) {{
        if (i >= tiles) break;
        unsigned a[2][8];
#pragma unroll
        for (int h = 0; h < 2; ++h) {{
          const uint4* p = reinterpret_cast<const uint4*>(&xs[buffer][16 * i + 8 * h + g][64 * u + 16 * t]);
          const uint4 lo = p[0], hi = p[1];
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
    __syncthreads();  // nobody reads this buffer any more: the next copy may overwrite it
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < NT; ++j) {{
        raw[u][j] = raw_next[u][j];
        sc[u][j] = sc_next[u][j];
      }}
  }}
{tail}
}}
"""


def _splitk_wgmma_source(name, n, k, plan: "SplitKPlan", gated=False):
    """Blocks of m <= 64 rows on Hopper's wgmma, the split-K kernel's contract and grid: each
    warpgroup multiplies 64 weight rows (A, dequantized into registers from the same 16-byte
    loads) by x (B: the block's rows, staged in shared memory a group ahead as K-major core
    matrices), asynchronously of its own instruction stream; m is rounded up to 16, 32 or 64
    columns of the MMA. The weights' k order within each 64-k chunk is the mma kernels'
    (thread t of a quad holds k 16t .. 16t + 15), so x is stored permuted to match: logical
    k (step j: 2t + e | 8 + 2t + e) is physical k 16t + 4j + (e | 2 + e). A thread's A rows
    g and g + 8 are weight rows 2g and 2g + 1, so every gate/up pair ends in one thread."""
    warps, groups_k = plan.warps, plan.k_group
    tail = _splitk_wgmma_store_direct(name) if plan.splits == 1 else _splitk_wgmma_store_partials(name, plan)
    scratch = _splitk_scratch(name, n, plan)
    weights = _splitk_weight_stream(name, "2")
    widths = (16, 32, 64)
    return (_COMMON.replace("trimode_q8_", f"{name}_") + _store_pair(name, n, gated) + ptx_helpers(name)
            + wgmma_helpers(name, *widths) + scratch + rf"""
template <int NX>
__device__ __forceinline__ void {name}_wgmma_rs(float* d, const unsigned* a, const unsigned char* smem,
                                                unsigned b_offset, unsigned lbo, unsigned sbo) {{
  if constexpr (NX == 16) {name}_wgmma_rs_n16(d, a, smem, b_offset, lbo, sbo);
  else if constexpr (NX == 32) {name}_wgmma_rs_n32(d, a, smem, b_offset, lbo, sbo);
  else {name}_wgmma_rs_n64(d, a, smem, b_offset, lbo, sbo);
}}

template <int NX>
__device__ __forceinline__ void {name}_columns(const half* __restrict__ x, const signed char* __restrict__ q,
                                               const half* __restrict__ s, half* __restrict__ y, int m,
                                               unsigned char* __restrict__ xs) {{
  constexpr int N = {n}, K = {k}, W = {warps}, U = {groups_k}, PF = {plan.prefetch_groups};
  constexpr int NB = 16 * W, KG = 64 * U, KS = {plan.split_k(k)}, THREADS = 32 * W;
  constexpr unsigned LBO = 128, SBO = KG / 8 * 128, X_TILE = {MMA_MAX_M} * KG * 2;
  constexpr int PIECES = NX * (KG / 8), XP = (PIECES + THREADS - 1) / THREADS;  // 16-byte pieces of x
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * NB, split = blockIdx.y;
  const int k_begin = split * KS, k_end = min(k_begin + KS, K);
  const int groups = (k_end - k_begin + KG - 1) / KG;
  const int row0 = n0 + 16 * warp + 2 * g;  // this thread's A rows g, g + 8: weight rows row0, row0 + 1
  const int wrow[2] = {{min(row0, N - 1), min(row0 + 1, N - 1)}};  // tail: row N-1 again

{weights}  // x: each piece is 8 halves of one row (physical k 16t' + 8h' .. + 7 of a 64-k chunk); rows
  // past m and k past the split are zeros
  uint4 xr[XP];
  auto load_x = [&](int group) {{
#pragma unroll
    for (int i = 0; i < XP; ++i) {{
      const int piece = threadIdx.x + i * THREADS, row = piece / (KG / 8), k0 = k_begin + group * KG + 8 * (piece % (KG / 8));
      const bool inside = piece < PIECES && row < m && k0 < k_end;
      xr[i] = inside ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)row * K + k0)) : make_uint4(0u, 0u, 0u, 0u);
    }}
  }};
  auto store_x = [&](int buffer) {{  // word w of a piece: physical k 16t' + 8h' + 2w -> step 2h' + w / 2, high w % 2
#pragma unroll
    for (int i = 0; i < XP; ++i) {{
      const int piece = threadIdx.x + i * THREADS;
      if (piece >= PIECES) continue;
      const int row = piece / (KG / 8), p = piece % (KG / 8), u = p / 8, tq = p % 8 / 2, h = p % 2;
      unsigned char* to = xs + buffer * X_TILE + (row / 8) * SBO + (row % 8) * 16 + tq * 4;
      const unsigned words[4] = {{xr[i].x, xr[i].y, xr[i].z, xr[i].w}};
#pragma unroll
      for (int w = 0; w < 4; ++w)
        *reinterpret_cast<unsigned*>(to + (8 * u + 2 * (2 * h + w / 2) + w % 2) * 128) = words[w];
    }}
  }};

  float d[NX / 2];
#pragma unroll
  for (int i = 0; i < NX / 2; ++i) d[i] = 0.f;

  load_w(0, raw, sc);  // weights before x: the weight stream starts while the previous kernel drains
#pragma unroll
  for (int ahead = 1; ahead <= PF; ++ahead) prefetch_w(ahead);
  {name}_wait_previous_kernels();
  load_x(0);
  store_x(0);
  {name}_fence_async_shared();
  __syncthreads();
  for (int group = 0; group < groups; ++group) {{
    const int buffer = group & 1;
    if (PF > 0) prefetch_w(group + PF + 1);
    if (group + 1 < groups) {{
      load_w(group + 1, raw_next, sc_next);
      load_x(group + 1);
    }}
    unsigned a[U][4][4];  // read by the tensor cores until the wait below: one set per step
#pragma unroll
    for (int u = 0; u < U; ++u) {{
      unsigned w0[8], w1[8];
      {name}_dequant16(raw[u][0], sc[u][0], w0);
      {name}_dequant16(raw[u][1], sc[u][1], w1);
#pragma unroll
      for (int j = 0; j < 4; ++j) {{
        a[u][j][0] = w0[2 * j]; a[u][j][1] = w1[2 * j]; a[u][j][2] = w0[2 * j + 1]; a[u][j][3] = w1[2 * j + 1];
      }}
    }}
    {name}_hold<NX / 2>(d);
    {name}_hold<U * 16>(&a[0][0][0]);
    {name}_wgmma_fence();
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        {name}_wgmma_rs<NX>(d, a[u][j], xs, buffer * X_TILE + (8 * u + 2 * j) * 128, LBO, SBO);
    {name}_wgmma_commit();
    {name}_wgmma_wait<0>();
    {name}_hold<NX / 2>(d);
    {name}_hold<U * 16>(&a[0][0][0]);
    if (group + 1 < groups) store_x(buffer ^ 1);  // its last readers finished before the last barrier
    {name}_fence_async_shared();
    __syncthreads();  // this group's x is read by all; the next group's is in place for all
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < 2; ++r) {{
        raw[u][r] = raw_next[u][r];
        sc[u][r] = sc_next[u][r];
      }}
  }}
{tail}
}}

__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y, int m) {{
  __shared__ __align__(128) unsigned char xs[{plan.shared_bytes()}];
  if (m > {MMA_MAX_M}) __trap();  // the row class promises m <= 64
  if (m <= 16) {name}_columns<16>(x, q, s, y, m, xs);
  else if (m <= 32) {name}_columns<32>(x, q, s, y, m, xs);
  else {name}_columns<64>(x, q, s, y, m, xs);
}}
""")


def _splitk_wgmma_store_direct(name):
    # d[4j + e]: weight row row0 + e / 2, x row 8j + 2t + e % 2
    return r"""
#pragma unroll
  for (int j = 0; j < NX / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int row = 8 * j + 2 * t + e;
      if (row < m) NAME_store_pair(y, row, row0, d[4 * j + e], d[4 * j + 2 + e]);
    }""".replace("NAME", name)


def _splitk_wgmma_store_partials(name, plan):
    return rf"""
  float* partial = {name}_partial + (size_t)split * {MMA_MAX_M} * N;
#pragma unroll
  for (int j = 0; j < NX / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {{
      const int row = 8 * j + 2 * t + e % 2, col = row0 + e / 2;
      if (row < m && col < N) __stcg(partial + (size_t)row * N + col, d[4 * j + e]);
    }}""" + _splitk_last_block_sums(name, plan)


def _splitk_scratch(name, n, plan) -> str:
    if plan.splits == 1:
        return ""
    return rf"""
// Split partials (fp32, [split][row][column]) and, per column tile, how many splits have
// finished; the last one resets its count, so every launch finds them zero.
__device__ float {name}_partial[{plan.splits * MMA_MAX_M * n}];
__device__ unsigned {name}_tickets[{plan.column_tiles(n)}];
"""


def _splitk_store_direct(name):
    return r"""
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * i + 8 * h + g, col = n0 + 8 * (warp * NT + j) + 2 * t;
        if (row < m) NAME_store_pair(y, row, col, c[i][j][2 * h], c[i][j][2 * h + 1]);
      }""".replace("NAME", name)


def _splitk_store_partials(name, n, plan):
    return rf"""
  float* partial = {name}_partial + (size_t)split * {MMA_MAX_M} * N;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {{
        const int row = 16 * i + 8 * (e / 2) + g, col = n0 + 8 * (warp * NT + j) + 2 * t + e % 2;
        if (row < m && col < N) __stcg(partial + (size_t)row * N + col, c[i][j][e]);
      }}""" + _splitk_last_block_sums(name, plan)


def _splitk_last_block_sums(name, plan):
    """After each thread stored its fp32 partials at `partial` ([row][column] of this split):
    the last block of the column tile to finish writes y."""
    return rf"""
  constexpr int S = {plan.splits};
  // The classic last-block reduction: publish the partial, take a ticket; the block holding the
  // last ticket sums every split's partial in split order (the same sum whichever finishes last).
  __threadfence();
  __syncthreads();
  __shared__ unsigned is_last;
  if (threadIdx.x == 0) is_last = atomicAdd(&{name}_tickets[blockIdx.x], 1u) == S - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = threadIdx.x; e < m * NB / 2; e += THREADS) {{  // a pair of weight rows per step
    const int row = e / (NB / 2), col = n0 + 2 * (e % (NB / 2));
    if (col >= N) continue;
    float a = 0.f, b = 0.f;
#pragma unroll 4
    for (int v = 0; v < S; ++v) {{
      const float* partial = {name}_partial + ((size_t)v * {MMA_MAX_M} + row) * N + col;
      a += __ldcg(partial);
      if (col + 1 < N) b += __ldcg(partial + 1);
    }}
    {name}_store_pair(y, row, col, a, b);
  }}
  if (threadIdx.x == 0) {name}_tickets[blockIdx.x] = 0u;"""


GEMM_COLS = 128      # weight rows per block of the prefill GEMM
GEMM_MAX_SHARED = 227 * 1024  # dynamic shared memory a block may opt into (sm_90)


@dataclass(frozen=True)
class GemmPlan:
    """Tiling of the prefill GEMM: `tile_n` weight rows by `tile_m` rows of x a block,
    `stages` k-stages of `k_stage` in flight. mma.sync (the default): warps of 64 x 32 outputs
    (2 x 4 warps at 128 rows, 1 x 4 at 64), fragments by ldmatrix. wgmma (Hopper, sm_90a):
    two warpgroups of 64 rows x tile_n, both operands read from shared memory by the tensor
    cores."""
    tile_m: int       # 64 or 128 (wgmma: 128)
    stages: int       # cp.async stages of x and weights, 2 to 4
    k_stage: int = Q8_BLOCK  # k per stage: one Q8_0 block (32) or two (64: half the barriers per k)
    wgmma: bool = False
    tile_n: int = GEMM_COLS  # 128 (wgmma: or 256)

    def warps(self) -> int:
        return self.tile_m // 64 * 4

    def threads(self) -> int:
        return 32 * self.warps()

    def padded_k(self) -> int:
        """A staged row of halves, 16 bytes of padding: no ldmatrix bank conflicts."""
        return self.k_stage + 8

    def shared_bytes(self) -> int:
        """Dynamic shared memory: the staged x and int8 weight tiles, and the fp16 weight tile
        (wgmma: two, one being read by the tensor cores while the next is dequantized)."""
        if self.wgmma:  # core-matrix layout, no padding
            return (self.stages * (self.tile_m * self.k_stage * 2 + self.tile_n * self.k_stage)
                    + 2 * self.tile_n * self.k_stage * 2)
        kp = self.padded_k()
        return self.stages * (self.tile_m * kp * 2 + GEMM_COLS * self.k_stage) + GEMM_COLS * kp * 2

    def schedule(self) -> dict:
        schedule = {"kind": "gemm", "tile_m": self.tile_m, "stages": self.stages, "k_stage": self.k_stage}
        return {**schedule, "mma": "wgmma", "tile_n": self.tile_n} if self.wgmma else schedule

    @classmethod
    def of(cls, schedule: dict, k: int | None = None) -> "GemmPlan":
        """The plan a schedule names; with k, also checked to walk that K in whole stages."""
        mma = schedule.get("mma", "mma.sync")
        plan = cls(schedule.get("tile_m", 128), schedule.get("stages", 2), schedule.get("k_stage", Q8_BLOCK),
                   mma == "wgmma", schedule.get("tile_n", GEMM_COLS))
        if plan.tile_m not in (64, 128) or not 2 <= plan.stages <= 4 or plan.k_stage not in (32, 64):
            raise ModelError(f"gemm schedule {schedule}: tile_m is 64 or 128, stages 2 to 4, k_stage 32 or 64")
        if mma not in ("mma.sync", "wgmma"):
            raise ModelError(f"gemm schedule {schedule}: mma is 'mma.sync' or 'wgmma'")
        if plan.wgmma and (plan.tile_m != 128 or plan.tile_n not in (128, 256)):
            raise ModelError(f"gemm schedule {schedule}: wgmma tiles are 128 rows by 128 or 256 weight rows")
        if not plan.wgmma and plan.tile_n != GEMM_COLS:
            raise ModelError(f"gemm schedule {schedule}: the mma.sync GEMM tiles {GEMM_COLS} weight rows")
        if plan.shared_bytes() > GEMM_MAX_SHARED:
            raise ModelError(f"gemm schedule {schedule} needs {plan.shared_bytes()} bytes of shared memory, "
                             f"more than the {GEMM_MAX_SHARED} a block may take")
        if k is not None and k % plan.k_stage:
            raise ModelError(f"gemm schedule {schedule}: K = {k} is not a multiple of its k_stage")
        return plan


def _gemm_source(name, n, k, plan: GemmPlan, gated=False):
    """Prefill: a tiled GEMM. Per k-stage (one or two Q8_0 blocks), x [BM, BK] and the int8
    weights [128, BK] go to shared memory by cp.async, `stages - 1` stages ahead; the block's
    threads dequantize the stage once into an fp16 tile; every warp takes its A (x) and B
    (weight) fragments by ldmatrix and runs 4 x 4 mma.sync tiles. Blocks along m vary
    fastest, so the blocks running at once share a weight tile through L2 and DRAM sees each
    weight about once. Shared memory is dynamic (`smem`, plan.shared_bytes()): three or four
    stages need more than the 48 KB a static array may hold."""
    pieces = GEMM_COLS * (plan.k_stage // 16) // plan.threads()  # 16-weight pieces a thread dequantizes
    return _COMMON.replace("trimode_q8_", f"{name}_") + _store_pair(name, n, gated) + ptx_helpers(name) + rf"""
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y, int m,
                                       unsigned char* __restrict__ smem) {{
  constexpr int N = {n}, K = {k}, BM = {plan.tile_m}, BN = {GEMM_COLS}, BK = {plan.k_stage}, KP = {plan.padded_k()};
  constexpr int S = {plan.stages}, THREADS = {plan.threads()}, P = {pieces}, MT = 4, NT = 4;
  // a stage's copies carry x and weights together: nothing to start before the previous kernel is done
  {name}_wait_previous_kernels();
  half (*xs)[BM][KP] = reinterpret_cast<half (*)[BM][KP]>(smem);
  signed char (*qs)[BN][BK] = reinterpret_cast<signed char (*)[BN][BK]>(smem + S * BM * KP * 2);
  half (*ws)[KP] = reinterpret_cast<half (*)[KP]>(smem + S * (BM * KP * 2 + BN * BK));
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3, matrix = lane >> 3;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, steps = K / BK;
  // the 16-weight pieces this thread copies and dequantizes per stage: row piece / (BK / 16),
  // bytes 16 (piece % (BK / 16)) ..
  int dq_row[P], dq_col[P], dq_block[P], dq_n[P];  // dq_block: its Q8_0 block within the stage
#pragma unroll
  for (int p = 0; p < P; ++p) {{
    const unsigned piece = tid + p * THREADS;
    dq_row[p] = piece / (BK / 16);
    dq_col[p] = 16 * (piece % (BK / 16));
    dq_block[p] = piece % (BK / 16) / 2;
    dq_n[p] = min(n0 + dq_row[p], N - 1);  // rows past N: row N-1 again
  }}

  auto issue = [&](int step) {{
    const int k0 = step * BK, buffer = step % S;
    for (int piece = tid; piece < BM * (BK / 8); piece += THREADS) {{
      const int row = piece / (BK / 8), col = piece % (BK / 8) * 8;
      const bool inside = m0 + row < m;
      {name}_copy16(&xs[buffer][row][col], inside ? x + (size_t)(m0 + row) * K + k0 + col : x, inside ? 16 : 0);
    }}
#pragma unroll
    for (int p = 0; p < P; ++p)
      {name}_copy16(&qs[buffer][dq_row[p]][dq_col[p]], q + (size_t)dq_n[p] * K + k0 + dq_col[p], 16);
    {name}_copy_commit();
  }};

  float c[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[i][j][e] = 0.f;
  half scale[P];
#pragma unroll
  for (int p = 0; p < P; ++p) scale[p] = __ldg(s + (size_t)dq_n[p] * (K / 32) + dq_block[p]);

  // one commit per stage, empty past the last, so "all but the S - 2 newest" is always this stage
#pragma unroll
  for (int step = 0; step < S - 1; ++step) {{
    if (step < steps) issue(step);
    else {name}_copy_commit();
  }}
  for (int step = 0; step < steps; ++step) {{
    const int buffer = step % S;
    {name}_copy_wait_pending<S - 2>();
    __syncthreads();  // this stage has landed; every warp is done with the oldest buffer's tiles
    if (step + S - 1 < steps) issue(step + S - 1);  // into the buffer step - 1 used
    else {name}_copy_commit();
    half next_scale[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {{
      next_scale[p] = step + 1 < steps ? __ldg(s + (size_t)dq_n[p] * (K / 32) + (step + 1) * (BK / 32) + dq_block[p])
                                       : scale[p];
      unsigned wf[8];  // in k order
      {name}_dequant16(*reinterpret_cast<const uint4*>(&qs[buffer][dq_row[p]][dq_col[p]]), scale[p], wf);
      uint4* to = reinterpret_cast<uint4*>(&ws[dq_row[p]][dq_col[p]]);
      to[0] = make_uint4(wf[0], wf[1], wf[2], wf[3]);
      to[1] = make_uint4(wf[4], wf[5], wf[6], wf[7]);
    }}
#pragma unroll
    for (int p = 0; p < P; ++p) scale[p] = next_scale[p];
    __syncthreads();  // the fp16 weight tile is whole
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {{
      unsigned a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i)  // rows 16i + (lane & 15), k 16 ks + 8 (lane >> 4)
        {name}_ldmatrix(a[i], &xs[buffer][64 * wm + 16 * i + (lane & 15)][16 * ks + 8 * (lane >> 4)]);
#pragma unroll
      for (int j2 = 0; j2 < NT / 2; ++j2) {{  // weight rows 16 j2 + 8 (matrix >> 1) + row, k + 8 (matrix & 1)
        unsigned r[4];
        {name}_ldmatrix(r, &ws[32 * wn + 16 * j2 + 8 * (matrix >> 1) + (lane & 7)][16 * ks + 8 * (matrix & 1)]);
        b[2 * j2][0] = r[0]; b[2 * j2][1] = r[1]; b[2 * j2 + 1][0] = r[2]; b[2 * j2 + 1][1] = r[3];
      }}
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) {name}_mma(c[i][j], a[i], b[j][0], b[j][1]);
    }}
  }}

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {{
      const int row = m0 + 64 * wm + 16 * i + 8 * h + g;
      if (row >= m) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {name}_store_pair(y, row, n0 + 32 * wn + 8 * j + 2 * t, c[i][j][2 * h], c[i][j][2 * h + 1]);
    }}
}}
"""


def _wgmma_gemm_source(name, n, k, plan: GemmPlan, gated=False):
    """Prefill on Hopper's warpgroup MMA: 128 rows of x by `tile_n` weight rows a block, two
    warpgroups of 64 rows, every operand read by the tensor cores from shared memory. Per
    k-stage, x [128, BK] and the int8 weights go to shared memory by cp.async, `stages - 1`
    stages ahead, laid out as the wgmma descriptors want them (K-major 8 x 16-byte core
    matrices, no swizzle); each thread dequantizes the weights it copied itself (so no barrier
    stands between its copy and its dequantization) into one of two fp16 tiles, while the
    tensor cores still multiply the previous stage out of the other. One barrier a stage."""
    bn, bk, threads = plan.tile_n, plan.k_stage, plan.threads()
    cores = bk // 8                          # core matrices along k in a stage's row
    x_pieces = plan.tile_m * cores // threads  # 16-byte x copies per thread per stage
    w_chunks = bn * (bk // 16) // threads      # 16-weight chunks per thread per stage
    return (_COMMON.replace("trimode_q8_", f"{name}_") + _store_pair(name, n, gated) + ptx_helpers(name)
            + wgmma_helpers(name, bn) + rf"""
__device__ __forceinline__ void {name}(const half* __restrict__ x, const signed char* __restrict__ q,
                                       const half* __restrict__ s, half* __restrict__ y, int m,
                                       unsigned char* __restrict__ smem) {{
  constexpr int N = {n}, K = {k}, BM = {plan.tile_m}, BN = {bn}, BK = {bk}, S = {plan.stages}, THREADS = {threads};
  constexpr int CORES = {cores}, XP = {x_pieces}, WP = {w_chunks};
  // a core matrix is 8 rows of 16 bytes (8 halves of k); along k they lie LBO apart, 8-row groups SBO
  constexpr unsigned LBO = 128, SBO = CORES * 128;
  constexpr unsigned X_TILE = BM * BK * 2, Q_TILE = BN * BK, B_TILE = BN * BK * 2;
  constexpr unsigned Q_BASE = S * X_TILE, B_BASE = S * (X_TILE + Q_TILE);
  // a stage's copies carry x and weights together: nothing to start before the previous kernel is done
  {name}_wait_previous_kernels();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, steps = K / BK;
  // this thread's weight chunks: 8 threads in a row take the 8 rows of one core-matrix pair,
  // so their dequantized stores fill two whole core matrices (no bank conflicts)
  int w_n[WP], w_k[WP];
  unsigned w_to[WP];  // offset of the chunk's first row in the fp16 tile
#pragma unroll
  for (int p = 0; p < WP; ++p) {{
    const int c = tid + p * THREADS, r8 = c % 8, kp = c / 8 % (BK / 16), group = c / (8 * (BK / 16));
    w_n[p] = min(n0 + 8 * group + r8, N - 1);  // rows past N: row N-1 again
    w_k[p] = 16 * kp;
    w_to[p] = group * SBO + 2 * kp * 128 + r8 * 16;
  }}

  auto issue = [&](int step) {{
    const int k0 = step * BK;
    const unsigned slot = step % S;
#pragma unroll
    for (int p = 0; p < XP; ++p) {{
      const int piece = tid + p * THREADS, r8 = piece % 8, c = piece / 8 % CORES, group = piece / (8 * CORES);
      const int row = 8 * group + r8;
      const bool inside = m0 + row < m;
      {name}_copy16(smem + slot * X_TILE + group * SBO + c * 128 + r8 * 16,
                    inside ? x + (size_t)(m0 + row) * K + k0 + 8 * c : x, inside ? 16 : 0);
    }}
#pragma unroll
    for (int p = 0; p < WP; ++p)
      {name}_copy16(smem + Q_BASE + slot * Q_TILE + (tid + p * THREADS) * 16, q + (size_t)w_n[p] * K + k0 + w_k[p], 16);
    {name}_copy_commit();
  }};

  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.f;
  half scale[WP];
#pragma unroll
  for (int p = 0; p < WP; ++p) scale[p] = __ldg(s + (size_t)w_n[p] * (K / 32) + w_k[p] / 32);

  // one commit per stage, empty past the last, so "all but the S - 2 newest" is always this stage
#pragma unroll
  for (int step = 0; step < S - 1; ++step) {{
    if (step < steps) issue(step);
    else {name}_copy_commit();
  }}
  for (int step = 0; step < steps; ++step) {{
    const unsigned slot = step % S, tile = B_BASE + (step & 1) * B_TILE;
    {name}_copy_wait_pending<S - 2>();  // this thread's copies of this stage have landed
#pragma unroll
    for (int p = 0; p < WP; ++p) {{  // into the fp16 tile the products of two stages ago read
      const half next = step + 1 < steps ? __ldg(s + (size_t)w_n[p] * (K / 32) + ((step + 1) * BK + w_k[p]) / 32) : scale[p];
      unsigned wf[8];  // in k order: the chunk's two core-matrix rows
      {name}_dequant16(*reinterpret_cast<const uint4*>(smem + Q_BASE + slot * Q_TILE + (tid + p * THREADS) * 16),
                       scale[p], wf);
      *reinterpret_cast<uint4*>(smem + tile + w_to[p]) = make_uint4(wf[0], wf[1], wf[2], wf[3]);
      *reinterpret_cast<uint4*>(smem + tile + w_to[p] + LBO) = make_uint4(wf[4], wf[5], wf[6], wf[7]);
      scale[p] = next;
    }}
    {name}_wgmma_wait<0>();       // the previous stage's products are done with its x slot
    {name}_hold<BN / 2>(d);
    {name}_fence_async_shared();  // this thread's copies and weights, visible to the tensor cores
    __syncthreads();
    if (step + S - 1 < steps) issue(step + S - 1);  // into the x slot of the previous stage
    else {name}_copy_commit();
    {name}_hold<BN / 2>(d);
    {name}_wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks)  // this warpgroup's 64 rows: 8 row groups from 8 wg
      {name}_wgmma_n{bn}(d, smem, slot * X_TILE + 8 * wg * SBO + 2 * ks * 128, tile + 2 * ks * 128, LBO, SBO);
    {name}_wgmma_commit();
  }}
  {name}_wgmma_wait<0>();
  {name}_hold<BN / 2>(d);

#pragma unroll
  for (int h = 0; h < 2; ++h) {{
    const int row = m0 + 64 * wg + 16 * (warp & 3) + 8 * h + g;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {name}_store_pair(y, row, n0 + 8 * j + 2 * t, d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
  }}
}}
""")


# ---------------------------------------------------------------------------------------------
# TIR wrappers: launch the grid, hand the buffers to the device function.

def _q8_gemv(n, k, m, rows_per_warp, k_warps, gated, prefetch):
    from tvm.script import tirx as T

    name = (f"trimode_q8_gemv_n{n}_k{k}_m{m}_r{rows_per_warp}_kw{k_warps}{_GATED_TAG[gated]}"
            f"{'' if prefetch else '_waitfirst'}")
    source = _gemv_source(name, n, k, m, rows_per_warp, k_warps, gated, prefetch)
    n_out = n // 2 if gated else n
    blocks = -(-n // rows_per_warp)
    threads = 32 * k_warps

    @T.prim_func(private=True)
    def q8_gemv(x: T.Buffer((T.int64(m), T.int64(k)), "float16"),
                q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"),
                y: T.Buffer((T.int64(m), T.int64(n_out)), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        bx = T.launch_thread("blockIdx.x", blocks)
        tx = T.launch_thread("threadIdx.x", threads)
        with T.attr(0, WAITS_IN_KERNEL, 1):
            T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data, source_code=source))

    return q8_gemv


def _q8_mma(n, k, m, n_tiles, k_warps, gated):
    m_tiles = _m_tiles(m)
    if _mma_shared_bytes(m_tiles, n_tiles, k_warps) > STATIC_SHARED_BYTES:
        raise ModelError(f"mma schedule n_tiles={n_tiles} k_warps={k_warps} needs more than 48 KB "
                         "of shared memory")
    name = f"trimode_q8_mma_n{n}_k{k}_m{_rows_tag(m)}_nt{n_tiles}_kw{k_warps}{_GATED_TAG[gated]}"
    slab = MMA_ROWS * m_tiles
    return _rows_launch(name, _mma_source(name, n, k, m_tiles, n_tiles, k_warps, gated), n, k, m,
                        -(-n // (MMA_COLS * n_tiles)), lambda rows: (rows + slab - 1) // slab, 32 * k_warps,
                        gated)


_GATED_TAG = {False: "", True: "_glu"}  # gated kernels' names: plain and gated may share a module


def _prefetch_tag(groups: int) -> str:
    return f"_pf{groups}" if groups else ""


def _splitk_name(n, k, rows_tag, plan: SplitKPlan, gated) -> str:
    # rows_tag too: each kernel owns its module-scope scratch and tickets
    return (f"trimode_q8_splitk_n{n}_k{k}_m{rows_tag}_nt{plan.n_tiles}_w{plan.warps}"
            f"_g{plan.k_group}_s{plan.splits}{_prefetch_tag(plan.prefetch_groups)}{'_wg' if plan.wgmma else ''}"
            f"{_GATED_TAG[gated]}")


def _q8_mma_splitk(n, k, m, plan: SplitKPlan, gated):
    name = _splitk_name(n, k, _rows_tag(m), plan, gated)
    source = (_splitk_wgmma_source if plan.wgmma else _splitk_source)(name, n, k, plan, gated)
    return _rows_launch(name, source, n, k, m, plan.column_tiles(n),
                        lambda rows: plan.splits, 32 * plan.warps, gated)


def _q8_gemm(n, k, plan: GemmPlan, small: SplitKPlan, gated):
    """Prefill: rows <= 64 through the split-K kernel (its own copy: module-scope scratch is
    per kernel), more through the tiled GEMM."""
    from tvm.script import tirx as T

    name = (f"trimode_q8_gemm_n{n}_k{k}_t{plan.tile_m}_s{plan.stages}_k{plan.k_stage}"
            f"{f'_wg{plan.tile_n}' if plan.wgmma else ''}{_GATED_TAG[gated]}")
    source = (_wgmma_gemm_source if plan.wgmma else _gemm_source)(name, n, k, plan, gated)
    small_name = _splitk_name(n, k, "prefill", small, gated)
    small_source = (_splitk_wgmma_source if small.wgmma else _splitk_source)(small_name, n, k, small, gated)
    column_tiles = -(-n // plan.tile_n)
    n_out = n // 2 if gated else n
    tile_m, threads, shared_bytes = plan.tile_m, plan.threads(), plan.shared_bytes()

    @T.prim_func(private=True)
    def q8_gemm(x_handle: T.handle, q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        rows = T.int64()
        x = T.match_buffer(x_handle, (rows, T.int64(k)), "float16")
        y = T.match_buffer(y_handle, (rows, T.int64(n_out)), "float16")
        if rows <= T.int64(MMA_MAX_M):
            with T.launch_thread("blockIdx.x", small.column_tiles(n)):
                with T.launch_thread("blockIdx.y", small.splits):
                    with T.launch_thread("threadIdx.x", 32 * small.warps):
                        with T.attr(0, WAITS_IN_KERNEL, 1):
                            T.evaluate(T.cuda.func_call(small_name, x.data, q.data, s.data, y.data,
                                                        T.Cast("int32", rows), source_code=small_source))
        else:
            with T.launch_thread("blockIdx.x", T.Cast("int32", (rows + tile_m - 1) // tile_m)):
                with T.launch_thread("blockIdx.y", column_tiles):
                    with T.launch_thread("threadIdx.x", threads):
                        # TVM sizes the launch's dynamic shared memory from this buffer (and opts
                        # the kernel into more than 48 KB)
                        smem = T.alloc_buffer((shared_bytes,), "uint8", scope="shared.dyn")
                        with T.attr(0, WAITS_IN_KERNEL, 1):
                            T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data,
                                                        T.Cast("int32", rows), smem.data, source_code=source))

    return q8_gemm


def _rows_tag(m) -> str:
    return {"dynamic": "dyn", "block": "blk"}.get(m, str(m))


def _rows_launch(name, source, n, k, m, blocks_x, blocks_y, threads, gated):
    """TIR launching `name(x, q, s, y, rows)` on a (blocks_x, blocks_y(rows)) grid; rows are
    static (m an int) or read off x's shape (a row class)."""
    from tvm.script import tirx as T

    n_out = n // 2 if gated else n

    if m in ROW_CLASSES:
        @T.prim_func(private=True)
        def q8_matmul_rows(x_handle: T.handle, q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                           s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"), y_handle: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
            rows = T.int64()
            x = T.match_buffer(x_handle, (rows, T.int64(k)), "float16")
            y = T.match_buffer(y_handle, (rows, T.int64(n_out)), "float16")
            bx = T.launch_thread("blockIdx.x", blocks_x)
            by = T.launch_thread("blockIdx.y", T.Cast("int32", blocks_y(rows)))
            tx = T.launch_thread("threadIdx.x", threads)
            with T.attr(0, WAITS_IN_KERNEL, 1):
                T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data, T.Cast("int32", rows),
                                            source_code=source))

        return q8_matmul_rows

    @T.prim_func(private=True)
    def q8_matmul_static(x: T.Buffer((T.int64(m), T.int64(k)), "float16"),
                         q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                         s: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"),
                         y: T.Buffer((T.int64(m), T.int64(n_out)), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight: hands off
        bx = T.launch_thread("blockIdx.x", blocks_x)
        by = T.launch_thread("blockIdx.y", blocks_y(m))
        tx = T.launch_thread("threadIdx.x", threads)
        with T.attr(0, WAITS_IN_KERNEL, 1):
            T.evaluate(T.cuda.func_call(name, x.data, q.data, s.data, y.data, m, source_code=source))

    return q8_matmul_static
