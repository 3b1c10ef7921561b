// VSD_HD marks the torch-free inline math that both the C++ (CPU) and the CUDA kernels compile.
#pragma once

#ifdef __CUDACC__
#define VSD_HD __host__ __device__ __forceinline__
#else
#define VSD_HD inline
#endif
