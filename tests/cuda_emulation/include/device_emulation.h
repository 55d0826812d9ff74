// Runs the CUDA kernels of csrc/cuda/ on the CPU, so that their indexing, tiling, routing and
// synchronisation can be tested against the loop oracle on machines without a GPU.
//
// A launch runs its blocks one after another. The threads of a block are fibers (ucontext) on the calling
// thread: each runs until it reaches a barrier (__syncthreads, __syncwarp, a shuffle) or exits, and at every
// pass the warps go in a new pseudo-random order, each as far as it can before the next, with its lanes
// shuffled too, so a read or write that lacks the barrier before it meets stale or overwritten data.
// Besides the results, the emulation checks:
//   - launch configurations the hardware refuses (block > 1024 threads, empty grid, grid.y/z > 65535,
//     dynamic shared memory over the limit set with cudaFuncSetAttribute);
//   - deadlocks (no thread can run, some have not exited), and a barrier phase reached from two lines;
//   - shuffles with exited lanes or partial masks;
//   - wmma pointer alignment (32 bytes) and leading dimensions (multiples of 16 bytes), cp.async and
//     float4 atomics alignment (16 bytes), cp.async destinations inside the dynamic shared memory;
//   - writes past the end of the dynamic shared memory (a guard band checked after each block);
//   - reads of dynamic shared memory that nothing wrote (it is filled with NaN bytes before each block);
//   - cp.async data read before its cp.async.wait_group, or a stage refilled too early: each copy lands at
//     its issue or at its wait, the two extremes the hardware allows;
//   - CUDA_KERNEL_ASSERT, which fails the launch with its condition.
// What it cannot check: timing, occupancy, register limits, coalescing, and races between blocks (blocks do
// not overlap). wmma fragments follow the documented semantics of load/mma/store, which is all the kernels use.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define ALTER_DS_DEVICE_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define __restrict__

// ---- CUDA runtime types ----

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct EmulatedStream;
using cudaStream_t = EmulatedStream*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaDeviceProp {
  int major;
  int minor;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int multiProcessorCount;
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kGuardByte = 0xA5;
constexpr unsigned char kPoisonByte = 0xFF;  // NaN as float, bf16 and half; -1 as int

struct Fiber;

// Threads of a block wait at a barrier until its phase advances; exited threads stop counting (as on the GPU).
struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned line = 0;
  uint64_t phase = 0;
  void reset(int n) {
    expected = n;
    arrived = 0;
  }
  void complete() {
    arrived = 0;
    ++phase;
  }
  void drop() {
    --expected;
    if (arrived > 0 && arrived >= expected) complete();
  }
};

struct Warp {
  Barrier barrier;
  uint64_t slots[32] = {};
};

struct AsyncCopy {
  void* dst;
  const void* src;
  bool pred;
};

struct Fiber {
  ucontext_t context;
  unsigned linear = 0;  // thread index within the block
  bool done = false;
  Barrier* waiting_on = nullptr;
  uint64_t waiting_phase = 0;
  unsigned waiting_line = 0;
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> committed;
};

struct Launch {
  dim3 grid, block;
  int threads = 0;
  Barrier block_barrier;
  std::vector<Warp> warps;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer's fiber switches
  size_t scheduler_stack_bytes = 0;
  const std::function<void()>* kernel = nullptr;
  unsigned char* shared = nullptr;  // dynamic shared memory followed by a guard band
  size_t shared_bytes = 0;
  std::mt19937 rng{12345};  // scheduling order and cp.async landing: random, and the same in every run
  std::string failure;

  void fail(const std::string& message) {
    if (failure.empty()) failure = message;
  }
};

inline thread_local Launch* current_launch = nullptr;
inline thread_local Fiber* current_fiber = nullptr;

inline void fail(const std::string& message) {
  if (current_launch == nullptr || current_fiber == nullptr) throw std::runtime_error("device emulation: " + message);
  current_launch->fail(message + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                       std::to_string(blockIdx.z) + ", thread " + std::to_string(current_fiber->linear) + ")");
}

inline unsigned lane() { return current_fiber->linear & 31; }
inline Warp& warp() { return current_launch->warps[current_fiber->linear >> 5]; }

inline cudaDeviceProp& properties() {
  // An H100 (sm_90): 227 KB of opt-in shared memory per block.
  static cudaDeviceProp props{9, 0, 48 * 1024, 227 * 1024, 132};
  return props;
}

inline size_t& dynamic_shared_limit() {
  static size_t limit = 48 * 1024;  // raised by cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  return limit;
}

inline unsigned char* dynamic_shared_memory() { return current_launch->shared; }

inline void check_alignment(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail(std::string(what) + ": pointer not " + std::to_string(bytes) + "-byte aligned");
  }
}

// ---- switching between the scheduler and the threads (announced to AddressSanitizer when it is on) ----

inline void switch_to_scheduler(bool thread_ends) {
  Launch& l = *current_launch;
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(thread_ends ? nullptr : &fake_stack, l.scheduler_stack, l.scheduler_stack_bytes);
#else
  (void)thread_ends;
#endif
  swapcontext(&current_fiber->context, &l.scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
}

constexpr size_t kStackBytes = 256 * 1024;
inline char* fiber_stack(size_t index);

inline void switch_to_thread(Launch& l, Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, fiber_stack(f.linear), kStackBytes);
#endif
  swapcontext(&l.scheduler, &f.context);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// ---- barriers and warp collectives ----

// Arrives at `barrier`; the last arrival completes the phase and goes on, the others yield until it does.
inline void arrive_and_wait(Barrier& barrier, unsigned line, const char* what) {
  if (barrier.arrived == 0) {
    barrier.line = line;
  } else if (barrier.line != line) {
    fail(std::string(what) + " phase reached from lines " + std::to_string(barrier.line) + " and " +
         std::to_string(line));
  }
  if (++barrier.arrived >= barrier.expected) {
    barrier.complete();
    return;
  }
  Fiber& self = *current_fiber;
  self.waiting_on = &barrier;
  self.waiting_phase = barrier.phase;
  self.waiting_line = line;
  switch_to_scheduler(false);
}

inline void check_full_warp(unsigned mask, const char* what, unsigned line) {
  if (mask != 0xffffffffu) fail(std::string(what) + ": only full-warp masks are emulated");
  if (warp().barrier.expected != 32) {
    fail(std::string(what) + " at line " + std::to_string(line) + " with exited lanes in the mask");
  }
}

// Every lane publishes `value` and waits for the others; the caller reads the slots, then waits once more so
// that no slot is overwritten before every lane has read.
template <typename T>
inline Warp& publish(T value, unsigned line, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  Warp& w = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[lane()] = bits;
  arrive_and_wait(w.barrier, line, what);
  return w;
}

template <typename T>
inline T read_slot(const Warp& w, unsigned src) {
  T out;
  std::memcpy(&out, &w.slots[src & 31], sizeof(T));
  return out;
}

template <typename T>
inline T shuffle(unsigned mask, T value, unsigned src, unsigned line, const char* what) {
  check_full_warp(mask, what, line);
  Warp& w = publish(value, line, what);
  const T out = read_slot<T>(w, src);
  arrive_and_wait(w.barrier, line, what);
  return out;
}

// ---- cp.async: each copy lands at once or at the wait that retires its group, at random: late copies expose
// data read before its wait, early ones a stage refilled while another warp still reads it ----

inline void land(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (c.pred) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
}

inline void cp_async_16(void* dst, const void* src, bool pred) {
  check_alignment(dst, 16, "cp.async destination");
  if (pred) check_alignment(src, 16, "cp.async source");
  const auto* d = static_cast<unsigned char*>(dst);
  const Launch& l = *current_launch;
  if (d < l.shared || d + 16 > l.shared + l.shared_bytes) {
    fail("cp.async destination outside the block's dynamic shared memory");
    return;
  }
  if (current_launch->rng() & 1) {
    land({{dst, src, pred}});
  } else {
    current_fiber->open.push_back({dst, src, pred});
  }
}

inline void cp_async_commit() {
  current_fiber->committed.push_back(std::move(current_fiber->open));
  current_fiber->open.clear();
}

inline void cp_async_wait(int pending) {
  auto& committed = current_fiber->committed;
  while (static_cast<int>(committed.size()) > pending) {
    land(committed.front());
    committed.pop_front();
  }
}

// ---- launches ----

// Fiber stacks, kept for the process (1,024 threads at most), touched only as deep as the kernels go.
inline char* fiber_stack(size_t index) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= index) stacks.emplace_back(new char[kStackBytes]);
  return stacks[index].get();
}

inline void fiber_main() {
  Launch& l = *current_launch;
  Fiber& self = *current_fiber;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
  try {
    (*l.kernel)();
  } catch (const std::exception& error) {
    fail(std::string("exception in a kernel: ") + error.what());
  }
  if (!self.open.empty() || !self.committed.empty()) {  // copies still in flight land before the thread ends
    cp_async_commit();
    cp_async_wait(0);
  }
  self.done = true;
  l.block_barrier.drop();
  l.warps[self.linear >> 5].barrier.drop();
  switch_to_scheduler(true);  // never resumed
}

// Runs one block to completion, or until a deadlock (recorded as the launch's failure).
inline void run_block(Launch& l) {
  l.block_barrier.reset(l.threads);
  for (size_t w = 0; w < l.warps.size(); ++w) l.warps[w].barrier.reset(std::min(32, l.threads - static_cast<int>(w) * 32));
  std::memset(l.shared, kPoisonByte, l.shared_bytes);
  for (int t = 0; t < l.threads; ++t) {
    Fiber& f = l.fibers[t];
    f.done = false;
    f.waiting_on = nullptr;
    f.open.clear();
    f.committed.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = fiber_stack(t);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  // Warps in a random order, each run as far as it can go (to a __syncthreads or its end) before the next:
  // the most skew between warps the hardware could show, so a missing block barrier lets one warp overwrite
  // or read what another has not finished with. Lanes of a warp run in a random order too.
  const int warps = static_cast<int>(l.warps.size());
  std::vector<int> warp_order(warps);
  std::vector<int> lane_order(32);
  for (int w = 0; w < warps; ++w) warp_order[w] = w;
  for (int i = 0; i < 32; ++i) lane_order[i] = i;
  while (true) {
    std::shuffle(warp_order.begin(), warp_order.end(), l.rng);
    bool ran = false;
    for (int w : warp_order) {
      for (bool progressed = true; progressed;) {
        progressed = false;
        std::shuffle(lane_order.begin(), lane_order.end(), l.rng);
        for (int i : lane_order) {
          const int t = w * 32 + i;
          if (t >= l.threads) continue;
          Fiber& f = l.fibers[t];
          if (f.done || (f.waiting_on != nullptr && f.waiting_on->phase == f.waiting_phase)) continue;
          f.waiting_on = nullptr;
          current_fiber = &f;
          threadIdx = {f.linear % l.block.x, (f.linear / l.block.x) % l.block.y, f.linear / (l.block.x * l.block.y)};
          switch_to_thread(l, f);
          current_fiber = nullptr;
          progressed = ran = true;
        }
      }
    }
    bool all_done = true;
    for (const Fiber& f : l.fibers) all_done = all_done && f.done;
    if (all_done) break;
    if (!ran) {
      std::string lines;
      for (const Fiber& f : l.fibers) {
        if (!f.done && lines.find(std::to_string(f.waiting_line)) == std::string::npos) {
          lines += (lines.empty() ? "" : ", ") + std::to_string(f.waiting_line);
        }
      }
      l.fail("deadlock in block " + std::to_string(blockIdx.x) + ": threads wait at line(s) " + lines +
             " that the others never reach");
      return;
    }
  }
  const unsigned char* guard = l.shared + l.shared_bytes;
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (guard[i] != kGuardByte) {
      l.fail("a write past the end of the dynamic shared memory (block " + std::to_string(blockIdx.x) + ")");
      break;
    }
  }
}

inline void run_launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& kernel) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  auto refuse = [](const std::string& why) { throw std::runtime_error("device emulation: invalid launch: " + why); };
  if (threads == 0 || threads > 1024 || block.z > 64) refuse("block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) refuse("empty grid");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) refuse("grid dimension over the limit");
  if (shared_bytes > dynamic_shared_limit()) {
    refuse(std::to_string(shared_bytes) + " bytes of dynamic shared memory over the " +
           std::to_string(dynamic_shared_limit()) + " allowed (cudaFuncSetAttribute)");
  }
  if (current_launch != nullptr) throw std::runtime_error("device emulation: a launch from inside a kernel");
  Launch l;
  l.grid = grid;
  l.block = block;
  l.threads = static_cast<int>(threads);
  l.kernel = &kernel;
  l.warps = std::vector<Warp>((threads + 31) / 32);
  l.fibers = std::vector<Fiber>(threads);
  for (unsigned t = 0; t < threads; ++t) l.fibers[t].linear = t;
  std::vector<unsigned char> storage(shared_bytes + kGuardBytes + 128);
  l.shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(storage.data()) + 127) & ~uintptr_t{127});
  l.shared_bytes = shared_bytes;
  std::memset(l.shared + shared_bytes, kGuardByte, kGuardBytes);
  current_launch = &l;
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z && l.failure.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && l.failure.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && l.failure.empty(); ++x) {
        blockIdx = {x, y, z};
        run_block(l);
      }
    }
  }
  current_launch = nullptr;
  if (!l.failure.empty()) throw std::runtime_error("device emulation: " + l.failure);
}

// Names of the kernels launched, in order, for tests that check which path ran.
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}

// kernel<<<grid, block, shared, stream>>>(args) becomes launch("kernel", body, grid, block, shared, stream)(args):
// every thread calls body with its own copy of the arguments, as kernels get theirs.
template <typename Body>
auto launch(const char* name, Body body, dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return [=](auto&&... args) {
    launch_log().emplace_back(name);
    run_launch(grid, block, shared_bytes, [&] { body(args...); });
  };
}

}  // namespace emu

// ---- device functions ----

inline void __syncthreads(unsigned line = __builtin_LINE()) {
  emu::arrive_and_wait(emu::current_launch->block_barrier, line, "__syncthreads");
}
inline void __syncwarp(unsigned mask = 0xffffffffu, unsigned line = __builtin_LINE()) {
  emu::check_full_warp(mask, "__syncwarp", line);
  emu::arrive_and_wait(emu::warp().barrier, line, "__syncwarp");
}

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src, unsigned line = __builtin_LINE()) {
  return emu::shuffle(mask, value, static_cast<unsigned>(src), line, "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, unsigned line = __builtin_LINE()) {
  return emu::shuffle(mask, value, emu::lane() ^ static_cast<unsigned>(lane_mask), line, "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, unsigned line = __builtin_LINE()) {
  const unsigned lane = emu::lane();
  return emu::shuffle(mask, value, lane >= delta ? lane - delta : lane, line, "__shfl_up_sync");
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, unsigned line = __builtin_LINE()) {
  emu::check_full_warp(mask, "__match_any_sync", line);
  emu::Warp& w = emu::publish(value, line, "__match_any_sync");
  unsigned peers = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (emu::read_slot<T>(w, l) == value) peers |= 1u << l;
  }
  emu::arrive_and_wait(w.barrier, line, "__match_any_sync");
  return peers;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomicAdd of 4- and 8-byte values");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  emu::check_alignment(address, sizeof(T), "atomicAdd");
  auto* word = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  while (true) {
    T old;
    std::memcpy(&old, &expected, sizeof(T));
    const T sum = old + value;
    Bits desired;
    std::memcpy(&desired, &sum, sizeof(T));
    if (__atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) return old;
  }
}

// sm_90's 16-byte float atomic: four float atomics here, with the alignment the hardware requires.
inline float4 atomicAdd(float4* address, float4 value) {
  emu::check_alignment(address, 16, "atomicAdd(float4)");
  float* p = reinterpret_cast<float*>(address);
  return {atomicAdd(p, value.x), atomicAdd(p + 1, value.y), atomicAdd(p + 2, value.z), atomicAdd(p + 3, value.w)};
}

// A failed device assertion fails the launch (the GPU would trap) instead of aborting the process.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                  \
  do {                                                                                            \
    if (!(cond)) ::emu::fail(std::string("device-side assertion failed: ") + #cond + " at line " + \
                             std::to_string(__LINE__));                                           \
  } while (0)

// ---- nvcuda::wmma, 16x16x16 with fp32 accumulators ----
// Each lane owns the accumulator elements of sm_80's mma.m16n8k16 layout: rows lane / 4 and lane / 4 + 8,
// columns 2 (lane % 4) + {0, 1} of each 8-column half. A lane loads the A rows and B columns those need and
// stores only its own elements, so a lane that reads results other lanes stored, without a __syncwarp in
// between, reads stale data as it would on the GPU.

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the 16x16x16 shape is emulated");
  float v[16 * 16];  // row-major; a lane fills only what it owns or needs
};

inline std::array<unsigned, 2> owned_rows() { return {emu::lane() / 4, emu::lane() / 4 + 8}; }
inline std::array<unsigned, 4> owned_cols() {
  const unsigned c = 2 * (emu::lane() % 4);
  return {c, c + 1, c + 8, c + 9};
}

template <typename T>
inline void check_operand(const T* p, unsigned ldm, const char* what) {
  emu::check_alignment(p, 32, what);
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail(std::string(what) + ": leading dimension not a multiple of 16 bytes");
}

template <typename T, typename Layout>
inline float element(const T* p, unsigned ldm, unsigned i, unsigned j) {
  return static_cast<float>(std::is_same_v<Layout, row_major> ? p[i * ldm + j] : p[j * ldm + i]);
}

template <typename T, typename Layout>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm, "wmma::load_matrix_sync");
  for (unsigned i : owned_rows()) {
    for (unsigned k = 0; k < 16; ++k) f.v[i * 16 + k] = element<T, Layout>(p, ldm, i, k);
  }
}

template <typename T, typename Layout>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_operand(p, ldm, "wmma::load_matrix_sync");
  for (unsigned k = 0; k < 16; ++k) {
    for (unsigned j : owned_cols()) f.v[k * 16 + j] = element<T, Layout>(p, ldm, k, j);
  }
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  for (unsigned i : owned_rows()) {
    for (unsigned j : owned_cols()) {
      float s = c.v[i * 16 + j];
      for (unsigned k = 0; k < 16; ++k) s += a.v[i * 16 + k] * b.v[k * 16 + j];
      d.v[i * 16 + j] = s;
    }
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& v : f.v) v = value;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_operand(p, ldm, "wmma::store_matrix_sync");
  for (unsigned i : owned_rows()) {
    for (unsigned j : owned_cols()) p[layout == mem_row_major ? i * ldm + j : j * ldm + i] = f.v[i * 16 + j];
  }
}

}  // namespace wmma
}  // namespace nvcuda

// ---- host API ----

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::properties().sharedMemPerBlockOptin) return cudaErrorInvalidValue;
    emu::dynamic_shared_limit() = std::max(emu::dynamic_shared_limit(), static_cast<size_t>(value));
  }
  return cudaSuccess;
}

namespace at {
namespace cuda {
inline cudaDeviceProp* getCurrentDeviceProperties() { return &emu::properties(); }
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "device emulation: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
