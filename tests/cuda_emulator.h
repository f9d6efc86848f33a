// Runs hand-written CUDA C++ device functions on the CPU, for tests on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it
// reaches a barrier (__syncthreads, or a warp-collective op: shuffles, mma.sync), then the next
// fiber runs; a barrier releases once every live thread of its group has arrived, and a thread
// that returns drops out of its barriers (as on the GPU). Blocks run one after another, in
// forward or reverse order, and the threads of a block likewise, so a kernel that depends on
// which block or thread runs first gives different results under the two orders. A barrier
// nobody can complete (a __syncthreads inside divergent code) is reported as a deadlock.
//
// Emulated: __shared__ (block-shared, one block at a time), the half types and intrinsics our
// kernels use, full-warp shuffles, mma.sync m16n8k16 f16 -> f32 (PTX ISA fragment layouts,
// fp32 accumulation in k order), ldmatrix x4 (plain and transposed), cp.async 16-byte copies that land only at cp.async.wait_group
// (a read before the wait sees the old contents), wgmma m64nNk16 from shared memory (products
// land at wgmma.wait_group; shared memory changed under one in flight is an error), atomics
// and fences (trivial: one OS thread; fence.proxy.async is not modelled).
// griddepcontrol.wait gives the buffers the previous kernel writes their contents (until then
// they hold poison), launch_dependents does nothing.
// Kernels reach the emulated instructions through `#ifdef TRIMODE_CUDA_EMULATION`, which
// this header defines, in place of their inline PTX.
// Not modelled: shared memory is not poisoned between blocks (a block that reads shared
// memory it never wrote sees the previous block's), nor are timing, occupancy and the
// limits on registers and shared memory (ptxas reports those; tests/test_cuda_build.py).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <vector>

#define TRIMODE_CUDA_EMULATION 1
namespace emu {
inline void fail(const char* message);
}
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// ---- vector types --------------------------------------------------------------------------
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- half precision (IEEE binary16 storage; arithmetic rounds once per operation) ------------
struct __half {
  unsigned short bits;
  __half() = default;
  // C-style casts, as TVM's generated CUDA writes them ((float)h, (half)f): explicit, so
  // hand-written kernels still convert only through the intrinsics. Not an aggregate any
  // more: half{bits} would convert the number, so bits are set by name.
  explicit __half(float v) {
    _Float16 f = static_cast<_Float16>(v);
    std::memcpy(&bits, &f, 2);
  }
  explicit operator float() const {
    _Float16 f;
    std::memcpy(&f, &bits, 2);
    return static_cast<float>(f);
  }
};
struct alignas(4) __half2 {
  __half x, y;
};
using half = __half;
using half2 = __half2;
using uchar = unsigned char;  // TVM's generated CUDA declares dynamic shared memory as uchar

inline float __half2float(half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline half __float2half_rn(float v) {
  _Float16 f = static_cast<_Float16>(v);
  half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline half __float2half(float v) { return __float2half_rn(v); }
inline half2 __halves2half2(half a, half b) { return {a, b}; }
inline half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline half2 __float2half2_rn(float a) { return {__float2half_rn(a), __float2half_rn(a)}; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
// half arithmetic as cuda_fp16.h's operators: exact in double, one rounding to fp16
#define TRIMODE_EMU_HALF_OP(op)                                                            \
  inline half operator op(half a, half b) {                                               \
    return half(static_cast<float>(static_cast<double>(static_cast<float>(a)) op           \
                                   static_cast<double>(static_cast<float>(b))));           \
  }
TRIMODE_EMU_HALF_OP(+)
TRIMODE_EMU_HALF_OP(-)
TRIMODE_EMU_HALF_OP(*)
#undef TRIMODE_EMU_HALF_OP
// TVM's generated CUDA packs two halves into a word with this (its preamble defines it)
inline unsigned __pack_half2(half x, half y) { return (static_cast<unsigned>(y.bits) << 16) | x.bits; }
inline float2 __half22float2(half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float __low2float(half2 v) { return __half2float(v.x); }
inline float __high2float(half2 v) { return __half2float(v.y); }
// fp16 values are exact in double, and so are the sum, difference and product of two: one
// rounding to fp16, as the hardware does.
#define TRIMODE_EMU_HALF2_OP(name, expr)                                                  \
  inline half2 name(half2 a, half2 b) {                                                   \
    auto f = [](half p, half q) {                                                         \
      double x = __half2float(p), y = __half2float(q);                                     \
      return __float2half_rn(static_cast<float>(expr));                                   \
    };                                                                                    \
    return {f(a.x, b.x), f(a.y, b.y)};                                                    \
  }
TRIMODE_EMU_HALF2_OP(__hadd2, x + y)
TRIMODE_EMU_HALF2_OP(__hsub2, x - y)
TRIMODE_EMU_HALF2_OP(__hmul2, x * y)
#undef TRIMODE_EMU_HALF2_OP
inline half2 __hfma2(half2 a, half2 b, half2 c) {
  auto f = [](half p, half q, half r) {
    return __float2half_rn(static_cast<float>(
        static_cast<double>(__half2float(p)) * __half2float(q) + __half2float(r)));
  };
  return {f(a.x, b.x, c.x), f(a.y, b.y, c.y)};
}

// ---- bit and math intrinsics -----------------------------------------------------------------
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 0xf;
    if (sel & 8) emu::fail("__byte_perm: sign-replicating selectors are not emulated");
    out |= static_cast<unsigned>((bytes >> (8 * sel)) & 0xff) << (8 * i);
  }
  return out;
}
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a < b ? b : a; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
inline void __threadfence() {}
inline void __trap() { emu::fail("__trap()"); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned old = *p; *p = old + v; return old; }
inline int atomicAdd(int* p, int v) { int old = *p; *p = old + v; return old; }
inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
inline unsigned atomicExch(unsigned* p, unsigned v) { unsigned old = *p; *p = v; return old; }

// ---- the scheduler -----------------------------------------------------------------------------
namespace emu {

struct Fiber;

struct Barrier {
  int expected = 0;
  int arrived = 0;
};

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;  // of 16; the rest is zero-filled (cp.async's src-size operand)
};

// One wgmma.mma_async of this thread: its products, computed when issued, land in d at the
// wait_group that retires its group.
struct PendingProduct {
  float* d;
  int n;
  const unsigned char* smem;
  unsigned long long a, b;   // descriptors (a unused when A comes from registers)
  std::vector<float> product;
  const unsigned* a_registers = nullptr;  // this thread's A fragment (register form)
  unsigned a_copy[4] = {};
  std::vector<float> a_matrix;  // the warpgroup's A at issue, 64 x 16 (register form)
  std::vector<float> b_matrix;  // B when the warpgroup's first thread issued it, n x 16 (register form)
};

// A thread's asynchronous operations of one kind (cp.async copies, wgmmas), as PTX groups
// them: issued into the open group, committed, retired oldest first by a wait_group.
template <class Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::vector<std::vector<Op>> committed;

  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  bool pending() const {
    bool any = !open.empty();
    for (const auto& group : committed) any |= !group.empty();
    return any;
  }
  template <class Complete>
  void wait(int pending_allowed, Complete complete) {
    while (static_cast<int>(committed.size()) > pending_allowed) {
      for (const Op& op : committed.front()) complete(op);
      committed.erase(committed.begin());
    }
  }
};

struct Fiber {
  ucontext_t context;
  dim3 thread;
  int warp = 0, lane = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  AsyncGroups<PendingCopy> copies;
  AsyncGroups<PendingProduct> products;
  bool wgmma_fenced = false;  // a wgmma.fence since this thread's last wgmma.wait_group
  int wgmma_issued = 0;       // register-form wgmmas this thread has issued
};

struct Warp {
  Barrier barrier;
  unsigned char slot[32][8];
  unsigned mma[32][6];
};

// Four consecutive warps: where a wgmma with A in registers gathers the 64 x 16 A.
struct WarpGroup {
  Barrier barrier;
  unsigned a[128][4];
  // B of the warpgroup's latest register-form wgmma, read from shared memory when its first
  // thread issued it (a thread still writing B for it would be racing: the hardware may read
  // B as soon as the instruction issues)
  std::vector<float> b;
  int b_issue = 0;  // which of the warpgroup's wgmmas `b` belongs to, counted from 1
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<Warp> warps;
inline std::vector<WarpGroup> warpgroups;
inline Barrier block_barrier;
inline Fiber* current = nullptr;
inline dim3 block_index, block_dim, grid_dim;
inline std::function<void()> body;
inline std::vector<std::vector<char>> stacks;
inline char error[512];

constexpr size_t STACK_BYTES = 256 << 10;

inline bool failed = false;

// Records the error and leaves the fiber for good; launch() then returns nonzero.
inline void fail(const char* message) {
  std::snprintf(error, sizeof error, "%s (block %u,%u,%u thread %u,%u,%u)", message, block_index.x,
                block_index.y, block_index.z, current ? current->thread.x : 0,
                current ? current->thread.y : 0, current ? current->thread.z : 0);
  failed = true;
  if (current) setcontext(&scheduler);
}

inline void release(Barrier& barrier) {
  for (Fiber& fiber : fibers)
    if (fiber.waiting == &barrier) fiber.waiting = nullptr;
  barrier.arrived = 0;
}

inline void arrive(Barrier& barrier) {
  if (++barrier.arrived == barrier.expected) {
    release(barrier);
    return;
  }
  current->waiting = &barrier;
  swapcontext(&current->context, &scheduler);
}

inline void leave(Barrier& barrier) {
  if (--barrier.expected > 0 && barrier.arrived == barrier.expected) release(barrier);
}

inline void trampoline() {
  body();
  if (current->copies.pending()) fail("thread exited with cp.async copies never waited for");
  if (current->products.pending()) fail("thread exited with wgmma products never waited for");
  current->done = true;
  leave(block_barrier);
  leave(warps[current->warp].barrier);
  leave(warpgroups[current->warp / 4].barrier);
}  // returns to the scheduler through uc_link

inline int thread_count() { return static_cast<int>(block_dim.x * block_dim.y * block_dim.z); }

// Runs every block of the grid. reverse: blocks and threads in descending order; greedy: the
// first runnable thread always runs next, so its warp races ahead of the others to the next
// __syncthreads (the default sweeps every thread once per round: warps move in lockstep).
inline int launch(dim3 grid, dim3 block, bool reverse, bool greedy, std::function<void()> kernel) {
  grid_dim = grid;
  block_dim = block;
  body = std::move(kernel);
  error[0] = 0;
  failed = false;
  const int n = thread_count();
  if (n < 1 || n > 1024) {
    fail("threads per block must be 1..1024");
    return 1;
  }
  stacks.resize(n);
  for (auto& stack : stacks) stack.resize(STACK_BYTES);
  const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  for (long b = 0; b < blocks; ++b) {
    const long linear = reverse ? blocks - 1 - b : b;
    block_index = {static_cast<unsigned>(linear % grid.x),
                   static_cast<unsigned>(linear / grid.x % grid.y),
                   static_cast<unsigned>(linear / grid.x / grid.y)};
    fibers.assign(n, Fiber{});
    warps.assign((n + 31) / 32, Warp{});
    warpgroups.assign((n + 127) / 128, WarpGroup{});
    for (size_t w = 0; w < warpgroups.size(); ++w)
      warpgroups[w].barrier.expected = std::min(128, n - 128 * static_cast<int>(w));
    block_barrier = {n, 0};
    for (int i = 0; i < n; ++i) {
      Fiber& fiber = fibers[i];
      fiber.thread = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                      static_cast<unsigned>(i / block.x / block.y)};
      fiber.warp = i / 32;
      fiber.lane = i % 32;
      warps[fiber.warp].barrier.expected = std::min(32, n - 32 * fiber.warp);  // a last partial warp
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = stacks[i].data();
      fiber.context.uc_stack.ss_size = STACK_BYTES;
      fiber.context.uc_link = &scheduler;
      makecontext(&fiber.context, trampoline, 0);
    }
    int finished = 0;
    while (finished < n) {
      bool progressed = false;
      for (int k = 0; k < n; ++k) {
        Fiber& fiber = fibers[reverse ? n - 1 - k : k];
        if (fiber.done || fiber.waiting) continue;
        current = &fiber;
        swapcontext(&scheduler, &fiber.context);
        if (failed) return 1;
        progressed = true;
        if (fiber.done) ++finished;
        if (greedy) break;  // back to the first thread: it runs ahead as far as barriers allow
      }
      if (!progressed) {
        current = nullptr;
        fail("deadlock: every live thread waits at a barrier that cannot complete");
        return 1;
      }
    }
    current = nullptr;
  }
  return 0;
}

inline Warp& my_warp() { return warps[current->warp]; }

inline void sync_warp() { arrive(my_warp().barrier); }

template <class T>
inline T shuffle(unsigned mask, T value, int source_lane) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes here");
  if (mask != 0xffffffffu || my_warp().barrier.expected != 32) fail("partial-warp shuffles are not emulated");
  Warp& warp = my_warp();
  std::memcpy(warp.slot[current->lane], &value, sizeof(T));
  sync_warp();
  T result;
  std::memcpy(&result, warp.slot[source_lane & 31], sizeof(T));
  sync_warp();  // nobody overwrites a slot before every lane has read
  return result;
}

inline float half_of(unsigned word, int upper) {
  half h;
  h.bits = static_cast<unsigned short>(upper ? word >> 16 : word & 0xffff);
  return __half2float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: d = a (16x16) * b (16x8) + c, per lane
// (group g = lane / 4, t = lane % 4): a[0..3] = rows g | g+8 x k 2t..2t+1 | 2t+8..2t+9 (a[0]: g,
// low k; a[1]: g+8, low k; a[2]: g, high k; a[3]: g+8, high k), b0 | b1 = k 2t..2t+1 | 2t+8..2t+9
// of column g, c[0..3] = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
inline void mma_m16n8k16_f32_f16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  if (my_warp().barrier.expected != 32) fail("mma.sync with an incomplete warp");
  Warp& warp = my_warp();
  unsigned* mine = warp.mma[current->lane];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  sync_warp();
  const int g = current->lane / 4, t = current->lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = c[e];
    for (int k = 0; k < 16; ++k) {
      const unsigned a_word = warp.mma[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
      const unsigned b_word = warp.mma[col * 4 + (k % 8) / 2][4 + (k >= 8)];
      acc += half_of(a_word, k % 2) * half_of(b_word, k % 2);
    }
    c[e] = acc;
  }
  sync_warp();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l names row l % 8 of matrix l / 8;
// register i of lane l gets row l / 4, elements 2(l % 4), +1 of matrix i (trans: elements
// (2(l % 4), l / 4) and (2(l % 4) + 1, l / 4), the transposed matrix's row l / 4).
inline void ldmatrix_x4(unsigned* r, const void* row, bool trans) {
  if (my_warp().barrier.expected != 32) fail("ldmatrix with an incomplete warp");
  if (reinterpret_cast<uintptr_t>(row) % 16) fail("ldmatrix row address not 16-byte aligned");
  Warp& warp = my_warp();
  std::memcpy(warp.slot[current->lane], &row, sizeof row);
  sync_warp();
  const int l = current->lane;
  for (int i = 0; i < 4; ++i) {
    unsigned short pair[2];
    for (int e = 0; e < 2; ++e) {
      const int rr = trans ? 2 * (l % 4) + e : l / 4, cc = trans ? l / 4 : 2 * (l % 4) + e;
      const unsigned short* source;
      std::memcpy(&source, warp.slot[8 * i + rr], sizeof source);
      pair[e] = source[cc];
    }
    r[i] = pair[0] | static_cast<unsigned>(pair[1]) << 16;
  }
  sync_warp();
}

inline void land(const PendingCopy& copy) {
  std::memset(copy.dst, 0, 16);
  std::memcpy(copy.dst, copy.src, copy.bytes);
}

// Late (the default) catches a read before the wait; early catches an overwrite of shared
// memory that other threads have not finished reading.
inline bool early_copies = false;

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async source size outside 0..16");
  if (early_copies) land({dst, src, src_bytes});
  else current->copies.open.push_back({dst, src, src_bytes});
}

inline void cp_async_commit() { current->copies.commit(); }

inline void cp_async_wait(int pending_allowed) { current->copies.wait(pending_allowed, land); }

// wgmma.mma_async.sync.aligned.m64nNk16.f32.f16.f16 with both operands K-major in shared
// memory, no swizzle: the descriptor's start address, leading byte offset (between core
// matrices along k) and stride byte offset (between 8-row groups), each stored >> 4, name
// element (row, k) at start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
// `smem` stands for shared address 0. Thread t of the warpgroup (warp w = t / 32, group
// g = t % 32 / 4, q = t % 4) holds d[4j + e] = D(16w + g + 8(e / 2), 8j + 2q + e % 2).
// Asynchrony as the PTX ISA states it: the products are computed from shared memory at issue
// (the register form: when the warpgroup's first thread issues it) and again at the
// wait_group that retires them, and differ if shared memory changed while they were in
// flight; they land in d only at that wait. A wgmma without a wgmma.fence since
// the thread's last wait_group (when it may have touched d) is refused.
inline half half_at(const unsigned char* smem, unsigned long long desc, int row, int k) {
  const unsigned start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4,
                 sbo = ((desc >> 32) & 0x3FFF) << 4;
  half h;
  std::memcpy(&h, smem + start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2, 2);
  return h;
}

inline float a_at(const PendingProduct& op, int row, int k) {
  return op.a_matrix.empty() ? __half2float(half_at(op.smem, op.a, row, k)) : op.a_matrix[row * 16 + k];
}

// use_b_matrix: B as captured at issue (register form); else shared memory as it is now.
inline std::vector<float> wgmma_product(const PendingProduct& op, bool use_b_matrix = true) {
  const int warp = current->warp % 4, g = current->lane / 4, q = current->lane % 4;
  std::vector<float> out(op.n / 2);
  for (int j = 0; j < op.n / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + g + 8 * (e / 2), col = 8 * j + 2 * q + e % 2;
      float acc = 0.f;
      for (int k = 0; k < 16; ++k)
        acc += a_at(op, row, k) * (use_b_matrix && !op.b_matrix.empty() ? op.b_matrix[col * 16 + k]
                                                                          : __half2float(half_at(op.smem, op.b, col, k)));
      out[4 * j + e] = acc;
    }
  return out;
}

inline void wgmma_m64k16_f32_f16(float* d, int n, const unsigned char* smem, unsigned long long a,
                                 unsigned long long b) {
  if (thread_count() % 128) fail("wgmma in a block that is not whole warpgroups");
  if (!current->wgmma_fenced) fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
  PendingProduct op{d, n, smem, a, b, {}};
  op.product = wgmma_product(op);
  current->products.open.push_back(std::move(op));
}

// The register form: A's 64 x 16 fp16 comes from the warpgroup's registers, laid out as
// mma.sync m16n8k16's A fragment per warp (warp w: rows 16w..16w+15; a[0] = (g, k 2q..2q+1),
// a[1] = (g + 8, same k), a[2] = (g, k 2q+8..2q+9), a[3] = (g + 8, those k)). The PTX ISA
// forbids changing those registers before the wgmma's wait_group: the thread's own are checked
// there against their value at issue.
inline void wgmma_rs_m64k16_f32_f16(float* d, int n, const unsigned* a, const unsigned char* smem,
                                    unsigned long long b) {
  if (thread_count() % 128) fail("wgmma in a block that is not whole warpgroups");
  if (!current->wgmma_fenced) fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
  WarpGroup& group = warpgroups[current->warp / 4];
  const int me = current->warp % 4 * 32 + current->lane;
  for (int i = 0; i < 4; ++i) group.a[me][i] = a[i];
  if (group.b_issue < ++current->wgmma_issued) {  // the first of the warpgroup to issue it
    group.b_issue = current->wgmma_issued;
    group.b.resize(n * 16);
    for (int col = 0; col < n; ++col)
      for (int k = 0; k < 16; ++k) group.b[col * 16 + k] = __half2float(half_at(smem, b, col, k));
  }
  arrive(group.barrier);
  PendingProduct op{d, n, smem, 0, b, {}};
  op.b_matrix = group.b;
  op.a_registers = a;
  std::memcpy(op.a_copy, a, sizeof op.a_copy);
  op.a_matrix.resize(64 * 16);
  for (int row = 0; row < 64; ++row)
    for (int k = 0; k < 16; ++k) {
      const int thread = row / 16 * 32 + (row % 8) * 4 + (k % 8) / 2, reg = (row % 16) / 8 + 2 * (k / 8);
      op.a_matrix[row * 16 + k] = half_of(group.a[thread][reg], k % 2);
    }
  arrive(group.barrier);  // nobody overwrites the gathered fragments before all have read them
  op.product = wgmma_product(op);
  current->products.open.push_back(std::move(op));
}

inline void wgmma_fence() { current->wgmma_fenced = true; }

inline void wgmma_commit() { current->products.commit(); }

inline void wgmma_wait(int pending_allowed) {
  current->products.wait(pending_allowed, [](const PendingProduct& op) {
    if (op.a_registers && std::memcmp(op.a_registers, op.a_copy, sizeof op.a_copy))
      fail("A registers of a wgmma changed before its wait_group");
    if (wgmma_product(op, false) != op.product)
      fail("shared memory read by a wgmma changed between its issue and its wait_group");
    for (int i = 0; i < op.n / 2; ++i) op.d[i] += op.product[i];
  });
  current->wgmma_fenced = false;
}

// prefetch.global.L2 fetches nothing here; it must still name memory the kernel was given
// (where the launcher says which: an empty list checks nothing).
struct Span {
  const unsigned char* data;
  size_t size;
};
inline std::vector<Span> argument_buffers;

inline void prefetch_l2(const void* address) {
  const auto* p = static_cast<const unsigned char*>(address);
  if (argument_buffers.empty()) return;
  for (const Span& span : argument_buffers)
    if (p >= span.data && p < span.data + span.size) return;
  fail("prefetch.global.L2 of an address outside every argument buffer");
}

// Programmatic dependent launch (trimode/compiler/grid_dependency.py): a kernel may run
// while the previous one finishes, so until its griddepcontrol.wait the buffers that kernel
// writes hold poison (all bytes 0xFF: NaN, or -1); the first wait of the launch gives them
// their contents. A read before the wait sees the poison, a write before it is lost.
inline std::function<void()> previous_kernel_done;  // set by the launcher when buffers wait
inline bool waited_for_previous = false;

inline void grid_dependency_wait() {
  if (!waited_for_previous && previous_kernel_done) previous_kernel_done();
  waited_for_previous = true;
}

}  // namespace emu

// What TVM's generated kernels call (its own definitions are inline PTX).
inline void tvm_builtin_ptx_griddepcontrol_wait() { emu::grid_dependency_wait(); }
inline void tvm_builtin_ptx_griddepcontrol_launch_dependents() {}

#define threadIdx (emu::current->thread)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::arrive(emu::block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
// The lanes of this warp still running (a shuffle with fewer than 32 is refused anyway).
inline unsigned __activemask() {
  const int live = emu::my_warp().barrier.expected;
  return live >= 32 ? 0xffffffffu : (1u << live) - 1u;
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int lane, int = 32) {
  return emu::shuffle(mask, v, lane);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
  return emu::shuffle(mask, v, emu::current->lane ^ lane_mask);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
  const int source = emu::current->lane + static_cast<int>(delta);
  T other = emu::shuffle(mask, v, source < 32 ? source : emu::current->lane);
  return other;
}
