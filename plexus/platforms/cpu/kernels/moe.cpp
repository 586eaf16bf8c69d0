// Routed experts (a mixture-of-experts MLP) for the CPU platform: torch.ops.plexus.fused_moe, the kernel of
// CpuModelOps.fused_moe, computing what ModelOps.fused_moe (plexus/models/layers/ops.py) computes in torch.
//
// Routing as HF's, in one of two orders (at::topk being the op torch.topk runs, so ties pick the same
// experts): "softmax_topk" (Mixtral, Qwen3-MoE): softmax of the router logits in fp32, the top_k of it, the
// weights renormalized where asked; "topk_softmax" (gpt-oss): the top_k of the logits, then the softmax of
// those k in fp32 (summing to 1 already). Then the step's token-expert pairs are grouped by expert (a counting
// sort) and each expert with tokens runs once over them: gate/up (the bf16 GEMV of linear.cpp for few rows,
// at::linear otherwise) plus its bias where it has one, the activation, down plus its bias, each output
// rounded to the model dtype as HF's are (a bias added after the matmul's rounding, as HF adds it). The
// activation is "silu": silu(gate) * up (elementwise.cpp), or "swigluoai" (gpt-oss's clamped SwiGLU):
// gate clamped above at limit, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate), rounded to the
// model dtype after each op as HF's torch ops round. An expert with no tokens is never read, so a batch-1
// step streams only its top_k experts' weights. Last, per token, the top_k outputs times their weights are
// summed in fp32 (in top-k order, as HF's grouped experts sum them) and rounded once.
//
// fused_moe_int: the same with each expert's weights as integers in linear_quant's packed form (8-bit, or 4-bit
// nibbles, with group scales and offsets; quant_linear.cpp), stacked over experts: every expert's matmuls run on
// the VNNI GEMV, its activations rounded to int8 per block of 32 inputs, whatever the expert's row count (an
// expert's share of a step is a few rows; dequantizing it for a dense matmul would cost more than it saves).
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

at::Tensor expert_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  at::Tensor y = x.scalar_type() == at::kBFloat16 && x.size(0) <= kGemvMaxRows && has_fast_linear()
                     ? linear_bf16(x, w, c10::nullopt, false)
                     : at::linear(x, w);
  if (bias.has_value()) y.add_(*bias);  // [N] over each row, rounded to the model dtype
  return y;
}

// Expert e's bias, where there are biases.
c10::optional<at::Tensor> row_of(const c10::optional<at::Tensor>& biases, int64_t e) {
  return biases.has_value() ? c10::optional<at::Tensor>((*biases)[e]) : c10::nullopt;
}

// The model dtype's rounding of an fp32 value (none for fp32): what HF's torch ops do between two ops.
template <typename T> inline float rounded(float v) { return to_f(from_f<T>(v)); }

// swigluoai over [n, 2I] rows (gate then up) -> [n, I], as HF's gpt-oss experts compute it op by op.
template <typename T>
void swigluoai_rows(const T* x, T* out, int64_t n, int64_t I, float alpha, float limit) {
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gate = x + r * 2 * I;
      const T* up = gate + I;
      int64_t i = 0;
#if defined(__AVX512BF16__)
      const __m512 va = _mm512_set1_ps(alpha), vhi = _mm512_set1_ps(limit), vlo = _mm512_set1_ps(-limit);
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= I; i += 16) {
        // min/max return their second operand where either is NaN: the value goes second, so NaN stays NaN
        const __m512 g = _mm512_min_ps(vhi, load16(gate + i));
        const __m512 u = _mm512_min_ps(vhi, _mm512_max_ps(vlo, load16(up + i)));
        const __m512 ga = round_to<T>(_mm512_mul_ps(g, va));
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), ga));
        const __m512 sig = round_to<T>(_mm512_div_ps(one, _mm512_add_ps(one, e)));
        store16(out + r * I + i, _mm512_mul_ps(round_to<T>(_mm512_add_ps(u, one)), round_to<T>(_mm512_mul_ps(g, sig))));
      }
#endif
      for (; i < I; ++i) {
        const float g = std::min(to_f(gate[i]), limit);               // clamp(max=limit), NaN kept
        const float u = std::min(std::max(to_f(up[i]), -limit), limit);
        const float sig = rounded<T>(1.f / (1.f + std::exp(-rounded<T>(g * alpha))));
        out[r * I + i] = from_f<T>(rounded<T>(u + 1.f) * rounded<T>(g * sig));
      }
    }
  });
}

at::Tensor swigluoai_and_mul(const at::Tensor& x, double alpha, double limit) {
  const int64_t n = x.size(0), I = x.size(1) / 2;
  at::Tensor out = at::empty({n, I}, x.options());
  PLEXUS_DISPATCH(x.scalar_type(), "swigluoai_and_mul", [&] {
    swigluoai_rows(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, I, static_cast<float>(alpha),
                   static_cast<float>(limit));
  });
  return out;
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

namespace {

void check_common(const at::Tensor& x, const at::Tensor& router_logits, int64_t E, int64_t I, int64_t top_k,
                  const c10::optional<at::Tensor>& b13, const c10::optional<at::Tensor>& b2,
                  c10::string_view activation, c10::string_view routing) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fused_moe: x must be contiguous [T, H]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "fused_moe: fp32 or bf16");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(router_logits.dim() == 2 && router_logits.size(0) == T && router_logits.size(1) == E,
              "fused_moe: router_logits must be [T, E]");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "fused_moe: top_k must be in [1, E]");
  TORCH_CHECK(!b13.has_value() || (b13->is_contiguous() && b13->scalar_type() == x.scalar_type() &&
                                   b13->dim() == 2 && b13->size(0) == E && b13->size(1) == 2 * I),
              "fused_moe: b13 must be contiguous [E, 2I] in the model dtype");
  TORCH_CHECK(!b2.has_value() || (b2->is_contiguous() && b2->scalar_type() == x.scalar_type() && b2->dim() == 2 &&
                                  b2->size(0) == E && b2->size(1) == H),
              "fused_moe: b2 must be contiguous [E, H] in the model dtype");
  TORCH_CHECK(activation == "swigluoai" || activation == "silu", "fused_moe: activation must be 'silu' or 'swigluoai'");
  TORCH_CHECK(routing == "topk_softmax" || routing == "softmax_topk",
              "fused_moe: routing must be 'softmax_topk' or 'topk_softmax'");
}

// The routing, the grouping by expert, each active expert's gate/up (lin13(e, rows) -> [n, 2I]), activation and
// down (lin2(e, rows) -> [n, H]), and the weighted sum: what both ops below share.
template <typename Lin13, typename Lin2>
at::Tensor moe_forward(const at::Tensor& x, const at::Tensor& router_logits, int64_t E, int64_t top_k,
                       bool renormalize, c10::string_view activation, double alpha, double limit,
                       c10::string_view routing, const Lin13& lin13, const Lin2& lin2) {
  const bool swiglu = activation == "swigluoai";
  const bool topk_first = routing == "topk_softmax";
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor out = at::empty_like(x);
  if (T == 0) return out;

  // [T, k] each
  at::Tensor weights, ids;
  if (topk_first) {
    std::tie(weights, ids) = at::topk(router_logits, top_k, -1);
    weights = weights.to(at::kFloat).softmax(-1);
  } else {
    std::tie(weights, ids) = at::topk(router_logits.to(at::kFloat).softmax(-1), top_k, -1);
    if (renormalize) weights = weights / weights.sum(-1, true);
  }
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
    const at::Tensor h = lin13(e, xe);                                                   // [n, 2I]
    const at::Tensor a = swiglu ? swigluoai_and_mul(h, alpha, limit) : silu_and_mul(h);  // [n, I]
    at::Tensor y = lin2(e, a).contiguous();                                              // [n, H]
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

// One stacked integer weight's expert e, in linear_quant's form: qweight [N, K or K / 2], scales [N, G],
// offsets [N, G] or none.
struct StackedInt {
  const at::Tensor& qweight;
  const at::Tensor& scales;
  const c10::optional<at::Tensor>& offsets;
  int64_t bits;

  void check(const char* name, int64_t E, int64_t N, int64_t K) const {
    TORCH_CHECK(bits == 8 || bits == 4, "fused_moe_int: ", name, " bits must be 8 or 4");
    TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && qweight.size(0) == E && qweight.size(1) == N &&
                    qweight.size(2) == (bits == 8 ? K : K / 2) &&
                    qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
                "fused_moe_int: ", name, " must be contiguous [E, N, K] int8 or [E, N, K / 2] uint8, got ",
                qweight.sizes());
    TORCH_CHECK(scales.dim() == 3 && scales.is_contiguous() && scales.size(0) == E && scales.size(1) == N &&
                    scales.scalar_type() == at::kFloat,
                "fused_moe_int: ", name, " scales must be contiguous fp32 [E, N, G]");
    TORCH_CHECK(!offsets.has_value() || (offsets->sizes() == scales.sizes() && offsets->is_contiguous() &&
                                         offsets->scalar_type() == at::kFloat),
                "fused_moe_int: ", name, " offsets must be contiguous fp32 like its scales");
  }

  at::Tensor apply(int64_t e, const at::Tensor& rows, const c10::optional<at::Tensor>& bias) const {
    const c10::optional<at::Tensor> off = offsets.has_value() ? c10::optional<at::Tensor>((*offsets)[e]) : c10::nullopt;
    at::Tensor y = linear_quant(rows, qweight[e], scales[e], off, c10::nullopt, bits, false);
    if (bias.has_value()) y.add_(*bias);  // after the matmul's rounding, as the dense experts add it
    return y;
  }
};

}  // namespace

at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& w13,
                     const at::Tensor& w2, int64_t top_k, bool renormalize, const c10::optional<at::Tensor>& b13,
                     const c10::optional<at::Tensor>& b2, c10::string_view activation, double alpha, double limit,
                     c10::string_view routing) {
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous(),
              "fused_moe: w13 [E, 2I, H] and w2 [E, H, I] must be contiguous");
  TORCH_CHECK(w13.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "fused_moe: x, w13 and w2 must have one dtype");
  const int64_t H = x.size(1), E = w13.size(0), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E && w2.size(1) == H,
              "fused_moe: w13 must be [E, 2I, H] and w2 [E, H, I] for x [T, H]");
  check_common(x, router_logits, E, I, top_k, b13, b2, activation, routing);
  return moe_forward(
      x, router_logits, E, top_k, renormalize, activation, alpha, limit, routing,
      [&](int64_t e, const at::Tensor& rows) { return expert_linear(rows, w13[e], row_of(b13, e)); },
      [&](int64_t e, const at::Tensor& rows) { return expert_linear(rows, w2[e], row_of(b2, e)); });
}

// See the top of the file: a batch-1 step streams only its top_k experts' integers.
at::Tensor fused_moe_int(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& q13,
                         const at::Tensor& s13, const c10::optional<at::Tensor>& o13, int64_t bits13,
                         const at::Tensor& q2, const at::Tensor& s2, const c10::optional<at::Tensor>& o2,
                         int64_t bits2, int64_t top_k, bool renormalize, const c10::optional<at::Tensor>& b13,
                         const c10::optional<at::Tensor>& b2, c10::string_view activation, double alpha, double limit,
                         c10::string_view routing) {
  TORCH_CHECK(x.dim() == 2 && q13.dim() == 3 && s13.dim() == 3, "fused_moe_int: x [T, H], q13 and s13 [E, 2I, ...]");
  const int64_t H = x.size(1), E = q13.size(0), I = s13.size(1) / 2;
  const StackedInt w13{q13, s13, o13, bits13}, w2{q2, s2, o2, bits2};
  w13.check("w13", E, 2 * I, H);
  w2.check("w2", E, H, I);
  check_common(x, router_logits, E, I, top_k, b13, b2, activation, routing);
  return moe_forward(
      x, router_logits, E, top_k, renormalize, activation, alpha, limit, routing,
      [&](int64_t e, const at::Tensor& rows) { return w13.apply(e, rows, row_of(b13, e)); },
      [&](int64_t e, const at::Tensor& rows) { return w2.apply(e, rows, row_of(b2, e)); });
}

// Shapes only, for torch.compile's tracing.
at::Tensor fused_moe_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                          bool, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view,
                          double, double, c10::string_view) {
  return at::empty_like(x);
}

at::Tensor fused_moe_int_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const c10::optional<at::Tensor>&, int64_t, const at::Tensor&, const at::Tensor&,
                              const c10::optional<at::Tensor>&, int64_t, int64_t, bool,
                              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, c10::string_view,
                              double, double, c10::string_view) {
  return at::empty_like(x);
}

TORCH_LIBRARY_FRAGMENT(plexus, m) {
  m.def("fused_moe(Tensor x, Tensor router_logits, Tensor w13, Tensor w2, int top_k, bool renormalize, "
        "Tensor? b13=None, Tensor? b2=None, str activation=\"silu\", float alpha=1.702, float limit=7.0, "
        "str routing=\"softmax_topk\") -> Tensor");
  m.def("fused_moe_int(Tensor x, Tensor router_logits, Tensor q13, Tensor s13, Tensor? o13, int bits13, Tensor q2, "
        "Tensor s2, Tensor? o2, int bits2, int top_k, bool renormalize, Tensor? b13=None, Tensor? b2=None, "
        "str activation=\"silu\", float alpha=1.702, float limit=7.0, str routing=\"softmax_topk\") -> Tensor");
}

TORCH_LIBRARY_IMPL(plexus, CPU, m) {
  m.impl("fused_moe", fused_moe);
  m.impl("fused_moe_int", fused_moe_int);
}

TORCH_LIBRARY_IMPL(plexus, Meta, m) {
  m.impl("fused_moe", fused_moe_meta);
  m.impl("fused_moe_int", fused_moe_int_meta);
}

}  // namespace plexus
