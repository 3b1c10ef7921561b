// Tree-mask attention, CPU forward (contract: docs/design/OPS.md section 1).
//
// For each work unit (row b, kv head g, node range; see tree_attention_cpu.h) the G query heads
// of the group are packed into one tile Q [R, D], pre-scaled by c = sm_scale * log2(e).
// FlashAttention-2 online softmax over key tiles, fp32 state per packed row:
//   S = Q K_t^T                       (computed key-major as S^T = K_t Q^T, [Lt, R])
//   m' = max(m, rowmax S);  P = 2^(S - m');  l = l 2^(m - m') + rowsum P
//   O = O 2^(m - m') + P V_t
// Prefix tiles (cache positions [0, prefix_lens[b])) are read without any mask work; the one
// tree tile (the row's N tree keys) gets the bitmask applied to its scores. At the end
// out = O / l and lse = ln2 (m + log2 l); a row that saw nothing gives out = 0, lse = -inf.
// Accumulation is fp32 for fp16/bf16/fp32 inputs; float64 inputs (gradcheck) run in fp64.
#include "tree_attention_cpu.h"
#include "tree_attention_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

namespace vsd_ext::tree_attn {

std::vector<int64_t> host_prefix_lens(const at::Tensor& prefix_lens, int64_t L) {
  const at::Tensor p = prefix_lens.to(at::kLong).contiguous();
  const int64_t* data = p.data_ptr<int64_t>();
  std::vector<int64_t> lens(data, data + p.numel());
  if (!lens.empty()) {
    const auto [lo, hi] = std::minmax_element(lens.begin(), lens.end());
    check_prefix_range(*lo, *hi, L);
  }
  return lens;
}

namespace {

template <class T>
void forward_cpu(const Dims& d, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const std::vector<int64_t>& lens,
                 const at::Tensor& k_tree, const at::Tensor& v_tree, const at::Tensor& tree_mask,
                 double sm_scale, at::Tensor& out, at::Tensor& lse) {
  using A = cpu::acc_t<T>;
  const A c = static_cast<A>(sm_scale * kLog2eD);
  const int64_t G = d.group, D = d.D, N = d.N;
  const int64_t nodes = cpu::nodes_per_unit(d.B, d.Hkv, N, G, at::get_num_threads());
  const int64_t chunks = cpu::ceil_div(N, nodes);
  const int64_t max_keys = std::max(cpu::kKeyTile, N);
  const auto Q4 = cpu::rows4<T>(q), Kc = cpu::rows4<T>(k_cache), Vc = cpu::rows4<T>(v_cache);
  const auto Kt = cpu::rows4<T>(k_tree), Vt = cpu::rows4<T>(v_tree);
  const int64_t* mask = tree_mask.data_ptr<int64_t>();
  const int64_t mask_b = tree_mask.stride(0), mask_n = tree_mask.stride(1);
  T* out_p = out.data_ptr<T>();  // contiguous [B, N, Hq, D]
  A* lse_p = lse.data_ptr<A>();

  cpu::parallel_units(d.B * d.Hkv * chunks, [&] {
    return
        [&, qs = std::vector<A>(nodes * G * D), qt = std::vector<A>(nodes * G * D),
         o_acc = std::vector<A>(nodes * G * D), s = std::vector<A>(nodes * G * max_keys),
         kbuf = std::vector<A>(max_keys * D), vbuf = std::vector<A>(max_keys * D),
         m = std::vector<A>(nodes * G), l = std::vector<A>(nodes * G),
         scratch = std::vector<A>(3 * nodes * G), work = std::vector<A>((D + nodes * G) * max_keys),
         seen = std::vector<int64_t>(d.W)](int64_t unit) mutable {
          const int64_t b = unit / (d.Hkv * chunks), g = (unit / chunks) % d.Hkv;
          const int64_t n0 = (unit % chunks) * nodes, nn = std::min(nodes, N - n0), R = nn * G;
          const int64_t bc = d.Bc == 1 ? 0 : b;
          A* O = o_acc.data();
          cpu::pack_group(Q4, b, n0, nn, g, G, D, qs.data(), c);
          cpu::transpose(qs.data(), R, D, qt.data());
          std::fill(O, O + R * D, A(0));
          std::fill(m.begin(), m.begin() + R, -std::numeric_limits<A>::infinity());
          std::fill(l.begin(), l.begin() + R, A(0));

          // One key tile of n keys (row stride k_rs) and values (v_rs); St [n, R] = K Q^T. On the
          // tree tile, keys that no node of the unit sees are zeroed (their P is 0: 0 * NaN).
          auto step = [&](const T* keys, int64_t k_rs, const T* values, int64_t v_rs, int64_t n,
                          bool tree) {
            int64_t ldk, ldv;
            const A* K = tree ? cpu::tree_rows_as(keys, k_rs, n, D, seen.data(), kbuf.data(), ldk)
                              : cpu::rows_as(keys, k_rs, n, D, kbuf.data(), ldk);
            cpu::scores(n, R, D, K, ldk, qs.data(), qt.data(), s.data(), work.data());
            if (tree) cpu::mask_tree_scores(s.data(), n, R, G, n0, mask + b * mask_b, mask_n);
            cpu::softmax_step(s.data(), n, R, m.data(), l.data(), O, D, scratch.data());
            // O += P V with P[r, j] = St[j, r] (a stride swap, no copy).
            const A* V = tree ? cpu::tree_rows_as(values, v_rs, n, D, seen.data(), vbuf.data(), ldv)
                              : cpu::rows_as(values, v_rs, n, D, vbuf.data(), ldv);
            cpu::gemm(R, D, n, s.data(), 1, R, V, ldv, O, D, true);
          };
          // Prefix: mask-free key tiles.
          for (int64_t j0 = 0; j0 < lens[b]; j0 += cpu::kKeyTile)
            step(Kc.row(bc, j0, g), Kc.s1, Vc.row(bc, j0, g), Vc.s1,
                 std::min(cpu::kKeyTile, lens[b] - j0), false);
          // Tree tile: the row's N tree keys, bitmask applied to the scores.
          cpu::seen_tree_keys(mask + b * mask_b, mask_n, n0, nn, d.W, seen.data());
          step(Kt.row(b, 0, g), Kt.s1, Vt.row(b, 0, g), Vt.s1, N, true);

          // out = O / l, lse = ln2 (m + log2 l); rows that saw nothing: 0 and -inf.
          for (int64_t r = 0; r < R; ++r) {
            const int64_t n = n0 + r / G, h = g * G + r % G;
            const bool seen = l[r] > A(0);
            const A inv = seen ? A(1) / l[r] : A(0);
            T* dst = out_p + ((b * N + n) * d.Hq + h) * D;
            for (int64_t k = 0; k < D; ++k) dst[k] = static_cast<T>(O[r * D + k] * inv);
            lse_p[(b * N + n) * d.Hq + h] =
                seen ? A(kLn2D) * (m[r] + std::log2(l[r])) : -std::numeric_limits<A>::infinity();
          }
        };
  });
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& prefix_lens, const at::Tensor& k_tree, const at::Tensor& v_tree,
    const at::Tensor& tree_mask, double sm_scale) {
  const Dims d =
      check_forward_args(q, k_cache, v_cache, prefix_lens, k_tree, v_tree, tree_mask, sm_scale);
  const std::vector<int64_t> lens = host_prefix_lens(prefix_lens, d.L);
  at::Tensor out = at::empty({d.B, d.N, d.Hq, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.N, d.Hq}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu",
                                  [&] {
                                    forward_cpu<scalar_t>(d, q, k_cache, v_cache, lens, k_tree,
                                                          v_tree, tree_mask, sm_scale, out, lse);
                                  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsd_ext, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace vsd_ext::tree_attn
