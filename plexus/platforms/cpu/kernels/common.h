// Shared by the CPU kernels' translation units: includes, the dtype dispatch, scalar and AVX-512 load
// helpers, and the tensor-level ops each file defines (registered as torch.ops.plexus.* in ops.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The model dtypes the CPU platform runs: fp32 and bf16.
#define PLEXUS_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))


namespace plexus {

using bf16 = c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
template <typename T> inline T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline bf16 from_f<bf16>(float v) { return bf16(v); }  // round to nearest even

#if defined(__AVX512F__)
// 16 lanes of T as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX512BF16__)
// The elementwise kernels' vector paths (elementwise.cpp): 16 fp32 lanes stored as T (bf16 rounded to nearest
// even, as from_f), and rounded to T and back (the model dtype's rounding between two ops, as HF's).
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
template <typename T> inline __m512 round_to(__m512 v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v));
}

// 32 bf16 lanes (n < 32: the first n, the rest zero), and the bf16-pair view dpbf16 takes.
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
inline __m512i load32(const bf16* p, int64_t n) {
  return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

// e^x to about an ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^6 (error < r^7 / 7!),
// times 2^n by scalef (which gives inf and 0 where e^x leaves the float range).
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);     // ln2 in two parts, the first exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(g) = g / (1 + e^-g), in fp32 (silu_and_mul and the W8A8 gate/up epilogue). The reciprocal is rcp14's
// refined by one Newton step (within an ulp or so, at a fifth of a division's cost), 0 where e^-g overflows.
inline __m512 silu16(__m512 g) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(g, _mm512_mask_mov_ps(r, _mm512_fpclass_ps_mask(d, 0x08), _mm512_setzero_ps()));
}
#endif

// linear.cpp
bool has_fast_linear();
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool out_fp32);
// quant_linear.cpp
bool has_fast_quant_linear();
at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t bits,
                        bool scalar);
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x);
at::Tensor scale_rows(const at::Tensor& y, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                      at::ScalarType out_dtype);
// amx_linear.cpp
bool has_amx_int8();
at::Tensor pack_int8_amx(const at::Tensor& w);
at::Tensor linear_w8a8_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_scale,
                           const c10::optional<at::Tensor>& bias);
at::Tensor pack_int8_amx_glu(const at::Tensor& w);
at::Tensor linear_w8a8_amx_glu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_scale,
                               const c10::optional<at::Tensor>& bias);
// elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& w, double eps);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                          const at::Tensor& sin, at::Tensor kv_cache, const at::Tensor& slot_mapping,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
// moe.cpp
at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& w13,
                     const at::Tensor& w2, int64_t top_k, bool renormalize, const c10::optional<at::Tensor>& b13,
                     const c10::optional<at::Tensor>& b2, c10::string_view activation, double alpha, double limit,
                     c10::string_view routing);
at::Tensor fused_moe_int(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& q13,
                         const at::Tensor& s13, const c10::optional<at::Tensor>& o13, int64_t bits13,
                         const at::Tensor& q2, const at::Tensor& s2, const c10::optional<at::Tensor>& o2,
                         int64_t bits2, int64_t top_k, bool renormalize, const c10::optional<at::Tensor>& b13,
                         const c10::optional<at::Tensor>& b2, c10::string_view activation, double alpha, double limit,
                         c10::string_view routing);
// attention.cpp
at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t window);
std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits);

}  // namespace plexus
