// Torch-free math of the weighted cross-entropy, shared by the CPU kernels
// (weighted_ce_rows_cpu.cpp) and the CUDA kernels (cuda/weighted_ce_kernel.cu). Everything here
// is per row and per element.
//
// Notation for one row m (V vocabulary entries):
//   z_v            drafter logits (for the fused op: h_m . W_v + b_v)
//   lse            log sum_v exp(z_v)
//   u_v = s_v / T  teacher logits over the soft temperature (soft targets only)
//   p_v            softmax(u)_v = exp(u_v - lse_u),  lse_u = log sum_v exp(u_v)
//   CE (hard)      lse - z_t
//   CE (soft)      -sum_v p_v log softmax(z)_v = lse - sum_v p_v z_v      (sum_v p_v = 1)
//   loss_rows[m]   w_m * CE_m on active rows (t_m != ignore_index and, with soft targets, a
//                  teacher with mass), 0 on the others and where w_m = 0
//
// Gradient. With g_m = dL/dloss_rows[m] and gl_m = dL/dlse[m] (upstream gradients):
//   dL/dz_v = g_m w_m [active] (softmax(z)_v - y_v) + gl_m softmax(z)_v
//           = a_m exp(z_v - lse) - c_m y_v,      c_m = g_m w_m [active],  a_m = c_m + gl_m,
// with y = one-hot(t) (hard) or p (soft). The op never forms softmax(z) as a tensor: the gradient
// element is computed directly from z and the row's lse.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "host_device.h"

namespace vsd_ext::wce {

template <typename A>
VSD_HD A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Overloaded exp/log: the float versions in float, the double versions in double, on host and
// device alike.
template <typename A>
VSD_HD A exp_(A x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

template <typename A>
VSD_HD A log_(A x) {
#ifdef __CUDA_ARCH__
  return log(x);
#else
  return std::log(x);
#endif
}

template <typename A>
VSD_HD A nan_() {
  return std::numeric_limits<A>::quiet_NaN();
}

// x is neither infinite nor NaN (torch-free, host and device).
template <typename A>
VSD_HD bool is_finite(A x) {
  return x - x == A(0);
}

// w * x, exactly 0 when w = 0: a term of weight 0 adds nothing, even where x is inf or NaN.
template <typename A>
VSD_HD A weighted(A w, A x) {
  return w == A(0) ? A(0) : w * x;
}

// e * z for a probability weight e >= 0: exactly 0 where e = 0, even where z = -inf (0 log 0 = 0:
// a teacher entry of probability 0, or one whose weight underflowed, adds nothing). A NaN e stays
// NaN. The one guarded product of the soft-target sums, on both devices.
template <typename A>
VSD_HD A mass_times(A e, A z) {
  return e == A(0) ? A(0) : e * z;
}

// Running statistics of one row over a subset of its vocabulary (one thread's elements, one
// vocabulary tile, or the whole row). Two disjoint subsets merge exactly (up to rounding), so a
// row can be streamed in any number of vocabulary tiles (online log-sum-exp).
//
// Non-finite logits (docs/design/OPS.md) are exact: a -inf entry adds nothing, +inf entries make
// the max +inf and each adds 1 (exp(inf - inf) would be NaN), a NaN entry makes the sum NaN. So
// lse() is +inf with a +inf logit, -inf for an all -inf row, NaN with a NaN logit, as
// torch.logsumexp; ce_hard() / ce_soft() are NaN for a row with a +inf logit on either side.
template <typename A>
struct RowStats {
  A m;   // max of z over the subset (-inf when empty)
  A s;   // sum of exp(z - m)
  A zt;  // z at the hard target if it lies in the subset, else 0
  A mu;  // soft targets: max of u
  A su;  // sum of exp(u - mu)
  A d;   // sum of exp(u - mu) * z   (so that sum_v p_v z_v = d / su once the row is complete)

  static constexpr int kFields = 6;

  // The fields as kFields values in a row of the statistics state (or of shared memory).
  VSD_HD static RowStats load(const A* f) { return {f[0], f[1], f[2], f[3], f[4], f[5]}; }
  VSD_HD void store(A* f) const {
    f[0] = m;
    f[1] = s;
    f[2] = zt;
    f[3] = mu;
    f[4] = su;
    f[5] = d;
  }

  VSD_HD static RowStats empty() { return {neg_inf<A>(), A(0), A(0), neg_inf<A>(), A(0), A(0)}; }

  // exp(m - mx) rescales a sum kept at max m to the max mx >= m; 1 when they are equal, also
  // for equal infinities.
  VSD_HD static A rescale(A m, A mx) { return m == mx ? A(1) : exp_(m - mx); }

  // Adds x to the running max mx and sum sx of exp(x - mx): the online log-sum-exp update
  // (Milakov & Gimelshein) with the non-finite cases above. Returns the weight exp(x - mx) of x
  // after the update and sets r to the factor the earlier sum was rescaled by.
  VSD_HD static A push(A& mx, A& sx, A x, A& r) {
    r = A(1);
    if (x > mx) {  // also a first +inf; exp(-inf - x) is 0
      r = exp_(mx - x);
      sx = sx * r + A(1);
      mx = x;
      return A(1);
    }
    if (x == neg_inf<A>()) {
      return A(0);
    }
    const A e = rescale(x, mx);  // 1 for an entry equal to the max; NaN for a NaN x
    sx += e;
    return e;
  }

  // Adds one logit.
  VSD_HD void push_logit(A z) {
    A r;
    push(m, s, z, r);
  }

  // Adds one teacher logit u (the teacher sums only: the divergence needs no d).
  VSD_HD void push_teacher(A u) {
    A r;
    push(mu, su, u, r);
  }

  // Adds one (teacher, drafter) pair. A teacher entry u = -inf has p = 0 and adds nothing; every
  // product of a teacher weight (which may be or underflow to 0) with z goes through mass_times,
  // so a drafter -inf never meets a zero weight as 0 * -inf.
  VSD_HD void push_soft(A u, A z) {
    A r;
    const A e = push(mu, su, u, r);
    d = mass_times(r, d) + mass_times(e, z);
  }

  // Merges the statistics of a disjoint subset.
  VSD_HD void merge(const RowStats& o) {
    merge_pair(m, s, o.m, o.s, nullptr, A(0));
    merge_pair(mu, su, o.mu, o.su, &d, o.d);
    zt += o.zt;
  }

  // Two empty subsets (both maxima -inf) add their sums, 0 or NaN: a NaN is never dropped.
  VSD_HD static void merge_pair(A& m1, A& s1, A m2, A s2, A* d1, A d2) {
    const A mx = m1 > m2 ? m1 : m2;
    const A r1 = rescale(m1, mx), r2 = rescale(m2, mx);
    s1 = s1 * r1 + s2 * r2;
    if (d1 != nullptr) {
      *d1 = mass_times(r1, *d1) + mass_times(r2, d2);
    }
    m1 = mx;
  }

  VSD_HD A lse() const { return m + log_(s); }
  VSD_HD A soft_lse() const { return mu + log_(su); }
  // Cross-entropy of the complete row (NaN where a +inf logit leaves no distribution).
  VSD_HD A ce_hard() const {
    const A l = lse();
    return l == -neg_inf<A>() ? nan_<A>() : l - zt;
  }
  VSD_HD A ce_soft() const {
    const A l = lse();
    return (l == -neg_inf<A>() || soft_lse() == -neg_inf<A>()) ? nan_<A>() : l - d / su;
  }
};

// Whether a row's loss counts: its target is not ignore_index and, with soft targets, the teacher
// has mass (an all -inf teacher row, lse_u = -inf, has no target: it counts as ignored).
template <typename A>
VSD_HD bool row_active(bool not_ignored, bool soft, A lse_u) {
  return not_ignored && !(soft && lse_u == neg_inf<A>());
}

// Per-row gradient coefficients: dL/dz_v = a exp(z_v - lse) - c y_v (see the header comment),
// c exactly 0 on inactive rows and rows of weight 0 (whatever g is).
template <typename A>
struct RowCoef {
  A a, c;
  VSD_HD static RowCoef make(bool active, A w, A g, A gl) {
    const A c = active ? weighted(w, g) : A(0);
    return {c + gl, c};
  }
};

}  // namespace vsd_ext::wce
