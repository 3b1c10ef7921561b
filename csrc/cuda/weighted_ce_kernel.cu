// CUDA row kernels of the weighted cross-entropy (torch-free). They mirror the CPU kernels in
// csrc/weighted_ce_rows_cpu.cpp through the shared math in csrc/weighted_ce_math.h:
//   stats:  one block per row; each thread streams its strided elements through the online
//           log-sum-exp (RowStats::push_*), then a fixed shuffle/shared-memory tree merges the
//           threads' statistics (deterministic), merging with earlier vocabulary tiles if any.
//   grad:   one element per thread, a_m exp(z - lse_m) - c_m y, written in the GEMM operand dtype
//           (fp32 in place, or fp16/bf16 for the next GEMMs). The [M, V] softmax is never stored.
//   colsum: one thread per column sums the rows in order (bias gradient; no atomics).
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/weighted_ce_kernel.cuh"
#include "weighted_ce_math.h"

namespace vsd_ext::cuda::wce {
namespace {

using vsd_ext::wce::RowCoef;
using vsd_ext::wce::RowStats;

constexpr int kMaxThreads = 256;

template <typename A>
__device__ RowStats<A> shfl_down(const RowStats<A>& s, int offset) {
  RowStats<A> o;
  o.m = __shfl_down_sync(kFullWarp, s.m, offset);
  o.s = __shfl_down_sync(kFullWarp, s.s, offset);
  o.zt = __shfl_down_sync(kFullWarp, s.zt, offset);
  o.mu = __shfl_down_sync(kFullWarp, s.mu, offset);
  o.su = __shfl_down_sync(kFullWarp, s.su, offset);
  o.d = __shfl_down_sync(kFullWarp, s.d, offset);
  return o;
}

// Lane 0 ends with the merge of the warp's 32 statistics (fixed tree: deterministic).
template <typename A>
__device__ RowStats<A> warp_merge(RowStats<A> s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.merge(shfl_down(s, offset));
  }
  return s;
}

// Thread 0 ends with the merge of the block's statistics. blockDim.x is a multiple of 32.
template <typename A>
__device__ RowStats<A> block_merge(RowStats<A> s) {
  __shared__ A fields[kMaxThreads / 32][RowStats<A>::kFields];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  s = warp_merge(s);
  if (lane == 0) s.store(fields[warp]);
  __syncthreads();
  if (warp == 0) {
    s = RowStats<A>::empty();
    if (lane < warps) s = RowStats<A>::load(fields[lane]);
    s = warp_merge(s);
  }
  return s;
}

template <typename T, typename S, bool kSoft, typename A>
__global__ void stats_kernel(StatsLaunch p) {
  const int64_t r = blockIdx.x;
  const T* z = static_cast<const T*>(p.logits.data) + r * p.logits.ld;
  const S* s = kSoft ? static_cast<const S*>(p.soft.data) + r * p.soft.ld : nullptr;
  const A temperature = static_cast<A>(p.temperature);
  const int64_t t = p.targets[r];
  const bool active = t != p.ignore_index;

  RowStats<A> st = RowStats<A>::empty();
  for (int64_t v = threadIdx.x; v < p.cols; v += blockDim.x) {
    const A zv = static_cast<A>(to_acc(z[v]));
    st.push_logit(zv);
    if constexpr (kSoft) {
      st.push_soft(static_cast<A>(to_acc(s[v])) / temperature, zv);
    }
  }
  if (!kSoft && threadIdx.x == 0 && active && t >= p.col0 && t < p.col0 + p.cols) {
    st.zt = static_cast<A>(to_acc(z[t - p.col0]));
  }
  st = block_merge(st);
  if (threadIdx.x != 0) {
    return;
  }
  if (!(p.first && p.last)) {  // a row streamed in vocabulary tiles: merge / keep the state
    A* state = static_cast<A*>(p.state) + r * RowStats<A>::kFields;
    if (!p.first) {
      RowStats<A> prev = RowStats<A>::load(state);
      prev.merge(st);
      st = prev;
    }
    if (!p.last) {
      st.store(state);
      return;
    }
  }
  static_cast<A*>(p.lse)[r] = st.lse();
  if constexpr (kSoft) {
    static_cast<A*>(p.soft_lse)[r] = st.soft_lse();
  }
  A loss = A(0);
  if (active) {
    const A w = static_cast<const A*>(p.row_weights)[r];
    if constexpr (kSoft) {
      loss = w * st.ce_soft();
    } else {
      loss = (t >= 0 && t < p.vocab) ? w * st.ce_hard() : A(NAN);
    }
  }
  static_cast<A*>(p.loss)[r] = loss;
}

template <typename T, typename S, bool kSoft, typename O, typename A>
__global__ void grad_kernel(GradLaunch p) {
  const int64_t r = blockIdx.x;
  const int64_t t = p.targets[r];
  const bool active = t != p.ignore_index;
  const A g = p.grad_loss ? static_cast<const A*>(p.grad_loss)[r] : A(p.unit_grad_loss ? 1 : 0);
  const A gl = p.grad_lse ? static_cast<const A*>(p.grad_lse)[r] : A(0);
  const auto coef = RowCoef<A>::make(active, static_cast<const A*>(p.row_weights)[r], g, gl);
  const A lse = static_cast<const A*>(p.lse)[r];
  const A lse_u = kSoft ? static_cast<const A*>(p.soft_lse)[r] : A(0);
  const A temperature = static_cast<A>(p.temperature);
  const T* z = static_cast<const T*>(p.logits.data) + r * p.logits.ld;
  const S* s = kSoft ? static_cast<const S*>(p.soft.data) + r * p.soft.ld : nullptr;
  O* out = static_cast<O*>(p.out.data) + r * p.out.ld;
  const bool zero_row = coef.a == A(0) && coef.c == A(0);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; v < p.cols;
       v += step) {
    A gv = A(0);
    if (!zero_row) {
      gv = coef.a * vsd_ext::wce::exp_(static_cast<A>(to_acc(z[v])) - lse);
      if constexpr (kSoft) {
        const A u = static_cast<A>(to_acc(s[v])) / temperature;
        gv -= coef.c * vsd_ext::wce::exp_(u - lse_u);
      } else if (active && v == t) {
        gv -= coef.c;
      }
    }
    out[v] = from_acc<O>(gv);  // in place when out == logits: same thread, same element
  }
}

template <typename G, typename A>
__global__ void colsum_kernel(ColsumLaunch p) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= p.cols) {
    return;
  }
  const G* g = static_cast<const G*>(p.g.data);
  A sum = A(0);
  for (int64_t r = 0; r < p.rows; ++r) {
    sum += static_cast<A>(to_acc(g[r * p.g.ld + v]));
  }
  static_cast<A*>(p.out)[v] += sum;
}

// ---- dtype dispatch ---------------------------------------------------------------------------

template <typename X>
struct Tag {
  using type = X;
};
struct NoSoft {};

template <typename F>
void with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(Tag<__half>{}); break;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat32: f(Tag<float>{}); break;
    case DType::kFloat64: f(Tag<double>{}); break;
  }
}

// Soft-target dtype, or NoSoft when absent.
template <typename F>
void with_soft_dtype(const ConstMatrix& soft, F&& f) {
  if (soft.data == nullptr) {
    f(Tag<NoSoft>{});
  } else {
    with_dtype(soft.dtype, f);
  }
}

int threads_for(int64_t cols) {
  const int64_t warps = (cols + 31) / 32;
  return static_cast<int>(warps >= kMaxThreads / 32 ? kMaxThreads : warps * 32);
}

}  // namespace

cudaError_t launch_stats(const StatsLaunch& p, cudaStream_t stream) {
  if (p.rows == 0) {
    return cudaSuccess;
  }
  const int threads = threads_for(p.cols);
  with_dtype(p.logits.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    using A = acc_t<T>;
    with_soft_dtype(p.soft, [&](auto s_tag) {
      using S0 = typename decltype(s_tag)::type;
      constexpr bool kSoft = !std::is_same_v<S0, NoSoft>;
      using S = std::conditional_t<kSoft, S0, T>;
      stats_kernel<T, S, kSoft, A><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_grad(const GradLaunch& p, cudaStream_t stream) {
  if (p.rows == 0) {
    return cudaSuccess;
  }
  const int threads = threads_for(p.cols);
  const int64_t col_blocks = (p.cols + 4 * threads - 1) / (4 * threads);  // ~4 elements per thread
  const dim3 grid(static_cast<unsigned>(p.rows),
                  static_cast<unsigned>(col_blocks < 65535 ? col_blocks : 65535));
  bool supported = true;
  with_dtype(p.logits.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    using A = acc_t<T>;
    with_dtype(p.out.dtype, [&](auto o_tag) {
      using O = typename decltype(o_tag)::type;
      // Output dtypes: that of the logits (non-fused op, fp32/fp64 chunks in place) or fp16/bf16
      // from fp32 chunk logits (operands of the next fp16/bf16 GEMMs).
      constexpr bool kValid =
          std::is_same_v<O, T> || (std::is_same_v<T, float> && !std::is_same_v<O, double>);
      if constexpr (kValid) {
        with_soft_dtype(p.soft, [&](auto s_tag) {
          using S0 = typename decltype(s_tag)::type;
          constexpr bool kSoft = !std::is_same_v<S0, NoSoft>;
          using S = std::conditional_t<kSoft, S0, T>;
          grad_kernel<T, S, kSoft, O, A><<<grid, threads, 0, stream>>>(p);
        });
      } else {
        supported = false;
      }
    });
  });
  return supported ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_colsum_add(const ColsumLaunch& p, cudaStream_t stream) {
  if (p.cols == 0) {
    return cudaSuccess;
  }
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((p.cols + threads - 1) / threads);
  with_dtype(p.g.dtype, [&](auto g_tag) {
    using G = typename decltype(g_tag)::type;
    if (p.acc_double) {
      colsum_kernel<G, double><<<blocks, threads, 0, stream>>>(p);
    } else {
      colsum_kernel<G, float><<<blocks, threads, 0, stream>>>(p);
    }
  });
  return cudaGetLastError();
}

}  // namespace vsd_ext::cuda::wce
