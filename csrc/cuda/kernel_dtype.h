// The DType (cuda/common.cuh) under which a tensor is handed to a torch-free CUDA kernel; shared
// by the CUDA adapters. The adapters' argument checks admit only these four dtypes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cuda/common.cuh"

namespace vsd_ext::cuda {

inline DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "vsd_ext: no CUDA kernel takes dtype ", t.scalar_type());
  }
}

}  // namespace vsd_ext::cuda
