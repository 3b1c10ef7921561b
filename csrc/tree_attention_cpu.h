// CPU building blocks shared by the tree-attention forward and backward kernels.
//
// Work unit: one (row b, kv head g, node range) of a GQA group. Its G = Hq / Hkv query heads
// share every key, so their queries are packed into one tile of R = nodes * G rows (row
// r = node * G + head; fp32, fp64 for float64 inputs) and each key tile is read (and
// converted) once per group. Tile products are GEMM-shaped ([Lt, D] x [D, R]) and run in the
// register-blocked kernel of tree_attention_gemm_cpu.cpp; softmax bookkeeping runs in SIMD
// loops (tree_attention_softmax_cpu.cpp). The [N, L] score matrix is never materialized beyond
// one [Lt, R] tile.
#pragma once

#include "cpu_simd.h"
#include "tree_attention_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace vsd_ext::tree_attn::cpu {

// Prefix keys per tile: the [R, kKeyTile] score tile and the K/V tiles stay in L2.
constexpr int64_t kKeyTile = 256;

// C[M, N] = (accumulate ? C : 0) + A[M, K] B[K, N]. A element (i, k) is A[i * a_rs + k * a_cs]
// (so A^T is a stride swap); B is row-major (ldb), C row-major (ldc). fp32, or fp64 for
// float64 inputs (tree_attention_gemm_cpu.cpp).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
          const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t a_rs, int64_t a_cs,
          const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate);

// St [n, R] = K Q^T for a key tile K (n rows, ldk apart) and the R packed query rows, given both
// as Q [R, D] and Qt [D, R] (tree_attention_gemm_cpu.cpp). Decode-sized query tiles would leave
// most of the gemm kernel's column block padding, so by R: up to kDotRows one dot product per
// score; below kWideRows the gemm over K^T (keys as columns; `work` holds D * n + R * n
// values); from kWideRows on, the gemm over Qt as above.
constexpr int64_t kDotRows = 6;
constexpr int64_t kWideRows = 32;
void scores(int64_t n, int64_t R, int64_t D, const float* K, int64_t ldk, const float* Q,
            const float* Qt, float* St, float* work);
void scores(int64_t n, int64_t R, int64_t D, const double* K, int64_t ldk, const double* Q,
            const double* Qt, double* St, double* work);

// Score tiles are key-major in the forward and in backward pass A: St [n, R] holds the scores
// of n keys (rows) against the R packed query rows (columns), so per-query softmax statistics
// are vector ops across a key row. The bodies below are generic over the accumulation type A;
// simd::fast_exp2 is a polynomial in fp32 and std::exp2 in fp64 (float64 inputs). The fp32 entry
// points (tree_attention_softmax_cpu.cpp) are compiled per ISA level (VSD_SIMD_CLONES).

// Forward online-softmax step on St [n, R] (in place: St becomes P^T = 2^(St - m')); updates
// the running max m and sum l of every query row and rescales its accumulator row O[r, :D]
// by 2^(m - m'). scratch holds 3 R values.
template <class A>
VSD_ALWAYS_INLINE void softmax_step_impl(A* St, int64_t n, int64_t R, A* m, A* l, A* O, int64_t D,
                                         A* scratch) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  A* m_new = scratch;
  A* shift = scratch + R;
  A* sum = scratch + 2 * R;
  std::copy(m, m + R, m_new);
  for (int64_t j = 0; j < n; ++j) {
    const A* s = St + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) m_new[r] = std::max(m_new[r], s[r]);
  }
  // A row that has seen nothing keeps m' = -inf: shift by 0 so that 2^(-inf - 0) = 0.
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    shift[r] = m_new[r] == kNegInf ? A(0) : m_new[r];
    sum[r] = A(0);
  }
  for (int64_t j = 0; j < n; ++j) {
    A* s = St + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      s[r] = simd::fast_exp2(s[r] - shift[r]);
      sum[r] += s[r];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    // 2^(m - m'): 0 when m = -inf (the row's first keys), 1 while the row saw nothing.
    const A a = m_new[r] == kNegInf ? A(1) : simd::fast_exp2(m[r] - shift[r]);
    l[r] = l[r] * a + sum[r];
    m[r] = m_new[r];
    if (a != A(1)) {
      A* o = O + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= a;
    }
  }
}

// Backward on one key-major tile: St [n, R] (log2-domain scores) becomes P^T = 2^(St - lse2)
// and dPt [n, R] (= V dO^T) becomes dS^T = P^T (dP^T - delta) (delta = rowsum(dO O) - dlse,
// per query column). Query rows that saw no key carry lse2 = +inf: their P and dS are 0.
template <class A>
VSD_ALWAYS_INLINE void softmax_backward_tile_impl(A* St, A* dPt, int64_t n, int64_t R,
                                                  const A* lse2, const A* delta) {
  for (int64_t j = 0; j < n; ++j) {
    A* p = St + j * R;
    A* ds = dPt + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      p[r] = simd::fast_exp2(p[r] - lse2[r]);
      ds[r] = p[r] * (ds[r] - delta[r]);
    }
  }
}

// The same on query-major tiles S, dP [R, n] (rows = packed queries; backward pass B).
template <class A>
VSD_ALWAYS_INLINE void softmax_backward_rows_impl(A* S, A* dP, int64_t R, int64_t n, const A* lse2,
                                                  const A* delta) {
  for (int64_t r = 0; r < R; ++r) {
    A* p = S + r * n;
    A* ds = dP + r * n;
    const A shift = lse2[r], dr = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      p[j] = simd::fast_exp2(p[j] - shift);
      ds[j] = p[j] * (ds[j] - dr);
    }
  }
}

void softmax_step(float* St, int64_t n, int64_t R, float* m, float* l, float* O, int64_t D,
                  float* scratch);
void softmax_backward_tile(float* St, float* dPt, int64_t n, int64_t R, const float* lse2,
                           const float* delta);
void softmax_backward_rows(float* S, float* dP, int64_t R, int64_t n, const float* lse2,
                           const float* delta);

inline void softmax_step(double* St, int64_t n, int64_t R, double* m, double* l, double* O,
                         int64_t D, double* scratch) {
  softmax_step_impl(St, n, R, m, l, O, D, scratch);
}
inline void softmax_backward_tile(double* St, double* dPt, int64_t n, int64_t R, const double* lse2,
                                  const double* delta) {
  softmax_backward_tile_impl(St, dPt, n, R, lse2, delta);
}
inline void softmax_backward_rows(double* S, double* dP, int64_t R, int64_t n, const double* lse2,
                                  const double* delta) {
  softmax_backward_rows_impl(S, dP, R, n, lse2, delta);
}

// Sets the scores (key-major St [n_keys, rows]) of tree keys that a query row's node cannot
// see to -inf: the only mask work. Packed row r belongs to node first_node + r / group.
template <class A>
inline void mask_tree_scores(A* St, int64_t n_keys, int64_t rows, int64_t group, int64_t first_node,
                             const int64_t* mask, int64_t mask_row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* words = mask + (first_node + r / group) * mask_row_stride;
    for (int64_t j = 0; j < n_keys; ++j)
      if (!tree_bit(words, j)) St[j * rows + r] = -std::numeric_limits<A>::infinity();
  }
}

// Accumulation type: fp32 for fp16/bf16/fp32 inputs, fp64 for float64 inputs.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Strided view of a [*, *, *, D] input (last dim contiguous): row (i0, i1, i2) starts at
// p + i0 s0 + i1 s1 + i2 s2.
template <class T>
struct Rows4 {
  T* p;
  int64_t s0, s1, s2;
  T* row(int64_t i0, int64_t i1, int64_t i2) const { return p + i0 * s0 + i1 * s1 + i2 * s2; }
};

template <class T>
Rows4<const T> rows4(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// dst[i, :D] = scale * src rows (fp32 accumulation for fp16/bf16 inputs).
template <class T, class A>
inline void load_rows(const T* src, int64_t src_rs, int64_t rows, int64_t D, A* dst,
                      A scale = A(1)) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = scale * static_cast<A>(src[i * src_rs + d]);
}

// dst [D, R] = src^T for R rows of D values, src_rs apart (default: packed), in 16 x 16 blocks
// that stay in L1 on both sides. Packed query tiles: the row-major right operand of
// St = K Q^T (and V dO^T in the backward), once per work unit; key tiles and score tiles of
// the narrow-query path of `scores`.
template <class A>
inline void transpose(const A* src, int64_t R, int64_t D, A* dst, int64_t src_rs) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < R; r0 += kBlock)
    for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
      const int64_t r1 = std::min(R, r0 + kBlock), d1 = std::min(D, d0 + kBlock);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t d = d0; d < d1; ++d) dst[d * R + r] = src[r * src_rs + d];
    }
}

template <class A>
inline void transpose(const A* src, int64_t R, int64_t D, A* dst) {
  transpose(src, R, D, dst, D);
}

// A [rows, D] tile as a row-major operand of accumulation type A: the input itself (row stride
// src_rs) when it already is of type A, else converted into buf (row stride D).
template <class T, class A>
inline const A* rows_as(const T* src, int64_t src_rs, int64_t rows, int64_t D, A* buf,
                        int64_t& ld) {
  if constexpr (std::is_same_v<T, A>) {
    ld = src_rs;
    return src;
  } else {
    load_rows(src, src_rs, rows, D, buf);
    ld = D;
    return buf;
  }
}

// Tree keys that some node in [n0, n0 + nn) of a row sees: seen[w] = OR of their mask words w.
inline void seen_tree_keys(const int64_t* mask, int64_t mask_row_stride, int64_t n0, int64_t nn,
                           int64_t W, int64_t* seen) {
  std::fill(seen, seen + W, int64_t{0});
  for (int64_t n = n0; n < n0 + nn; ++n)
    for (int64_t w = 0; w < W; ++w) seen[w] |= mask[n * mask_row_stride + w];
}

// The [rows, D] tile of tree keys (or values) 0..rows-1 as rows_as gives it, but with the rows
// of keys that no query sees (a clear bit in `seen`) zeroed: a masked key then contributes
// exactly nothing to the tile GEMMs, not even NaN through 0 * NaN (docs/design/OPS.md).
template <class T, class A>
inline const A* tree_rows_as(const T* src, int64_t src_rs, int64_t rows, int64_t D,
                             const int64_t* seen, A* buf, int64_t& ld) {
  bool all_seen = true;
  for (int64_t j = 0; j < rows && all_seen; ++j) all_seen = tree_bit(seen, j);
  if (all_seen) return rows_as(src, src_rs, rows, D, buf, ld);
  for (int64_t j = 0; j < rows; ++j) {
    if (tree_bit(seen, j))
      load_rows(src + j * src_rs, src_rs, 1, D, buf + j * D);
    else
      std::fill(buf + j * D, buf + (j + 1) * D, A(0));
  }
  ld = D;
  return buf;
}

// Packs the G query-like rows of kv head g for nodes [n0, n0 + nn) of row b: packed row
// (n * G + h) = x[b, n0 + n, g * G + h, :] * scale.
template <class T, class A>
inline void pack_group(const Rows4<const T>& x, int64_t b, int64_t n0, int64_t nn, int64_t g,
                       int64_t G, int64_t D, A* dst, A scale) {
  for (int64_t n = 0; n < nn; ++n)
    load_rows(x.row(b, n0 + n, g * G), x.s2, G, D, dst + n * G * D, scale);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Nodes per work unit: whole rows when B * Hkv units already keep every thread busy, else
// node ranges (of at least ~32 packed rows) so that small batches still use every thread.
inline int64_t nodes_per_unit(int64_t B, int64_t Hkv, int64_t N, int64_t group, int64_t threads) {
  const int64_t units = B * Hkv;
  if (units >= 2 * threads) return N;
  const int64_t want = ceil_div(2 * threads, std::max<int64_t>(units, 1));
  return std::min(N, std::max(ceil_div(32, group), ceil_div(N, want)));
}

// Runs the worker on every thread; units [0, total) are handed out by an atomic counter so
// that a thread slowed by other load does not hold the rest back. make_worker() runs once per
// thread and returns that thread's body(unit) (owning its scratch buffers).
template <class MakeWorker>
void parallel_units(int64_t total, MakeWorker&& make_worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), total);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto body = make_worker();
    for (int64_t unit = next.fetch_add(1); unit < total; unit = next.fetch_add(1)) body(unit);
  });
}

}  // namespace vsd_ext::tree_attn::cpu
