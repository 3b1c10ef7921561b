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
#include "cuda/mma.cuh"
#include "cuda/tree_attention_device.cuh"

#include <algorithm>

namespace vsd_ext::cuda::tree_attn {
namespace {

constexpr int BM = 64;  // packed query rows per block
constexpr int BN = 64;  // keys per tile: one 64-bit mask word per query row on tree tiles
constexpr int kThreads = 128;

template <int D>
constexpr int smem_bytes() {
  return (BM + 4 * BN) * (D + 8) * 2;  // Q + double-buffered K and V, rows padded by 8 elements
}

struct Split {
  int splits, tiles_per_split;
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) forward_tc_kernel(ForwardArgs args, Split sp, float* ws_o,
                                                                float* ws_lse) {
  constexpr int LDS = D + 8;      // padded smem row: fragment loads hit 32 distinct banks
  constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]
  T* Ks = Qs + BM * LDS;                   // [2][BN][LDS]
  T* Vs = Ks + 2 * BN * LDS;               // [2][BN][LDS]

  const Inputs& in = args.in;
  const int G = in.Hq / in.Hkv, R = in.N * G;
  const int b = blockIdx.x / in.Hkv, g = blockIdx.x % in.Hkv, bc = in.Bc == 1 ? 0 : b;
  const int row0 = blockIdx.y * BM, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gr = lane / 4, tq = lane % 4;
  const int len = prefix_len(in, b);

  // Key tiles of this block: prefix tiles [t_begin, t_end) clipped to the row's prefix, then
  // (last split only) the ceil(N / BN) tree tiles.
  const int t_begin = split * sp.tiles_per_split;
  const int t_end = min((split + 1) * sp.tiles_per_split, (len + BN - 1) / BN);
  const int n_prefix = max(0, t_end - t_begin);
  const int n_tiles = n_prefix + (split == sp.splits - 1 ? (in.N + BN - 1) / BN : 0);

  auto tile_base = [&](int i) { return i < n_prefix ? (t_begin + i) * BN : (i - n_prefix) * BN; };
  auto tile_keys = [&](int i) { return min(BN, (i < n_prefix ? len : in.N) - tile_base(i)); };
  auto load_tile = [&](int i, int buf) {
    const bool tree = i >= n_prefix;
    const int base = tile_base(i), keys = tile_keys(i);
    T* kd = Ks + buf * BN * LDS;
    T* vd = Vs + buf * BN * LDS;
    for (int e = tid; e < BN * CHUNKS; e += kThreads) {
      const int j = e / CHUNKS, ch = e % CHUNKS;
      const bool valid = j < keys;  // rows past the end are zero-filled (P = 0 there, no NaN)
      const int key = base + (valid ? j : 0);
      const T* ksrc = tree ? row_ptr<T>(in.k_tree, b, key, g) : row_ptr<T>(in.k_cache, bc, key, g);
      const T* vsrc = tree ? row_ptr<T>(in.v_tree, b, key, g) : row_ptr<T>(in.v_cache, bc, key, g);
      cp_async16(kd + j * LDS + ch * 8, ksrc + ch * 8, valid);
      cp_async16(vd + j * LDS + ch * 8, vsrc + ch * 8, valid);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  if (n_tiles > 0) {
    // Q tile (group 0, with the first key tile): packed row r -> q[b, r / G, g G + r % G, :].
    for (int e = tid; e < BM * CHUNKS; e += kThreads) {
      const int r = e / CHUNKS, ch = e % CHUNKS, pr = row0 + r;
      const bool valid = pr < R;
      const int n = valid ? pr / G : 0, h = g * G + (valid ? pr % G : 0);
      cp_async16(Qs + r * LDS + ch * 8, row_ptr<T>(in.q, b, n, h) + ch * 8, valid);
    }
    load_tile(0, 0);
    cp_async_commit();
  }

  const float c = static_cast<float>(in.sm_scale) * kLog2e;
  const int wrow = warp * 16 + gr;  // this thread's rows in the tile: wrow and wrow + 8
  uint32_t qf[D / 16][4];
  for (int i = 0; i < n_tiles; ++i) {
    if (i + 1 < n_tiles) load_tile(i + 1, (i + 1) & 1);
    cp_async_commit();
    cp_async_wait_1();  // every group but the newest has landed: Q and tile i
    __syncthreads();
    if (i == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const T* q0 = Qs + wrow * LDS + kk * 16 + 2 * tq;
        qf[kk][0] = ld32(q0);
        qf[kk][1] = ld32(q0 + 8 * LDS);
        qf[kk][2] = ld32(q0 + 8);
        qf[kk][3] = ld32(q0 + 8 * LDS + 8);
      }
    }
    const T* K = Ks + (i & 1) * BN * LDS;
    const T* V = Vs + (i & 1) * BN * LDS;

    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const T* k0 = K + (nt * 8 + gr) * LDS + kk * 16 + 2 * tq;
        mma16816<T>(s[nt], qf[kk], ld32(k0), ld32(k0 + 8));
      }
    }

    // Scale; bound the columns of a partial tile; apply the tree bitmask on tree tiles only.
    const int keys = tile_keys(i);
    const bool tree = i >= n_prefix;
    uint64_t w[2] = {~0ull, ~0ull};
    if (tree) {
      const int tt = i - n_prefix;
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int pr = row0 + wrow + 8 * rh;
        w[rh] = pr < R ? static_cast<uint64_t>(in.tree_mask[b * in.mask_s0 + (pr / G) * in.mask_s1 + tt]) : 0ull;
      }
    }
    const bool masked = tree || keys < BN;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * tq + (e & 1);
        float v = s[nt][e] * c;
        if (masked && (col >= keys || !((w[e >> 1] >> col) & 1ull))) v = -INFINITY;
        s[nt][e] = v;
      }

    // Online softmax, rows wrow (rh = 0) and wrow + 8 (rh = 1); a row is spread over the 4
    // lanes of a quad.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rh], s[nt][2 * rh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
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
      l[rh] = l[rh] * alpha + sum;  // per-lane partial sum, reduced over the quad at the end
      m[rh] = m_new;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * rh] *= alpha;
        o[dt][2 * rh + 1] *= alpha;
      }
    }

    // O += P V: the S accumulators of key columns [16 kk, 16 kk + 16) are the A fragment.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* v0 = V + (kk * 16 + 2 * tq) * LDS + gr;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const T* vp = v0 + dt * 8;
        const uint32_t b0 = ld16(vp) | (ld16(vp + LDS) << 16);
        const uint32_t b1 = ld16(vp + 8 * LDS) | (ld16(vp + 9 * LDS) << 16);
        mma16816<T>(o[dt], a, b0, b1);
      }
    }
    __syncthreads();  // the next iteration's load overwrites this buffer
  }

  // Finalize: O / l and lse = ln2 (m + log2 l), or an empty (0, -inf) result.
  const int64_t rows_total = static_cast<int64_t>(in.B) * in.N * in.Hq;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    float lt = l[rh];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int pr = row0 + wrow + 8 * rh;
    if (pr >= R) continue;
    const int64_t row = (static_cast<int64_t>(b) * in.N + pr / G) * in.Hq + g * G + pr % G;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    const float lse = lt > 0.f ? kLn2 * (m[rh] + log2f(lt)) : -INFINITY;
    if (sp.splits == 1) {
      T* dst = static_cast<T*>(args.out) + row * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const uint32_t v = pack2<T>(o[dt][2 * rh] * inv, o[dt][2 * rh + 1] * inv);
        *reinterpret_cast<uint32_t*>(dst + dt * 8) = v;
      }
      if (tq == 0) static_cast<float*>(args.lse)[row] = lse;
    } else {
      float* dst = ws_o + (split * rows_total + row) * D + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o[dt][2 * rh] * inv, o[dt][2 * rh + 1] * inv);
      if (tq == 0) ws_lse[split * rows_total + row] = lse;
    }
  }
}

// Merge of the split partials: one warp per query row.
template <class T, int D>
__global__ void __launch_bounds__(128) combine_kernel(ForwardArgs args, int splits, const float* ws_o,
                                                      const float* ws_lse) {
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
  cudaError_t err = cudaFuncSetAttribute(forward_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(in.B * in.Hkv, (R + BM - 1) / BM, splits);
  forward_tc_kernel<T, D><<<grid, kThreads, smem, stream>>>(args, sp, ws_o, ws_lse);
  if (splits > 1) {
    const unsigned blocks = static_cast<unsigned>((rows_total * 32 + 127) / 128);
    combine_kernel<T, D><<<blocks, 128, 0, stream>>>(args, splits, ws_o, ws_lse);
  }
  return cudaGetLastError();
}

bool aligned16(const Strided& t) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.s0 % 8 == 0 && t.s1 % 8 == 0 && t.s2 % 8 == 0;
}

}  // namespace

bool forward_tc_supported(const Inputs& in) {
  return (in.dtype == DType::kFloat16 || in.dtype == DType::kBFloat16) && (in.D == 64 || in.D == 128) &&
         aligned16(in.q) && aligned16(in.k_cache) && aligned16(in.v_cache) && aligned16(in.k_tree) &&
         aligned16(in.v_tree);
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
  return static_cast<int64_t>(splits) * rows_total * (in.D + 1) * static_cast<int64_t>(sizeof(float));
}

cudaError_t tree_attention_forward_tc(const ForwardArgs& args, int splits, void* workspace, cudaStream_t stream) {
  const Inputs& in = args.in;
  if (static_cast<int64_t>(in.B) * in.N * in.Hq == 0) return cudaSuccess;
  const bool half = in.dtype == DType::kFloat16;
  if (in.D == 64) return half ? launch<__half, 64>(args, splits, workspace, stream)
                              : launch<__nv_bfloat16, 64>(args, splits, workspace, stream);
  return half ? launch<__half, 128>(args, splits, workspace, stream)
              : launch<__nv_bfloat16, 128>(args, splits, workspace, stream);
}

}  // namespace vsd_ext::cuda::tree_attn
