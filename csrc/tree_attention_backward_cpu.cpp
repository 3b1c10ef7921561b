// Tree-mask attention, CPU backward: gradients w.r.t. q, k_cache, v_cache, k_tree, v_tree.
//
// With s = sm_scale q.k, P = exp(s - lse) (recomputed from the saved lse, never stored):
//   dV = P^T dO,  dP = dO V^T,  dS = P (dP - delta),  delta = rowsum(dO * O) - dlse,
//   dQ = sm_scale dS K,  dK = sm_scale dS^T Q.
// (dlse enters because d lse / d s_j = P_j.) Scores are recomputed in the log2 domain as in the
// forward: with Q packed as c q (c = sm_scale log2 e), St = K (cQ)^T = log2(e) s and
// P = 2^(St - log2(e) lse); then dK = sm_scale dS^T q = ln2 * dS^T (cQ).
//
// Pass A, one unit per (row b, kv head g) with its G query heads packed (R = N G rows),
// key-major tiles St [n, R] as in the forward:
//   dQ accumulates over every key tile (prefix and tree) in fp32 and is written once;
//   dK_tree, dV_tree of (b, g) are owned by the unit and written directly;
//   dK_cache, dV_cache are written directly too when the unit owns them (Bc = B, or B = 1).
// Pass B, only for a cache shared by B > 1 rows (Bc = 1): one unit per (kv head g, key tile);
// it loops over the rows b that see the tile and accumulates dK, dV in fp32 registers/tiles,
// so the sum over rows needs no atomics, no per-row copies of the cache and is deterministic.
// Pass A then skips the cache gradients (3 GEMMs per tile there, 4 in pass B).
#include "tree_attention_checks.h"
#include "tree_attention_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

namespace vsd_ext::tree_attn {
namespace {

// dst rows (row stride dst_rs) = scale * src [rows, D] (accumulation type A).
template <class T, class A>
void store_rows(const A* src, int64_t rows, int64_t D, T* dst, int64_t dst_rs, A scale) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < D; ++k) dst[i * dst_rs + k] = static_cast<T>(scale * src[i * D + k]);
}

// One backward call: typed views of the inputs and outputs, the constants, and delta.
template <class T>
struct BackwardCall {
  using A = cpu::acc_t<T>;
  static constexpr A kInf = std::numeric_limits<A>::infinity();

  const Dims& d;
  const std::vector<int64_t>& lens;
  int64_t G, D, N, Hq, R;
  A sm_scale, c, log2e, ln2;
  cpu::Rows4<const T> Q4, dO4, O4, Kc, Vc, Kt, Vt;
  const int64_t* mask;
  int64_t mask_b, mask_n;
  at::Tensor lse_c, glse;  // contiguous lse and grad_lse
  const A* lse_p;
  const A* glse_p;  // null without grad_lse
  // Outputs are contiguous: dq [B, N, Hq, D], caches [Bc, L, Hkv, D], tree [B, N, Hkv, D].
  T *dq_p, *dkc_p, *dvc_p, *dkt_p, *dvt_p;
  int64_t kv_rs;      // row stride of the K/V gradients
  bool shared_cache;  // Bc = 1 < B: pass B sums the cache gradients over the rows
  int64_t max_keys;
  // delta[b, n, h] = dO . O - dlse per query, filled by pass A (each unit its own queries) and
  // read again by pass B.
  std::vector<A> delta;

  BackwardCall(const Dims& dims, const at::Tensor& grad_out,
               const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
               const at::Tensor& k_cache, const at::Tensor& v_cache,
               const std::vector<int64_t>& prefix_lens, const at::Tensor& k_tree,
               const at::Tensor& v_tree, const at::Tensor& tree_mask, const at::Tensor& out,
               const at::Tensor& lse, double sm_scale_d, at::Tensor& dq, at::Tensor& dk_cache,
               at::Tensor& dv_cache, at::Tensor& dk_tree, at::Tensor& dv_tree)
      : d(dims),
        lens(prefix_lens),
        G(d.group),
        D(d.D),
        N(d.N),
        Hq(d.Hq),
        R(d.N * d.group),
        sm_scale(static_cast<A>(sm_scale_d)),
        c(static_cast<A>(sm_scale_d * kLog2eD)),
        log2e(static_cast<A>(kLog2eD)),
        ln2(static_cast<A>(kLn2D)),
        Q4(cpu::rows4<T>(q)),
        dO4(cpu::rows4<T>(grad_out)),
        O4(cpu::rows4<T>(out)),
        Kc(cpu::rows4<T>(k_cache)),
        Vc(cpu::rows4<T>(v_cache)),
        Kt(cpu::rows4<T>(k_tree)),
        Vt(cpu::rows4<T>(v_tree)),
        mask(tree_mask.data_ptr<int64_t>()),
        mask_b(tree_mask.stride(0)),
        mask_n(tree_mask.stride(1)),
        lse_c(lse.contiguous()),
        glse(grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor()),
        lse_p(lse_c.data_ptr<A>()),
        glse_p(glse.defined() ? glse.data_ptr<A>() : nullptr),
        dq_p(dq.data_ptr<T>()),
        dkc_p(dk_cache.data_ptr<T>()),
        dvc_p(dv_cache.data_ptr<T>()),
        dkt_p(dk_tree.data_ptr<T>()),
        dvt_p(dv_tree.data_ptr<T>()),
        kv_rs(d.Hkv * d.D),
        shared_cache(d.Bc == 1 && d.B > 1),
        max_keys(std::max(cpu::kKeyTile, d.N)),
        delta(d.B * d.N * d.Hq) {}

  // Packed per-query vectors of (b, g): dst[r] = scale * src[b, n, g G + h], r = n G + h.
  void gather_rows(const A* src, int64_t b, int64_t g, A* dst, A scale) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < G; ++h) dst[n * G + h] = scale * src[(b * N + n) * Hq + g * G + h];
  }
  // lse log2(e) of the packed queries of (b, g); lse = -inf (saw nothing) -> +inf: P = 0.
  void gather_lse2(int64_t b, int64_t g, A* lse2) const {
    gather_rows(lse_p, b, g, lse2, log2e);
    for (int64_t r = 0; r < R; ++r) lse2[r] = lse2[r] == -kInf ? kInf : lse2[r];
  }
};

// Pass A, one unit = (row b, kv head g): dQ, tree gradients, and the cache gradients the unit
// owns. One worker per thread, owning its buffers.
template <class T>
struct PassA {
  using A = cpu::acc_t<T>;
  BackwardCall<T>& k;
  std::vector<A> qs, qt, dos, dot, dqa, st, dpt, kbuf, vbuf, gbuf, lse2, dl;
  std::vector<int64_t> seen;  // tree keys some node of the unit's row sees

  explicit PassA(BackwardCall<T>& call)
      : k(call),
        qs(k.R * k.D),
        qt(k.R * k.D),
        dos(k.R * k.D),
        dot(k.R * k.D),
        dqa(k.R * k.D),
        st(k.R * k.max_keys),
        dpt(k.R * k.max_keys),
        kbuf(k.max_keys * k.D),
        vbuf(k.max_keys * k.D),
        gbuf(k.max_keys * k.D),
        lse2(k.R),
        dl(k.R),
        seen(k.d.W) {}

  // Packs cQ and dO of (b, g) with their transposes, lse2, and delta of the unit's queries.
  void prepare(int64_t b, int64_t g) {
    const int64_t G = k.G, D = k.D, N = k.N;
    cpu::pack_group(k.Q4, b, 0, N, g, G, D, qs.data(), k.c);
    cpu::transpose(qs.data(), k.R, D, qt.data());
    cpu::pack_group(k.dO4, b, 0, N, g, G, D, dos.data(), A(1));
    cpu::transpose(dos.data(), k.R, D, dot.data());
    k.gather_lse2(b, g, lse2.data());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const int64_t row = (b * N + n) * k.Hq + h;
        const T* x = k.dO4.row(b, n, h);
        const T* y = k.O4.row(b, n, h);
        A s = 0;
        for (int64_t i = 0; i < D; ++i) s += static_cast<A>(x[i]) * static_cast<A>(y[i]);
        k.delta[row] = s - (k.glse_p ? k.glse_p[row] : A(0));
      }
    k.gather_rows(k.delta.data(), b, g, dl.data(), A(1));
    std::fill(dqa.begin(), dqa.end(), A(0));
  }

  // One key tile of n keys of row b; writes dK/dV of the tile to (dk, dv) rows when given. On
  // the tree tile, keys that no node of the row sees are zeroed (their P and dS are 0: 0 * NaN).
  void key_tile(int64_t b, const T* keys, int64_t k_rs, const T* values, int64_t v_rs, int64_t n,
                bool tree, T* dk, T* dv) {
    const int64_t R = k.R, D = k.D;
    int64_t ldk, ldv;
    const A* K = tree ? cpu::tree_rows_as(keys, k_rs, n, D, seen.data(), kbuf.data(), ldk)
                      : cpu::rows_as(keys, k_rs, n, D, kbuf.data(), ldk);
    const A* V = tree ? cpu::tree_rows_as(values, v_rs, n, D, seen.data(), vbuf.data(), ldv)
                      : cpu::rows_as(values, v_rs, n, D, vbuf.data(), ldv);
    cpu::gemm(n, R, D, K, ldk, 1, qt.data(), R, st.data(), R, false);    // St = K (cQ)^T
    cpu::gemm(n, R, D, V, ldv, 1, dot.data(), R, dpt.data(), R, false);  // dP^T = V dO^T
    if (tree) cpu::mask_tree_scores(st.data(), n, R, k.G, 0, k.mask + b * k.mask_b, k.mask_n);
    cpu::softmax_backward_tile(st.data(), dpt.data(), n, R, lse2.data(), dl.data());  // P^T, dS^T
    cpu::gemm(R, D, n, dpt.data(), 1, R, K, ldk, dqa.data(), D, true);                // dQ += dS K
    if (dk == nullptr) return;
    cpu::gemm(n, D, R, st.data(), R, 1, dos.data(), D, gbuf.data(), D, false);  // dV = P^T dO
    store_rows(gbuf.data(), n, D, dv, k.kv_rs, A(1));
    cpu::gemm(n, D, R, dpt.data(), R, 1, qs.data(), D, gbuf.data(), D, false);  // dS^T (cQ)
    store_rows(gbuf.data(), n, D, dk, k.kv_rs, k.ln2);
  }

  void operator()(int64_t unit) {
    const Dims& d = k.d;
    const int64_t b = unit / d.Hkv, g = unit % d.Hkv, bc = d.Bc == 1 ? 0 : b;
    const int64_t D = k.D, len = k.lens[b];
    prepare(b, g);
    for (int64_t j0 = 0; j0 < len; j0 += cpu::kKeyTile) {
      const int64_t off = (bc * d.L + j0) * k.kv_rs + g * D;
      key_tile(b, k.Kc.row(bc, j0, g), k.Kc.s1, k.Vc.row(bc, j0, g), k.Vc.s1,
               std::min(cpu::kKeyTile, len - j0), false, k.shared_cache ? nullptr : k.dkc_p + off,
               k.shared_cache ? nullptr : k.dvc_p + off);
    }
    const int64_t toff = b * k.N * k.kv_rs + g * D;
    cpu::seen_tree_keys(k.mask + b * k.mask_b, k.mask_n, 0, k.N, d.W, seen.data());
    key_tile(b, k.Kt.row(b, 0, g), k.Kt.s1, k.Vt.row(b, 0, g), k.Vt.s1, k.N, true, k.dkt_p + toff,
             k.dvt_p + toff);
    for (int64_t r = 0; r < k.R; ++r) {
      const int64_t n = r / k.G, h = g * k.G + r % k.G;
      store_rows(dqa.data() + r * D, 1, D, k.dq_p + ((b * k.N + n) * k.Hq + h) * D, D, k.sm_scale);
    }
  }
};

// Pass B, only for a cache shared by B > 1 rows: one unit = (kv head g, key tile of the cache),
// its dK, dV summed over every row b that sees the tile, in order.
template <class T>
struct PassB {
  using A = cpu::acc_t<T>;
  static constexpr int64_t kTile = cpu::kKeyTile;
  const BackwardCall<T>& k;
  int64_t max_len, tiles;
  std::vector<A> qs, dos, kt, vt, s, dp, dk, dv, lse2, dl;

  PassB(const BackwardCall<T>& call, int64_t max_prefix)
      : k(call),
        max_len(max_prefix),
        tiles(cpu::ceil_div(max_prefix, kTile)),
        qs(k.R * k.D),
        dos(k.R * k.D),
        kt(kTile * k.D),
        vt(kTile * k.D),
        s(k.R * kTile),
        dp(k.R * kTile),
        dk(kTile * k.D),
        dv(kTile * k.D),
        lse2(k.R),
        dl(k.R) {}

  // Row b's contribution to the tile's dK, dV from its first n keys.
  void add_row(int64_t b, int64_t g, int64_t n, int64_t tile_len) {
    const int64_t R = k.R, D = k.D;
    cpu::pack_group(k.Q4, b, 0, k.N, g, k.G, D, qs.data(), k.c);
    cpu::pack_group(k.dO4, b, 0, k.N, g, k.G, D, dos.data(), A(1));
    k.gather_lse2(b, g, lse2.data());
    k.gather_rows(k.delta.data(), b, g, dl.data(), A(1));
    cpu::gemm(R, n, D, qs.data(), D, 1, kt.data(), tile_len, s.data(), n, false);    // S = (cQ) K^T
    cpu::gemm(R, n, D, dos.data(), D, 1, vt.data(), tile_len, dp.data(), n, false);  // dP = dO V^T
    cpu::softmax_backward_rows(s.data(), dp.data(), R, n, lse2.data(), dl.data());
    cpu::gemm(n, D, R, s.data(), 1, n, dos.data(), D, dv.data(), D, true);  // dV += P^T dO
    cpu::gemm(n, D, R, dp.data(), 1, n, qs.data(), D, dk.data(), D, true);  // dK += dS^T (cQ)
  }

  void operator()(int64_t unit) {
    const int64_t D = k.D;
    const int64_t g = unit / tiles, j0 = (unit % tiles) * kTile;
    const int64_t tile_len = std::min(kTile, max_len - j0);
    std::fill(dk.begin(), dk.end(), A(0));
    std::fill(dv.begin(), dv.end(), A(0));
    // K^T, V^T [D, tile_len] once per tile: the row-major right operands of S = (cQ) K^T and
    // dP = dO V^T; a row that sees only the first n keys uses the first n columns.
    for (int64_t j = 0; j < tile_len; ++j)
      for (int64_t i = 0; i < D; ++i) {
        kt[i * tile_len + j] = static_cast<A>(k.Kc.row(0, j0 + j, g)[i]);
        vt[i * tile_len + j] = static_cast<A>(k.Vc.row(0, j0 + j, g)[i]);
      }
    for (int64_t b = 0; b < k.d.B; ++b) {
      const int64_t n = std::min(tile_len, k.lens[b] - j0);  // keys of the tile row b sees
      if (n > 0) add_row(b, g, n, tile_len);
    }
    const int64_t off = j0 * k.kv_rs + g * D;
    store_rows(dk.data(), tile_len, D, k.dkc_p + off, k.kv_rs, k.ln2);
    store_rows(dv.data(), tile_len, D, k.dvc_p + off, k.kv_rs, A(1));
  }
};

template <class T>
void backward_cpu(BackwardCall<T>& call) {
  cpu::parallel_units(call.d.B * call.d.Hkv, [&] { return PassA<T>(call); });
  if (!call.shared_cache) return;
  const int64_t max_len = *std::max_element(call.lens.begin(), call.lens.end());
  const int64_t tiles = cpu::ceil_div(max_len, cpu::kKeyTile);
  cpu::parallel_units(call.d.Hkv * tiles, [&] { return PassB<T>(call, max_len); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& prefix_lens,
    const at::Tensor& k_tree, const at::Tensor& v_tree, const at::Tensor& tree_mask,
    const at::Tensor& out, const at::Tensor& lse, double sm_scale) {
  const Dims d =
      check_forward_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale);
  check_backward_args(d, q, grad_out, grad_lse, out, lse);
  const std::vector<int64_t> lens = host_prefix_lens(prefix_lens, d.L);
  at::Tensor dq = at::empty({d.B, d.N, d.Hq, d.D}, q.options());
  // Cache positions no row sees keep a zero gradient.
  at::Tensor dk_cache = at::zeros({d.Bc, d.L, d.Hkv, d.D}, q.options());
  at::Tensor dv_cache = at::zeros({d.Bc, d.L, d.Hkv, d.D}, q.options());
  at::Tensor dk_tree = at::empty({d.B, d.N, d.Hkv, d.D}, q.options());
  at::Tensor dv_tree = at::empty({d.B, d.N, d.Hkv, d.D}, q.options());
  if (dq.numel() == 0) return {dq.zero_(), dk_cache, dv_cache, dk_tree.zero_(), dv_tree.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_backward_cpu", [&] {
        BackwardCall<scalar_t> call(d, grad_out, grad_lse, q, k_cache, v_cache, lens, k_tree,
                                    v_tree, tree_mask, out, lse, sm_scale, dq, dk_cache, dv_cache,
                                    dk_tree, dv_tree);
        backward_cpu(call);
      });
  return {dq, dk_cache, dv_cache, dk_tree, dv_tree};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsd_ext, CPU, m) {
  m.impl("tree_attention_backward", &tree_attention_backward_cpu);
}

}  // namespace vsd_ext::tree_attn
