// Small fp32 (and fp64) GEMM for the CPU tree-attention tiles (declared in tree_attention_cpu.h).
//
// Why not at::mm: the tiles are small ([Lt, D] x [D, R] with R, Lt ~ 256, D ~ 128) and are
// multiplied inside our own parallel region, one per thread. Going through the dispatcher and
// a threaded BLAS there costs dispatch overhead per tile and, measured on the target machine,
// nested OpenMP teams that spin against each other; the generic BLAS path also ran at half the
// core's FMA rate. A register-blocked outer-product kernel on L2-resident tiles reaches the
// FMA peak and has no threading of its own.
//
// C[M, N] (+)= A[M, K] B[K, N]: A is read through (row, column) strides so that transposed
// operands (P^T, dS^T in the backward) need no copy; B is row-major with unit column stride.
// Micro-kernel: MR rows x NV vectors of C held in registers; per k, NV vector loads of B,
// MR broadcasts of A, MR * NV FMAs. Vector widths per ISA level (runtime dispatch on x86-64):
// AVX-512 16 floats (8 x 32 tile), AVX2 8 floats (6 x 16), baseline 4 floats (4 x 8); fp64 (the
// float64 path that gradcheck uses) the same with half as many lanes.
#include "cpu_simd.h"
#include "tree_attention_cpu.h"

#include <cstring>

namespace vsd_ext::tree_attn::cpu {
namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v8d __attribute__((vector_size(64)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v2d __attribute__((vector_size(16)));

// Full tile: MR rows, NV whole vectors (V of scalars S) of columns.
template <int MR, int NV, class V, class S>
VSD_ALWAYS_INLINE void micro_full(int64_t K, const S* A, int64_t a_rs, int64_t a_cs, const S* B,
                                  int64_t ldb, S* C, int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(S);
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      if (accumulate)
        std::memcpy(&acc[i][v], C + i * ldc + v * W, sizeof(V));
      else
        acc[i][v] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + v * W, sizeof(V));
    const S* a = A + k * a_cs;
    for (int i = 0; i < MR; ++i) {
      const S ai = a[i * a_rs];
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) std::memcpy(C + i * ldc + v * W, &acc[i][v], sizeof(V));
}

// Column tail (fewer than NV * W columns): B rows copied into zero-padded locals, only the
// first `cols` columns of C stored.
template <int MR, int NV, class V, class S>
VSD_ALWAYS_INLINE void micro_tail(int64_t K, const S* A, int64_t a_rs, int64_t a_cs, const S* B,
                                  int64_t ldb, S* C, int64_t ldc, bool accumulate, int64_t cols) {
  constexpr int W = sizeof(V) / sizeof(S);
  S acc[MR][NV * W];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV * W; ++j) acc[i][j] = (accumulate && j < cols) ? C[i * ldc + j] : S(0);
  for (int64_t k = 0; k < K; ++k) {
    S b[NV * W] = {};
    std::memcpy(b, B + k * ldb, cols * sizeof(S));
    const S* a = A + k * a_cs;
    for (int i = 0; i < MR; ++i) {
      const S ai = a[i * a_rs];
      for (int j = 0; j < NV * W; ++j) acc[i][j] += ai * b[j];
    }
  }
  for (int i = 0; i < MR; ++i) std::memcpy(C + i * ldc, acc[i], cols * sizeof(S));
}

// One block of up to NV * W columns of C over all M rows: the B panel (K x NR) stays in L1
// while the rows stream past it. Row tails go to MR/2, MR/4, ... row kernels.
template <int MR, int NV, class V, class S>
VSD_ALWAYS_INLINE void col_block(int64_t M, int64_t K, const S* A, int64_t a_rs, int64_t a_cs,
                                 const S* B, int64_t ldb, S* C, int64_t ldc, bool accumulate,
                                 int64_t cols) {
  constexpr int64_t NR = NV * sizeof(V) / sizeof(S);
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    if (cols == NR)
      micro_full<MR, NV, V>(K, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, accumulate);
    else
      micro_tail<MR, NV, V>(K, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc, accumulate,
                            cols);
  }
  if constexpr (MR > 1) {
    if (i < M)
      col_block<MR / 2, NV, V>(M - i, K, A + i * a_rs, a_rs, a_cs, B, ldb, C + i * ldc, ldc,
                               accumulate, cols);
  }
}

template <int MR, int NV, class V, class S>
VSD_ALWAYS_INLINE void gemm_impl(int64_t M, int64_t N, int64_t K, const S* A, int64_t a_rs,
                                 int64_t a_cs, const S* B, int64_t ldb, S* C, int64_t ldc,
                                 bool accumulate) {
  constexpr int64_t NR = NV * sizeof(V) / sizeof(S);
  for (int64_t j = 0; j < N; j += NR)
    col_block<MR, NV, V>(M, K, A, a_rs, a_cs, B + j, ldb, C + j, ldc, accumulate,
                         std::min(NR, N - j));
}

// St[j, r] = K_j . Q_r for n keys (rows ldk apart) and R packed queries (Q [R, D] row-major):
// one dot product along D per score. For query tiles much narrower than the outer-product
// kernel's column block (decode: R = nodes * group is 2..8), gemm would compute and discard a
// whole block of padded columns per key; here each key row is read once per query row from L1
// and the work is R * D multiply-adds per key instead of NR * D.
template <class V, class S>
VSD_ALWAYS_INLINE void dots_impl(int64_t n, int64_t R, int64_t D, const S* K, int64_t ldk,
                                 const S* Q, S* St) {
  constexpr int W = sizeof(V) / sizeof(S);
  const int64_t Dv = D / W * W;
  for (int64_t j = 0; j < n; ++j) {
    const S* kj = K + j * ldk;
    for (int64_t r = 0; r < R; ++r) {
      const S* qr = Q + r * D;
      V acc{};
      for (int64_t k = 0; k < Dv; k += W) {
        V a, b;
        std::memcpy(&a, kj + k, sizeof(V));
        std::memcpy(&b, qr + k, sizeof(V));
        acc += a * b;
      }
      S sum = S(0);
      for (int i = 0; i < W; ++i) sum += acc[i];
      for (int64_t k = Dv; k < D; ++k) sum += kj[k] * qr[k];
      St[j * R + r] = sum;
    }
  }
}

template <class S>
using DotsFn = void (*)(int64_t, int64_t, int64_t, const S*, int64_t, const S*, S*);

#define VSD_DOTS_VARIANT(NAME, TARGET, S, V)                                                      \
  TARGET void NAME(int64_t n, int64_t R, int64_t D, const S* K, int64_t ldk, const S* Q, S* St) { \
    dots_impl<V>(n, R, D, K, ldk, Q, St);                                                         \
  }

template <class S>
using GemmFn = void (*)(int64_t, int64_t, int64_t, const S*, int64_t, int64_t, const S*, int64_t,
                        S*, int64_t, bool);

#define VSD_GEMM_VARIANT(NAME, TARGET, S, MR, NV, V)                                        \
  TARGET void NAME(int64_t M, int64_t N, int64_t K, const S* A, int64_t a_rs, int64_t a_cs, \
                   const S* B, int64_t ldb, S* C, int64_t ldc, bool accumulate) {           \
    gemm_impl<MR, NV, V>(M, N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);               \
  }

VSD_GEMM_VARIANT(gemm_base_f, , float, 4, 2, v4f)
VSD_GEMM_VARIANT(gemm_base_d, , double, 4, 2, v2d)
VSD_DOTS_VARIANT(dots_base_f, , float, v4f)
VSD_DOTS_VARIANT(dots_base_d, , double, v2d)

#if VSD_SIMD_X86
VSD_GEMM_VARIANT(gemm_avx512_f, VSD_TARGET_AVX512, float, 8, 2, v16f)
VSD_GEMM_VARIANT(gemm_avx512_d, VSD_TARGET_AVX512, double, 8, 2, v8d)
VSD_GEMM_VARIANT(gemm_avx2_f, VSD_TARGET_AVX2, float, 6, 2, v8f)
VSD_GEMM_VARIANT(gemm_avx2_d, VSD_TARGET_AVX2, double, 6, 2, v4d)

VSD_DOTS_VARIANT(dots_avx512_f, VSD_TARGET_AVX512, float, v16f)
VSD_DOTS_VARIANT(dots_avx512_d, VSD_TARGET_AVX512, double, v8d)
VSD_DOTS_VARIANT(dots_avx2_f, VSD_TARGET_AVX2, float, v8f)
VSD_DOTS_VARIANT(dots_avx2_d, VSD_TARGET_AVX2, double, v4d)

const GemmFn<float> kGemmF = simd::pick<GemmFn<float>>(gemm_avx512_f, gemm_avx2_f, gemm_base_f);
const GemmFn<double> kGemmD = simd::pick<GemmFn<double>>(gemm_avx512_d, gemm_avx2_d, gemm_base_d);
const DotsFn<float> kDotsF = simd::pick<DotsFn<float>>(dots_avx512_f, dots_avx2_f, dots_base_f);
const DotsFn<double> kDotsD = simd::pick<DotsFn<double>>(dots_avx512_d, dots_avx2_d, dots_base_d);
#else
const GemmFn<float> kGemmF = gemm_base_f;
const GemmFn<double> kGemmD = gemm_base_d;
const DotsFn<float> kDotsF = dots_base_f;
const DotsFn<double> kDotsD = dots_base_d;
#endif

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs,
          const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M > 0 && N > 0) kGemmF(M, N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t a_rs, int64_t a_cs,
          const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  if (M > 0 && N > 0) kGemmD(M, N, K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
}

namespace {

template <class S>
void scores_impl(int64_t n, int64_t R, int64_t D, const S* K, int64_t ldk, const S* Q, const S* Qt,
                 S* St, S* work, DotsFn<S> dots, GemmFn<S> gemm) {
  if (n <= 0 || R <= 0) return;
  if (R <= kDotRows) {
    dots(n, R, D, K, ldk, Q, St);
  } else if (R < kWideRows) {
    // S [R, n] = Q Kt with Kt = K^T [D, n]: the outer-product kernel runs over whole blocks
    // of keys (columns) instead of a padded block of R query columns; then St = S^T.
    S* kt = work;
    S* rows = work + D * n;
    transpose(K, n, D, kt, ldk);
    gemm(R, n, D, Q, D, 1, kt, n, rows, n, false);
    transpose(rows, R, n, St);
  } else {
    gemm(n, R, D, K, ldk, 1, Qt, R, St, R, false);
  }
}

}  // namespace

void scores(int64_t n, int64_t R, int64_t D, const float* K, int64_t ldk, const float* Q,
            const float* Qt, float* St, float* work) {
  scores_impl<float>(n, R, D, K, ldk, Q, Qt, St, work, kDotsF, kGemmF);
}

void scores(int64_t n, int64_t R, int64_t D, const double* K, int64_t ldk, const double* Q,
            const double* Qt, double* St, double* work) {
  scores_impl<double>(n, R, D, K, ldk, Q, Qt, St, work, kDotsD, kGemmD);
}

}  // namespace vsd_ext::tree_attn::cpu
