// Compiled by nvcc, torch-free: which CUDA compiler and virtual architectures built the kernels.
#include <vector>

namespace vsd_ext::cuda {

int nvcc_version() { return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10; }

std::vector<int> compiled_archs() { return {__CUDA_ARCH_LIST__}; }

}  // namespace vsd_ext::cuda
