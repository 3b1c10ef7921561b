// verify_tree CUDA kernels: torch-free launch interface (raw pointers, strides, stream).
// The adapter (verify_tree_adapter.cpp) checks arguments, allocates, and raises errors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/common.cuh"

namespace vsd_ext::cuda {

struct VerifyTreeParams {
  const void* logits;  // [B, N, V] fp32 / fp16 / bf16, unit last stride
  DType logits_dtype;
  int64_t logits_sb, logits_sn;
  const int64_t* tokens;   // [B, N] contiguous
  const int64_t* parents;  // [B, N] contiguous
  const void* uniforms;    // [B, N + 1] contiguous, fp32 / fp64
  DType uniforms_dtype;
  const void* draft_probs;  // [B, N, V] fp32 / bf16, unit last stride; null unless sampled
  DType draft_probs_dtype;
  int64_t q_sb, q_sn;
  int64_t batch, nodes, vocab;
  int mode;  // 0 greedy, 1 target_only, 2 sampled
  double temperature;
  int64_t* accepted_nodes;  // [B, N]
  int64_t* emitted_tokens;  // [B, N]
  int64_t* num_accepted;    // [B]
};

struct VerifyTreeStatus {
  cudaError_t error;   // launch / runtime error, cudaSuccess otherwise
  uint64_t error_key;  // first bad input (verify_tree_math.h keys), kNoError otherwise
};

// Device scratch the launch needs (per-node statistics and the error word).
size_t verify_tree_workspace_bytes(int64_t batch, int64_t nodes, int64_t vocab);

// Largest N the walk kernel's shared memory holds on `device`.
int64_t verify_tree_max_nodes(int device);

// Runs the two kernels on `stream`, then waits for the stream to read back the error word
// (one 8-byte copy): data errors must reach the caller as exceptions.
VerifyTreeStatus verify_tree_launch(const VerifyTreeParams& p, void* workspace,
                                    cudaStream_t stream);

}  // namespace vsd_ext::cuda
