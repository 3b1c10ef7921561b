// verify_tree, CUDA kernels (torch-free). Same rule and float64 arithmetic as the CPU kernel
// (verify_tree_cpu.cpp, shared formulas in verify_tree_math.h); the reference is
// vsd_ext/reference/verify_tree.py.
//
// Kernel 0, child_flags (non-greedy modes; one thread per (row, node)): marks the nodes that have
// a real child, once, so that no node_stats block scans the parents row for it.
// Kernel 1, node_stats (grid: vocab chunk x node x row): one pass over each real node's logits
// row with 16-byte loads: max, first argmax, finiteness and, for nodes with children
// (non-greedy), S = sum exp((x - M) / T) by a per-thread online rescaled sum; in sampled mode
// also the draft_probs row's sum and validity. All nodes at once, across the whole GPU.
// Kernel 2, walk (one block per row): merges the chunk statistics, builds the children lists,
// gathers every child's e = exp((x_token - M_parent) / T) (and q) into shared memory in
// parallel, then walks the tree over shared memory: no chain of dependent global loads. Each
// thread runs the same scalar walk on the same shared data (identical decisions, no
// broadcasts); the block only cooperates for O(V) work: the final inverse-CDF draw (two passes,
// warp-segmented scan) and, in sampled mode, each rejection's residual sums. The sampled
// residual r_j is never materialized: r_j(v) is replayed from e(v), q(v) and the j recorded
// (R_k, Q_k, x_k) steps with the same per-element operations the CPU applies to its buffer.
// Never materialized: softmax [B, N, V], residual vectors. Deterministic (fixed reduction trees).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda/verify_tree_device.cuh"
#include "cuda/verify_tree_kernel.cuh"
#include "verify_tree_math.h"

namespace vsd_ext::cuda {
namespace {

using namespace vsd_ext::verify;
using namespace vsd_ext::cuda::device;

constexpr int kStatsThreads = 256;
constexpr int64_t kChunk = 8192;  // vocabulary entries per node_stats block
constexpr int kWalkThreads = 512;
constexpr int kWalkWarps = kWalkThreads / 32;

// The kernels' static shared memory, rounded up (the walk's dynamic part gets the rest).
constexpr int kStaticSmemBytes = 4096;

constexpr uint32_t kBadLogits = 1;  // NaN / +inf in the row, or no finite entry
constexpr uint32_t kBadQ = 2;       // draft_probs row negative / non-finite / no mass
constexpr uint32_t kDuplicate = 4;  // an earlier sibling has the same token

struct __align__(16) NodePartial {
  double max;    // max logit of the chunk (-inf if none finite)
  double sum;    // sum exp((x - max) / T) over the chunk (nodes with children, non-greedy)
  double q_sum;  // sum of draft_probs over the chunk (sampled, nodes with children)
  int32_t argmax;
  uint32_t flags;
};

// The launch's device scratch (verify_tree_workspace_bytes).
struct Workspace {
  unsigned long long* error;  // the first bad input's key, kNoError if none
  NodePartial* partials;      // [B, N, chunks]
  uint8_t* has_children;      // [B, N]
};

// ---- kernel 0: which nodes have children ------------------------------------------------------

// has_children[b, i] = 1 iff a real node j > i of row b has parent i (zeroed before the launch).
// Invalid parents are skipped here (the walk reports them); several children of one node store
// the same 1.
__global__ void __launch_bounds__(256)
    child_flags_kernel(VerifyTreeParams p, uint8_t* has_children) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= p.batch * p.nodes) return;
  const int64_t b = k / p.nodes, j = k % p.nodes;
  const int64_t parent = p.parents[k];
  if (j > 0 && p.tokens[k] != -1 && parent >= 0 && parent < j)
    has_children[b * p.nodes + parent] = 1;
}

// ---- kernel 1: per (row, node, vocabulary chunk) statistics ---------------------------------

struct StatsAcc {
  double max, sum;
  int32_t argmax;
  uint32_t flags;
};

// Merges two partial (max, rescaled sum, first argmax): S = s_a e^{(m_a-M)/T} + s_b e^{(m_b-M)/T}.
__device__ __forceinline__ StatsAcc merge(const StatsAcc& a, const StatsAcc& b, double t) {
  StatsAcc r;
  r.max = a.max > b.max ? a.max : b.max;
  r.argmax = a.max > b.max   ? a.argmax
             : b.max > a.max ? b.argmax
                             : (a.argmax < b.argmax ? a.argmax : b.argmax);
  const double sa = a.sum == 0.0 ? 0.0 : a.sum * exp_term(a.max, r.max, t);
  const double sb = b.sum == 0.0 ? 0.0 : b.sum * exp_term(b.max, r.max, t);
  r.sum = sa + sb;
  r.flags = a.flags | b.flags;
  return r;
}

struct MergeOp {
  double t;
  __device__ StatsAcc operator()(const StatsAcc& a, const StatsAcc& b) const {
    return merge(a, b, t);
  }
};

__device__ __forceinline__ StatsAcc shfl_xor(const StatsAcc& a, int o) {
  return {__shfl_xor_sync(kFullWarp, a.max, o), __shfl_xor_sync(kFullWarp, a.sum, o),
          __shfl_xor_sync(kFullWarp, a.argmax, o), __shfl_xor_sync(kFullWarp, a.flags, o)};
}

template <typename TL, typename TQ>
__global__ void __launch_bounds__(kStatsThreads)
    node_stats_kernel(VerifyTreeParams p, int64_t nchunks, const uint8_t* has_children_of,
                      NodePartial* partials) {
  const int64_t N = p.nodes, V = p.vocab;
  const int64_t chunk = blockIdx.x, i = blockIdx.y;
  const int64_t lo = chunk * kChunk, hi = lo + kChunk < V ? lo + kChunk : V;
  const double t = p.temperature;
  __shared__ StatsAcc red[32];
  __shared__ double qred[32];
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const int64_t* tok = p.tokens + b * N;
    if (i > 0 && tok[i] == -1) continue;  // padding rows are never read
    // Only nodes with children need S (their children's probabilities) and q (kernel 0).
    const bool has_children = p.mode != kGreedy && has_children_of[b * N + i] != 0;
    const TL* row = static_cast<const TL*>(p.logits) + b * p.logits_sb + i * p.logits_sn;
    StatsAcc acc{-INFINITY, 0.0, INT32_MAX, 0u};
    for_each_element(row, lo, hi, [&](int64_t v, float xf) {
      const double x = xf;
      if (!(xf < INFINITY)) acc.flags |= kBadLogits;
      if (x > acc.max) {
        if (has_children) {
          acc.sum = (acc.sum == 0.0 ? 0.0 : acc.sum * exp_term(acc.max, x, t)) + 1.0;
        }
        acc.max = x;
        acc.argmax = int32_t(v);
      } else if (has_children && x > -INFINITY) {
        acc.sum += exp_term(x, acc.max, t);
      }
    });
    double q_sum = 0.0;
    uint32_t q_flags = 0;
    const bool want_q = p.mode == kSampled && has_children;
    if (want_q) {
      const TQ* qrow = static_cast<const TQ*>(p.draft_probs) + b * p.q_sb + i * p.q_sn;
      for_each_element(qrow, lo, hi, [&](int64_t, float qf) {
        if (!(qf >= 0.0f && qf < INFINITY)) q_flags |= kBadQ;
        q_sum += static_cast<double>(qf);
      });
    }
    // Block merge: warp butterflies, then the warps in order by thread 0.
    const MergeOp op{t};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc = op(acc, shfl_xor(acc, o));
    acc.flags |= warp_reduce(q_flags, OrOp{});
    q_sum = warp_sum(q_sum);
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
      red[warp] = acc;
      qred[warp] = q_sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      StatsAcc total = red[0];
      double qs = qred[0];
      for (int w = 1; w < int(blockDim.x >> 5); ++w) {
        total = op(total, red[w]);
        qs += qred[w];
      }
      partials[(b * N + i) * nchunks + chunk] = {total.max, total.sum, qs, total.argmax,
                                                 total.flags};
    }
    __syncthreads();
  }
}

// ---- kernel 2: the walk ---------------------------------------------------------------------

struct WalkSmem {
  double *u, *max, *sum, *child_e, *child_q, *q_sum, *step_r, *step_q;
  int *token, *parent, *first_child, *next_sibling, *argmax, *path, *step_x, *step_kept;
  uint32_t* flags;
};

constexpr int kSmemDoubles = 8, kSmemInts = 9;

size_t walk_smem_bytes(int64_t n) {
  return size_t(kSmemDoubles * n + 1) * sizeof(double) + size_t(kSmemInts * n) * sizeof(int);
}

__device__ WalkSmem carve(unsigned char* base, int n) {
  WalkSmem s;
  double* d = reinterpret_cast<double*>(base);
  s.u = d;
  d += n + 1;
  double** dptrs[] = {&s.max, &s.sum, &s.child_e, &s.child_q, &s.q_sum, &s.step_r, &s.step_q};
  for (double** ptr : dptrs) {
    *ptr = d;
    d += n;
  }
  int* k = reinterpret_cast<int*>(d);
  int** iptrs[] = {&s.token,  &s.parent, &s.first_child, &s.next_sibling,
                   &s.argmax, &s.path,   &s.step_x,      &s.step_kept};
  for (int** ptr : iptrs) {
    *ptr = k;
    k += n;
  }
  s.flags = reinterpret_cast<uint32_t*>(k);
  return s;
}

// r_j(v) of the sampled residual after the j rejections recorded at the current node, from
// r_0(v) = e0 and the raw q(v) = q0; *zeroed = v is one of the rejected tokens x_0..x_{j-1}.
// Step k applies exactly the CPU's buffer update r <- residual_step(r, R_k, q_k(v), Q_k)
// unless that step was kept (its residual had no mass).
__device__ __forceinline__ double replay(double e0, double q0, int v, int j, const WalkSmem& s,
                                         bool* zeroed) {
  double r = e0;
  bool z = false;
  for (int k = 0; k < j; ++k) {
    if (!s.step_kept[k]) r = residual_step(r, s.step_r[k], z ? 0.0 : q0, s.step_q[k]);
    z = z || v == s.step_x[k];
  }
  *zeroed = z;
  return r;
}

// ---- walk phases 1-3: inputs into shared memory ----------------------------------------------

// Phase 1. Structure and uniforms (uniforms into s.u): the row's first error in canonical order,
// the smallest key, in every thread.
__device__ __forceinline__ unsigned long long check_row(const VerifyTreeParams& p, int64_t b,
                                                        const WalkSmem& s,
                                                        unsigned long long* kscratch) {
  const int N = int(p.nodes);
  const int64_t* tok_row = p.tokens + b * N;
  const int64_t* par_row = p.parents + b * N;
  unsigned long long local = kNoError;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const unsigned long long k = check_node(i, p.vocab, tok_row, par_row[i]);
    local = k < local ? k : local;
  }
  for (int i = threadIdx.x; i <= N; i += blockDim.x) {
    const int64_t at = b * (N + 1) + i;
    const double u = p.uniforms_dtype == DType::kFloat64
                         ? static_cast<const double*>(p.uniforms)[at]
                         : static_cast<double>(static_cast<const float*>(p.uniforms)[at]);
    s.u[i] = u;
    if (!uniform_ok(u) && key_uniform(N, i) < local) local = key_uniform(N, i);
  }
  return block_reduce(local, MinOp{}, kscratch);
}

// Phase 2, one real node i: merges its chunk statistics (chunks in order) into s.
__device__ __forceinline__ void merge_chunks(const VerifyTreeParams& p, const NodePartial* np,
                                             int64_t nchunks, int i, const WalkSmem& s) {
  double m = -INFINITY;
  uint32_t flags = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    m = np[c].max > m ? np[c].max : m;
    flags |= np[c].flags;
  }
  double sum = 0.0, q_sum = 0.0;
  int amax = -1;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (amax < 0 && np[c].max == m) amax = np[c].argmax;
    if (np[c].sum != 0.0) sum += np[c].sum * exp_term(np[c].max, m, p.temperature);
    q_sum += np[c].q_sum;
  }
  if (!(m > -INFINITY)) flags |= kBadLogits;
  if (p.mode == kSampled && !(q_sum > 0.0)) flags |= kBadQ;
  s.max[i] = m;
  s.sum[i] = sum;
  s.q_sum[i] = q_sum;
  s.argmax[i] = amax;
  s.flags[i] = flags;
}

// Phase 2. Node arrays and, per real node, its merged statistics.
__device__ __forceinline__ void load_nodes(const VerifyTreeParams& p, int64_t b, int64_t nchunks,
                                           const NodePartial* partials, const WalkSmem& s) {
  const int N = int(p.nodes);
  const int64_t* tok_row = p.tokens + b * N;
  const int64_t* par_row = p.parents + b * N;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int tk = int(tok_row[i]);
    s.token[i] = tk;
    s.parent[i] = i == 0 || tk == -1 ? -1 : int(par_row[i]);
    s.first_child[i] = -1;
    s.flags[i] = 0;
    if (tk == -1) continue;
    merge_chunks(p, partials + (b * N + i) * nchunks, nchunks, i, s);
  }
}

// Phase 3. Children lists (increasing index), duplicate sibling tokens, and every child's
// gathered e = exp((x_token - M_parent) / T) and raw q at its parent: N independent loads.
template <typename TL, typename TQ>
__device__ __forceinline__ void link_children(const VerifyTreeParams& p, int64_t b,
                                              const WalkSmem& s) {
  const int N = int(p.nodes);
  for (int c = 1 + threadIdx.x; c < N; c += blockDim.x) {
    const int par = s.parent[c];
    if (par < 0) continue;
    const int x = s.token[c];
    int next = -1;
    for (int j = c + 1; j < N && next < 0; ++j) next = s.parent[j] == par ? j : -1;
    bool first = true, duplicate = false;
    for (int j = par + 1; j < c; ++j) {
      if (s.parent[j] == par) {
        first = false;
        duplicate = duplicate || s.token[j] == x;
      }
    }
    s.next_sibling[c] = next;
    if (first) s.first_child[par] = c;
    if (duplicate) s.flags[c] |= kDuplicate;
    if (p.mode != kGreedy) {
      const TL* prow = static_cast<const TL*>(p.logits) + b * p.logits_sb + par * p.logits_sn;
      s.child_e[c] = exp_term(load_d(prow, x), s.max[par], p.temperature);
      if (p.mode == kSampled) {
        const TQ* qrow = static_cast<const TQ*>(p.draft_probs) + b * p.q_sb + par * p.q_sn;
        s.child_q[c] = load_d(qrow, x);
      }
    }
  }
}

// ---- walk phase 4: the three modes, one node each (children from `first` on) ------------------
// Every thread evaluates the same decisions on the same shared data; thread 0 records them.
// e_of(v) = exp((x_v - M) / T) of the node's logits row.

// The decision at one node: the accepted child, or -1 and the token emitted instead.
struct Step {
  int accepted;
  int64_t final_token;
};

// greedy: the child holding the node's argmax, else the argmax as the final token.
__device__ __forceinline__ Step greedy_step(const WalkSmem& s, int cur, int first) {
  const int a = s.argmax[cur];
  for (int c = first; c >= 0; c = s.next_sibling[c]) {
    if (s.token[c] == a) return {c, -1};
  }
  return {-1, a};
}

// target_only: r = p with rejected tokens zeroed; the rejected tokens are recorded in s.step_x.
template <typename E>
__device__ __forceinline__ Step target_only_step(const VerifyTreeParams& p, const WalkSmem& s,
                                                 int cur, int first, E e_of) {
  const int N = int(p.nodes);
  const double total = s.sum[cur];
  double rejected = 0.0;
  int nrej = 0;
  for (int c = first; c >= 0; c = s.next_sibling[c]) {
    if (s.flags[c] & kDuplicate) continue;  // r(token) is already 0: rejected, m unchanged
    const double ec = s.child_e[c];
    if (accept_target_only(s.u[c], ec, total, rejected)) return {c, -1};
    rejected += ec;
    if (threadIdx.x == 0) s.step_x[nrej] = s.token[c];
    ++nrej;
  }
  __syncthreads();
  auto residual = [&](int64_t v) {
    for (int k = 0; k < nrej; ++k) {
      if (s.step_x[k] == v) return 0.0;
    }
    return e_of(v);
  };
  int64_t token = block_inverse_cdf<kWalkWarps>(residual, p.vocab, s.u[N]);
  // No mass left (reachable only through rounding): the correction comes from p.
  if (token < 0) token = block_inverse_cdf<kWalkWarps>(e_of, p.vocab, s.u[N]);
  return {-1, token};
}

// sampled, one rejection of token x (the j-th at this node, recorded in the step arrays): the
// sums R_{j+1} of r_{j+1} = max(r_j / R_j - q_j / Q_j, 0) and Q_{j+1} of q_{j+1} = q_j with x
// zeroed, over the vocabulary (block-wide, deterministic).
template <typename TQ, typename E>
__device__ __forceinline__ void rejection_sums(const TQ* qrow, int64_t V, int x, int j,
                                               double r_total, double q_total, const WalkSmem& s,
                                               E e_of, double* dscratch, double& r_next,
                                               double& q_next) {
  double r_part = 0.0, q_part = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const double q0 = load_d(qrow, v);
    bool z;
    const double r = replay(e_of(v), q0, int(v), j, s, &z);
    r_part += residual_step(r, r_total, z ? 0.0 : q0, q_total);
    q_part += z || v == x ? 0.0 : q0;
  }
  r_next = block_reduce(r_part, SumOp{}, dscratch);
  q_next = block_reduce(q_part, SumOp{}, dscratch);
}

// sampled: r_0 = e, q_0 = the draft_probs row, with sums from phase 2; the residual after j
// rejections is replayed from the recorded steps (never materialized).
template <typename TQ, typename E>
__device__ __forceinline__ Step sampled_step(const VerifyTreeParams& p, int64_t b,
                                             const WalkSmem& s, int cur, int first, E e_of,
                                             double* dscratch) {
  const TQ* qrow = static_cast<const TQ*>(p.draft_probs) + b * p.q_sb + cur * p.q_sn;
  double r_total = s.sum[cur], q_total = s.q_sum[cur];
  int j = 0;
  for (int c = first; c >= 0; c = s.next_sibling[c]) {
    const int x = s.token[c];
    bool zeroed;
    const double rx = replay(s.child_e[c], s.child_q[c], x, j, s, &zeroed);
    if (accept_sampled(s.u[c], rx, r_total, zeroed ? 0.0 : s.child_q[c], q_total)) return {c, -1};
    if (threadIdx.x == 0) {
      s.step_x[j] = x;
      s.step_r[j] = r_total;
      s.step_q[j] = q_total;
    }
    __syncthreads();
    double r_next, q_next;
    rejection_sums(qrow, p.vocab, x, j, r_total, q_total, s, e_of, dscratch, r_next, q_next);
    // No residual mass: r == q up to rounding, a probability-0 rejection; r is kept.
    const bool kept = !(r_next > 0.0);
    if (threadIdx.x == 0) s.step_kept[j] = kept;
    __syncthreads();
    if (!kept) r_total = r_next;
    q_total = q_next;
    ++j;
  }
  auto residual = [&](int64_t v) {
    bool z;
    return replay(e_of(v), load_d(qrow, v), int(v), j, s, &z);
  };
  return {-1, block_inverse_cdf<kWalkWarps>(residual, p.vocab, s.u[p.nodes])};  // r has mass
}

// Phase 4. The walk from the root: the accepted path in s.path[0..nacc] and the final token;
// returns kNoError or the first error the walk meets.
template <typename TL, typename TQ>
__device__ __forceinline__ unsigned long long walk(const VerifyTreeParams& p, int64_t b,
                                                   const WalkSmem& s, double* dscratch, int& nacc,
                                                   int64_t& final_token) {
  const int N = int(p.nodes);
  int cur = 0;
  nacc = 0;
  if (threadIdx.x == 0) s.path[0] = 0;
  while (true) {
    // Thread 0 rewrites the step arrays at this node; no thread may still read the last node's.
    __syncthreads();
    const uint32_t flags = s.flags[cur];
    if (flags & kBadLogits) return key_logits(N, cur);
    const int first = s.first_child[cur];
    const TL* lrow = static_cast<const TL*>(p.logits) + b * p.logits_sb + cur * p.logits_sn;
    const double m = s.max[cur], t = p.temperature;
    auto e_of = [&](int64_t v) { return exp_term(load_d(lrow, v), m, t); };
    Step step;
    if (p.mode == kGreedy) {
      step = greedy_step(s, cur, first);
    } else if (first < 0) {
      step = {-1, block_inverse_cdf<kWalkWarps>(e_of, p.vocab, s.u[N])};  // bonus from p
    } else if (p.mode == kTargetOnly) {
      step = target_only_step(p, s, cur, first, e_of);
    } else {
      if (flags & kBadQ) return key_draft_probs(N, cur);
      step = sampled_step<TQ>(p, b, s, cur, first, e_of, dscratch);
    }
    if (step.accepted < 0) {
      final_token = step.final_token;
      return kNoError;
    }
    ++nacc;
    if (threadIdx.x == 0) s.path[nacc] = step.accepted;
    cur = step.accepted;
  }
}

// ---- kernel 2: the walk, one block per row -----------------------------------------------------

template <typename TL, typename TQ>
__global__ void __launch_bounds__(kWalkThreads, 1)
    walk_kernel(VerifyTreeParams p, int64_t nchunks, const NodePartial* partials,
                unsigned long long* error) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ unsigned long long kscratch[32];
  __shared__ double dscratch[32];
  const int N = int(p.nodes);
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const WalkSmem s = carve(smem_raw, N);

  const unsigned long long first_error = check_row(p, b, s, kscratch);
  if (first_error != kNoError) {
    if (tid == 0) atomicMin(error, batch_key(b, uint32_t(first_error)));
    return;
  }
  load_nodes(p, b, nchunks, partials, s);
  __syncthreads();
  link_children<TL, TQ>(p, b, s);
  __syncthreads();
  int nacc;
  int64_t final_token = -1;
  const unsigned long long walk_error = walk<TL, TQ>(p, b, s, dscratch, nacc, final_token);
  __syncthreads();
  if (walk_error != kNoError) {
    if (tid == 0) atomicMin(error, batch_key(b, uint32_t(walk_error)));
    return;
  }
  for (int k = tid; k < N; k += blockDim.x) {
    p.accepted_nodes[b * N + k] = k <= nacc ? s.path[k] : -1;
    p.emitted_tokens[b * N + k] =
        k < nacc ? int64_t(s.token[s.path[k + 1]]) : (k == nacc ? final_token : -1);
  }
  if (tid == 0) p.num_accepted[b] = nacc;
}

// The walk kernel's dynamic shared-memory limit: raised once per device to the device's opt-in
// maximum, which covers every N that verify_tree_max_nodes admits.
template <typename TL, typename TQ>
cudaError_t configure_walk() {
  static std::atomic<bool> configured[kMaxDevices];
  return once_per_device(configured, [] {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess)
      err = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, &optin);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(walk_kernel<TL, TQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 optin - kStaticSmemBytes);
    return err;
  });
}

template <typename TL, typename TQ>
cudaError_t launch_typed(const VerifyTreeParams& p, int64_t nchunks, const Workspace& ws,
                         cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (p.mode != kGreedy) {
    err = cudaMemsetAsync(ws.has_children, 0, size_t(p.batch * p.nodes), stream);
    if (err != cudaSuccess) return err;
    const unsigned blocks = unsigned((p.batch * p.nodes + 255) / 256);
    child_flags_kernel<<<blocks, 256, 0, stream>>>(p, ws.has_children);
  }
  const dim3 stats_grid(unsigned(nchunks), unsigned(p.nodes),
                        unsigned(p.batch < 65535 ? p.batch : 65535));
  node_stats_kernel<TL, TQ>
      <<<stats_grid, kStatsThreads, 0, stream>>>(p, nchunks, ws.has_children, ws.partials);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = walk_smem_bytes(p.nodes);
  if (smem > 48 * 1024) {
    err = configure_walk<TL, TQ>();
    if (err != cudaSuccess) return err;
  }
  walk_kernel<TL, TQ>
      <<<unsigned(p.batch), kWalkThreads, smem, stream>>>(p, nchunks, ws.partials, ws.error);
  return cudaGetLastError();
}

template <typename TL>
cudaError_t launch_q(const VerifyTreeParams& p, int64_t nchunks, const Workspace& ws,
                     cudaStream_t stream) {
  if (p.draft_probs != nullptr && p.draft_probs_dtype == DType::kBFloat16) {
    return launch_typed<TL, __nv_bfloat16>(p, nchunks, ws, stream);
  }
  return launch_typed<TL, float>(p, nchunks, ws, stream);
}

int64_t chunks_of(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }

// The workspace: the error word (16 bytes), the chunk partials, the has-children flags.
Workspace carve_workspace(void* base, int64_t batch, int64_t nodes, int64_t vocab) {
  auto* bytes = static_cast<unsigned char*>(base);
  const size_t partial_bytes = size_t(batch * nodes * chunks_of(vocab)) * sizeof(NodePartial);
  return {reinterpret_cast<unsigned long long*>(bytes), reinterpret_cast<NodePartial*>(bytes + 16),
          bytes + 16 + partial_bytes};
}

}  // namespace

size_t verify_tree_workspace_bytes(int64_t batch, int64_t nodes, int64_t vocab) {
  return 16 + size_t(batch * nodes * chunks_of(vocab)) * sizeof(NodePartial) +
         size_t(batch * nodes);
}

int64_t verify_tree_max_nodes(int device) {
  int optin = 0;
  if (device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, &optin) != cudaSuccess) {
    return 0;
  }
  const int64_t per_node = kSmemDoubles * sizeof(double) + kSmemInts * sizeof(int);
  return (optin - kStaticSmemBytes - int64_t(sizeof(double))) / per_node;
}

VerifyTreeStatus verify_tree_launch(const VerifyTreeParams& p, void* workspace,
                                    cudaStream_t stream) {
  const Workspace ws = carve_workspace(workspace, p.batch, p.nodes, p.vocab);
  const int64_t nchunks = chunks_of(p.vocab);
  cudaError_t err = cudaMemsetAsync(ws.error, 0xff, sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return {err, kNoError};
  switch (p.logits_dtype) {
    case DType::kFloat16: err = launch_q<__half>(p, nchunks, ws, stream); break;
    case DType::kBFloat16: err = launch_q<__nv_bfloat16>(p, nchunks, ws, stream); break;
    default: err = launch_q<float>(p, nchunks, ws, stream); break;
  }
  if (err != cudaSuccess) return {err, kNoError};
  unsigned long long key = kNoError;
  err = cudaMemcpyAsync(&key, ws.error, sizeof(key), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  return {err, uint64_t(key)};
}

}  // namespace vsd_ext::cuda
