// The bf16 GEMV for few rows (see the comment below), built with -march=native.
#include "common.h"

namespace plexus {

// ---------------------------------------------------------------------------
// Linear for few rows: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
// Memory-bound at small M: weights are streamed once, row after row (one
// sequential stream measured faster here than interleaving several rows or
// repacking), and each row is used for all M rows of x while it sits in L1.
// ---------------------------------------------------------------------------
constexpr int kMTile = 4;    // x rows per register tile
constexpr int64_t kPrefetch = 8192;   // bytes ahead of the weights being read

#if defined(__AVX512BF16__)
// Dot products of one weight row with MT rows of x. Two accumulators per x row
// (even and odd k chunks) so a single row does not wait on one dependency chain.
template <int MT, typename OutT>
inline void dot_row(const bf16* x, int64_t ldx, const bf16* w, int64_t K, OutT* out, int64_t ldo, float bias) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    // the weights kPrefetch bytes ahead (see quant_linear.cpp)
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch + 64, _MM_HINT_T0);
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

}  // namespace plexus
