// verify_tree CUDA kernels: torch-free device helpers (row loads, the block-wide inverse-CDF
// draw); conversions and reductions come from cuda/common.cuh. Included by verify_tree_kernel.cu
// only.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/common.cuh"

namespace vsd_ext::cuda::device {

template <typename T>
__device__ __forceinline__ double load_d(const T* p, int64_t v) {
  return static_cast<double>(to_acc(p[v]));
}

// Calls f(v, x) for v in [lo, hi) of `row`, spread over the block with 16-byte loads; every
// thread sees its indices in increasing order (so a strict '>' keeps the first argmax).
template <typename T, typename F>
__device__ __forceinline__ void for_each_element(const T* row, int64_t lo, int64_t hi, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t misalign = int64_t(reinterpret_cast<uintptr_t>(row + lo) % 16) / int64_t(sizeof(T));
  int64_t head = misalign == 0 ? 0 : kVec - misalign;
  head = head < hi - lo ? head : hi - lo;
  if (threadIdx.x < head) f(lo + threadIdx.x, to_acc(row[lo + threadIdx.x]));
  const int64_t body = lo + head;
  const int64_t nvec = (hi - body) / kVec;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + body);
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const uint4 raw = __ldg(vrow + j);
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(body + j * kVec + k, to_acc(vals[k]));
  }
  for (int64_t v = body + nvec * kVec + threadIdx.x; v < hi; v += blockDim.x) {
    f(v, to_acc(row[v]));
  }
}

// Inverse CDF over the weights weight(v), v in [0, V): the smallest v with w(v) > 0 and
// prefix(v) > u * sum(w), else the largest v with w(v) > 0, else -1. Warp w owns a contiguous
// segment; pass A sums segments, pass B scans each segment from its offset 32 entries at a
// time (prefix = carry + warp inclusive scan) and stops at its first hit.
template <int kWarps, typename W>
__device__ int block_inverse_cdf(W weight, int64_t V, double u) {
  __shared__ double seg_total[kWarps];
  __shared__ int iscratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t seg = ((V + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int64_t lo = warp * seg, hi = lo + seg < V ? lo + seg : V;
  double s = 0.0;
  for (int64_t v = lo + lane; v < hi; v += 32) s += weight(v);
  s = warp_sum(s);
  if (lane == 0) seg_total[warp] = s;
  __syncthreads();
  double offset = 0.0, total = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) offset = total;
    total += seg_total[w];
  }
  const double threshold = u * total;
  int hit = INT_MAX, last = -1;
  double carry = offset;
  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t v = base + lane;
    const double w = v < hi ? weight(v) : 0.0;
    double incl = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kFullWarp, incl, o);
      if (lane >= o) incl += n;
    }
    if (w > 0.0) {
      last = int(v);
      if (hit == INT_MAX && carry + incl > threshold) hit = int(v);
    }
    carry += __shfl_sync(kFullWarp, incl, 31);
    if (__any_sync(kFullWarp, hit != INT_MAX)) break;
  }
  // A warp stops early only after a hit, so `last` is complete whenever no warp hit.
  hit = block_reduce(hit, MinOp{}, iscratch);
  last = block_reduce(last, MaxOp{}, iscratch);
  return hit != INT_MAX ? hit : last;
}

}  // namespace vsd_ext::cuda::device
