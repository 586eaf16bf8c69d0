// Paged decode attention and one-pass greedy sampling.
#include "common.h"

namespace plexus {

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

// Sixteen dot-product accumulators in, one vector of their sixteen sums out (lane j: the sum of v[j]).
// A transposing add tree, 45 shuffles and adds for 16 sums, where one horizontal reduce per sum costs ~8.
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)   // per 128-bit lane: [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per lane: the lane's partial sums of v4i .. v4i+3
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)    // lanes (0+1, 2+3) of b2i, then of b2i+1
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// One (sequence, kv head) of bf16 decode attention, D = 32 * DC. Scores: sixteen keys at a time, dpbf16
// (q and k as the model holds them, fp32 sums) into sixteen accumulators per query head, summed by sum16.
// Then a vectorized softmax, then p * v accumulated in
// fp32 registers. rows[t]: token t's row in the cache (block * block_size + offset); scores: [G, len].
// (One task per kv head, not per sequence: reading one head's rows of a block, three passes per block,
// measured 20% faster than one pass over whole blocks, which spends more of each row's time computing.)
template <int DC>
void attend_bf16(const bf16* q, const bf16* kc, const bf16* vc, const int64_t* rows, int64_t len, int64_t Hkv,
                 int64_t h, int64_t G, float scale, float* scores, bf16* out) {
  constexpr int64_t D = 32 * DC;
  const int64_t stride = Hkv * D;
  kc += h * D;
  vc += h * D;
  // Prefetch into L2 well ahead (kAheadK keys, kAheadV values): cold rows arrive from DRAM while earlier
  // ones are computed on (14 GB/s from a cache bigger than L3, against 7 without; 27 is the machine's).
  constexpr int64_t kAheadK = 48, kAheadV = 24;
  auto prefetch_row = [&](const bf16* base, int64_t t) {
    for (int64_t c = 0; c < D; c += 32) _mm_prefetch(reinterpret_cast<const char*>(base + rows[t] * stride + c), _MM_HINT_T1);
  };
  for (int64_t t = 0; t < std::min(kAheadK, len); ++t) prefetch_row(kc, t);
  __m512i qv[kMaxGroup][DC];
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < DC; ++c) qv[g][c] = _mm512_loadu_si512(q + g * D + 32 * c);
  __m512 vmax[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) vmax[g] = _mm512_set1_ps(-INFINITY);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    const __mmask16 mask = (__mmask16)((1u << n) - 1);
    for (int64_t t = t0 + kAheadK; t < std::min(t0 + kAheadK + 16, len); ++t) prefetch_row(kc, t);
    const bf16* k[16];
    for (int64_t j = 0; j < 16; ++j) k[j] = kc + rows[t0 + std::min(j, n - 1)] * stride;
    for (int64_t g = 0; g < G; ++g) {
      __m512 a[16];
      for (int j = 0; j < 16; ++j) {
        a[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(qv[g][0]), as_bh(_mm512_loadu_si512(k[j])));
        for (int c = 1; c < DC; ++c)
          a[j] = _mm512_dpbf16_ps(a[j], as_bh(qv[g][c]), as_bh(_mm512_loadu_si512(k[j] + 32 * c)));
      }
      const __m512 sc = _mm512_mul_ps(sum16(a), vscale);
      _mm512_mask_storeu_ps(scores + g * len + t0, mask, sc);
      vmax[g] = _mm512_mask_max_ps(vmax[g], mask, vmax[g], sc);
    }
  }
  float denom[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * len;
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[g]));
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
  for (int64_t t = 0; t < std::min(kAheadV, len); ++t) prefetch_row(vc, t);
  for (int64_t t = 0; t < len; ++t) {
    if (t + kAheadV < len) prefetch_row(vc, t + kAheadV);
    const bf16* v = vc + rows[t] * stride;
    __m512 vf[2 * DC];
    for (int j = 0; j < 2 * DC; ++j) vf[j] = load16(v + 16 * j);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 pv = _mm512_set1_ps(scores[g * len + t]);
      for (int j = 0; j < 2 * DC; ++j) acc[g][j] = _mm512_fmadd_ps(pv, vf[j], acc[g][j]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / denom[g]);
    for (int j = 0; j < 2 * DC; ++j) store16(out + g * D + 16 * j, _mm512_mul_ps(acc[g][j], inv));
  }
}

// Positions start..len-1 of the sequence (start > 0 under a sliding window).
bool attend_bf16_fast(const bf16* q, const bf16* kc, const bf16* vc, const int64_t* table, int64_t start,
                      int64_t len, int64_t block_size, int64_t Hkv, int64_t h, int64_t G, int64_t D, float scale,
                      std::vector<float>& scores, std::vector<int64_t>& rows, bf16* out) {
  if (G > kMaxGroup || (D != 64 && D != 128)) return false;
  const int64_t n = len - start;
  scores.resize(G * n);
  rows.resize(n);
  for (int64_t t = start; t < len; ++t) rows[t - start] = table[t / block_size] * block_size + t % block_size;
  if (D == 64) attend_bf16<2>(q, kc, vc, rows.data(), n, Hkv, h, G, scale, scores.data(), out);
  else attend_bf16<4>(q, kc, vc, rows.data(), n, Hkv, h, G, scale, scores.data(), out);
  return true;
}
#endif

// One (sequence, kv head) in any dtype and head size, over positions start..len-1: the reference loop the
// fast path must agree with.
template <typename T>
void attend_generic(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t start, int64_t len,
                    int64_t block_size, int64_t Hkv, int64_t h, int64_t G, int64_t D, float scale,
                    std::vector<float>& qf, std::vector<float>& acc, std::vector<float>& scores, T* out) {
  qf.resize(G * D);
  acc.assign(G * D, 0.f);
  scores.assign(G * len, 0.f);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_f(q[i]) * scale;
  std::vector<float> mx(G, -INFINITY), denom(G, 0.f);
  for (int64_t t = start; t < len; ++t) {
    const T* k = kc + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float s = dot(qf.data() + g * D, k, D);
      scores[g * len + t] = s;
      mx[g] = std::max(mx[g], s);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = start; t < len; ++t) {
      const float e = std::exp(scores[g * len + t] - mx[g]);
      scores[g * len + t] = e;
      denom[g] += e;
    }
  for (int64_t t = start; t < len; ++t) {
    const T* v = vc + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
    for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + t], v, acc.data() + g * D, D);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / denom[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = from_f<T>(acc[g * D + d] * inv);
  }
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  // q: [B, Hq, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks]; seq_lens: [B];
  // window > 0: the query (position len - 1) attends the last `window` positions only (HF's sliding window)
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
  const int64_t* lp = lens.data_ptr<int64_t>();
  // One task per (sequence, kv head). Each thread takes a contiguous run of tasks with about its share of
  // the keys rather than of the tasks: sequence lengths differ by 10x in a mixed batch.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads()), ntasks = B * Hkv;
  std::vector<int64_t> first(nthreads + 1, ntasks);
  int64_t total = 0;
  auto span = [&](int64_t b) { return window > 0 ? std::min(lp[b], window) : lp[b]; };
  for (int64_t b = 0; b < B; ++b) total += Hkv * (span(b) + 16);
  for (int64_t i = 0, done = 0, th = 0; i < ntasks; ++i) {
    while (th < nthreads && done * nthreads >= total * th) first[th++] = i;
    done += span(i / Hkv) + 16;
  }
  PLEXUS_DISPATCH(q.scalar_type(), "paged_attention_decode", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kc = kv_cache.data_ptr<scalar_t>();
    const scalar_t* vc = kc + plane;
    const int64_t* tp = tables.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, nthreads, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> qf, acc, scores;
      std::vector<int64_t> rows;
      for (int64_t i = first[p0]; i < first[p1]; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv, len = lp[b], start = len - span(b), off = (b * Hq + h * G) * D;
        const int64_t* table = tp + b * max_blocks;
#if defined(__AVX512BF16__)
        // (the casts are no-ops: this branch only runs when scalar_t is bf16)
        if (std::is_same_v<scalar_t, bf16> &&
            attend_bf16_fast(reinterpret_cast<const bf16*>(qp) + off, reinterpret_cast<const bf16*>(kc),
                             reinterpret_cast<const bf16*>(vc), table, start, len, block_size, Hkv, h, G, D,
                             static_cast<float>(scale), scores, rows, reinterpret_cast<bf16*>(op) + off))
          continue;
#endif
        attend_generic(qp + off, kc, vc, table, start, len, block_size, Hkv, h, G, D, static_cast<float>(scale), qf,
                       acc, scores, op + off);
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

}  // namespace plexus
