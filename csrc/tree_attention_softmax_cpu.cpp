// fp32 softmax loops of the CPU tree-attention kernels (bodies in tree_attention_cpu.h).
//
// Besides the GEMMs (tree_attention_gemm_cpu.cpp), each score element costs one exp2 plus a few
// flops, which would cost as much as the GEMMs unless it runs at full SIMD width. The build uses no
// -march flag, so on x86-64 with GCC/Clang each function is compiled for three ISA levels
// (target_clones: AVX-512, AVX2+FMA, baseline SSE2) and the loader picks the best one the CPU
// supports; elsewhere it is compiled once for the baseline.
#include "tree_attention_cpu.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VSD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VSD_SIMD_CLONES
#endif

namespace vsd_ext::tree_attn::cpu {
namespace {

// 2^x for x <= 126; x < -126 (including -inf) gives exactly 0. 2^x = 2^k * 2^f with
// k = round(x), f in [-1/2, 1/2]: 2^f is the degree-6 Taylor polynomial of e^(f ln 2)
// (relative error < 2e-7), 2^k is written into the exponent bits. Plain arithmetic (no libm
// call) so that loops calling it vectorize.
__attribute__((always_inline)) inline float exp2_approx(float x) {
  const float xc = std::min(std::max(x, -126.f), 126.f);
  const float k = (xc + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23 trick
  const float f = xc - k;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284770e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910070e-1f;
  p = p * f + 6.9314718055994530e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -126.f ? 0.f : p * scale;
}

struct Exp2Approx {
  __attribute__((always_inline)) float operator()(float x) const { return exp2_approx(x); }
};

}  // namespace

VSD_SIMD_CLONES
void softmax_step(float* St, int64_t n, int64_t R, float* m, float* l, float* O, int64_t D, float* scratch) {
  softmax_step_impl(St, n, R, m, l, O, D, scratch, Exp2Approx{});
}

VSD_SIMD_CLONES
void softmax_backward_tile(float* St, float* dPt, int64_t n, int64_t R, const float* lse2, const float* delta) {
  softmax_backward_tile_impl(St, dPt, n, R, lse2, delta, Exp2Approx{});
}

VSD_SIMD_CLONES
void softmax_backward_rows(float* S, float* dP, int64_t R, int64_t n, const float* lse2, const float* delta) {
  softmax_backward_rows_impl(S, dP, R, n, lse2, delta, Exp2Approx{});
}

}  // namespace vsd_ext::tree_attn::cpu
