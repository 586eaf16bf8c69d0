// Routed experts (a mixture-of-experts MLP) for the CPU platform: torch.ops.plexus.fused_moe, the kernel of
// CpuModelOps.fused_moe, computing what ModelOps.fused_moe (plexus/models/layers/ops.py) computes in torch.
//
// Routing as HF's: softmax of the router logits in fp32, at::topk (the op torch.topk runs, so ties pick the
// same experts), the weights renormalized where asked. Then the step's token-expert pairs are grouped by
// expert (a counting sort) and each expert with tokens runs once over them: gate/up (the bf16 GEMV of
// linear.cpp for few rows, at::linear otherwise), silu(gate) * up (elementwise.cpp), down, each output
// rounded to the model dtype as HF's are. An expert with no tokens is never read, so a batch-1 step streams
// only its top_k experts' weights. Last, per token, the top_k outputs times their weights are summed in
// fp32 (in top-k order, as HF's grouped experts sum them) and rounded once.
//
// Threads: where the step has at least as many active experts as threads, the experts are shared out among
// them (largest first, each thread taking the next), each expert's matmuls on one thread; otherwise the
// experts run one after another and each matmul is threaded over its rows (a decode step's few experts).
#include "common.h"

#include <algorithm>
#include <atomic>
#include <numeric>

namespace plexus {

namespace {

// The row count up to which the bf16 GEMV beats at::linear on weights that are not prepacked
// (FAST_LINEAR_MAX_ROWS_UNPACKED in plexus/platforms/cpu/kernels/__init__.py).
constexpr int64_t kGemvMaxRows = 16;

at::Tensor expert_linear(const at::Tensor& x, const at::Tensor& w) {
  if (x.scalar_type() == at::kBFloat16 && x.size(0) <= kGemvMaxRows && has_fast_linear())
    return linear_bf16(x, w, c10::nullopt, false);
  return at::linear(x, w);
}

// out[t] = sum over s < k of pair_out[t * k + s] * weights[t, s], in fp32, rounded to T.
template <typename T>
void weighted_sum(const T* pair_out, const float* weights, T* out, int64_t tokens, int64_t k, int64_t H) {
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(H * k, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < k; ++s) {
        const T* row = pair_out + (t * k + s) * H;
        const float w = weights[t * k + s];
        for (int64_t h = 0; h < H; ++h) acc[h] += to_f(row[h]) * w;
      }
      for (int64_t h = 0; h < H; ++h) out[t * H + h] = from_f<T>(acc[h]);
    }
  });
}

}  // namespace

at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& w13,
                     const at::Tensor& w2, int64_t top_k, bool renormalize) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fused_moe: x must be contiguous [T, H]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "fused_moe: fp32 or bf16");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous(),
              "fused_moe: w13 [E, 2I, H] and w2 [E, H, I] must be contiguous");
  TORCH_CHECK(w13.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "fused_moe: x, w13 and w2 must have one dtype");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E && w2.size(1) == H,
              "fused_moe: w13 must be [E, 2I, H] and w2 [E, H, I] for x [T, H]");
  TORCH_CHECK(router_logits.dim() == 2 && router_logits.size(0) == T && router_logits.size(1) == E,
              "fused_moe: router_logits must be [T, E]");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "fused_moe: top_k must be in [1, E]");
  at::Tensor out = at::empty_like(x);
  if (T == 0) return out;

  // [T, k] each
  auto [weights, ids] = at::topk(router_logits.to(at::kFloat).softmax(-1), top_k, -1);
  if (renormalize) weights = weights / weights.sum(-1, true);
  weights = weights.contiguous();
  ids = ids.contiguous();
  const int64_t pairs = T * top_k;  // pair p: token p / k, its slot p % k
  const int64_t* expert_of = ids.data_ptr<int64_t>();

  // The pairs grouped by expert, in token order within each: expert e's are order[start[e]:start[e + 1]].
  std::vector<int64_t> start(E + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) ++start[expert_of[p] + 1];
  std::partial_sum(start.begin(), start.end(), start.begin());
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[next[expert_of[p]]++] = p;
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);
  std::stable_sort(active.begin(), active.end(),
                   [&](int64_t a, int64_t b) { return start[a + 1] - start[a] > start[b + 1] - start[b]; });

  at::Tensor pair_out = at::empty({pairs, H}, x.options());  // each pair's expert output, model dtype
  const int64_t row_bytes = H * x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* pp = static_cast<char*>(pair_out.data_ptr());
  auto run_expert = [&](int64_t e) {
    const int64_t first = start[e], n = start[e + 1] - first;
    at::Tensor xe = at::empty({n, H}, x.options());
    char* xep = static_cast<char*>(xe.data_ptr());
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(xep + r * row_bytes, xp + order[first + r] / top_k * row_bytes, row_bytes);
    at::Tensor y = expert_linear(silu_and_mul(expert_linear(xe, w13[e])), w2[e]).contiguous();  // [n, H]
    const char* yp = static_cast<const char*>(y.data_ptr());
    for (int64_t r = 0; r < n; ++r) std::memcpy(pp + order[first + r] * row_bytes, yp + r * row_bytes, row_bytes);
  };
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && static_cast<int64_t>(active.size()) >= threads) {
    std::atomic<size_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (size_t a; (a = next.fetch_add(1)) < active.size();) run_expert(active[a]);
    });
  } else {
    for (int64_t e : active) run_expert(e);
  }

  PLEXUS_DISPATCH(x.scalar_type(), "fused_moe", [&] {
    weighted_sum(pair_out.data_ptr<scalar_t>(), weights.data_ptr<float>(), out.data_ptr<scalar_t>(), T, top_k, H);
  });
  return out;
}

// Shapes only, for torch.compile's tracing.
at::Tensor fused_moe_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                          bool) {
  return at::empty_like(x);
}

TORCH_LIBRARY_FRAGMENT(plexus, m) {
  m.def("fused_moe(Tensor x, Tensor router_logits, Tensor w13, Tensor w2, int top_k, bool renormalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(plexus, CPU, m) { m.impl("fused_moe", fused_moe); }

TORCH_LIBRARY_IMPL(plexus, Meta, m) { m.impl("fused_moe", fused_moe_meta); }

}  // namespace plexus
