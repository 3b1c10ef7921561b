// CPU row kernels of the weighted cross-entropy: per-row statistics (max, sum of exponentials,
// target logit, soft-target sums) and the fused softmax-gradient pass, parallel over rows with
// at::parallel_for (one row per task element: results do not depend on the thread count).
//
// A row is a few vectorized passes over memory that stays in a core's L2 (V = 128k floats is 512
// KiB): statistics = max pass + exp-sum pass; gradient = one exp-and-write pass from the saved lse;
// the fused forward (statistics + unit gradient) stores exp(z - max) in place during the sum pass
// and rescales it, one exp per element. The float loops call the branch-free polynomial
// simd::fast_exp so that they vectorize, and are compiled per ISA level (VSD_SIMD_CLONES; both in
// cpu_simd.h). Float64 rows (gradcheck) use std::exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_simd.h"
#include "weighted_ce_cpu.h"
#include "weighted_ce_math.h"
#include "weighted_ce_rows_cpu.h"

namespace vsd_ext::wce::cpu {

using simd::fast_exp;

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// ---- row maxima and sums of exponentials (declared in weighted_ce_rows_cpu.h) ------------------

VSD_SIMD_CLONES float row_max(const float* x, int64_t n) {
  float m = kNegInfF;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

VSD_SIMD_CLONES float row_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_exp(x[i] - shift);
  return s;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double row_sum_exp(const double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

namespace {

// sum_v e_v and sum_v e_v z_v with e_v = exp(u_v - shift); an entry with e_v = 0 adds nothing
// even where z_v = -inf (mass_times, weighted_ce_math.h).
VSD_SIMD_CLONES void row_sum_exp_dot(const float* u, const float* z, int64_t n, float shift,
                                     float* sum, float* dot) {
  float s = 0.0f, d = 0.0f;
#pragma omp simd reduction(+ : s, d)
  for (int64_t i = 0; i < n; ++i) {
    const float e = fast_exp(u[i] - shift);
    s += e;
    d += mass_times(e, z[i]);
  }
  *sum = s;
  *dot = d;
}

// out_v = a exp(z_v - lse) (out may be z).
VSD_SIMD_CLONES void row_grad(float* out, const float* z, int64_t n, float lse, float a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a * fast_exp(z[i] - lse);
}

// out_v = a exp(z_v - lse) - c exp(u_v - lse_u) (out may be z).
VSD_SIMD_CLONES void row_grad_soft(float* out, const float* z, const float* u, int64_t n, float lse,
                                   float a, float lse_u, float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = a * fast_exp(z[i] - lse) - c * fast_exp(u[i] - lse_u);
  }
}

// x_v = exp(x_v - shift) in place; returns their sum.
VSD_SIMD_CLONES float row_exp_inplace(float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float e = fast_exp(x[i] - shift);
    x[i] = e;
    s += e;
  }
  return s;
}

// x_v = scale x_v - c exp(u_v - lse_u)   (c = 0: plain scaling).
VSD_SIMD_CLONES void row_scale_sub_exp(float* x, const float* u, int64_t n, float scale,
                                       float lse_u, float c) {
  if (u == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = scale * x[i] - c * fast_exp(u[i] - lse_u);
}

// Float64 versions (exact std::exp), same contracts.
void row_sum_exp_dot(const double* u, const double* z, int64_t n, double shift, double* sum,
                     double* dot) {
  double s = 0.0, d = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::exp(u[i] - shift);
    s += e;
    d += mass_times(e, z[i]);
  }
  *sum = s;
  *dot = d;
}
void row_grad(double* out, const double* z, int64_t n, double lse, double a) {
  for (int64_t i = 0; i < n; ++i) out[i] = a * std::exp(z[i] - lse);
}
void row_grad_soft(double* out, const double* z, const double* u, int64_t n, double lse, double a,
                   double lse_u, double c) {
  for (int64_t i = 0; i < n; ++i) out[i] = a * std::exp(z[i] - lse) - c * std::exp(u[i] - lse_u);
}
double row_exp_inplace(double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}
void row_scale_sub_exp(double* x, const double* u, int64_t n, double scale, double lse_u,
                       double c) {
  for (int64_t i = 0; i < n; ++i) x[i] = scale * x[i] - (u ? c * std::exp(u[i] - lse_u) : 0.0);
}

// ---- one row ----------------------------------------------------------------------------------

// The teacher sums of a row: mu, su and d = sum_v exp(u_v - mu) z_v, by RowStats' rules for
// non-finite u (a non-finite max leaves d = 0: the row has no target, or a NaN loss).
template <typename A>
void teacher_sums(const A* u, const A* z, int64_t n, RowStats<A>& st) {
  st.mu = row_max(u, n);
  if (is_finite(st.mu)) {
    row_sum_exp_dot(u, z, n, st.mu, &st.su, &st.d);
  } else {
    st.su = nonfinite_sum(u, n, st.mu);
    st.d = A(0);
  }
}

// Writes lse, soft_lse and the loss of a complete row; returns whether the row is active.
template <typename A>
bool finish_row(const RowStats<A>& st, bool not_ignored, bool soft, A w, A& lse, A* soft_lse,
                A& loss) {
  lse = st.lse();
  const A lse_u = soft ? st.soft_lse() : A(0);
  if (soft) {
    *soft_lse = lse_u;
  }
  const bool active = row_active(not_ignored, soft, lse_u);
  loss = active ? weighted(w, soft ? st.ce_soft() : st.ce_hard()) : A(0);
  return active;
}

// out_v = a exp(z_v - lse) - c y_v over a row (out may be z): y = p from u (soft) or the one-hot
// of t (hard; t = -1 on inactive rows). A term whose coefficient is 0 is skipped, so a teacher
// row without mass (lse_u = -inf) never computes exp(-inf - -inf).
template <typename A>
void row_gradient(A* out, const A* z, const A* u, int64_t n, A lse, A lse_u, RowCoef<A> coef,
                  int64_t t) {
  if (coef.a == A(0) && coef.c == A(0)) {
    std::fill(out, out + n, A(0));
  } else if (u != nullptr && coef.c != A(0)) {
    row_grad_soft(out, z, u, n, lse, coef.a, lse_u, coef.c);
  } else {
    row_grad(out, z, n, lse, coef.a);
    if (u == nullptr && t >= 0) {
      out[t] -= coef.c;
    }
  }
}

// ---- statistics --------------------------------------------------------------------------------

template <typename A>
void stats_impl(const StatsArgs& a) {
  const int64_t rows = a.logits.size(0), n = a.logits.size(1);
  const Rows<A> z_rows(a.logits);
  const bool soft = a.soft.defined();
  const Rows<A> u_rows(soft ? a.soft : a.logits);
  const int64_t* targets = a.targets.data_ptr<int64_t>();
  const A* weights = a.row_weights.data_ptr<A>();
  A* state = a.state.defined() ? a.state.data_ptr<A>() : nullptr;
  A* loss = a.loss.defined() ? a.loss.data_ptr<A>() : nullptr;
  A* lse = a.lse.defined() ? a.lse.data_ptr<A>() : nullptr;
  A* soft_lse = a.soft_lse.defined() ? a.soft_lse.data_ptr<A>() : nullptr;
  const A temperature = static_cast<A>(a.temperature);

  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<A> z_scratch(z_rows.native() ? 0 : n), u_scratch(soft ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      const A* z = z_rows.load(r, z_scratch.data(), n);
      const int64_t t = targets[r];
      const bool not_ignored = t != a.ignore_index;
      RowStats<A> st = RowStats<A>::empty();
      row_max_sum(z, n, st.m, st.s);
      if (!soft && not_ignored && t >= a.col0 && t < a.col0 + n) {
        st.zt = z[t - a.col0];
      }
      if (soft) {
        teacher_sums(u_rows.load(r, u_scratch.data(), n, temperature), z, n, st);
      }
      if (!a.first) {
        RowStats<A> prev = RowStats<A>::load(state + r * RowStats<A>::kFields);
        prev.merge(st);
        st = prev;
      }
      if (!a.last) {
        st.store(state + r * RowStats<A>::kFields);
        continue;
      }
      finish_row(st, not_ignored, soft, weights[r], lse[r], soft ? soft_lse + r : nullptr, loss[r]);
    }
  });
}

// ---- gradient ----------------------------------------------------------------------------------

template <typename A>
void grad_impl(const GradArgs& a) {
  const int64_t rows = a.logits.size(0), n = a.logits.size(1);
  const Rows<A> z_rows(a.logits), out_rows(a.out);
  const bool soft = a.soft.defined();
  const Rows<A> u_rows(soft ? a.soft : a.logits);
  const int64_t* targets = a.targets.data_ptr<int64_t>();
  const A* weights = a.row_weights.data_ptr<A>();
  const A* g = data_or_null<A>(a.grad_loss);
  const A* gl = data_or_null<A>(a.grad_lse);
  const A* lse = a.lse.data_ptr<A>();
  const A* soft_lse = data_or_null<A>(a.soft_lse);
  const A g_default = a.unit_grad_loss ? A(1) : A(0);
  const A temperature = static_cast<A>(a.temperature);

  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<A> z_scratch(z_rows.native() ? 0 : n), u_scratch(soft ? n : 0),
        out_scratch(out_rows.native() ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = targets[r];
      const A lse_u = soft ? soft_lse[r] : A(0);
      const bool active = row_active(t != a.ignore_index, soft, lse_u);
      const auto coef =
          RowCoef<A>::make(active, weights[r], g ? g[r] : g_default, gl ? gl[r] : A(0));
      A* out = out_rows.out_row(r, out_scratch.data());
      const bool zero = coef.a == A(0) && coef.c == A(0);
      const A* z = zero ? nullptr : z_rows.load(r, z_scratch.data(), n);
      const A* u = (zero || !soft) ? nullptr : u_rows.load(r, u_scratch.data(), n, temperature);
      row_gradient(out, z, u, n, lse[r], lse_u, coef, (active && !soft) ? t : int64_t{-1});
      out_rows.store(r, out, n);
    }
  });
}

// Statistics and unit gradient of whole rows in one pass over each row (the fused forward):
// logits in acc dtype, overwritten by G. Per row: soft sums (which need z); max; exp(z - max)
// stored in place with its sum S (one exp per element); then G = (a / S) e - c y. A row whose max
// is not finite (+inf, or all -inf / NaN) takes the general row_gradient instead.
template <typename A>
void stats_grad_impl(const StatsArgs& a, const GradArgs& g) {
  const int64_t rows = a.logits.size(0), n = a.logits.size(1);
  const bool soft = a.soft.defined();
  const Rows<A> u_rows(soft ? a.soft : a.logits);
  const int64_t* targets = a.targets.data_ptr<int64_t>();
  const A* weights = a.row_weights.data_ptr<A>();
  A* z_base = a.logits.data_ptr<A>();
  const int64_t ld = a.logits.stride(0);
  A* loss = a.loss.data_ptr<A>();
  A* lse = a.lse.data_ptr<A>();
  A* soft_lse = soft ? a.soft_lse.data_ptr<A>() : nullptr;
  const A temperature = static_cast<A>(a.temperature);
  const A g_default = g.unit_grad_loss ? A(1) : A(0);

  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<A> u_scratch(soft ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      A* z = z_base + r * ld;
      const int64_t t = targets[r];
      RowStats<A> st = RowStats<A>::empty();
      const A* u = soft ? u_rows.load(r, u_scratch.data(), n, temperature) : nullptr;
      if (soft) {
        teacher_sums(u, z, n, st);
      } else if (t != a.ignore_index) {
        st.zt = z[t];
      }
      st.m = row_max(z, n);
      const bool finite = is_finite(st.m);
      st.s = finite ? row_exp_inplace(z, n, st.m) : nonfinite_sum(z, n, st.m);
      const bool active = finish_row(st, t != a.ignore_index, soft, weights[r], lse[r],
                                     soft ? soft_lse + r : nullptr, loss[r]);
      const auto coef = RowCoef<A>::make(active, weights[r], g_default, A(0));
      const A lse_u = soft ? soft_lse[r] : A(0);
      if (!finite || (coef.a == A(0) && coef.c == A(0))) {
        row_gradient(z, z, u, n, lse[r], lse_u, coef, (active && !soft) ? t : int64_t{-1});
        continue;
      }
      row_scale_sub_exp(z, coef.c != A(0) ? u : nullptr, n, coef.a / st.s, lse_u, coef.c);
      if (!soft && active) {
        z[t] -= coef.c;
      }
    }
  });
}

template <typename A>
void colsum_add_impl(const at::Tensor& g, at::Tensor& out) {
  const int64_t rows = g.size(0), n = g.size(1), ld = g.stride(0);
  const A* src = g.data_ptr<A>();
  A* dst = out.data_ptr<A>();
  constexpr int64_t kBlock = 2048;
  // Each column block is owned by one task and summed over rows in order: deterministic.
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * kBlock, v1 = std::min(n, v0 + kBlock);
      for (int64_t r = 0; r < rows; ++r) {
        const A* row = src + r * ld;
#pragma omp simd
        for (int64_t v = v0; v < v1; ++v) dst[v] += row[v];
      }
    }
  });
}

}  // namespace

void stats(const StatsArgs& a) {
  if (a.loss.scalar_type() == at::kDouble) {
    stats_impl<double>(a);
  } else {
    stats_impl<float>(a);
  }
}

void grad(const GradArgs& a) {
  if (a.lse.scalar_type() == at::kDouble) {
    grad_impl<double>(a);
  } else {
    grad_impl<float>(a);
  }
}

void stats_grad(const StatsArgs& a, const GradArgs& g) {
  TORCH_CHECK(a.first && a.last && !a.state.defined() && g.out.is_same(a.logits) &&
                  a.logits.scalar_type() == a.loss.scalar_type() && a.logits.stride(1) == 1 &&
                  !g.grad_loss.defined() && !g.grad_lse.defined(),
              "weighted_ce: stats_grad expects whole rows of acc-dtype logits overwritten in place "
              "by the unit gradient");
  if (a.loss.scalar_type() == at::kDouble) {
    stats_grad_impl<double>(a, g);
  } else {
    stats_grad_impl<float>(a, g);
  }
}

void colsum_add(const at::Tensor& g, at::Tensor& out) {
  TORCH_CHECK(g.scalar_type() == out.scalar_type() && g.stride(1) == 1 && out.is_contiguous(),
              "weighted_ce: colsum_add expects matching dtypes and unit column strides");
  if (out.scalar_type() == at::kDouble) {
    colsum_add_impl<double>(g, out);
  } else {
    colsum_add_impl<float>(g, out);
  }
}

}  // namespace vsd_ext::wce::cpu
