// CUDA tree attention, warp-per-row kernels (torch-free): the general forward and backward
// (any dtype, D <= 256, any strides), and the delta kernel that both backward paths use.
//
// Forward: one warp per query (b, n, h); lane l holds elements d = l + 32 i of q and of the
// output accumulator. Keys are visited in order (prefix [0, prefix_lens[b]) without any mask
// test, then the tree nodes whose bit is set); per key s = warp_sum(q . k) and the online
// softmax m' = max(m, s), l = l 2^(m - m') + 2^(s - m'), o = o 2^(m - m') + 2^(s - m') v, in the
// log2 domain (q pre-scaled by sm_scale log2 e).
//
// Backward (P = 2^(s - lse log2 e) recomputed, never stored; delta = rowsum(dO * O) - dlse):
//   dQ  : one warp per query, over the keys it sees:    dq += P (dO.v - delta) k
//   dK,dV of the cache: one warp per (cache row, position, kv head), over every row b that
//         sees the position (all B rows for a shared cache Bc = 1) and the G heads x N nodes
//         of that row:                                   dv += P dO, dk += dS q
//   dK,dV of the tree: one warp per (b, node j, kv head), over the nodes that see j.
// Every gradient element is owned by one warp and summed in a fixed order: deterministic and
// free of atomics, also when the cache gradient sums over rows.
#include "cuda/tree_attention_device.cuh"

namespace vsd_ext::cuda::tree_attn {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 32 * kWarpsPerBlock;

template <class T, int CH>
__device__ __forceinline__ void load_row(const T* p, int D, int lane, acc_t<T> (&x)[CH],
                                         acc_t<T> scale) {
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < D ? to_acc(p[d]) * scale : acc_t<T>(0);
  }
}

template <class A, int CH>
__device__ __forceinline__ A dot_row(const A (&x)[CH], const A (&y)[CH]) {
  A s = 0;
#pragma unroll
  for (int i = 0; i < CH; ++i) s += x[i] * y[i];
  return warp_sum(s);
}

template <class T, int CH>
__device__ __forceinline__ void store_row(T* p, int D, int lane, const acc_t<T> (&x)[CH],
                                          acc_t<T> scale) {
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int d = lane + 32 * i;
    if (d < D) p[d] = from_acc<T>(x[i] * scale);
  }
}

// Calls visit(k_row, v_row) for every key that query (b, n) sees, prefix first.
template <class T, class F>
__device__ __forceinline__ void for_each_key(const Inputs& in, int b, int n, int g, F&& visit) {
  const int bc = in.Bc == 1 ? 0 : b;
  const int len = prefix_len(in, b);
  for (int j = 0; j < len; ++j)
    visit(row_ptr<T>(in.k_cache, bc, j, g), row_ptr<T>(in.v_cache, bc, j, g));
  const int64_t* words = in.tree_mask + b * in.mask_s0 + n * in.mask_s1;
  for (int j = 0; j < in.N; ++j)
    if (tree_bit(words, j)) visit(row_ptr<T>(in.k_tree, b, j, g), row_ptr<T>(in.v_tree, b, j, g));
}

template <class T, int CH>
__global__ void __launch_bounds__(kThreads) forward_simple_kernel(ForwardArgs args) {
  using A = acc_t<T>;
  const Inputs& in = args.in;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<int64_t>(in.B) * in.N * in.Hq) return;
  const int h = warp % in.Hq, n = (warp / in.Hq) % in.N,
            b = warp / (static_cast<int64_t>(in.Hq) * in.N);
  const int g = h / (in.Hq / in.Hkv);
  A q[CH], o[CH], kv[CH];
  load_row<T, CH>(row_ptr<T>(in.q, b, n, h), in.D, lane, q, static_cast<A>(in.sm_scale * kLog2eD));
#pragma unroll
  for (int i = 0; i < CH; ++i) o[i] = 0;
  A m = -INFINITY, l = 0;
  for_each_key<T>(in, b, n, g, [&](const T* k, const T* v) {
    load_row<T, CH>(k, in.D, lane, kv, A(1));
    const A s = dot_row(q, kv);
    const A m_new = m > s ? m : s;  // finite: s is
    const A alpha = fast_exp2(m - m_new), p = fast_exp2(s - m_new);
    load_row<T, CH>(v, in.D, lane, kv, A(1));
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < CH; ++i) o[i] = o[i] * alpha + p * kv[i];
    m = m_new;
  });
  T* out = static_cast<T*>(args.out) + warp * in.D;
  store_row<T, CH>(out, in.D, lane, o, l > A(0) ? A(1) / l : A(0));
  if (lane == 0)
    static_cast<A*>(args.lse)[warp] =
        l > A(0) ? static_cast<A>(kLn2D) * (m + fast_log2(l)) : A(-INFINITY);
}

// delta[b, n, h] = dO . O - dlse.
template <class T, int CH>
__global__ void __launch_bounds__(kThreads) delta_kernel(BackwardArgs args, acc_t<T>* delta) {
  using A = acc_t<T>;
  const Inputs& in = args.in;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<int64_t>(in.B) * in.N * in.Hq) return;
  const int h = warp % in.Hq, n = (warp / in.Hq) % in.N,
            b = warp / (static_cast<int64_t>(in.Hq) * in.N);
  A x[CH], y[CH];
  load_row<T, CH>(row_ptr<T>(args.grad_out, b, n, h), in.D, lane, x, A(1));
  load_row<T, CH>(row_ptr<T>(args.out, b, n, h), in.D, lane, y, A(1));
  const A s = dot_row(x, y);
  if (lane == 0)
    delta[warp] = s - (args.grad_lse ? static_cast<const A*>(args.grad_lse)[warp] : A(0));
}

template <class T, int CH>
__global__ void __launch_bounds__(kThreads) dq_kernel(BackwardArgs args, const acc_t<T>* delta) {
  using A = acc_t<T>;
  const Inputs& in = args.in;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<int64_t>(in.B) * in.N * in.Hq) return;
  const int h = warp % in.Hq, n = (warp / in.Hq) % in.N,
            b = warp / (static_cast<int64_t>(in.Hq) * in.N);
  const int g = h / (in.Hq / in.Hkv);
  A q[CH], dout[CH], dq[CH], kv[CH];
#pragma unroll
  for (int i = 0; i < CH; ++i) dq[i] = 0;
  const A lse = static_cast<const A*>(args.lse)[warp];
  if (lse != A(-INFINITY)) {  // a query that saw nothing has zero gradients
    load_row<T, CH>(row_ptr<T>(in.q, b, n, h), in.D, lane, q,
                    static_cast<A>(in.sm_scale * kLog2eD));
    load_row<T, CH>(row_ptr<T>(args.grad_out, b, n, h), in.D, lane, dout, A(1));
    const A lse2 = lse * static_cast<A>(kLog2eD), dl = delta[warp];
    for_each_key<T>(in, b, n, g, [&](const T* k, const T* v) {
      load_row<T, CH>(v, in.D, lane, kv, A(1));
      const A dp = dot_row(dout, kv);
      load_row<T, CH>(k, in.D, lane, kv, A(1));
      const A p = fast_exp2(dot_row(q, kv) - lse2);
      const A ds = p * (dp - dl);
#pragma unroll
      for (int i = 0; i < CH; ++i) dq[i] += ds * kv[i];
    });
  }
  store_row<T, CH>(static_cast<T*>(args.dq) + warp * in.D, in.D, lane, dq,
                   static_cast<A>(in.sm_scale));
}

// One key (k, v rows in registers) against every query of row b, kv head g, that sees it
// (`sees(n)`); accumulates dk (unscaled) and dv.
template <class T, int CH, class Sees>
__device__ __forceinline__ void key_grads(const BackwardArgs& args, const acc_t<T>* delta, int b,
                                          int g, int lane, const acc_t<T> (&k)[CH],
                                          const acc_t<T> (&v)[CH], acc_t<T> (&dk)[CH],
                                          acc_t<T> (&dv)[CH], Sees&& sees) {
  using A = acc_t<T>;
  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv;
  const A c = static_cast<A>(in.sm_scale * kLog2eD), log2e = static_cast<A>(kLog2eD);
  A x[CH];
  for (int n = 0; n < in.N; ++n) {
    if (!sees(n)) continue;
    for (int hh = 0; hh < G; ++hh) {
      const int h = g * G + hh;
      const int64_t row = (static_cast<int64_t>(b) * in.N + n) * in.Hq + h;
      const A lse = static_cast<const A*>(args.lse)[row];
      if (lse == A(-INFINITY)) continue;
      load_row<T, CH>(row_ptr<T>(args.grad_out, b, n, h), in.D, lane, x, A(1));
      const A dp = dot_row(x, v);
      load_row<T, CH>(row_ptr<T>(in.q, b, n, h), in.D, lane, x, A(1));
      const A p = fast_exp2(c * dot_row(x, k) - lse * log2e);
      const A ds = p * (dp - delta[row]);
#pragma unroll
      for (int i = 0; i < CH; ++i) dk[i] += ds * x[i];
      load_row<T, CH>(row_ptr<T>(args.grad_out, b, n, h), in.D, lane, x, A(1));
#pragma unroll
      for (int i = 0; i < CH; ++i) dv[i] += p * x[i];
    }
  }
}

template <class T, int CH>
__global__ void __launch_bounds__(kThreads)
    dkv_cache_kernel(BackwardArgs args, const acc_t<T>* delta) {
  using A = acc_t<T>;
  const Inputs& in = args.in;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<int64_t>(in.Bc) * in.L * in.Hkv) return;
  const int g = warp % in.Hkv, j = (warp / in.Hkv) % in.L,
            bc = warp / (static_cast<int64_t>(in.Hkv) * in.L);
  A k[CH], v[CH], dk[CH], dv[CH];
  load_row<T, CH>(row_ptr<T>(in.k_cache, bc, j, g), in.D, lane, k, A(1));
  load_row<T, CH>(row_ptr<T>(in.v_cache, bc, j, g), in.D, lane, v, A(1));
#pragma unroll
  for (int i = 0; i < CH; ++i) dk[i] = dv[i] = 0;
  // A shared cache (Bc = 1) is seen by every row; else cache row bc belongs to row bc.
  const int b_end = in.Bc == 1 ? in.B : bc + 1;
  for (int b = in.Bc == 1 ? 0 : bc; b < b_end; ++b)
    if (j < prefix_len(in, b))
      key_grads<T, CH>(args, delta, b, g, lane, k, v, dk, dv, [](int) { return true; });
  const int64_t off = warp * in.D;
  store_row<T, CH>(static_cast<T*>(args.dk_cache) + off, in.D, lane, dk,
                   static_cast<A>(in.sm_scale));
  store_row<T, CH>(static_cast<T*>(args.dv_cache) + off, in.D, lane, dv, A(1));
}

template <class T, int CH>
__global__ void __launch_bounds__(kThreads)
    dkv_tree_kernel(BackwardArgs args, const acc_t<T>* delta) {
  using A = acc_t<T>;
  const Inputs& in = args.in;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<int64_t>(in.B) * in.N * in.Hkv) return;
  const int g = warp % in.Hkv, j = (warp / in.Hkv) % in.N,
            b = warp / (static_cast<int64_t>(in.Hkv) * in.N);
  A k[CH], v[CH], dk[CH], dv[CH];
  load_row<T, CH>(row_ptr<T>(in.k_tree, b, j, g), in.D, lane, k, A(1));
  load_row<T, CH>(row_ptr<T>(in.v_tree, b, j, g), in.D, lane, v, A(1));
#pragma unroll
  for (int i = 0; i < CH; ++i) dk[i] = dv[i] = 0;
  const int64_t* mask = in.tree_mask + b * in.mask_s0;
  key_grads<T, CH>(args, delta, b, g, lane, k, v, dk, dv,
                   [&](int n) { return tree_bit(mask + n * in.mask_s1, j); });
  const int64_t off = warp * in.D;
  store_row<T, CH>(static_cast<T*>(args.dk_tree) + off, in.D, lane, dk,
                   static_cast<A>(in.sm_scale));
  store_row<T, CH>(static_cast<T*>(args.dv_tree) + off, in.D, lane, dv, A(1));
}

unsigned blocks_for(int64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Calls f.template operator()<T, CH>() with CH = ceil(D / 32) rounded up to 1, 2, 4 or 8.
template <class F>
cudaError_t dispatch(DType dtype, int D, F&& f) {
  auto by_d = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (D <= 32) return f.template operator()<T, 1>();
    if (D <= 64) return f.template operator()<T, 2>();
    if (D <= 128) return f.template operator()<T, 4>();
    if (D <= 256) return f.template operator()<T, 8>();
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case DType::kFloat16: return by_d(__half{});
    case DType::kBFloat16: return by_d(__nv_bfloat16{});
    case DType::kFloat32: return by_d(float{});
    case DType::kFloat64: return by_d(double{});
  }
  return cudaErrorInvalidValue;
}

int64_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

cudaError_t tree_attention_forward_simple(const ForwardArgs& args, cudaStream_t stream) {
  const Inputs& in = args.in;
  const int64_t warps = static_cast<int64_t>(in.B) * in.N * in.Hq;
  if (warps == 0) return cudaSuccess;
  return dispatch(in.dtype, in.D, [&]<class T, int CH>() {
    forward_simple_kernel<T, CH><<<blocks_for(warps), kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

int64_t backward_workspace_bytes(const Inputs& in) {
  return static_cast<int64_t>(in.B) * in.N * in.Hq * acc_bytes(in.dtype);
}

cudaError_t launch_backward_delta(const BackwardArgs& args, void* delta, cudaStream_t stream) {
  const Inputs& in = args.in;
  const int64_t queries = static_cast<int64_t>(in.B) * in.N * in.Hq;
  if (queries == 0) return cudaSuccess;
  return dispatch(in.dtype, in.D, [&]<class T, int CH>() {
    delta_kernel<T, CH>
        <<<blocks_for(queries), kThreads, 0, stream>>>(args, static_cast<acc_t<T>*>(delta));
    return cudaGetLastError();
  });
}

cudaError_t tree_attention_backward_simple(const BackwardArgs& args, void* workspace,
                                           cudaStream_t stream) {
  const Inputs& in = args.in;
  const int64_t queries = static_cast<int64_t>(in.B) * in.N * in.Hq;
  const int64_t cache_keys = static_cast<int64_t>(in.Bc) * in.L * in.Hkv;
  const int64_t tree_keys = static_cast<int64_t>(in.B) * in.N * in.Hkv;
  if (queries == 0) return cudaSuccess;
  const cudaError_t err = launch_backward_delta(args, workspace, stream);
  if (err != cudaSuccess) return err;
  return dispatch(in.dtype, in.D, [&]<class T, int CH>() {
    using A = acc_t<T>;
    const A* delta = static_cast<const A*>(workspace);
    dq_kernel<T, CH><<<blocks_for(queries), kThreads, 0, stream>>>(args, delta);
    if (cache_keys > 0)
      dkv_cache_kernel<T, CH><<<blocks_for(cache_keys), kThreads, 0, stream>>>(args, delta);
    dkv_tree_kernel<T, CH><<<blocks_for(tree_keys), kThreads, 0, stream>>>(args, delta);
    return cudaGetLastError();
  });
}

}  // namespace vsd_ext::cuda::tree_attn
