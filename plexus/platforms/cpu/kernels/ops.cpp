// CPU kernels for the decode hot path, registered as torch.ops.plexus.*.
//
// Each op has a pure-torch twin on the fallback path in plexus/kernels and
// plexus/models/layers that defines what it computes; tests hold the two together. Built once per machine
// with -march=native (see plexus/kernels/__init__.py), so the AVX512-BF16
// paths are compiled only where the CPU has them.
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
namespace {

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

// ---------------------------------------------------------------------------
// Linear for few rows: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
// Memory-bound at small M: weights are streamed once, row after row (one
// sequential stream measured faster here than interleaving several rows or
// repacking), and each row is used for all M rows of x while it sits in L1.
// ---------------------------------------------------------------------------
constexpr int kMTile = 4;    // x rows per register tile

#if defined(__AVX512BF16__)
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline __m512i load32(const bf16* p, int64_t n) {
  return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

// Dot products of one weight row with MT rows of x. Two accumulators per x row
// (even and odd k chunks) so a single row does not wait on one dependency chain.
template <int MT, typename OutT>
inline void dot_row(const bf16* x, int64_t ldx, const bf16* w, int64_t K, OutT* out, int64_t ldo, float bias) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], as_bh(_mm512_loadu_si512(x + m * ldx + k)), as_bh(w0));
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], as_bh(_mm512_loadu_si512(x + m * ldx + k + 32)), as_bh(w1));
    }
  }
  for (; k < K; k += 32) {
    const __m512i wv = load32(w + k, K - k);
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_dpbf16_ps(acc[m][0], as_bh(load32(x + m * ldx + k, K - k)), as_bh(wv));
  }
  for (int m = 0; m < MT; ++m)
    out[m * ldo] = from_f<OutT>(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + bias);
}
#endif

bool has_fast_linear() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
template <typename OutT>
void linear_rows(const bf16* xp, int64_t ldx, const bf16* wp, const float* bp, OutT* op, int64_t M, int64_t N,
                 int64_t K) {
  // Enough rows per task that a thread streams tens of KB between barriers.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const bf16* wr = wp + n * K;
      const float b = bp ? bp[n] : 0.f;
      int64_t m = 0;
      for (; m + kMTile <= M; m += kMTile) dot_row<kMTile>(xp + m * ldx, ldx, wr, K, op + m * N + n, N, b);
      switch (M - m) {
        case 3: dot_row<3>(xp + m * ldx, ldx, wr, K, op + m * N + n, N, b); break;
        case 2: dot_row<2>(xp + m * ldx, ldx, wr, K, op + m * N + n, N, b); break;
        case 1: dot_row<1>(xp + m * ldx, ldx, wr, K, op + m * N + n, N, b); break;
        default: break;
      }
    }
  });
}
#endif

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool out_fp32) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_bf16 takes bf16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bf16: shape mismatch");
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous(), "linear_bf16: x rows and w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_fp32 ? at::kFloat : at::kBFloat16));
#if defined(__AVX512BF16__)
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  if (out_fp32)
    linear_rows(x.data_ptr<bf16>(), x.stride(0), w.data_ptr<bf16>(), bp, out.data_ptr<float>(), M, N, K);
  else
    linear_rows(x.data_ptr<bf16>(), x.stride(0), w.data_ptr<bf16>(), bp, out.data_ptr<bf16>(), M, N, K);
#else
  TORCH_CHECK(false, "linear_bf16 needs a CPU with avx512_bf16");
#endif
  return out;
}

// ---------------------------------------------------------------------------
// RMSNorm as HF Llama computes it: y = w * bf16(x * rsqrt(mean(x^2) + eps)),
// with the residual add rounded to the model dtype first (fused_add_rms_norm).
// ---------------------------------------------------------------------------
template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t H, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < H; ++i) {
    float v = to_f(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / H + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = from_f<T>(to_f(w[i]) * to_f(from_f<T>(to_f(x[i]) * inv)));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == w.scalar_type(), "rms_norm: layout");
  at::Tensor y = at::empty_like(x);
  const int64_t H = x.size(-1), T = x.numel() / H;
  PLEXUS_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) rms_norm_row(xp + t * H, wp, yp + t * H, H, static_cast<float>(eps));
    });
  });
  return y;
}

// residual <- residual + x; returns rms_norm(residual). residual is updated in place.
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && w.is_contiguous(), "add_rms_norm: layout");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == w.scalar_type(), "add_rms_norm: dtype");
  at::Tensor y = at::empty_like(x);
  const int64_t H = x.size(-1), T = x.numel() / H;
  PLEXUS_DISPATCH(x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* r = rp + t * H;
        const scalar_t* xr = xp + t * H;
        for (int64_t i = 0; i < H; ++i) r[i] = from_f<scalar_t>(to_f(r[i]) + to_f(xr[i]));
        rms_norm_row(r, wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return y;
}

// ---------------------------------------------------------------------------
// silu(gate) * up over [T, 2I] -> [T, I], rounded like HF's: silu to the dtype, then the product.
// ---------------------------------------------------------------------------
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: [T, 2I]");
  // ATen's own vectorized silu and mul (a scalar exp loop here was ~10x slower).
  const int64_t I = x.size(1) / 2;
  return at::silu(x.narrow(1, 0, I)).mul_(x.narrow(1, I, I));
}

// ---------------------------------------------------------------------------
// Rotary embedding (rotate-half form) on the fused qkv output, then k and v
// written into their paged cache slots. Returns the rotated q as [T, Hq, D].
// cos/sin: [max_positions, D] fp32 tables.
// ---------------------------------------------------------------------------
template <typename T>
inline void rope_row(const T* src, T* dst, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = to_f(src[i]), b = to_f(src[i + half]);
    dst[i] = from_f<T>(a * cos[i] - b * sin[i]);
    dst[i + half] = from_f<T>(b * cos[i + half] + a * sin[i + half]);
  }
}

at::Tensor rope_and_cache(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                          const at::Tensor& sin, at::Tensor kv_cache, const at::Tensor& slot_mapping,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  // kv_cache: [2, num_blocks, block_size, Hkv, D]
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rope_and_cache: qkv must be [T, (Hq + 2 Hkv) * D]");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.scalar_type() == qkv.scalar_type(), "rope_and_cache: cache");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(), "rope tables fp32");
  const int64_t T = qkv.size(0), D = head_dim, ld = qkv.stride(0);
  at::Tensor q = at::empty({T, num_heads, D}, qkv.options());
  at::Tensor pos = positions.to(at::kLong).contiguous();
  at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t plane = kv_cache.numel() / 2;  // elements in the k half
  PLEXUS_DISPATCH(qkv.scalar_type(), "rope_and_cache", [&] {
    const scalar_t* src = qkv.data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kc = kv_cache.data_ptr<scalar_t>();
    scalar_t* vc = kc + plane;
    const int64_t* pp = pos.data_ptr<int64_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    const float* cp = cos.data_ptr<float>();
    const float* snp = sin.data_ptr<float>();
    at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = src + t * ld;
        const float* c = cp + pp[t] * D;
        const float* s = snp + pp[t] * D;
        for (int64_t h = 0; h < num_heads; ++h) rope_row(row + h * D, qp + (t * num_heads + h) * D, c, s, D);
        const int64_t slot = sp[t];
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          rope_row(row + (num_heads + h) * D, kc + (slot * num_kv_heads + h) * D, c, s, D);
          std::memcpy(vc + (slot * num_kv_heads + h) * D, row + (num_heads + num_kv_heads + h) * D,
                      D * sizeof(scalar_t));
        }
      }
    });
  });
  return q;
}

// ---------------------------------------------------------------------------
// Decode attention straight from the paged cache: one query token per
// sequence, keys and values read through the block table, no gather copy.
// One task per (sequence, kv head) covers the kv head's query-head group.
// ---------------------------------------------------------------------------
template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
  for (int64_t i = 0; i < D; ++i) s += q[i] * to_f(k[i]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* v, float* out, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    const __m512 av = _mm512_set1_ps(a);
    for (int64_t i = 0; i < D; i += 16)
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(av, load16(v + i), _mm512_loadu_ps(out + i)));
    return;
  }
#endif
  for (int64_t i = 0; i < D; ++i) out[i] += a * to_f(v[i]);
}

#if defined(__AVX512BF16__)
// exp for x <= 0 (softmax after subtracting the max): 2^n * p(r), |rel. error| < 2e-7.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

constexpr int kMaxGroup = 8;   // query heads per kv head on the fast path

// One (sequence, kv head) of bf16 decode attention, D = 32 * DC: scores with dpbf16 (q and k as the
// model holds them, fp32 sums), a vectorized softmax, then p * v accumulated in fp32 registers.
template <int DC>
void attend_bf16(const bf16* q, const bf16* kc, const bf16* vc, const int64_t* table, int64_t len,
                 int64_t block_size, int64_t Hkv, int64_t h, int64_t G, float scale, float* scores, bf16* out) {
  constexpr int64_t D = 32 * DC;
  __m512i qv[kMaxGroup][DC];
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) qv[g][c] = _mm512_loadu_si512(q + g * D + 32 * c);
  float mx[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t t = 0; t < len; ++t) {
    const bf16* k = kc + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
    __m512i kv[DC];
    for (int c = 0; c < DC; ++c) kv[c] = _mm512_loadu_si512(k + 32 * c);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < DC; ++c) acc = _mm512_dpbf16_ps(acc, as_bh(qv[g][c]), as_bh(kv[c]));
      const float sc = _mm512_reduce_add_ps(acc) * scale;
      scores[g * len + t] = sc;
      mx[g] = std::max(mx[g], sc);
    }
  }
  float denom[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * len;
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx[g]);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + t), m));
      _mm512_storeu_ps(row + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (t < len) {
      const __mmask16 mask = (__mmask16)((1u << (len - t)) - 1);
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + t), m));
      _mm512_mask_storeu_ps(row + t, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    denom[g] = _mm512_reduce_add_ps(sum);
  }
  __m512 acc[kMaxGroup][2 * DC];
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < 2 * DC; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const bf16* v = vc + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
    __m512 vf[2 * DC];
    for (int j = 0; j < 2 * DC; ++j) vf[j] = load16(v + 16 * j);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 pv = _mm512_set1_ps(scores[g * len + t]);
      for (int j = 0; j < 2 * DC; ++j) acc[g][j] = _mm512_fmadd_ps(pv, vf[j], acc[g][j]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / denom[g]);
    for (int j = 0; j < 2 * DC; ++j) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[g][j], inv));
      for (int d = 0; d < 16; ++d) out[g * D + 16 * j + d] = bf16(tmp[d]);
    }
  }
}

bool attend_bf16_fast(const bf16* q, const bf16* kc, const bf16* vc, const int64_t* table, int64_t len,
                      int64_t block_size, int64_t Hkv, int64_t h, int64_t G, int64_t D, float scale,
                      std::vector<float>& scores, bf16* out) {
  if (G > kMaxGroup || (D != 64 && D != 128)) return false;
  scores.resize(G * len);
  if (D == 64) attend_bf16<2>(q, kc, vc, table, len, block_size, Hkv, h, G, scale, scores.data(), out);
  else attend_bf16<4>(q, kc, vc, table, len, block_size, Hkv, h, G, scale, scores.data(), out);
  return true;
}
#endif

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  // q: [B, Hq, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks]; seq_lens: [B]
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.is_contiguous(), "paged_attention_decode: shapes");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "paged_attention_decode: dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && Hq % Hkv == 0, "paged_attention_decode: head layout");
  const int64_t G = Hq / Hkv;
  at::Tensor qc = q.contiguous();
  at::Tensor tables = block_tables.to(at::kLong).contiguous();
  at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(qc);
  const int64_t plane = kv_cache.numel() / 2;
  const int64_t max_blocks = tables.size(1);
  PLEXUS_DISPATCH(q.scalar_type(), "paged_attention_decode", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kc = kv_cache.data_ptr<scalar_t>();
    const scalar_t* vc = kc + plane;
    const int64_t* tp = tables.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> qf(G * D), acc(G * D), scores;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv, len = lp[b];
        const int64_t* table = tp + b * max_blocks;
#if defined(__AVX512BF16__)
        // (the casts are no-ops: this branch only runs when scalar_t is bf16)
        if (std::is_same_v<scalar_t, bf16> &&
            attend_bf16_fast(reinterpret_cast<const bf16*>(qp) + (b * Hq + h * G) * D,
                             reinterpret_cast<const bf16*>(kc), reinterpret_cast<const bf16*>(vc), table, len,
                             block_size, Hkv, h, G, D, static_cast<float>(scale), scores,
                             reinterpret_cast<bf16*>(op) + (b * Hq + h * G) * D))
          continue;
#endif
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(qp[(b * Hq + h * G + g) * D + d]) * scale;
        scores.resize(G * len);
        std::vector<float> mx(G, -INFINITY);
        for (int64_t t = 0; t < len; ++t) {
          const scalar_t* k = kc + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
          for (int64_t g = 0; g < G; ++g) {
            const float s = dot(qf.data() + g * D, k, D);
            scores[g * len + t] = s;
            mx[g] = std::max(mx[g], s);
          }
        }
        std::vector<float> denom(G, 0.f);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = 0; t < len; ++t) {
            const float e = std::exp(scores[g * len + t] - mx[g]);
            scores[g * len + t] = e;
            denom[g] += e;
          }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const scalar_t* v = vc + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
          for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + t], v, acc.data() + g * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          const float inv = 1.f / denom[g];
          for (int64_t d = 0; d < D; ++d) op[(b * Hq + h * G + g) * D + d] = from_f<scalar_t>(acc[g * D + d] * inv);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// Greedy sampling in one read of the logits: per row, the first index of the
// maximum (torch.argmax's tie rule) and its log-probability, -log(sum(exp(x - max))),
// without materializing a [N, V] log_softmax (12 MB per step at 64 rows).
// ---------------------------------------------------------------------------
template <typename T>
void greedy_row(const T* x, int64_t V, int64_t* id, float* logprob) {
  float mx = -INFINITY;
  int64_t i = 0;
#if defined(__AVX512BF16__)
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= V; i += 16) vmax = _mm512_max_ps(vmax, load16(x + i));
  mx = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < V; ++i) mx = std::max(mx, to_f(x[i]));
  int64_t arg = 0;
  while (arg < V && to_f(x[arg]) != mx) ++arg;   // first maximum; all-NaN rows fall through to V
  float sum = 0.f;
  i = 0;
#if defined(__AVX512BF16__)
  __m512 vsum = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(mx);
  for (; i + 16 <= V; i += 16) vsum = _mm512_add_ps(vsum, exp_ps(_mm512_sub_ps(load16(x + i), vm)));
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < V; ++i) sum += std::exp(to_f(x[i]) - mx);
  *id = arg < V ? arg : 0;
  *logprob = -std::log(sum);
}

std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "greedy_sample: [N, V] rows must be contiguous");
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor ids = at::empty({N}, logits.options().dtype(at::kLong));
  at::Tensor lps = at::empty({N}, logits.options().dtype(at::kFloat));
  PLEXUS_DISPATCH(logits.scalar_type(), "greedy_sample", [&] {
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    int64_t* ip = ids.data_ptr<int64_t>();
    float* lp = lps.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) greedy_row(xp + r * ld, V, ip + r, lp + r);
    });
  });
  return {ids, lps};
}

// ---------------------------------------------------------------------------
// Every decoder layer of a Llama-family model for a step of single-token
// sequences, in one call: the same ops as LlamaDecoderLayer.forward, minus
// the Python between them (about a quarter of a batch-1 step in eager mode).
// weights: 14 per layer: input norm; qkv weight, bias, packed; o weight, bias,
// packed; post-attention norm; gate_up and down likewise. Absent biases and
// packed weights (kernels.pack_weight) are None.
// ---------------------------------------------------------------------------
at::Tensor llama_decode_layers(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slot_mapping,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cos,
                               const at::Tensor& sin, at::TensorList kv_caches,
                               const c10::List<c10::optional<at::Tensor>>& weights, const at::Tensor& final_norm,
                               double eps, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                               int64_t fast_rows_packed, int64_t fast_rows_unpacked) {
  const int64_t rows = hidden.size(0);
  const bool bf16_gemv = has_fast_linear() && hidden.scalar_type() == at::kBFloat16;
  static auto packed_linear = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  // The same choice as plexus.kernels.linear: GEMV for few rows, else oneDNN on prepacked weights, else ATen.
  auto lin = [&](const at::Tensor& x, const c10::optional<at::Tensor>& wt, const c10::optional<at::Tensor>& b,
                 const c10::optional<at::Tensor>& packed) -> at::Tensor {
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
  constexpr int kPerLayer = 14;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L, "llama_decode_layers: 14 weights per layer");
  auto w = [&](int64_t l, int i) -> c10::optional<at::Tensor> { return weights.get(kPerLayer * l + i); };
  const int64_t B = hidden.size(0);
  at::Tensor residual = hidden.clone();
  at::Tensor h;
  for (int64_t l = 0; l < L; ++l) {
    h = l == 0 ? rms_norm(residual, *w(l, 0), eps) : add_rms_norm(h, residual, *w(l, 0), eps);
    at::Tensor qkv = lin(h, w(l, 1), w(l, 2), w(l, 3));
    at::Tensor q = rope_and_cache(qkv, positions, cos, sin, kv_caches[l], slot_mapping, num_heads, num_kv_heads,
                                  head_dim);
    at::Tensor attn = paged_attention_decode(q, kv_caches[l], block_tables, seq_lens, scale).view({B, -1});
    h = add_rms_norm(lin(attn, w(l, 4), w(l, 5), w(l, 6)), residual, *w(l, 7), eps);
    h = lin(silu_and_mul(lin(h, w(l, 8), w(l, 9), w(l, 10))), w(l, 11), w(l, 12), w(l, 13));
  }
  return add_rms_norm(h, residual, final_norm, eps);
}

}  // namespace

TORCH_LIBRARY(plexus, m) {
  m.def("has_fast_linear() -> bool", has_fast_linear);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias, bool out_fp32) -> Tensor");
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
        "int fast_rows_unpacked) -> Tensor");
}

TORCH_LIBRARY_IMPL(plexus, CPU, m) {
  m.impl("linear_bf16", linear_bf16);
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
