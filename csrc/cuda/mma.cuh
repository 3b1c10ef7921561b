// Tensor-core building blocks of the CUDA kernels (sm_80+: cp.async, ldmatrix, mma.sync m16n8k16
// with fp32 accumulation), used by the tree-attention forward and backward. Fragment layouts (PTX
// ISA, m16n8k16, g = lane / 4, t = lane % 4; each register holds two 16-bit values, lower index
// in the low half):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8, fp32): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so the C fragments of two adjacent 8-column tiles form the A fragment of a 16-wide k slice.
//
// Operands come from shared memory through ldmatrix.x4: one instruction loads four 8x8 matrices
// of 16-bit elements. Lane l gives the address of row l % 8 of matrix l / 8 (16-byte aligned).
// Plain, lane (g, t) receives in register i the elements (row g, columns 2t, 2t+1) of matrix i;
// with .trans it receives (rows 2t, 2t+1, column g). Which rows the lanes address is the whole
// fragment mapping; the three cases the kernels use (each one instruction for what took four
// 32-bit or eight 16-bit shared loads):
//   ldsm_a_offset     A of rows r0..r0+15, k0..k0+15 of a row-major [m][k] tile, plain:
//                     matrices (r0, k0), (r0+8, k0), (r0, k0+8), (r0+8, k0+8) = a0, a1, a2, a3.
//   ldsm_b_nk_offset  B of two 8-column n tiles n0, n0+8 from a row-major [n][k] tile (K in
//                     S = Q K^T: B(k, n) = K[n][k]), plain: matrices (n0, k0), (n0, k0+8),
//                     (n0+8, k0), (n0+8, k0+8) = b0, b1 of tile n0, then b0, b1 of tile n0+8
//                     (plain row g, columns 2t.. of matrix (n, k) is B(k 2t.., n g)).
//   ldsm_b_kn_offset  B of two 8-column n tiles n0, n0+8 from a row-major [k][n] tile (V in
//                     O += P V), .trans: matrices (k0, n0), (k0+8, n0), (k0, n0+8), (k0+8, n0+8)
//                     = b0, b1 of tile n0, then of tile n0+8 (.trans gives rows 2t.., column g).
// The offset functions are plain C++: tests/test_mma_layout.py compiles them on the host with an
// emulation of ldmatrix and checks every lane's registers against the layouts above.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace vsd_ext::cuda {

// ---- ldmatrix.x4 lane addresses: element offsets into a row-major tile of row stride lds ------

// Lane l addresses row l % 8 of matrix l / 8; matrix i sits at (+8 rows if i & 1, +8 columns if
// i & 2): the row-first order of ldsm_a_offset and ldsm_b_kn_offset.
VSD_HD int ldsm_row_first(int lane, int row0, int col0, int lds) {
  return (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * lds + col0 + (lane >> 4) * 8;
}
// Matrix i at (+8 rows if i & 2, +8 columns if i & 1): the column-first order of ldsm_b_nk_offset.
VSD_HD int ldsm_col_first(int lane, int row0, int col0, int lds) {
  return (row0 + (lane & 7) + (lane >> 4) * 8) * lds + col0 + ((lane >> 3) & 1) * 8;
}

VSD_HD int ldsm_a_offset(int lane, int r0, int k0, int lds) {
  return ldsm_row_first(lane, r0, k0, lds);
}
VSD_HD int ldsm_b_nk_offset(int lane, int n0, int k0, int lds) {
  return ldsm_col_first(lane, n0, k0, lds);
}
VSD_HD int ldsm_b_kn_offset(int lane, int k0, int n0, int lds) {
  return ldsm_row_first(lane, k0, n0, lds);
}

}  // namespace vsd_ext::cuda

#ifdef __CUDACC__
#include "cuda/common.cuh"

namespace vsd_ext::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; valid = false zero-fills (src-size 0, nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Four 8x8 matrices of 16-bit elements from shared memory (lane addresses: the offsets above).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// D (16x8, fp32) += A (16x16, row) * B (16x8, col).
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// acc0 += A B and acc1 += A B' for the two 8-column n tiles of one ldmatrix.x4 B load: b[0], b[1]
// are (b0, b1) of the first, b[2], b[3] of the second.
template <class T>
__device__ __forceinline__ void mma16816_pair(float (&acc0)[4], float (&acc1)[4],
                                              const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  mma16816<T>(acc0, a, b[0], b[1]);
  mma16816<T>(acc1, a, b[2], b[3]);
}

// Two fp32 values as one register of two 16-bit values, `lo` in the low half (lower index).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

}  // namespace vsd_ext::cuda
#endif  // __CUDACC__
