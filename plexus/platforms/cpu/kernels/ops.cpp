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

// ---------------------------------------------------------------------------
// Every decoder layer of a Llama-family model for a step of single-token
// sequences, in one call: the same ops as LlamaDecoderLayer.forward, minus
// the Python between them (about a quarter of a batch-1 step in eager mode).
// weights: 22 per layer: input norm; qkv weight, bias, packed, scales, offsets;
// o likewise; post-attention norm; gate_up and down likewise. Absent biases and
// packed weights (kernels.pack_weight) are None. A linear with scales is an
// integer one (linear_quant: int8 weight for 8 bits, uint8 nibbles for 4), its
// offsets possibly None; its packed weight, where given, is a dynamic W8A8
// layer's AMX tiles (pack_int8_amx, with per-channel scales [N, 1]), which serve
// steps of more than quant_rows rows; gate_up's are pack_int8_amx_glu's, whose
// kernel applies silu(gate) * up itself.
// ---------------------------------------------------------------------------
at::Tensor llama_decode_layers(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slot_mapping,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos,
                               const at::Tensor& sin, at::TensorList kv_caches,
                               const c10::List<c10::optional<at::Tensor>>& weights, const at::Tensor& final_norm,
                               double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                               int64_t fast_rows_packed, int64_t fast_rows_unpacked, int64_t quant_rows) {
  const int64_t rows = hidden.size(0);
  const bool bf16_gemv = has_fast_linear() && hidden.scalar_type() == at::kBFloat16;
  static auto packed_linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  // The same choice as plexus.kernels.linear: GEMV for few rows, else oneDNN on prepacked weights, else ATen.
  auto lin = [&](const at::Tensor& x, const c10::optional<at::Tensor>& wt, const c10::optional<at::Tensor>& b,
                 const c10::optional<at::Tensor>& packed, const c10::optional<at::Tensor>& scales,
                 const c10::optional<at::Tensor>& offsets) -> at::Tensor {
    if (scales.has_value() && packed.has_value() && rows > quant_rows)
      return linear_w8a8_amx(x, *packed, scales->view({-1}), b);
    if (scales.has_value())
      return linear_quant(x, *wt, *scales, offsets, b, wt->scalar_type() == at::kChar ? 8 : 4, false);
    if (bf16_gemv && rows <= (packed.has_value() ? fast_rows_packed : fast_rows_unpacked))
      return linear_bf16(x, *wt, b, false);
    if (packed.has_value()) {
      torch::jit::Stack stack{x, *packed, b, c10::IValue(std::string("none")), c10::IValue(c10::List<c10::optional<at::Scalar>>()),
                              c10::IValue(std::string(""))};
      packed_linear.callBoxed(&stack);
      return stack[0].toTensor();
    }
    return at::linear(x, *wt, b);
  };
  const int64_t L = static_cast<int64_t>(kv_caches.size());
  constexpr int kPerLayer = 22;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L, "llama_decode_layers: 22 weights per layer");
  auto w = [&](int64_t l, int i) -> c10::optional<at::Tensor> { return weights.get(kPerLayer * l + i); };
  const int64_t B = hidden.size(0);
  at::Tensor residual = hidden.clone();
  at::Tensor h;
  for (int64_t l = 0; l < L; ++l) {
    h = l == 0 ? rms_norm(residual, *w(l, 0), eps) : add_rms_norm(h, residual, *w(l, 0), eps);
    at::Tensor qkv = lin(h, w(l, 1), w(l, 2), w(l, 3), w(l, 4), w(l, 5));
    at::Tensor q = rope_and_cache(qkv, positions, cos, sin, kv_caches[l], slot_mapping, num_heads, num_kv_heads,
                                  head_dim);
    at::Tensor attn = paged_attention_decode(q, kv_caches[l], block_tables, seq_lens, scale).view({B, -1});
    h = add_rms_norm(lin(attn, w(l, 6), w(l, 7), w(l, 8), w(l, 9), w(l, 10)), residual, *w(l, 11), eps);
    const bool glu_tiles = w(l, 14).has_value() && w(l, 15).has_value() && rows > quant_rows;
    h = glu_tiles ? linear_w8a8_amx_glu(h, *w(l, 14), w(l, 15)->view({-1}), w(l, 13))
                  : silu_and_mul(lin(h, w(l, 12), w(l, 13), w(l, 14), w(l, 15), w(l, 16)));
    h = lin(h, w(l, 17), w(l, 18), w(l, 19), w(l, 20), w(l, 21));
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
  m.def("paged_attention_decode(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("llama_decode_layers(Tensor hidden, Tensor positions, Tensor slot_mapping, Tensor block_tables, "
        "Tensor seq_lens, Tensor cos, Tensor sin, Tensor(a!)[] kv_caches, Tensor?[] weights, Tensor final_norm, "
        "float eps, int num_heads, int num_kv_heads, int head_dim, float scale, int fast_rows_packed, "
        "int fast_rows_unpacked, int quant_rows) -> Tensor");
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
