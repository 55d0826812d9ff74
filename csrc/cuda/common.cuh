// Small device helpers shared by the grouped adapter's CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace alter_ds {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// The numeric type that accumulates a product of two T: fp32 for every 16/32-bit type, fp64 for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Conversions spelled out, because torch builds with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__ (no implicit float <-> __half / __nv_bfloat16).
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Asynchronous 16-byte global -> shared copy (sm_80+). With pred false nothing is read and the 16
// destination bytes are zero-filled, which is how tile tails and rows past a segment's end become zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
#elif defined(ALTER_DS_DEVICE_EMULATION)  // the CPU emulation of tests/cuda_emulation
  ::emu::cp_async_16(smem, gmem, pred);
#else
  (void)smem;
  (void)gmem;
  (void)pred;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(ALTER_DS_DEVICE_EMULATION)
  ::emu::cp_async_commit();
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#elif defined(ALTER_DS_DEVICE_EMULATION)
  ::emu::cp_async_wait(kPending);
#endif
}

// dst[0..n) += v[0..n) in fp32 global memory (n <= 8); a full group of 8 with `vec` true is 16-byte aligned.
// Hopper has a 128-bit float atomic, which quarters the L2 atomic operations of the weight-gradient epilogues.
__device__ __forceinline__ void atomic_add_8(float* dst, const float* v, int n, bool vec) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(ALTER_DS_DEVICE_EMULATION)
  if (vec && n == 8) {
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
    atomicAdd(reinterpret_cast<float4*>(dst + 4), make_float4(v[4], v[5], v[6], v[7]));
    return;
  }
#else
  (void)vec;
#endif
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    if (q < n) atomicAdd(dst + q, v[q]);
  }
}

}  // namespace cuda
}  // namespace alter_ds
