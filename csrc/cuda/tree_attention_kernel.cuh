// Torch-free launch interface of the CUDA tree-attention kernels (contract: docs/design/OPS.md
// section 1).
//
// Two paths each way:
// - tree_attention_forward_tc (tree_attention_tc_forward_kernel.cu): FlashAttention-2 style,
//   tensor cores (mma.sync m16n8k16, fp32 accumulation), fp16/bf16, D in {64, 128}, any N. The
//   G = Hq/Hkv query heads of a kv head are packed into the rows of one query tile, so each K/V
//   tile is read once per group; prefix tiles are mask-free, the bitmask is applied on tree tiles
//   only;
//   the prefix is split across blocks (split-KV) when B * Hkv * row tiles would not fill the
//   GPU, and the partial results are merged by their LSE. Needs 16-byte aligned rows.
// - tree_attention_forward_simple (tree_attention_simple_kernel.cu): one warp per query, any
//   dtype (fp16/bf16/fp32/fp64), D <= 256, any layout: fp32/fp64 inputs and everything the
//   tensor-core path does not cover.
// - tree_attention_backward_tc (tree_attention_tc_backward_kernel.cu): tensor cores, same
//   coverage as the forward; a dQ kernel over query tiles and a dK/dV kernel over key tiles
//   (key-major); the sum over the rows that share a cache stays inside one block, or (few key
//   tiles) is split over blocks into fp32 partials reduced in a fixed order: deterministic, no
//   atomics.
// - tree_attention_backward_simple (tree_attention_simple_kernel.cu): deterministic,
//   atomics-free, one warp per query for dQ and one warp per key (summing over every row and
//   query that sees it) for dK/dV; every dtype and layout.
// Both recompute the scores from the saved lse.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/common.cuh"

namespace vsd_ext::cuda::tree_attn {

// Strided [*, *, *, D] tensor: element (i0, i1, i2, d) at ptr + i0 s0 + i1 s1 + i2 s2 + d.
struct Strided {
  const void* ptr;
  int64_t s0, s1, s2;
};

struct Inputs {
  DType dtype;
  int B, N, Hq, Hkv, D, Bc, L, W;
  double sm_scale;
  Strided q, k_cache, v_cache, k_tree, v_tree;
  const int64_t* tree_mask;  // element (b, n, w) at tree_mask + b mask_s0 + n mask_s1 + w
  int64_t mask_s0, mask_s1;
  const void* prefix_lens;     // [B], int32 or int64 (values clamped to [0, L] in the kernels):
  int64_t prefix_lens_stride;  // element b at prefix_lens + b prefix_lens_stride (any stride)
  bool prefix_lens_int64;
};

// Outputs are contiguous: out [B, N, Hq, D] (dtype of q), lse [B, N, Hq] (fp32; fp64 for fp64).
struct ForwardArgs {
  Inputs in;
  void* out;
  void* lse;
};

// True when the tensor-core path takes these inputs (dtype, head dim, 16-byte aligned rows).
bool forward_tc_supported(const Inputs& in);

// Number of prefix splits for a GPU with `num_sms` SMs, and the fp32 workspace (bytes) that the
// tensor-core forward then needs (0 without splitting).
int forward_tc_splits(const Inputs& in, int num_sms);
int64_t forward_tc_workspace_bytes(const Inputs& in, int splits);

cudaError_t tree_attention_forward_tc(const ForwardArgs& args, int splits, void* workspace,
                                      cudaStream_t stream);

// D <= kSimpleMaxD.
constexpr int kSimpleMaxD = 256;
cudaError_t tree_attention_forward_simple(const ForwardArgs& args, cudaStream_t stream);

struct BackwardArgs {
  Inputs in;
  Strided grad_out, out;  // [B, N, Hq, D], dtype of q
  const void* grad_lse;   // [B, N, Hq] contiguous, lse dtype; may be null
  const void* lse;        // [B, N, Hq] contiguous, lse dtype
  // Contiguous outputs, dtype of q: dq [B, N, Hq, D], dk/dv_cache [Bc, L, Hkv, D],
  // dk/dv_tree [B, N, Hkv, D].
  void *dq, *dk_cache, *dv_cache, *dk_tree, *dv_tree;
};

// Workspace bytes of the warp-per-row backward (delta = rowsum(dO * O) - dlse per query, fp32;
// fp64 for fp64 inputs), and the kernel that fills delta (run by both backward entry points).
int64_t backward_workspace_bytes(const Inputs& in);
cudaError_t launch_backward_delta(const BackwardArgs& args, void* delta, cudaStream_t stream);

// Tensor-core backward (tree_attention_tc_backward_kernel.cu): the forward_tc_supported inputs
// with a 16-byte aligned grad_out. A cache shared by the batch (Bc = 1) splits its rows over
// `cache_splits` blocks per key tile (backward_tc_cache_splits: as many as fill two waves of a
// GPU with `num_sms` SMs); its workspace holds delta and the splits' fp32 dK, dV partials.
bool backward_tc_supported(const BackwardArgs& args);
int backward_tc_cache_splits(const Inputs& in, int num_sms);
int64_t backward_tc_workspace_bytes(const Inputs& in, int cache_splits);
cudaError_t tree_attention_backward_tc(const BackwardArgs& args, int cache_splits, void* workspace,
                                       cudaStream_t stream);

// Warp-per-row backward (tree_attention_simple_kernel.cu): any dtype, D <= kSimpleMaxD, any layout.
cudaError_t tree_attention_backward_simple(const BackwardArgs& args, void* workspace,
                                           cudaStream_t stream);

}  // namespace vsd_ext::cuda::tree_attn
