// The decode GEMV on strips of 16 quantized rows (layout: quant_strips.h). Each 64-byte load of a
// strip is a vpdpbusd operand for 16 output rows and the activations come as 4-byte broadcasts, so
// a block of 32 columns x 16 rows costs 8 vpdpbusd, the nibble split (4-bit), one scale conversion
// and three float operations: about half the instructions per weight byte of the row-major stream
// (quant.cc), which has to gather each step's blocks and spread their scales over its lanes. Where
// two hyper-threads share one core's vector units (Zen 4/5), instructions per byte, not memory,
// set a decode step's pace.
#include "kernels/quant_strips.h"

#include <stdlib.h>
#include <string.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {

void quantize_row(const float* x, long K, int8_t* q, float* d, float* s);
void quantize_act(const float* x, long K, int block, int8_t* q, float* d, int32_t* sum16);

namespace {
constexpr int QK = kQuantBlock;
// Where a stored block's quant bytes start (after its fp16 scale, q4_1 / q5_1 its offset, q5_0 /
// q5_1 their fifth bits; int8's rows are their bytes), and its bytes.
constexpr int data_offset(QuantFormat f) {
  return f == QuantFormat::kInt8 ? 0 : 2 + (strip_has_offsets(f) ? 2 : 0) + (strip_fifth_bits(f) ? 4 : 0);
}
constexpr int stored_block_bytes(QuantFormat f) { return data_offset(f) + (strip_8bit(f) ? QK : QK / 2); }

// A q5_0 block's 32 fifth bits (bit j: column j) in the strip's order (quant_strips.h).
uint32_t fifth_bits_to_strip(uint32_t qh) {
  uint32_t h = 0;
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < 4; ++g) {
      h |= ((qh >> (4 * g + i)) & 1u) << (8 * i + g);
      h |= ((qh >> (16 + 4 * g + i)) & 1u) << (8 * i + 4 + g);
    }
  return h;
}

// q4_k: the 12 bytes of a super-block's 6-bit scales and minima (8 each).
void k_scales_unpack(const uint8_t* b, uint8_t sc[8], uint8_t mn[8]) {
  for (int s = 0; s < 4; ++s) {
    sc[s] = b[s] & 63;
    mn[s] = b[s + 4] & 63;
    sc[s + 4] = (uint8_t)((b[s + 8] & 0x0f) | ((b[s] >> 6) << 4));
    mn[s + 4] = (uint8_t)((b[s + 8] >> 4) | ((b[s + 4] >> 6) << 4));
  }
}

// q4_k super-block: fp16 d, fp16 dmin, 12 scale bytes, 128 quant bytes; q5_k the same with 32
// fifth-bit bytes before the quants. q6_k: 128 low-bit bytes, 64 high-bit bytes, 16 int8 scales,
// fp16 d.
constexpr int kQ4kBytes = 144, kQ4kQuants = 16, kQ5kBytes = 176, kQ5kHigh = 16, kQ5kQuants = 48;
constexpr int kQ6kBytes = 210, kQ6kScales = 192, kQ6kD = 208;

void pack_q6k_strip(const QuantWeight& w, long s, uint8_t* out) {
  const long nb = strip_blocks(w), row_bytes = quant_row_bytes(w.format, w.cols);
  int8_t* sc = reinterpret_cast<int8_t*>(out + nb * strip_vectors(w.format) * 64);
  uint16_t* d = reinterpret_cast<uint16_t*>(sc + nb * 16 * kStripRows);
  for (int r = 0; r < kStripRows; ++r) {
    const long row = s * kStripRows + r;
    for (long b = 0; b < nb; ++b) {
      const uint8_t* blk = row < w.rows ? w.data + row * row_bytes + b * kQ6kBytes : nullptr;
      // vectors 0-31: low-bit bytes 4v ..; 32-47: high-bit bytes 4 (v - 32) ..
      for (int v = 0; v < 48; ++v)
        for (int i = 0; i < 4; ++i) out[((b * 48 + v) * kStripRows + r) * 4 + i] = blk ? blk[4 * v + i] : 0;
      for (int u = 0; u < 16; ++u) sc[(b * 16 + u) * kStripRows + r] = blk ? (int8_t)blk[kQ6kScales + u] : 0;
      uint16_t dv = 0;
      if (blk) memcpy(&dv, blk + kQ6kD, 2);
      d[b * kStripRows + r] = dv;
    }
  }
}

void pack_k_strip(const QuantWeight& w, long s, uint8_t* out) {
  const bool five = w.format == QuantFormat::kQ5_K;
  const int block_bytes = five ? kQ5kBytes : kQ4kBytes, quants = five ? kQ5kQuants : kQ4kQuants;
  const int vectors = strip_vectors(w.format);
  const long nb = strip_blocks(w), row_bytes = quant_row_bytes(w.format, w.cols);
  uint8_t* sc = out + nb * vectors * 64;
  uint8_t* mn = sc + nb * 8 * kStripRows;
  uint16_t* d = reinterpret_cast<uint16_t*>(mn + nb * 8 * kStripRows);
  uint16_t* dmin = d + nb * kStripRows;
  for (int r = 0; r < kStripRows; ++r) {
    const long row = s * kStripRows + r;
    for (long b = 0; b < nb; ++b) {
      const uint8_t* blk = row < w.rows ? w.data + row * row_bytes + b * block_bytes : nullptr;
      for (int v = 0; v < vectors; ++v) {  // vector (g, j) = 8 g + j: quant bytes 32 g + 4 j ..; q5_k's
        const int at = v < 32 ? quants + 4 * v : kQ5kHigh + 4 * (v - 32);  // 32 + j: fifth bits 4 j ..
        for (int i = 0; i < 4; ++i) out[((b * vectors + v) * kStripRows + r) * 4 + i] = blk ? blk[at + i] : 0;
      }
      uint8_t bsc[8] = {}, bmn[8] = {};
      if (blk) k_scales_unpack(blk + 4, bsc, bmn);
      for (int t = 0; t < 8; ++t) {
        sc[(b * 8 + t) * kStripRows + r] = bsc[t];
        mn[(b * 8 + t) * kStripRows + r] = bmn[t];
      }
      uint16_t dv = 0, mv = 0;
      if (blk) {
        memcpy(&dv, blk, 2);
        memcpy(&mv, blk + 2, 2);
      }
      d[b * kStripRows + r] = dv;
      dmin[b * kStripRows + r] = mv;
    }
  }
}
}  // namespace

long strips_bytes(const QuantWeight& w) {
  if (!strip_format(w.format) || w.rows <= 0) return 0;
  return strip_count(w) * strip_bytes(w);
}

void pack_strips(const QuantWeight& w, uint8_t* out) {
  const long nblocks = w.cols / QK, row_bytes = quant_row_bytes(w.format, w.cols), strips = strip_count(w);
  const int groups = strip_groups(w.format), vectors = strip_vectors(w.format), bb = stored_block_bytes(w.format);
  const int off = data_offset(w.format);
  const uint8_t flip = strip_8bit(w.format) ? 0x80 : 0x00;  // 8-bit: w + 128
  const long sb = strip_bytes(w);
  if (is_k_quant(w.format)) {
#pragma omp parallel for schedule(static)
    for (long s = 0; s < strips; ++s) {
      if (w.format == QuantFormat::kQ6_K) {
        pack_q6k_strip(w, s, out + s * sb);
      } else {
        pack_k_strip(w, s, out + s * sb);
      }
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (long s = 0; s < strips; ++s) {
    uint8_t* quants = out + s * sb;
    uint16_t* scales = reinterpret_cast<uint16_t*>(quants + nblocks * vectors * 64);
    for (int r = 0; r < kStripRows; ++r) {
      const long row = s * kStripRows + r;
      const uint8_t* src = row < w.rows ? w.data + row * row_bytes : nullptr;
      for (long b = 0; b < nblocks; ++b) {
        const uint8_t* blk = src ? src + b * bb : nullptr;
        for (int g = 0; g < groups; ++g) {
          uint8_t* dst = quants + ((b * vectors + g) * kStripRows + r) * 4;
          for (int i = 0; i < 4; ++i) dst[i] = blk ? (uint8_t)(blk[off + 4 * g + i] ^ flip) : flip;
        }
        if (strip_fifth_bits(w.format)) {
          uint32_t qh = 0;
          if (blk) memcpy(&qh, blk + off - 4, 4);
          const uint32_t h = fifth_bits_to_strip(qh);
          memcpy(quants + ((b * vectors + groups) * kStripRows + r) * 4, &h, 4);
        }
        if (w.format == QuantFormat::kInt8) continue;  // its scales are per row, apart
        uint16_t d = 0, m = 0;
        if (blk) memcpy(&d, blk, 2);
        scales[b * kStripRows + r] = d;
        if (strip_has_offsets(w.format)) {
          if (blk) memcpy(&m, blk + 2, 2);
          scales[(nblocks + b) * kStripRows + r] = m;
        }
      }
    }
  }
}

#if defined(PYXF_TARGET_avx512)
namespace {
// Prefetch distance of a thread's strip stream (one contiguous run of strips). SmolLM2 decode on
// an AMX-era Xeon, 2 threads, tokens/s: q4_0 385-417 at 2-4 KiB, 430-454 at 8, 452-461 at 16, 425-443
// at 32; q8_0 alike within noise up to 16 KiB, 206-223 at 32; one thread, q4_0 at 16 KiB best.
constexpr long kStripPrefetchBytes = 16384;

// f(std::integral_constant<int, 0>{}) .. f(std::integral_constant<int, N - 1>{}): loop bodies whose
// shifts take their count as an immediate (a count in a register costs a second uop).
template <class F, int... I>
inline void unrolled(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void unrolled(F&& f) {
  unrolled(f, std::make_integer_sequence<int, N>{});
}

// Bit p of each byte of v moved to bit 4 (other bits of the result: any).
inline __m512i bit_to_4(__m512i v, int p) { return p <= 4 ? _mm512_slli_epi16(v, 4 - p) : _mm512_srli_epi16(v, p - 4); }

// A vector of nibble bytes as two vpdpbusd operands, its low nibbles (lo) and high nibbles (hi) of
// 16 rows; with kFifth, bits p_lo and p_hi of `fifth`'s bytes become their bit 4.
template <bool kFifth>
inline void nibble_values(__m512i v, __m512i fifth, int p_lo, int p_hi, __m512i& lo, __m512i& hi) {
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  lo = _mm512_and_si512(v, nibble);
  hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  if constexpr (kFifth) {
    const __m512i bit4 = _mm512_set1_epi8(0x10);
    lo = _mm512_or_si512(lo, _mm512_and_si512(bit_to_4(fifth, p_lo), bit4));
    hi = _mm512_or_si512(hi, _mm512_and_si512(bit_to_4(fifth, p_hi), bit4));
  }
}

// Group g of a 4- or 5-bit strip block: the stored values of columns 4g .. 4g + 3 (lo) and
// 16 + 4g .. (hi) of the 16 rows, q5_0's / q5_1's fifth bits (bits g and 4 + g of `fifth`) included.
template <QuantFormat F>
inline void group_values(__m512i v, __m512i fifth, int g, __m512i& lo, __m512i& hi) {
  nibble_values<strip_fifth_bits(F)>(v, fifth, g, 4 + g, lo, hi);
}

// y[i][0 .. live) (+)= acc[i] + bias, for XR rows.
template <int XR>
inline void store_rows(const __m512 acc[XR], float* y, long ldy, int live, const float* bias, bool accumulate) {
  const __mmask16 k = (__mmask16)((1u << live) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(k, bias) : _mm512_setzero_ps();
  for (int i = 0; i < XR; ++i) {
    float* yi = y + i * ldy;
    __m512 v = _mm512_add_ps(acc[i], bv);
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, yi));
    _mm512_mask_storeu_ps(yi, k, v);
  }
}

// 16 unsigned bytes as int32 lanes.
inline __m512i bytes_u32(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The arrays of XR activation rows from m0.
template <int XR>
struct TileRows {
  const int8_t* x[XR];
  const float* dx[XR];
  const float* sx[XR];
  const int32_t* sums[XR];  // StripActivations::init
  TileRows(const StripActivations& a, long m0) {
    for (int i = 0; i < XR; ++i) {
      x[i] = a.q + (m0 + i) * a.K;
      dx[i] = a.dx + (m0 + i) * a.nblocks;
      sx[i] = a.s + (m0 + i) * a.nblocks;
      sums[i] = a.init + (m0 + i) * a.sums;
    }
  }
};

// XR activation rows (from m0) x one strip: y[i][0 .. live) (+)= row i times the strip's rows (int8:
// times their `row_scales`).
template <QuantFormat F, int XR>
void strip_tile(const StripActivations& a, long m0, const uint8_t* quants, const uint16_t* scales,
                const float* row_scales, float* y, long ldy, int live, const float* bias, bool accumulate) {
  const uint16_t* offsets = scales + a.nblocks * kStripRows;  // q4_1, q5_1
  constexpr int G = strip_groups(F), V = strip_vectors(F);
  const long nblocks = a.nblocks;
  const TileRows<XR> rows(a, m0);
  const auto& x = rows.x;
  const auto& dx = rows.dx;
  const auto& sx = rows.sx;
  const auto& init = rows.sums;
  __m512 acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = _mm512_setzero_ps();
  for (long b = 0; b < nblocks; ++b) {
    const uint8_t* qb = quants + b * V * 64;
    for (int g = 0; g < V; ++g) _mm_prefetch((const char*)(qb + kStripPrefetchBytes + g * 64), _MM_HINT_T0);
    if (F != QuantFormat::kInt8 && b % 2 == 0) {
      _mm_prefetch((const char*)(scales + b * kStripRows) + kStripPrefetchBytes / 8, _MM_HINT_T0);
      if constexpr (strip_has_offsets(F)) {
        _mm_prefetch((const char*)(offsets + b * kStripRows) + kStripPrefetchBytes / 8, _MM_HINT_T0);
      }
    }
    // Two int32 sums per row (even and odd groups, or low and high nibbles): two chains of 4.
    __m512i s0[XR], s1[XR];
    for (int i = 0; i < XR; ++i) {
      s0[i] = _mm512_set1_epi32(init[i][b]);
      s1[i] = _mm512_setzero_si512();
    }
    __m512i fifth = _mm512_setzero_si512();
    if constexpr (strip_fifth_bits(F)) fifth = _mm512_loadu_si512(qb + G * 64);
    for (int g = 0; g < G; ++g) {
      const __m512i v = _mm512_loadu_si512(qb + g * 64);
      if constexpr (!strip_8bit(F)) {
        __m512i lo, hi;
        group_values<F>(v, fifth, g, lo, hi);
        for (int i = 0; i < XR; ++i) {
          s0[i] = _mm512_dpbusd_epi32(s0[i], lo, broadcast4(x[i] + b * QK + 4 * g));
          s1[i] = _mm512_dpbusd_epi32(s1[i], hi, broadcast4(x[i] + b * QK + QK / 2 + 4 * g));
        }
      } else {
        for (int i = 0; i < XR; ++i) {
          __m512i& s = g % 2 ? s1[i] : s0[i];
          s = _mm512_dpbusd_epi32(s, v, broadcast4(x[i] + b * QK + 4 * g));
        }
      }
    }
    if constexpr (F == QuantFormat::kInt8) {  // the row scales come last
      for (int i = 0; i < XR; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i])), _mm512_set1_ps(dx[i][b]), acc[i]);
      }
    } else {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * kStripRows)));
      for (int i = 0; i < XR; ++i) {
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i]));
        acc[i] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(dx[i][b])), acc[i]);
      }
    }
    if constexpr (strip_has_offsets(F)) {  // + m * dx * sum(q)
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + b * kStripRows)));
      for (int i = 0; i < XR; ++i) acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[i][b]), acc[i]);
    }
  }
  if constexpr (F == QuantFormat::kInt8) {
    const __m512 rs = _mm512_maskz_loadu_ps((__mmask16)((1u << live) - 1), row_scales);
    for (int i = 0; i < XR; ++i) acc[i] = _mm512_mul_ps(acc[i], rs);
  }
  store_rows<XR>(acc, y, ldy, live, bias, accumulate);
}

// The values of q4_k / q5_k vector (g, j) of a strip: sub-block 2g's (lo) and 2g + 1's (hi), q5_k's
// fifth bits (bits 2g and 2g + 1) from its vector j (`high`).
template <bool kFive>
inline void k_values(__m512i v, __m512i high, int g, __m512i& lo, __m512i& hi) {
  nibble_values<kFive>(v, high, 2 * g, 2 * g + 1, lo, hi);
}

// XR activation rows (from m0) x one q4_k or q5_k strip. Per super-block and sub-block t the int32
// lanes (rows) sum q x over the sub-block's 32 columns; a row's super-block is then
// dx (d sum_t sc_t isum_t - dmin sum_t m_t xsum_t), the integer sums exact.
template <bool kFive, int XR>
void strip_tile_k(const StripActivations& a, long m0, const QuantWeight& w, long s, float* y, long ldy, int live,
                  const float* bias, bool accumulate) {
  constexpr int SB = kQuantSuperBlock;
  const long nb = a.nblocks;
  const uint8_t* quants = strip_quants(w, s);
  const uint8_t* scales = strip_k_scales(w, s);
  const uint8_t* mins = strip_k_mins(w, s);
  const uint16_t* d = strip_k_d(w, s);
  const uint16_t* dmin = strip_k_dmin(w, s);
  constexpr int V = strip_vectors(kFive ? QuantFormat::kQ5_K : QuantFormat::kQ4_K);
  const TileRows<XR> rows(a, m0);
  const auto& x = rows.x;
  const auto& dx = rows.dx;
  const auto& xsum = rows.sums;
  __m512 acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = _mm512_setzero_ps();
  for (long b = 0; b < nb; ++b) {
    const uint8_t* qb = quants + b * V * 64;
    __m512i isc[XR], imn[XR];
    for (int i = 0; i < XR; ++i) isc[i] = imn[i] = _mm512_setzero_si512();
    unrolled<4>([&](auto G) {
      constexpr int g = G.value;
      __m512i lo[XR][2], hi[XR][2];  // sub-blocks 2g and 2g + 1, two chains each
      for (int i = 0; i < XR; ++i) lo[i][0] = lo[i][1] = hi[i][0] = hi[i][1] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        const uint8_t* p = qb + (8 * g + j) * 64;
        _mm_prefetch((const char*)(p + kStripPrefetchBytes), _MM_HINT_T0);
        __m512i high = _mm512_setzero_si512(), l, h;
        if constexpr (kFive) {
          const uint8_t* ph = qb + (32 + j) * 64;
          if constexpr (g == 0) _mm_prefetch((const char*)(ph + kStripPrefetchBytes), _MM_HINT_T0);
          high = _mm512_loadu_si512(ph);
        }
        k_values<kFive>(_mm512_loadu_si512(p), high, g, l, h);
        for (int i = 0; i < XR; ++i) {
          const int8_t* xb = x[i] + b * SB + 64 * g + 4 * j;
          lo[i][j % 2] = _mm512_dpbusd_epi32(lo[i][j % 2], l, broadcast4(xb));
          hi[i][j % 2] = _mm512_dpbusd_epi32(hi[i][j % 2], h, broadcast4(xb + QK));
        }
      }
      const __m512i sc_lo = bytes_u32(scales + (b * 8 + 2 * g) * kStripRows);
      const __m512i sc_hi = bytes_u32(scales + (b * 8 + 2 * g + 1) * kStripRows);
      for (int i = 0; i < XR; ++i) {
        isc[i] = _mm512_add_epi32(isc[i], _mm512_mullo_epi32(_mm512_add_epi32(lo[i][0], lo[i][1]), sc_lo));
        isc[i] = _mm512_add_epi32(isc[i], _mm512_mullo_epi32(_mm512_add_epi32(hi[i][0], hi[i][1]), sc_hi));
      }
    });
    for (int t = 0; t < 8; ++t) {
      const __m512i m = bytes_u32(mins + (b * 8 + t) * kStripRows);
      for (int i = 0; i < XR; ++i) {
        imn[i] = _mm512_add_epi32(imn[i], _mm512_mullo_epi32(m, _mm512_set1_epi32(xsum[i][b * 8 + t])));
      }
    }
    const __m512 db = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * kStripRows)));
    const __m512 mb = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dmin + b * kStripRows)));
    for (int i = 0; i < XR; ++i) {
      const __m512 sum = _mm512_fmsub_ps(db, _mm512_cvtepi32_ps(isc[i]), _mm512_mul_ps(mb, _mm512_cvtepi32_ps(imn[i])));
      acc[i] = _mm512_fmadd_ps(sum, _mm512_set1_ps(dx[i][b]), acc[i]);
    }
  }
  store_rows<XR>(acc, y, ldy, live, bias, accumulate);
}

// The 6-bit values of q6_k columns 128 h + 32 p + 4 j .. of 16 rows (p = a and a + 2) from low-bit
// vector (h, a, j) and high-bit vector (h, j).
inline void q6_values(__m512i low, __m512i high, int a, __m512i& p_a, __m512i& p_a2) {
  const __m512i nibble = _mm512_set1_epi8(0x0f), top = _mm512_set1_epi8(0x30);
  p_a = _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_and_si512(_mm512_slli_epi16(high, 4 - 2 * a), top));
  p_a2 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble),
                         _mm512_and_si512(_mm512_srli_epi16(high, 2 * a), top));
}

// XR activation rows (from m0) x one q6_k strip: per sub-block u of 16 columns the int32 lanes sum
// (q - 32) x, starting from -32 xsum_u; a row's super-block is dx d sum_u sc_u isum_u.
template <int XR>
void strip_tile_q6k(const StripActivations& a, long m0, const QuantWeight& w, long s, float* y, long ldy, int live,
                    const float* bias, bool accumulate) {
  constexpr int SB = kQuantSuperBlock;
  const long nb = a.nblocks;
  const uint8_t* quants = strip_quants(w, s);
  const int8_t* scales = strip_q6_scales(w, s);
  const uint16_t* d = strip_q6_d(w, s);
  const TileRows<XR> rows(a, m0);
  const auto& x = rows.x;
  const auto& dx = rows.dx;
  const auto& xsum = rows.sums;
  const auto sub_scales = [&](long b, int u) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + (b * 16 + u) * kStripRows)));
  };
  __m512 acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = _mm512_setzero_ps();
  for (long b = 0; b < nb; ++b) {
    const uint8_t* qb = quants + b * 48 * 64;
    __m512i isc[XR];
    for (int i = 0; i < XR; ++i) isc[i] = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      unrolled<2>([&](auto AL) {  // columns 32 p .. of half h, p = al and al + 2; j < 4 and j >= 4
        constexpr int al = AL.value;
        const int u0 = 8 * h + 2 * al, u2 = 8 * h + 2 * (al + 2);
        const int u[4] = {u0, u0 + 1, u2, u2 + 1};
        __m512i s[XR][4];  // sub-blocks u[0 .. 3]
        for (int i = 0; i < XR; ++i) {
          for (int q = 0; q < 4; ++q) s[i][q] = _mm512_set1_epi32(-32 * xsum[i][b * 16 + u[q]]);
        }
        for (int j = 0; j < 8; ++j) {
          const uint8_t* lp = qb + ((2 * h + al) * 8 + j) * 64;
          _mm_prefetch((const char*)(lp + kStripPrefetchBytes), _MM_HINT_T0);
          __m512i v0, v2;
          q6_values(_mm512_loadu_si512(lp), _mm512_loadu_si512(qb + (32 + 8 * h + j) * 64), al, v0, v2);
          for (int i = 0; i < XR; ++i) {
            const int8_t* xb = x[i] + b * SB + 128 * h + 4 * j;
            s[i][j / 4] = _mm512_dpbusd_epi32(s[i][j / 4], v0, broadcast4(xb + 32 * al));
            s[i][2 + j / 4] = _mm512_dpbusd_epi32(s[i][2 + j / 4], v2, broadcast4(xb + 32 * (al + 2)));
          }
        }
        const __m512i c[4] = {sub_scales(b, u[0]), sub_scales(b, u[1]), sub_scales(b, u[2]), sub_scales(b, u[3])};
        for (int i = 0; i < XR; ++i) {
          for (int q = 0; q < 4; ++q) isc[i] = _mm512_add_epi32(isc[i], _mm512_mullo_epi32(s[i][q], c[q]));
        }
      });
    }
    _mm_prefetch((const char*)(scales + b * 16 * kStripRows) + kStripPrefetchBytes / 8, _MM_HINT_T0);
    const __m512 db = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * kStripRows)));
    for (int i = 0; i < XR; ++i) {
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isc[i]), _mm512_mul_ps(db, _mm512_set1_ps(dx[i][b])), acc[i]);
    }
  }
  store_rows<XR>(acc, y, ldy, live, bias, accumulate);
}

// Activation rows per tile: a strip's block (288 or 544 bytes) is loaded once for up to 4 rows.
constexpr int kStripXR = 4;

// Calls tile(std::integral_constant<int, XR>, m) for the M activation rows, up to kStripXR at a time.
template <class Tile>
void for_row_tiles(long M, Tile&& tile) {
  for (long m = 0; m < M;) {
    const int xr = (int)lmin(kStripXR, M - m);
    switch (xr) {
      case 4: tile(std::integral_constant<int, 4>{}, m); break;
      case 3: tile(std::integral_constant<int, 3>{}, m); break;
      case 2: tile(std::integral_constant<int, 2>{}, m); break;
      default: tile(std::integral_constant<int, 1>{}, m); break;
    }
    m += xr;
  }
}

// Calls fn(std::integral_constant<QuantFormat, F>) for the 32-column strip format F = f.
template <class Fn>
void with_block_format(QuantFormat f, Fn&& fn) {
  switch (f) {
    case QuantFormat::kQ8_0: fn(std::integral_constant<QuantFormat, QuantFormat::kQ8_0>{}); break;
    case QuantFormat::kInt8: fn(std::integral_constant<QuantFormat, QuantFormat::kInt8>{}); break;
    case QuantFormat::kQ5_0: fn(std::integral_constant<QuantFormat, QuantFormat::kQ5_0>{}); break;
    case QuantFormat::kQ4_1: fn(std::integral_constant<QuantFormat, QuantFormat::kQ4_1>{}); break;
    case QuantFormat::kQ5_1: fn(std::integral_constant<QuantFormat, QuantFormat::kQ5_1>{}); break;
    default: fn(std::integral_constant<QuantFormat, QuantFormat::kQ4_0>{}); break;
  }
}
}  // namespace

void strip_block_values(const QuantWeight& w, long s, long b, __mmask16 live, __m512i out[8]) {
  if (w.format == QuantFormat::kQ4_K || w.format == QuantFormat::kQ5_K) {  // sub-block t of super-block
    const int t = (int)(b % 8), g = t / 2;                                      // b / 8: group t / 2
    const uint8_t* qb = strip_quants(w, s) + (b / 8) * strip_vectors(w.format) * 64;
    for (int j = 0; j < 8; ++j) {
      const __m512i v = _mm512_loadu_si512(qb + (8 * g + j) * 64);
      __m512i lo, hi;
      if (w.format == QuantFormat::kQ5_K) {
        k_values<true>(v, _mm512_loadu_si512(qb + (32 + j) * 64), g, lo, hi);
      } else {
        k_values<false>(v, _mm512_setzero_si512(), g, lo, hi);
      }
      out[j] = _mm512_maskz_mov_epi32(live, t % 2 ? hi : lo);
    }
    return;
  }
  if (w.format == QuantFormat::kQ6_K) {  // columns 32 t .. of super-block b / 8: half h = t / 4, p = t % 4
    const int t = (int)(b % 8), h = t / 4, p = t % 4;
    const uint8_t* qb = strip_quants(w, s) + (b / 8) * 48 * 64;
    for (int j = 0; j < 8; ++j) {
      __m512i v0, v2;
      q6_values(_mm512_loadu_si512(qb + ((2 * h + p % 2) * 8 + j) * 64), _mm512_loadu_si512(qb + (32 + 8 * h + j) * 64),
                p % 2, v0, v2);
      out[j] = _mm512_maskz_mov_epi32(live, p < 2 ? v0 : v2);
    }
    return;
  }
  const uint8_t* qb = strip_quants(w, s) + b * strip_vectors(QuantFormat::kQ5_0) * 64;
  const __m512i fifth = _mm512_loadu_si512(qb + 4 * 64);
  for (int g = 0; g < 4; ++g) {
    __m512i lo, hi;
    group_values<QuantFormat::kQ5_0>(_mm512_loadu_si512(qb + g * 64), fifth, g, lo, hi);
    out[g] = _mm512_maskz_mov_epi32(live, lo);
    out[4 + g] = _mm512_maskz_mov_epi32(live, hi);
  }
}

void strip_block_scale(const QuantWeight& w, long s, long u, int r, float* scale, float* offset) {
  if (w.format == QuantFormat::kQ6_K) {  // sub-blocks of 16
    const float d = to_f32(f16{strip_q6_d(w, s)[(u / 16) * kStripRows + r]});
    *scale = d * (float)strip_q6_scales(w, s)[u * kStripRows + r];
    *offset = 0.0f;
    return;
  }
  const long b = u;  // sub-blocks of 32
  if (w.format == QuantFormat::kQ4_K || w.format == QuantFormat::kQ5_K) {  // as unpacking the stored
                                                                            // super-block computes them
    const long sb = b / 8, at = b * kStripRows + r;
    *scale = to_f32(f16{strip_k_d(w, s)[sb * kStripRows + r]}) * (float)strip_k_scales(w, s)[at];
    *offset = -(to_f32(f16{strip_k_dmin(w, s)[sb * kStripRows + r]}) * (float)strip_k_mins(w, s)[at]);
    return;
  }
  *scale = to_f32(f16{strip_scales(w, s)[b * kStripRows + r]});
  *offset = strip_has_offsets(w.format) ? to_f32(f16{strip_offsets(w, s)[b * kStripRows + r]}) : 0.0f;
}

StripActivations prepare_strip_rows(const float* x, long M, long K, QuantFormat f) {
  StripActivations a;
  const bool k = is_k_quant(f);
  const int sums = f == QuantFormat::kQ6_K ? 16 : k ? 8 : 1;  // per block: sums of q over 16 or 32 columns
  a.K = K;
  a.nblocks = K / quant_block_cols(f);
  a.sums = a.nblocks * sums;
  const long nblocks = a.nblocks, inits = M * a.sums;
  a.q = (int8_t*)aligned_alloc(64, (size_t)(M * K + 63) / 64 * 64);
  a.dx = (float*)aligned_alloc(64, (size_t)(sizeof(float) * (M * nblocks * 2 + inits) + 63) / 64 * 64);
  a.s = a.dx + M * nblocks;
  a.init = reinterpret_cast<int32_t*>(a.dx + 2 * M * nblocks);
  if (k) {  // llama.cpp's q8_K: a scale per 256 activations; the sums of each sub-block
    std::vector<int32_t> sum16(K / 16);
    for (long m = 0; m < M; ++m) {
      quantize_act(x + m * K, K, kQuantSuperBlock, a.q + m * K, a.dx + m * nblocks, sum16.data());
      for (long t = 0; t < nblocks * sums; ++t) {
        a.init[m * nblocks * sums + t] = sums == 16 ? sum16[t] : sum16[2 * t] + sum16[2 * t + 1];
      }
    }
    return a;
  }
  // Stored values w + 128 (int8, q8_0), w + 16 (q5_0), w + 8 (q4_0); q4_1's and q5_1's are w's own
  // (their offset is m).
  const int zero = strip_8bit(f) ? 128 : f == QuantFormat::kQ5_0 ? 16 : f == QuantFormat::kQ4_0 ? 8 : 0;
  for (long m = 0; m < M; ++m) {
    int8_t* q = a.q + m * K;
    quantize_row(x + m * K, K, q, a.dx + m * nblocks, a.s + m * nblocks);
    for (long b = 0; b < nblocks; ++b) {
      const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * QK)));
      const int sum = _mm512_reduce_add_epi32(_mm512_madd_epi16(v, _mm512_set1_epi16(1)));
      a.init[m * nblocks + b] = -sum * zero;
    }
  }
  return a;
}

void free_strip_rows(StripActivations& a) {
  free(a.dx);
  free(a.q);
}

void strip_tiles(const StripActivations& a, long M, const QuantWeight& w, const float* bias, float* y, long ldy,
                 bool accumulate) {
  const long strips = strip_count(w);
#pragma omp for schedule(static) nowait
  for (long s = 0; s < strips; ++s) {
    const long n = s * kStripRows;
    const int live = (int)lmin(kStripRows, w.rows - n);
    const float* bn = bias ? bias + n : nullptr;
    if (w.format == QuantFormat::kQ4_K || w.format == QuantFormat::kQ5_K) {
      const bool five = w.format == QuantFormat::kQ5_K;
      for_row_tiles(M, [&](auto XR, long m) {
        if (five) {
          strip_tile_k<true, XR.value>(a, m, w, s, y + m * ldy + n, ldy, live, bn, accumulate);
        } else {
          strip_tile_k<false, XR.value>(a, m, w, s, y + m * ldy + n, ldy, live, bn, accumulate);
        }
      });
      continue;
    }
    if (w.format == QuantFormat::kQ6_K) {
      for_row_tiles(M, [&](auto XR, long m) {
        strip_tile_q6k<XR.value>(a, m, w, s, y + m * ldy + n, ldy, live, bn, accumulate);
      });
      continue;
    }
    const uint8_t* quants = strip_quants(w, s);
    const uint16_t* scales = strip_scales(w, s);
    const float* row_scales = w.row_scales ? w.row_scales + n : nullptr;  // int8
    with_block_format(w.format, [&](auto F) {
      for_row_tiles(M, [&](auto XR, long m) {
        strip_tile<F.value, XR.value>(a, m, quants, scales, row_scales, y + m * ldy + n, ldy, live, bn, accumulate);
      });
    });
  }
}
#endif

}  // namespace pyxf::kernels::PYXF_TARGET_NS
