// What the CPU row kernels of the weighted cross-entropy family share (weighted_ce_rows_cpu.cpp,
// weighted_ce_div_rows_cpu.cpp): typed access to rows of any float dtype in acc dtype, and the
// vectorized row maxima and sums of exponentials.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "weighted_ce_math.h"

namespace vsd_ext::wce::cpu {

// max_v x_v and sum_v exp(x_v - shift); float versions vectorized per
// ISA level (cpu_simd.h), float64 ones with std::exp.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);
float row_sum_exp(const float* x, int64_t n, float shift);
double row_sum_exp(const double* x, int64_t n, double shift);

// sum_v exp(x_v - m) for a non-finite row max m, by RowStats' rules (weighted_ce_math.h): the
// number of +inf entries for m = +inf, 0 for m = -inf (every entry -inf), NaN when an entry is
// NaN (whatever m the vectorized max made of it).
template <typename A>
A nonfinite_sum(const A* x, int64_t n, A m) {
  A s = A(0);
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] != x[i]) {
      return std::numeric_limits<A>::quiet_NaN();
    }
    s += (m == -neg_inf<A>() && x[i] == m) ? A(1) : A(0);
  }
  return m == m ? s : std::numeric_limits<A>::quiet_NaN();
}

// The max m of a row and s = sum_v exp(x_v - m), exact for non-finite entries as RowStats.
template <typename A>
void row_max_sum(const A* x, int64_t n, A& m, A& s) {
  m = row_max(x, n);
  s = is_finite(m) ? row_sum_exp(x, n, m) : nonfinite_sum(x, n, m);
}

// log sum_v exp(x_v): +inf with a +inf entry, -inf when every entry is -inf, NaN with a NaN one.
template <typename A>
A row_lse(const A* x, int64_t n) {
  A m, s;
  row_max_sum(x, n, m, s);
  return m + std::log(s);
}

// ---- typed row access: rows of any float dtype are read as (or converted to) acc dtype A ------

template <typename A, typename S>
void convert_row(const void* src, A* dst, int64_t n, A divisor) {
  const S* s = static_cast<const S*>(src);
  if (divisor == A(1)) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(s[i]) / divisor;
  }
}

template <typename A, typename D>
void store_row_as(const A* src, void* dst, int64_t n) {
  D* d = static_cast<D*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<D>(src[i]);
}

// A [rows, n] matrix with unit column stride, read row by row in acc dtype A.
template <typename A>
struct Rows {
  char* base = nullptr;
  int64_t stride_bytes = 0;
  at::ScalarType dtype = at::kFloat;

  explicit Rows(const at::Tensor& t)
      : base(static_cast<char*>(t.data_ptr())),
        stride_bytes(t.stride(0) * static_cast<int64_t>(t.element_size())),
        dtype(t.scalar_type()) {}

  bool native() const { return dtype == c10::CppTypeToScalarType<A>::value; }
  void* ptr(int64_t r) const { return base + r * stride_bytes; }

  // Row r divided by `divisor`, pointing into the tensor when no conversion is needed.
  const A* load(int64_t r, A* scratch, int64_t n, A divisor = A(1)) const {
    if (native() && divisor == A(1)) {
      return static_cast<const A*>(ptr(r));
    }
    switch (dtype) {
      case at::kFloat: convert_row<A, float>(ptr(r), scratch, n, divisor); break;
      case at::kDouble: convert_row<A, double>(ptr(r), scratch, n, divisor); break;
      case at::kHalf: convert_row<A, c10::Half>(ptr(r), scratch, n, divisor); break;
      case at::kBFloat16: convert_row<A, c10::BFloat16>(ptr(r), scratch, n, divisor); break;
      default: TORCH_CHECK(false, "weighted_ce: unsupported dtype ", dtype);
    }
    return scratch;
  }

  // Where to compute row r in acc dtype: in place when native, else in `scratch` (then store()).
  A* out_row(int64_t r, A* scratch) const { return native() ? static_cast<A*>(ptr(r)) : scratch; }

  void store(int64_t r, const A* row, int64_t n) const {
    if (native()) {
      return;
    }
    switch (dtype) {
      case at::kFloat: store_row_as<A, float>(row, ptr(r), n); break;
      case at::kDouble: store_row_as<A, double>(row, ptr(r), n); break;
      case at::kHalf: store_row_as<A, c10::Half>(row, ptr(r), n); break;
      case at::kBFloat16: store_row_as<A, c10::BFloat16>(row, ptr(r), n); break;
      default: TORCH_CHECK(false, "weighted_ce: unsupported dtype ", dtype);
    }
  }
};

template <typename A>
const A* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

inline int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
}

}  // namespace vsd_ext::wce::cpu
