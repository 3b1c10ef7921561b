// verify_tree CPU kernel: the O(V) passes over one row (max + finiteness check,
// e = exp((x - M) / T) with its sum, draft_probs load, inverse-CDF draw, sampled-mode residual).
// Each pass has a portable scalar loop and, on x86-64 CPUs of level x86-64-v3 (AVX2 + FMA + F16C,
// checked at run time; cpu_simd.h), a vectorized one; both apply the per-element formulas of
// verify_tree_math.h (the AVX2 exp is a polynomial within 1 ulp of std::exp), so decisions agree
// except on measure-zero ties.
// Included by verify_tree_cpu.cpp only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_simd.h"
#include "verify_tree_math.h"

namespace vsd_ext::verify::cpu {

// Max of a logits row in float (exact for every input dtype). False when the row holds NaN or
// +inf, or has no finite entry.
template <typename L>
bool row_max_scalar(const L* x, int64_t begin, int64_t end, float& max_io, bool ok) {
  float m = max_io;
  for (int64_t v = begin; v < end; ++v) {
    const float xv = static_cast<float>(x[v]);
    ok = ok && xv < std::numeric_limits<float>::infinity();  // false for NaN
    m = xv > m ? xv : m;
  }
  max_io = m;
  return ok;
}

// e(v) = exp((x_v - M) / T) into `e`; returns S = sum_v e(v) (>= 1: the max contributes 1).
template <typename L>
double fill_exp_scalar(const L* x, int64_t begin, int64_t end, double max_logit, double temperature,
                       double* e) {
  double total = 0.0;
  for (int64_t v = begin; v < end; ++v) {
    const double xv = static_cast<double>(static_cast<float>(x[v]));
    const double ev = exp_term(xv, max_logit, temperature);
    e[v] = ev;
    total += ev;
  }
  return total;
}

#if VSD_SIMD_X86
// The AVX2 versions of the passes (x86-64-v3, chosen at run time): 8 floats or 4 doubles at a
// time; e(v) through simd::exp4_nonpos.
VSD_TARGET_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
VSD_TARGET_AVX2 inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
VSD_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* x) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

template <typename L>
VSD_TARGET_AVX2 bool row_max_avx2(const L* x, int64_t vocab, float& max_out) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 bad = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) {
    const __m256 xv = load8(x + v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(xv, inf, _CMP_NLT_UQ));  // NaN or +inf
    m = _mm256_max_ps(m, xv);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float mx = lanes[0];
  for (int i = 1; i < 8; ++i) mx = lanes[i] > mx ? lanes[i] : mx;
  const bool ok = row_max_scalar(x, v, vocab, mx, _mm256_movemask_ps(bad) == 0);
  max_out = mx;
  return ok;
}

VSD_TARGET_AVX2 inline __m256d load4(const float* x) { return _mm256_cvtps_pd(_mm_loadu_ps(x)); }
VSD_TARGET_AVX2 inline __m256d load4(const c10::Half* x) {
  return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}
VSD_TARGET_AVX2 inline __m256d load4(const c10::BFloat16* x) {
  const __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(h, 16)));
}

template <typename L>
VSD_TARGET_AVX2 double fill_exp_avx2(const L* x, int64_t vocab, double max_logit,
                                     double temperature, double* e) {
  const __m256d m = _mm256_set1_pd(max_logit), t = _mm256_set1_pd(temperature);
  __m256d acc = _mm256_setzero_pd();
  int64_t v = 0;
  for (; v + 4 <= vocab; v += 4) {
    const __m256d ev = simd::exp4_nonpos(_mm256_div_pd(_mm256_sub_pd(load4(x + v), m), t));
    _mm256_storeu_pd(e + v, ev);
    acc = _mm256_add_pd(acc, ev);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, acc);
  const double tail = fill_exp_scalar(x, v, vocab, max_logit, temperature, e);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail;
}

inline bool cpu_has_avx2() { return simd::isa() >= simd::Isa::kAvx2; }
#endif

template <typename L>
bool row_max(const L* x, int64_t vocab, float& max_out) {
  max_out = -std::numeric_limits<float>::infinity();
  bool ok;
#if VSD_SIMD_X86
  if (cpu_has_avx2()) {
    ok = row_max_avx2(x, vocab, max_out);
  } else {
    ok = row_max_scalar(x, 0, vocab, max_out, true);
  }
#else
  ok = row_max_scalar(x, 0, vocab, max_out, true);
#endif
  return ok && max_out > -std::numeric_limits<float>::infinity();
}

template <typename L>
double fill_exp(const L* x, int64_t vocab, double max_logit, double temperature, double* e) {
#if VSD_SIMD_X86
  if (cpu_has_avx2()) return fill_exp_avx2(x, vocab, max_logit, temperature, e);
#endif
  return fill_exp_scalar(x, 0, vocab, max_logit, temperature, e);
}

// A draft_probs row as float64 into `q`; false unless finite, nonnegative, with a positive sum.
template <typename Q>
bool load_q(const Q* row, int64_t vocab, double* q, double& total) {
  bool ok = true;
  double sum = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double qv = static_cast<double>(static_cast<float>(row[v]));
    ok = ok && qv >= 0.0 && qv < std::numeric_limits<double>::infinity();
    q[v] = qv;
    sum += qv;
  }
  total = sum;
  return ok && sum > 0.0;
}

// Sum of w[begin, end) with four interleaved accumulators (vectorizable).
inline double block_sum(const double* w, int64_t begin, int64_t end) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t v = begin;
  for (; v + 4 <= end; v += 4) {
    for (int i = 0; i < 4; ++i) acc[i] += w[v + i];
  }
  for (; v < end; ++v) acc[0] += w[v];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Inverse CDF with uniform u of the unnormalized weights w: the smallest v with w(v) > 0 and
// cumsum(w)[v] > u * sum(w); if rounding leaves none, the largest v with w(v) > 0; -1 when w has
// no mass. Zero-weight tokens are never drawn. The cumsum is taken per block of 256 entries
// (block totals, then a sequential scan inside the one block where the threshold falls).
inline int64_t inverse_cdf(const double* w, int64_t vocab, double u) {
  constexpr int64_t kBlock = 256;
  const double threshold = u * block_sum(w, 0, vocab);
  double acc = 0.0;
  for (int64_t lo = 0; lo < vocab; lo += kBlock) {
    const int64_t hi = std::min(vocab, lo + kBlock);
    const double block = block_sum(w, lo, hi);
    if (acc + block > threshold) {
      double prefix = acc;
      for (int64_t v = lo; v < hi; ++v) {
        if (w[v] > 0.0) {
          prefix += w[v];
          if (prefix > threshold) return v;
        }
      }
    }
    acc += block;
  }
  int64_t last = vocab - 1;
  while (last >= 0 && !(w[last] > 0.0)) --last;
  return last;
}

// One sampled-mode rejection: out(v) = residual_step(r(v), R, q(v), Q); returns sum_v out(v).
inline double residual_scalar(const double* r, const double* q, int64_t begin, int64_t end,
                              double r_total, double q_total, double* out) {
  double sum = 0.0;
  for (int64_t v = begin; v < end; ++v) {
    out[v] = residual_step(r[v], r_total, q[v], q_total);
    sum += out[v];
  }
  return sum;
}

#if VSD_SIMD_X86
// Same per-element operations as residual_step (max(r / R - q / Q, 0); +0.0 on ties).
VSD_TARGET_AVX2 inline double residual_avx2(const double* r, const double* q, int64_t vocab,
                                            double r_total, double q_total, double* out) {
  const __m256d rt = _mm256_set1_pd(r_total), qt = _mm256_set1_pd(q_total);
  const __m256d zero = _mm256_setzero_pd();
  __m256d acc = zero;
  int64_t v = 0;
  for (; v + 4 <= vocab; v += 4) {
    const __m256d qn = q_total > 0.0 ? _mm256_div_pd(_mm256_loadu_pd(q + v), qt) : zero;
    const __m256d rn = _mm256_div_pd(_mm256_loadu_pd(r + v), rt);
    const __m256d d = _mm256_max_pd(_mm256_sub_pd(rn, qn), zero);
    _mm256_storeu_pd(out + v, d);
    acc = _mm256_add_pd(acc, d);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, acc);
  const double tail = residual_scalar(r, q, v, vocab, r_total, q_total, out);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail;
}
#endif

inline double residual(const double* r, const double* q, int64_t vocab, double r_total,
                       double q_total, double* out) {
#if VSD_SIMD_X86
  if (cpu_has_avx2()) return residual_avx2(r, q, vocab, r_total, q_total, out);
#endif
  return residual_scalar(r, q, 0, vocab, r_total, q_total, out);
}

}  // namespace vsd_ext::verify::cpu
