// CPU row kernels of the divergence terms (weighted_linear_divergence; math and gradient in
// weighted_ce_div_math.h), parallel over rows with at::parallel_for (one row per task element:
// results do not depend on the thread count).
//
// A row of chunk logits (acc dtype: the CPU GEMMs run in fp32 / fp64) is read three times while
// it is hot in a core's cache: (1) max and exp-sums of z and of u = s / T (the teacher row is
// converted once into a per-thread scratch row), (2) beta, Q_< and KL, (3) the gradient, written in
// place over z. The float loops call simd::fast_exp so that they vectorize and are compiled per
// ISA level (VSD_SIMD_CLONES, cpu_simd.h); float64 rows (gradcheck) use std::exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_simd.h"
#include "weighted_ce_cpu.h"
#include "weighted_ce_div_math.h"
#include "weighted_ce_rows_cpu.h"

namespace vsd_ext::wce::cpu {
namespace {

struct FastExp {
  float operator()(float x) const { return simd::fast_exp(x); }
  double operator()(double x) const { return std::exp(x); }
};

// Pass 2: the sums of DivSums::term over the row.
VSD_SIMD_CLONES DivSums<float> div_sums(const float* z, const float* u, int64_t n, float lse_z,
                                        float lse_u) {
  float beta = 0.0f, q_less = 0.0f, kl = 0.0f;
#pragma omp simd reduction(+ : beta, q_less, kl)
  for (int64_t i = 0; i < n; ++i) {
    const DivSums<float> t = DivSums<float>::term(z[i] - lse_z, u[i] - lse_u, FastExp{});
    beta += t.beta;
    q_less += t.q_less;
    kl += t.kl;
  }
  return {beta, q_less, kl};
}

DivSums<double> div_sums(const double* z, const double* u, int64_t n, double lse_z, double lse_u) {
  DivSums<double> s = DivSums<double>::zero();
  for (int64_t i = 0; i < n; ++i)
    s.add(DivSums<double>::term(z[i] - lse_z, u[i] - lse_u, FastExp{}));
  return s;
}

// Pass 3: out_v = dL/dz_v (out may be z).
VSD_SIMD_CLONES void div_grad_row(float* out, const float* z, const float* u, int64_t n,
                                  float lse_z, float lse_u, const DivCoef<float>& c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = c.grad(z[i] - lse_z, u[i] - lse_u, FastExp{});
}

void div_grad_row(double* out, const double* z, const double* u, int64_t n, double lse_z,
                  double lse_u, const DivCoef<double>& c) {
  for (int64_t i = 0; i < n; ++i) out[i] = c.grad(z[i] - lse_z, u[i] - lse_u, FastExp{});
}

// The per-row statistics of DivArgs, for row r.
template <typename A>
struct DivRowPointers {
  A *loss, *beta, *kl, *lse, *soft_lse, *q_less;
  const A *tv_w, *kl_w, *grad_loss;

  explicit DivRowPointers(const DivArgs& a)
      : loss(ptr_or_null<A>(a.loss)),
        beta(ptr_or_null<A>(a.beta)),
        kl(ptr_or_null<A>(a.kl)),
        lse(ptr_or_null<A>(a.lse)),
        soft_lse(ptr_or_null<A>(a.soft_lse)),
        q_less(ptr_or_null<A>(a.q_less)),
        tv_w(a.tv_weights.data_ptr<A>()),
        kl_w(a.kl_weights.data_ptr<A>()),
        grad_loss(data_or_null<A>(a.grad_loss)) {}

  template <typename T>
  static T* ptr_or_null(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
  }
};

// Passes 1 and 2 of row r: writes loss, beta, kl, lse, soft_lse and q_less.
template <typename A>
void row_stats(const DivRowPointers<A>& p, int64_t r, const A* z, const A* u, int64_t n) {
  const A lse_z = row_lse(z, n), lse_u = row_lse(u, n);
  const DivSums<A> sums =
      div_defined(lse_z, lse_u) ? div_sums(z, u, n, lse_z, lse_u) : DivSums<A>::zero();
  const DivRow<A> row = DivRow<A>::make(lse_z, lse_u, sums, p.tv_w[r], p.kl_w[r]);
  p.loss[r] = row.loss;
  p.beta[r] = row.beta;
  p.kl[r] = row.kl;
  p.lse[r] = lse_z;
  p.soft_lse[r] = lse_u;
  p.q_less[r] = row.q_less;
}

// Pass 3 of row r from its statistics (just written, or saved by the forward).
template <typename A>
void row_grad(const DivRowPointers<A>& p, A g_default, int64_t r, const A* z, const A* u, int64_t n,
              A* out) {
  const A g = p.grad_loss ? p.grad_loss[r] : g_default;
  const auto c =
      DivCoef<A>::make(g, p.tv_w[r], p.kl_w[r], p.lse[r], p.soft_lse[r], p.q_less[r], p.kl[r]);
  if (c.zero_row || c.nan_row) {
    std::fill(out, out + n, c.zero_row ? A(0) : std::numeric_limits<A>::quiet_NaN());
  } else {
    div_grad_row(out, z, u, n, p.lse[r], p.soft_lse[r], c);
  }
}

template <typename A>
void div_impl(const DivArgs& a, bool stats, bool grad) {
  const int64_t rows = a.logits.size(0), n = a.logits.size(1);
  TORCH_CHECK(a.logits.scalar_type() == c10::CppTypeToScalarType<A>::value &&
                  a.logits.stride(1) == 1 && (!grad || a.out.is_same(a.logits)),
              "weighted_ce: the CPU divergence kernels take acc-dtype logits, overwritten in place "
              "by the gradient");
  A* z_base = a.logits.data_ptr<A>();
  const int64_t ld = a.logits.stride(0);
  const Rows<A> u_rows(a.teacher);
  const DivRowPointers<A> p(a);
  const A temperature = static_cast<A>(a.temperature);
  const A g_default = a.unit_grad_loss ? A(1) : A(0);

  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<A> u_scratch(n);
    for (int64_t r = begin; r < end; ++r) {
      A* z = z_base + r * ld;
      const A* u = u_rows.load(r, u_scratch.data(), n, temperature);
      if (stats) {
        row_stats(p, r, z, u, n);
      }
      if (grad) {
        row_grad(p, g_default, r, z, u, n, z);
      }
    }
  });
}

void dispatch(const DivArgs& a, bool stats, bool grad) {
  if (a.tv_weights.scalar_type() == at::kDouble) {
    div_impl<double>(a, stats, grad);
  } else {
    div_impl<float>(a, stats, grad);
  }
}

}  // namespace

void div_stats(const DivArgs& a) { dispatch(a, true, false); }
void div_grad(const DivArgs& a) { dispatch(a, false, true); }
void div_stats_grad(const DivArgs& a) { dispatch(a, true, true); }

}  // namespace vsd_ext::wce::cpu
