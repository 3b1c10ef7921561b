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

template <class T>
cpu::Rows4<const T> rows4(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// dst rows (row stride dst_rs) = scale * src [rows, D] (accumulation type A).
template <class T, class A>
void store_rows(const A* src, int64_t rows, int64_t D, T* dst, int64_t dst_rs, A scale) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < D; ++k) dst[i * dst_rs + k] = static_cast<T>(scale * src[i * D + k]);
}

template <class T>
void backward_cpu(const Dims& d, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                  const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::vector<int64_t>& lens, const at::Tensor& k_tree, const at::Tensor& v_tree,
                  const at::Tensor& tree_mask, const at::Tensor& out, const at::Tensor& lse, double sm_scale_d,
                  at::Tensor& dq, at::Tensor& dk_cache, at::Tensor& dv_cache, at::Tensor& dk_tree,
                  at::Tensor& dv_tree) {
  using A = cpu::acc_t<T>;
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const int64_t G = d.group, D = d.D, N = d.N, Hq = d.Hq, R = N * G;
  const A sm_scale = static_cast<A>(sm_scale_d), c = static_cast<A>(sm_scale_d * kLog2eD);
  const A log2e = static_cast<A>(kLog2eD), ln2 = static_cast<A>(kLn2D);
  const auto Q4 = rows4<T>(q), dO4 = rows4<T>(grad_out), O4 = rows4<T>(out);
  const auto Kc = rows4<T>(k_cache), Vc = rows4<T>(v_cache), Kt = rows4<T>(k_tree), Vt = rows4<T>(v_tree);
  const int64_t* mask = tree_mask.data_ptr<int64_t>();
  const int64_t mask_b = tree_mask.stride(0), mask_n = tree_mask.stride(1);
  const at::Tensor lse_c = lse.contiguous();
  const A* lse_p = lse_c.data_ptr<A>();
  const at::Tensor glse = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  const A* glse_p = glse.defined() ? glse.data_ptr<A>() : nullptr;
  // Outputs are contiguous: dq [B, N, Hq, D], caches [Bc, L, Hkv, D], tree [B, N, Hkv, D].
  T* dq_p = dq.data_ptr<T>();
  T* dkc_p = dk_cache.data_ptr<T>();
  T* dvc_p = dv_cache.data_ptr<T>();
  T* dkt_p = dk_tree.data_ptr<T>();
  T* dvt_p = dv_tree.data_ptr<T>();
  const int64_t kv_rs = d.Hkv * D;  // row stride of the K/V gradients
  const bool shared_cache = d.Bc == 1 && d.B > 1;
  const int64_t max_keys = std::max(cpu::kKeyTile, N);

  // delta[b, n, h] = dO . O - dlse per query, filled by pass A (each unit its own queries) and
  // read again by pass B.
  std::vector<A> delta(d.B * N * Hq);
  // Packed per-query vectors of (b, g): index r = n * G + h.
  auto gather_rows = [&](const A* src, int64_t b, int64_t g, A* dst, A scale) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < G; ++h) dst[n * G + h] = scale * src[(b * N + n) * Hq + g * G + h];
  };

  // ---- Pass A: dQ, tree gradients, and cache gradients the unit owns. -----------------------
  cpu::parallel_units(d.B * d.Hkv, [&] {
    return [&, qs = std::vector<A>(R * D), qt = std::vector<A>(R * D), dos = std::vector<A>(R * D),
            dot = std::vector<A>(R * D), dqa = std::vector<A>(R * D), st = std::vector<A>(R * max_keys),
            dpt = std::vector<A>(R * max_keys), kbuf = std::vector<A>(max_keys * D),
            vbuf = std::vector<A>(max_keys * D), gbuf = std::vector<A>(max_keys * D),
            lse2 = std::vector<A>(R), dl = std::vector<A>(R)](int64_t unit) mutable {
      const int64_t b = unit / d.Hkv, g = unit % d.Hkv, bc = d.Bc == 1 ? 0 : b;
      cpu::pack_group(Q4, b, 0, N, g, G, D, qs.data(), c);
      cpu::transpose(qs.data(), R, D, qt.data());
      cpu::pack_group(dO4, b, 0, N, g, G, D, dos.data(), A(1));
      cpu::transpose(dos.data(), R, D, dot.data());
      gather_rows(lse_p, b, g, lse2.data(), log2e);  // lse = -inf (saw nothing) -> +inf: P = 0
      for (A& x : lse2) x = x == -kInf ? kInf : x;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t h = g * G; h < (g + 1) * G; ++h) {
          const int64_t row = (b * N + n) * Hq + h;
          const T* x = dO4.row(b, n, h);
          const T* y = O4.row(b, n, h);
          A s = 0;
          for (int64_t k = 0; k < D; ++k) s += static_cast<A>(x[k]) * static_cast<A>(y[k]);
          delta[row] = s - (glse_p ? glse_p[row] : A(0));
        }
      gather_rows(delta.data(), b, g, dl.data(), A(1));
      std::fill(dqa.begin(), dqa.end(), A(0));

      // One key tile of n keys; writes dK/dV of the tile to (dk, dv) rows when given.
      auto step = [&](const T* keys, int64_t k_rs, const T* values, int64_t v_rs, int64_t n, bool tree, T* dk,
                      T* dv) {
        int64_t ldk, ldv;
        const A* K = cpu::rows_as(keys, k_rs, n, D, kbuf.data(), ldk);
        const A* V = cpu::rows_as(values, v_rs, n, D, vbuf.data(), ldv);
        cpu::gemm(n, R, D, K, ldk, 1, qt.data(), R, st.data(), R, false);   // St = K (cQ)^T
        cpu::gemm(n, R, D, V, ldv, 1, dot.data(), R, dpt.data(), R, false);  // dP^T = V dO^T
        if (tree) cpu::mask_tree_scores(st.data(), n, R, G, 0, mask + b * mask_b, mask_n);
        cpu::softmax_backward_tile(st.data(), dpt.data(), n, R, lse2.data(), dl.data());  // P^T, dS^T
        cpu::gemm(R, D, n, dpt.data(), 1, R, K, ldk, dqa.data(), D, true);  // dQ += dS K
        if (dk == nullptr) return;
        cpu::gemm(n, D, R, st.data(), R, 1, dos.data(), D, gbuf.data(), D, false);  // dV = P^T dO
        store_rows(gbuf.data(), n, D, dv, kv_rs, A(1));
        cpu::gemm(n, D, R, dpt.data(), R, 1, qs.data(), D, gbuf.data(), D, false);  // dS^T (cQ)
        store_rows(gbuf.data(), n, D, dk, kv_rs, ln2);
      };
      for (int64_t j0 = 0; j0 < lens[b]; j0 += cpu::kKeyTile) {
        const int64_t off = (bc * d.L + j0) * kv_rs + g * D;
        step(Kc.row(bc, j0, g), Kc.s1, Vc.row(bc, j0, g), Vc.s1, std::min(cpu::kKeyTile, lens[b] - j0), false,
             shared_cache ? nullptr : dkc_p + off, shared_cache ? nullptr : dvc_p + off);
      }
      const int64_t toff = b * N * kv_rs + g * D;
      step(Kt.row(b, 0, g), Kt.s1, Vt.row(b, 0, g), Vt.s1, N, true, dkt_p + toff, dvt_p + toff);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = r / G, h = g * G + r % G;
        store_rows(dqa.data() + r * D, 1, D, dq_p + ((b * N + n) * Hq + h) * D, D, sm_scale);
      }
    };
  });
  if (!shared_cache) return;

  // ---- Pass B: cache gradients of a cache shared by all rows, summed over rows. -------------
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());
  const int64_t tiles = cpu::ceil_div(max_len, cpu::kKeyTile);
  cpu::parallel_units(d.Hkv * tiles, [&] {
    return [&, qs = std::vector<A>(R * D), dos = std::vector<A>(R * D),
            kt = std::vector<A>(cpu::kKeyTile * D), vt = std::vector<A>(cpu::kKeyTile * D),
            s = std::vector<A>(R * cpu::kKeyTile), dp = std::vector<A>(R * cpu::kKeyTile),
            dk = std::vector<A>(cpu::kKeyTile * D), dv = std::vector<A>(cpu::kKeyTile * D),
            lse2 = std::vector<A>(R), dl = std::vector<A>(R)](int64_t unit) mutable {
      const int64_t g = unit / tiles, j0 = (unit % tiles) * cpu::kKeyTile;
      const int64_t tile_len = std::min(cpu::kKeyTile, max_len - j0);
      std::fill(dk.begin(), dk.end(), A(0));
      std::fill(dv.begin(), dv.end(), A(0));
      // K^T, V^T [D, tile_len] once per tile: the row-major right operands of S = (cQ) K^T and
      // dP = dO V^T; a row that sees only the first n keys uses the first n columns.
      for (int64_t j = 0; j < tile_len; ++j)
        for (int64_t k = 0; k < D; ++k) {
          kt[k * tile_len + j] = static_cast<A>(Kc.row(0, j0 + j, g)[k]);
          vt[k * tile_len + j] = static_cast<A>(Vc.row(0, j0 + j, g)[k]);
        }
      for (int64_t b = 0; b < d.B; ++b) {
        const int64_t n = std::min(tile_len, lens[b] - j0);  // keys of the tile row b sees
        if (n <= 0) continue;
        cpu::pack_group(Q4, b, 0, N, g, G, D, qs.data(), c);
        cpu::pack_group(dO4, b, 0, N, g, G, D, dos.data(), A(1));
        gather_rows(lse_p, b, g, lse2.data(), log2e);
        for (A& x : lse2) x = x == -kInf ? kInf : x;
        gather_rows(delta.data(), b, g, dl.data(), A(1));
        cpu::gemm(R, n, D, qs.data(), D, 1, kt.data(), tile_len, s.data(), n, false);    // S = (cQ) K^T
        cpu::gemm(R, n, D, dos.data(), D, 1, vt.data(), tile_len, dp.data(), n, false);  // dP = dO V^T
        cpu::softmax_backward_rows(s.data(), dp.data(), R, n, lse2.data(), dl.data());
        cpu::gemm(n, D, R, s.data(), 1, n, dos.data(), D, dv.data(), D, true);   // dV += P^T dO
        cpu::gemm(n, D, R, dp.data(), 1, n, qs.data(), D, dk.data(), D, true);   // dK += dS^T (cQ)
      }
      const int64_t off = j0 * kv_rs + g * D;
      store_rows(dk.data(), tile_len, D, dkc_p + off, kv_rs, ln2);
      store_rows(dv.data(), tile_len, D, dvc_p + off, kv_rs, A(1));
    };
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& prefix_lens, const at::Tensor& k_tree,
    const at::Tensor& v_tree, const at::Tensor& tree_mask, const at::Tensor& out, const at::Tensor& lse,
    double sm_scale) {
  const Dims d = check_forward_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask);
  check_backward_args(d, q, grad_out, grad_lse, out, lse);
  const std::vector<int64_t> lens = host_prefix_lens(prefix_lens, d.L);
  at::Tensor dq = at::empty({d.B, d.N, d.Hq, d.D}, q.options());
  // Cache positions no row sees keep a zero gradient.
  at::Tensor dk_cache = at::zeros({d.Bc, d.L, d.Hkv, d.D}, q.options());
  at::Tensor dv_cache = at::zeros({d.Bc, d.L, d.Hkv, d.D}, q.options());
  at::Tensor dk_tree = at::empty({d.B, d.N, d.Hkv, d.D}, q.options());
  at::Tensor dv_tree = at::empty({d.B, d.N, d.Hkv, d.D}, q.options());
  if (dq.numel() == 0) return {dq.zero_(), dk_cache, dv_cache, dk_tree.zero_(), dv_tree.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_backward_cpu", [&] {
    backward_cpu<scalar_t>(d, grad_out, grad_lse, q, k_cache, v_cache, lens, k_tree, v_tree, tree_mask, out, lse,
                           sm_scale, dq, dk_cache, dv_cache, dk_tree, dv_tree);
  });
  return {dq, dk_cache, dv_cache, dk_tree, dv_tree};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsd_ext, CPU, m) { m.impl("tree_attention_backward", &tree_attention_backward_cpu); }

}  // namespace vsd_ext::tree_attn
