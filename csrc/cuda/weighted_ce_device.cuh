// Device code shared by the CUDA kernels of the weighted_ce family (weighted_ce_kernel.cu,
// weighted_ce_div_kernel.cu): the block merge of RowStats, the dtype dispatch, and the grid of the
// kernels that own one row at a time. Compiled by nvcc only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/weighted_ce_kernel.cuh"
#include "weighted_ce_math.h"

namespace vsd_ext::cuda::wce {

using vsd_ext::wce::RowStats;

constexpr int kMaxThreads = 256;    // per block of the statistics and gradient kernels
constexpr int kFusedThreads = 512;  // per block of the fused kernel (one row at a time)
constexpr int kMaxWarps = 32;

template <typename A>
__device__ RowStats<A> shfl_down(const RowStats<A>& s, int offset) {
  RowStats<A> o;
  o.m = __shfl_down_sync(kFullWarp, s.m, offset);
  o.s = __shfl_down_sync(kFullWarp, s.s, offset);
  o.zt = __shfl_down_sync(kFullWarp, s.zt, offset);
  o.mu = __shfl_down_sync(kFullWarp, s.mu, offset);
  o.su = __shfl_down_sync(kFullWarp, s.su, offset);
  o.d = __shfl_down_sync(kFullWarp, s.d, offset);
  return o;
}

// Lane 0 ends with the merge of the warp's 32 statistics (fixed tree: deterministic).
template <typename A>
__device__ RowStats<A> warp_merge(RowStats<A> s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.merge(shfl_down(s, offset));
  }
  return s;
}

// Thread 0 ends with the merge of the block's statistics. blockDim.x is a multiple of 32.
template <typename A>
__device__ RowStats<A> block_merge(RowStats<A> s) {
  __shared__ A fields[kMaxWarps][RowStats<A>::kFields];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  s = warp_merge(s);
  if (lane == 0) s.store(fields[warp]);
  __syncthreads();
  if (warp == 0) {
    s = RowStats<A>::empty();
    if (lane < warps) s = RowStats<A>::load(fields[lane]);
    s = warp_merge(s);
  }
  return s;
}

// ---- dtype dispatch ---------------------------------------------------------------------------

template <typename X>
struct Tag {
  using type = X;
};
struct NoSoft {};

template <typename F>
void with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(Tag<__half>{}); break;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat32: f(Tag<float>{}); break;
    case DType::kFloat64: f(Tag<double>{}); break;
  }
}

// Soft-target dtype, or NoSoft when absent.
template <typename F>
void with_soft_dtype(const ConstMatrix& soft, F&& f) {
  if (soft.data == nullptr) {
    f(Tag<NoSoft>{});
  } else {
    with_dtype(soft.dtype, f);
  }
}

inline int threads_for(int64_t cols, int max_threads = kMaxThreads) {
  const int64_t warps = (cols + 31) / 32;
  return static_cast<int>(warps >= max_threads / 32 ? max_threads : warps * 32);
}

// Rows in flight of the fused kernel, i.e. its grid (its blocks loop over the rows). A block reads
// its row twice; the second read hits L2 when every row in flight still is there, so the rows in
// flight are sized to fill half the L2: rows x V x sizeof(T) <= L2 / 2 (H200: 50 MB of L2, so ~195
// fp32 rows at V = 32,000, ~48 at V = 128,256). At least one block per SM, so that every SM
// streams: where half the L2 holds fewer rows than there are SMs (fp32 rows longer than ~47k
// entries on an H200), the second read partly misses L2, which costs what the two separate launches
// cost (one more read of the chunk from HBM). The two separate launches read a chunk of up to 512
// MiB twice from HBM, whatever V.
inline unsigned fused_blocks(int64_t rows, int64_t row_bytes) {
  int device = 0, l2 = 0, sms = 1;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    l2 = 0;  // unknown: one block per row (the launch reports a sticky error, if any)
  }
  const int64_t fit = l2 > 0 ? (l2 / 2) / (row_bytes > 0 ? row_bytes : 1) : rows;
  const int64_t blocks = fit > sms ? fit : sms;
  return static_cast<unsigned>(blocks < rows ? blocks : rows);
}

inline int64_t dtype_bytes(DType d) {
  return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
}

}  // namespace vsd_ext::cuda::wce
