// CUDA tree attention, tensor-core forward (torch-free): fp16/bf16, D in {64, 128}, any N.
//
// Block = ((b, kv head g), row tile of BM = 64 packed query rows, prefix split). Packed row
// r = n G + hh is query head g G + hh of tree node n: the G heads sharing kv head g sit in one
// tile, so each K/V tile is loaded once per group (GQA). 4 warps, 16 rows each.
// Key tiles of BN = 64 keys, double-buffered in shared memory with cp.async:
//   S = Q K^T      mma.sync m16n8k16 (fp32 accumulators), Q fragments kept in registers
//   online softmax in registers (log2 domain, q pre-scaled by c = sm_scale log2 e):
//                  m' = max(m, rowmax S), P = 2^(S - m'), l = l 2^(m - m') + rowsum P
//   O = O 2^(m - m') + P V   (P re-packed from the S accumulators as the A operand)
// Prefix tiles carry no mask work (only the last, partial one bounds its columns); the tree
// tiles (keys = the row's N tree nodes) read one 64-bit mask word per query row and tile: a
// tile is exactly 64 keys, word tt of node n's mask row. The [N, L] scores never leave
// registers.
// Split-KV: when B * Hkv * row tiles cannot fill the GPU, the prefix tiles are split over
// gridDim.z blocks (the tree tiles go to the last split); each writes (O / l, lse) in fp32 to a
// workspace and a combine kernel merges them: lse = log sum_s e^{lse_s},
// out = sum_s e^{lse_s - lse} O_s.
#include "cuda/tree_attention_tc_device.cuh"

#include <algorithm>

namespace vsd_ext::cuda::tree_attn {
namespace {

template <int D>
constexpr int smem_bytes() {
  return (BM + 4 * BN) * (D + 8) * 2;  // Q + double-buffered K and V, rows padded by 8 elements
}

struct Split {
  int splits, tiles_per_split;
};

// The key tiles of one block: prefix tiles [t_begin, t_begin + n_prefix) clipped to the row's
// prefix of `len` keys, then (last split only) the ceil(N / BN) tree tiles; `count` in all.
struct KeyTiles {
  int t_begin, n_prefix, count, len, nodes;

  __device__ __forceinline__ KeyTiles(const Inputs& in, const Split& sp, int b, int split)
      : t_begin(split * sp.tiles_per_split), len(prefix_len(in, b)), nodes(in.N) {
    const int t_end = min((split + 1) * sp.tiles_per_split, (len + BN - 1) / BN);
    n_prefix = max(0, t_end - t_begin);
    count = n_prefix + (split == sp.splits - 1 ? (in.N + BN - 1) / BN : 0);
  }
  __device__ __forceinline__ bool tree(int i) const { return i >= n_prefix; }
  __device__ __forceinline__ int base(int i) const {
    return i < n_prefix ? (t_begin + i) * BN : (i - n_prefix) * BN;
  }
  __device__ __forceinline__ int keys(int i) const {
    return min(BN, (i < n_prefix ? len : nodes) - base(i));
  }
};

// ---- the steps of one key tile, for this thread's rows wrow and wrow + 8 (rh = 0, 1) ----------

// Score: S = Q K^T (fp32 accumulators), the Q fragments kept in registers, K fragments by
// ldmatrix.x4 (two 8-key column tiles per instruction).
template <class T, int D>
__device__ __forceinline__ void score(float (&s)[BN / 8][4], const uint32_t (&qf)[D / 16][4],
                                      const T* K, int lane) {
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) mma_a_bt<T, D + 8, BN / 8>(s, qf[kk], K, kk, lane);
}

// Mask words of tree tile tt for this thread's rows (0 past the last packed row R).
__device__ __forceinline__ void tree_words(uint64_t (&w)[2], const Inputs& in, int b, int G, int R,
                                           int row, int tt) {
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int pr = row + 8 * rh;
    w[rh] = pr < R
                ? static_cast<uint64_t>(in.tree_mask[b * in.mask_s0 + (pr / G) * in.mask_s1 + tt])
                : 0ull;
  }
}

// Mask: scale by c; when `masked`, columns past `keys` or with a clear mask bit become -inf.
__device__ __forceinline__ void scale_and_mask(float (&s)[BN / 8][4], float c, bool masked,
                                               int keys, const uint64_t (&w)[2], int tq) {
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * tq + (e & 1);
      float v = s[nt][e] * c;
      if (masked && (col >= keys || !((w[e >> 1] >> col) & 1ull))) v = -INFINITY;
      s[nt][e] = v;
    }
}

// Softmax: the online update m' = max(m, rowmax S), P = 2^(S - m') (in s), l = l 2^(m - m') +
// rowsum P, O = O 2^(m - m'). A row is spread over the 4 lanes of a quad; l stays a per-lane
// partial sum, reduced over the quad at the end.
template <int D>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], float (&o)[D / 8][4],
                                               float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rh], s[nt][2 * rh + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(kFullWarp, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFullWarp, mx, 2));
    const float m_new = fmaxf(m[rh], mx);
    const float shift = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: 2^(-inf) = 0
    const float alpha = exp2f(m[rh] - shift);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      s[nt][2 * rh] = exp2f(s[nt][2 * rh] - shift);
      s[nt][2 * rh + 1] = exp2f(s[nt][2 * rh + 1] - shift);
      sum += s[nt][2 * rh] + s[nt][2 * rh + 1];
    }
    l[rh] = l[rh] * alpha + sum;
    m[rh] = m_new;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][2 * rh] *= alpha;
      o[dt][2 * rh + 1] *= alpha;
    }
  }
}

// Store: O / l and lse = ln2 (m + log2 l), or an empty (0, -inf) result, into out and lse, or
// (split-KV) in fp32 into the split's workspace slice.
template <class T, int D>
__device__ __forceinline__ void store(const ForwardArgs& args, const Split& sp, int split, int b,
                                      int g, int row, int tq, const float (&o)[D / 8][4],
                                      const float (&m)[2], const float (&l)[2], float* ws_o,
                                      float* ws_lse) {
  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
  const int64_t rows_total = static_cast<int64_t>(in.B) * in.N * in.Hq;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    float lt = l[rh];
    lt += __shfl_xor_sync(kFullWarp, lt, 1);
    lt += __shfl_xor_sync(kFullWarp, lt, 2);
    const int pr = row + 8 * rh;
    if (pr >= R) continue;
    const int64_t q_row = (static_cast<int64_t>(b) * in.N + pr / G) * in.Hq + g * G + pr % G;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    const float lse = lt > 0.f ? kLn2 * (m[rh] + log2f(lt)) : -INFINITY;
    if (sp.splits == 1) {
      T* dst = static_cast<T*>(args.out) + q_row * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const uint32_t v = pack2<T>(o[dt][2 * rh] * inv, o[dt][2 * rh + 1] * inv);
        *reinterpret_cast<uint32_t*>(dst + dt * 8) = v;
      }
      if (tq == 0) static_cast<float*>(args.lse)[q_row] = lse;
    } else {
      float* dst = ws_o + (split * rows_total + q_row) * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(dst + dt * 8) =
            make_float2(o[dt][2 * rh] * inv, o[dt][2 * rh + 1] * inv);
      if (tq == 0) ws_lse[split * rows_total + q_row] = lse;
    }
  }
}

// Block = ((b, kv head g), row tile of BM packed rows, prefix split); load: Q with the first key
// tile, then key tile i + 1 in flight (cp.async) while tile i is scored, masked, soft-maxed and
// accumulated.
template <class T, int D>
__global__ void __launch_bounds__(kThreads)
    forward_tc_kernel(ForwardArgs args, Split sp, float* ws_o, float* ws_lse) {
  constexpr int LDS = D + 8;  // padded smem row: fragment loads hit 32 distinct banks
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ uint64_t seen_scratch[32];
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]
  T* Ks = Qs + BM * LDS;                   // [2][BN][LDS]
  T* Vs = Ks + 2 * BN * LDS;               // [2][BN][LDS]

  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
  const int b = blockIdx.x / in.Hkv, g = blockIdx.x % in.Hkv, bc = in.Bc == 1 ? 0 : b;
  const int row0 = blockIdx.y * BM, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gr = lane / 4, tq = lane % 4;
  const KeyTiles tiles(in, sp, b, split);
  // Rows past the end are zero-filled (P = 0, no NaN), and so are tree keys no query of the
  // block sees. Called by every thread alike (the tree test is uniform over the block).
  auto load_tile = [&](int i, int buf) {
    const bool tree = tiles.tree(i);
    const uint64_t visible = tree ? seen_tree_word(in, b, first_node(row0, G), end_node(row0, G, R),
                                                   i - tiles.n_prefix, seen_scratch)
                                  : ~0ull;
    load_key_tile<T, D>(Ks + buf * BN * LDS, Vs + buf * BN * LDS, tree ? in.k_tree : in.k_cache,
                        tree ? in.v_tree : in.v_cache, tree ? b : bc, tiles.base(i), tiles.keys(i),
                        visible, g, tid);
  };

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  if (tiles.count > 0) {
    // Q tile (group 0, with the first key tile): packed row r -> q[b, r / G, g G + r % G, :].
    load_query_tile<T, D>(Qs, in.q, b, g, G, R, row0, tid);
    load_tile(0, 0);
    cp_async_commit();
  }

  const float c = static_cast<float>(in.sm_scale) * kLog2e;
  const int wrow = warp * 16 + gr;  // this thread's rows in the tile: wrow and wrow + 8
  uint32_t qf[D / 16][4];
  for (int i = 0; i < tiles.count; ++i) {
    if (i + 1 < tiles.count) load_tile(i + 1, (i + 1) & 1);
    cp_async_commit();
    cp_async_wait_1();  // every group but the newest has landed: Q and tile i
    __syncthreads();
    if (i == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a<T, LDS>(qf[kk], Qs, warp * 16, kk, lane);
    }
    float s[BN / 8][4];
    score<T, D>(s, qf, Ks + (i & 1) * BN * LDS, lane);
    // Prefix tiles are mask-free but for the columns of a partial tile; tree tiles read one
    // mask word per row.
    uint64_t w[2] = {~0ull, ~0ull};
    if (tiles.tree(i)) tree_words(w, in, b, G, R, row0 + wrow, i - tiles.n_prefix);
    scale_and_mask(s, c, tiles.tree(i) || tiles.keys(i) < BN, tiles.keys(i), w, tq);
    online_softmax<D>(s, o, m, l);
    tile_xm<T, D>(o, s, Vs + (i & 1) * BN * LDS, lane);  // O += P V (S accumulators as A)
    __syncthreads();  // the next iteration's load overwrites this buffer
  }
  store<T, D>(args, sp, split, b, g, row0 + wrow, tq, o, m, l, ws_o, ws_lse);
}

// Merge of the split partials: one warp per query row.
template <class T, int D>
__global__ void __launch_bounds__(128)
    combine_kernel(ForwardArgs args, int splits, const float* ws_o, const float* ws_lse) {
  const Inputs& in = args.in;
  const int64_t rows_total = static_cast<int64_t>(in.B) * in.N * in.Hq;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows_total) return;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ws_lse[s * rows_total + row]);
  float acc[D / 32] = {};
  float lse = -INFINITY;
  if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += __expf(ws_lse[s * rows_total + row] - mx);
    lse = mx + __logf(sum);
    for (int s = 0; s < splits; ++s) {
      const float wgt = __expf(ws_lse[s * rows_total + row] - lse);  // 0 for an empty split
      const float* src = ws_o + (s * rows_total + row) * D;
#pragma unroll
      for (int i = 0; i < D / 32; ++i) acc[i] += wgt * src[lane + 32 * i];
    }
  }
  T* dst = static_cast<T*>(args.out) + row * D;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) dst[lane + 32 * i] = from_acc<T>(acc[i]);
  if (lane == 0) static_cast<float*>(args.lse)[row] = lse;
}

template <class T, int D>
cudaError_t launch(const ForwardArgs& args, int splits, void* workspace, cudaStream_t stream) {
  const Inputs& in = args.in;
  const int R = in.N * (in.Hq / in.Hkv);
  const int prefix_tiles = (in.L + BN - 1) / BN;
  Split sp{splits, splits > 1 ? (prefix_tiles + splits - 1) / splits : prefix_tiles};
  const int64_t rows_total = static_cast<int64_t>(in.B) * in.N * in.Hq;
  float* ws_o = static_cast<float*>(workspace);
  float* ws_lse = splits > 1 ? ws_o + splits * rows_total * D : nullptr;
  constexpr int smem = smem_bytes<D>();
  static std::atomic<bool> configured[kMaxDevices];  // per device: the limit is set once
  const cudaError_t err = once_per_device(configured, [] {
    return cudaFuncSetAttribute(forward_tc_kernel<T, D>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  });
  if (err != cudaSuccess) return err;
  const dim3 grid(in.B * in.Hkv, (R + BM - 1) / BM, splits);
  forward_tc_kernel<T, D><<<grid, kThreads, smem, stream>>>(args, sp, ws_o, ws_lse);
  if (splits > 1) {
    const unsigned blocks = static_cast<unsigned>((rows_total * 32 + 127) / 128);
    combine_kernel<T, D><<<blocks, 128, 0, stream>>>(args, splits, ws_o, ws_lse);
  }
  return cudaGetLastError();
}

}  // namespace

bool forward_tc_supported(const Inputs& in) {
  return (in.dtype == DType::kFloat16 || in.dtype == DType::kBFloat16) &&
         (in.D == 64 || in.D == 128) && aligned16(in.q) && aligned16(in.k_cache) &&
         aligned16(in.v_cache) && aligned16(in.k_tree) && aligned16(in.v_tree);
}

int forward_tc_splits(const Inputs& in, int num_sms) {
  const int64_t R = static_cast<int64_t>(in.N) * (in.Hq / in.Hkv);
  const int64_t blocks = ((R + BM - 1) / BM) * in.B * in.Hkv;
  const int64_t prefix_tiles = (in.L + BN - 1) / BN;
  // Aim at two waves of blocks; every split keeps at least 4 prefix tiles (256 keys).
  const int64_t want = (2 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  const int64_t most = prefix_tiles / 4;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, most, 64}));
  if (splits <= 1) return 1;
  // No empty trailing splits: splits = ceil(tiles / ceil(tiles / splits)).
  const int64_t per = (prefix_tiles + splits - 1) / splits;
  return static_cast<int>((prefix_tiles + per - 1) / per);
}

int64_t forward_tc_workspace_bytes(const Inputs& in, int splits) {
  if (splits <= 1) return 0;
  const int64_t rows_total = static_cast<int64_t>(in.B) * in.N * in.Hq;
  return static_cast<int64_t>(splits) * rows_total * (in.D + 1) *
         static_cast<int64_t>(sizeof(float));
}

cudaError_t tree_attention_forward_tc(const ForwardArgs& args, int splits, void* workspace,
                                      cudaStream_t stream) {
  const Inputs& in = args.in;
  if (static_cast<int64_t>(in.B) * in.N * in.Hq == 0) return cudaSuccess;
  const bool half = in.dtype == DType::kFloat16;
  if (in.D == 64)
    return half ? launch<__half, 64>(args, splits, workspace, stream)
                : launch<__nv_bfloat16, 64>(args, splits, workspace, stream);
  return half ? launch<__half, 128>(args, splits, workspace, stream)
              : launch<__nv_bfloat16, 128>(args, splits, workspace, stream);
}

}  // namespace vsd_ext::cuda::tree_attn
