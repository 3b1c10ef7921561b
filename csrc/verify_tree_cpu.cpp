// verify_tree, CPU kernel: batched lossless tree verification (contract: docs/design/OPS.md
// section 2; the rule is specified in vsd_ext/reference/verify_tree.py, the shared arithmetic in
// verify_tree_math.h).
//
// Rows are independent and run in parallel (at::parallel_for). Per row only the nodes the walk
// reaches are read: one pass for the row's max (and its finiteness check), one pass that writes
// e(v) = exp((x_v - M) / T) into a row buffer and sums S. A child's probability is then a gather
// e[token] / S. target_only rejections are O(1) (scalar rejected mass, the token's e zeroed);
// only the final inverse-CDF sample and sampled-mode residual updates cost O(V). The row passes
// (scalar, and AVX2 when the CPU has it) live in verify_tree_rows_cpu.h. One node's decision is
// one function per mode (greedy_step, target_only_step, sampled_step), as in the CUDA kernel
// (cuda/verify_tree_kernel.cu).
// Never materialized: softmax over [B, N, V] (the reference's), any [B, N, V] temporary.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "verify_tree_checks.h"
#include "verify_tree_math.h"
#include "verify_tree_rows_cpu.h"

namespace vsd_ext {
namespace {

using namespace verify;
using namespace verify::cpu;

template <typename L>
struct Problem {
  const L* logits;
  int64_t logits_sb, logits_sn;
  const void* draft_probs;  // float or bfloat16 (the walk's Q); null unless sampled
  int64_t q_sb, q_sn;
  const int64_t* tokens;   // [B, N] contiguous
  const int64_t* parents;  // [B, N] contiguous
  const double* uniforms;  // [B, N + 1] contiguous
  int64_t nodes, vocab;
  int mode;
  double temperature;
  int64_t* accepted_nodes;  // [B, N]
  int64_t* emitted_tokens;  // [B, N]
  int64_t* num_accepted;    // [B]
};

// Per-thread buffers, reused across the rows a thread walks.
struct Workspace {
  std::vector<double> e, tmp, q;
  std::vector<int64_t> first_child, next_sibling, path;
  std::vector<std::pair<int64_t, double>> rejected;  // target_only: (token, e) zeroed in e

  Workspace(int64_t nodes, int64_t vocab, int mode)
      : e(mode == kGreedy ? 0 : vocab),
        tmp(mode == kSampled ? vocab : 0),
        q(mode == kSampled ? vocab : 0),
        first_child(nodes),
        next_sibling(nodes),
        path(nodes) {}
};

// ---- one row ---------------------------------------------------------------------------------

// One row's tree as the walk reads it.
struct Tree {
  const int64_t* tokens;        // [N] draft tokens (-1: padding)
  const int64_t* parents;       // [N]
  const double* u;              // [N + 1]: u[c] decides child c, u[N] draws the final token
  const int64_t* next_sibling;  // children lists (link_children)
  int64_t nodes;
};

// The decision at one node: the accepted child, or -1 and the token emitted instead.
struct Step {
  int64_t accepted = -1;
  int64_t final_token = -1;
};

// The row's first input error (structure node by node, then uniforms) or kNoError.
inline uint64_t check_row(const Tree& t, int64_t vocab) {
  const int64_t N = t.nodes;
  for (int64_t i = 0; i < N; ++i) {
    const uint64_t key = check_node(i, vocab, t.tokens, t.parents[i]);
    if (key != kNoError) return key;
  }
  for (int64_t i = 0; i <= N; ++i) {
    if (!uniform_ok(t.u[i])) return key_uniform(N, i);
  }
  return kNoError;
}

// Children of each node as a list in increasing index order (built back to front).
inline void link_children(const Tree& t, Workspace& ws) {
  std::fill(ws.first_child.begin(), ws.first_child.end(), -1);
  for (int64_t c = t.nodes - 1; c >= 1; --c) {
    if (t.tokens[c] == -1) continue;
    ws.next_sibling[c] = ws.first_child[t.parents[c]];
    ws.first_child[t.parents[c]] = c;
  }
}

// ---- the three modes, one node each (children from `first` on) -------------------------------

// greedy: argmax of the logits row (ties to the lowest index); move to the first child holding it.
template <typename L>
Step greedy_step(const L* row, float max_f, int64_t first, const Tree& t) {
  int64_t argmax = 0;
  while (static_cast<float>(row[argmax]) != max_f) ++argmax;
  for (int64_t c = first; c >= 0; c = t.next_sibling[c]) {
    if (t.tokens[c] == argmax) return {c, -1};
  }
  return {-1, argmax};
}

// target_only: r = p with rejected tokens zeroed: r(c) = e(c) / (S - m), e = exp((x - M) / T)
// in `e` with sum `total`. A repeated sibling token finds e = 0 (already rejected): rejected
// again, m unchanged.
inline Step target_only_step(double* e, double total, int64_t first, const Tree& t, int64_t V,
                             std::vector<std::pair<int64_t, double>>& rejected) {
  double rejected_mass = 0.0;
  rejected.clear();
  for (int64_t c = first; c >= 0; c = t.next_sibling[c]) {
    const int64_t x = t.tokens[c];
    if (accept_target_only(t.u[c], e[x], total, rejected_mass)) return {c, -1};
    rejected_mass += e[x];
    if (e[x] > 0.0) {
      rejected.emplace_back(x, e[x]);
      e[x] = 0.0;
    }
  }
  const double u = t.u[t.nodes];
  const int64_t token = inverse_cdf(e, V, u);
  if (token >= 0) return {-1, token};
  // Every token of positive probability was rejected (reachable only through rounding): the
  // residual is undefined, so the correction comes from p.
  for (const auto& [x, ex] : rejected) e[x] = ex;
  return {-1, inverse_cdf(e, V, u)};
}

// sampled: r_0 = e (sum `total`), q_0 = the draft_probs row in `q` (sum `q_total`), both kept
// unnormalized; `tmp` is the second residual buffer.
inline Step sampled_step(double* e, double total, double* q, double q_total, double* tmp,
                         int64_t first, const Tree& t, int64_t V) {
  double* r = e;
  double* r_next = tmp;
  double r_total = total;
  for (int64_t c = first; c >= 0; c = t.next_sibling[c]) {
    const int64_t x = t.tokens[c];
    if (accept_sampled(t.u[c], r[x], r_total, q[x], q_total)) return {c, -1};
    // r <- norm(max(r - q, 0)) unless that leaves no mass (then r = q up to rounding and this
    // rejection had probability 0: r is kept, so r never leaves p's support);
    // q <- norm(q with x zeroed).
    const double r_sum = residual(r, q, V, r_total, q_total, r_next);
    if (r_sum > 0.0) {
      std::swap(r, r_next);
      r_total = r_sum;
    }
    q[x] = 0.0;
    q_total = block_sum(q, 0, V);
  }
  return {-1, inverse_cdf(r, V, t.u[t.nodes])};  // r always has mass
}

// ---- the walk ---------------------------------------------------------------------------------

// The decision at node `cur` (logits row `row`, max `max_f`); false on invalid draft_probs.
template <typename L, typename Q>
bool decide(const Problem<L>& P, Workspace& ws, const Tree& t, int64_t b, int64_t cur, const L* row,
            float max_f, Step& step) {
  const int64_t V = P.vocab, first = ws.first_child[cur];
  if (P.mode == kGreedy) {
    step = greedy_step(row, max_f, first, t);
    return true;
  }
  double* e = ws.e.data();
  const double total = fill_exp(row, V, static_cast<double>(max_f), P.temperature, e);
  if (first < 0) {
    step = {-1, inverse_cdf(e, V, t.u[t.nodes])};  // bonus from p (e holds its max term 1)
  } else if (P.mode == kTargetOnly) {
    step = target_only_step(e, total, first, t, V, ws.rejected);
  } else {
    double q_total;
    const Q* q_row = static_cast<const Q*>(P.draft_probs) + b * P.q_sb + cur * P.q_sn;
    if (!load_q(q_row, V, ws.q.data(), q_total)) return false;
    step = sampled_step(e, total, ws.q.data(), q_total, ws.tmp.data(), first, t, V);
  }
  return true;
}

// Walks row b; returns kNoError or the row's first error key (outputs then undefined).
template <typename L, typename Q>
uint64_t walk_row(const Problem<L>& P, Workspace& ws, int64_t b) {
  const int64_t N = P.nodes;
  const Tree t{P.tokens + b * N, P.parents + b * N, P.uniforms + b * (N + 1),
               ws.next_sibling.data(), N};
  const uint64_t input_error = check_row(t, P.vocab);
  if (input_error != kNoError) return input_error;
  link_children(t, ws);

  int64_t cur = 0, nacc = 0;
  Step step;
  ws.path[0] = 0;
  while (true) {
    const L* row = P.logits + b * P.logits_sb + cur * P.logits_sn;
    float max_f;
    if (!row_max(row, P.vocab, max_f)) return key_logits(N, cur);
    if (!decide<L, Q>(P, ws, t, b, cur, row, max_f, step)) return key_draft_probs(N, cur);
    if (step.accepted < 0) break;
    ws.path[++nacc] = step.accepted;
    cur = step.accepted;
  }

  int64_t* out_nodes = P.accepted_nodes + b * N;
  int64_t* out_tokens = P.emitted_tokens + b * N;
  for (int64_t k = 0; k < N; ++k) {
    out_nodes[k] = k <= nacc ? ws.path[k] : -1;
    out_tokens[k] = k < nacc ? t.tokens[ws.path[k + 1]] : (k == nacc ? step.final_token : -1);
  }
  P.num_accepted[b] = nacc;
  return kNoError;
}

template <typename L, typename Q>
void run_rows(const Problem<L>& P, int64_t batch, std::vector<uint64_t>& row_error) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(P.nodes, P.vocab, P.mode);
    for (int64_t b = begin; b < end; ++b) row_error[b] = walk_row<L, Q>(P, ws, b);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& parents,
    const at::Tensor& uniforms, const std::optional<at::Tensor>& draft_probs, int64_t mode,
    double temperature) {
  const auto [B, N, V] = check_verify_tree_args(target_logits, draft_tokens, parents, uniforms,
                                                draft_probs, mode, temperature);
  const at::Tensor logits = with_unit_last_stride(target_logits);
  const at::Tensor tokens = draft_tokens.contiguous();
  const at::Tensor par = parents.contiguous();
  const at::Tensor u = uniforms.to(at::kDouble).contiguous();
  std::optional<at::Tensor> q;
  if (mode == kSampled) q = with_unit_last_stride(*draft_probs);

  const auto long_opts = target_logits.options().dtype(at::kLong);
  at::Tensor accepted_nodes = at::empty({B, N}, long_opts);
  at::Tensor emitted_tokens = at::empty({B, N}, long_opts);
  at::Tensor num_accepted = at::empty({B}, long_opts);
  std::vector<uint64_t> row_error(B, kNoError);

  auto run = [&](auto* logits_ptr) {
    using L = std::remove_const_t<std::remove_pointer_t<decltype(logits_ptr)>>;
    Problem<L> P{logits_ptr,
                 logits.stride(0),
                 logits.stride(1),
                 q ? q->data_ptr() : nullptr,
                 q ? q->stride(0) : 0,
                 q ? q->stride(1) : 0,
                 tokens.data_ptr<int64_t>(),
                 par.data_ptr<int64_t>(),
                 u.data_ptr<double>(),
                 N,
                 V,
                 static_cast<int>(mode),
                 temperature,
                 accepted_nodes.data_ptr<int64_t>(),
                 emitted_tokens.data_ptr<int64_t>(),
                 num_accepted.data_ptr<int64_t>()};
    if (q && q->scalar_type() == at::kBFloat16) {
      run_rows<L, c10::BFloat16>(P, B, row_error);
    } else {
      run_rows<L, float>(P, B, row_error);
    }
  };
  switch (logits.scalar_type()) {
    case at::kHalf: run(logits.data_ptr<c10::Half>()); break;
    case at::kBFloat16: run(logits.data_ptr<c10::BFloat16>()); break;
    default: run(logits.data_ptr<float>()); break;
  }

  const auto first_bad =
      std::find_if(row_error.begin(), row_error.end(), [](uint64_t k) { return k != kNoError; });
  if (first_bad != row_error.end()) {
    raise_row_error(batch_key(first_bad - row_error.begin(), uint32_t(*first_bad)), N, V);
  }
  return {accepted_nodes, emitted_tokens, num_accepted};
}

}  // namespace

TORCH_LIBRARY_IMPL(vsd_ext, CPU, m) { m.impl("verify_tree", &verify_tree_cpu); }

}  // namespace vsd_ext
