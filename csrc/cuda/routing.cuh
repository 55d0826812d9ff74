// Grouping of the N*k (token, slot) assignments by expert, on the device and without a host sync.
//
// A stable counting sort: each warp owns a contiguous chunk of assignments and counts them per expert
// into column `warp` of an [E, B] table (expert-major), an inclusive cumsum of that table gives every
// (expert, chunk) pair the start of its run in the sorted order, and a second pass over the same chunks
// scatters each assignment to its place (rank within the warp from __match_any_sync). Because the table
// is expert-major and the chunks are in order, equal experts keep their assignment order, so the rows of
// a segment are in increasing token order (locality for the row gathers) and the result is reproducible.
//
// The GEMM kernels are launched over an upper bound of row tiles, ceil(N*k / BM) + E, and each block
// finds its (expert, first row) by a binary search over the per-expert tile prefix built here; blocks
// past the last tile exit. That keeps the grid size known on the host without reading the histogram back.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace alter_ds {
namespace cuda {

// Rows per tile of the tensor-core kernels and of the generic weight-gradient kernel: 8 warps x 16 rows.
constexpr int kWideTileRows = 128;
// Rows per tile of the generic (scalar) row GEMM.
constexpr int kNarrowTileRows = 32;

// Device view of the grouping. seg_start[E+1]: start of each expert's rows in the sorted order (the
// last entry is N*k); wide/narrow[E+1]: exclusive prefix of the number of row tiles per expert.
struct Segments {
  const int* perm;  // sorted position -> assignment index (token * k + slot)
  const int* seg_start;
  const int* wide;
  const int* narrow;
  int num_experts;
};

// A block's share of a segment: `rows` (1..BM) sorted rows of `expert`, starting at sorted position `row0`.
struct Tile {
  int expert;
  int row0;
  int rows;
};

// Maps a block index to its tile; false for the blocks past the last tile of the upper-bound grid.
__device__ __forceinline__ bool locate_tile(const int* tile_prefix, const int* seg_start, int num_experts,
                                            int tile_rows, int tile, Tile& out) {
  if (tile >= tile_prefix[num_experts]) return false;
  // The last expert whose first tile is <= tile. Experts without rows share their successor's prefix,
  // and taking the last such index skips them.
  int lo = 0;
  int hi = num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tile_prefix[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  out.expert = lo;
  out.row0 = seg_start[lo] + (tile - tile_prefix[lo]) * tile_rows;
  out.rows = min(tile_rows, seg_start[lo + 1] - out.row0);
  return true;
}

// Reads assignment `idx`'s expert, or -1 past the end. Ids are validated in Python; the assert makes a
// bypassed check loud instead of a silent out-of-bounds write, and the clamp keeps memory safe if
// device asserts are compiled out.
__device__ __forceinline__ int load_expert(const int64_t* ids, int64_t idx, int64_t total, int num_experts) {
  if (idx >= total) return -1;
  const int64_t id = ids[idx];
  CUDA_KERNEL_ASSERT(id >= 0 && id < num_experts);
  return (id >= 0 && id < num_experts) ? static_cast<int>(id) : -1;
}

// counts[e * chunks + warp] = number of assignments of expert e in the warp's chunk. Each entry has a
// single writer (the warp owning the chunk), so no atomics; __syncwarp orders the successive updates.
__global__ void count_experts_kernel(const int64_t* ids, int64_t total, int num_experts, int chunks,
                                     int steps, int* counts) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp >= chunks) return;
  for (int step = 0; step < steps; ++step) {
    const int64_t idx = (warp * steps + step) * 32 + lane;
    const int e = load_expert(ids, idx, total, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) counts[static_cast<int64_t>(e) * chunks + warp] += __popc(peers);
    __syncwarp();
  }
}

// cursor[e * chunks + warp] starts at the first sorted position of the warp's run of expert e and is
// advanced as the warp places its assignments in order.
__global__ void scatter_assignments_kernel(const int64_t* ids, int64_t total, int num_experts, int chunks,
                                           int steps, int* cursor, int* perm) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (warp >= chunks) return;
  for (int step = 0; step < steps; ++step) {
    const int64_t idx = (warp * steps + step) * 32 + lane;
    const int e = load_expert(ids, idx, total, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int leader = __ffs(peers) - 1;
    int* slot = e >= 0 ? cursor + static_cast<int64_t>(e) * chunks + warp : nullptr;
    int base = (e >= 0 && lane == leader) ? *slot : 0;
    base = __shfl_sync(kFullMask, base, leader);
    if (e >= 0) {
      perm[base + __popc(peers & ((1u << lane) - 1u))] = static_cast<int>(idx);
      if (lane == leader) *slot = base + __popc(peers);
    }
    __syncwarp();
  }
}

// Exclusive scan over a block of 1024 threads; *total receives the block's sum.
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch /* [32] */, int* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int sums = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(kFullMask, sums, offset);
      if (lane >= offset) sums += up;
    }
    scratch[lane] = sums;
  }
  __syncthreads();
  const int result = (warp > 0 ? scratch[warp - 1] : 0) + inclusive - value;
  *total = scratch[warps - 1];
  __syncthreads();  // scratch is reused by the next call
  return result;
}

// One block of 1024 threads: from the inclusive cumsum of the [E, chunks] count table, the segment
// starts and the two tile prefixes. meta = [seg_start | wide | narrow], each E + 1 ints.
__global__ void __launch_bounds__(1024) build_segments_kernel(const int* inclusive, int num_experts, int chunks,
                                                              int* meta) {
  __shared__ int scratch[32];
  int* seg_start = meta;
  int* wide = meta + (num_experts + 1);
  int* narrow = meta + 2 * (num_experts + 1);
  int wide_carry = 0;
  int narrow_carry = 0;
  for (int base = 0; base < num_experts; base += blockDim.x) {
    const int e = base + static_cast<int>(threadIdx.x);
    int start = 0;
    int count = 0;
    if (e < num_experts) {
      start = e == 0 ? 0 : inclusive[static_cast<int64_t>(e) * chunks - 1];
      count = inclusive[static_cast<int64_t>(e + 1) * chunks - 1] - start;
    }
    int wide_total = 0;
    int narrow_total = 0;
    const int wide_before =
        block_exclusive_scan((count + kWideTileRows - 1) / kWideTileRows, scratch, &wide_total);
    const int narrow_before =
        block_exclusive_scan((count + kNarrowTileRows - 1) / kNarrowTileRows, scratch, &narrow_total);
    if (e < num_experts) {
      seg_start[e] = start;
      wide[e] = wide_carry + wide_before;
      narrow[e] = narrow_carry + narrow_before;
    }
    wide_carry += wide_total;
    narrow_carry += narrow_total;
  }
  if (threadIdx.x == 0) {
    seg_start[num_experts] = inclusive[static_cast<int64_t>(num_experts) * chunks - 1];
    wide[num_experts] = wide_carry;
    narrow[num_experts] = narrow_carry;
  }
}

// Owns the device buffers behind a Segments view.
struct Routing {
  at::Tensor perm;
  at::Tensor meta;
  int num_experts = 0;
  int64_t total = 0;  // N * k

  Segments view() const {
    const int* m = meta.data_ptr<int>();
    return {perm.data_ptr<int>(), m, m + (num_experts + 1), m + 2 * (num_experts + 1), num_experts};
  }
  // Grid sizes: an upper bound on the number of tiles, sum_e ceil(n_e / BM) <= ceil(total / BM) + E.
  int64_t max_tiles(int tile_rows) const { return (total + tile_rows - 1) / tile_rows + num_experts; }
};

// Requires total = expert_ids.numel() > 0 and total < 2^31 (positions are int32).
inline Routing build_routing(const at::Tensor& expert_ids, int num_experts, cudaStream_t stream) {
  Routing routing;
  routing.num_experts = num_experts;
  routing.total = expert_ids.numel();
  // Chunks grow with E so that the [E, chunks] table stays about N*k/32 entries however many experts.
  const int steps = std::max(8, std::min(4096, num_experts / 4));
  const int64_t chunk = static_cast<int64_t>(steps) * 32;
  const int chunks = static_cast<int>((routing.total + chunk - 1) / chunk);
  const auto int_options = expert_ids.options().dtype(at::kInt);
  at::Tensor counts = at::zeros({static_cast<int64_t>(num_experts) * chunks}, int_options);
  const int threads = 256;
  const int blocks = static_cast<int>((static_cast<int64_t>(chunks) * 32 + threads - 1) / threads);
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  count_experts_kernel<<<blocks, threads, 0, stream>>>(ids, routing.total, num_experts, chunks, steps,
                                                       counts.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor inclusive = at::cumsum(counts, 0, at::kInt);
  at::Tensor cursor = inclusive - counts;
  routing.perm = at::empty({routing.total}, int_options);
  scatter_assignments_kernel<<<blocks, threads, 0, stream>>>(ids, routing.total, num_experts, chunks, steps,
                                                             cursor.data_ptr<int>(),
                                                             routing.perm.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  routing.meta = at::empty({3 * (static_cast<int64_t>(num_experts) + 1)}, int_options);
  build_segments_kernel<<<1, 1024, 0, stream>>>(inclusive.data_ptr<int>(), num_experts, chunks,
                                                routing.meta.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return routing;
}

}  // namespace cuda
}  // namespace alter_ds
