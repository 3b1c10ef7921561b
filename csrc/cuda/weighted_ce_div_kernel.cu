// CUDA row kernels of the divergence terms (weighted_linear_divergence; torch-free). They mirror
// the CPU kernels in csrc/weighted_ce_div_rows_cpu.cpp through the shared math in
// csrc/weighted_ce_div_math.h. One kernel, three modes (statistics; gradient from saved
// statistics; both): a block owns one whole row at a time (grid-stride over the rows) and reads
// it up to three times, (1) the online log-sum-exps of z and u = s / T (RowStats::push_logit /
// push_teacher, merged over the block by a fixed tree), (2) beta, Q_< and KL (fixed-tree block
// sums), (3) the gradient. The grid is the number of rows in flight, sized like the fused
// cross-entropy kernel so that the re-reads hit L2 (fused_blocks, weighted_ce_device.cuh).
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/weighted_ce_device.cuh"
#include "cuda/weighted_ce_kernel.cuh"
#include "weighted_ce_div_math.h"

namespace vsd_ext::cuda::wce {
namespace {

using vsd_ext::wce::DivCoef;
using vsd_ext::wce::DivRow;
using vsd_ext::wce::DivSums;
using vsd_ext::wce::RowStats;
using vsd_ext::wce::StdExp;

// Pass 1: lse_z and lse_u of row r, the same in every thread.
template <typename T, typename S, typename A>
__device__ void row_lses(const T* z, const S* s, int64_t cols, A temperature, A& lse_z, A& lse_u) {
  __shared__ A lses[2];
  RowStats<A> st = RowStats<A>::empty();
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < cols; v += blockDim.x) {
    st.push_logit(static_cast<A>(to_acc(z[v])));
    st.push_teacher(static_cast<A>(to_acc(s[v])) / temperature);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    lses[0] = st.lse();
    lses[1] = st.soft_lse();
  }
  __syncthreads();
  lse_z = lses[0];
  lse_u = lses[1];
}

// Pass 2: the row's sums, the same in every thread (zero for an undefined row).
template <typename T, typename S, typename A>
__device__ DivSums<A> row_sums(const T* z, const S* s, int64_t cols, A temperature, A lse_z,
                               A lse_u) {
  __shared__ A scratch[32];
  DivSums<A> sums = DivSums<A>::zero();
  if (vsd_ext::wce::div_defined(lse_z, lse_u)) {
#pragma unroll 4
    for (int64_t v = threadIdx.x; v < cols; v += blockDim.x) {
      sums.add(DivSums<A>::term(static_cast<A>(to_acc(z[v])) - lse_z,
                                static_cast<A>(to_acc(s[v])) / temperature - lse_u, StdExp{}));
    }
  }
  sums.beta = block_reduce(sums.beta, SumOp{}, scratch);
  sums.q_less = block_reduce(sums.q_less, SumOp{}, scratch);
  sums.kl = block_reduce(sums.kl, SumOp{}, scratch);
  return sums;
}

// Pass 3: out = dL/dz of the row.
template <typename T, typename S, typename O, typename A>
__device__ void row_grad(const T* z, const S* s, O* out, int64_t cols, A temperature, A lse_z,
                         A lse_u, const DivCoef<A>& c) {
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < cols; v += blockDim.x) {
    A gv = A(0);
    if (c.nan_row) {
      gv = vsd_ext::wce::nan_<A>();
    } else if (!c.zero_row) {
      gv = c.grad(static_cast<A>(to_acc(z[v])) - lse_z,
                  static_cast<A>(to_acc(s[v])) / temperature - lse_u, StdExp{});
    }
    out[v] = from_acc<O>(gv);  // in place when out == logits: same thread, same element
  }
}

template <typename A>
__device__ A row_value(const void* p, int64_t r) {
  return static_cast<const A*>(p)[r];
}

template <typename T, typename S, typename O, bool kStats, bool kGrad>
__global__ void __launch_bounds__(kFusedThreads) div_kernel(DivLaunch p) {
  using A = acc_t<T>;
  const A temperature = static_cast<A>(p.temperature);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* z = static_cast<const T*>(p.logits.data) + r * p.logits.ld;
    const S* s = static_cast<const S*>(p.teacher.data) + r * p.teacher.ld;
    const A w_tv = row_value<A>(p.tv_weights, r), w_kl = row_value<A>(p.kl_weights, r);
    A lse_z, lse_u, q_less, kl;
    if constexpr (kStats) {
      row_lses(z, s, p.cols, temperature, lse_z, lse_u);
      const DivRow<A> row = DivRow<A>::make(
          lse_z, lse_u, row_sums(z, s, p.cols, temperature, lse_z, lse_u), w_tv, w_kl);
      if (threadIdx.x == 0) {
        static_cast<A*>(p.loss)[r] = row.loss;
        static_cast<A*>(p.beta)[r] = row.beta;
        static_cast<A*>(p.kl)[r] = row.kl;
        static_cast<A*>(p.lse)[r] = lse_z;
        static_cast<A*>(p.soft_lse)[r] = lse_u;
        static_cast<A*>(p.q_less)[r] = row.q_less;
      }
      q_less = row.q_less;
      kl = row.kl;
    } else {
      lse_z = row_value<A>(p.lse, r);
      lse_u = row_value<A>(p.soft_lse, r);
      q_less = row_value<A>(p.q_less, r);
      kl = row_value<A>(p.kl, r);
    }
    if constexpr (kGrad) {
      const A g = p.grad_loss ? row_value<A>(p.grad_loss, r) : A(p.unit_grad_loss ? 1 : 0);
      const auto c = DivCoef<A>::make(g, w_tv, w_kl, lse_z, lse_u, q_less, kl);
      O* out = static_cast<O*>(p.out.data) + r * p.out.ld;
      row_grad(z, s, out, p.cols, temperature, lse_z, lse_u, c);
    }
    __syncthreads();  // the shared memory of the passes is reused by the next row
  }
}

// Calls f(Tag<T>, Tag<S>, Tag<O>): chunk logits T (fp32 or fp64), teacher S (any), gradient O
// (T, or fp16 / bf16 from fp32 logits; O = T without a gradient). False when unsupported.
template <typename F>
bool with_div_types(const DivLaunch& p, F&& f) {
  bool supported = p.logits.dtype == DType::kFloat32 || p.logits.dtype == DType::kFloat64;
  with_dtype(p.logits.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const DType out = p.out.data ? p.out.dtype : p.logits.dtype;
      with_dtype(out, [&](auto o_tag) {
        using O = typename decltype(o_tag)::type;
        constexpr bool kValid =
            std::is_same_v<O, T> || (std::is_same_v<T, float> && !std::is_same_v<O, double>);
        if constexpr (kValid) {
          with_dtype(p.teacher.dtype, [&](auto s_tag) { f(t_tag, s_tag, o_tag); });
        } else {
          supported = false;
        }
      });
    }
  });
  return supported;
}

}  // namespace

cudaError_t launch_div(const DivLaunch& p, cudaStream_t stream) {
  const bool grad = p.out.data != nullptr;
  if (p.rows == 0 || (!p.stats && !grad)) {
    return cudaSuccess;
  }
  const int threads = threads_for(p.cols, kFusedThreads);
  const unsigned blocks =
      fused_blocks(p.rows, p.cols * (dtype_bytes(p.logits.dtype) + dtype_bytes(p.teacher.dtype)));
  const bool supported = with_div_types(p, [&](auto t_tag, auto s_tag, auto o_tag) {
    using T = typename decltype(t_tag)::type;
    using S = typename decltype(s_tag)::type;
    using O = typename decltype(o_tag)::type;
    if (p.stats && grad) {
      div_kernel<T, S, O, true, true><<<blocks, threads, 0, stream>>>(p);
    } else if (p.stats) {
      if constexpr (std::is_same_v<O, T>) {
        div_kernel<T, S, T, true, false><<<blocks, threads, 0, stream>>>(p);
      }
    } else {
      div_kernel<T, S, O, false, true><<<blocks, threads, 0, stream>>>(p);
    }
  });
  return supported ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace vsd_ext::cuda::wce
