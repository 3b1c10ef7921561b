// Torch-free CUDA kernels of the weighted cross-entropy (the launchers; the kernels are in
// weighted_ce_kernel.cu).
// The adapter (weighted_ce_adapter.cpp) runs the chunk loop with cuBLAS GEMMs through ATen and
// calls these for the per-row work. Math: csrc/weighted_ce_math.h (shared with the CPU kernels).
//
// Matrices have unit column stride and a row stride `ld` in elements. Per-row vectors (targets,
// row weights, gradients, statistics) are contiguous; `acc` (float or double, `acc_double`) is
// the dtype of every per-row float vector and of the statistics state.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/common.cuh"

namespace vsd_ext::cuda::wce {

struct ConstMatrix {
  const void* data = nullptr;  // nullptr: absent (e.g. no soft targets)
  DType dtype = DType::kFloat32;
  int64_t ld = 0;
};

struct Matrix {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t ld = 0;
};

// Row statistics of a [rows, cols] logits tile at vocabulary offset col0 (see StatsArgs in
// csrc/weighted_ce_driver.h): one block per row, online log-sum-exp per thread, deterministic tree
// merge. The last tile writes loss, lse and soft_lse; an active row whose hard target is outside
// [0, vocab) gets a NaN loss.
struct StatsLaunch {
  ConstMatrix logits, soft;
  const int64_t* targets = nullptr;
  const void* row_weights = nullptr;
  void* state = nullptr;  // [rows, 6] acc, read unless first, written unless last
  void* loss = nullptr;
  void* lse = nullptr;
  void* soft_lse = nullptr;
  int64_t rows = 0, cols = 0, col0 = 0, vocab = 0, ignore_index = -100;
  double temperature = 1.0;
  bool first = true, last = true, acc_double = false;
};

// out = a_m exp(z - lse_m) - c_m y over whole rows (out may alias logits when dtypes match).
struct GradLaunch {
  ConstMatrix logits, soft;
  Matrix out;
  const int64_t* targets = nullptr;
  const void* row_weights = nullptr;
  const void* grad_loss = nullptr;  // nullptr: g = unit_grad_loss ? 1 : 0
  const void* grad_lse = nullptr;   // nullptr: gl = 0
  const void* lse = nullptr;
  const void* soft_lse = nullptr;
  int64_t rows = 0, cols = 0, ignore_index = -100;
  double temperature = 1.0;
  bool unit_grad_loss = false, acc_double = false;
};

// out[v] += sum_r g[r, v] (acc), one thread per column summing rows in order: deterministic.
struct ColsumLaunch {
  ConstMatrix g;
  void* out = nullptr;
  int64_t rows = 0, cols = 0;
  bool acc_double = false;
};

// The divergence rows of a [rows, cols] chunk of whole rows (see DivArgs in
// csrc/weighted_ce_driver.h; math in csrc/weighted_ce_div_math.h). `stats`: writes loss, beta,
// kl, lse, soft_lse and q_less; else reads lse, soft_lse, q_less and kl. out.data: the gradient
// (may alias logits), nullptr for none. Logits fp32 / fp64 (the chunk's, acc dtype).
struct DivLaunch {
  ConstMatrix logits, teacher;
  Matrix out;
  const void* tv_weights = nullptr;
  const void* kl_weights = nullptr;
  const void* grad_loss = nullptr;  // nullptr: g = unit_grad_loss ? 1 : 0
  void* loss = nullptr;
  void* beta = nullptr;
  void* kl = nullptr;
  void* lse = nullptr;
  void* soft_lse = nullptr;
  void* q_less = nullptr;
  int64_t rows = 0, cols = 0;
  double temperature = 1.0;
  bool stats = true, unit_grad_loss = false;
};

cudaError_t launch_stats(const StatsLaunch& p, cudaStream_t stream);
cudaError_t launch_grad(const GradLaunch& p, cudaStream_t stream);
// Both on the same whole rows (p.first && p.last), in one kernel: g.lse / g.soft_lse are p.lse /
// p.soft_lse, written by the statistics before the gradient reads them; g.out may alias p.logits.
cudaError_t launch_stats_grad(const StatsLaunch& p, const GradLaunch& g, cudaStream_t stream);
cudaError_t launch_colsum_add(const ColsumLaunch& p, cudaStream_t stream);
cudaError_t launch_div(const DivLaunch& p, cudaStream_t stream);

}  // namespace vsd_ext::cuda::wce
