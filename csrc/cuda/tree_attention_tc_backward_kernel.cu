// CUDA tree attention, tensor-core backward (torch-free): fp16/bf16, D in {64, 128}.
//
// With s = sm_scale q.k, P = 2^(c q.k - lse log2 e) (c = sm_scale log2 e) is recomputed from the
// saved lse, never stored; delta = rowsum(dO * O) - dlse comes from the delta kernel
// (tree_attention_simple_kernel.cu). Two kernels, both deterministic and free of atomics:
//
// dQ: block = ((b, kv head g), tile of 64 packed query rows) as in the forward, over every key
//     tile the rows see (prefix tiles mask-free, tree tiles with the bitmask):
//       S = Q K^T, P = 2^(c S - lse2), dP = dO V^T, dS = P (dP - delta), dQ += dS K
//     dS is re-packed from the S/dP accumulators as the A operand, like P in the forward.
// dK, dV: block = (cache row or tree row, kv head g, tile of 64 keys), key-major so that P^T and
//     dS^T come out of the accumulators in the A layout:
//       S^T = K Q^T, P^T = 2^(c S^T - lse2), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//       dV += P^T dO, dK += dS^T Q
//     over the query tiles of every row that sees the keys: all B rows for a cache shared by
//     the batch (Bc = 1), row b otherwise; for tree keys, row b with the bitmask of each
//     query's node. Query tiles (Q, dO, and their lse2 / delta / mask words) are
//     double-buffered with cp.async.
//     Shared cache (Bc = 1): when Hkv x key tiles blocks would not fill the GPU, the B rows are
//     split over gridDim.z (consecutive row ranges); each split writes its fp32 dK, dV partial
//     to the workspace and a reduce kernel sums the partials in split order (deterministic, no
//     atomics). Without a split the sum over rows stays inside one block, in row order.
// Operands come from shared memory by ldmatrix.x4 (cuda/tree_attention_tc_device.cuh); tree keys
// that no query of a block (dQ) or of the row (dK, dV) sees are zero-filled, never read, and
// masked entries of dS are set to 0, not P (dP - delta) with P = 0: a NaN in an unseen key or
// value cannot reach any gradient.
#include "cuda/tree_attention_tc_device.cuh"

#include <algorithm>

namespace vsd_ext::cuda::tree_attn {
namespace {

template <int D>
constexpr int dq_smem_bytes() {
  return (2 * BM + 4 * BN) * (D + 8) * 2;  // Q, dO, double-buffered K and V
}
template <int D>
constexpr int dkv_smem_bytes() {
  // K, V, double-buffered Q and dO, then per buffer 64 x (lse2, delta: fp32; mask word: u64).
  return (2 * BN + 4 * BM) * (D + 8) * 2 + 2 * BM * (4 + 4 + 8);
}

// acc[nt] (16 x 64, 8 column tiles) = A (16 rows of `a_tile` from a_row) x B^T, where B^T is
// given row-major as `b_tile` (64 rows = the output columns, D contiguous). UNROLL: how many k
// slices are unrolled (the dQ kernel's 2 keeps its registers in bounds: no spills at D = 128).
template <class T, int D, int UNROLL = D / 16>
__device__ __forceinline__ void tile_abt(float (&acc)[8][4], const T* a_tile, int a_row,
                                         const T* b_tile, int lane) {
  constexpr int LDS = D + 8;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll UNROLL
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<T, LDS>(a, a_tile, a_row, kk, lane);
    mma_a_bt<T, LDS, 8>(acc, a, b_tile, kk, lane);
  }
}

// lse of a query in the log2 domain; +inf for a query that saw nothing (so its P is 0).
__device__ __forceinline__ float lse2_of(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// ---- dQ -----------------------------------------------------------------------------------------

// lse2, delta and mask row of this thread's packed rows row + 8 rh (rh = 0, 1); rows past R see
// nothing (lse2 = +inf, no mask row).
__device__ __forceinline__ void query_row_stats(const BackwardArgs& args, const float* delta, int b,
                                                int g, int row, float (&lse2)[2], float (&dl)[2],
                                                const int64_t* (&words)[2]) {
  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int pr = row + 8 * rh;
    const bool valid = pr < R;
    const int64_t q_row = (static_cast<int64_t>(b) * in.N + (valid ? pr / G : 0)) * in.Hq + g * G +
                          (valid ? pr % G : 0);
    lse2[rh] = valid ? lse2_of(static_cast<const float*>(args.lse)[q_row]) : INFINITY;
    dl[rh] = valid ? delta[q_row] : 0.f;
    words[rh] = valid ? in.tree_mask + b * in.mask_s0 + (pr / G) * in.mask_s1 : nullptr;
  }
}

// dS = P (dP - delta) in s (query rows x key columns), P = 2^(c S - lse2) on the visible keys:
// the first `keys` columns, and on tree tile tt those with a set mask bit.
__device__ __forceinline__ void ds_tile(float (&s)[8][4], const float (&dp)[8][4], float c,
                                        int keys, bool tree, int tt, const float (&lse2)[2],
                                        const float (&dl)[2], const int64_t* const (&words)[2],
                                        int tq) {
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const uint64_t w = tree ? (words[rh] ? static_cast<uint64_t>(words[rh][tt]) : 0ull) : ~0ull;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 2 * rh; e < 2 * rh + 2; ++e) {
        const int col = nt * 8 + 2 * tq + (e & 1);
        const bool visible = col < keys && ((w >> col) & 1ull);
        const float p = visible ? exp2f(s[nt][e] * c - lse2[rh]) : 0.f;
        s[nt][e] = visible ? p * (dp[nt][e] - dl[rh]) : 0.f;  // dS (0, not 0 * NaN, if masked)
      }
  }
}

// dq rows row + 8 rh = sm_scale dQ (packed rows past R are not stored).
template <class T, int D>
__device__ __forceinline__ void store_dq(const BackwardArgs& args, int b, int g, int row, int tq,
                                         const float (&dq)[D / 8][4]) {
  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int pr = row + 8 * rh;
    if (pr >= R) continue;
    const int64_t q_row = (static_cast<int64_t>(b) * in.N + pr / G) * in.Hq + g * G + pr % G;
    T* dst = static_cast<T*>(args.dq) + q_row * D + 2 * tq;
    const float scale = static_cast<float>(in.sm_scale);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) =
          pack2<T>(dq[dt][2 * rh] * scale, dq[dt][2 * rh + 1] * scale);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) dq_tc_kernel(BackwardArgs args, const float* delta) {
  constexpr int LDS = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t seen_scratch[32];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + BM * LDS;
  T* Ks = dOs + BM * LDS;  // [2][BN][LDS]
  T* Vs = Ks + 2 * BN * LDS;

  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
  const int b = blockIdx.x / in.Hkv, g = blockIdx.x % in.Hkv, bc = in.Bc == 1 ? 0 : b;
  const int row0 = blockIdx.y * BM;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gr = lane / 4, tq = lane % 4;
  const int wrow = warp * 16 + gr;
  const int len = prefix_len(in, b);
  const int n_prefix = (len + BN - 1) / BN;
  const int n_tiles = n_prefix + (in.N + BN - 1) / BN;
  auto tile_base = [&](int i) { return (i < n_prefix ? i : i - n_prefix) * BN; };
  auto tile_keys = [&](int i) { return min(BN, (i < n_prefix ? len : in.N) - tile_base(i)); };
  // Called by every thread alike; tree keys no query of the block sees are zero-filled.
  auto load_tile = [&](int i, int buf) {
    if (i < n_prefix) {
      load_key_tile<T, D>(Ks + buf * BN * LDS, Vs + buf * BN * LDS, in.k_cache, in.v_cache, bc,
                          tile_base(i), tile_keys(i), ~0ull, g, tid);
      return;
    }
    const uint64_t visible = seen_tree_word(in, b, first_node(row0, G), end_node(row0, G, R),
                                            i - n_prefix, seen_scratch);
    load_key_tile<T, D>(Ks + buf * BN * LDS, Vs + buf * BN * LDS, in.k_tree, in.v_tree, b,
                        tile_base(i), tile_keys(i), visible, g, tid);
  };

  float lse2[2], dl[2];
  const int64_t* words[2];
  query_row_stats(args, delta, b, g, row0 + wrow, lse2, dl, words);
  load_query_tile<T, D>(Qs, in.q, b, g, G, R, row0, tid);
  load_query_tile<T, D>(dOs, args.grad_out, b, g, G, R, row0, tid);
  load_tile(0, 0);
  cp_async_commit();

  const float c = static_cast<float>(in.sm_scale) * kLog2e;
  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
  for (int i = 0; i < n_tiles; ++i) {
    if (i + 1 < n_tiles) load_tile(i + 1, (i + 1) & 1);
    cp_async_commit();
    cp_async_wait_1();
    __syncthreads();
    const T* K = Ks + (i & 1) * BN * LDS;
    const T* V = Vs + (i & 1) * BN * LDS;
    float s[8][4], dp[8][4];
    tile_abt<T, D, 2>(s, Qs, warp * 16, K, lane);
    tile_abt<T, D, 2>(dp, dOs, warp * 16, V, lane);
    ds_tile(s, dp, c, tile_keys(i), i >= n_prefix, i - n_prefix, lse2, dl, words, tq);
    tile_xm<T, D>(dq, s, K, lane);
    __syncthreads();
  }
  store_dq<T, D>(args, b, g, row0 + wrow, tq, dq);
}

// ---- dK, dV -------------------------------------------------------------------------------------

// Per-row inputs of query tile (b, row0) into buffer slots (lse2, delta, the mask word of key
// tile kt on tree keys), thread tid < BM for packed row row0 + tid.
template <bool TREE>
__device__ __forceinline__ void load_query_row_stats(const BackwardArgs& args, const float* delta,
                                                     int b, int g, int row0, int kt, int tid,
                                                     float* lse2, float* dl, uint64_t* words) {
  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
  const int pr = row0 + tid;
  const bool valid = pr < R;
  const int64_t q_row = (static_cast<int64_t>(b) * in.N + (valid ? pr / G : 0)) * in.Hq + g * G +
                        (valid ? pr % G : 0);
  lse2[tid] = valid ? lse2_of(static_cast<const float*>(args.lse)[q_row]) : INFINITY;
  dl[tid] = valid ? delta[q_row] : 0.f;
  words[tid] =
      TREE && valid
          ? static_cast<uint64_t>(in.tree_mask[b * in.mask_s0 + (pr / G) * in.mask_s1 + kt])
          : ~0ull;
}

// Key-major tile: P^T = 2^(c S^T - lse2) in st and dS^T = P^T (dP^T - delta) in dpt, on the keys
// (rows) below `keys` that the query (column) sees.
__device__ __forceinline__ void dst_tile(float (&st)[8][4], float (&dpt)[8][4], float c, int keys,
                                         const float* lse2, const float* dl, const uint64_t* words,
                                         int warp, int gr, int tq) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = warp * 16 + gr + 8 * (e >> 1), col = nt * 8 + 2 * tq + (e & 1);
      const bool visible = key < keys && ((words[col] >> key) & 1ull);
      const float p = visible ? exp2f(st[nt][e] * c - lse2[col]) : 0.f;
      dpt[nt][e] = visible ? p * (dpt[nt][e] - dl[col]) : 0.f;  // dS^T (0, not 0 * NaN)
      st[nt][e] = p;                                            // P^T
    }
}

// Where a dK/dV block writes: the gradient tensors (dtype T, dk scaled by sm_scale), or, when a
// shared cache's rows are split over gridDim.z, split z's fp32 partial (dk unscaled) at slice z
// of dk, dv ([splits][L][Hkv][D] each, in the workspace).
struct DkvPartials {
  float* dk;  // null: no split
  float* dv;
  int rows_per_split;  // rows b in [z rows_per_split, (z + 1) rows_per_split) of a shared cache
};

// dk, dv rows of keys key0 + 8 rh of `owner` (dk scaled by sm_scale, or the fp32 partials).
template <class T, int D, bool TREE>
__device__ __forceinline__ void store_dkv(const BackwardArgs& args, const DkvPartials& part,
                                          int owner, int g, int key0, int tq,
                                          const float (&dk)[D / 8][4],
                                          const float (&dv)[D / 8][4]) {
  const Inputs& in = args.in;
  const int total_keys = TREE ? in.N : in.L;
  const float scale = static_cast<float>(in.sm_scale);
  const int64_t slice = static_cast<int64_t>(blockIdx.z) * in.L * in.Hkv * D;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int key = key0 + 8 * rh;
    if (key >= total_keys) continue;
    const int64_t off =
        ((static_cast<int64_t>(owner) * total_keys + key) * in.Hkv + g) * D + 2 * tq;
    if (!TREE && part.dk != nullptr) {
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<float2*>(part.dk + slice + off + dt * 8) =
            make_float2(dk[dt][2 * rh], dk[dt][2 * rh + 1]);
        *reinterpret_cast<float2*>(part.dv + slice + off + dt * 8) =
            make_float2(dv[dt][2 * rh], dv[dt][2 * rh + 1]);
      }
      continue;
    }
    T* dk_base = static_cast<T*>(TREE ? args.dk_tree : args.dk_cache);
    T* dv_base = static_cast<T*>(TREE ? args.dv_tree : args.dv_cache);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dk_base + off + dt * 8) =
          pack2<T>(dk[dt][2 * rh] * scale, dk[dt][2 * rh + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv_base + off + dt * 8) =
          pack2<T>(dv[dt][2 * rh], dv[dt][2 * rh + 1]);
    }
  }
}

// TREE = false: cache keys, blockIdx.x = (cache row bc, kv head g, key tile of L), blockIdx.z =
// the split of a shared cache's rows; TREE = true: tree keys, blockIdx.x = (row b, kv head g,
// key tile of N).
template <class T, int D, bool TREE>
__global__ void __launch_bounds__(kThreads)
    dkv_tc_kernel(BackwardArgs args, const float* delta, int key_tiles, DkvPartials part) {
  constexpr int LDS = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t seen_scratch[32];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BN * LDS;
  T* Qs = Vs + BN * LDS;                                              // [2][BM][LDS]
  T* dOs = Qs + 2 * BM * LDS;                                         // [2][BM][LDS]
  float* lse2_s = reinterpret_cast<float*>(dOs + 2 * BM * LDS);       // [2][BM]
  float* delta_s = lse2_s + 2 * BM;                                   // [2][BM]
  uint64_t* words_s = reinterpret_cast<uint64_t*>(delta_s + 2 * BM);  // [2][BM]

  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G, q_tiles = (R + BM - 1) / BM;
  const int kt = blockIdx.x % key_tiles, g = (blockIdx.x / key_tiles) % in.Hkv;
  const int owner = blockIdx.x / (key_tiles * in.Hkv);  // cache row (TREE: batch row)
  const int k0 = kt * BN;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gr = lane / 4, tq = lane % 4;
  const int total_keys = TREE ? in.N : in.L;

  // Rows whose queries see these keys: a shared cache (Bc = 1) is seen by all B rows (this
  // split's range of them), a cache row or a tree row by its own row.
  const bool shared = !TREE && in.Bc == 1;
  const int b_first = shared ? static_cast<int>(blockIdx.z) * part.rows_per_split : owner;
  const int b_count = shared ? max(0, min(part.rows_per_split, in.B - b_first)) : 1;
  auto keys_seen = [&](int b) { return min(BN, (TREE ? in.N : prefix_len(in, b)) - k0); };
  const int units = b_count * q_tiles;  // (row, query tile) pairs, in a fixed order

  auto load_unit = [&](int u, int buf) {
    const int b = b_first + u / q_tiles, row0 = (u % q_tiles) * BM;
    if (keys_seen(b) <= 0) return;
    load_query_tile<T, D>(Qs + buf * BM * LDS, in.q, b, g, G, R, row0, tid);
    load_query_tile<T, D>(dOs + buf * BM * LDS, args.grad_out, b, g, G, R, row0, tid);
    if (tid < BM)
      load_query_row_stats<TREE>(args, delta, b, g, row0, kt, tid, lse2_s + buf * BM,
                                 delta_s + buf * BM, words_s + buf * BM);
  };

  // Tree keys that no node of the row sees are zero-filled (block-wide call, uniform).
  const uint64_t visible = TREE ? seen_tree_word(in, owner, 0, in.N, kt, seen_scratch) : ~0ull;
  load_key_tile<T, D>(Ks, Vs, TREE ? in.k_tree : in.k_cache, TREE ? in.v_tree : in.v_cache, owner,
                      k0, min(BN, total_keys - k0), visible, g, tid);
  if (units > 0) load_unit(0, 0);
  cp_async_commit();

  const float c = static_cast<float>(in.sm_scale) * kLog2e;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  for (int u = 0; u < units; ++u) {
    if (u + 1 < units) load_unit(u + 1, (u + 1) & 1);
    cp_async_commit();
    cp_async_wait_1();
    __syncthreads();
    const int keys = keys_seen(b_first + u / q_tiles);
    if (keys > 0) {
      const int buf = u & 1;
      const T* Q = Qs + buf * BM * LDS;
      const T* dO = dOs + buf * BM * LDS;
      float st[8][4], dpt[8][4];
      tile_abt<T, D>(st, Ks, warp * 16, Q, lane);    // S^T = K Q^T   (rows: keys)
      tile_abt<T, D>(dpt, Vs, warp * 16, dO, lane);  // dP^T = V dO^T
      dst_tile(st, dpt, c, keys, lse2_s + buf * BM, delta_s + buf * BM, words_s + buf * BM, warp,
               gr, tq);
      tile_xm<T, D>(dv, st, dO, lane);  // dV += P^T dO
      tile_xm<T, D>(dk, dpt, Q, lane);  // dK += dS^T Q
    }
    __syncthreads();
  }
  store_dkv<T, D, TREE>(args, part, owner, g, k0 + warp * 16 + gr, tq, dk, dv);
}

// dK, dV of a shared cache from the `splits` fp32 partials, summed in split order (the same
// order every run: deterministic), dk scaled by sm_scale, rounded to T. Four consecutive
// elements per thread (L Hkv D is a multiple of 64).
template <class T>
__global__ void __launch_bounds__(256)
    reduce_cache_partials_kernel(BackwardArgs args, DkvPartials part, int splits) {
  const Inputs& in = args.in;
  const int64_t total = static_cast<int64_t>(in.L) * in.Hkv * in.D;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= total) return;
  float4 k = make_float4(0.f, 0.f, 0.f, 0.f), v = k;
  for (int z = 0; z < splits; ++z) {
    const float4 pk = *reinterpret_cast<const float4*>(part.dk + z * total + i);
    const float4 pv = *reinterpret_cast<const float4*>(part.dv + z * total + i);
    k = make_float4(k.x + pk.x, k.y + pk.y, k.z + pk.z, k.w + pk.w);
    v = make_float4(v.x + pv.x, v.y + pv.y, v.z + pv.z, v.w + pv.w);
  }
  const float s = static_cast<float>(in.sm_scale);
  *reinterpret_cast<uint2*>(static_cast<T*>(args.dk_cache) + i) =
      make_uint2(pack2<T>(k.x * s, k.y * s), pack2<T>(k.z * s, k.w * s));
  *reinterpret_cast<uint2*>(static_cast<T*>(args.dv_cache) + i) =
      make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
}

// The dynamic shared-memory limits of the three kernels, set once per device.
template <class T, int D>
cudaError_t configure() {
  static std::atomic<bool> configured[kMaxDevices];
  return once_per_device(configured, [] {
    const int dq_smem = dq_smem_bytes<D>(), dkv_smem = dkv_smem_bytes<D>();
    constexpr auto kAttr = cudaFuncAttributeMaxDynamicSharedMemorySize;
    cudaError_t err = cudaFuncSetAttribute(dq_tc_kernel<T, D>, kAttr, dq_smem);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(dkv_tc_kernel<T, D, false>, kAttr, dkv_smem);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(dkv_tc_kernel<T, D, true>, kAttr, dkv_smem);
    return err;
  });
}

// dK, dV of the cache: one launch over (cache row, kv head, key tile) x row splits, then (split
// only) the reduce of the partials.
template <class T, int D>
void launch_cache_dkv(const BackwardArgs& args, const float* delta, int cache_splits,
                      float* partials, cudaStream_t stream) {
  const Inputs& in = args.in;
  const int cache_tiles = (in.L + BN - 1) / BN;
  if (cache_tiles == 0) return;
  const bool split = in.Bc == 1 && cache_splits > 1;
  const int per = split ? (in.B + cache_splits - 1) / cache_splits : in.B;
  const int splits = split ? (in.B + per - 1) / per : 1;  // no empty split
  const int64_t total = static_cast<int64_t>(in.L) * in.Hkv * D;
  const DkvPartials part{split ? partials : nullptr,
                         split ? partials + cache_splits * total : nullptr, per};
  dkv_tc_kernel<T, D, false>
      <<<dim3(in.Bc * in.Hkv * cache_tiles, 1, splits), kThreads, dkv_smem_bytes<D>(), stream>>>(
          args, delta, cache_tiles, part);
  if (!split) return;
  const unsigned blocks = static_cast<unsigned>((total / 4 + 255) / 256);
  reduce_cache_partials_kernel<T><<<blocks, 256, 0, stream>>>(args, part, splits);
}

template <class T, int D>
cudaError_t launch(const BackwardArgs& args, const float* delta, int cache_splits, float* partials,
                   cudaStream_t stream) {
  const Inputs& in = args.in;
  const int R = in.N * (in.Hq / in.Hkv);
  const cudaError_t err = configure<T, D>();
  if (err != cudaSuccess) return err;
  dq_tc_kernel<T, D>
      <<<dim3(in.B * in.Hkv, (R + BM - 1) / BM), kThreads, dq_smem_bytes<D>(), stream>>>(args,
                                                                                         delta);
  launch_cache_dkv<T, D>(args, delta, cache_splits, partials, stream);
  const int tree_tiles = (in.N + BN - 1) / BN;
  dkv_tc_kernel<T, D, true><<<in.B * in.Hkv * tree_tiles, kThreads, dkv_smem_bytes<D>(), stream>>>(
      args, delta, tree_tiles, DkvPartials{nullptr, nullptr, 1});
  return cudaGetLastError();
}

// Bytes of the delta vector at the start of the workspace, rounded up so that the partials
// behind it stay 256-byte aligned.
int64_t delta_bytes(const Inputs& in) {
  return (static_cast<int64_t>(in.B) * in.N * in.Hq * 4 + 255) / 256 * 256;
}

}  // namespace

bool backward_tc_supported(const BackwardArgs& args) {
  return forward_tc_supported(args.in) && aligned16(args.grad_out);
}

int backward_tc_cache_splits(const Inputs& in, int num_sms) {
  if (in.Bc != 1 || in.B < 2 || in.L == 0) return 1;
  const int64_t blocks = static_cast<int64_t>(in.Hkv) * ((in.L + BN - 1) / BN);
  const int64_t want = (2 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;  // two waves
  const int64_t splits = std::min<int64_t>({want, in.B, 64});
  if (splits <= 1) return 1;
  const int64_t per = (in.B + splits - 1) / splits;
  return static_cast<int>((in.B + per - 1) / per);  // no empty split
}

int64_t backward_tc_workspace_bytes(const Inputs& in, int cache_splits) {
  const int64_t partials = in.Bc == 1 && cache_splits > 1
                               ? 2 * static_cast<int64_t>(cache_splits) * in.L * in.Hkv * in.D * 4
                               : 0;
  return delta_bytes(in) + partials;
}

cudaError_t tree_attention_backward_tc(const BackwardArgs& args, int cache_splits, void* workspace,
                                       cudaStream_t stream) {
  const Inputs& in = args.in;
  if (static_cast<int64_t>(in.B) * in.N * in.Hq == 0) return cudaSuccess;
  cudaError_t err = launch_backward_delta(args, workspace, stream);
  if (err != cudaSuccess) return err;
  const float* delta = static_cast<const float*>(workspace);
  float* partials = reinterpret_cast<float*>(static_cast<char*>(workspace) + delta_bytes(in));
  const bool half = in.dtype == DType::kFloat16;
  if (in.D == 64)
    return half ? launch<__half, 64>(args, delta, cache_splits, partials, stream)
                : launch<__nv_bfloat16, 64>(args, delta, cache_splits, partials, stream);
  return half ? launch<__half, 128>(args, delta, cache_splits, partials, stream)
              : launch<__nv_bfloat16, 128>(args, delta, cache_splits, partials, stream);
}

}  // namespace vsd_ext::cuda::tree_attn
