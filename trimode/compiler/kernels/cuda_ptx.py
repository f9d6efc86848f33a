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
  holds it; nothing is read in the emulator).
- `{p}_wait_previous_kernels()`: griddepcontrol.wait (the kernels before this one in the
  stream have finished and their writes are visible), then launch_dependents (the next kernel
  may start launching). For kernels whose TIR is marked WAITS_IN_KERNEL (below): only
  weights may be read before it.
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
#ifndef TRIMODE_CUDA_EMULATION
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
