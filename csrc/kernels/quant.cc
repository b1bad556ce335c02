// Linear layers on quantized weights. Activations are quantized per block of 32 to int8 (scale
// dx = max|x| / 127), so every block product is an integer dot product: VNNI (vpdpbusd) on
// AVX-512, vpmaddubsw on AVX2, plain loops elsewhere; fp32 accumulation across blocks.
#include <float.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/quant_strips.h"
#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {
void gated_activation_row(const float* gate, const float* up, long n, Activation act, float* out);
// The 5-bit and K-quant formats (is_quant_k_format) run in quant_k.cc.
void linear_quant_k(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate);
void linear_quant_gated_k(const float* x, long M, const QuantWeight& w, Activation act, float* y);
void dequantize_row_k(const QuantWeight& w, long row, float* out);

// One scale per block, also for the int8 format, whose weights have one per row: a scale per run
// of four blocks would let its GEMM sum them in int32, but cost SmolLM2 int8 ~2 points of top-1
// agreement with float32 (and MiniLM's lowest cosine 0.99892 -> 0.99805).
void quantize_row(const float* x, long K, int8_t* q, float* d, float* s) {
  for (long b = 0; b < K / kQuantBlock; ++b) {
    const float* xb = x + b * kQuantBlock;
    bool finite;
    const float m = vabsmax(xb, kQuantBlock, &finite);
    const float scale = m / 127.0f, inv = m > 0.0f ? 127.0f / m : 0.0f;
    if (!finite || !(inv <= FLT_MAX)) {
      // An inf or NaN in the block: its products are NaN, as in float, not the integer garbage a
      // NaN converts to. Or values so small that 127 / max overflows: they count as zeros.
      std::memset(q + b * kQuantBlock, 0, kQuantBlock);
      d[b] = finite ? scale : std::numeric_limits<float>::quiet_NaN();
      s[b] = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    // Round to nearest even (the default mode, as nearbyintf); |x * inv| <= 127.
#if defined(PYXF_TARGET_avx512)
    const __m512 vi = _mm512_set1_ps(inv);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb), vi));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16), vi));
    _mm_storeu_si128((__m128i*)(q + b * kQuantBlock), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(q + b * kQuantBlock + 16), _mm512_cvtepi32_epi8(q1));
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#elif defined(PYXF_TARGET_avx2)
    const __m256 vi = _mm256_set1_ps(inv);
    __m256i qi[4];
    for (int j = 0; j < 4; ++j) qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), vi));
    // int32 -> int16 -> int8 packs interleave 128-bit lanes; one permute restores the order.
    const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]), w23 = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)(q + b * kQuantBlock), bytes);
    const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    const __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    const __m128i s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0x4e));
    const int sum = _mm_cvtsi128_si32(_mm_add_epi32(s1, _mm_shuffle_epi32(s1, 0xb1)));
#else
    int sum = 0;
    for (int i = 0; i < kQuantBlock; ++i) {
      const int v = (int)nearbyintf(xb[i] * inv);
      q[b * kQuantBlock + i] = (int8_t)v;
      sum += v;
    }
#endif
    d[b] = scale;
    s[b] = scale * (float)sum;
  }
}

namespace {

constexpr int QK = kQuantBlock;

float half_to_float(uint16_t h) { return to_f32(f16{h}); }

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

// Activations of one row: int8 blocks, their scales and scale * sum(q) (for the q4 offsets).
struct QuantRow {
  const int8_t* q;
  const float* d;
  const float* s;
};

// ---- one block: 32 weights (as stored) times 32 int8 activations -> partial int32 sums ----
#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
using IVec = __m256i;
static inline IVec dot_u8s8(__m256i u, __m256i s) {
#if defined(PYXF_TARGET_avx512)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// Signed x signed via |w| and x with the sign of w.
static inline IVec dot_s8s8(__m256i w, __m256i x) {
  return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}
static inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128((const __m128i*)qs);
  const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
  return _mm256_set_m128i(hi, lo);
}
template <QuantFormat F>
static inline IVec block_dot(const uint8_t* wb, const int8_t* xq) {
  const __m256i x = _mm256_loadu_si256((const __m256i*)xq);
  if constexpr (F == QuantFormat::kQ8_0) return dot_s8s8(_mm256_loadu_si256((const __m256i*)(wb + 2)), x);
  if constexpr (F == QuantFormat::kQ4_0) return dot_u8s8(unpack_nibbles(wb + 2), x);  // -8: an offset
  if constexpr (F == QuantFormat::kQ4_1) return dot_u8s8(unpack_nibbles(wb + 4), x);
  if constexpr (F == QuantFormat::kInt8) return dot_s8s8(_mm256_loadu_si256((const __m256i*)wb), x);
}
struct FAcc {
  __m256 v;
};
static inline FAcc facc_zero() { return {_mm256_setzero_ps()}; }
static inline void facc_add(FAcc& a, IVec i, float scale) {
  a.v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(scale), a.v);
}
static inline float facc_sum(FAcc a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
using IVec = int;
template <QuantFormat F>
static inline IVec block_dot(const uint8_t* wb, const int8_t* xq) {
  int sum = 0;
  if constexpr (F == QuantFormat::kQ4_0 || F == QuantFormat::kQ4_1) {
    // Raw nibbles: q4_0's -8 is applied by the caller as an offset, like q4_1's m.
    const uint8_t* qs = wb + (F == QuantFormat::kQ4_0 ? 2 : 4);
    for (int i = 0; i < QK / 2; ++i) sum += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + QK / 2];
  } else {
    const int8_t* q = (const int8_t*)(F == QuantFormat::kQ8_0 ? wb + 2 : wb);
    for (int i = 0; i < QK; ++i) sum += (int)q[i] * xq[i];
  }
  return sum;
}
struct FAcc {
  float v;
};
static inline FAcc facc_zero() { return {0.0f}; }
static inline void facc_add(FAcc& a, IVec i, float scale) { a.v += (float)i * scale; }
static inline float facc_sum(FAcc a) { return a.v; }
#endif

constexpr int block_bytes(QuantFormat f) {
  switch (f) {
    case QuantFormat::kQ8_0: return 2 + QK;
    case QuantFormat::kQ4_0: return 2 + QK / 2;
    case QuantFormat::kQ4_1: return 4 + QK / 2;
    case QuantFormat::kQ5_0: return 6 + QK / 2;
    case QuantFormat::kQ5_1: return 8 + QK / 2;
    case QuantFormat::kInt8:
    default: return QK;
  }
}

constexpr int kPrefetchBytes = 4096;

// Tile: XR activation rows x WR weight rows, all blocks of K.
template <QuantFormat F, int XR, int WR>
void quant_tile(const QuantRow* xr, const uint8_t* w, long row_bytes, const float* row_scales,
                long nblocks, float* y, long ldy, const float* bias, bool accumulate) {
  constexpr int bb = block_bytes(F);
  // q4_0 / q4_1: sum over blocks of m * dx * sum(q), with m = -8 d for q4_0.
  constexpr bool has_offset = F == QuantFormat::kQ4_0 || F == QuantFormat::kQ4_1;
  FAcc acc[XR][WR];
  float offset[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) { acc[i][j] = facc_zero(); offset[i][j] = 0.0f; }
  for (long b = 0; b < nblocks; ++b) {
    const uint8_t* wb[WR];
    float dw[WR], mw[WR];
    for (int j = 0; j < WR; ++j) {
      wb[j] = w + j * row_bytes + b * bb;
#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
      // Decode reads each weight once from memory: ask for it well ahead of its use.
      _mm_prefetch((const char*)(wb[j] + kPrefetchBytes), _MM_HINT_T0);
#endif
      dw[j] = F == QuantFormat::kInt8 ? 1.0f : half_to_float(load_u16(wb[j]));
      mw[j] = F == QuantFormat::kQ4_1 ? half_to_float(load_u16(wb[j] + 2)) : -8.0f * dw[j];
    }
    for (int i = 0; i < XR; ++i) {
      const int8_t* xq = xr[i].q + b * QK;
      const float dx = xr[i].d[b];
      for (int j = 0; j < WR; ++j) {
        facc_add(acc[i][j], block_dot<F>(wb[j], xq), dw[j] * dx);
        if (has_offset) offset[i][j] += mw[j] * xr[i].s[b];
      }
    }
  }
  for (int i = 0; i < XR; ++i) {
    for (int j = 0; j < WR; ++j) {
      float v = facc_sum(acc[i][j]) + offset[i][j];
      if (row_scales) v *= row_scales[j];
      if (bias) v += bias[j];
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + v : v;
    }
  }
}

#if defined(PYXF_TARGET_avx512)
constexpr int kXR = 4;
#else
constexpr int kXR = 2;
#endif
constexpr int kWR = 4;

template <QuantFormat F, int WR>
void quant_rows(const QuantRow* xr, long M, const uint8_t* w, long row_bytes, const float* row_scales,
                long nblocks, float* y, long ldy, const float* bias, bool accumulate) {
  long m = 0;
  for (; m + kXR <= M; m += kXR) {
    quant_tile<F, kXR, WR>(xr + m, w, row_bytes, row_scales, nblocks, y + m * ldy, ldy, bias, accumulate);
  }
  for (; m < M; ++m) {
    quant_tile<F, 1, WR>(xr + m, w, row_bytes, row_scales, nblocks, y + m * ldy, ldy, bias, accumulate);
  }
}

// Few rows (decode): every weight row read once, 4 at a time, against all M activation rows.
template <QuantFormat F>
void quant_few_rows(const QuantRow* rows, long M, const QuantWeight& w, const float* bias, float* y,
                    bool accumulate) {
  const long K = w.cols, N = w.rows, nblocks = K / QK;
  const long row_bytes = quant_row_bytes(F, K);
  const long wblocks = (N + kWR - 1) / kWR;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (long wbk = 0; wbk < wblocks; ++wbk) {
    const long n = wbk * kWR;
    const uint8_t* wn = w.data + n * row_bytes;
    const float* sc = w.row_scales ? w.row_scales + n : nullptr;
    const float* bn = bias ? bias + n : nullptr;
    switch (lmin(kWR, N - n)) {
      case 4: quant_rows<F, 4>(rows, M, wn, row_bytes, sc, nblocks, y + n, N, bn, accumulate); break;
      case 3: quant_rows<F, 3>(rows, M, wn, row_bytes, sc, nblocks, y + n, N, bn, accumulate); break;
      case 2: quant_rows<F, 2>(rows, M, wn, row_bytes, sc, nblocks, y + n, N, bn, accumulate); break;
      default: quant_rows<F, 1>(rows, M, wn, row_bytes, sc, nblocks, y + n, N, bn, accumulate); break;
    }
  }
}

#if defined(PYXF_TARGET_avx512)
// ---- Few rows on AVX-512 VNNI: the decode GEMV, streaming whole 512-bit steps ----
// Decode reads every weight once, so its loop must cost fewer cycles per weight byte than memory
// does, even with the core's vector units shared by two hyper-threads. A step covers G blocks of
// one weight row in one register (G = 2 for 8-bit formats: 64 weight bytes; G = 4 for 4- and 5-bit
// ones: 64 nibble bytes split into two registers, 5-bit ones adding 16 where their fifth bit is
// set), so one or two vpdpbusd and three float operations serve G blocks. The activations are laid
// out once per call to match (StreamRows):
//   x     the int8 activations in the order the step's weight bytes sit in their registers;
//   init  per int32 lane, the value the lane's sum starts from, which makes unsigned-byte products
//         exact signed ones: vpdpbusd multiplies unsigned bytes by signed ones, so 8-bit weights
//         are fed as w + 128 (their sign bit flipped) and the lane starts at -128 * (sum of its
//         four x); q4_0's nibbles are w + 8: the lane starts at -8 * (sum of its x), q5_0's
//         values are w + 16: -16 * (sum of its x);
//   dx    per lane, the activation scale of the block the lane belongs to;
//   s     (q4_1, q5_1) per lane, dx * sum(q) of its block over the block's lane count (the offset m).
// Lane l of a step's sum belongs to block l / 8 (8-bit) or l / 4 (4- and 5-bit), so the per-block
// weight scales are spread over those lane groups, two (or four) fp16 values per step.

constexpr bool five_bit(QuantFormat f) { return f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1; }
constexpr bool has_min(QuantFormat f) { return f == QuantFormat::kQ4_1 || f == QuantFormat::kQ5_1; }
constexpr int step_blocks(QuantFormat f) {
  return f == QuantFormat::kQ8_0 || f == QuantFormat::kInt8 ? 2 : 4;
}
constexpr int step_x_bytes(QuantFormat f) { return step_blocks(f) * QK; }
// Where a block's quant bytes start, and (5-bit) its 32 fifth bits.
constexpr int data_offset(QuantFormat f) {
  switch (f) {
    case QuantFormat::kInt8: return 0;
    case QuantFormat::kQ4_1: return 4;
    case QuantFormat::kQ5_0: return 6;
    case QuantFormat::kQ5_1: return 8;
    default: return 2;
  }
}
constexpr int high_bits_offset(QuantFormat f) { return f == QuantFormat::kQ5_1 ? 4 : 2; }
// Prefetch distance of each weight row's stream: about what memory delivers in its latency
// (8 KiB measured best on Zen 5 against 2-4 KiB and 16 KiB; farther ahead than the 4 rows of a tile,
// which lie next to each other).
constexpr int kStreamPrefetchBytes = 8192;

struct StreamRows {
  long steps;
  long x_stride, lane_stride;  // per activation row: bytes of x; floats (ints) of dx, s, init
  int8_t* x;
  int32_t* init;
  float* dx;
  float* s;
};

// Quantizes M rows of activations and lays them out for format F (zero-padded to whole steps).
template <QuantFormat F>
StreamRows prepare_stream_rows(const float* x, long M, long K) {
  constexpr int G = step_blocks(F), XB = step_x_bytes(F), lanes_per_block = 16 / G;
  const long nblocks = K / QK;
  StreamRows r;
  r.steps = (nblocks + G - 1) / G;
  r.x_stride = r.steps * XB;
  r.lane_stride = r.steps * 16;
  const long padded = r.steps * G;  // blocks, the absent ones zero
  r.x = (int8_t*)aligned_alloc(64, (size_t)(M * r.x_stride + 63) / 64 * 64);
  const size_t lane_floats = (size_t)(M * r.lane_stride * 3 + padded * 2 + 15) / 16 * 16;
  float* lanes = (float*)aligned_alloc(64, sizeof(float) * lane_floats);
  r.init = (int32_t*)lanes;
  r.dx = lanes + M * r.lane_stride;
  r.s = lanes + 2 * M * r.lane_stride;
  float* qd = lanes + 3 * M * r.lane_stride;  // one row's block scales and scale * sum(q)
  float* qs = qd + padded;
  // lane -> its block within the step
  const __m512i lane_block = _mm512_set_epi32(15 / lanes_per_block, 14 / lanes_per_block, 13 / lanes_per_block,
                                              12 / lanes_per_block, 11 / lanes_per_block, 10 / lanes_per_block,
                                              9 / lanes_per_block, 8 / lanes_per_block, 7 / lanes_per_block,
                                              6 / lanes_per_block, 5 / lanes_per_block, 4 / lanes_per_block,
                                              3 / lanes_per_block, 2 / lanes_per_block, 1 / lanes_per_block, 0);
  // 4-bit steps: block g's first 16 activations go to quarter g of the first register, its last 16
  // to quarter g of the second (the low and high nibbles of its quant bytes).
  const __m512i first_halves = _mm512_set_epi64(13, 12, 9, 8, 5, 4, 1, 0);
  const __m512i second_halves = _mm512_set_epi64(15, 14, 11, 10, 7, 6, 3, 2);
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512 per_lane = _mm512_set1_ps(1.0f / lanes_per_block);
  int8_t* scratch = G == 4 ? (int8_t*)aligned_alloc(64, (size_t)padded * QK) : nullptr;
  for (long m = 0; m < M; ++m) {
    int8_t* xs = r.x + m * r.x_stride;
    int32_t* init = r.init + m * r.lane_stride;
    float* dx = r.dx + m * r.lane_stride;
    float* s = r.s + m * r.lane_stride;
    // 8-bit formats keep the natural order: quantize straight into place.
    int8_t* q = G == 2 ? xs : scratch;
    memset(q + nblocks * QK, 0, (padded - nblocks) * QK);
    for (long b = nblocks; b < padded; ++b) qd[b] = qs[b] = 0.0f;
    quantize_row(x + m * K, K, q, qd, qs);
    for (long t = 0; t < r.steps; ++t) {
      __m512i sums;
      if constexpr (G == 2) {
        sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_load_si512(xs + t * XB));
      } else {
        const __m512i v0 = _mm512_loadu_si512(q + t * XB), v1 = _mm512_loadu_si512(q + t * XB + 64);
        const __m512i lo = _mm512_permutex2var_epi64(v0, first_halves, v1);
        const __m512i hi = _mm512_permutex2var_epi64(v0, second_halves, v1);
        _mm512_store_si512(xs + t * XB, lo);
        _mm512_store_si512(xs + t * XB + 64, hi);
        sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo), ones, hi);
      }
      // init = -128 * sums (8-bit: w + 128), -8 * sums (q4_0: nibble = w + 8), -16 * sums (q5_0),
      // 0 (q4_1, q5_1)
      const int shift = F == QuantFormat::kQ4_0 ? 3 : F == QuantFormat::kQ5_0 ? 4 : 7;
      const __m512i start = has_min(F) ? _mm512_setzero_si512()
                                       : _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, shift));
      _mm512_store_si512(init + t * 16, start);
      _mm512_store_ps(dx + t * 16, _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps((1u << G) - 1, qd + t * G)));
      const __m512 sl = _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps((1u << G) - 1, qs + t * G));
      _mm512_store_ps(s + t * 16, _mm512_mul_ps(sl, per_lane));
    }
  }
  free(scratch);
  return r;
}

void free_stream_rows(StreamRows& r) {
  free(r.init);
  free(r.x);
}

// One weight row's step: its bytes as vpdpbusd's unsigned operand(s) and the per-lane block scales
// d (and offsets m, q4_1).
struct WeightStep {
  __m512i u[2];
  __m512 d, m;
};

// One 32-byte array of an 8-bit step; in a partial step, masked: `live` false reads nothing (zeros).
template <bool kPartial>
static inline __m256i load_half(const uint8_t* p, bool live) {
  return kPartial ? _mm256_maskz_loadu_epi8(live ? ~0u : 0u, p) : _mm256_loadu_si256((const __m256i*)p);
}

// 16 fp16 lanes in `groups` groups: group g holds the value at first + g * stride (g < live; the
// others stay group 0's, harmless: their quants and activations are zero).
static inline __m256i lane_groups_fp16(const uint8_t* first, int stride, int groups, int live) {
  __m256i h = _mm256_set1_epi16((short)load_u16(first));
  const int width = 16 / groups;
  for (int g = 1; g < groups; ++g) {
    const __mmask16 k = (__mmask16)(((1u << width) - 1) << (g * width));
    if (g < live) h = _mm256_mask_set1_epi16(h, k, (short)load_u16(first + g * stride));
  }
  return h;
}

// A whole 4- or 5-bit step is taken from two overlapping 64-byte loads, the step's first 64 bytes
// and the 64 that end where it ends (72 to 96-byte steps: every field of a block is at an even
// offset). Word permutes gather the four blocks' quant arrays into one register, spread each block's
// fp16 scale (and offset) over its four lanes and (5-bit) line up the fifth bits as two 64-bit masks.
// On Zen 5, one thread, L2-resident weights, this is 12-25% faster than loading each block's arrays
// apart and broadcasting its scales from general registers (q4_0 24-28 -> 30-32 GB/s, q4_1 24-26
// -> 28-32), provided the permute indices are made once per tile (a function-local static's guard
// in the loop costs more than the permutes save). 8-bit steps (two 32-byte arrays, two scales)
// keep the separate loads: permuted, q8_0 was 7-12% slower.
template <QuantFormat F>
struct StepPermutes {
  static constexpr int bb = block_bytes(F), off = data_offset(F), ho = high_bits_offset(F);
  static constexpr int tail = 4 * bb - 64;  // where the second load starts
  // q4_0 / q4_1: every scale (and offset) lies in the first load, and a one-register permute does.
  static constexpr bool kScalesInFirst = 3 * bb + (has_min(F) ? 2 : 0) < 64;
  __m512i quants, scales, offsets, fifth;
  // Index of the step's word at byte `at` in a two-register permute of the loads.
  static int16_t word(int at) { return (int16_t)(at / 2 < 32 ? at / 2 : 32 + (at - tail) / 2); }
  StepPermutes() {
    if constexpr (step_blocks(F) == 4) {
      alignas(64) int16_t q[32], d[32], m[32], h[32] = {};
      for (int w = 0; w < 32; ++w) {
        q[w] = word(bb * (w / 8) + off + 2 * (w % 8));  // quarter w / 8: block w / 8's 16 bytes
        d[w] = word(bb * ((w % 16) / 4));                // lane w % 16: its block's scale
        m[w] = word(bb * ((w % 16) / 4) + 2);
      }
      for (int g = 0; five_bit(F) && g < 4; ++g) {  // words 0-3: each block's fifth bits 0-15; 4-7: 16-31
        h[g] = word(bb * g + ho);
        h[4 + g] = word(bb * g + ho + 2);
      }
      quants = _mm512_load_si512(q);
      scales = _mm512_load_si512(d);
      offsets = _mm512_load_si512(m);
      fifth = _mm512_load_si512(h);
    }
  }
};

// A row's last step when it holds fewer (`live`) blocks takes the same path with masked loads: bytes
// of the live blocks only, nothing past the row; the others read as zeros. `first` and `second` are
// the masks of a 4- or 5-bit step's two 64-byte loads.
struct PartialLoads {
  int live;
  __mmask64 first, second;
};

template <QuantFormat F, bool kPartial = false>
static inline WeightStep load_step(const uint8_t* wb, const StepPermutes<F>& perm, PartialLoads partial = {}) {
  constexpr int bb = block_bytes(F), off = data_offset(F);
  WeightStep s;
  if constexpr (F == QuantFormat::kInt8 && !kPartial) {  // 64 contiguous bytes
    s.u[0] = _mm512_xor_si512(_mm512_loadu_si512(wb), _mm512_set1_epi8((char)0x80));
  } else if constexpr (step_blocks(F) == 2) {
    const int live = kPartial ? partial.live : 2;
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(load_half<kPartial>(wb + off, true)),
                                         load_half<kPartial>(wb + bb + off, live > 1), 1);
    s.u[0] = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));  // w + 128, unsigned
    if constexpr (F == QuantFormat::kQ8_0) s.d = _mm512_cvtph_ps(lane_groups_fp16(wb, bb, 2, live));
  } else {
    const uint8_t* wt = wb + StepPermutes<F>::tail;
    const __m512i a = kPartial ? _mm512_maskz_loadu_epi8(partial.first, wb) : _mm512_loadu_si512(wb);
    const __m512i b = kPartial ? _mm512_maskz_loadu_epi8(partial.second, wt) : _mm512_loadu_si512(wt);
    const auto gather = [&](__m512i idx) { return _mm512_permutex2var_epi16(a, idx, b); };
    const auto fp16_lanes = [&](__m512i idx) {
      const __m512i h = StepPermutes<F>::kScalesInFirst ? _mm512_permutexvar_epi16(idx, a) : gather(idx);
      return _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    };
    const __m512i v = gather(perm.quants);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    s.u[0] = _mm512_and_si512(v, nibble);
    s.u[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    if constexpr (five_bit(F)) {
      const __m128i bits = _mm512_castsi512_si128(gather(perm.fifth));
      const __m512i sixteen = _mm512_set1_epi8(16);
      s.u[0] = _mm512_mask_add_epi8(s.u[0], _cvtu64_mask64((uint64_t)_mm_cvtsi128_si64(bits)), s.u[0], sixteen);
      s.u[1] = _mm512_mask_add_epi8(s.u[1], _cvtu64_mask64((uint64_t)_mm_extract_epi64(bits, 1)), s.u[1], sixteen);
    }
    s.d = fp16_lanes(perm.scales);
    if constexpr (has_min(F)) s.m = fp16_lanes(perm.offsets);
  }
  return s;
}

// One activation row's arrays (StreamRows), from the step they start at.
struct StreamRow {
  const int8_t* x;
  const int32_t* init;
  const float* dx;
  const float* s;
};

// acc += one step of a weight row against an activation row.
template <QuantFormat F>
static inline void step_dot(const WeightStep& w, const StreamRow& r, long t, __m512& acc) {
  const int8_t* x = r.x + t * step_x_bytes(F);
  __m512i sum = _mm512_dpbusd_epi32(_mm512_load_si512(r.init + t * 16), w.u[0], _mm512_load_si512(x));
  if constexpr (step_blocks(F) == 4) sum = _mm512_dpbusd_epi32(sum, w.u[1], _mm512_load_si512(x + 64));
  const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_load_ps(r.dx + t * 16));
  if constexpr (F == QuantFormat::kInt8) {
    acc = _mm512_add_ps(acc, f);
  } else {
    acc = _mm512_fmadd_ps(f, w.d, acc);
    if constexpr (has_min(F)) acc = _mm512_fmadd_ps(w.m, _mm512_load_ps(r.s + t * 16), acc);
  }
}

// The lane sums of four vectors: {sum a, sum b, sum c, sum d}.
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const auto half = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// XR activation rows (from `row0`) x WR weight rows, all steps.
template <QuantFormat F, int XR, int WR>
void stream_tile(const StreamRows& r, long row0, const uint8_t* w, long row_bytes, const float* row_scales,
                 long nblocks, float* y, long ldy, const float* bias, bool accumulate) {
  constexpr int G = step_blocks(F);
  constexpr long step_bytes = (long)G * block_bytes(F);
  StreamRow rows[XR];
  for (int i = 0; i < XR; ++i) {
    const long at = (row0 + i) * r.lane_stride;
    rows[i] = {r.x + (row0 + i) * r.x_stride, r.init + at, r.dx + at, r.s + at};
  }
  __m512 acc[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) acc[i][j] = _mm512_setzero_ps();
  const long full = nblocks / G;
  const StepPermutes<F> perms;
  for (long t = 0; t < full; ++t) {
    WeightStep ws[WR];
    for (int j = 0; j < WR; ++j) {
      const uint8_t* wb = w + j * row_bytes + t * step_bytes;
      // Every cache line the step spans: a 68- or 72-byte step from one prefetch would skip every
      // 17th or 9th line (left to the hardware prefetcher, which four interleaved rows confuse).
      for (long off = 0; off < step_bytes; off += 64) {
        _mm_prefetch((const char*)(wb + kStreamPrefetchBytes + off), _MM_HINT_T0);
      }
      ws[j] = load_step<F>(wb, perms);
    }
    for (int i = 0; i < XR; ++i)
      for (int j = 0; j < WR; ++j) step_dot<F>(ws[j], rows[i], t, acc[i][j]);
  }
  if (full < r.steps) {
    WeightStep ws[WR];
    const int live = (int)(nblocks - full * G);
    const long bytes = (long)live * block_bytes(F), tail = StepPermutes<F>::tail;
    const PartialLoads partial{live, _bzhi_u64(~0ull, (unsigned)lmin(64, bytes)),
                               bytes > tail ? _bzhi_u64(~0ull, (unsigned)(bytes - tail)) : 0};
    for (int j = 0; j < WR; ++j) ws[j] = load_step<F, true>(w + j * row_bytes + full * step_bytes, perms, partial);
    for (int i = 0; i < XR; ++i)
      for (int j = 0; j < WR; ++j) step_dot<F>(ws[j], rows[i], full, acc[i][j]);
  }
  for (int i = 0; i < XR; ++i) {
    float sums[WR];
    if constexpr (WR == 4) {
      _mm_storeu_ps(sums, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    } else {
      for (int j = 0; j < WR; ++j) sums[j] = _mm512_reduce_add_ps(acc[i][j]);
    }
    for (int j = 0; j < WR; ++j) {
      float v = sums[j];
      if constexpr (F == QuantFormat::kInt8) v *= row_scales[j];
      if (bias) v += bias[j];
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + v : v;
    }
  }
}

// Weight rows per tile, and at most this many activation rows per tile: a decode batch of M rows
// reads the weights ceil(M / 4) times.
constexpr int kStreamWR = 4;
constexpr int kStreamXR = 4;

template <QuantFormat F, int WR>
void stream_rows(const StreamRows& r, long M, const uint8_t* w, long row_bytes, const float* row_scales,
                 long nblocks, float* y, long ldy, const float* bias, bool accumulate) {
  for (long m = 0; m < M;) {
    const int xr = (int)lmin(kStreamXR, M - m);
    float* ym = y + m * ldy;
    switch (xr) {
      case 4: stream_tile<F, 4, WR>(r, m, w, row_bytes, row_scales, nblocks, ym, ldy, bias, accumulate); break;
      case 3: stream_tile<F, 3, WR>(r, m, w, row_bytes, row_scales, nblocks, ym, ldy, bias, accumulate); break;
      case 2: stream_tile<F, 2, WR>(r, m, w, row_bytes, row_scales, nblocks, ym, ldy, bias, accumulate); break;
      default: stream_tile<F, 1, WR>(r, m, w, row_bytes, row_scales, nblocks, ym, ldy, bias, accumulate); break;
    }
    m += xr;
  }
}

// y[M][ldy] (+)= the M prepared rows times w^T + bias, w's tiles shared among the threads of the
// enclosing parallel region: a static share each, and no barrier at the end, so that the tiles of
// several matrices (the segments of one) follow each other in one region.
template <QuantFormat F>
void stream_tiles(const StreamRows& r, long M, const QuantWeight& w, const float* bias, float* y, long ldy,
                  bool accumulate) {
  const long K = w.cols, N = w.rows, nblocks = K / QK;
  const long row_bytes = quant_row_bytes(F, K);
  const long tiles = (N + kStreamWR - 1) / kStreamWR;
#pragma omp for schedule(static) nowait
  for (long tile = 0; tile < tiles; ++tile) {
    const long n = tile * kStreamWR;
    const uint8_t* wn = w.data + n * row_bytes;
    const float* sc = w.row_scales ? w.row_scales + n : nullptr;
    const float* bn = bias ? bias + n : nullptr;
    if (N - n >= kStreamWR) {
      stream_rows<F, kStreamWR>(r, M, wn, row_bytes, sc, nblocks, y + n, ldy, bn, accumulate);
    } else {  // the last rows, one at a time
      for (long j = 0; j < N - n; ++j) {
        stream_rows<F, 1>(r, M, wn + j * row_bytes, row_bytes, sc ? sc + j : nullptr, nblocks, y + n + j, ldy,
                          bn ? bn + j : nullptr, accumulate);
      }
    }
  }
}

// Calls fn(std::integral_constant<QuantFormat, F>) for the streaming GEMV's format F = f.
template <class Fn>
void with_stream_format(QuantFormat f, Fn&& fn) {
  switch (f) {
    case QuantFormat::kQ8_0: fn(std::integral_constant<QuantFormat, QuantFormat::kQ8_0>{}); break;
    case QuantFormat::kQ4_0: fn(std::integral_constant<QuantFormat, QuantFormat::kQ4_0>{}); break;
    case QuantFormat::kQ4_1: fn(std::integral_constant<QuantFormat, QuantFormat::kQ4_1>{}); break;
    case QuantFormat::kQ5_0: fn(std::integral_constant<QuantFormat, QuantFormat::kQ5_0>{}); break;
    case QuantFormat::kQ5_1: fn(std::integral_constant<QuantFormat, QuantFormat::kQ5_1>{}); break;
    case QuantFormat::kInt8:
    default: fn(std::integral_constant<QuantFormat, QuantFormat::kInt8>{}); break;
  }
}

bool quant_gemm(const QuantWeight& w, long M);  // below

// Matrices that M activation rows multiply on their strips (made at load for decoders).
bool on_strips(const QuantWeight& w, long M) { return has_strips(w) && !quant_gemm(w, M); }

// Matrices whose rows the streaming GEMV serves for M activation rows.
bool streams(const QuantWeight& w, long M) {
  return !is_k_quant(w.format) && !has_strips(w) && !quant_gemm(w, M) && quant_gemv(w.format) == QuantGemv::kStream;
}

// The segments of one matrix (row ranges in different formats), side by side in y[M][ldy], in one
// parallel region, each on its strips or streamed: each segment's tiles are split between the
// threads, with no barrier between segments (two calls cost a second fork and join, and an uneven
// last share, per matrix).
void linear_quant_decode_segments(const float* x, long M, const QuantWeight* w, int n, const float* bias,
                                  float* y, long ldy, bool accumulate) {
  std::vector<StreamRows> rows(n);
  std::vector<StripActivations> strip_rows(n);
  for (int i = 0; i < n; ++i) {
    if (has_strips(w[i])) {
      strip_rows[i] = prepare_strip_rows(x, M, w[i].cols, w[i].format);
    } else {
      with_stream_format(w[i].format, [&](auto F) { rows[i] = prepare_stream_rows<F.value>(x, M, w[i].cols); });
    }
  }
#pragma omp parallel if (ldy * w[0].cols > 32768)
  {
    long col = 0;
    for (int i = 0; i < n; ++i) {
      const float* bi = bias ? bias + col : nullptr;
      if (has_strips(w[i])) {
        strip_tiles(strip_rows[i], M, w[i], bi, y + col, ldy, accumulate);
      } else {
        with_stream_format(w[i].format,
                           [&](auto F) { stream_tiles<F.value>(rows[i], M, w[i], bi, y + col, ldy, accumulate); });
      }
      col += w[i].rows;
    }
  }
  for (int i = 0; i < n; ++i) {
    if (has_strips(w[i])) {
      free_strip_rows(strip_rows[i]);
    } else {
      free_stream_rows(rows[i]);
    }
  }
}
#endif

#if defined(PYXF_TARGET_avx512)
// ---- Many rows on AVX-512 VNNI: an int8 GEMM. ----
// Weights of 32 columns are repacked per call into panels that vpdpbusd consumes directly:
// for each block, [k/4][column][4] int8 (64 bytes = 16 columns x 4 k), plus per column and block
// the scale d, the offset m (q4_1) and -128 * sum(w), which undoes storing activations as
// unsigned (q + 128).
constexpr int kVnniCols = 32;
// Activation rows per tile: 6 rows x 2 vectors of int32 block sums and as many float sums, with
// the two weight vectors and a broadcast, fill 27 of the 32 registers (8 rows kept the float sums
// in L1: ~8% slower for encoder-sized GEMMs on Zen 5).
constexpr int kVnniRows = 6;

struct VnniPanel {
  int8_t* w;      // [nblocks][8][32 cols][4]: two 16-column halves of [8][16][4]
  float* d;       // [nblocks][32]
  float* m;       // [nblocks][32]
  int32_t* corr;  // [nblocks][32]
};

// The scale d and offset m of one column's stored block.
void block_meta(QuantFormat f, const uint8_t* blk, float row_scale, float* d, float* m) {
  *d = f == QuantFormat::kInt8 ? row_scale : half_to_float(load_u16(blk));
  *m = f == QuantFormat::kQ4_1 ? half_to_float(load_u16(blk + 2)) : 0.0f;
}

// out[g] = dword g (bytes 4g .. 4g + 3) of each of 16 rows (lane r: row r; rows not in `live` are
// zero): the 16 x 8 dword transpose of the 32 bytes at p of every row, by shuffles (a gather per
// output vector costs several times more on Zen 5). Rows i and i + 8 share a register; three
// stages of 2 x 2 transposes within 128-bit lanes, then the lanes put in row order.
static inline void transpose_rows_16x8(const uint8_t* p, long row_bytes, __mmask16 live, __m512i out[8]) {
  __m512i a[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) {
    const __m256i lo = _mm256_maskz_loadu_epi32((live >> i) & 1 ? 0xff : 0, p + i * row_bytes);
    const __m256i hi = _mm256_maskz_loadu_epi32((live >> (i + 8)) & 1 ? 0xff : 0, p + (i + 8) * row_bytes);
    a[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // u[j] (j < 4), 128-bit lanes: rows 0-3 / dword j, rows 0-3 / dword j + 4, rows 8-11 / j, rows 8-11 / j + 4;
  // u[j + 4] the same for rows 4-7 and 12-15.
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm512_permutex2var_epi64(u[j], first, u[j + 4]);
    out[j + 4] = _mm512_permutex2var_epi64(u[j], second, u[j + 4]);
  }
}

// The same for the 16 bytes at p of every row (4-bit blocks): row i + 4 L in 128-bit lane L.
static inline void transpose_rows_16x4(const uint8_t* p, long row_bytes, __mmask16 live, __m512i out[4]) {
  __m512i a[4];
  const auto row = [&](int r) { return _mm_maskz_loadu_epi32((live >> r) & 1 ? 0xf : 0, p + r * row_bytes); };
  for (int i = 0; i < 4; ++i) {  // lanes by immediates (an unrolled loop would need -O2)
    const __m256i low = _mm256_inserti128_si256(_mm256_castsi128_si256(row(i)), row(i + 4), 1);
    const __m256i high = _mm256_inserti128_si256(_mm256_castsi128_si256(row(i + 8)), row(i + 12), 1);
    a[i] = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
  out[0] = _mm512_unpacklo_epi64(t0, t2);
  out[1] = _mm512_unpackhi_epi64(t0, t2);
  out[2] = _mm512_unpacklo_epi64(t1, t3);
  out[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Packs 16 columns (weight rows; `live` lanes exist) of all blocks into panel halves. Each
// [16 col][4 k] slice of a block is one int32 per column, the dwords of the transposes above, or of
// the strip (w's decode layout, when `strip` names one: those dwords as they lie, 8-bit ones
// stored as w + 128): 8-bit formats take their bytes as they are, 4-bit ones 4 bytes = 8 nibbles
// per column, whose low halves are k = 4g..4g+3 and high halves k = 16+4g.. (slice g + 4).
void pack_vnni_half(const QuantWeight& w, const uint8_t* rows, long row_bytes, __mmask16 live, long nblocks,
                    int8_t* panel, int32_t* corr, const uint8_t* strip) {
  const int bb = block_bytes(w.format);
  const __m512i ones = _mm512_set1_epi8(1), nibble = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
  const bool four_bit = w.format == QuantFormat::kQ4_0 || w.format == QuantFormat::kQ4_1;
  const int data_offset = w.format == QuantFormat::kInt8 ? 0 : w.format == QuantFormat::kQ4_1 ? 4 : 2;
  for (long b = 0; b < nblocks; ++b) {
    const uint8_t* base = rows + b * bb + data_offset;
    int8_t* dst = panel + b * (QK * kVnniCols);
    __m512i slices[QK / 4];
    if (four_bit) {
      __m512i packed[QK / 8];  // the block's 16 nibble bytes
      if (strip) {
        for (int g = 0; g < QK / 8; ++g) packed[g] = _mm512_maskz_loadu_epi32(live, strip + (b * (QK / 8) + g) * 64);
      } else {
        transpose_rows_16x4(base, row_bytes, live, packed);
      }
      for (int g = 0; g < QK / 8; ++g) {
        const __m512i v = packed[g];
        __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), nibble);
        if (w.format == QuantFormat::kQ4_0) {  // stored as w + 8; absent columns stay 0
          lo = _mm512_maskz_mov_epi32(live, _mm512_sub_epi8(lo, eight));
          hi = _mm512_maskz_mov_epi32(live, _mm512_sub_epi8(hi, eight));
        }
        slices[g] = lo;
        slices[g + QK / 8] = hi;
      }
    } else if (strip) {
      const __m512i flip = _mm512_set1_epi8((char)0x80);
      for (int g = 0; g < QK / 4; ++g) {
        const __m512i stored = _mm512_loadu_si512(strip + (b * (QK / 4) + g) * 64);
        slices[g] = _mm512_maskz_mov_epi32(live, _mm512_xor_si512(stored, flip));
      }
    } else {
      transpose_rows_16x8(base, row_bytes, live, slices);
    }
    __m512i sum = _mm512_setzero_si512();
    for (int g = 0; g < QK / 4; ++g) {
      _mm512_store_si512(dst + g * 64, slices[g]);
      sum = _mm512_dpbusd_epi32(sum, ones, slices[g]);
    }
    _mm512_storeu_si512(corr + b * kVnniCols, _mm512_slli_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), sum), 7));
  }
}

void pack_vnni(const QuantWeight& w, long n0, int ncols, long nblocks, VnniPanel& p) {
  const long row_bytes = quant_row_bytes(w.format, w.cols);
  static_assert(kVnniCols == 2 * kStripRows, "a panel's halves are two strips");
  // From the strips where the panel starts at one (else from the rows: [gate; up]'s up half, I % 16 != 0).
  const bool strips = has_strips(w) && n0 % kStripRows == 0;
  for (int half = 0; half < 2; ++half) {
    const int live = imax(0, imin(16, ncols - 16 * half));
    const uint8_t* strip = strips && live > 0 ? strip_quants(w, n0 / kStripRows + half) : nullptr;
    pack_vnni_half(w, w.data + (n0 + 16 * half) * row_bytes, row_bytes, (__mmask16)((1u << live) - 1), nblocks,
                   p.w + half * (QK * 16), p.corr + 16 * half, strip);
  }
  const int bb = block_bytes(w.format);
  for (int c = 0; c < kVnniCols; ++c) {
    const bool real = c < ncols;
    const uint8_t* row = w.data + (n0 + c) * row_bytes;
    const float scale = real && w.row_scales ? w.row_scales[n0 + c] : 1.0f;
    const long s = (n0 + c) / kStripRows, r = (n0 + c) % kStripRows;
    const uint16_t* strip_d = strips && real && w.format != QuantFormat::kInt8 ? strip_scales(w, s) + r : nullptr;
    const uint16_t* strip_m = strip_d && w.format == QuantFormat::kQ4_1 ? strip_offsets(w, s) + r : nullptr;
    for (long b = 0; b < nblocks; ++b) {
      float d = 0.0f, m = 0.0f;
      if (strip_d) {
        d = half_to_float(strip_d[b * kStripRows]);
        if (strip_m) m = half_to_float(strip_m[b * kStripRows]);
      } else if (real) {
        block_meta(w.format, row + b * bb, scale, &d, &m);
      }
      p.d[b * kVnniCols + c] = d;
      p.m[b * kVnniCols + c] = m;
    }
  }
}

// Activations of kVnniRows rows, interleaved for the tile: per block, [QK/4 k slices][row][4]
// unsigned bytes (q + 128), so the tile broadcasts each row's 4 bytes from one base pointer; then
// per block and row the scale and scale * sum(q) (q4_1's offset term).
struct VnniRows {
  const uint8_t* u;  // [nblocks][QK / 4][kVnniRows][4]
  const float* d;    // [nblocks][kVnniRows]
  const float* s;    // [nblocks][kVnniRows]
};

// kVnniRows activation rows x 32 columns (rows past `rows` are zero padding, not written). The
// int32 sums of a block (12 independent vpdpbusd chains hide its latency) and the float sums
// across blocks (fa) live in registers. kBlockScale: the weight
// scale varies per block (else one per column, int8: applied once at the end); kOffset: q4_1's
// per-block minimum.
template <bool kBlockScale, bool kOffset>
void vnni_tile(const VnniRows& x, const VnniPanel& p, long nblocks, float* y, long ldy, int rows, int ncols,
               const float* bias, bool accumulate) {
  constexpr int R = kVnniRows;
  __m512 fa[R][2];
  for (int i = 0; i < R; ++i) fa[i][0] = fa[i][1] = _mm512_setzero_ps();
  for (long b = 0; b < nblocks; ++b) {
    const int8_t* wb = p.w + b * (QK * kVnniCols);
    const uint8_t* xb = x.u + b * (QK * R);
    const __m512i c0 = _mm512_loadu_si512(p.corr + b * kVnniCols);
    const __m512i c1 = _mm512_loadu_si512(p.corr + b * kVnniCols + 16);
    __m512i ia[R][2];
    for (int i = 0; i < R; ++i) { ia[i][0] = c0; ia[i][1] = c1; }
#pragma GCC unroll 8
    for (int kk = 0; kk < QK / 4; ++kk) {
      const __m512i w0 = _mm512_load_si512(wb + kk * 64);
      const __m512i w1 = _mm512_load_si512(wb + QK * 16 + kk * 64);
      for (int i = 0; i < R; ++i) {
        int32_t four;
        memcpy(&four, xb + (kk * R + i) * 4, 4);
        const __m512i xi = _mm512_set1_epi32(four);
        ia[i][0] = _mm512_dpbusd_epi32(ia[i][0], xi, w0);
        ia[i][1] = _mm512_dpbusd_epi32(ia[i][1], xi, w1);
      }
    }
    const __m512 d0 = _mm512_loadu_ps(p.d + b * kVnniCols), d1 = _mm512_loadu_ps(p.d + b * kVnniCols + 16);
    const __m512 m0 = _mm512_loadu_ps(p.m + b * kVnniCols), m1 = _mm512_loadu_ps(p.m + b * kVnniCols + 16);
    const float* xd = x.d + b * R;
    const float* xs = x.s + b * R;
    for (int i = 0; i < R; ++i) {
      const __m512 dx = _mm512_set1_ps(xd[i]);
      const __m512 s0 = kBlockScale ? _mm512_mul_ps(d0, dx) : dx, s1 = kBlockScale ? _mm512_mul_ps(d1, dx) : dx;
      __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][0]), s0, fa[i][0]);
      __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][1]), s1, fa[i][1]);
      if (kOffset) {
        const __m512 sx = _mm512_set1_ps(xs[i]);
        f0 = _mm512_fmadd_ps(m0, sx, f0);
        f1 = _mm512_fmadd_ps(m1, sx, f1);
      }
      fa[i][0] = f0;
      fa[i][1] = f1;
    }
  }
  const __mmask16 k0 = (__mmask16)((1u << imin(16, ncols)) - 1);
  const __mmask16 k1 = (__mmask16)((1u << imax(0, ncols - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + 16) : _mm512_setzero_ps();
  const __m512 e0 = kBlockScale ? _mm512_set1_ps(1.0f) : _mm512_loadu_ps(p.d);
  const __m512 e1 = kBlockScale ? _mm512_set1_ps(1.0f) : _mm512_loadu_ps(p.d + 16);
  for (int i = 0; i < rows; ++i) {
    float* yr = y + i * ldy;
    __m512 v0 = _mm512_fmadd_ps(fa[i][0], e0, b0), v1 = _mm512_fmadd_ps(fa[i][1], e1, b1);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, yr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, yr + 16));
    }
    _mm512_mask_storeu_ps(yr, k0, v0);
    _mm512_mask_storeu_ps(yr + 16, k1, v1);
  }
}

// Activations quantized and interleaved for vnni_tile, kVnniRows rows per tile (the last one
// padded with zero rows).
struct VnniActivations {
  long tiles, K, nblocks;
  uint8_t* u;
  float* d;
  float* s;
  VnniRows tile(long t) const {
    return {u + t * kVnniRows * K, d + t * kVnniRows * nblocks, s + t * kVnniRows * nblocks};
  }
};

VnniActivations quantize_for_vnni(const float* x, long M, long K) {
  constexpr int R = kVnniRows;
  VnniActivations a;
  a.K = K;
  a.nblocks = K / QK;
  a.tiles = (M + R - 1) / R;
  const long nblocks = a.nblocks;
  a.u = (uint8_t*)aligned_alloc(64, (size_t)(a.tiles * R * K + 63) / 64 * 64);
  a.d = (float*)aligned_alloc(64, (size_t)(sizeof(float) * a.tiles * R * nblocks * 2 + 63) / 64 * 64);
  a.s = a.d + a.tiles * R * nblocks;
#pragma omp parallel
  {
    int8_t* q = (int8_t*)malloc(K + 64);
    float* qd = (float*)malloc(sizeof(float) * nblocks * 2 + 64);
    float* qs = qd + nblocks;
#pragma omp for schedule(static)
    for (long m = 0; m < a.tiles * R; ++m) {
      const long t = m / R;
      const int i = (int)(m % R);
      if (m < M) {
        quantize_row(x + m * K, K, q, qd, qs);
      } else {  // padding rows: q = 0, scale 0
        memset(q, 0, K);
        for (long b = 0; b < nblocks; ++b) qd[b] = qs[b] = 0.0f;
      }
      uint8_t* tu = a.u + t * R * K;
      for (long b = 0; b < nblocks; ++b) {
        for (int kk = 0; kk < QK / 4; ++kk) {
          uint32_t four;
          memcpy(&four, q + b * QK + kk * 4, 4);
          four ^= 0x80808080u;  // q + 128 in every byte
          memcpy(tu + b * QK * R + (kk * R + i) * 4, &four, 4);
        }
        a.d[(t * nblocks + b) * R + i] = qd[b];
        a.s[(t * nblocks + b) * R + i] = qs[b];
      }
    }
    free(qd);
    free(q);
  }
  return a;
}

void free_activations(VnniActivations& a) {
  free(a.d);
  free(a.u);
}

// Bytes of one 32-column panel of `nblocks` blocks, and its parts at `base`: the weights, then d, m
// and corr. A matrix's panels, made once (pack_gemm_panels), follow one another in column order.
long panel_bytes(long nblocks) { return nblocks * (QK * kVnniCols + 3 * kVnniCols * (long)sizeof(float)); }

VnniPanel panel_at(uint8_t* base, long nblocks) {
  float* meta = reinterpret_cast<float*>(base + nblocks * QK * kVnniCols);
  return {reinterpret_cast<int8_t*>(base), meta, meta + nblocks * kVnniCols,
          reinterpret_cast<int32_t*>(meta + 2 * nblocks * kVnniCols)};
}

// Whether the panel of the 32 columns from n0 was made at load (else it is packed per call).
bool has_panel(const QuantWeight& w, long n0) {
  return w.gemm_panels && w.panel_layout == PanelLayout::kVnni && n0 % kVnniCols == 0;
}

// Rows from which the q8_0 / q4_0 / q4_1 / int8 GEMM runs when it must repack the weights on every
// call (a matrix without panels made at load: decoders'). Below, the streaming GEMV is faster: it
// reads each weight once and keeps each 4-row weight tile in L1 across all activation rows (Zen 5,
// SmolLM2 prefill of 16 tokens: q8_0 18.1 -> 13.0 ms, q4_0 17.2 -> 11.3 ms; from ~24 rows the GEMM
// wins). The K-quants' GEMM wins from kQuantGemmRows.
constexpr long kRepackGemmRows = 20;

// Rows from which a matrix with strips (decoders', packed at load) runs the GEMM, its panels packed
// from the strips per call: the strip GEMV serves fewer (AMX-era Xeon, 2 threads, 1536 x 576 q4_0:
// the GEMV 51 us at 16 rows, 61 at 19, the GEMM 86 at 20, 99 at 28, 128 at 40 as the GEMV).
constexpr long kStripGemmRows = 32;

// Whether M rows of w run a GEMM (else a GEMV).
bool quant_gemm(const QuantWeight& w, long M) {
  if (has_strips(w)) return M >= kStripGemmRows;
  const bool repacks = !is_quant_k_format(w.format) && !has_panel(w, 0);
  return M >= (repacks ? kRepackGemmRows : kQuantGemmRows);
}

// The panel of columns n0 .. n0 + ncols of w: the one made at load, or packed into `buffer` now.
VnniPanel column_panel(const QuantWeight& w, long n0, int ncols, long nblocks, uint8_t* buffer) {
  if (has_panel(w, n0)) {
    return panel_at(const_cast<uint8_t*>(w.gemm_panels) + n0 / kVnniCols * panel_bytes(nblocks), nblocks);
  }
  VnniPanel p = panel_at(buffer, nblocks);
  pack_vnni(w, n0, ncols, nblocks, p);
  return p;
}

// Per-thread storage for one panel packed per call, when one is `needed`.
struct PanelBuffer {
  uint8_t* bytes = nullptr;
  PanelBuffer(bool needed, long nblocks) {
    if (needed) bytes = static_cast<uint8_t*>(aligned_alloc(64, (size_t)panel_bytes(nblocks)));
  }
  ~PanelBuffer() { free(bytes); }
};

void run_tile(QuantFormat f, const VnniRows& x, const VnniPanel& p, long nblocks, float* y, long ldy, int rows,
              int ncols, const float* bias, bool accumulate) {
  switch (f) {
    case QuantFormat::kInt8: vnni_tile<false, false>(x, p, nblocks, y, ldy, rows, ncols, bias, accumulate); break;
    case QuantFormat::kQ4_1: vnni_tile<true, true>(x, p, nblocks, y, ldy, rows, ncols, bias, accumulate); break;
    default: vnni_tile<true, false>(x, p, nblocks, y, ldy, rows, ncols, bias, accumulate); break;
  }
}

// Activation tiles per work item: with panels made at load, as many as fill kActivationBlockBytes,
// so that a block of activations stays in L2 while the panels pass by, instead of every panel
// reading all M x K activation bytes (from L3 once they outgrow L2: 6400 x 384 x 1536 int8 on one
// Zen 5 thread 230-240 -> 255-285 GMAC/s); panels packed per call are packed once, for all rows.
constexpr long kActivationBlockBytes = 256L << 10;
long tiles_per_item(bool panels_at_load, const VnniActivations& a) {
  if (!panels_at_load) return a.tiles;
  return lmin(a.tiles, std::max(1L, kActivationBlockBytes / (kVnniRows * a.K)));
}

// Calls item(n0, ncols, t_begin, t_end) for every work item: (a block of activation tiles, the 32
// output columns from n0), handed out across the calling parallel region's threads.
template <class Item>
void for_each_item(const VnniActivations& a, long N, long per_item, Item&& item) {
  const long chunks = (N + kVnniCols - 1) / kVnniCols, row_blocks = (a.tiles + per_item - 1) / per_item;
#pragma omp for schedule(dynamic, 1) collapse(2)
  for (long rb = 0; rb < row_blocks; ++rb) {
    for (long ch = 0; ch < chunks; ++ch) {
      const long n0 = ch * kVnniCols;
      item(n0, (int)lmin(kVnniCols, N - n0), rb * per_item, lmin(a.tiles, (rb + 1) * per_item));
    }
  }
}

void linear_quant_vnni(const float* x, long M, const QuantWeight& w, const float* bias, float* y,
                       bool accumulate) {
  constexpr int R = kVnniRows;
  const long N = w.rows;
  VnniActivations a = quantize_for_vnni(x, M, w.cols);
  const long per_item = tiles_per_item(has_panel(w, 0), a);
#pragma omp parallel
  {
    PanelBuffer buffer(!has_panel(w, 0), a.nblocks);
    for_each_item(a, N, per_item, [&](long n0, int ncols, long t_begin, long t_end) {
      const VnniPanel panel = column_panel(w, n0, ncols, a.nblocks, buffer.bytes);
      const float* bn = bias ? bias + n0 : nullptr;
      for (long t = t_begin; t < t_end; ++t) {
        run_tile(w.format, a.tile(t), panel, a.nblocks, y + t * R * N + n0, N, (int)lmin(R, M - t * R), ncols, bn,
                 accumulate);
      }
    });
  }
  free_activations(a);
}

void linear_quant_gated_vnni(const float* x, long M, const QuantWeight& w, Activation act, float* y) {
  constexpr int R = kVnniRows;
  const long I = w.rows / 2;
  VnniActivations a = quantize_for_vnni(x, M, w.cols);
  const long per_item = tiles_per_item(has_panel(w, 0) && has_panel(w, I), a);
#pragma omp parallel
  {
    PanelBuffer gate_buffer(!has_panel(w, 0), a.nblocks), up_buffer(!has_panel(w, I), a.nblocks);
    alignas(64) float gu[R][2 * kVnniCols];
    for_each_item(a, I, per_item, [&](long n0, int ncols, long t_begin, long t_end) {
      const VnniPanel gate = column_panel(w, n0, ncols, a.nblocks, gate_buffer.bytes);
      const VnniPanel up = column_panel(w, I + n0, ncols, a.nblocks, up_buffer.bytes);
      for (long t = t_begin; t < t_end; ++t) {
        const int rows = (int)lmin(R, M - t * R);
        run_tile(w.format, a.tile(t), gate, a.nblocks, gu[0], 2 * kVnniCols, rows, ncols, nullptr, false);
        run_tile(w.format, a.tile(t), up, a.nblocks, gu[0] + kVnniCols, 2 * kVnniCols, rows, ncols, nullptr, false);
        for (int i = 0; i < rows; ++i) {
          gated_activation_row(gu[i], gu[i] + kVnniCols, ncols, act, y + (t * R + i) * I + n0);
        }
      }
    });
  }
  free_activations(a);
}
#endif

}  // namespace

void dequantize_row(const QuantWeight& w, long row, float* out);
template <typename W>
void linear_strided(const float* x, long M, long K, const W* w, long N, const float* bias, float* y,
                    long ldy, bool accumulate);

// Many rows (prefill, encoding) without VNNI: dequantize slices of weight rows once and run the
// packed float GEMM on them, amortized over all M rows. The activations are rounded to their
// 8-bit block values first, so the result is the same arithmetic as the integer kernels.
static void linear_quant_many_rows(const float* x, long M, const QuantWeight& w, const float* bias,
                                   float* y, bool accumulate) {
  const long K = w.cols, N = w.rows, slice = 1024, nblocks = K / QK;
  float* xr = (float*)aligned_alloc(64, (sizeof(float) * M * K + 63) / 64 * 64);
#pragma omp parallel
  {
    int8_t q[QK];
    float d, sum;
#pragma omp for schedule(static)
    for (long m = 0; m < M; ++m) {
      for (long b = 0; b < nblocks; ++b) {
        quantize_row(x + m * K + b * QK, QK, q, &d, &sum);
        for (int i = 0; i < QK; ++i) xr[m * K + b * QK + i] = d * (float)q[i];
      }
    }
  }
  x = xr;
  float* buf = (float*)aligned_alloc(64, sizeof(float) * slice * K);
  for (long n0 = 0; n0 < N; n0 += slice) {
    const long nc = lmin(slice, N - n0);
#pragma omp parallel for schedule(static)
    for (long r = 0; r < nc; ++r) dequantize_row(w, n0 + r, buf + r * K);
    linear_strided(x, M, K, buf, nc, bias ? bias + n0 : nullptr, y + n0, N, accumulate);
  }
  free(buf);
  free(xr);
}

void linear_quant(const float* x, long M, const QuantWeight& w, const float* bias, float* y,
                  bool accumulate) {
#if defined(PYXF_TARGET_avx512)
  // Decode on strips made at load (decoders' matrices), else on the streaming GEMV where it
  // is chosen: every block format but the K-quants (q5_0 / q5_1 included; their other kernels are
  // quant_k.cc's).
  const bool strips = on_strips(w, M), stream = streams(w, M);
#else
  const bool strips = false, stream = false;
#endif
  if (is_quant_k_format(w.format) && !stream && !strips) {
    linear_quant_k(x, M, w, bias, y, accumulate);
    return;
  }
#if defined(PYXF_TARGET_avx512)
  if (quant_gemm(w, M)) {
    linear_quant_vnni(x, M, w, bias, y, accumulate);
    return;
  }
#else
  if (M >= kQuantGemmRows) {
    linear_quant_many_rows(x, M, w, bias, y, accumulate);
    return;
  }
#endif
#if defined(PYXF_TARGET_avx512)
  if (stream || strips) {
    linear_quant_decode_segments(x, M, &w, 1, bias, y, w.rows, accumulate);
    return;
  }
#endif
  const long K = w.cols, nblocks = K / QK;
  int8_t* xq = (int8_t*)malloc(M * K + 64);
  float* xd = (float*)malloc(sizeof(float) * M * nblocks * 2 + 64);
  float* xs = xd + M * nblocks;
  QuantRow* rows = (QuantRow*)malloc(sizeof(QuantRow) * M);
  for_each_index(M, M * K > 65536, [&](long m) {
    quantize_row(x + m * K, K, xq + m * K, xd + m * nblocks, xs + m * nblocks);
    rows[m] = {xq + m * K, xd + m * nblocks, xs + m * nblocks};
  });
  switch (w.format) {
    case QuantFormat::kQ8_0: quant_few_rows<QuantFormat::kQ8_0>(rows, M, w, bias, y, accumulate); break;
    case QuantFormat::kQ4_0: quant_few_rows<QuantFormat::kQ4_0>(rows, M, w, bias, y, accumulate); break;
    case QuantFormat::kQ4_1: quant_few_rows<QuantFormat::kQ4_1>(rows, M, w, bias, y, accumulate); break;
    case QuantFormat::kInt8:
    default: quant_few_rows<QuantFormat::kInt8>(rows, M, w, bias, y, accumulate); break;
  }
  free(rows);
  free(xd);
  free(xq);
}

void linear_quant_segments(const float* x, long M, const QuantWeight* w, int n, const float* bias, float* y,
                           bool accumulate) {
  long width = 0;
  for (int i = 0; i < n; ++i) width += w[i].rows;
#if defined(PYXF_TARGET_avx512)
  bool decode = true;
  for (int i = 0; i < n; ++i) decode &= streams(w[i], M) || on_strips(w[i], M);
  if (decode) {
    linear_quant_decode_segments(x, M, w, n, bias, y, width, accumulate);
    return;
  }
#endif
  // One call per segment into a scratch, copied into its columns.
  std::vector<float> part;
  long col = 0;
  for (int i = 0; i < n; ++i) {
    part.resize((size_t)M * w[i].rows);
    linear_quant(x, M, w[i], bias ? bias + col : nullptr, part.data(), false);
    for (long m = 0; m < M; ++m) {
      float* ym = y + m * width + col;
      const float* pm = part.data() + m * w[i].rows;
      for (long c = 0; c < w[i].rows; ++c) ym[c] = accumulate ? ym[c] + pm[c] : pm[c];
    }
    col += w[i].rows;
  }
}

#if defined(PYXF_TARGET_avx512)
void linear_quant_gated(const float* x, long M, const QuantWeight& w, Activation act, float* y) {
  if (quant_gemm(w, M)) {
    if (is_quant_k_format(w.format)) {
      linear_quant_gated_k(x, M, w, act, y);
    } else {
      linear_quant_gated_vnni(x, M, w, act, y);
    }
    return;
  }
  float* gu = (float*)malloc(sizeof(float) * M * w.rows + 64);
  linear_quant(x, M, w, nullptr, gu, false);
  for (long m = 0; m < M; ++m) {
    gated_activation_row(gu + m * w.rows, gu + m * w.rows + w.rows / 2, w.rows / 2, act, y + m * (w.rows / 2));
  }
  free(gu);
}

long gemm_panel_bytes(const QuantWeight& w) {
  if (is_quant_k_format(w.format)) return 0;
  return (w.rows + kVnniCols - 1) / kVnniCols * panel_bytes(w.cols / QK);
}

long decode_panel_bytes(const QuantWeight& w) { return strips_bytes(w); }

PanelLayout pack_decode_panels(const QuantWeight& w, uint8_t* out) {
  if (strips_bytes(w) == 0) return PanelLayout::kNone;
  pack_strips(w, out);
  return PanelLayout::kStrips;
}

PanelLayout pack_gemm_panels(const QuantWeight& w, uint8_t* out) {
  if (gemm_panel_bytes(w) == 0) return PanelLayout::kNone;
  const long nblocks = w.cols / QK, chunks = (w.rows + kVnniCols - 1) / kVnniCols;
#pragma omp parallel for schedule(static)
  for (long ch = 0; ch < chunks; ++ch) {
    VnniPanel p = panel_at(out + ch * panel_bytes(nblocks), nblocks);
    pack_vnni(w, ch * kVnniCols, (int)lmin(kVnniCols, w.rows - ch * kVnniCols), nblocks, p);
  }
  return PanelLayout::kVnni;
}
#endif

void dequantize_row(const QuantWeight& w, long row, float* out) {
  if (is_quant_k_format(w.format)) {
    dequantize_row_k(w, row, out);
    return;
  }
  const long row_bytes = quant_row_bytes(w.format, w.cols);
  const uint8_t* src = w.data + row * row_bytes;
  const int bb = block_bytes(w.format);
  for (long b = 0; b < w.cols / QK; ++b) {
    const uint8_t* blk = src + b * bb;
    float* o = out + b * QK;
    switch (w.format) {
      case QuantFormat::kQ8_0: {
        const float d = half_to_float(load_u16(blk));
        for (int i = 0; i < QK; ++i) o[i] = d * (float)((const int8_t*)(blk + 2))[i];
        break;
      }
      case QuantFormat::kQ4_0:
      case QuantFormat::kQ4_1: {
        const bool q40 = w.format == QuantFormat::kQ4_0;
        const float d = half_to_float(load_u16(blk));
        const float m = q40 ? -8.0f * d : half_to_float(load_u16(blk + 2));
        const uint8_t* qs = blk + (q40 ? 2 : 4);
        for (int i = 0; i < QK / 2; ++i) {
          o[i] = d * (float)(qs[i] & 0x0f) + m;
          o[i + QK / 2] = d * (float)(qs[i] >> 4) + m;
        }
        break;
      }
      case QuantFormat::kInt8:
      default:
        for (int i = 0; i < QK; ++i) o[i] = w.row_scales[row] * (float)((const int8_t*)blk)[i];
        break;
    }
  }
}

}  // namespace pyxf::kernels::PYXF_TARGET_NS
