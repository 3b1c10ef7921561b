// Device helpers shared by the CUDA tree-attention kernels (torch-free); conversions and
// reductions come from cuda/common.cuh.
#pragma once

#include "cuda/common.cuh"
#include "cuda/tree_attention_kernel.cuh"
#include "tree_attention_math.h"

namespace vsd_ext::cuda::tree_attn {

using vsd_ext::tree_attn::kLn2;
using vsd_ext::tree_attn::kLn2D;
using vsd_ext::tree_attn::kLog2e;
using vsd_ext::tree_attn::kLog2eD;
using vsd_ext::tree_attn::tree_bit;

__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fast_log2(float x) { return log2f(x); }
__device__ __forceinline__ double fast_log2(double x) { return log2(x); }

// prefix_lens[b] clamped to [0, L] (the adapter already rejected out-of-range values; the clamp
// keeps every read in bounds whatever the caller passed).
// Element b sits at b * prefix_lens_stride (a column view, an expanded scalar: any stride).
__device__ __forceinline__ int prefix_len(const Inputs& in, int b) {
  const int64_t at = b * in.prefix_lens_stride;
  const int64_t v = in.prefix_lens_int64 ? static_cast<const int64_t*>(in.prefix_lens)[at]
                                         : static_cast<const int32_t*>(in.prefix_lens)[at];
  return static_cast<int>(v < 0 ? 0 : (v > in.L ? in.L : v));
}

template <class T>
__device__ __forceinline__ const T* row_ptr(const Strided& t, int64_t i0, int64_t i1, int64_t i2) {
  return static_cast<const T*>(t.ptr) + i0 * t.s0 + i1 * t.s1 + i2 * t.s2;
}

}  // namespace vsd_ext::cuda::tree_attn
