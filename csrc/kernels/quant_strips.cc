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

#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {

void quantize_row(const float* x, long K, int8_t* q, float* d, float* s);

namespace {
constexpr int QK = kQuantBlock;
// Where a block's quant bytes start in a stored row (after its fp16 scale), and its bytes.
constexpr int kDataOffset = 2;
constexpr int stored_block_bytes(QuantFormat f) { return f == QuantFormat::kQ8_0 ? 2 + QK : 2 + QK / 2; }
}  // namespace

long strips_bytes(const QuantWeight& w) {
  if (!strip_format(w.format) || w.rows <= 0) return 0;
  return strip_count(w) * strip_bytes(w);
}

void pack_strips(const QuantWeight& w, uint8_t* out) {
  const long nblocks = w.cols / QK, row_bytes = quant_row_bytes(w.format, w.cols), strips = strip_count(w);
  const int groups = strip_groups(w.format), bb = stored_block_bytes(w.format);
  const uint8_t flip = w.format == QuantFormat::kQ8_0 ? 0x80 : 0x00;  // 8-bit: w + 128
  const long sb = strip_bytes(w);
#pragma omp parallel for schedule(static)
  for (long s = 0; s < strips; ++s) {
    uint8_t* quants = out + s * sb;
    uint16_t* scales = reinterpret_cast<uint16_t*>(quants + nblocks * groups * 64);
    for (int r = 0; r < kStripRows; ++r) {
      const long row = s * kStripRows + r;
      const uint8_t* src = row < w.rows ? w.data + row * row_bytes : nullptr;
      for (long b = 0; b < nblocks; ++b) {
        const uint8_t* blk = src ? src + b * bb : nullptr;
        for (int g = 0; g < groups; ++g) {
          uint8_t* dst = quants + ((b * groups + g) * kStripRows + r) * 4;
          for (int i = 0; i < 4; ++i) dst[i] = blk ? (uint8_t)(blk[kDataOffset + 4 * g + i] ^ flip) : flip;
        }
        uint16_t d = 0;
        if (blk) memcpy(&d, blk, 2);
        scales[b * kStripRows + r] = d;
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

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// XR activation rows (from m0) x one strip: y[i][0 .. live) (+)= row i times the strip's rows.
template <QuantFormat F, int XR>
void strip_tile(const StripActivations& a, long m0, const uint8_t* quants, const uint16_t* scales, float* y,
                long ldy, int live, const float* bias, bool accumulate) {
  constexpr int G = strip_groups(F);
  const long nblocks = a.nblocks;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const int8_t* x[XR];
  const float* dx[XR];
  const int32_t* init[XR];
  for (int i = 0; i < XR; ++i) {
    x[i] = a.q + (m0 + i) * nblocks * QK;
    dx[i] = a.dx + (m0 + i) * nblocks;
    init[i] = a.init + (m0 + i) * nblocks;
  }
  __m512 acc[XR];
  for (int i = 0; i < XR; ++i) acc[i] = _mm512_setzero_ps();
  for (long b = 0; b < nblocks; ++b) {
    const uint8_t* qb = quants + b * G * 64;
    for (int g = 0; g < G; ++g) _mm_prefetch((const char*)(qb + kStripPrefetchBytes + g * 64), _MM_HINT_T0);
    if (b % 2 == 0) _mm_prefetch((const char*)(scales + b * kStripRows) + kStripPrefetchBytes / 8, _MM_HINT_T0);
    // Two int32 sums per row (even and odd groups, or low and high nibbles): two chains of 4.
    __m512i s0[XR], s1[XR];
    for (int i = 0; i < XR; ++i) {
      s0[i] = _mm512_set1_epi32(init[i][b]);
      s1[i] = _mm512_setzero_si512();
    }
    for (int g = 0; g < G; ++g) {
      const __m512i v = _mm512_loadu_si512(qb + g * 64);
      if constexpr (F == QuantFormat::kQ4_0) {
        const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
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
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * kStripRows)));
    for (int i = 0; i < XR; ++i) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i]));
      acc[i] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(dx[i][b])), acc[i]);
    }
  }
  const __mmask16 k = (__mmask16)((1u << live) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(k, bias) : _mm512_setzero_ps();
  for (int i = 0; i < XR; ++i) {
    float* yi = y + i * ldy;
    __m512 v = _mm512_add_ps(acc[i], bv);
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, yi));
    _mm512_mask_storeu_ps(yi, k, v);
  }
}

// Activation rows per tile: a strip's block (288 or 544 bytes) is loaded once for up to 4 rows.
constexpr int kStripXR = 4;

template <QuantFormat F>
void strip_rows(const StripActivations& a, long M, const uint8_t* quants, const uint16_t* scales, float* y, long ldy,
                int live, const float* bias, bool accumulate) {
  for (long m = 0; m < M;) {
    const int xr = (int)lmin(kStripXR, M - m);
    float* ym = y + m * ldy;
    switch (xr) {
      case 4: strip_tile<F, 4>(a, m, quants, scales, ym, ldy, live, bias, accumulate); break;
      case 3: strip_tile<F, 3>(a, m, quants, scales, ym, ldy, live, bias, accumulate); break;
      case 2: strip_tile<F, 2>(a, m, quants, scales, ym, ldy, live, bias, accumulate); break;
      default: strip_tile<F, 1>(a, m, quants, scales, ym, ldy, live, bias, accumulate); break;
    }
    m += xr;
  }
}
}  // namespace

StripActivations prepare_strip_rows(const float* x, long M, long K, QuantFormat f) {
  StripActivations a;
  a.nblocks = K / QK;
  const long nblocks = a.nblocks;
  a.q = (int8_t*)aligned_alloc(64, (size_t)(M * K + 63) / 64 * 64);
  a.dx = (float*)aligned_alloc(64, (size_t)(sizeof(float) * M * nblocks * 3 + 63) / 64 * 64);
  a.init = reinterpret_cast<int32_t*>(a.dx + M * nblocks);
  float* sums = a.dx + 2 * M * nblocks;  // dx * sum(q), unused here
  const int shift = f == QuantFormat::kQ8_0 ? 7 : 3;  // stored weights are w + 128 / w + 8
  for (long m = 0; m < M; ++m) {
    int8_t* q = a.q + m * K;
    quantize_row(x + m * K, K, q, a.dx + m * nblocks, sums + m * nblocks);
    for (long b = 0; b < nblocks; ++b) {
      const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * QK)));
      const int sum = _mm512_reduce_add_epi32(_mm512_madd_epi16(v, _mm512_set1_epi16(1)));
      a.init[m * nblocks + b] = -(sum * (1 << shift));
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
    if (w.format == QuantFormat::kQ8_0) {
      strip_rows<QuantFormat::kQ8_0>(a, M, strip_quants(w, s), strip_scales(w, s), y + n, ldy, live, bn, accumulate);
    } else {
      strip_rows<QuantFormat::kQ4_0>(a, M, strip_quants(w, s), strip_scales(w, s), y + n, ldy, live, bn, accumulate);
    }
  }
}
#endif

}  // namespace pyxf::kernels::PYXF_TARGET_NS
