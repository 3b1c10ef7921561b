// The CUDA library vsd_ext._C_cuda's build report, compiled by nvcc, torch-free: which CUDA
// compiler and virtual architectures built its kernels. Plain C symbols, which vsd_ext/_loader.py
// reads through ctypes once it has loaded the library (build_info()).

extern "C" {

// nvcc's version as major * 1000 + minor * 10 (CUDA's own convention: 13.0 -> 13000).
int vsd_ext_cuda_nvcc_version() { return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10; }

// Writes up to `capacity` compiled virtual architectures (e.g. 900 for 9.0) to `out` and returns
// how many there are.
int vsd_ext_cuda_archs(int* out, int capacity) {
  constexpr int kArchs[] = {__CUDA_ARCH_LIST__};
  constexpr int kCount = sizeof(kArchs) / sizeof(kArchs[0]);
  for (int i = 0; i < kCount && i < capacity; ++i) out[i] = kArchs[i];
  return kCount;
}

}  // extern "C"
