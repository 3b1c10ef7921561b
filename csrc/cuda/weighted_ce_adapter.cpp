// CUDA adapter of the weighted cross-entropy family: the CUDA kernel set for the device-generic
// drivers in csrc/weighted_ce_driver.h (chunk loop with cuBLAS GEMMs through at::mm / at::addmm,
// fp16/bf16 operands with fp32 output via the out_dtype overloads), device guard, current stream,
// launch error checks and TORCH_LIBRARY_IMPL(vsd_ext, CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kernel_dtype.h"
#include "cuda/weighted_ce_kernel.cuh"
#include "weighted_ce_div_driver.h"
#include "weighted_ce_linear_ce_driver.h"

namespace vsd_ext::wce::cuda_impl {
namespace k = vsd_ext::cuda::wce;

k::ConstMatrix const_matrix(const at::Tensor& t) {
  k::ConstMatrix m;
  if (t.defined()) {
    TORCH_CHECK(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1),
                "vsd_ext: weighted_ce: expected a matrix with unit column stride");
    m.data = t.data_ptr();
    m.dtype = vsd_ext::cuda::kernel_dtype(t);
    m.ld = t.stride(0);
  }
  return m;
}

k::Matrix matrix(const at::Tensor& t) {
  const k::ConstMatrix c = const_matrix(t);
  return {const_cast<void*>(c.data), c.dtype, c.ld};
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vsd_ext: weighted_ce ", what,
              " kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

k::StatsLaunch stats_launch(const StatsArgs& a) {
  k::StatsLaunch p;
  p.logits = const_matrix(a.logits);
  p.soft = const_matrix(a.soft);
  p.targets = a.targets.data_ptr<int64_t>();
  p.row_weights = a.row_weights.data_ptr();
  p.state = a.state.defined() ? a.state.data_ptr() : nullptr;
  p.loss = a.loss.data_ptr();
  p.lse = a.lse.data_ptr();
  p.soft_lse = a.soft_lse.defined() ? a.soft_lse.data_ptr() : nullptr;
  p.rows = a.logits.size(0);
  p.cols = a.logits.size(1);
  p.col0 = a.col0;
  p.vocab = a.vocab;
  p.ignore_index = a.ignore_index;
  p.temperature = a.temperature;
  p.first = a.first;
  p.last = a.last;
  p.acc_double = a.loss.scalar_type() == at::kDouble;
  return p;
}

k::GradLaunch grad_launch(const GradArgs& a) {
  k::GradLaunch p;
  p.logits = const_matrix(a.logits);
  p.soft = const_matrix(a.soft);
  p.out = matrix(a.out);
  p.targets = a.targets.data_ptr<int64_t>();
  p.row_weights = a.row_weights.data_ptr();
  p.grad_loss = ptr_or_null(a.grad_loss);
  p.grad_lse = ptr_or_null(a.grad_lse);
  p.lse = a.lse.data_ptr();
  p.soft_lse = ptr_or_null(a.soft_lse);
  p.rows = a.logits.size(0);
  p.cols = a.logits.size(1);
  p.ignore_index = a.ignore_index;
  p.temperature = a.temperature;
  p.unit_grad_loss = a.unit_grad_loss;
  p.acc_double = a.lse.scalar_type() == at::kDouble;
  return p;
}

void* ptr_or_null_mut(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

k::DivLaunch div_launch(const DivArgs& a, bool stats, bool grad) {
  k::DivLaunch p;
  p.logits = const_matrix(a.logits);
  p.teacher = const_matrix(a.teacher);
  p.out = grad ? matrix(a.out) : k::Matrix{};
  p.tv_weights = a.tv_weights.data_ptr();
  p.kl_weights = a.kl_weights.data_ptr();
  p.grad_loss = ptr_or_null(a.grad_loss);
  p.loss = ptr_or_null_mut(a.loss);
  p.beta = ptr_or_null_mut(a.beta);
  p.kl = ptr_or_null_mut(a.kl);
  p.lse = ptr_or_null_mut(a.lse);
  p.soft_lse = ptr_or_null_mut(a.soft_lse);
  p.q_less = ptr_or_null_mut(a.q_less);
  p.rows = a.logits.size(0);
  p.cols = a.logits.size(1);
  p.temperature = a.temperature;
  p.stats = stats;
  p.unit_grad_loss = a.unit_grad_loss;
  return p;
}

struct Kernels {
  // Native-dtype GEMM operands: cuBLAS runs fp16/bf16 at full rate with fp32 accumulation.
  static constexpr bool kUpcastOperands = false;
  // At most 2^27 logits per default chunk (512 MiB fp32 + 256 MiB fp16/bf16 gradient copy), so
  // the default 1,024 rows fit up to V = 131,072: the rank-1,024 update of the fp32 dweight
  // (K = rows) stays compute-bound on Hopper (~256 FLOP/byte). Such a chunk is far larger than
  // the L2 (50 MB on an H200): the row kernels re-read rows from L2 only within one fused
  // launch (stats_grad), never across launches.
  static constexpr int64_t kDefaultChunk = int64_t{1} << 27;

  static void stats(const StatsArgs& a) {
    check_launch(k::launch_stats(stats_launch(a), stream()), "statistics");
  }

  static void grad(const GradArgs& a) {
    check_launch(k::launch_grad(grad_launch(a), stream()), "gradient");
  }

  // One launch: a block reads its row for the statistics, then again (from L2) for the gradient.
  static void stats_grad(const StatsArgs& a, const GradArgs& g) {
    check_launch(k::launch_stats_grad(stats_launch(a), grad_launch(g), stream()),
                 "statistics and gradient");
  }

  static void div_stats(const DivArgs& a) {
    check_launch(k::launch_div(div_launch(a, true, false), stream()), "divergence statistics");
  }
  static void div_grad(const DivArgs& a) {
    check_launch(k::launch_div(div_launch(a, false, true), stream()), "divergence gradient");
  }
  static void div_stats_grad(const DivArgs& a) {
    check_launch(k::launch_div(div_launch(a, true, true), stream()), "divergence");
  }

  static void colsum_add(const at::Tensor& g, at::Tensor& out) {
    k::ColsumLaunch p;
    p.g = const_matrix(g);
    p.out = out.data_ptr();
    p.rows = g.size(0);
    p.cols = g.size(1);
    p.acc_double = out.scalar_type() == at::kDouble;
    check_launch(k::launch_colsum_add(p, stream()), "column sum");
  }
};

// The drivers run on the device of their first tensor, on its current stream.

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& row_weights,
    const std::optional<at::Tensor>& soft, int64_t ignore_index, double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return ce_forward<Kernels>(logits, targets, row_weights, soft, ignore_index, temperature);
}

at::Tensor ce_backward_cuda(const std::optional<at::Tensor>& grad_loss,
                            const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                            const at::Tensor& targets, const at::Tensor& row_weights,
                            const std::optional<at::Tensor>& soft, const at::Tensor& lse,
                            const at::Tensor& soft_lse, int64_t ignore_index, double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return ce_backward<Kernels>(grad_loss, grad_lse, logits, targets, row_weights, soft, lse,
                              soft_lse, ignore_index, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                    const at::Tensor& row_weights, const std::optional<at::Tensor>& soft,
                    const std::optional<at::Tensor>& bias, int64_t ignore_index, double temperature,
                    int64_t chunk_size, std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_forward<Kernels>(hidden, weight, targets, row_weights, soft, bias, ignore_index,
                                 temperature, chunk_size, grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const at::Tensor& row_weights, const std::optional<at::Tensor>& soft,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& soft_lse,
    const at::Tensor& dhidden_unit, const at::Tensor& dweight_unit, const at::Tensor& dbias_unit,
    int64_t ignore_index, double temperature, int64_t chunk_size, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_backward<Kernels>(grad_loss, grad_lse, hidden, weight, targets, row_weights, soft,
                                  bias, lse, soft_lse, dhidden_unit, dweight_unit, dbias_unit,
                                  ignore_index, temperature, chunk_size, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
div_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& teacher,
                 const at::Tensor& tv_weights, const at::Tensor& kl_weights,
                 const std::optional<at::Tensor>& bias, double temperature, int64_t chunk_size,
                 std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return div_forward<Kernels>(hidden, weight, teacher, tv_weights, kl_weights, bias, temperature,
                              chunk_size, grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> div_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& teacher, const at::Tensor& tv_weights, const at::Tensor& kl_weights,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& soft_lse,
    const at::Tensor& q_less, const at::Tensor& kl, const at::Tensor& dhidden_unit,
    const at::Tensor& dweight_unit, const at::Tensor& dbias_unit, double temperature,
    int64_t chunk_size, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return div_backward<Kernels>(grad_loss, hidden, weight, teacher, tv_weights, kl_weights, bias,
                               lse, soft_lse, q_less, kl, dhidden_unit, dweight_unit, dbias_unit,
                               temperature, chunk_size, output_mask);
}

TORCH_LIBRARY_IMPL(vsd_ext, CUDA, m) {
  m.impl("weighted_cross_entropy_forward", &ce_forward_cuda);
  m.impl("weighted_cross_entropy_backward", &ce_backward_cuda);
  m.impl("weighted_linear_cross_entropy_forward", &linear_forward_cuda);
  m.impl("weighted_linear_cross_entropy_backward", &linear_backward_cuda);
  m.impl("weighted_linear_divergence_forward", &div_forward_cuda);
  m.impl("weighted_linear_divergence_backward", &div_backward_cuda);
}

}  // namespace vsd_ext::wce::cuda_impl
