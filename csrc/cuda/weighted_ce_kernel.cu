// CUDA row kernels of the weighted cross-entropy (torch-free). They mirror the CPU kernels in
// csrc/weighted_ce_rows_cpu.cpp through the shared math in csrc/weighted_ce_math.h:
//   stats:  one block per row; each thread streams its strided elements through the online
//           log-sum-exp (RowStats::push_*), then a fixed shuffle/shared-memory tree merges the
//           threads' statistics (deterministic), merging with earlier vocabulary tiles if any.
//   grad:   one element per thread, a_m exp(z - lse_m) - c_m y, written in the GEMM operand dtype
//           (fp32 in place, or bf16 for the next GEMMs). The [M, V] softmax is never stored.
//   stats_grad: both on whole rows in one kernel (the fused forward): a block owns a row at a
//           time, statistics then gradient, with as many rows in flight as half the L2 holds, so
//           that the gradient's read of the row hits L2 (fused_blocks).
//   colsum: one thread per column sums the rows in order (bias gradient; no atomics).
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/weighted_ce_device.cuh"
#include "cuda/weighted_ce_kernel.cuh"
#include "weighted_ce_math.h"

namespace vsd_ext::cuda::wce {
namespace {

using vsd_ext::wce::RowCoef;
using vsd_ext::wce::RowStats;

// Thread 0 ends with the statistics of row r of the tile (the other threads with partial ones).
template <typename T, typename S, bool kSoft, typename A>
__device__ RowStats<A> tile_row_stats(const StatsLaunch& p, int64_t r) {
  const T* z = static_cast<const T*>(p.logits.data) + r * p.logits.ld;
  const S* s = kSoft ? static_cast<const S*>(p.soft.data) + r * p.soft.ld : nullptr;
  const A temperature = static_cast<A>(p.temperature);
  RowStats<A> st = RowStats<A>::empty();
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < p.cols; v += blockDim.x) {
    const A zv = static_cast<A>(to_acc(z[v]));
    st.push_logit(zv);
    if constexpr (kSoft) {
      st.push_soft(static_cast<A>(to_acc(s[v])) / temperature, zv);
    }
  }
  const int64_t t = p.targets[r];
  if (!kSoft && threadIdx.x == 0 && t != p.ignore_index && t >= p.col0 && t < p.col0 + p.cols) {
    st.zt = static_cast<A>(to_acc(z[t - p.col0]));
  }
  return block_merge(st);
}

// Thread 0 only: merges the tile into the statistics of the earlier tiles of row r, keeps them for
// the later ones, or (last tile) writes loss, lse and soft_lse.
template <bool kSoft, typename A>
__device__ void finish_row(const StatsLaunch& p, int64_t r, RowStats<A> st) {
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
  const A lse_u = kSoft ? st.soft_lse() : A(0);
  if constexpr (kSoft) {
    static_cast<A*>(p.soft_lse)[r] = lse_u;
  }
  const int64_t t = p.targets[r];
  A loss = A(0);
  if (vsd_ext::wce::row_active(t != p.ignore_index, kSoft, lse_u)) {
    const A w = static_cast<const A*>(p.row_weights)[r];
    if constexpr (kSoft) {
      loss = vsd_ext::wce::weighted(w, st.ce_soft());
    } else {  // the drivers reject out-of-range targets before any launch; NaN if one got here
      loss = (t >= 0 && t < p.vocab) ? vsd_ext::wce::weighted(w, st.ce_hard()) : A(NAN);
    }
  }
  static_cast<A*>(p.loss)[r] = loss;
}

template <typename T, typename S, bool kSoft, typename A>
__global__ void stats_kernel(StatsLaunch p) {
  const RowStats<A> st = tile_row_stats<T, S, kSoft, A>(p, blockIdx.x);
  if (threadIdx.x == 0) {
    finish_row<kSoft>(p, blockIdx.x, st);
  }
}

// The gradient elements v0, v0 + step, ... of row r: a_m exp(z - lse_m) - c_m y, written in the
// output dtype (in place when out == logits: same thread, same element).
template <typename T, typename S, bool kSoft, typename O, typename A>
__device__ void grad_row(const GradLaunch& p, int64_t r, int64_t v0, int64_t step) {
  const int64_t t = p.targets[r];
  const A lse_u = kSoft ? static_cast<const A*>(p.soft_lse)[r] : A(0);
  const bool active = vsd_ext::wce::row_active(t != p.ignore_index, kSoft, lse_u);
  const A g = p.grad_loss ? static_cast<const A*>(p.grad_loss)[r] : A(p.unit_grad_loss ? 1 : 0);
  const A gl = p.grad_lse ? static_cast<const A*>(p.grad_lse)[r] : A(0);
  const auto coef = RowCoef<A>::make(active, static_cast<const A*>(p.row_weights)[r], g, gl);
  const A lse = static_cast<const A*>(p.lse)[r];
  const A temperature = static_cast<A>(p.temperature);
  const T* z = static_cast<const T*>(p.logits.data) + r * p.logits.ld;
  const S* s = kSoft ? static_cast<const S*>(p.soft.data) + r * p.soft.ld : nullptr;
  O* out = static_cast<O*>(p.out.data) + r * p.out.ld;
  const bool zero_row = coef.a == A(0) && coef.c == A(0);
#pragma unroll 4
  for (int64_t v = v0; v < p.cols; v += step) {
    A gv = A(0);
    if (!zero_row) {
      gv = coef.a * vsd_ext::wce::exp_(static_cast<A>(to_acc(z[v])) - lse);
      // A zero c skips the teacher term: a teacher without mass has lse_u = -inf.
      if constexpr (kSoft) {
        if (coef.c != A(0)) {
          const A u = static_cast<A>(to_acc(s[v])) / temperature;
          gv -= coef.c * vsd_ext::wce::exp_(u - lse_u);
        }
      } else if (active && v == t) {
        gv -= coef.c;
      }
    }
    out[v] = from_acc<O>(gv);
  }
}

template <typename T, typename S, bool kSoft, typename O, typename A>
__global__ void grad_kernel(GradLaunch p) {
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  grad_row<T, S, kSoft, O, A>(p, blockIdx.x,
                              static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x, step);
}

// Statistics and gradient of whole rows, fused: a block owns one row at a time (grid-stride over
// the rows) and reads it twice, for the statistics and then for the gradient. The grid is the
// number of rows in flight, sized by launch_stats_grad so that the second read hits L2.
template <typename T, typename S, bool kSoft, typename O, typename A>
__global__ void __launch_bounds__(kFusedThreads) stats_grad_kernel(StatsLaunch p, GradLaunch g) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const RowStats<A> st = tile_row_stats<T, S, kSoft, A>(p, r);
    if (threadIdx.x == 0) {
      finish_row<kSoft>(p, r, st);
    }
    __syncthreads();  // lse[r] and soft_lse[r] (global memory) are visible to the whole block
    grad_row<T, S, kSoft, O, A>(g, r, threadIdx.x, blockDim.x);
    __syncthreads();  // block_merge's shared memory is reused by the next row
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

// Calls f(Tag<T>, Tag<S>, Tag<O>) for the logits, soft-target (S = T without soft targets, kSoft
// false) and gradient dtypes of a gradient launch; false for an unsupported output dtype.
// Output dtypes: that of the logits (non-fused op; fp32/fp64 chunks in place) or fp16/bf16 from
// fp32 chunk logits (operands of the next fp16/bf16 GEMMs).
template <typename F>
bool with_grad_types(const GradLaunch& p, F&& f) {
  bool supported = true;
  with_dtype(p.logits.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    with_dtype(p.out.dtype, [&](auto o_tag) {
      using O = typename decltype(o_tag)::type;
      constexpr bool kValid =
          std::is_same_v<O, T> || (std::is_same_v<T, float> && !std::is_same_v<O, double>);
      if constexpr (kValid) {
        with_soft_dtype(p.soft, [&](auto s_tag) { f(t_tag, s_tag, o_tag); });
      } else {
        supported = false;
      }
    });
  });
  return supported;
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
  const bool supported = with_grad_types(p, [&](auto t_tag, auto s_tag, auto o_tag) {
    using T = typename decltype(t_tag)::type;
    using O = typename decltype(o_tag)::type;
    using S0 = typename decltype(s_tag)::type;
    constexpr bool kSoft = !std::is_same_v<S0, NoSoft>;
    using S = std::conditional_t<kSoft, S0, T>;
    grad_kernel<T, S, kSoft, O, acc_t<T>><<<grid, threads, 0, stream>>>(p);
  });
  return supported ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_stats_grad(const StatsLaunch& p, const GradLaunch& g, cudaStream_t stream) {
  if (p.rows == 0) {
    return cudaSuccess;
  }
  if (!(p.first && p.last) || p.cols != g.cols || p.rows != g.rows) {
    return cudaErrorInvalidValue;  // whole rows only, one tile
  }
  const int threads = threads_for(p.cols, kFusedThreads);
  const unsigned blocks = fused_blocks(p.rows, p.cols * dtype_bytes(p.logits.dtype));
  const bool supported = with_grad_types(g, [&](auto t_tag, auto s_tag, auto o_tag) {
    using T = typename decltype(t_tag)::type;
    using O = typename decltype(o_tag)::type;
    using S0 = typename decltype(s_tag)::type;
    constexpr bool kSoft = !std::is_same_v<S0, NoSoft>;
    using S = std::conditional_t<kSoft, S0, T>;
    stats_grad_kernel<T, S, kSoft, O, acc_t<T>><<<blocks, threads, 0, stream>>>(p, g);
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
