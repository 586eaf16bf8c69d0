// Weight-only quantized linear for few rows (decode): 8-bit and 4-bit integer weights with group scales and
// offsets, read straight from their packed form and streamed once per call, multiplied with VNNI.
//
//   out[m, n] = sum_k xq[m, k] * w[n, k] (+ bias[n]),   w[n, k] = v[n, k] * scales[n, g] + offsets[n, g]
//
// g = k / (K / G); v the stored integer:
// - bits 8: qweight int8 [N, K], v = qweight.
// - bits 4: qweight uint8 [N, K / 2], in blocks of 64 inputs: byte j of block b holds input 64b + j in its low
//   nibble and input 64b + 32 + j in its high one, and v = nibble - 8 (so unpacking a block is one load, a
//   shift and a mask, and a group of 32 is half a block).
// offsets absent: 0 (symmetric formats). Every format plexus reads maps onto this
// (plexus.models.quantization.packed): GGUF Q8_0 / Q4_0 / Q4_1 blocks, per-channel int8 (int8, neuron_quant
// s8, compressed-tensors W8A16), AWQ / GPTQ / compressed-tensors groups with zero points.
//
// xq is x rounded to int8 in blocks of 32 inputs (scale max|x| / 127 per block, as llama.cpp's Q8_0
// activations), so each block's dot product is an integer one: vpdpbusd, 64 u8 x s8 products a uop, on the
// weights as unsigned u = v + 2^(bits-1) (an 8-bit weight's sign bit flipped as it is loaded). Each block's
// sum is scaled once, by the block's x scale and its group's weight scale; the offsets' term (including
// -2^(bits-1) * scales for the unsigned form) is sum_g offset[n, g] * (sum of xq over group g), with those
// sums made once per call. The scalar path computes the same integers and sums in plain C++.
#include "common.h"

namespace plexus {

namespace {

constexpr int64_t kXBlock = 32;   // inputs per activation scale
constexpr int64_t kPrefetch = 4096;   // how far ahead of the weights being read to prefetch, in bytes

struct QArgs {
  int64_t M, N, K, G, gs, bits;
  const float* scales;             // [N, G]
  const float* offsets;            // [N, G] or null (symmetric)
  const float* bias;               // [N] or null
  const int8_t* xq;                // [M, K]
  const float* xscale;             // [M, K / 32]
  const float* xscale16;           // [M, K / 64, 16]: each 64-block's two scales, each over 8 lanes
  const float* xgsum;              // [M, G]: sum over group g of dequantized xq
};

// Activations to int8 per block of 32, and the sums the offsets need.
template <typename XT>
void quantize_x(const XT* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* xscale, float* xscale16,
                float* xgsum) {
  const int64_t blocks = K / kXBlock, gs = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) xgsum[m * G + g] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const XT* xb = x + m * K + b * kXBlock;
      int8_t* qb = xq + m * K + b * kXBlock;
      float amax = 0.f, d, inv;
      int32_t qsum = 0;
#if defined(__AVX512F__)
      const __m512 v0 = load16(xb), v1 = load16(xb + 16);
      amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      d = amax / 127.f;
      inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(q0));   // rounds to nearest even
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(q1));
      qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
      for (int64_t i = 0; i < kXBlock; ++i) amax = std::max(amax, std::fabs(to_f(xb[i])));
      d = amax / 127.f;
      inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t i = 0; i < kXBlock; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(to_f(xb[i]) * inv));
        qb[i] = static_cast<int8_t>(q);
        qsum += q;
      }
#endif
      xscale[m * blocks + b] = d;
      xgsum[m * G + (b * kXBlock) / gs] += d * static_cast<float>(qsum);
      if (xscale16)
        for (int i = 0; i < 8; ++i) xscale16[(m * (K / 64) + b / 2) * 16 + (b % 2) * 8 + i] = d;
    }
  }
}

// The arguments with the per-output-row arrays starting at row n0.
inline QArgs a_for(QArgs a, int64_t n0) {
  a.scales += n0 * a.G;
  if (a.offsets) a.offsets += n0 * a.G;
  if (a.bias) a.bias += n0;
  return a;
}

// The offset of the unsigned form: the format's offset, less 2^(bits-1) * scale.
inline float offset_of(const QArgs& a, int64_t n, int64_t g) {
  return (a.offsets ? a.offsets[n * a.G + g] : 0.f) - static_cast<float>(1 << (a.bits - 1)) * a.scales[n * a.G + g];
}

// ---------------------------------------------------------------- scalar (any CPU)
inline int32_t weight_at(const uint8_t* row, int64_t k, int64_t bits) {   // u, unsigned
  if (bits == 8) return row[k] ^ 0x80;
  const uint8_t byte = row[(k / 64) * 32 + (k % 32)];
  return (k % 64) < 32 ? byte & 0xF : byte >> 4;
}

float row_scalar(const uint8_t* wrow, int64_t n, int64_t m, const QArgs& a) {
  float total = 0.f;
  for (int64_t b = 0; b < a.K / kXBlock; ++b) {
    int32_t dot = 0;
    for (int64_t k = b * kXBlock; k < (b + 1) * kXBlock; ++k) dot += weight_at(wrow, k, a.bits) * a.xq[m * a.K + k];
    total += static_cast<float>(dot) * a.xscale[m * (a.K / kXBlock) + b] * a.scales[n * a.G + (b * kXBlock) / a.gs];
  }
  for (int64_t g = 0; g < a.G; ++g) total += offset_of(a, n, g) * a.xgsum[m * a.G + g];
  return total + (a.bias ? a.bias[n] : 0.f);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// 64 weights of block j as u8 lanes in input order.
template <int BITS>
inline __m512i weights64(const uint8_t* row, int64_t j) {
  if constexpr (BITS == 8) {
    return _mm512_xor_si512(_mm512_loadu_si512(row + j * 64), _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * 32));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
  }
}

// The weight scale of each half of block j: its group's, or (groups of 32) the two groups'.
inline __m512 block_scales(const float* sc, int64_t j, int64_t blocks_per_group) {
  if (blocks_per_group == 0) return _mm512_mask_mov_ps(_mm512_set1_ps(sc[2 * j]), 0xFF00, _mm512_set1_ps(sc[2 * j + 1]));
  return _mm512_set1_ps(sc[j / blocks_per_group]);
}

// NT weight rows against MT rows of x: acc[m * NT + t] += (integer dot of block j) * x scales * weight scales.
// Several weight rows at once so that their fma chains overlap (a row of SmolLM2 is only 9 blocks).
template <int BITS, int MT, int NT>
inline void row_vnni_tile(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t m0, const QArgs& a, float* out,
                          int64_t ldo) {
  const int64_t K = a.K, J = K / 64, bpg = a.gs / 64;   // bpg 0: groups of 32
  const int8_t* xq = a.xq + m0 * K;
  const float* xs16 = a.xscale16 + m0 * J * 16;
  __m512 acc[MT * NT];
  for (int i = 0; i < MT * NT; ++i) acc[i] = _mm512_setzero_ps();
  if (bpg >= 2) {
    // Groups of several blocks (per-channel int8 is one group): each block's sum scaled by its x scale into a
    // per-group accumulator, which the group's weight scale multiplies once.
    for (int64_t g = 0; g < a.G; ++g) {
      __m512 part[MT * NT];
      for (int i = 0; i < MT * NT; ++i) part[i] = _mm512_setzero_ps();
      for (int64_t j = g * bpg; j < (g + 1) * bpg; ++j) {
        __m512i wv[NT];
        for (int t = 0; t < NT; ++t) {
          // Ask for the weights kPrefetch bytes ahead: the hardware prefetcher alone leaves the core waiting
          // on memory between its bursts of arithmetic (measured: 14 against 19 GB/s over SmolLM2's layers).
          _mm_prefetch(reinterpret_cast<const char*>(w + (n + t) * row_bytes + j * (BITS * 8)) + kPrefetch,
                       _MM_HINT_T0);
          wv[t] = weights64<BITS>(w + (n + t) * row_bytes, j);
        }
        for (int m = 0; m < MT; ++m) {
          const __m512i xv = _mm512_loadu_si512(xq + m * K + j * 64);
          const __m512 xs = _mm512_loadu_ps(xs16 + (m * J + j) * 16);
          for (int t = 0; t < NT; ++t)
            part[m * NT + t] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[t], xv)), xs, part[m * NT + t]);
        }
      }
      for (int t = 0; t < NT; ++t) {
        const __m512 sw = _mm512_set1_ps(a.scales[(n + t) * a.G + g]);
        for (int m = 0; m < MT; ++m) acc[m * NT + t] = _mm512_fmadd_ps(part[m * NT + t], sw, acc[m * NT + t]);
      }
    }
  } else {
    for (int64_t j = 0; j < J; ++j) {
      __m512i wv[NT];
      __m512 sw[NT];
      for (int t = 0; t < NT; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + t) * row_bytes + j * (BITS * 8)) + kPrefetch,
                     _MM_HINT_T0);
        wv[t] = weights64<BITS>(w + (n + t) * row_bytes, j);
        sw[t] = block_scales(a.scales + (n + t) * a.G, j, bpg);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq + m * K + j * 64);
        const __m512 xs = _mm512_loadu_ps(xs16 + (m * J + j) * 16);
        for (int t = 0; t < NT; ++t) {
          const __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[t], xv));
          acc[m * NT + t] = _mm512_fmadd_ps(_mm512_mul_ps(d, xs), sw[t], acc[m * NT + t]);
        }
      }
    }
  }
  // The offsets' term, 16 groups at a time.
  const float zero_point = -static_cast<float>(1 << (BITS - 1));
  for (int64_t g = 0; g < a.G; g += 16) {
    const __mmask16 mask = first(a.G - g);
    for (int t = 0; t < NT; ++t) {
      const float* sc = a.scales + (n + t) * a.G;
      const __m512 ov = _mm512_fmadd_ps(
          _mm512_set1_ps(zero_point), _mm512_maskz_loadu_ps(mask, sc + g),
          a.offsets ? _mm512_maskz_loadu_ps(mask, a.offsets + (n + t) * a.G + g) : _mm512_setzero_ps());
      for (int m = 0; m < MT; ++m)
        acc[m * NT + t] = _mm512_fmadd_ps(ov, _mm512_maskz_loadu_ps(mask, a.xgsum + (m0 + m) * a.G + g), acc[m * NT + t]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) out[m * ldo + t] = _mm512_reduce_add_ps(acc[m * NT + t]) + (a.bias ? a.bias[n + t] : 0.f);
}

// Weight rows [n0, n1) against every row of x, into out (fp32 [M, ldo], column n at out + n).
template <int BITS>
void rows_vnni(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, const QArgs& a, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) {
    for (int64_t n = n0; n < n1; ++n) row_vnni_tile<BITS, 4, 1>(w, row_bytes, n, m, a, out + m * ldo + n, ldo);
  }
  const int64_t rest = a.M - m;
  int64_t n = n0;
  if (rest == 1) {
    for (; n + 4 <= n1; n += 4) row_vnni_tile<BITS, 1, 4>(w, row_bytes, n, m, a, out + m * ldo + n, ldo);
    for (; n < n1; ++n) row_vnni_tile<BITS, 1, 1>(w, row_bytes, n, m, a, out + m * ldo + n, ldo);
  } else if (rest == 2) {
    for (; n + 2 <= n1; n += 2) row_vnni_tile<BITS, 2, 2>(w, row_bytes, n, m, a, out + m * ldo + n, ldo);
    for (; n < n1; ++n) row_vnni_tile<BITS, 2, 1>(w, row_bytes, n, m, a, out + m * ldo + n, ldo);
  } else if (rest == 3) {
    for (; n < n1; ++n) row_vnni_tile<BITS, 3, 1>(w, row_bytes, n, m, a, out + m * ldo + n, ldo);
  }
}
#endif

}  // namespace

bool has_fast_quant_linear() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t bits,
                        bool scalar) {
  TORCH_CHECK(bits == 8 || bits == 4, "linear_quant: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "linear_quant: x must be contiguous [M, K] bf16 or fp32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "linear_quant: qweight must be contiguous ", bits == 8 ? "int8 [N, K]" : "uint8 [N, K / 2]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 64 == 0, "linear_quant: the input size must be whole blocks of 64, got ", K);
  TORCH_CHECK(qweight.size(1) == (bits == 8 ? K : K / 2), "linear_quant: qweight is ", qweight.sizes(),
              " for ", bits, "-bit weights of ", K, " inputs");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.is_contiguous() && scales.scalar_type() == at::kFloat,
              "linear_quant: scales must be contiguous fp32 [N, G]");
  const int64_t G = scales.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % kXBlock == 0, "linear_quant: ", G,
              " groups of ", K, " inputs: the group size must be a multiple of 32");
  const int64_t gs = K / G;
  TORCH_CHECK(gs == 32 || gs % 64 == 0, "linear_quant: the group size must be 32 or a multiple of 64, got ", gs);
  if (offsets.has_value())
    TORCH_CHECK(offsets->sizes() == scales.sizes() && offsets->is_contiguous() && offsets->scalar_type() == at::kFloat,
                "linear_quant: offsets must be contiguous fp32 like scales");
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear_quant: bias must be [N]");
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());

  // The quantized activations, made here (a decode step calls this 4 times a layer; no ATen ops).
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xscale, xscale16, xgsum;
  xq.resize(M * K);
  xscale.resize(M * K / kXBlock);
  xscale16.resize(M * (K / 64) * 16);
  xgsum.resize(M * G);
  PLEXUS_DISPATCH(x.scalar_type(), "linear_quant", [&] {
    quantize_x(x.data_ptr<scalar_t>(), M, K, G, xq.data(), xscale.data(), xscale16.data(), xgsum.data());
  });
  QArgs a{M, N, K, G, gs, bits, scales.data_ptr<float>(), offsets.has_value() ? offsets->data_ptr<float>() : nullptr,
          bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, xq.data(), xscale.data(), xscale16.data(),
          xgsum.data()};
  const uint8_t* qw = static_cast<const uint8_t*>(qweight.data_ptr());
  const int64_t row_bytes = qweight.size(1);
  // Enough rows per task that a thread streams tens of KB between barriers.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_bytes, 1));

  PLEXUS_DISPATCH(x.scalar_type(), "linear_quant", [&] {
    using OutT = scalar_t;
    OutT* op = out.data_ptr<OutT>();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (!scalar) {
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        // fp32 results of this task's columns, then converted (a tile writes several columns at once)
        thread_local std::vector<float> part;
        const int64_t width = n1 - n0;
        part.resize(M * width);
        if (bits == 8) rows_vnni<8>(qw + n0 * row_bytes, row_bytes, 0, width, a_for(a, n0), part.data(), width);
        else rows_vnni<4>(qw + n0 * row_bytes, row_bytes, 0, width, a_for(a, n0), part.data(), width);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i = 0; i < width; ++i) op[m * N + n0 + i] = from_f<OutT>(part[m * width + i]);
      });
      return;
    }
#endif
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) op[m * N + n] = from_f<OutT>(row_scalar(qw + n * row_bytes, n, m, a));
    });
  });
  return out;
}

}  // namespace plexus

namespace plexus {

// ---------------------------------------------------------------------------
// W8A8 for longer steps, around oneDNN's int8 matmul (onednn::qlinear_pointwise on prepacked weights, AMX
// where the CPU has it): quantize_rows rounds each row of x to int8 with its own scale max|x| / 127 and
// stores it as uint8 q + 128 (the zero point oneDNN is given); scale_rows multiplies each row of the int32
// matmul's float result by its scale, adds the bias and casts, in one pass.
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "quantize_rows: x must be contiguous [M, K] bf16 or fp32");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  PLEXUS_DISPATCH(x.scalar_type(), "quantize_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    float* sp = scale.data_ptr<float>();
    at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* row = xp + m * K;
        float amax = 0.f;
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 vmax = _mm512_setzero_ps();
        for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(row + k)));
        amax = _mm512_reduce_max_ps(vmax);
#endif
        for (; k < K; ++k) amax = std::max(amax, std::fabs(to_f(row[k])));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        sp[m] = amax / 127.f;
        k = 0;
#if defined(__AVX512F__)
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i offset = _mm512_set1_epi32(128);
        for (; k + 16 <= K; k += 16) {   // rounds to nearest even, as nearbyint
          const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k), vinv)), offset);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + m * K + k), _mm512_cvtusepi32_epi8(v));
        }
#endif
        for (; k < K; ++k)
          qp[m * K + k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(to_f(row[k]) * inv)) + 128);
      }
    });
  });
  return {q, scale};
}

at::Tensor scale_rows(const at::Tensor& y, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                      at::ScalarType out_dtype) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.scalar_type() == at::kFloat, "scale_rows: y must be fp32 [M, N]");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(scale.numel() == M && scale.scalar_type() == at::kFloat, "scale_rows: one fp32 scale per row");
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, y.options().dtype(out_dtype));
  const float* yp = y.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  PLEXUS_DISPATCH(out_dtype, "scale_rows", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int64_t n = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          const __m512 s = _mm512_set1_ps(sp[m]);
          for (; n + 16 <= N; n += 16) {
            const __m512 b = bp ? _mm512_loadu_ps(bp + n) : _mm512_setzero_ps();
            _mm512_storeu_ps(op + m * N + n, _mm512_fmadd_ps(_mm512_loadu_ps(yp + m * N + n), s, b));
          }
        }
#endif
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<scalar_t, bf16>) {
          const __m512 s = _mm512_set1_ps(sp[m]);
          for (; n + 16 <= N; n += 16) {
            const __m512 b = bp ? _mm512_loadu_ps(bp + n) : _mm512_setzero_ps();
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_fmadd_ps(_mm512_loadu_ps(yp + m * N + n), s, b));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + m * N + n), (__m256i)v);
          }
        }
#endif
        for (; n < N; ++n) op[m * N + n] = from_f<scalar_t>(yp[m * N + n] * sp[m] + (bp ? bp[n] : 0.f));
      }
    });
  });
  return out;
}

}  // namespace plexus
