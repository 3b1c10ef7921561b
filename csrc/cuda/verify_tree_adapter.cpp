// verify_tree, CUDA adapter: argument checks, device guard, current stream, allocation, launch of
// the torch-free kernels (verify_tree_kernel.cu), error reporting, and the CUDA registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/kernel_dtype.h"
#include "cuda/verify_tree_kernel.cuh"
#include "verify_tree_checks.h"

namespace vsd_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& uniforms, const std::optional<at::Tensor>& draft_probs, int64_t mode,
    double temperature) {
  const auto [B, N, V] = check_verify_tree_args(target_logits, draft_tokens, parents, uniforms,
                                                draft_probs, mode, temperature);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const int64_t max_nodes = cuda::verify_tree_max_nodes(target_logits.get_device());
  VSD_CHECK(N <= max_nodes, "target_logits", "N = ", N,
            " tree nodes exceed the CUDA kernel's shared-memory capacity on this device (",
            max_nodes, ")");

  const auto long_opts = target_logits.options().dtype(at::kLong);
  at::Tensor accepted_nodes = at::empty({B, N}, long_opts);
  at::Tensor emitted_tokens = at::empty({B, N}, long_opts);
  at::Tensor num_accepted = at::empty({B}, long_opts);
  if (B == 0) return {accepted_nodes, emitted_tokens, num_accepted};

  const at::Tensor logits = with_unit_last_stride(target_logits);
  const at::Tensor tokens = draft_tokens.contiguous();
  const at::Tensor par = parents.contiguous();
  const at::Tensor u = uniforms.contiguous();
  std::optional<at::Tensor> q;
  if (mode == verify::kSampled) q = with_unit_last_stride(*draft_probs);

  cuda::VerifyTreeParams p{};
  p.logits = logits.data_ptr();
  p.logits_dtype = cuda::kernel_dtype(logits);
  p.logits_sb = logits.stride(0);
  p.logits_sn = logits.stride(1);
  p.tokens = tokens.data_ptr<int64_t>();
  p.parents = par.data_ptr<int64_t>();
  p.uniforms = u.data_ptr();
  p.uniforms_dtype = cuda::kernel_dtype(u);
  p.draft_probs = q ? q->data_ptr() : nullptr;
  p.draft_probs_dtype = q ? cuda::kernel_dtype(*q) : cuda::DType::kFloat32;
  p.q_sb = q ? q->stride(0) : 0;
  p.q_sn = q ? q->stride(1) : 0;
  p.batch = B;
  p.nodes = N;
  p.vocab = V;
  p.mode = static_cast<int>(mode);
  p.temperature = temperature;
  p.accepted_nodes = accepted_nodes.data_ptr<int64_t>();
  p.emitted_tokens = emitted_tokens.data_ptr<int64_t>();
  p.num_accepted = num_accepted.data_ptr<int64_t>();

  const auto bytes = static_cast<int64_t>(cuda::verify_tree_workspace_bytes(B, N, V));
  at::Tensor workspace = at::empty({bytes}, target_logits.options().dtype(at::kByte));
  const cuda::VerifyTreeStatus status =
      cuda::verify_tree_launch(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status.error == cudaSuccess,
              "vsd_ext.verify_tree: CUDA error: ", cudaGetErrorString(status.error));
  raise_row_error(status.error_key, N, V);
  return {accepted_nodes, emitted_tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsd_ext, CUDA, m) { m.impl("verify_tree", &verify_tree_cuda); }

}  // namespace vsd_ext
