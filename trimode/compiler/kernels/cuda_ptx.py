"""The PTX instructions our hand-written CUDA kernels use, as CUDA C++ device functions.

`ptx_helpers(prefix)` returns their source with every name starting `{prefix}_`: each kernel
source carries its own copy (a TVM module pastes every kernel's source into one file, so the
names must not clash). Under TRIMODE_CUDA_EMULATION (tests/cuda_emulator.h) each is the
emulator's model of the same instruction instead of inline assembly.

- `{p}_mma(c, a, b0, b1)`: mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, c += a * b.
- `{p}_ldmatrix(r, row)` / `{p}_ldmatrix_trans(r, row)`: ldmatrix .x4 (.trans) from shared memory.
- `{p}_copy16(shared, global, bytes)`: cp.async.cg 16 bytes, of which `bytes` read (the rest zero).
- `{p}_copy_commit()`, `{p}_copy_wait_pending<N>()` (until at most the N newest groups are
  in flight): cp.async groups.
- `{p}_prefetch_l2(global)`: prefetch.global.L2, the line holding `global` into L2 (no register
  holds it; the emulator reads nothing, but refuses an address outside the kernel's buffers).
- `{p}_wait_previous_kernels()`: griddepcontrol.wait (the kernels before this one in the
  stream have finished and their writes are visible), then launch_dependents (the next kernel
  may start launching). For kernels whose TIR is marked WAITS_IN_KERNEL (below): only
  weights may be read before it.

`wgmma_helpers(prefix, *widths)`, Hopper only (sm_90a), apart so that no other kernel carries them:
- `{p}_wgmma_n{n}(d, smem, a_offset, b_offset, lbo, sbo)`: wgmma.mma_async m64n{n}k16
  f32 += f16 x f16, both operands K-major in shared memory without swizzle (8 x 16-byte core
  matrices; lbo: bytes between core matrices along k, sbo: between 8-row groups), at byte
  offsets from `smem`; d: this thread's n / 2 accumulators.
- `{p}_wgmma_rs_n{n}(d, a, smem, b_offset, lbo, sbo)`: the same with A from registers (`a`:
  four words, mma.sync m16n8k16's A fragment of the thread's warp's 16 rows), which must keep
  their values until the wgmma's wait_group.
- `{p}_wgmma_fence()`, `{p}_wgmma_commit()`, `{p}_wgmma_wait<N>()` (until at most the N newest
  groups are in flight), `{p}_fence_async_shared()` (fence.proxy.async: this thread's ordinary
  shared-memory writes, cp.async ones included, become visible to the tensor cores' reads),
  `{p}_hold<COUNT>(registers)` (the compiler keeps them as they are across this point).
"""
from __future__ import annotations

# The TIR attribute key that wraps the call of a kernel whose source calls
# wait_previous_kernels: grid_dependency.py then leaves the kernel's entry alone.
WAITS_IN_KERNEL = "trimode.waits_in_kernel"

_HELPERS = r"""
__device__ __forceinline__ void NAME_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef TRIMODE_CUDA_EMULATION  // tests/cuda_emulator.h: the same instructions on the CPU
  emu::mma_m16n8k16_f32_f16(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ void NAME_ldmatrix(unsigned* r, const half* row) {
#ifdef TRIMODE_CUDA_EMULATION
  emu::ldmatrix_x4(r, row, false);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}
__device__ __forceinline__ void NAME_ldmatrix_trans(unsigned* r, const half* row) {
#ifdef TRIMODE_CUDA_EMULATION
  emu::ldmatrix_x4(r, row, true);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}
__device__ __forceinline__ void NAME_copy16(void* shared, const void* global, int bytes) {
#ifdef TRIMODE_CUDA_EMULATION
  emu::cp_async16(shared, global, bytes);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
#endif
}
__device__ __forceinline__ void NAME_copy_commit() {
#ifdef TRIMODE_CUDA_EMULATION
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int PENDING> __device__ __forceinline__ void NAME_copy_wait_pending() {
#ifdef TRIMODE_CUDA_EMULATION
  emu::cp_async_wait(PENDING);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}
__device__ __forceinline__ void NAME_prefetch_l2(const void* global) {
#ifdef TRIMODE_CUDA_EMULATION
  emu::prefetch_l2(global);
#else
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(global));
#endif
}
__device__ __forceinline__ void NAME_wait_previous_kernels() {
#ifdef TRIMODE_CUDA_EMULATION
  emu::grid_dependency_wait();
#else
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
"""


def ptx_helpers(prefix: str) -> str:
    return _HELPERS.replace("NAME", prefix)


_WGMMA_COMMON = r"""
// PTX ISA "matrix descriptor": start address, leading and stride byte offsets (each in
// 16-byte units, 14 bits), base offset 0 and no swizzle.
__device__ __forceinline__ unsigned long long NAME_wgmma_descriptor(unsigned address, unsigned lbo, unsigned sbo) {
  return static_cast<unsigned long long>((address & 0x3FFFF) >> 4) |
         static_cast<unsigned long long>((lbo & 0x3FFFF) >> 4) << 16 |
         static_cast<unsigned long long>((sbo & 0x3FFFF) >> 4) << 32;
}
__device__ __forceinline__ void NAME_wgmma_fence() {
#ifdef TRIMODE_CUDA_EMULATION
  emu::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void NAME_wgmma_commit() {
#ifdef TRIMODE_CUDA_EMULATION
  emu::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int PENDING> __device__ __forceinline__ void NAME_wgmma_wait() {
#ifdef TRIMODE_CUDA_EMULATION
  emu::wgmma_wait(PENDING);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#endif
}
__device__ __forceinline__ void NAME_fence_async_shared() {
#ifndef TRIMODE_CUDA_EMULATION  // one address space in the emulator: nothing to order
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Pins registers to this point of the instruction stream (what CUTLASS calls fencing an
// operand): the compiler may neither move their reads and writes across it nor reuse them
// before it. Around a wgmma this keeps the accumulators and A fragments, which the tensor
// cores read and write asynchronously, untouched between the issue and the wait.
template <int COUNT> __device__ __forceinline__ void NAME_hold(float* r) {
#ifndef TRIMODE_CUDA_EMULATION
#pragma unroll
  for (int i = 0; i < COUNT; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int COUNT> __device__ __forceinline__ void NAME_hold(unsigned* r) {
#ifndef TRIMODE_CUDA_EMULATION
#pragma unroll
  for (int i = 0; i < COUNT; ++i) asm volatile("" : "+r"(r[i])::"memory");
#endif
}
"""

_WGMMA_WIDTH = r"""
__device__ __forceinline__ void NAME_wgmma_nWIDTH(float* d, const unsigned char* smem, unsigned a_offset,
                                                  unsigned b_offset, unsigned lbo, unsigned sbo) {
#ifdef TRIMODE_CUDA_EMULATION
  emu::wgmma_m64k16_f32_f16(d, WIDTH, smem, NAME_wgmma_descriptor(a_offset, lbo, sbo),
                            NAME_wgmma_descriptor(b_offset, lbo, sbo));
#else
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned long long a = NAME_wgmma_descriptor(base + a_offset, lbo, sbo);
  const unsigned long long b = NAME_wgmma_descriptor(base + b_offset, lbo, sbo);
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64nWIDTHk16.f32.f16.f16 {REGISTERS}, %A, %B, accumulate, 1, 1, 0, 0;\n}\n"
      : OUTPUTS
      : "l"(a), "l"(b));
#endif
}
__device__ __forceinline__ void NAME_wgmma_rs_nWIDTH(float* d, const unsigned* a, const unsigned char* smem,
                                                     unsigned b_offset, unsigned lbo, unsigned sbo) {
#ifdef TRIMODE_CUDA_EMULATION
  emu::wgmma_rs_m64k16_f32_f16(d, WIDTH, a, smem, NAME_wgmma_descriptor(b_offset, lbo, sbo));
#else
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned long long b = NAME_wgmma_descriptor(base + b_offset, lbo, sbo);
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64nWIDTHk16.f32.f16.f16 {REGISTERS}, {%RA0, %RA1, %RA2, %RA3}, %RB, accumulate, 1, 1, 0;\n}\n"
      : OUTPUTS
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
#endif
}
"""

WGMMA_WIDTHS = (16, 32, 64, 128, 256)  # the n of the m64nNk16 shapes our kernels use


def wgmma_helpers(prefix: str, *widths: int) -> str:
    """The wgmma helpers, with the MMA functions of each of `widths`."""
    return _WGMMA_COMMON.replace("NAME", prefix) + "".join(_wgmma_width(prefix, n) for n in widths)


def _wgmma_width(prefix: str, n: int) -> str:
    if n not in WGMMA_WIDTHS:
        raise ValueError(f"wgmma width {n} is not one of {WGMMA_WIDTHS}")
    count = n // 2  # fp32 accumulators per thread
    return (_WGMMA_WIDTH.replace("NAME", prefix).replace("WIDTH", str(n))
            .replace("REGISTERS", ", ".join(f"%{i}" for i in range(count)))
            .replace("%A,", f"%{count},").replace("%B,", f"%{count + 1},")
            .replace("%RA0", f"%{count}").replace("%RA1", f"%{count + 1}").replace("%RA2", f"%{count + 2}")
            .replace("%RA3", f"%{count + 3}").replace("%RB,", f"%{count + 4},")
            .replace("OUTPUTS", ", ".join(f'"+f"(d[{i}])' for i in range(count))))
