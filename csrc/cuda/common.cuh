// What every torch-free CUDA kernel shares: the one dtype enum of the kernel interfaces, the
// element conversions to and from the accumulation type, and the warp / block reductions.
//
// The enum is plain C++: the adapters (compiled by the host compiler) see it through the
// *_kernel.cuh launch interfaces. Everything else is device code, compiled by nvcc only.
#pragma once

namespace vsd_ext::cuda {

// Element dtype of a tensor handed to a kernel (the adapters map at::ScalarType onto it with
// kernel_dtype(), cuda/kernel_dtype.h).
enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

}  // namespace vsd_ext::cuda

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace vsd_ext::cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

// ---- element conversions -----------------------------------------------------------------------

// Accumulation type: fp32 for fp16 / bf16 / fp32 elements, fp64 for fp64 elements.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

// An element of type T from an accumulator (fp16 / bf16 round to nearest from fp32).
template <class T, class A>
__device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

// ---- reductions (fixed trees: deterministic) ---------------------------------------------------
// Butterfly shuffles leave the identical value in every lane (IEEE addition is commutative).

template <class T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullWarp, x, o);
  return x;
}

template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T x, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(kFullWarp, x, o));
  return x;
}

// Block-wide reduction of one value per thread, the same result in every thread; `scratch`
// holds >= 32 T. blockDim.x is a multiple of 32. Ends synchronized.
template <class T, class Op>
__device__ T block_reduce(T x, Op op, T* scratch) {
  x = warp_reduce(x, op);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = x;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MinOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};
struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct OrOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a | b;
  }
};

}  // namespace vsd_ext::cuda
#endif  // __CUDACC__
