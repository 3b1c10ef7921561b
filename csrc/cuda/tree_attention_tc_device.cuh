// Tile helpers shared by the tensor-core tree-attention kernels, forward
// (tree_attention_tc_forward_kernel.cu) and backward (tree_attention_tc_backward_kernel.cu):
// the tile shapes, the cp.async tile loads into padded shared-memory rows, which tree keys a
// block's queries see, and the tile products, whose operands come from shared memory through
// ldmatrix.x4 (fragment mapping: cuda/mma.cuh).
//
// Rows are padded to LDS = D + 8 elements (D + 8 = 72 or 136: 144 or 272 bytes, both multiples of
// 16, so every ldmatrix row address is 16-byte aligned). The 8 rows one 8x8 matrix reads start
// 4 banks apart (144 / 4 = 36 and 272 / 4 = 68 words, both 4 mod 32) and each covers 4 banks:
// the 8 rows hit 32 distinct banks, no conflict.
#pragma once

#include <cstdint>

#include "cuda/mma.cuh"
#include "cuda/tree_attention_device.cuh"

namespace vsd_ext::cuda::tree_attn {

constexpr int BM = 64;         // packed query rows per tile
constexpr int BN = 64;         // keys per tile: one 64-bit mask word per query row on tree tiles
constexpr int kThreads = 128;  // 4 warps of 16 rows each

// Copies rows [row0, row0 + 64) of the packed (b, g) query tile of a [B, N, Hq, D] tensor.
template <class T, int D>
__device__ __forceinline__ void load_query_tile(T* dst, const Strided& src, int b, int g, int G,
                                                int R, int row0, int tid) {
  constexpr int LDS = D + 8, CHUNKS = D / 8;
  for (int e = tid; e < BM * CHUNKS; e += kThreads) {
    const int r = e / CHUNKS, ch = e % CHUNKS, pr = row0 + r;
    const bool valid = pr < R;
    const int n = valid ? pr / G : 0, h = g * G + (valid ? pr % G : 0);
    cp_async16(dst + r * LDS + ch * 8, row_ptr<T>(src, b, n, h) + ch * 8, valid);
  }
}

// Copies keys [base, base + keys) of one kv head into tile rows 0 .. keys - 1 and zero-fills the
// rest up to 64. Rows whose bit in `visible` is clear are zero-filled too, never read: tree keys
// that no query of the block sees. Their P is 0, and 0 * NaN in P V (or dS K) would otherwise
// spread a NaN of an unused key to every query (docs/design/OPS.md).
template <class T, int D>
__device__ __forceinline__ void load_key_tile(T* kd, T* vd, const Strided& k, const Strided& v,
                                              int row, int base, int keys, uint64_t visible, int g,
                                              int tid) {
  constexpr int LDS = D + 8, CHUNKS = D / 8;
  for (int e = tid; e < BN * CHUNKS; e += kThreads) {
    const int j = e / CHUNKS, ch = e % CHUNKS;
    const bool valid = j < keys && ((visible >> j) & 1ull);
    const int key = base + (valid ? j : 0);
    cp_async16(kd + j * LDS + ch * 8, row_ptr<T>(k, row, key, g) + ch * 8, valid);
    cp_async16(vd + j * LDS + ch * 8, row_ptr<T>(v, row, key, g) + ch * 8, valid);
  }
}

// The keys of tree tile tt (word tt of the mask rows) that some node in [n_begin, n_end) of row
// b sees: the OR of their mask words. Block-wide: every thread calls it and gets the result
// (ends synchronized); scratch holds 32 words.
__device__ __forceinline__ uint64_t seen_tree_word(const Inputs& in, int b, int n_begin, int n_end,
                                                   int tt, uint64_t* scratch) {
  uint64_t w = 0;
  for (int n = n_begin + static_cast<int>(threadIdx.x); n < n_end; n += blockDim.x)
    w |= static_cast<uint64_t>(in.tree_mask[b * in.mask_s0 + n * in.mask_s1 + tt]);
  return block_reduce(w, OrOp{}, scratch);
}

// The nodes [first, last] of the packed rows [row0, row0 + BM) below R (G heads per node).
__device__ __forceinline__ int first_node(int row0, int G) { return row0 / G; }
__device__ __forceinline__ int end_node(int row0, int G, int R) {
  return (min(row0 + BM, R) - 1) / G + 1;
}

// A fragments of rows row .. row + 15, k slice kk, of a row-major smem tile: one ldmatrix.x4.
template <class T, int LDS>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row, int kk, int lane) {
  ldsm_x4(a, tile + ldsm_a_offset(lane, row, kk * 16, LDS));
}

// acc[nt] (16 x 8, nt < NT) += A x B, k slice kk, where B(k, n) = bt[n][k] is a row-major
// [n][k] smem tile (K for S = Q K^T): one ldmatrix.x4 per two n tiles.
template <class T, int LDS, int NT>
__device__ __forceinline__ void mma_a_bt(float (&acc)[NT][4], const uint32_t (&a)[4], const T* bt,
                                         int kk, int lane) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t b[4];
    ldsm_x4(b, bt + ldsm_b_nk_offset(lane, np * 16, kk * 16, LDS));
    mma16816_pair<T>(acc[2 * np], acc[2 * np + 1], a, b);
  }
}

// out (16 x D) += X (16 x 64, fp32 accumulators, packed to T as the A operand) x M (64 x D
// row-major smem tile): B(k, n) = M[k][n], one ldmatrix.x4.trans per two 8-column tiles.
template <class T, int D>
__device__ __forceinline__ void tile_xm(float (&out)[D / 8][4], const float (&x)[8][4], const T* m,
                                        int lane) {
  constexpr int LDS = D + 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {
        pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
        pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]), pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_trans(b, m + ldsm_b_kn_offset(lane, kk * 16, dp * 16, LDS));
      mma16816_pair<T>(out[2 * dp], out[2 * dp + 1], a, b);
    }
  }
}

// True when every row of t starts 16-byte aligned (the cp.async tile loads need it).
inline bool aligned16(const Strided& t) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.s0 % 8 == 0 && t.s1 % 8 == 0 &&
         t.s2 % 8 == 0;
}

}  // namespace vsd_ext::cuda::tree_attn
