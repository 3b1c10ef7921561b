// fp32 softmax loops of the CPU tree-attention kernels (bodies in tree_attention_cpu.h).
//
// Besides the GEMMs (tree_attention_gemm_cpu.cpp), each score element costs one exp2 plus a few
// flops, which would cost as much as the GEMMs unless it runs at full SIMD width: each function
// is compiled per ISA level (VSD_SIMD_CLONES, cpu_simd.h) and calls the polynomial
// simd::fast_exp2, so its loops vectorize.
#include "tree_attention_cpu.h"

namespace vsd_ext::tree_attn::cpu {

VSD_SIMD_CLONES void softmax_step(float* St, int64_t n, int64_t R, float* m, float* l, float* O,
                                  int64_t D, float* scratch) {
  softmax_step_impl(St, n, R, m, l, O, D, scratch);
}

VSD_SIMD_CLONES void softmax_backward_tile(float* St, float* dPt, int64_t n, int64_t R,
                                           const float* lse2, const float* delta) {
  softmax_backward_tile_impl(St, dPt, n, R, lse2, delta);
}

VSD_SIMD_CLONES void softmax_backward_rows(float* S, float* dP, int64_t R, int64_t n,
                                           const float* lse2, const float* delta) {
  softmax_backward_rows_impl(S, dP, R, n, lse2, delta);
}

}  // namespace vsd_ext::tree_attn::cpu
