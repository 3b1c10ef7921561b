// Torch-free math shared by the CPU and CUDA tree-attention kernels.
//
// Scores live in the log2 domain: with c = sm_scale * log2(e), s2 = c * (q . k) and
// softmax(s) = 2^(s2 - max) / sum 2^(s2 - max), so every exponential is an exp2 and the
// natural-log lse is ln(2) * (m2 + log2(l)), m2 the running max and l the running sum of
// 2^(s2 - m2). Rows that see no key keep m2 = -inf, l = 0: out = 0, lse = -inf (the kernels
// shift by 0 instead of -inf while a row has seen nothing, so no NaN appears).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define VSD_HD __host__ __device__ __forceinline__
#else
#define VSD_HD inline
#endif

namespace vsd_ext::tree_attn {

constexpr double kLog2eD = 1.4426950408889634;
constexpr double kLn2D = 0.6931471805599453;
constexpr float kLog2e = static_cast<float>(kLog2eD);
constexpr float kLn2 = static_cast<float>(kLn2D);
constexpr int kMaskWordBits = 64;

// Bit j of one node's mask row: is tree node j visible to that node?
VSD_HD bool tree_bit(const int64_t* mask_row, int64_t j) {
  return (static_cast<uint64_t>(mask_row[j >> 6]) >> (j & 63)) & 1u;
}

// Number of 64-bit words of a mask row for n tree nodes.
VSD_HD int64_t mask_words(int64_t n) { return (n + kMaskWordBits - 1) / kMaskWordBits; }

}  // namespace vsd_ext::tree_attn
