// CPU kernel set of the weighted cross-entropy (the interface is in weighted_ce_driver.h):
// row kernels in csrc/weighted_ce_rows_cpu.cpp, GEMMs through ATen (MKL) in acc dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "weighted_ce_driver.h"

namespace vsd_ext::wce::cpu {

void stats(const StatsArgs& a);
void grad(const GradArgs& a);
// stats then grad of the same whole-row tile, fused per row; the gradient overwrites the logits.
void stats_grad(const StatsArgs& a, const GradArgs& g);
void colsum_add(const at::Tensor& g, at::Tensor& out);
// The divergence rows (weighted_ce_div_rows_cpu.cpp): acc-dtype logits, the gradient in place.
void div_stats(const DivArgs& a);
void div_grad(const DivArgs& a);
void div_stats_grad(const DivArgs& a);

struct Kernels {
  // fp16/bf16 GEMMs are slow or emulated on most CPUs: the weight is cast to fp32 once per call
  // and each hidden chunk as it is used, so chunk logits and gradients are fp32 throughout.
  static constexpr bool kUpcastOperands = true;
  // At most 2^25 logits (128 MiB fp32) per default chunk: 1,024 rows at V = 32,000, 261 at
  // V = 128,256. Few and large GEMMs (few synchronizations), far from M * V, and below the fp32
  // [V, H] + [M, H] gradient buffers of typical heads, so it rarely sets the peak.
  static constexpr int64_t kDefaultChunk = int64_t{1} << 25;
  static void stats(const StatsArgs& a) { cpu::stats(a); }
  static void grad(const GradArgs& a) { cpu::grad(a); }
  static void stats_grad(const StatsArgs& a, const GradArgs& g) { cpu::stats_grad(a, g); }
  static void colsum_add(const at::Tensor& g, at::Tensor& out) { cpu::colsum_add(g, out); }
  static void div_stats(const DivArgs& a) { cpu::div_stats(a); }
  static void div_grad(const DivArgs& a) { cpu::div_grad(a); }
  static void div_stats_grad(const DivArgs& a) { cpu::div_stats_grad(a); }
};

}  // namespace vsd_ext::wce::cpu
