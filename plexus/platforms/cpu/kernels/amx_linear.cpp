// W8A8 for batches on AMX tiles: y = (q(x) . W^T) * x_scale * w_scale + bias, with the activations rounded
// to int8 per row (token) and the products accumulated in int32 by TDPBSSD, for steps of more rows than the
// VNNI GEMV serves (quant_linear.cpp).
//
// oneDNN's int8 matmul does the same, but at SmolLM2's sizes and 64 rows its per-call costs (about 30 us,
// plus a quantize and a rescale pass around it) eat the gain; here the weight is laid out as tiles once,
// the activations are quantized into a padded buffer (for decode batches by each thread into its own, inside
// the matmul's parallel region) and the rescale is the epilogue of each 32 x 32 block.
//
// linear_w8a8_amx_glu is the same matmul for a gate/up layer, with silu(gate) * up as its epilogue: its
// weight is packed with the gate and up rows interleaved 16 by 16 (pack_int8_amx_glu), so that each 32-column
// block holds 16 gate and the same 16 up outputs, and the [T, 2I] gate/up output is never written (nor read
// back by silu_and_mul): 3.6-4.0 against 4.4-4.5 s in the 64-request mix's prefill.
//
// Packed weight: [Nt, Kt, 16, 64] int8, Nt = N rounded up to 32 columns / 16, Kt = K rounded up to 64 / 64;
// tile (nt, kt) is TDPBSSD's B operand for columns nt*16.. and inputs kt*64..: its row r holds, for each of
// the 16 columns n, the 4 weights W[n][kt*64 + 4r .. +3]. Padding is zero.
#include "common.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define PLEXUS_AMX 1
#endif

namespace plexus {

namespace {

constexpr int64_t kTileRows = 16;     // rows of a tile (tokens of A, k-quads of B)
constexpr int64_t kTileK = 64;        // int8 inputs per tile row
constexpr int64_t kBlock = 32;        // each step of the loop computes a 32 x 32 block in 4 accumulator tiles

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

#if defined(PLEXUS_AMX)
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the int32 accumulators of a 32 x 32 block; 4, 5: two 16-row slices of the activations; 6, 7:
// two 16-column slices of the weight.
inline void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

bool request_tile_data() {
  // Linux hands out AMX's tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); the permission is process-wide, so threads started before this call have it too.
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

}  // namespace

bool has_amx_int8() {
#if defined(PLEXUS_AMX)
  static const bool ok = request_tile_data();
  return ok;
#else
  return false;
#endif
}

at::Tensor pack_int8_amx(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "pack_int8_amx: w must be int8 [N, K]");
  const at::Tensor wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t Nt = round_up(N, kBlock) / kTileRows, Kt = round_up(K, kTileK) / kTileK;
  at::Tensor packed = at::zeros({Nt, Kt, kTileRows, kTileK}, w.options().dtype(at::kChar));
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  at::parallel_for(0, Nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t nt = t0; nt < t1; ++nt)
      for (int64_t n = 0; n < kTileRows && nt * kTileRows + n < N; ++n) {
        const int8_t* row = src + (nt * kTileRows + n) * K;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t kt = k / kTileK, r = (k % kTileK) / 4, j = k % 4;
          dst[((nt * Kt + kt) * kTileRows + r) * kTileK + n * 4 + j] = row[k];
        }
      }
  });
  return packed;
}

#if defined(PLEXUS_AMX)
namespace {

// One row x[0, K) -> int8 values q[0, K) rounded to nearest even as torch.round does, returning its scale
// max|x| / 127 (0 for a zero row).
inline float quantize_row(const float* x, int64_t K, int8_t* q) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (k = 0; k + 16 <= K; k += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv))));
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  return amax / 127.f;
}

// The same for bf16, 32 inputs a step on their bit patterns: |x|'s pattern is x's without the sign bit, and
// ordered as unsigned integers as the values are; the even and odd inputs of each 32-bit pair are, as float32,
// the pair shifted left 16 and the pair masked; their int32 results go back into 16-bit lanes, then int8.
inline float quantize_row(const bf16* x, int64_t K, int8_t* q) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  __m512i vmax = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    vmax = _mm512_max_epu16(vmax, _mm512_and_si512(_mm512_loadu_si512(bits + k), _mm512_set1_epi16(0x7FFF)));
  const uint32_t top = _mm512_reduce_max_epu32(
      _mm512_max_epu32(_mm512_and_si512(vmax, _mm512_set1_epi32(0xFFFF)), _mm512_srli_epi32(vmax, 16)));
  float amax;
  const uint32_t amax_bits = top << 16;
  std::memcpy(&amax, &amax_bits, sizeof(amax));
  for (; k < K; ++k) amax = std::max(amax, std::fabs(to_f(x[k])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (k = 0; k + 32 <= K; k += 32) {
    const __m512i pairs = _mm512_loadu_si512(bits + k);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int(0xFFFF0000u))));
    const __m512i q_even = _mm512_cvtps_epi32(_mm512_mul_ps(even, vinv));
    const __m512i q_odd = _mm512_cvtps_epi32(_mm512_mul_ps(odd, vinv));
    const __m512i q16 = _mm512_mask_blend_epi16(0xAAAAAAAAu, q_even, _mm512_slli_epi32(q_odd, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm512_cvtepi16_epi8(q16));   // |q| <= 127
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(to_f(x[k]) * inv));
  return amax / 127.f;
}

// x [M, K] -> int8 rows into xq [Mp, Kp] and per-row scales xs; the padding is the caller's.
template <typename T>
void quantize_rows_padded(const T* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* xs) {
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) xs[m] = quantize_row(x + m * K, K, xq + m * Kp);
  });
}

// One 32 x 32 block's epilogue: out[m, n] = c[m, n] * xs[m] * ws[n] + bias[n], for the rows and columns
// inside M x N.
template <typename OutT>
inline void store_block(const int32_t* c, int64_t rows, int64_t cols, const float* xs, const float* ws,
                        const float* bias, OutT* out, int64_t ldo) {
  const __mmask16 lo = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? (__mmask16)0xFFFF : cols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (cols - 16)) - 1);
  const __m512 w0 = _mm512_maskz_loadu_ps(lo, ws), w1 = _mm512_maskz_loadu_ps(hi, ws + 16);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 s = _mm512_set1_ps(xs[m]);
    const __m512 v0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + m * kBlock)), s), w0, b0);
    const __m512 v1 =
        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + m * kBlock + 16)), s), w1, b1);
    OutT* o = out + m * ldo;
    if constexpr (std::is_same_v<OutT, float>) {
      _mm512_mask_storeu_ps(o, lo, v0);
      _mm512_mask_storeu_ps(o + 16, hi, v1);
    } else {
      _mm256_mask_storeu_epi16(o, lo, (__m256i)_mm512_cvtneps_pbh(v0));
      _mm256_mask_storeu_epi16(o + 16, hi, (__m256i)_mm512_cvtneps_pbh(v1));
    }
  }
}

// The same for a block of the interleaved gate/up weight: its columns 0-15 are the gate outputs n0.. and
// 16-31 the up outputs of the same n, and out[m, n0 + j] = silu(gate) * up, rounded as linear then
// silu_and_mul round: gate and up to OutT, silu to OutT, the product to OutT.
template <typename OutT>
inline void store_glu_block(const int32_t* c, int64_t rows, const float* xs, const float* ws_gate,
                            const float* ws_up, const float* bias_gate, const float* bias_up, OutT* out,
                            int64_t ldo) {
  const __m512 wg = _mm512_loadu_ps(ws_gate), wu = _mm512_loadu_ps(ws_up);
  const __m512 bg = bias_gate ? _mm512_loadu_ps(bias_gate) : _mm512_setzero_ps();
  const __m512 bu = bias_up ? _mm512_loadu_ps(bias_up) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 s = _mm512_set1_ps(xs[m]);
    const __m512 gate = round_to<OutT>(
        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + m * kBlock)), s), wg, bg));
    const __m512 up = round_to<OutT>(
        _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + m * kBlock + 16)), s), wu, bu));
    store16(out + m * ldo, _mm512_mul_ps(round_to<OutT>(silu16(gate)), up));
  }
}

// The int8 rows [Mp, Kp] times the packed weight's `blocks` 32-column blocks. Each thread takes its rows and
// their scales from rows() (Int8Source); epilogue(c, m0, nb, xs) takes each 32 x 32 block of int32 sums
// (row-major) of rows m0.. and block nb.
template <typename Rows, typename Epilogue>
void amx_matmul(const Rows& rows, int64_t Mp, int64_t Kp, const int8_t* w, int64_t blocks, int64_t Kt,
                const Epilogue& epilogue) {
  const int64_t tile_bytes = kTileRows * kTileK;
  // Rows in chunks of about 512 KB of activations, so that a chunk and a thread's half of the weight stay
  // in its L2 (2 MB) while the thread's column blocks run over the chunk (without chunks, 2048 rows of the
  // down projection's 1536 inputs, 3 MB, came from DRAM again for each column block).
  const int64_t chunk = std::max(kBlock, (int64_t(512) << 10) / Kp / kBlock * kBlock);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const auto [xq, xs] = rows();
    configure_tiles();
    alignas(64) int32_t c[kBlock * kBlock];
    for (int64_t mc = 0; mc < Mp; mc += chunk)
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int8_t* w0 = w + (2 * nb) * Kt * tile_bytes;
      const int8_t* w1 = w0 + Kt * tile_bytes;
      for (int64_t m0 = mc; m0 < std::min(Mp, mc + chunk); m0 += kBlock) {
        const int8_t* a0 = xq + m0 * Kp;
        const int8_t* a1 = a0 + kTileRows * Kp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kt = 0; kt < Kt; ++kt) {
          if (m0 == mc && nb + 2 < b1) {  // the next block's weight into L2 while this one computes
            const int8_t* next = w0 + 4 * Kt * tile_bytes + kt * tile_bytes;
            for (int64_t line = 0; line < tile_bytes; line += 64) {
              _mm_prefetch(reinterpret_cast<const char*>(next + line), _MM_HINT_T1);
              _mm_prefetch(reinterpret_cast<const char*>(next + Kt * tile_bytes + line), _MM_HINT_T1);
            }
          }
          _tile_loadd(4, a0 + kt * kTileK, Kp);
          _tile_loadd(5, a1 + kt * kTileK, Kp);
          _tile_loadd(6, w0 + kt * tile_bytes, kTileK);
          _tile_loadd(7, w1 + kt * tile_bytes, kTileK);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, c, kBlock * 4);
        _tile_stored(1, c + 16, kBlock * 4);
        _tile_stored(2, c + 16 * kBlock, kBlock * 4);
        _tile_stored(3, c + 16 * kBlock + 16, kBlock * 4);
        epilogue(c, m0, nb, xs);
      }
    }
    _tile_release();
  });
}

}  // namespace
#endif

#if defined(PLEXUS_AMX)
namespace {

// Steps of at most this many rows (decode batches) are rounded to int8 by each thread of the matmul itself,
// all rows into its own buffer: one parallel region per call instead of two, and the rows in its own cache.
constexpr int64_t kOwnRows = 64;

// What linear_w8a8_amx and its gate/up form share: the checks, the weight scales and bias as float32, and for
// longer steps x's rows rounded to int8 into a buffer padded to whole tiles (xq [Mp, Kp], scales xs [Mp]).
struct Int8Rows {
  at::Tensor xq, xs;   // undefined for steps of at most kOwnRows rows
  at::Tensor ws, bias;  // bias undefined where there is none
  int64_t M, K, Mp, Kp, Kt;

  const float* ws_ptr() const { return ws.data_ptr<float>(); }
  const float* bias_ptr() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }
};

Int8Rows int8_rows_for(const char* op, const at::Tensor& x, const at::Tensor& packed,
                       const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias) {
  const int64_t N = weight_scale.numel();
  TORCH_CHECK(has_amx_int8(), op, ": this CPU or OS gives no AMX tiles");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              op, ": x must be contiguous [M, K] bf16 or fp32");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kTileRows && packed.size(3) == kTileK && packed.size(0) % 2 == 0,
              op, ": packed must come from pack_int8_amx");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t Kt = packed.size(1), Kp = Kt * kTileK, Mp = round_up(M, kBlock);
  TORCH_CHECK(round_up(K, kTileK) == Kp && round_up(N, kBlock) == packed.size(0) * kTileRows, op, ": x has ", K,
              " inputs and weight_scale ", N, " outputs; the packed weight is ", packed.sizes());
  Int8Rows r{at::Tensor(), at::Tensor(), weight_scale.to(at::kFloat).contiguous(),
             bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor(), M, K, Mp, Kp, Kt};
  if (M <= kOwnRows) return r;
  r.xq = at::empty({Mp, Kp}, x.options().dtype(at::kChar));
  r.xs = at::empty({Mp}, x.options().dtype(at::kFloat));
  if (Kp != K) r.xq.zero_();
  else if (Mp != M) r.xq.narrow(0, M, Mp - M).zero_();
  PLEXUS_DISPATCH(x.scalar_type(), "linear_w8a8_amx", [&] {
    quantize_rows_padded(x.data_ptr<scalar_t>(), M, K, Kp, r.xq.data_ptr<int8_t>(), r.xs.data_ptr<float>());
  });
  return r;
}

// Where a thread of amx_matmul finds the int8 rows and their scales: the buffer int8_rows_for filled, or for a
// step of at most kOwnRows rows, its own, filled on the spot.
template <typename T>
struct Int8Source {
  const T* x;
  const Int8Rows& r;

  std::pair<const int8_t*, const float*> operator()() const {
    if (r.xq.defined()) return {r.xq.data_ptr<int8_t>(), r.xs.data_ptr<float>()};
    static thread_local std::vector<int8_t> xq;
    static thread_local std::vector<float> xs;
    xq.resize(r.Mp * r.Kp);
    xs.resize(r.Mp);
    for (int64_t m = 0; m < r.M; ++m) {
      xs[m] = quantize_row(x + m * r.K, r.K, xq.data() + m * r.Kp);
      std::memset(xq.data() + m * r.Kp + r.K, 0, r.Kp - r.K);
    }
    std::memset(xq.data() + r.M * r.Kp, 0, (r.Mp - r.M) * r.Kp);
    return {xq.data(), xs.data()};
  }
};

}  // namespace
#endif

at::Tensor linear_w8a8_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_scale,
                           const c10::optional<at::Tensor>& bias) {
#if defined(PLEXUS_AMX)
  const int64_t N = weight_scale.numel();
  const Int8Rows r = int8_rows_for("linear_w8a8_amx", x, packed, weight_scale, bias);
  at::Tensor out = at::empty({r.M, N}, x.options());
  if (r.M == 0) return out;
  const float* wsp = r.ws_ptr();
  const float* b = r.bias_ptr();
  PLEXUS_DISPATCH(x.scalar_type(), "linear_w8a8_amx", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    amx_matmul(Int8Source<scalar_t>{x.data_ptr<scalar_t>(), r}, r.Mp, r.Kp, packed.data_ptr<int8_t>(),
               round_up(N, kBlock) / kBlock, r.Kt, [&](const int32_t* c, int64_t m0, int64_t nb, const float* xs) {
                 const int64_t n0 = nb * kBlock;
                 store_block(c, std::min(kBlock, r.M - m0), std::min(kBlock, N - n0), xs + m0, wsp + n0,
                             b ? b + n0 : nullptr, o + m0 * N + n0, N);
               });
  });
  return out;
#else
  TORCH_CHECK(false, "linear_w8a8_amx: built without AMX (check has_amx_int8 first)");
#endif
}

at::Tensor pack_int8_amx_glu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(0) % 32 == 0,
              "pack_int8_amx_glu: w must be an int8 gate/up weight [2I, K] with I a multiple of 16");
  const int64_t I = w.size(0) / 2, K = w.size(1);
  // rows gate 0-15, up 0-15, gate 16-31, up 16-31, ...
  return pack_int8_amx(w.view({2, I / kTileRows, kTileRows, K}).transpose(0, 1).reshape({2 * I, K}));
}

at::Tensor linear_w8a8_amx_glu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_scale,
                               const c10::optional<at::Tensor>& bias) {
#if defined(PLEXUS_AMX)
  const int64_t N = weight_scale.numel(), I = N / 2;
  TORCH_CHECK(N % 32 == 0, "linear_w8a8_amx_glu: weight_scale must have 2I entries (gate, then up) with I a "
              "multiple of 16; it has ", N);
  const Int8Rows r = int8_rows_for("linear_w8a8_amx_glu", x, packed, weight_scale, bias);
  at::Tensor out = at::empty({r.M, I}, x.options());
  if (r.M == 0) return out;
  const float* wsp = r.ws_ptr();
  const float* b = r.bias_ptr();
  PLEXUS_DISPATCH(x.scalar_type(), "linear_w8a8_amx_glu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    amx_matmul(Int8Source<scalar_t>{x.data_ptr<scalar_t>(), r}, r.Mp, r.Kp, packed.data_ptr<int8_t>(), I / kTileRows,
               r.Kt, [&](const int32_t* c, int64_t m0, int64_t nb, const float* xs) {
                 const int64_t n0 = nb * kTileRows;   // block nb: gate and up outputs n0 .. n0 + 15
                 store_glu_block(c, std::min(kBlock, r.M - m0), xs + m0, wsp + n0, wsp + I + n0,
                                 b ? b + n0 : nullptr, b ? b + I + n0 : nullptr, o + m0 * I + n0, I);
               });
  });
  return out;
#else
  TORCH_CHECK(false, "linear_w8a8_amx_glu: built without AMX (check has_amx_int8 first)");
#endif
}

}  // namespace plexus
