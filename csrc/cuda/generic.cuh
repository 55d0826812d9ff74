// Generic scalar-FMA kernels: every dtype (float32 / float64 and the half / bf16 shapes the tensor-core
// path does not take), any d and r. Simple smem-tiled segment GEMMs over the same expert grouping as the
// tensor-core path; the fp32 (fp64) intermediates [N*k, r'] are materialised between them, which costs
// little next to the [N, d] operands at adapter ranks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../activations.h"
#include "common.cuh"
#include "routing.cuh"

namespace alter_ds {
namespace cuda {
namespace generic {

constexpr int kThreads = 256;
constexpr int kTileCols = 64;  // output columns per block; thread (ty, tx) owns columns tx + 16 q
constexpr int kTileK = 16;

// ---- operand accessors: (token, assignment, index) -> Acc ----

// Row `token` of a row-major [N, ld] tensor (x, grad_y): the rows gathered by the sort.
template <typename T, typename Acc>
struct TokenRows {
  const T* base;
  int64_t ld;
  __device__ Acc operator()(int token, int /*assignment*/, int i) const {
    return static_cast<Acc>(base[static_cast<int64_t>(token) * ld + i]);
  }
};

// Row `assignment` of a row-major [N*k, ld] intermediate (hidden, act, dH, G).
template <typename Acc>
struct AssignmentRows {
  const Acc* base;
  int64_t ld;
  __device__ Acc operator()(int /*token*/, int assignment, int i) const {
    return base[static_cast<int64_t>(assignment) * ld + i];
  }
};

// Element (kk, n) of expert e's matrix; stored [E, K, N], or [E, N, K] when kTransposed.
template <typename T, typename Acc, bool kTransposed>
struct ExpertMatrix {
  static constexpr bool transposed = kTransposed;
  const T* base;
  int64_t K;
  int64_t N;
  __device__ Acc operator()(int e, int kk, int n) const {
    return kTransposed ? static_cast<Acc>(base[(e * N + n) * K + kk]) : static_cast<Acc>(base[(e * K + kk) * N + n]);
  }
};

// ---- epilogues: (token, assignment, expert, column, value) ----

// hidden[assignment] = value + b_down[e]
template <typename T, typename Acc>
struct HiddenEpilogue {
  Acc* hidden;
  const T* bias;  // [E, N] or null
  int64_t N;
  __device__ void operator()(int /*token*/, int assignment, int e, int n, Acc v) const {
    if (bias) v += static_cast<Acc>(bias[e * N + n]);
    hidden[static_cast<int64_t>(assignment) * N + n] = v;
  }
};

// buffer[assignment] = value
template <typename Acc>
struct StoreEpilogue {
  Acc* out;
  int64_t N;
  __device__ void operator()(int /*token*/, int assignment, int /*e*/, int n, Acc v) const {
    out[static_cast<int64_t>(assignment) * N + n] = v;
  }
};

// out[token] (+)= value + w * bias[e]: a plain store when each token has one slot, else an atomic add
// into the accumulation-type buffer.
template <typename T, typename Acc>
struct TokenEpilogue {
  T* out;
  Acc* accumulate;  // non-null when k > 1
  const T* bias;    // [E, N] or null
  const Acc* weights;
  int64_t N;
  __device__ void operator()(int token, int assignment, int e, int n, Acc v) const {
    if (bias) v += weights[assignment] * static_cast<Acc>(bias[e * N + n]);
    const int64_t offset = static_cast<int64_t>(token) * N + n;
    if (accumulate) {
      atomicAdd(accumulate + offset, v);
    } else {
      out[offset] = static_cast<T>(v);
    }
  }
};

// For each tile of kNarrowTileRows sorted rows of expert e and each block of 64 columns:
//   epi(row, n, sum_kk A(row, kk) * B(e, kk, n)),  kk < K, n < N.
template <typename Acc, typename ALoad, typename BLoad, typename Epi>
__global__ void __launch_bounds__(kThreads) row_gemm_kernel(Segments seg, int k, int K, int N, ALoad A, BLoad B,
                                                            Epi epi) {
  constexpr int kRows = kNarrowTileRows;
  Tile tile;
  if (!locate_tile(seg.narrow, seg.seg_start, seg.num_experts, kRows, blockIdx.x, tile)) return;
  __shared__ int token[kRows];
  __shared__ int assignment[kRows];
  __shared__ Acc As[kTileK][kRows + 1];
  __shared__ Acc Bs[kTileK][kTileCols];
  const int t = threadIdx.x;
  const int tx = t & 15;
  const int ty = t >> 4;
  if (t < kRows) {
    const int a = t < tile.rows ? seg.perm[tile.row0 + t] : 0;
    assignment[t] = a;
    token[t] = a / k;
  }
  __syncthreads();
  const int n_base = blockIdx.y * kTileCols;
  Acc acc[2][4] = {};
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    for (int idx = t; idx < kRows * kTileK; idx += kThreads) {
      const int i = idx / kTileK;  // consecutive threads walk a row: coalesced
      const int kk = idx % kTileK;
      As[kk][i] = (i < tile.rows && k0 + kk < K) ? A(token[i], assignment[i], k0 + kk) : Acc(0);
    }
    for (int idx = t; idx < kTileK * kTileCols; idx += kThreads) {
      // walk the weight's contiguous dimension with consecutive threads
      const int kk = BLoad::transposed ? idx % kTileK : idx / kTileCols;
      const int n = BLoad::transposed ? idx / kTileK : idx % kTileCols;
      Bs[kk][n] = (k0 + kk < K && n_base + n < N) ? B(tile.expert, k0 + kk, n_base + n) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const Acc a0 = As[kk][ty * 2];
      const Acc a1 = As[kk][ty * 2 + 1];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const Acc b = Bs[kk][tx + 16 * q];
        acc[0][q] += a0 * b;
        acc[1][q] += a1 * b;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int i = ty * 2 + p;
    if (i >= tile.rows) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int n = n_base + tx + 16 * q;
      if (n < N) epi(token[i], assignment[i], tile.expert, n, acc[p][q]);
    }
  }
}

// For each tile of kWideTileRows sorted rows of expert e, a 32 x 64 block of
//   out[e][m][n] += sum_rows A(row, m) * B(row, n),  m < M, n < N,
// plus, when bias_out is set, the row m == M: bias_out[e][n] += sum_rows s(row) * B(row, n) with
// s = the mixture weight (bias_uses_weight) or 1. The weight gradients' K (rows of a segment) varies per
// expert; splitting it into fixed tiles added atomically keeps one expert with all tokens balanced.
template <typename Acc, typename ALoad, typename BLoad>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(Segments seg, int k, int M, int N, ALoad A, BLoad B,
                                                               const Acc* weights, bool bias_uses_weight, Acc* out,
                                                               Acc* bias_out) {
  constexpr int kRows = kWideTileRows;
  constexpr int kTileM = 32;
  Tile tile;
  if (!locate_tile(seg.wide, seg.seg_start, seg.num_experts, kRows, blockIdx.x, tile)) return;
  __shared__ int token[kRows];
  __shared__ int assignment[kRows];
  __shared__ Acc As[kTileK][kTileM + 1];
  __shared__ Acc Bs[kTileK][kTileCols];
  const int t = threadIdx.x;
  const int tx = t & 15;
  const int ty = t >> 4;
  if (t < kRows) {
    const int a = t < tile.rows ? seg.perm[tile.row0 + t] : 0;
    assignment[t] = a;
    token[t] = a / k;
  }
  __syncthreads();
  const int m_base = blockIdx.y * kTileM;
  const int n_base = blockIdx.z * kTileCols;
  Acc acc[2][4] = {};
  for (int r0 = 0; r0 < tile.rows; r0 += kTileK) {
    for (int idx = t; idx < kTileK * kTileM; idx += kThreads) {
      const int i = idx / kTileM;
      const int m = m_base + idx % kTileM;
      Acc v = Acc(0);
      if (r0 + i < tile.rows) {
        const int tok = token[r0 + i];
        const int a = assignment[r0 + i];
        if (m < M) {
          v = A(tok, a, m);
        } else if (m == M && bias_out) {
          v = bias_uses_weight ? weights[a] : Acc(1);
        }
      }
      As[i][idx % kTileM] = v;
    }
    for (int idx = t; idx < kTileK * kTileCols; idx += kThreads) {
      const int i = idx / kTileCols;
      const int n = n_base + idx % kTileCols;
      Bs[i][idx % kTileCols] =
          (r0 + i < tile.rows && n < N) ? B(token[r0 + i], assignment[r0 + i], n) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTileK; ++i) {
      const Acc a0 = As[i][ty * 2];
      const Acc a1 = As[i][ty * 2 + 1];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const Acc b = Bs[i][tx + 16 * q];
        acc[0][q] += a0 * b;
        acc[1][q] += a1 * b;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int m = m_base + ty * 2 + p;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int n = n_base + tx + 16 * q;
      if (n >= N) continue;
      if (m < M) {
        atomicAdd(out + (static_cast<int64_t>(tile.expert) * M + m) * N + n, acc[p][q]);
      } else if (m == M && bias_out) {
        atomicAdd(bias_out + static_cast<int64_t>(tile.expert) * N + n, acc[p][q]);
      }
    }
  }
}

// act_w[a][c] = w_a * act(hidden[a])[c], c < r: the up GEMM's left operand (and grad_w_up's).
template <typename Acc>
__global__ void activation_kernel(const Acc* hidden, const Acc* weights, int64_t total, int r, int rd,
                                  BaseActivation act, bool gated, Acc* out) {
  const int64_t n = total * r;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = idx / r;
    const int c = static_cast<int>(idx - a * r);
    const Acc* h = hidden + a * rd;
    Acc v = activate(act, h[c]);
    if (gated) v *= h[r + c];
    out[idx] = weights[a] * v;
  }
}

// One warp per assignment a (token a / k, expert ids[a]), from G = grad_y * w_up^T:
//   dH[a] = w * G (.) act'(h)   (gated: gate half w * G * up * act'(gate), up half w * G * act(gate))
//   grad_w[a] = <G, act(h)> + <grad_y[token], b_up[e]>
template <typename T, typename Acc>
__global__ void hidden_grad_kernel(const Acc* G, const Acc* hidden, const Acc* weights, const int64_t* ids,
                                   const T* grad_y, const T* b_up, int64_t total, int k, int d, int r, int rd,
                                   int num_experts, BaseActivation act, bool gated, Acc* dH, Acc* grad_weights) {
  const int lane = threadIdx.x & 31;
  const int64_t a = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (a >= total) return;
  const Acc w = weights[a];
  const Acc* h = hidden + a * rd;
  const Acc* g = G + a * r;
  Acc* out = dH + a * rd;
  Acc gw = Acc(0);
  for (int c = lane; c < r; c += 32) {
    if (gated) {
      const Acc up = h[r + c];
      out[c] = w * g[c] * up * activate_derivative(act, h[c]);
      out[r + c] = w * g[c] * activate(act, h[c]);
      gw += g[c] * activate(act, h[c]) * up;
    } else {
      out[c] = w * g[c] * activate_derivative(act, h[c]);
      gw += g[c] * activate(act, h[c]);
    }
  }
  if (b_up && ids[a] >= 0 && ids[a] < num_experts) {  // invalid ids: see load_expert; stay in bounds
    const T* dy = grad_y + (a / k) * d;
    const T* bias = b_up + ids[a] * d;
    for (int n = lane; n < d; n += 32) gw += static_cast<Acc>(dy[n]) * static_cast<Acc>(bias[n]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) gw += __shfl_xor_sync(kFullMask, gw, offset);
  if (lane == 0) grad_weights[a] = gw;
}

}  // namespace generic
}  // namespace cuda
}  // namespace alter_ds
