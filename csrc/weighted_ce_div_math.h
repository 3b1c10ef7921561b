// Torch-free math of the divergence terms (weighted_linear_divergence, docs/design/OPS.md section
// 4), shared by the CPU kernels (weighted_ce_div_rows_cpu.cpp) and the CUDA kernels
// (cuda/weighted_ce_div_kernel.cu). Everything here is per row and per element.
//
// One row (V classes): drafter logits z (h . W_v + b_v), teacher logits s, temperature T,
//   u_v = s_v / T,  q = softmax(z),  p = softmax(u),
//   log q_v = z_v - lse_z,  log p_v = u_v - lse_u       (lse: log-sum-exp of the row)
//   beta    = sum_v min(p_v, q_v)         the acceptance mass: the probability that one draft from
//   q
//                                         is accepted by lossless speculative sampling against p
//   1 - beta = TV(p, q) = (1/2) sum_v |p_v - q_v|
//   KL      = KL(q || p) = sum_v q_v (log q_v - log p_v)      (classes with z_v = -inf count 0)
//   loss    = w_tv (1 - beta) + w_kl KL                       (a zero weight makes its term 0)
//
// Gradient. With dq_v / dz_u = q_v (delta_uv - q_u):
//   beta: d min(p_v, q_v) / d q_v = 1[q_v < p_v] (a tie q_v = p_v takes the p branch: the strict
//         inequality), so with Q_< = sum_{v: q_v < p_v} q_v
//           d beta / d z_u = sum_v 1[q_v < p_v] q_v (delta_uv - q_u) = q_u (1[q_u < p_u] - Q_<)
//           d (1 - beta) / d z_u = -q_u (1[q_u < p_u] - Q_<)
//   KL:   d KL / d q_v = log q_v - log p_v + 1, and sum_v q_v (delta_uv - q_u) (log q_v - log p_v
//         + 1) = q_u (log q_u - log p_u + 1) - q_u (KL + 1), so
//           d KL / d z_u = q_u (log q_u - log p_u - KL)
//   dL/dz_u = g q_u [-w_tv (1[q_u < p_u] - Q_<) + w_kl (log q_u - log p_u - KL)]
// (g: the upstream gradient of loss_rows[m]). In log space throughout: q_u < p_u is
// log q_u < log p_u, min(p_u, q_u) = exp(min(log p_u, log q_u)), and a teacher probability that
// underflows keeps its finite log p_u.
//
// A row takes three passes over its logits: (1) lse_z and lse_u (RowStats, weighted_ce_math.h);
// (2) beta, Q_< and KL (DivSums); (3) the gradient (DivCoef). Chunks hold whole rows, so passes 2
// and 3 read a row that pass 1 just brought into cache.
//
// Non-finite inputs (docs/design/OPS.md): the divergence of a row is defined when lse_z and lse_u
// are finite (no +inf or NaN logit on either side, and some mass on both). A class with
// z_v = -inf has q_v = 0 and counts 0; a class with u_v = -inf has p_v = 0, so q_v > 0 there gives
// KL = +inf (and a non-finite gradient where w_kl != 0). A teacher row without mass (lse_u = -inf)
// has no target: loss 0, no gradient. Any other undefined row: beta = KL = NaN, loss NaN where a
// weight is nonzero, and a NaN gradient.
#pragma once

#include "weighted_ce_math.h"

namespace vsd_ext::wce {

// exp_ as a function object (the CUDA kernels' exponential for DivSums::term and DivCoef::grad).
struct StdExp {
  template <typename A>
  VSD_HD A operator()(A x) const {
    return exp_(x);
  }
};

// Pass 2: the sums of one row, or of a subset of its classes (two subsets add).
template <typename A>
struct DivSums {
  A beta, q_less, kl;

  VSD_HD static DivSums zero() { return {A(0), A(0), A(0)}; }

  // The share of class v: lq = log q_v, lp = log p_v (<= 0, -inf for a masked class, never NaN in
  // a defined row). A class with lq = -inf adds nothing; one with lq > -inf = lp makes KL = +inf.
  // `exp` is the device's exponential (on the CPU a vectorizable one); selects, no branches.
  template <typename Exp>
  VSD_HD static DivSums term(A lq, A lp, Exp exp) {
    const A q = exp(lq);  // 0 for a masked class
    const bool less = lq < lp;
    const A kl = lq == neg_inf<A>() ? A(0) : lp == neg_inf<A>() ? -neg_inf<A>() : q * (lq - lp);
    return {exp(less ? lq : lp), less ? q : A(0), kl};
  }

  VSD_HD void add(const DivSums& o) {
    beta += o.beta;
    q_less += o.q_less;
    kl += o.kl;
  }
};

// Whether the divergence of a row with these log-sum-exps is defined (both finite).
template <typename A>
VSD_HD bool div_defined(A lse_z, A lse_u) {
  return is_finite(lse_z) && is_finite(lse_u);
}

// The outputs of one complete row from its log-sum-exps and sums.
template <typename A>
struct DivRow {
  A loss, beta, kl, q_less;

  VSD_HD static DivRow make(A lse_z, A lse_u, const DivSums<A>& s, A w_tv, A w_kl) {
    if (lse_u == neg_inf<A>()) {  // a teacher without mass: no target
      return {A(0), nan_<A>(), nan_<A>(), nan_<A>()};
    }
    if (!div_defined(lse_z, lse_u)) {
      return {weighted(w_tv, nan_<A>()) + weighted(w_kl, nan_<A>()), nan_<A>(), nan_<A>(),
              nan_<A>()};
    }
    return {weighted(w_tv, A(1) - s.beta) + weighted(w_kl, s.kl), s.beta, s.kl, s.q_less};
  }
};

// Pass 3: dL/dz_v of one row from its saved statistics. tv = g w_tv and kl = g w_kl, each exactly
// 0 when its weight is 0 (so an infinite KL with w_kl = 0 stays out).
template <typename A>
struct DivCoef {
  A tv, kl, q_less, kl_value;
  bool zero_row;  // no gradient: both weights 0, or a teacher without mass
  bool nan_row;   // a gradient of an undefined row: NaN

  VSD_HD static DivCoef make(A g, A w_tv, A w_kl, A lse_z, A lse_u, A q_less, A kl_value) {
    DivCoef c{weighted(w_tv, g), weighted(w_kl, g), q_less, kl_value, false, false};
    c.zero_row = (c.tv == A(0) && c.kl == A(0)) || lse_u == neg_inf<A>();
    c.nan_row = !c.zero_row && !div_defined(lse_z, lse_u);
    return c;
  }

  // dL/dz_v for lq = log q_v, lp = log p_v of a row that is neither zero_row nor nan_row; exactly
  // 0 for a masked class (lq = -inf). Selects, no branches.
  template <typename Exp>
  VSD_HD A grad(A lq, A lp, Exp exp) const {
    const A tv_part = -tv * ((lq < lp ? A(1) : A(0)) - q_less);
    const A kl_part = kl == A(0) ? A(0) : kl * (lq - lp - kl_value);
    return lq == neg_inf<A>() ? A(0) : exp(lq) * (tv_part + kl_part);
  }
};

}  // namespace vsd_ext::wce
