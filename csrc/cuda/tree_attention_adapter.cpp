// CUDA adapter of tree_attention and its backward: argument checks, device guard and stream,
// allocation, choice of kernel path (tree_attention_kernel.cuh), launch and error check.
#include "cuda/kernel_dtype.h"
#include "cuda/tree_attention_kernel.cuh"
#include "tree_attention_checks.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace vsd_ext::tree_attn {
namespace {

namespace ct = vsd_ext::cuda::tree_attn;

ct::Strided strided(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

ct::Inputs kernel_inputs(const Dims& d, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& prefix_lens,
                         const at::Tensor& k_tree, const at::Tensor& v_tree,
                         const at::Tensor& tree_mask, double sm_scale) {
  ct::Inputs in{};
  in.dtype = cuda::kernel_dtype(q);
  in.B = static_cast<int>(d.B);
  in.N = static_cast<int>(d.N);
  in.Hq = static_cast<int>(d.Hq);
  in.Hkv = static_cast<int>(d.Hkv);
  in.D = static_cast<int>(d.D);
  in.Bc = static_cast<int>(d.Bc);
  in.L = static_cast<int>(d.L);
  in.W = static_cast<int>(d.W);
  in.sm_scale = sm_scale;
  in.q = strided(q);
  in.k_cache = strided(k_cache);
  in.v_cache = strided(v_cache);
  in.k_tree = strided(k_tree);
  in.v_tree = strided(v_tree);
  in.tree_mask = tree_mask.data_ptr<int64_t>();
  in.mask_s0 = tree_mask.stride(0);
  in.mask_s1 = tree_mask.stride(1);
  in.prefix_lens = prefix_lens.data_ptr();  // any stride: lens[:, 0], expand(B) (stride 0)
  in.prefix_lens_stride = prefix_lens.stride(0);
  in.prefix_lens_int64 = prefix_lens.scalar_type() == at::kLong;
  return in;
}

void check_cuda_dims(const Dims& d) {
  VSD_CHECK(d.D <= ct::kSimpleMaxD, "q", "the CUDA kernels support head dims up to ",
            ct::kSimpleMaxD, " (the CPU kernel takes any), got D = ", d.D);
  VSD_CHECK(d.B * d.N * d.Hq < (int64_t{1} << 31) && d.Bc * d.L * d.Hkv < (int64_t{1} << 31), "q",
            "too many rows for the CUDA kernels (B N Hq and Bc L Hkv must stay below 2^31)");
}

// Value check of prefix_lens, every call (the op is public and its contract says out-of-range
// values raise): (min, max) reduced on the device and read back in one blocking 16-byte copy, the
// only synchronization of a forward or backward call. Skipped while the stream is being captured
// into a CUDA graph, where a read is not allowed; the kernels clamp the values to [0, L], so reads
// stay in bounds either way.
void check_prefix_values(const at::Tensor& prefix_lens, int64_t L, cudaStream_t stream) {
  if (prefix_lens.numel() == 0) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  TORCH_CHECK(cudaStreamIsCapturing(stream, &status) == cudaSuccess,
              "vsd_ext: cudaStreamIsCapturing failed");
  if (status != cudaStreamCaptureStatusNone) return;
  const auto [lo, hi] = at::aminmax(prefix_lens);
  const at::Tensor range = at::stack({lo, hi}).to(at::kCPU, at::kLong);  // the one read
  check_prefix_range(range.data_ptr<int64_t>()[0], range.data_ptr<int64_t>()[1], L);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vsd_ext: ", what, " failed: ", cudaGetErrorString(err));
}

// Multiprocessor count of the device (queried once per device).
int multiprocessors(const at::Tensor& t) {
  int sms = 0;
  check_launch(cuda::device_attribute<cudaDevAttrMultiProcessorCount>(t.device().index(), &sms),
               "cudaDeviceGetAttribute");
  return sms;
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& prefix_lens, const at::Tensor& k_tree, const at::Tensor& v_tree,
    const at::Tensor& tree_mask, double sm_scale) {
  const Dims d =
      check_forward_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale);
  check_cuda_dims(d);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  check_prefix_values(prefix_lens, d.L, stream);
  at::Tensor out = at::empty({d.B, d.N, d.Hq, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.N, d.Hq}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0) return {out, lse};

  ct::ForwardArgs args{
      kernel_inputs(d, q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale),
      out.data_ptr(), lse.data_ptr()};
  if (!ct::forward_tc_supported(args.in)) {
    check_launch(ct::tree_attention_forward_simple(args, stream),
                 "tree_attention forward (simple path)");
    return {out, lse};
  }
  const int splits = ct::forward_tc_splits(args.in, multiprocessors(q));
  const int64_t ws_bytes = ct::forward_tc_workspace_bytes(args.in, splits);
  at::Tensor workspace = at::empty({ws_bytes}, q.options().dtype(at::kByte));
  check_launch(ct::tree_attention_forward_tc(args, splits,
                                             ws_bytes ? workspace.data_ptr() : nullptr, stream),
               "tree_attention forward (tensor-core path)");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& prefix_lens,
    const at::Tensor& k_tree, const at::Tensor& v_tree, const at::Tensor& tree_mask,
    const at::Tensor& out, const at::Tensor& lse, double sm_scale) {
  const Dims d =
      check_forward_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale);
  check_backward_args(d, q, grad_out, grad_lse, out, lse);
  check_cuda_dims(d);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  check_prefix_values(prefix_lens, d.L, stream);
  // Every element of every gradient is written by the kernels (zeros where no query looks).
  at::Tensor dq = at::empty({d.B, d.N, d.Hq, d.D}, q.options());
  at::Tensor dk_cache = at::empty({d.Bc, d.L, d.Hkv, d.D}, q.options());
  at::Tensor dv_cache = at::empty({d.Bc, d.L, d.Hkv, d.D}, q.options());
  at::Tensor dk_tree = at::empty({d.B, d.N, d.Hkv, d.D}, q.options());
  at::Tensor dv_tree = at::empty({d.B, d.N, d.Hkv, d.D}, q.options());
  if (dq.numel() == 0) return {dq, dk_cache.zero_(), dv_cache.zero_(), dk_tree, dv_tree};

  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor glse = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  ct::BackwardArgs args{};
  args.in = kernel_inputs(d, q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale);
  args.grad_out = strided(grad_out);
  args.out = strided(out);
  args.grad_lse = glse.defined() ? glse.data_ptr() : nullptr;
  args.lse = lse_c.data_ptr();
  args.dq = dq.data_ptr();
  args.dk_cache = dk_cache.data_ptr();
  args.dv_cache = dv_cache.data_ptr();
  args.dk_tree = dk_tree.data_ptr();
  args.dv_tree = dv_tree.data_ptr();
  const auto byte_opts = q.options().dtype(at::kByte);
  if (!ct::backward_tc_supported(args)) {
    at::Tensor workspace = at::empty({ct::backward_workspace_bytes(args.in)}, byte_opts);
    check_launch(ct::tree_attention_backward_simple(args, workspace.data_ptr(), stream),
                 "tree_attention backward (simple path)");
    return {dq, dk_cache, dv_cache, dk_tree, dv_tree};
  }
  const int splits = ct::backward_tc_cache_splits(args.in, multiprocessors(q));
  at::Tensor workspace = at::empty({ct::backward_tc_workspace_bytes(args.in, splits)}, byte_opts);
  check_launch(ct::tree_attention_backward_tc(args, splits, workspace.data_ptr(), stream),
               "tree_attention backward (tensor-core path)");
  return {dq, dk_cache, dv_cache, dk_tree, dv_tree};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsd_ext, CUDA, m) {
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("tree_attention_backward", &tree_attention_backward_cuda);
}

}  // namespace vsd_ext::tree_attn
