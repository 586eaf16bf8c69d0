// CPU kernels for the decode hot path, registered as torch.ops.plexus.*.
//
// Each op has a pure-torch twin (plexus/models/layers/ops.py, ModelOps) that defines what it computes;
// tests hold the two together. Built once per machine with -march=native (see __init__.py here), so the
// AVX512-BF16 paths are compiled only where the CPU has them.
//
// This file holds the fused decode step and the registrations; the ops themselves are in linear.cpp,
// elementwise.cpp and attention.cpp, with what they share in common.h.
#include "common.h"

namespace plexus {

// The matmul kernels of a linear in the fused step, numbered as plexus.platforms.cpu.kernels.Kernel, where
// the CPU platform chooses one per linear for the step's row count (the one place that choice is made).
enum LinearKernel : int64_t {
  kAten = 0,        // at::linear on the plain weight
  kBf16Gemv = 1,    // linear_bf16
  kOneDnn = 2,      // oneDNN on the prepacked weight (mkldnn::_linear_pointwise)
  kIntGemv = 3,     // linear_quant on the integer weight, scales and offsets
  kW8a8Amx = 4,     // linear_w8a8_amx on the AMX tiles, per-channel scales
  kW8a8AmxGlu = 5,  // linear_w8a8_amx_glu: silu(gate) * up in the epilogue (gate/up only)
};

// ---------------------------------------------------------------------------
// Every decoder layer of a Llama-family model for a step of single-token
// sequences, in one call: the same ops as LlamaDecoderLayer.forward, minus
// the Python between them (about a quarter of a batch-1 step in eager mode).
// weights: 24 per layer: input norm; qkv weight, bias, packed, scales, offsets;
// o likewise; post-attention norm; gate_up and down likewise; the q and k
// norms of each head (Qwen3's recipe; None for Llama's). windows: per layer,
// the sliding window (0: none). kernels: 4 per
// layer (qkv, o, gate_up, down), each a LinearKernel that says which of its
// weights it reads: the plain weight (kAten, kBf16Gemv), the oneDNN-packed one
// (kOneDnn), the integer weight (int8 for 8 bits, uint8 nibbles for 4) with
// its scales [N, G] and offsets (kIntGemv), or AMX tiles in the packed slot
// with per-channel scales (kW8a8Amx, kW8a8AmxGlu). Absent biases, packed
// weights and offsets are None.
// moe: empty, or 8 per layer for models with routed experts (Mixtral's and
// Qwen3-MoE's recipes): the router's weight and bias, then the experts as
// moe.cpp's ops read them: w13 (or its integers), its scales and offsets, w2
// likewise (None where dense or absent); a layer whose router is None has a
// dense MLP in the gate_up/down slots. moe_args: 4 per layer: top_k,
// renormalize, and the bits of w13 and w2 (0: dense in the model dtype).
// ---------------------------------------------------------------------------
at::Tensor llama_decode_layers(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slot_mapping,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos,
                               const at::Tensor& sin, at::TensorList kv_caches,
                               const c10::List<c10::optional<at::Tensor>>& weights, at::IntArrayRef kernels,
                               at::IntArrayRef windows, const at::Tensor& final_norm, double eps, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, double scale,
                               const c10::List<c10::optional<at::Tensor>>& moe, at::IntArrayRef moe_args) {
  static auto packed_linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  auto lin = [&](int64_t kernel, const at::Tensor& x, const c10::optional<at::Tensor>& wt,
                 const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& packed,
                 const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& offsets) -> at::Tensor {
    switch (kernel) {
      case kBf16Gemv:
        return linear_bf16(x, *wt, b, false);
      case kOneDnn: {
        torch::jit::Stack stack{x, *packed, b, c10::IValue(std::string("none")),
                                c10::IValue(c10::List<c10::optional<at::Scalar>>()), c10::IValue(std::string(""))};
        packed_linear.callBoxed(&stack);
        return stack[0].toTensor();
      }
      case kIntGemv:
        return linear_quant(x, *wt, *scales, offsets, b, wt->scalar_type() == at::kChar ? 8 : 4, false);
      case kW8a8Amx:
        return linear_w8a8_amx(x, *packed, scales->view({-1}), b);
      case kW8a8AmxGlu:
        return linear_w8a8_amx_glu(x, *packed, scales->view({-1}), b);
      default:
        TORCH_CHECK(kernel == kAten, "llama_decode_layers: unknown linear kernel ", kernel);
        return at::linear(x, *wt, b);
    }
  };
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  constexpr int kPerLayer = 24;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L, "llama_decode_layers: 24 weights per layer");
  TORCH_CHECK(static_cast<int64_t>(kernels.size()) == 4 * L, "llama_decode_layers: 4 kernels per layer");
  TORCH_CHECK(static_cast<int64_t>(windows.size()) == L, "llama_decode_layers: a window per layer");
  auto w = [&](int64_t l, int i) -> c10::optional<at::Tensor> { return weights.get(kPerLayer * l + i); };
  constexpr int kMoePerLayer = 8;
  TORCH_CHECK(moe.size() == 0 || (static_cast<int64_t>(moe.size()) == kMoePerLayer * L &&
                                  static_cast<int64_t>(moe_args.size()) == 4 * L),
              "llama_decode_layers: moe takes 8 tensors and moe_args 4 numbers per layer");
  auto m = [&](int64_t l, int i) -> c10::optional<at::Tensor> {
    return moe.size() ? moe.get(kMoePerLayer * l + i) : c10::nullopt;
  };
  auto linear = [&](int64_t l, int which, const at::Tensor& x) -> at::Tensor {
    const int first = which < 2 ? 1 + 5 * which : 12 + 5 * (which - 2);
    return lin(kernels[4 * l + which], x, w(l, first), w(l, first + 1), w(l, first + 2), w(l, first + 3),
               w(l, first + 4));
  };
  const int64_t B = hidden.size(0);
  at::Tensor residual = hidden.clone();
  at::Tensor h;
  for (int64_t l = 0; l < L; ++l) {
    h = l == 0 ? rms_norm(residual, *w(l, 0), eps) : add_rms_norm(h, residual, *w(l, 0), eps);
    at::Tensor qkv = linear(l, 0, h);
    if (w(l, 22).has_value()) {   // RMSNorm of every q and k head before the rotary embedding
      for (int part = 0; part < 2; ++part) {
        const int64_t heads = part == 0 ? num_heads : num_kv_heads;
        at::Tensor x = qkv.narrow(1, part == 0 ? 0 : num_heads * head_dim, heads * head_dim);
        x.copy_(rms_norm(x.reshape({B * heads, head_dim}), *w(l, 22 + part), eps).view({B, heads * head_dim}));
      }
    }
    at::Tensor q = rope_and_cache(qkv, positions, cos, sin, kv_caches[l], slot_mapping, num_heads, num_kv_heads,
                                  head_dim);
    at::Tensor attn = paged_attention_decode(q, kv_caches[l], block_tables, seq_lens, scale, windows[l]).view({B, -1});
    h = add_rms_norm(linear(l, 1, attn), residual, *w(l, 11), eps);
    if (m(l, 0).has_value()) {   // routed experts (moe.cpp), the router's logits first
      const at::Tensor& router = *m(l, 0);
      const at::Tensor logits = h.scalar_type() == at::kBFloat16 && B <= 16 && has_fast_linear()
                                    ? linear_bf16(h, router, m(l, 1), false)
                                    : at::linear(h, router, m(l, 1));
      const int64_t top_k = moe_args[4 * l], bits13 = moe_args[4 * l + 2], bits2 = moe_args[4 * l + 3];
      const bool renormalize = moe_args[4 * l + 1] != 0;
      h = bits13 == 0 ? fused_moe(h, logits, *m(l, 2), *m(l, 5), top_k, renormalize, c10::nullopt, c10::nullopt,
                                  "silu", 1.702, 7.0, "softmax_topk")
                      : fused_moe_int(h, logits, *m(l, 2), *m(l, 3), m(l, 4), bits13, *m(l, 5), *m(l, 6), m(l, 7),
                                      bits2, top_k, renormalize, c10::nullopt, c10::nullopt, "silu", 1.702, 7.0,
                                      "softmax_topk");
      continue;
    }
    h = kernels[4 * l + 2] == kW8a8AmxGlu ? linear(l, 2, h) : silu_and_mul(linear(l, 2, h));
    h = linear(l, 3, h);
  }
  return add_rms_norm(h, residual, final_norm, eps);
}

TORCH_LIBRARY(plexus, m) {
  m.def("has_fast_linear() -> bool", has_fast_linear);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias, bool out_fp32) -> Tensor");
  m.def("has_fast_quant_linear() -> bool", has_fast_quant_linear);
  m.def("linear_quant(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor? bias, int bits, bool scalar) -> Tensor");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("scale_rows(Tensor y, Tensor scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("has_amx_int8() -> bool", has_amx_int8);
  m.def("pack_int8_amx(Tensor w) -> Tensor");
  m.def("linear_w8a8_amx(Tensor x, Tensor packed, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("pack_int8_amx_glu(Tensor w) -> Tensor");
  m.def("linear_w8a8_amx_glu(Tensor x, Tensor packed, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor w, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("greedy_sample(Tensor logits) -> (Tensor, Tensor)");
  m.def("rope_and_cache(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) kv_cache, "
        "Tensor slot_mapping, int num_heads, int num_kv_heads, int head_dim) -> Tensor");
  m.def("paged_attention_decode(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, "
        "int window=0) -> Tensor");
  m.def("llama_decode_layers(Tensor hidden, Tensor positions, Tensor slot_mapping, Tensor block_tables, "
        "Tensor seq_lens, Tensor cos, Tensor sin, Tensor(a!)[] kv_caches, Tensor?[] weights, int[] kernels, "
        "int[] windows, Tensor final_norm, float eps, int num_heads, int num_kv_heads, int head_dim, float scale, "
        "Tensor?[] moe, int[] moe_args) -> Tensor");
}

TORCH_LIBRARY_IMPL(plexus, CPU, m) {
  m.impl("linear_bf16", linear_bf16);
  m.impl("linear_quant", linear_quant);
  m.impl("quantize_rows", quantize_rows);
  m.impl("scale_rows", scale_rows);
  m.impl("pack_int8_amx", pack_int8_amx);
  m.impl("linear_w8a8_amx", linear_w8a8_amx);
  m.impl("pack_int8_amx_glu", pack_int8_amx_glu);
  m.impl("linear_w8a8_amx_glu", linear_w8a8_amx_glu);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("greedy_sample", greedy_sample);
  m.impl("rope_and_cache", rope_and_cache);
  m.impl("paged_attention_decode", paged_attention_decode);
  m.impl("llama_decode_layers", llama_decode_layers);
}

// The prepacked weights it takes are oneDNN tensors, which dispatch under their own key.
TORCH_LIBRARY_IMPL(plexus, MkldnnCPU, m) { m.impl("llama_decode_layers", llama_decode_layers); }

}  // namespace plexus
