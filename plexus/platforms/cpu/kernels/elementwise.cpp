// RMSNorm (with the fused residual add), SiLU x up, and rotary embedding with the KV-cache write.
#include "common.h"

namespace plexus {

// ---------------------------------------------------------------------------
// RMSNorm as HF Llama computes it: y = w * bf16(x * rsqrt(mean(x^2) + eps)),
// with the residual add rounded to the model dtype first (fused_add_rms_norm).
// ---------------------------------------------------------------------------
template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t H, float eps) {
  float ss = 0.f;
  int64_t i = 0;
#if defined(__AVX512BF16__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= H; i += 16) {
    const __m512 v = load16(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < H; ++i) {
    float v = to_f(x[i]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / H + eps);
  i = 0;
#if defined(__AVX512BF16__)
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; i + 16 <= H; i += 16)
    store16(y + i, _mm512_mul_ps(load16(w + i), round_to<T>(_mm512_mul_ps(load16(x + i), vinv))));
#endif
  for (; i < H; ++i) y[i] = from_f<T>(to_f(w[i]) * to_f(from_f<T>(to_f(x[i]) * inv)));
}

template <typename T>
inline void add_row(T* r, const T* x, int64_t H) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= H; i += 16) store16(r + i, _mm512_add_ps(load16(r + i), load16(x + i)));
#endif
  for (; i < H; ++i) r[i] = from_f<T>(to_f(r[i]) + to_f(x[i]));
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
        add_row(r, xr, H);
        rms_norm_row(r, wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return y;
}

// ---------------------------------------------------------------------------
// silu(gate) * up over [T, 2I] -> [T, I], rounded like HF's: silu to the dtype, then the product.
// ---------------------------------------------------------------------------

template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t I) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= I; i += 16) store16(out + i, _mm512_mul_ps(round_to<T>(silu16(load16(gate + i))), load16(up + i)));
#endif
  for (; i < I; ++i) {
    const float g = to_f(gate[i]);
    out[i] = from_f<T>(to_f(from_f<T>(g / (1.f + std::exp(-g)))) * to_f(up[i]));
  }
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1, "silu_and_mul: [T, 2I] with unit stride");
  const int64_t T = x.size(0), I = x.size(1) / 2, ld = x.stride(0);
  at::Tensor out = at::empty({T, I}, x.options());
  PLEXUS_DISPATCH(x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(I, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) silu_and_mul_row(xp + t * ld, xp + t * ld + I, op + t * I, I);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// Rotary embedding (rotate-half form) on the fused qkv output, then k and v
// written into their paged cache slots. Returns the rotated q as [T, Hq, D].
// cos/sin: [max_positions, D] fp32 tables.
// ---------------------------------------------------------------------------
template <typename T>
inline void rope_row(const T* src, T* dst, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= half; i += 16) {
    const __m512 a = load16(src + i), b = load16(src + i + half);
    store16(dst + i, _mm512_sub_ps(_mm512_mul_ps(a, _mm512_loadu_ps(cos + i)),
                                   _mm512_mul_ps(b, _mm512_loadu_ps(sin + i))));
    store16(dst + i + half, _mm512_add_ps(_mm512_mul_ps(b, _mm512_loadu_ps(cos + i + half)),
                                          _mm512_mul_ps(a, _mm512_loadu_ps(sin + i + half))));
  }
#endif
  for (; i < half; ++i) {
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
  // R: the rotated dims of each head (the tables' width; R < D: a partial rotary embedding, the rest copied)
  const int64_t T = qkv.size(0), D = head_dim, ld = qkv.stride(0), R = cos.size(1);
  TORCH_CHECK(R <= D && R % 2 == 0 && sin.size(1) == R, "rope_and_cache: tables of an even width up to head_dim");
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
    auto rope_head = [&](const scalar_t* in, scalar_t* out, const float* c, const float* s) {
      rope_row(in, out, c, s, R);
      if (R < D) std::memcpy(out + R, in + R, (D - R) * sizeof(scalar_t));
    };
    at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = src + t * ld;
        const float* c = cp + pp[t] * R;
        const float* s = snp + pp[t] * R;
        for (int64_t h = 0; h < num_heads; ++h) rope_head(row + h * D, qp + (t * num_heads + h) * D, c, s);
        const int64_t slot = sp[t];
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          rope_head(row + (num_heads + h) * D, kc + (slot * num_kv_heads + h) * D, c, s);
          std::memcpy(vc + (slot * num_kv_heads + h) * D, row + (num_heads + num_kv_heads + h) * D,
                      D * sizeof(scalar_t));
        }
      }
    });
  });
  return q;
}

}  // namespace plexus
