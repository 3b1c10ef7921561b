// SIMD for the CPU kernels: one ladder of ISA levels with one way to pick among them, and one exp
// family. Torch-free; included by the CPU kernels only.
//
// ---- Dispatch -------------------------------------------------------------------------------
// The build uses no -march flag, so on x86-64 (GCC / Clang) the hot code is compiled for three
// ISA levels and the best one the CPU supports runs: x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA,
// F16C) and the x86-64 baseline (SSE2). Two forms, one ladder:
//   VSD_SIMD_CLONES     before a function: compiled once per level, the loader picks the best
//                       (target_clones). For plain loops the compiler vectorizes (omp simd).
//   VSD_TARGET_AVX512,  before a function: compiled for that level only, for code written per
//   VSD_TARGET_AVX2     level (intrinsics, register tiles sized to the vector width); simd::isa()
//                       is the CPU's level and simd::pick() the matching variant.
// Elsewhere (other CPUs or compilers) the macros are empty and simd::isa() is kBaseline.
//
// ---- Exp family ------------------------------------------------------------------------------
// e^x and 2^x in float as range reduction, one polynomial and exponent bits, without branches or
// calls so that loops calling them vectorize (fast_exp, fast_exp2; their float64 overloads call
// std::exp / std::exp2, for the float64 paths that gradcheck uses), and the 4 x float64 AVX2 e^x
// of verify_tree (exp4_nonpos).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VSD_SIMD_X86 1
#include <immintrin.h>
#define VSD_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define VSD_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define VSD_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define VSD_SIMD_X86 0
#define VSD_SIMD_CLONES
#define VSD_TARGET_AVX512
#define VSD_TARGET_AVX2
#endif

#define VSD_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace vsd_ext::simd {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };  // baseline, x86-64-v3, -v4

// The best level this CPU supports (detected once).
inline Isa isa() {
#if VSD_SIMD_X86
  static const Isa level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return level;
#else
  return Isa::kBaseline;
#endif
}

// The variant for this CPU's level among per-level variants of one function.
template <class Fn>
Fn pick(Fn avx512, Fn avx2, Fn baseline) {
  switch (isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return baseline;
  }
}

// ---- float e^x and 2^x ------------------------------------------------------------------------

// 2^k for an integral k in [-127, 127] (as a float), written into the exponent bits.
VSD_ALWAYS_INLINE float pow2i(float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

// Round to nearest integer (|x| < 2^22): the 1.5 * 2^23 shifter.
VSD_ALWAYS_INLINE float round_nearest(float x) { return (x + 12582912.0f) - 12582912.0f; }

// e^r for |r| <= ln2 / 2: Cephes' expf polynomial (degree-7 minimax), relative error < 1e-7.
VSD_ALWAYS_INLINE float exp_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// e^x for x <= 88, |rel err| < 1.5e-7 for x >= -87; 0 below (exp(-87) = 1.6e-38, nothing next to
// a softmax sum >= 1); NaN stays NaN. x = k ln2 + r with ln2 split (Cody-Waite) so that k ln2_hi
// is exact.
VSD_ALWAYS_INLINE float fast_exp(float x) {
  const bool under = x < -87.0f;
  float xc = x > 88.0f ? 88.0f : x;
  xc = under ? -87.0f : xc;
  float k = round_nearest(xc * 1.44269504088896341f);
  float r = xc - k * 0.693145751953125f;
  r = r - k * 1.428606765330187045e-06f;
  const float p = exp_reduced(r);
  k = (k >= -127.0f) ? k : -127.0f;  // also maps NaN to a valid exponent; p carries the NaN
  const float v = p * pow2i(k);
  return under ? 0.0f : v;
}

// 2^x for x <= 126; x < -126 (including -inf) gives exactly 0; NaN stays NaN. x = k + f with
// f in [-1/2, 1/2] (exact), 2^f = e^(f ln2); relative error < 1e-7.
VSD_ALWAYS_INLINE float fast_exp2(float x) {
  const float xc = std::min(std::max(x, -126.f), 126.f);
  const float k = round_nearest(xc);
  const float p = exp_reduced((xc - k) * 0.693147180559945309f);
  return x < -126.f ? 0.f : p * pow2i(k);
}

// float64: the exact library functions.
inline double fast_exp(double x) { return std::exp(x); }
inline double fast_exp2(double x) { return std::exp2(x); }

// ---- 4 x float64 e^x (AVX2) -------------------------------------------------------------------
#if VSD_SIMD_X86
// e^y for y <= 0, 4 doubles: e^y = 2^k P(r), k = round(y / ln2) (the 1.5 * 2^52 shifter rounds),
// r = y - k ln2 (Cody-Waite, ln2 split so k * ln2_hi is exact), |r| <= ln2 / 2, P the degree-13
// Taylor polynomial (truncation < 1e-17 relative) in FMA Horner form: about 1 ulp from std::exp.
// y <= -708 (results below the normal range, < 3.3e-308) gives 0.
VSD_TARGET_AVX2 inline __m256d exp4_nonpos(__m256d y) {
  const __m256d lowest = _mm256_set1_pd(-708.0);
  const __m256d yc = _mm256_max_pd(y, lowest);  // also maps -inf to -708
  const __m256d shifter = _mm256_set1_pd(6755399441055744.0);
  const __m256d t = _mm256_fmadd_pd(yc, _mm256_set1_pd(1.4426950408889634074), shifter);
  const __m256d kd = _mm256_sub_pd(t, shifter);
  __m256d r = _mm256_fnmadd_pd(kd, _mm256_set1_pd(6.93147180369123816490e-01), yc);
  r = _mm256_fnmadd_pd(kd, _mm256_set1_pd(1.90821492927058770002e-10), r);
  // clang-format off
  static constexpr double kInvFactorial[] = {
      1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
      1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
      1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
      1.0,                1.0};
  // clang-format on
  __m256d p = _mm256_set1_pd(kInvFactorial[0]);
  for (int i = 1; i < 14; ++i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFactorial[i]));
  const __m256i k = _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_castpd_si256(shifter));
  const __m256d scale =
      _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(k, _mm256_set1_epi64x(1023)), 52));
  return _mm256_and_pd(_mm256_mul_pd(p, scale), _mm256_cmp_pd(y, lowest, _CMP_GT_OQ));
}
#endif

}  // namespace vsd_ext::simd
