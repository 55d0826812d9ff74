// Tensor-core (nvcuda::wmma, 16x16x16, fp32 accumulate) kernels for half / bfloat16, sm_80+.
//
// One block = one tile of up to 128 sorted rows of one expert, 8 warps, warp w owning rows 16w..16w+15.
// At r = 16 the op moves ~2 bytes per 16-32 multiply-adds, which scalar FMA cannot keep up with, so
// every product goes through the tensor cores and the kernels are shaped around streaming the [rows, d]
// operands exactly once:
//
//   forward : stream x over d (down GEMM)      -> hidden, act  -> stream y over d (up GEMM, write only)
//   backward: stream grad_y over d (G = dY Wu^T and grad_w_up, grad_b_up partials)  -> dH, grad_w
//             -> stream x over d (grad_x = dH Wd^T, written; grad_w_down partials)
//
// The streamed chunks are 128 rows x 64 columns, gathered row by row with cp.async into a two-stage
// pipeline. The weight chunks are small and come from L2. The fp32 intermediates (act(h) * w and dH)
// feed the MMAs as two 16-bit terms, hi = round(v) and lo = round(v - hi), so they keep ~16 mantissa
// bits instead of the 8 of a bf16 (twice the MMAs of those GEMMs, still far below the memory time).
// Weight-gradient partials of a tile are added with fp32 atomics into [E, ...] accumulators: a tile has
// 128 rows whichever expert it belongs to, so one expert holding every token is as balanced as any.
//
// Limits of this path (else the generic kernels run): d % 8 == 0 and 16-byte aligned rows (vector
// loads/stores), r <= 64 and r' <= 128 (accumulators held in registers).
#pragma once

#include <mma.h>

#include <cstdint>

#include "../activations.h"
#include "common.cuh"
#include "routing.cuh"

namespace alter_ds {
namespace cuda {
namespace tc {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = 8;
constexpr int kRows = kWideTileRows;  // 128 = kWarps * 16
constexpr int kChunk = 64;            // columns of d per pipeline stage
constexpr int kChunkPitch = kChunk + 8;  // 144-byte rows: the 8 rows of an ldmatrix hit distinct banks
constexpr int kStages = 2;
constexpr int kStagePitch = 20;  // fp32 16x16 staging tile of a warp (wmma wants a multiple of 4)
constexpr int kMaxRank = 64;      // r  (G / act accumulators)
constexpr int kMaxDownWidth = 128;  // r' (H accumulators)
static_assert(kRows == kWarps * 16, "a warp owns 16 rows");

// Shared memory of one block, in bytes from the start of the dynamic allocation. Computed identically
// on the host (launch size) and on the device (pointers).
struct Layout {
  int meta;   // int token[128], int assignment[128], float weight[128]
  int red;    // float [8][64]: per-warp column sums of grad_b_up (backward)
  int stage;  // float [8][16][kStagePitch]: per-warp fragment staging
  int keep;   // act*w as hi/lo [128][rp + 8] each; backward then reuses it for dH hi/lo [128][rdp + 8]
  int work;   // pipeline stages of the streamed chunk and the weight chunk; fp32 spill of H or G
  int bytes;
};

__host__ __device__ inline int align_up_128(int v) { return (v + 127) & ~127; }
__host__ __device__ inline int imax(int a, int b) { return a > b ? a : b; }

// rdp / rp: r' and r rounded up to multiples of 16 (MMA tile widths).
__host__ __device__ inline Layout make_layout(bool backward, int rdp, int rp) {
  constexpr int e = 2;  // bytes of a half / bfloat16
  Layout l{};
  int off = 0;
  l.meta = off;
  off += align_up_128(3 * kRows * 4);
  l.red = off;
  if (backward) off += align_up_128(kWarps * kChunk * 4);
  l.stage = off;
  off += align_up_128(kWarps * 16 * kStagePitch * 4);
  l.keep = off;
  int keep = 2 * kRows * (rp + 8) * e;
  if (backward) keep = imax(keep, 2 * kRows * (rdp + 8) * e);
  off += align_up_128(keep);
  l.work = off;
  const int rows_stages = kStages * kRows * kChunkPitch * e;
  int work = rows_stages + kStages * kChunk * (rdp + 8) * e;        // x chunk + w_down chunk
  work = imax(work, rows_stages + kStages * rp * kChunkPitch * e);  // grad_y chunk + w_up chunk
  work = imax(work, kRows * (rdp + 4) * 4);                         // forward: H spill
  work = imax(work, kRows * (rp + 4) * 4);                          // backward: G spill
  off += align_up_128(work);
  l.bytes = off;
  return l;
}
// Offsets inside `work`.
__host__ __device__ inline int rows_stage_offset(int s) { return s * kRows * kChunkPitch * 2; }
__host__ __device__ inline int weight_stage_offset(int s, int weight_stage_elems) {
  return kStages * kRows * kChunkPitch * 2 + s * weight_stage_elems * 2;
}

struct ForwardArgs {
  const void* x;            // [N, d]
  const float* weights;     // [N*k] mixture weights, fp32
  const void* w_down;       // [E, d, rd]
  const void* b_down;       // [E, rd] or null
  const void* w_up;         // [E, r, d]
  const void* b_up;         // [E, d] or null
  float* hidden;            // [N*k, rd] pre-activation
  void* y;                  // [N, d], written once per token when k == 1
  float* y_acc;             // [N, d] fp32, accumulated atomically when k > 1 (then y is unused)
  Segments seg;
  int k, d, rd, r, rdp, rp;
  BaseActivation act;
  bool gated;
  bool w_down_vec;  // rd % 8 == 0 and w_down 16-byte aligned: cp.async its rows
};

struct BackwardArgs {
  const void* grad_y;       // [N, d]
  const void* x;            // [N, d]
  const float* weights;     // [N*k]
  const void* w_down;       // [E, d, rd]
  const void* w_up;         // [E, r, d]
  const void* b_up;         // [E, d] or null
  const float* hidden;      // [N*k, rd]
  void* grad_x;             // [N, d] when k == 1
  float* grad_x_acc;        // [N, d] fp32 when k > 1
  float* grad_weights;      // [N*k]
  float* grad_w_down;       // [E, d, rd] fp32, zero-initialised; null: not computed (a router-only stage)
  float* grad_b_down;       // [E, rd] or null
  float* grad_w_up;         // [E, r, d], or null like grad_w_down
  float* grad_b_up;         // [E, d] or null
  Segments seg;
  int k, d, rd, r, rdp, rp;
  BaseActivation act;
  bool gated;
  bool w_down_vec;
  bool grad_w_down_vec;  // rd % 4 == 0: 16-byte atomics into grad_w_down rows
};

// Token, assignment and mixture weight of the tile's rows; rows past the segment get weight 0.
__device__ __forceinline__ void load_row_meta(const Segments& seg, const Tile& tile, int k, const float* weights,
                                              int* token, int* assignment, float* weight) {
  const int i = threadIdx.x;
  if (i < kRows) {
    int a = 0;
    float w = 0.f;
    if (i < tile.rows) {
      a = seg.perm[tile.row0 + i];
      w = weights[a];
    }
    assignment[i] = a;
    token[i] = a / k;
    weight[i] = w;
  }
}

// Gathers columns [c0, c0 + 64) of the tile's rows of a row-major [*, d] matrix into a [128][kChunkPitch]
// stage, zero-filling rows past the segment and columns past d.
template <typename T>
__device__ __forceinline__ void load_rows_chunk(T* dst, const T* src, const int* token, int rows, int d, int c0) {
  for (int i = threadIdx.x; i < kRows * (kChunk / 8); i += kThreads) {
    const int row = i >> 3;
    const int col = c0 + (i & 7) * 8;
    const bool ok = row < rows && col < d;
    const T* from = ok ? src + static_cast<int64_t>(token[row]) * d + col : src;
    cp_async_16(dst + row * kChunkPitch + (i & 7) * 8, from, ok);
  }
}

// Rows [k0, k0 + 64) of one expert's w_down [d, rd] into a [64][rdp + 8] stage, zero-padded.
template <typename T>
__device__ __forceinline__ void load_w_down_chunk(T* dst, const T* w, int d, int rd, int rdp, int k0, bool vec) {
  const int pitch = rdp + 8;
  if (vec) {
    const int per_row = rdp / 8;
    for (int i = threadIdx.x; i < kChunk * per_row; i += kThreads) {
      const int row = i / per_row;
      const int col = (i - row * per_row) * 8;
      const bool ok = k0 + row < d && col < rd;
      const T* from = ok ? w + static_cast<int64_t>(k0 + row) * rd + col : w;
      cp_async_16(dst + row * pitch + col, from, ok);
    }
  } else {
    for (int i = threadIdx.x; i < kChunk * rdp; i += kThreads) {
      const int row = i / rdp;
      const int col = i - row * rdp;
      dst[row * pitch + col] =
          (k0 + row < d && col < rd) ? w[static_cast<int64_t>(k0 + row) * rd + col] : from_float<T>(0.f);
    }
  }
}

// Columns [c0, c0 + 64) of one expert's w_up [r, d] into an [rp][kChunkPitch] stage, zero-padded.
template <typename T>
__device__ __forceinline__ void load_w_up_chunk(T* dst, const T* w, int r, int rp, int d, int c0) {
  for (int i = threadIdx.x; i < rp * (kChunk / 8); i += kThreads) {
    const int row = i >> 3;
    const int col = c0 + (i & 7) * 8;
    const bool ok = row < r && col < d;
    const T* from = ok ? w + static_cast<int64_t>(row) * d + col : w;
    cp_async_16(dst + row * kChunkPitch + (i & 7) * 8, from, ok);
  }
}

template <typename T>
__device__ __forceinline__ void split_store(T* hi, T* lo, float v) {
  const T h = from_float<T>(v);
  *hi = h;
  *lo = from_float<T>(v - to_float(h));
}

// Eight consecutive outputs of a row, 16-byte store.
template <typename T>
__device__ __forceinline__ void store_8(T* dst, const float* v) {
  union {
    uint4 vec;
    T elem[8];
  } pack;
#pragma unroll
  for (int q = 0; q < 8; ++q) pack.elem[q] = from_float<T>(v[q]);
  *reinterpret_cast<uint4*>(dst) = pack.vec;
}

using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename T, typename Layout_>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout_>;
template <typename T, typename Layout_>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout_>;

// acc += A_hi * B + A_lo * B with A (16 x 16) row-major at `a_hi` / `a_lo`.
template <typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_split_a(FragAcc& acc, const T* a_hi, const T* a_lo, int lda, const T* b,
                                            int ldb) {
  FragA<T, LayoutA> fa;
  FragB<T, LayoutB> fb;
  wmma::load_matrix_sync(fb, b, ldb);
  wmma::load_matrix_sync(fa, a_hi, lda);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::load_matrix_sync(fa, a_lo, lda);
  wmma::mma_sync(acc, fa, fb, acc);
}

// acc += A * B_hi + A * B_lo.
template <typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_split_b(FragAcc& acc, const T* a, int lda, const T* b_hi, const T* b_lo,
                                            int ldb) {
  FragA<T, LayoutA> fa;
  FragB<T, LayoutB> fb;
  wmma::load_matrix_sync(fa, a, lda);
  wmma::load_matrix_sync(fb, b_hi, ldb);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::load_matrix_sync(fb, b_lo, ldb);
  wmma::mma_sync(acc, fa, fb, acc);
}

// kDownFrags >= rdp / 16: number of 16-wide H accumulators a warp may hold.
template <typename T, int kDownFrags>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const ForwardArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  Tile tile;
  if (!locate_tile(args.seg.wide, args.seg.seg_start, args.seg.num_experts, kRows, blockIdx.x, tile)) return;
  const int d = args.d, rd = args.rd, r = args.r, rdp = args.rdp, rp = args.rp;
  const Layout L = make_layout(false, rdp, rp);
  int* token = reinterpret_cast<int*>(smem + L.meta);
  int* assignment = token + kRows;
  float* weight = reinterpret_cast<float*>(assignment + kRows);
  load_row_meta(args.seg, tile, args.k, args.weights, token, assignment, weight);
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const bool warp_active = warp * 16 < tile.rows;
  const int e = tile.expert;
  const T* x = static_cast<const T*>(args.x);
  const T* w_down = static_cast<const T*>(args.w_down) + static_cast<int64_t>(e) * d * rd;
  const T* w_up = static_cast<const T*>(args.w_up) + static_cast<int64_t>(e) * r * d;
  unsigned char* work = smem + L.work;
  const int wd_stage = kChunk * (rdp + 8);
  const int chunks = (d + kChunk - 1) / kChunk;
  const int down_frags = rdp / 16;
  const int up_frags = rp / 16;

  // ---- down projection: H[rows, rdp] = x[rows, :] * w_down[e] ----
  FragAcc acc[kDownFrags];
#pragma unroll
  for (int j = 0; j < kDownFrags; ++j) wmma::fill_fragment(acc[j], 0.f);
  auto issue_down = [&](int c) {
    const int s = c & 1;
    load_rows_chunk(reinterpret_cast<T*>(work + rows_stage_offset(s)), x, token, tile.rows, d, c * kChunk);
    load_w_down_chunk(reinterpret_cast<T*>(work + weight_stage_offset(s, wd_stage)), w_down, d, rd, rdp,
                      c * kChunk, args.w_down_vec);
  };
  issue_down(0);
  cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) issue_down(c + 1);
    cp_async_commit();  // possibly empty, so that wait<1> always means "chunk c has landed"
    cp_async_wait<1>();
    __syncthreads();
    if (warp_active) {
      const T* xs = reinterpret_cast<const T*>(work + rows_stage_offset(c & 1)) + warp * 16 * kChunkPitch;
      const T* ws = reinterpret_cast<const T*>(work + weight_stage_offset(c & 1, wd_stage));
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        FragA<T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, xs + kk * 16, kChunkPitch);
#pragma unroll
        for (int j = 0; j < kDownFrags; ++j) {
          if (j < down_frags) {
            FragB<T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, ws + kk * 16 * (rdp + 8) + j * 16, rdp + 8);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration refills this stage
  }
  cp_async_wait<0>();

  // ---- epilogue: hidden = H + b_down (fp32, saved for backward); A = w * act(hidden) as hi/lo ----
  float* hs = reinterpret_cast<float*>(work) + warp * 16 * (rdp + 4);
  T* a_hi = reinterpret_cast<T*>(smem + L.keep);
  T* a_lo = a_hi + kRows * (rp + 8);
  if (warp_active) {
#pragma unroll
    for (int j = 0; j < kDownFrags; ++j) {
      if (j < down_frags) wmma::store_matrix_sync(hs + j * 16, acc[j], rdp + 4, wmma::mem_row_major);
    }
  }
  __syncwarp();
  const T* b_down = args.b_down ? static_cast<const T*>(args.b_down) + static_cast<int64_t>(e) * rd : nullptr;
  for (int i = 0; i < 16; ++i) {
    const int row = warp * 16 + i;
    if (row >= tile.rows) break;
    float* out = args.hidden + static_cast<int64_t>(assignment[row]) * rd;
    for (int c = lane; c < rd; c += 32) {
      const float h = hs[i * (rdp + 4) + c] + (b_down ? to_float(b_down[c]) : 0.f);
      hs[i * (rdp + 4) + c] = h;
      out[c] = h;
    }
  }
  __syncwarp();
  for (int i = 0; i < 16; ++i) {
    const int row = warp * 16 + i;
    const bool valid = row < tile.rows;
    for (int c = lane; c < rp; c += 32) {
      float v = 0.f;
      if (valid && c < r) {
        const float* h = hs + i * (rdp + 4);
        v = activate(args.act, h[c]);
        if (args.gated) v *= h[r + c];
        v *= weight[row];
      }
      split_store(a_hi + row * (rp + 8) + c, a_lo + row * (rp + 8) + c, v);
    }
  }
  __syncthreads();  // A complete; `work` is free for the w_up stages

  // ---- up projection: y[tok] (+)= A * w_up[e] + w * b_up[e], 64 columns at a time ----
  const T* b_up = args.b_up ? static_cast<const T*>(args.b_up) + static_cast<int64_t>(e) * d : nullptr;
  float* staging = reinterpret_cast<float*>(smem + L.stage) + warp * 16 * kStagePitch;
  const int wu_stage = rp * kChunkPitch;
  auto issue_up = [&](int c) {
    load_w_up_chunk(reinterpret_cast<T*>(work) + (c & 1) * wu_stage, w_up, r, rp, d, c * kChunk);
  };
  issue_up(0);
  cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) issue_up(c + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (warp_active) {
      const T* ws = reinterpret_cast<const T*>(work) + (c & 1) * wu_stage;
      for (int jn = 0; jn < kChunk / 16; ++jn) {
        const int n0 = c * kChunk + jn * 16;
        if (n0 >= d) break;
        FragAcc out;
        wmma::fill_fragment(out, 0.f);
        for (int kk = 0; kk < up_frags; ++kk) {
          mma_split_a<T, wmma::row_major, wmma::row_major>(out, a_hi + warp * 16 * (rp + 8) + kk * 16,
                                                           a_lo + warp * 16 * (rp + 8) + kk * 16, rp + 8,
                                                           ws + kk * 16 * kChunkPitch + jn * 16, kChunkPitch);
        }
        wmma::store_matrix_sync(staging, out, kStagePitch, wmma::mem_row_major);
        __syncwarp();
        const int i = lane >> 1;
        const int half = (lane & 1) * 8;
        const int row = warp * 16 + i;
        const int n = n0 + half;
        if (row < tile.rows && n < d) {  // d % 8 == 0: the 8 columns are all in range
          float v[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            v[q] = staging[i * kStagePitch + half + q] + (b_up ? weight[row] * to_float(b_up[n + q]) : 0.f);
          }
          const int64_t offset = static_cast<int64_t>(token[row]) * d + n;
          if (args.y_acc) {
            atomic_add_8(args.y_acc + offset, v, 8, true);
          } else {
            store_8(static_cast<T*>(args.y) + offset, v);
          }
        }
        __syncwarp();
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
#endif
}

// kUpFrags >= rp / 16: number of 16-wide G accumulators a warp may hold.
template <typename T, int kUpFrags>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(const BackwardArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  Tile tile;
  if (!locate_tile(args.seg.wide, args.seg.seg_start, args.seg.num_experts, kRows, blockIdx.x, tile)) return;
  const int d = args.d, rd = args.rd, r = args.r, rdp = args.rdp, rp = args.rp;
  const Layout L = make_layout(true, rdp, rp);
  int* token = reinterpret_cast<int*>(smem + L.meta);
  int* assignment = token + kRows;
  float* weight = reinterpret_cast<float*>(assignment + kRows);
  float* red = reinterpret_cast<float*>(smem + L.red);
  load_row_meta(args.seg, tile, args.k, args.weights, token, assignment, weight);
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const bool warp_active = warp * 16 < tile.rows;
  const int e = tile.expert;
  const T* grad_y = static_cast<const T*>(args.grad_y);
  const T* x = static_cast<const T*>(args.x);
  const T* w_down = static_cast<const T*>(args.w_down) + static_cast<int64_t>(e) * d * rd;
  const T* w_up = static_cast<const T*>(args.w_up) + static_cast<int64_t>(e) * r * d;
  const T* b_up = args.b_up ? static_cast<const T*>(args.b_up) + static_cast<int64_t>(e) * d : nullptr;
  unsigned char* work = smem + L.work;
  float* staging = reinterpret_cast<float*>(smem + L.stage) + warp * 16 * kStagePitch;
  const int chunks = (d + kChunk - 1) / kChunk;
  const int down_frags = rdp / 16;
  const int up_frags = rp / 16;
  const int row_blocks = (tile.rows + 15) / 16;  // K extent of the weight-gradient MMAs

  // ---- A = w * act(hidden) as hi/lo, the left operand of grad_w_up = A^T grad_y ----
  T* a_hi = reinterpret_cast<T*>(smem + L.keep);
  T* a_lo = a_hi + kRows * (rp + 8);
  for (int i = 0; i < 16; ++i) {
    const int row = warp * 16 + i;
    const bool valid = row < tile.rows;
    const float* h = args.hidden + static_cast<int64_t>(assignment[row]) * rd;
    for (int c = lane; c < rp; c += 32) {
      float v = 0.f;
      if (valid && c < r) {
        v = activate(args.act, h[c]);
        if (args.gated) v *= h[r + c];
        v *= weight[row];
      }
      split_store(a_hi + row * (rp + 8) + c, a_lo + row * (rp + 8) + c, v);
    }
  }
  __syncthreads();

  // ---- stream grad_y: G = grad_y * w_up[e]^T, grad_w_up += A^T grad_y, grad_b_up += w^T grad_y ----
  FragAcc g[kUpFrags];
#pragma unroll
  for (int j = 0; j < kUpFrags; ++j) wmma::fill_fragment(g[j], 0.f);
  float bias_dot = 0.f;  // <grad_y row, b_up[e]>, row (lane >> 1), half the columns per lane
  const int wu_stage = rp * kChunkPitch;
  auto issue_a = [&](int c) {
    const int s = c & 1;
    load_rows_chunk(reinterpret_cast<T*>(work + rows_stage_offset(s)), grad_y, token, tile.rows, d, c * kChunk);
    load_w_up_chunk(reinterpret_cast<T*>(work + weight_stage_offset(s, wu_stage)), w_up, r, rp, d, c * kChunk);
  };
  issue_a(0);
  cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) issue_a(c + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* dys = reinterpret_cast<const T*>(work + rows_stage_offset(c & 1));
    const T* ws = reinterpret_cast<const T*>(work + weight_stage_offset(c & 1, wu_stage));
    const int c0 = c * kChunk;
    if (warp_active) {
      const T* mine = dys + warp * 16 * kChunkPitch;
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        FragA<T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, mine + kk * 16, kChunkPitch);
#pragma unroll
        for (int j = 0; j < kUpFrags; ++j) {
          if (j < up_frags) {
            // (k, n) of w_up^T is w_up[n][k]: the [rp][pitch] stage read column-major.
            FragB<T, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, ws + j * 16 * kChunkPitch + kk * 16, kChunkPitch);
            wmma::mma_sync(g[j], fa, fb, g[j]);
          }
        }
      }
    }
    if (b_up) {
      {  // grad_w's bias term, accumulated over the chunks
        const int row = warp * 16 + (lane >> 1);
        const int base = (lane & 1) * 32;
        const T* src = dys + row * kChunkPitch + base;
        for (int q = 0; q < 32; ++q) {
          if (c0 + base + q < d) bias_dot += to_float(src[q]) * to_float(b_up[c0 + base + q]);
        }
      }
      // column sums over this warp's rows; the block's 8 partials are added after the barrier below
      float s0 = 0.f, s1 = 0.f;
      for (int i = 0; i < 16; ++i) {
        const int row = warp * 16 + i;
        const float w = weight[row];
        s0 += w * to_float(dys[row * kChunkPitch + lane]);
        s1 += w * to_float(dys[row * kChunkPitch + lane + 32]);
      }
      red[warp * kChunk + lane] = s0;
      red[warp * kChunk + lane + 32] = s1;
    }
    // grad_w_up[e][:, c0:c0+64] partial: (rp/16) x 4 output fragments, K = the tile's rows (none when the
    // weight gradients are not wanted: a null pointer, the same for the whole block)
    const int out_frags = args.grad_w_up ? up_frags * (kChunk / 16) : 0;
    for (int f = warp; f < out_frags; f += kWarps) {
      const int ib = f / (kChunk / 16);
      const int jn = f % (kChunk / 16);
      if (c0 + jn * 16 >= d) continue;
      FragAcc out;
      wmma::fill_fragment(out, 0.f);
      for (int kb = 0; kb < row_blocks; ++kb) {
        // (m = rank column, k = row) of A^T is A[row][m]: the [128][rp+8] tile read column-major.
        mma_split_a<T, wmma::col_major, wmma::row_major>(out, a_hi + kb * 16 * (rp + 8) + ib * 16,
                                                         a_lo + kb * 16 * (rp + 8) + ib * 16, rp + 8,
                                                         dys + kb * 16 * kChunkPitch + jn * 16, kChunkPitch);
      }
      wmma::store_matrix_sync(staging, out, kStagePitch, wmma::mem_row_major);
      __syncwarp();
      const int m = lane >> 1;
      const int half = (lane & 1) * 8;
      const int rank_row = ib * 16 + m;
      const int col = c0 + jn * 16 + half;
      if (rank_row < r && col < d) {
        atomic_add_8(args.grad_w_up + (static_cast<int64_t>(e) * r + rank_row) * d + col,
                     staging + m * kStagePitch + half, 8, true);
      }
      __syncwarp();
    }
    __syncthreads();  // the next iteration refills this stage and rewrites `red`
    if (args.grad_b_up && threadIdx.x < kChunk && c0 + static_cast<int>(threadIdx.x) < d) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += red[w * kChunk + threadIdx.x];
      atomicAdd(args.grad_b_up + static_cast<int64_t>(e) * d + c0 + threadIdx.x, s);
    }
  }
  cp_async_wait<0>();
  bias_dot += __shfl_xor_sync(kFullMask, bias_dot, 1);

  // ---- dH from G and hidden; grad_w = <G, act(h)> + <grad_y, b_up>; grad_b_down += column sums ----
  float* gs = reinterpret_cast<float*>(work) + warp * 16 * (rp + 4);
  if (warp_active) {
#pragma unroll
    for (int j = 0; j < kUpFrags; ++j) {
      if (j < up_frags) wmma::store_matrix_sync(gs + j * 16, g[j], rp + 4, wmma::mem_row_major);
    }
  }
  __syncwarp();
  T* dh_hi = reinterpret_cast<T*>(smem + L.keep);  // A is dead: every warp passed the last barrier
  T* dh_lo = dh_hi + kRows * (rdp + 8);
  constexpr int kMaxColsPerLane = kMaxDownWidth / 32;
  float col_sum[kMaxColsPerLane];
#pragma unroll
  for (int q = 0; q < kMaxColsPerLane; ++q) col_sum[q] = 0.f;
  for (int i = 0; i < 16; ++i) {
    const int row = warp * 16 + i;
    const bool valid = row < tile.rows;
    const float w = weight[row];
    const float* h = args.hidden + static_cast<int64_t>(assignment[row]) * rd;
    const float* gi = gs + i * (rp + 4);
    float gw = 0.f;
#pragma unroll
    for (int q = 0; q < kMaxColsPerLane; ++q) {
      const int c = lane + 32 * q;
      if (c >= rdp) break;
      float dh = 0.f;
      if (valid) {
        if (!args.gated) {
          if (c < r) {
            const float gc = gi[c];
            dh = w * gc * activate_derivative(args.act, h[c]);
            gw += gc * activate(args.act, h[c]);
          }
        } else if (c < r) {  // gate half: d/dgate of act(gate) * up
          const float gc = gi[c];
          const float up = h[r + c];
          dh = w * gc * up * activate_derivative(args.act, h[c]);
          gw += gc * activate(args.act, h[c]) * up;
        } else if (c < 2 * r) {  // up half: d/dup = act(gate)
          dh = w * gi[c - r] * activate(args.act, h[c - r]);
        }
      }
      col_sum[q] += dh;
      split_store(dh_hi + row * (rdp + 8) + c, dh_lo + row * (rdp + 8) + c, dh);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) gw += __shfl_xor_sync(kFullMask, gw, offset);
    const float dot = __shfl_sync(kFullMask, bias_dot, 2 * i);
    if (valid && lane == 0) args.grad_weights[assignment[row]] = gw + dot;
  }
  if (args.grad_b_down && warp_active) {
#pragma unroll
    for (int q = 0; q < kMaxColsPerLane; ++q) {
      const int c = lane + 32 * q;
      if (c < rd) atomicAdd(args.grad_b_down + static_cast<int64_t>(e) * rd + c, col_sum[q]);
    }
  }
  __syncthreads();  // dH complete; the G spill in `work` is dead

  // ---- stream x: grad_x[tok] (+)= dH * w_down[e]^T, grad_w_down[e] += x^T dH ----
  const int wd_stage = kChunk * (rdp + 8);
  auto issue_b = [&](int c) {
    const int s = c & 1;
    load_rows_chunk(reinterpret_cast<T*>(work + rows_stage_offset(s)), x, token, tile.rows, d, c * kChunk);
    load_w_down_chunk(reinterpret_cast<T*>(work + weight_stage_offset(s, wd_stage)), w_down, d, rd, rdp,
                      c * kChunk, args.w_down_vec);
  };
  issue_b(0);
  cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) issue_b(c + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* xs = reinterpret_cast<const T*>(work + rows_stage_offset(c & 1));
    const T* ws = reinterpret_cast<const T*>(work + weight_stage_offset(c & 1, wd_stage));
    const int c0 = c * kChunk;
    if (warp_active) {
      for (int jn = 0; jn < kChunk / 16; ++jn) {
        const int n0 = c0 + jn * 16;
        if (n0 >= d) break;
        FragAcc out;
        wmma::fill_fragment(out, 0.f);
        for (int kk = 0; kk < down_frags; ++kk) {
          // (k = down column, n = d row) of w_down^T is w_down[n][k]: the stage read column-major.
          mma_split_a<T, wmma::row_major, wmma::col_major>(out, dh_hi + warp * 16 * (rdp + 8) + kk * 16,
                                                           dh_lo + warp * 16 * (rdp + 8) + kk * 16, rdp + 8,
                                                           ws + jn * 16 * (rdp + 8) + kk * 16, rdp + 8);
        }
        wmma::store_matrix_sync(staging, out, kStagePitch, wmma::mem_row_major);
        __syncwarp();
        const int i = lane >> 1;
        const int half = (lane & 1) * 8;
        const int row = warp * 16 + i;
        const int n = n0 + half;
        if (row < tile.rows && n < d) {
          const int64_t offset = static_cast<int64_t>(token[row]) * d + n;
          if (args.grad_x_acc) {
            atomic_add_8(args.grad_x_acc + offset, staging + i * kStagePitch + half, 8, true);
          } else {
            store_8(static_cast<T*>(args.grad_x) + offset, staging + i * kStagePitch + half);
          }
        }
        __syncwarp();
      }
    }
    // grad_w_down[e][c0:c0+64, :] partial: 4 x (rdp/16) output fragments, K = the tile's rows (none when null)
    const int out_frags = args.grad_w_down ? (kChunk / 16) * down_frags : 0;
    for (int f = warp; f < out_frags; f += kWarps) {
      const int ib = f / down_frags;
      const int jb = f % down_frags;
      if (c0 + ib * 16 >= d) continue;
      FragAcc out;
      wmma::fill_fragment(out, 0.f);
      for (int kb = 0; kb < row_blocks; ++kb) {
        // (m = d column, k = row) of x^T is x[row][m]: the stage read column-major.
        mma_split_b<T, wmma::col_major, wmma::row_major>(out, xs + kb * 16 * kChunkPitch + ib * 16, kChunkPitch,
                                                         dh_hi + kb * 16 * (rdp + 8) + jb * 16,
                                                         dh_lo + kb * 16 * (rdp + 8) + jb * 16, rdp + 8);
      }
      wmma::store_matrix_sync(staging, out, kStagePitch, wmma::mem_row_major);
      __syncwarp();
      const int m = lane >> 1;
      const int half = (lane & 1) * 8;
      const int d_row = c0 + ib * 16 + m;
      const int col = jb * 16 + half;
      if (d_row < d && col < rd) {
        atomic_add_8(args.grad_w_down + (static_cast<int64_t>(e) * d + d_row) * rd + col,
                     staging + m * kStagePitch + half, min(8, rd - col), args.grad_w_down_vec);
      }
      __syncwarp();
    }
    __syncthreads();
  }
  cp_async_wait<0>();
#endif
}

}  // namespace tc
}  // namespace cuda
}  // namespace alter_ds
