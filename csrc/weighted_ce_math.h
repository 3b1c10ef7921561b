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
//   loss_rows[m]   w_m * CE_m on active rows (t_m != ignore_index), 0 on ignored rows
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

  // Adds one logit: the online log-sum-exp update (Milakov & Gimelshein). exp(-inf - m) is 0,
  // so masked logits need no branch; only an all -inf prefix (m = -inf) must skip the rescale.
  VSD_HD void push_logit(A z) {
    if (z > m) {
      s = s * exp_(m - z) + A(1);
      m = z;
    } else if (!(z == neg_inf<A>())) {
      s += exp_(z - m);  // NaN z lands here and poisons s, as it must
    }
  }

  // Adds one (teacher, drafter) pair. A teacher entry u = -inf has p = 0 and is skipped; every
  // product of a teacher weight (which may be or underflow to 0) with z goes through mass_times,
  // so a drafter -inf never meets a zero weight as 0 * -inf.
  VSD_HD void push_soft(A u, A z) {
    if (u > mu) {
      const A r = exp_(mu - u);
      su = su * r + A(1);
      d = mass_times(r, d) + z;
      mu = u;
    } else if (!(u == neg_inf<A>())) {
      const A e = exp_(u - mu);
      su += e;
      d += mass_times(e, z);
    }
  }

  // Merges the statistics of a disjoint subset.
  VSD_HD void merge(const RowStats& o) {
    merge_pair(m, s, o.m, o.s, nullptr, A(0));
    merge_pair(mu, su, o.mu, o.su, &d, o.d);
    zt += o.zt;
  }

  VSD_HD static void merge_pair(A& m1, A& s1, A m2, A s2, A* d1, A d2) {
    const A mx = m1 > m2 ? m1 : m2;
    if (mx == neg_inf<A>()) {
      return;  // both empty: nothing to add
    }
    const A r1 = exp_(m1 - mx), r2 = exp_(m2 - mx);
    s1 = s1 * r1 + s2 * r2;
    if (d1 != nullptr) {
      *d1 = mass_times(r1, *d1) + mass_times(r2, d2);
    }
    m1 = mx;
  }

  VSD_HD A lse() const { return m + log_(s); }
  VSD_HD A soft_lse() const { return mu + log_(su); }
  // Cross-entropy of the complete row.
  VSD_HD A ce_hard() const { return lse() - zt; }
  VSD_HD A ce_soft() const { return lse() - d / su; }
};

// Per-row gradient coefficients: dL/dz_v = a exp(z_v - lse) - c y_v (see the header comment).
template <typename A>
struct RowCoef {
  A a, c;
  VSD_HD static RowCoef make(bool active, A w, A g, A gl) {
    const A c = active ? g * w : A(0);
    return {c + gl, c};
  }
};

}  // namespace vsd_ext::wce
