// What every torch-free CUDA kernel shares: the one dtype enum of the kernel interfaces, the
// once-per-device attribute calls, the element conversions to and from the accumulation type,
// and the warp / block reductions.
//
// The enum and the once-per-device helpers are plain C++: the adapters (compiled by the host
// compiler) see them through the *_kernel.cuh launch interfaces. Everything else is device code,
// compiled by nvcc only.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

namespace vsd_ext::cuda {

// Element dtype of a tensor handed to a kernel (the adapters map at::ScalarType onto it with
// kernel_dtype(), cuda/kernel_dtype.h).
enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// ---- once per device (host code) ---------------------------------------------------------------
// cudaFuncSetAttribute and device attribute queries are driver calls: the launchers make them
// once per device, not per call. Devices past kMaxDevices (none in practice) repeat the call.
constexpr int kMaxDevices = 64;

// Runs set() on the current device unless it already succeeded there; `done` is the call site's
// flag per device (a function-local static). Two threads' first calls may both run it: the
// attribute calls it makes are idempotent.
template <class F>
cudaError_t once_per_device(std::atomic<bool> (&done)[kMaxDevices], F&& set) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);  // thread-local state, no driver round trip
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  err = set();
  if (err == cudaSuccess && cached) done[device].store(true, std::memory_order_release);
  return err;
}

// cudaDeviceGetAttribute(value, kAttr, device), queried once per device (for the positive
// attributes the kernels size themselves by: multiprocessor count, shared-memory limits).
template <cudaDeviceAttr kAttr>
cudaError_t device_attribute(int device, int* value) {
  static std::atomic<int> cache[kMaxDevices];  // 0: not queried yet
  const bool cached = device >= 0 && device < kMaxDevices;
  const int known = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (known > 0) {
    *value = known;
    return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(value, kAttr, device);
  if (err == cudaSuccess && cached) cache[device].store(*value, std::memory_order_relaxed);
  return err;
}

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
