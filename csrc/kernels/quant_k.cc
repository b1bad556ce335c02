// Linear layers on GGUF's 5-bit block formats (q5_0, q5_1) and K-quants (q4_k, q5_k, q6_k).
//
// Stored layouts (llama.cpp's, byte for byte; fp16 little-endian):
//   q5_0   22 bytes / 32 weights: d, uint32 qh, qs[16]. q_j = nibble j | (bit j of qh) << 4, where
//          byte j < 16 of qs holds weight j in its low nibble and j + 16 in its high one. w = d (q - 16)
//   q5_1   24 bytes: d, m, qh, qs (as q5_0).  w = d q + m
//   q4_k  144 bytes / 256 weights: d, dmin, scales[12], qs[128]. Sub-block s (32 weights) has a 6-bit
//          scale sc_s and min m_s packed in `scales` (k_scales); w = d sc_s q - dmin m_s. qs: four groups
//          of 32 bytes; group g holds sub-block 2g in its low nibbles and 2g + 1 in its high ones.
//   q5_k  176 bytes: d, dmin, scales[12], qh[32], qs[128]: as q4_k, and bit s of qh[l] is the fifth
//          bit of weight l of sub-block s.
//   q6_k  210 bytes: ql[128], qh[64], int8 scales[16], d. Sub-block s (16 weights) has the signed scale
//          sc_s; w = d sc_s (q - 32). Half h (128 weights) uses ql[64h..] and qh[32h..]: its weight
//          32p + l (p < 4, l < 32) has its low 4 bits in ql[64h + 32 (p & 1) + l] (the low nibble for
//          p < 2, the high one for p >= 2) and its top 2 bits at bit 2p of qh[32h + l].
//
// Activations are quantized as llama.cpp quantizes them for these weights: per block of 32 for q5_*
// (q8_0) and per super-block of 256 for the K-quants (q8_K), to int8 with scale max|x| / 127 rounded
// to nearest even. Products run on integers within a (sub-)block and in fp32 across blocks.
//
// Decode (few rows) streams each weight row once: the blocks are unpacked in registers to unsigned
// bytes, multiplied with the int8 activations by vpmaddubsw (K-quants: vpdpwssd / vpmaddwd then apply
// the integer sub-block scales) or vpdpbusd (q5_*: on AVX-512 two blocks per 512-bit vector), with
// the activations stored in the order in which the unpacked weights come out. Prefill on AVX-512
// repacks 32 weight rows at a time into vpdpbusd panels (as quant.cc does for its formats); other ISAs
// dequantize slices of the weights and run the float GEMM on the rounded activations.
#include <float.h>
#include <stdlib.h>
#include <string.h>

#include <limits>

#include "kernels/kernels.h"
#include "kernels/quant_strips.h"
#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {
void gated_activation_row(const float* gate, const float* up, long n, Activation act, float* out);
template <typename W>
void linear_strided(const float* x, long M, long K, const W* w, long N, const float* bias, float* y,
                    long ldy, bool accumulate);

namespace {

constexpr int QK = kQuantBlock;        // 32
constexpr int QKK = kQuantSuperBlock;  // 256

float half_to_float(uint16_t h) { return to_f32(f16{h}); }
uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}
uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

// ---- the formats ----

struct FormatInfo {
  int cols;    // weights per block
  int bytes;   // bytes per block
  int sub;     // weights per sub-block (one scale each)
  int zero;    // w = scale (q - zero) + offset, q the stored unsigned integer
  bool offset; // a per sub-block offset (min) besides the scale
};
constexpr FormatInfo info(QuantFormat f) {
  switch (f) {
    case QuantFormat::kQ5_0: return {QK, 22, QK, 16, false};
    case QuantFormat::kQ5_1: return {QK, 24, QK, 0, true};
    case QuantFormat::kQ4_K: return {QKK, 144, QK, 0, true};
    case QuantFormat::kQ5_K: return {QKK, 176, QK, 0, true};
    case QuantFormat::kQ6_K:
    default: return {QKK, 210, 16, 32, false};
  }
}

// q4_k / q5_k: the 8 six-bit scales (bytes of sc[0..1]) and mins (bytes of mn[0..1]) of a super-block.
// Bytes 0-3 of `scales` hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the
// low 4 bits of scales 4-7 (low nibbles) and mins 4-7 (high nibbles), whose top 2 bits are the top
// bits of bytes 0-3 (scales) and 4-7 (mins).
void k_scales(const uint8_t* scales, uint32_t sc[2], uint32_t mn[2]) {
  const uint32_t w0 = load_u32(scales), w1 = load_u32(scales + 4), w2 = load_u32(scales + 8);
  sc[0] = w0 & 0x3f3f3f3fu;
  mn[0] = w1 & 0x3f3f3f3fu;
  sc[1] = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
  mn[1] = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
}

#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
// ---- a block's integers as unsigned bytes in weight order, 32 per 256-bit vector (AVX2) ----
// The AVX2 decode kernels multiply these; unpack() stores them (both x86 ISAs).

// k_scales in one register: the dwords {sc[0], sc[1], mn[0], mn[1]} from the 12 scale bytes, with
// vector shifts and masks (reading 16 bytes: the scales are followed by the block's quants).
static inline __m128i k_scales_vector(const uint8_t* scales) {
  const __m128i v = _mm_loadu_si128((const __m128i*)scales);      // dwords w0, w1, w2, ...
  const __m128i low = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
  const __m128i top = _mm_srli_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)), 2);
  return _mm_or_si128(_mm_and_si128(low, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
                      _mm_and_si128(top, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
}

// Byte j = 0x10 where bit j of `bits` is set.
static inline __m256i fifth_bits(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                                     2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// q5_0 / q5_1: the block's 32 values.
template <bool kQ51>
static inline __m256i q5_values(const uint8_t* blk) {
  const __m128i v = _mm_loadu_si128((const __m128i*)(blk + (kQ51 ? 8 : 6)));
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m256i z = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nib), _mm_and_si128(v, nib));
  return _mm256_or_si256(z, fifth_bits(load_u32(blk + (kQ51 ? 4 : 2))));
}

// q4_k / q5_k: q[s] = sub-block s.
template <bool kFive>
static inline void k45_values(const uint8_t* blk, __m256i q[8]) {
  const uint8_t* qs = blk + (kFive ? 48 : 16);
  const __m256i nib = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
  for (int g = 0; g < 4; ++g) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * g));
    q[2 * g] = _mm256_and_si256(v, nib);
    q[2 * g + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  }
  if (kFive) {
    const __m256i hb = _mm256_loadu_si256((const __m256i*)(blk + 16));
    for (int s = 0; s < 8; ++s) {
      const __m128i shift = _mm_cvtsi32_si128(s);
      q[s] = _mm256_or_si256(q[s], _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hb, shift), one), 4));
    }
  }
}

// q6_k: q[v] = weights 32v .. 32v + 31.
static inline void q6k_values(const uint8_t* blk, __m256i q[8]) {
  const __m256i nib = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi8(0x30);
  for (int h = 0; h < 2; ++h) {
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
    for (int p = 0; p < 2; ++p) {
      const __m256i ql = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32 * p));
      const __m128i up = _mm_cvtsi32_si128(4 - 2 * p), down = _mm_cvtsi32_si128(2 * p);
      q[4 * h + p] = _mm256_or_si256(_mm256_and_si256(ql, nib), _mm256_and_si256(_mm256_sll_epi16(qh, up), top));
      q[4 * h + 2 + p] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql, 4), nib),
                                         _mm256_and_si256(_mm256_srl_epi16(qh, down), top));
    }
  }
}
#endif

// One block unpacked: its stored integers in weight order and, per sub-block, what makes them
// floats: w = scale (q - zero) + offset, computed as llama.cpp (and gguf.quants) do, so exactly.
struct Unpacked {
  uint8_t q[QKK];
  float scale[16];
  float offset[16];
};

template <QuantFormat F>
void unpack(const uint8_t* blk, Unpacked& u) {
  if constexpr (F == QuantFormat::kQ5_0 || F == QuantFormat::kQ5_1) {
    constexpr bool q51 = F == QuantFormat::kQ5_1;
#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
    _mm256_storeu_si256((__m256i*)u.q, q5_values<q51>(blk));
#else
    const uint32_t qh = load_u32(blk + (q51 ? 4 : 2));
    const uint8_t* qs = blk + (q51 ? 8 : 6);
    for (int j = 0; j < QK / 2; ++j) {
      u.q[j] = (uint8_t)((qs[j] & 0x0f) | ((qh >> j) & 1) << 4);
      u.q[j + QK / 2] = (uint8_t)((qs[j] >> 4) | ((qh >> (j + QK / 2)) & 1) << 4);
    }
#endif
    u.scale[0] = half_to_float(load_u16(blk));
    u.offset[0] = q51 ? half_to_float(load_u16(blk + 2)) : 0.0f;
  } else if constexpr (F == QuantFormat::kQ4_K || F == QuantFormat::kQ5_K) {
    constexpr bool q5 = F == QuantFormat::kQ5_K;
    const float d = half_to_float(load_u16(blk)), dmin = half_to_float(load_u16(blk + 2));
    uint32_t sc[2], mn[2];
    k_scales(blk + 4, sc, mn);
#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
    __m256i q[8];
    k45_values<q5>(blk, q);
    for (int s = 0; s < 8; ++s) _mm256_storeu_si256((__m256i*)(u.q + 32 * s), q[s]);
#else
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (q5 ? 48 : 16);
    for (int g = 0; g < 4; ++g) {
      for (int l = 0; l < 32; ++l) {
        uint8_t lo = qs[32 * g + l] & 0x0f, hi = qs[32 * g + l] >> 4;
        if (q5) {
          lo |= ((qh[l] >> (2 * g)) & 1) << 4;
          hi |= ((qh[l] >> (2 * g + 1)) & 1) << 4;
        }
        u.q[64 * g + l] = lo;
        u.q[64 * g + 32 + l] = hi;
      }
    }
#endif
    for (int s = 0; s < 8; ++s) {
      const int scale = (sc[s / 4] >> (8 * (s % 4))) & 0xff, min = (mn[s / 4] >> (8 * (s % 4))) & 0xff;
      u.scale[s] = d * (float)scale;
      u.offset[s] = -(dmin * (float)min);
    }
  } else {  // q6_k
    const int8_t* sc = (const int8_t*)(blk + 192);
    const float d = half_to_float(load_u16(blk + 208));
#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
    __m256i q[8];
    q6k_values(blk, q);
    for (int v = 0; v < 8; ++v) _mm256_storeu_si256((__m256i*)(u.q + 32 * v), q[v]);
#else
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t a = ql[64 * h + l], b = ql[64 * h + 32 + l], bits = qh[32 * h + l];
        uint8_t* q = u.q + 128 * h + l;
        q[0] = (uint8_t)((a & 0x0f) | (bits & 3) << 4);
        q[32] = (uint8_t)((b & 0x0f) | ((bits >> 2) & 3) << 4);
        q[64] = (uint8_t)((a >> 4) | ((bits >> 4) & 3) << 4);
        q[96] = (uint8_t)((b >> 4) | ((bits >> 6) & 3) << 4);
      }
    }
#endif
    for (int s = 0; s < 16; ++s) {
      u.scale[s] = d * (float)sc[s];
      u.offset[s] = 0.0f;
    }
  }
}

template <QuantFormat F>
void dequantize_row_f(const QuantWeight& w, long row, float* out) {
  constexpr FormatInfo fi = info(F);
  const uint8_t* src = w.data + row * quant_row_bytes(F, w.cols);
  Unpacked u;
  for (long b = 0; b < w.cols / fi.cols; ++b) {
    unpack<F>(src + b * fi.bytes, u);
    float* o = out + b * fi.cols;
    for (int i = 0; i < fi.cols; ++i) {
      const int s = i / fi.sub;
      const float v = u.scale[s] * (float)((int)u.q[i] - fi.zero);
      o[i] = fi.offset ? v + u.offset[s] : v;  // no + 0: it would turn -0 into +0
    }
  }
}

// ---- activations ----
}  // namespace

// x in blocks of `block` (32 or 256) -> int8 q, per block the scale d = max|x| / 127 (q = x / d
// rounded to nearest even, as llama.cpp's q8_0 and q8_K) and the sum of every 16 q. (Also the
// strips' q4_k GEMV's, quant_strips.cc.)
void quantize_act(const float* x, long K, int block, int8_t* q, float* d, int32_t* sum16) {
  for (long b = 0; b < K / block; ++b) {
    const float* xb = x + b * block;
    int8_t* qb = q + b * block;
    bool finite;
    const float m = vabsmax(xb, block, &finite);
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    d[b] = m / 127.0f;
    if (!finite || !(inv <= FLT_MAX)) {
      // An inf or NaN in the block: its products are NaN, as in float, not the integer garbage a
      // NaN converts to (undefined behaviour). Or values so small that 127 / max overflows: zeros.
      memset(qb, 0, block);
      memset(sum16 + b * (block / 16), 0, block / 16 * sizeof(int32_t));
      if (!finite) d[b] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
#if defined(PYXF_TARGET_avx512)
    const __m512 vi = _mm512_set1_ps(inv);
    for (int i = 0; i < block; i += 16) {  // |values| <= 127: the int32 sums are the int8 ones
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), vi));
      _mm_storeu_si128((__m128i*)(qb + i), _mm512_cvtepi32_epi8(v));
      sum16[b * (block / 16) + i / 16] = _mm512_reduce_add_epi32(v);
    }
#elif defined(PYXF_TARGET_avx2)
    const __m256 vi = _mm256_set1_ps(inv);
    for (int i = 0; i < block; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * j), vi));
      // int32 -> int16 -> int8 packs interleave 128-bit lanes; one permute restores the order.
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])),
          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(qb + i), bytes);
    }
#else
    for (int i = 0; i < block; ++i) qb[i] = (int8_t)nearbyintf(xb[i] * inv);
#endif
#if !defined(PYXF_TARGET_avx512)
    for (int g = 0; g < block / 16; ++g) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += qb[16 * g + i];
      sum16[b * (block / 16) + g] = s;
    }
#endif
  }
}

namespace {
// Moves groups of `chunk` values within each span of chunk * n: group order[i] goes to place i.
void reorder(int8_t* q, long K, int chunk, const int* order, int n) {
  int8_t tmp[QKK];
  const int span = chunk * n;
  for (long base = 0; base + span <= K; base += span) {
    for (int i = 0; i < n; ++i) memcpy(tmp + i * chunk, q + base + order[i] * chunk, chunk);
    memcpy(q + base, tmp, span);
  }
}

// One activation row as the decode kernels read it.
struct ActRow {
  const int8_t* q;     // K values (padded to whole block pairs), in the kernel's order
  const float* d;      // per block (q5: 32 weights; K-quants: 256), padded
  const int16_t* bs;   // K-quants, per super-block 16 sums: q6_k of each 16, q4_k / q5_k of each 32 (8)
  const int32_t* c;    // q5_0: -16 * the block's sum (q5: per block; AVX-512: 16 lanes per block pair)
  const float* s;      // q5_1: d * the block's sum (likewise)
  const float* dl;     // AVX-512 q5: per block pair 16 lanes, d of the first block in 0-7, the second's in 8-15
};

#if defined(PYXF_TARGET_avx512)
constexpr bool kPairedQ5 = true;  // q5_* blocks two at a time, a pair's 64 values in weight order
#else
constexpr bool kPairedQ5 = false;
#endif

// Bytes of one quantized activation row of K for format f (all arrays, padded).
long act_row_bytes(QuantFormat f, long K) {
  if (is_k_quant(f)) return K + 64 + (K / QKK) * (4 + 32) + 64;
  const long padded = (K / QK + 1) / 2 * 2;  // q, d, sum16, c, s per block; two 64-byte vectors per pair
  return padded * (QK + 4 + 8 + 4 + 4 + 96) + 3 * 64;
}

// Quantizes one row for the decode kernels of format F into `buf` (act_row_bytes).
template <QuantFormat F>
ActRow quantize_act_row(const float* x, long K, uint8_t* buf) {
  ActRow a{};
  int8_t* q = (int8_t*)buf;
  if constexpr (is_k_quant(F)) {
    const long ns = K / QKK;
    float* d = (float*)(buf + ((K + 64 + 63) & ~63L));
    int16_t* bs = (int16_t*)(d + ns);
    int32_t sum16[16];
    for (long b = 0; b < ns; ++b) {
      quantize_act(x + b * QKK, QKK, QKK, q + b * QKK, d + b, sum16);
      for (int g = 0; g < 16; ++g) {
        bs[b * 16 + g] = (int16_t)(F == QuantFormat::kQ6_K ? sum16[g] : g < 8 ? sum16[2 * g] + sum16[2 * g + 1] : 0);
      }
    }
#if defined(PYXF_TARGET_avx512)
    if (F != QuantFormat::kQ6_K) {  // sub-blocks in the order of the unpacked 512-bit vectors
      static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
      reorder(q, K, 32, order, 8);
    }
#endif
    a.q = q;
    a.d = d;
    a.bs = bs;
    return a;
  } else {
    const long nb = K / QK, padded = (nb + 1) / 2 * 2;
    float* d = (float*)(buf + ((padded * QK + 63) & ~63L));
    int32_t* sum16 = (int32_t*)(d + padded);
    int32_t* c = sum16 + 2 * padded;
    float* s = (float*)(c + padded);
    quantize_act(x, K, QK, q, d, sum16);
    for (long b = nb; b < padded; ++b) {  // a zero block completes the last pair
      memset(q + b * QK, 0, QK);
      d[b] = 0.0f;
      sum16[2 * b] = sum16[2 * b + 1] = 0;
    }
    for (long b = 0; b < padded; ++b) {
      const int sum = sum16[2 * b] + sum16[2 * b + 1];
      c[b] = -16 * sum;
      s[b] = d[b] * (float)sum;
    }
    a.q = q;
    a.d = d;
    a.c = c;
    a.s = s;
    if (kPairedQ5) {
      // per pair, 16 lanes: the first block's terms in lane 0 (d: lanes 0-7), the second's in lane 8
      // (8-15), where the int32 sums of its weights fall
      const long pairs = padded / 2;
      int32_t* cp = (int32_t*)(((uintptr_t)(s + padded) + 63) & ~(uintptr_t)63);
      float* sp = (float*)(cp + pairs * 16);
      float* dl = sp + pairs * 16;
      memset(cp, 0, sizeof(int32_t) * pairs * 16);
      memset(sp, 0, sizeof(float) * pairs * 16);
      for (long p = 0; p < pairs; ++p) {
        cp[16 * p] = c[2 * p];
        cp[16 * p + 8] = c[2 * p + 1];
        sp[16 * p] = s[2 * p];
        sp[16 * p + 8] = s[2 * p + 1];
        for (int l = 0; l < 16; ++l) dl[16 * p + l] = d[2 * p + l / 8];
      }
      a.c = cp;
      a.s = sp;
      a.dl = dl;
    }
    return a;
  }
}

// ---- decode kernels: one weight block (or pair) unpacked, times each activation row ----
// A kernel type B has: kStep (blocks per step), load(row, step, nblocks) and dot(act row, step, acc).

#if defined(PYXF_TARGET_avx512)
struct Acc {
  __m512 v;
  void zero() { v = _mm512_setzero_ps(); }
  float sum() const { return _mm512_reduce_add_ps(v); }
};
static inline __m512 zext128(__m128 v) { return _mm512_zextps128_ps512(v); }

// q4_k / q5_k: vector k holds the sub-blocks (2k', 2k' + 2) pairs: [0,2], [1,3], [4,6], [5,7].
template <bool kFive>
struct K45Kernel {
  static constexpr int kStep = 1;
  static constexpr int kBytes = kFive ? 176 : 144;
  __m512i q[4], p[4];
  __m128i mins;
  float d, dmin;
  void load(const uint8_t* row, long b, long) {
    const uint8_t* blk = row + b * kBytes;
    d = half_to_float(load_u16(blk));
    dmin = half_to_float(load_u16(blk + 2));
    const __m128i s8 = k_scales_vector(blk + 4);
    const __m512i s16 = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(s8));
    mins = _mm_cvtepu8_epi16(_mm_srli_si128(s8, 8));
    static const int pair[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    const uint8_t* qs = blk + (kFive ? 48 : 16);
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const __m512i v0 = _mm512_loadu_si512(qs), v1 = _mm512_loadu_si512(qs + 64);
    q[0] = _mm512_and_si512(v0, nib);
    q[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), nib);
    q[2] = _mm512_and_si512(v1, nib);
    q[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), nib);
    const __m512i hb = kFive ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 16))) : __m512i{};
    for (int k = 0; k < 4; ++k) {
      const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16((short)pair[k][0]),
                                             _mm256_set1_epi16((short)pair[k][1]), 1);
      p[k] = _mm512_permutexvar_epi16(idx, s16);
      if (kFive) {
        const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << pair[k][0])),
                                               _mm256_set1_epi8((char)(1 << pair[k][1])), 1);
        q[k] = _mm512_mask_add_epi8(q[k], _mm512_test_epi8_mask(hb, bit), q[k], _mm512_set1_epi8(16));
      }
    }
  }
  void dot(const ActRow& x, long b, Acc& acc) const {
    const int8_t* xq = x.q + b * QKK;
    __m512i isum = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[k], _mm512_loadu_si512(xq + 64 * k)), p[k]);
    }
    const float dx = x.d[b];
    acc.v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * dx), acc.v);
    const __m128i im = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i*)(x.bs + b * 16)));
    acc.v = _mm512_fmadd_ps(zext128(_mm_cvtepi32_ps(im)), _mm512_set1_ps(-dmin * dx), acc.v);
  }
};

struct Q6KKernel {
  static constexpr int kStep = 1;
  static constexpr int kBytes = 210;
  __m512i q[4], p[4];
  __m256i sc16;
  float d;
  void load(const uint8_t* row, long b, long) {
    const uint8_t* blk = row + b * kBytes;
    d = half_to_float(load_u16(blk + 208));
    sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));
    const __m512i s16 = _mm512_zextsi256_si512(sc16);
    const __m512i nib = _mm512_set1_epi8(0x0f), top = _mm512_set1_epi8(0x30);
    const __m512i lo_shift = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2), hi_shift = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
    for (int h = 0; h < 2; ++h) {
      const __m512i ql = _mm512_loadu_si512(blk + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h)));
      q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, nib), _mm512_and_si512(_mm512_sllv_epi64(qh, lo_shift), top));
      q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), nib),
                                     _mm512_and_si512(_mm512_srlv_epi64(qh, hi_shift), top));
    }
    for (int k = 0; k < 4; ++k) {  // int16 lane t of vector k's products covers sub-block 4k + t / 8
      const __m512i idx = _mm512_add_epi16(_mm512_set1_epi16((short)(4 * k)),
                                           _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20,
                                                                              19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8,
                                                                              7, 6, 5, 4, 3, 2, 1, 0), 3));
      p[k] = _mm512_permutexvar_epi16(idx, s16);
    }
  }
  void dot(const ActRow& x, long b, Acc& acc) const {
    const int8_t* xq = x.q + b * QKK;
    // sum sc (q - 32) x = sum sc q x - 32 sum sc (sum of each 16 x)
    const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)(x.bs + b * 16))), 5);
    __m512i isum = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(corr));
    for (int k = 0; k < 4; ++k) {
      isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[k], _mm512_loadu_si512(xq + 64 * k)), p[k]);
    }
    acc.v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * x.d[b]), acc.v);
  }
};

// q5_0 / q5_1, two blocks per vector in weight order: int32 lanes 0-7 hold the first block's
// products, 8-15 the second's. Each 128-bit quarter is one half of a block's nibbles: a block's
// 16 bytes broadcast to two quarters, shifted right by 0 and 4 bits. The fifth bits are then the
// two blocks' qh words side by side, a byte mask as they stand.
template <bool kQ51>
struct Q5Kernel {
  static constexpr int kStep = 2;
  static constexpr int kBytes = kQ51 ? 24 : 22;
  __m512i q;
  __m512 dw, mw;
  void load(const uint8_t* row, long step, long nblocks) {
    const uint8_t* b0 = row + 2 * step * kBytes;
    const uint8_t* b1 = 2 * step + 1 < nblocks ? b0 + kBytes : b0;  // a lone last block: its pair is
                                                                     // multiplied by zero activations
    const int qo = kQ51 ? 8 : 6, ho = kQ51 ? 4 : 2;
    const __m512i both = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(b0 + qo))),
                                                     0xff00, _mm_loadu_si128((const __m128i*)(b1 + qo)));
    const __m512i z = _mm512_and_si512(_mm512_srlv_epi64(both, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
                                       _mm512_set1_epi8(0x0f));
    const __mmask64 high = _mm512_kunpackd((__mmask64)load_u32(b1 + ho), (__mmask64)load_u32(b0 + ho));
    q = _mm512_mask_add_epi8(z, high, z, _mm512_set1_epi8(16));
    dw = halves(b0, b1);
    if (kQ51) mw = halves(b0 + 2, b1 + 2);
  }
  // The fp16 at a in lanes 0-7 and the one at b in lanes 8-15.
  static __m512 halves(const uint8_t* a, const uint8_t* b) {
    const __m256i h = _mm256_mask_set1_epi16(_mm256_set1_epi16((short)load_u16(a)), 0xff00, (short)load_u16(b));
    return _mm512_cvtph_ps(h);
  }
  void dot(const ActRow& x, long step, Acc& acc) const {
    const __m512i init = kQ51 ? _mm512_setzero_si512() : _mm512_load_si512(x.c + 16 * step);
    const __m512i isum = _mm512_dpbusd_epi32(init, q, _mm512_loadu_si512(x.q + 64 * step));
    const __m512 scale = _mm512_mul_ps(dw, _mm512_load_ps(x.dl + 16 * step));
    acc.v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc.v);
    if (kQ51) acc.v = _mm512_fmadd_ps(mw, _mm512_load_ps(x.s + 16 * step), acc.v);
  }
};

#elif defined(PYXF_TARGET_avx2)
struct Acc {
  __m256 v;
  float s;
  void zero() {
    v = _mm256_setzero_ps();
    s = 0.0f;
  }
  float sum() const {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t) + s;
  }
};
static inline __m256i dot_u8s8_scaled(__m256i w, __m256i x, __m256i scale16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale16);
}
static inline float hsum128(__m128i v) {
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));
  return (float)_mm_cvtsi128_si32(v);
}

// q4_k / q5_k: vector s is sub-block s, in weight order.
template <bool kFive>
struct K45Kernel {
  static constexpr int kStep = 1;
  static constexpr int kBytes = kFive ? 176 : 144;
  __m256i q[8];
  int16_t sc[8];
  __m128i mins;
  float d, dmin;
  void load(const uint8_t* row, long b, long) {
    const uint8_t* blk = row + b * kBytes;
    d = half_to_float(load_u16(blk));
    dmin = half_to_float(load_u16(blk + 2));
    const __m128i s8 = k_scales_vector(blk + 4);
    _mm_storeu_si128((__m128i*)sc, _mm_cvtepu8_epi16(s8));
    mins = _mm_cvtepu8_epi16(_mm_srli_si128(s8, 8));
    k45_values<kFive>(blk, q);
  }
  void dot(const ActRow& x, long b, Acc& acc) const {
    const int8_t* xq = x.q + b * QKK;
    __m256i isum = _mm256_setzero_si256();
    for (int s = 0; s < 8; ++s) {
      isum = _mm256_add_epi32(isum, dot_u8s8_scaled(q[s], _mm256_loadu_si256((const __m256i*)(xq + 32 * s)),
                                                    _mm256_set1_epi16(sc[s])));
    }
    const float dx = x.d[b];
    acc.v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * dx), acc.v);
    const __m128i im = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i*)(x.bs + b * 16)));
    acc.s -= dmin * dx * hsum128(im);
  }
};

struct Q6KKernel {
  static constexpr int kStep = 1;
  static constexpr int kBytes = 210;
  __m256i q[8], p[8];  // vector v: weights 32v .. 32v + 31, sub-blocks 2v and 2v + 1
  __m256i sc16;
  float d;
  void load(const uint8_t* row, long b, long) {
    const uint8_t* blk = row + b * kBytes;
    d = half_to_float(load_u16(blk + 208));
    const int8_t* sc = (const int8_t*)(blk + 192);
    sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)sc));
    q6k_values(blk, q);
    for (int v = 0; v < 8; ++v) p[v] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * v + 1]), _mm_set1_epi16(sc[2 * v]));
  }
  void dot(const ActRow& x, long b, Acc& acc) const {
    const int8_t* xq = x.q + b * QKK;
    const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)(x.bs + b * 16))), 5);
    __m256i isum = _mm256_sub_epi32(_mm256_setzero_si256(), corr);
    for (int v = 0; v < 8; ++v) {
      isum = _mm256_add_epi32(isum, dot_u8s8_scaled(q[v], _mm256_loadu_si256((const __m256i*)(xq + 32 * v)), p[v]));
    }
    acc.v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * x.d[b]), acc.v);
  }
};

template <bool kQ51>
struct Q5Kernel {
  static constexpr int kStep = 1;
  static constexpr int kBytes = kQ51 ? 24 : 22;
  __m256i q;
  float d, m;
  void load(const uint8_t* row, long b, long) {
    const uint8_t* blk = row + b * kBytes;
    q = q5_values<kQ51>(blk);
    d = half_to_float(load_u16(blk));
    m = kQ51 ? half_to_float(load_u16(blk + 2)) : 0.0f;
  }
  void dot(const ActRow& x, long b, Acc& acc) const {
    __m256i isum = dot_u8s8_scaled(q, _mm256_loadu_si256((const __m256i*)(x.q + b * QK)), _mm256_set1_epi16(1));
    if (!kQ51) isum = _mm256_add_epi32(isum, _mm256_setr_epi32(x.c[b], 0, 0, 0, 0, 0, 0, 0));
    acc.v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * x.d[b]), acc.v);
    if (kQ51) acc.s += m * x.s[b];
  }
};

#else  // portable: the unpacked block, integer sums per sub-block
struct Acc {
  float v;
  void zero() { v = 0.0f; }
  float sum() const { return v; }
};

template <QuantFormat F>
struct PlainKernel {
  static constexpr FormatInfo fi = info(F);
  static constexpr int kStep = 1;
  static constexpr int kBytes = fi.bytes;
  Unpacked u;
  void load(const uint8_t* row, long b, long) { unpack<F>(row + b * kBytes, u); }
  void dot(const ActRow& x, long b, Acc& acc) const {
    const int8_t* xq = x.q + b * fi.cols;
    const float dx = x.d[b];
    for (int s = 0; s < fi.cols / fi.sub; ++s) {
      int isum = 0, xsum = 0;
      for (int i = s * fi.sub; i < (s + 1) * fi.sub; ++i) {
        isum += (int)u.q[i] * xq[i];
        xsum += xq[i];
      }
      acc.v += u.scale[s] * dx * (float)(isum - fi.zero * xsum);
      if (fi.offset) acc.v += u.offset[s] * dx * (float)xsum;
    }
  }
};
template <bool kFive>
using K45Kernel = PlainKernel<kFive ? QuantFormat::kQ5_K : QuantFormat::kQ4_K>;
using Q6KKernel = PlainKernel<QuantFormat::kQ6_K>;
template <bool kQ51>
using Q5Kernel = PlainKernel<kQ51 ? QuantFormat::kQ5_1 : QuantFormat::kQ5_0>;
#endif

// How far ahead of a weight row's use the decode GEMV asks for its lines: quant.cc's streaming
// GEMV's distance (8 KiB, measured best there). Against 4 KiB on Zen 5, SmolLM2 Q4_K_M's q4_k / q6_k
// down projections went from 0.89 to 0.96 of the q5_0 gate/up's bandwidth in the same steps
// (medians of 7 alternating processes each).
constexpr int kPrefetchBytes = 8192;

// XR activation rows x WR weight rows, all of K.
template <class B, int XR, int WR>
void gemv_tile(const ActRow* x, const uint8_t* w, long row_bytes, long nblocks, float* y, long ldy,
               const float* bias, bool accumulate) {
  Acc acc[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) acc[i][j].zero();
  const long steps = (nblocks + B::kStep - 1) / B::kStep;
  for (long st = 0; st < steps; ++st) {
    for (int j = 0; j < WR; ++j) {
      const uint8_t* row = w + j * row_bytes;
#if defined(PYXF_TARGET_avx512) || defined(PYXF_TARGET_avx2)
      // Decode reads each weight once from memory: every cache line of the step, well ahead of use.
      const char* ahead = (const char*)(row + st * B::kStep * B::kBytes + kPrefetchBytes);
      for (int off = 0; off < B::kStep * B::kBytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
#endif
      B blk;
      blk.load(row, st, nblocks);
      for (int i = 0; i < XR; ++i) blk.dot(x[i], st, acc[i][j]);
    }
  }
  for (int i = 0; i < XR; ++i) {
    for (int j = 0; j < WR; ++j) {
      float v = acc[i][j].sum();
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

template <class B, int WR>
void gemv_rows(const ActRow* x, long M, const uint8_t* w, long row_bytes, long nblocks, float* y, long ldy,
               const float* bias, bool accumulate) {
  long m = 0;
  for (; m + kXR <= M; m += kXR) gemv_tile<B, kXR, WR>(x + m, w, row_bytes, nblocks, y + m * ldy, ldy, bias, accumulate);
  for (; m < M; ++m) gemv_tile<B, 1, WR>(x + m, w, row_bytes, nblocks, y + m * ldy, ldy, bias, accumulate);
}

template <QuantFormat F>
struct KernelFor;
template <> struct KernelFor<QuantFormat::kQ5_0> { using type = Q5Kernel<false>; };
template <> struct KernelFor<QuantFormat::kQ5_1> { using type = Q5Kernel<true>; };
template <> struct KernelFor<QuantFormat::kQ4_K> { using type = K45Kernel<false>; };
template <> struct KernelFor<QuantFormat::kQ5_K> { using type = K45Kernel<true>; };
template <> struct KernelFor<QuantFormat::kQ6_K> { using type = Q6KKernel; };

// Few rows (decode): each weight row read once, kWR at a time, against all M activation rows.
template <QuantFormat F>
void gemv(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate) {
  using B = typename KernelFor<F>::type;
  const long K = w.cols, N = w.rows, nblocks = K / info(F).cols;
  const long row_bytes = quant_row_bytes(F, K), abytes = (act_row_bytes(F, K) + 63) / 64 * 64;
  uint8_t* buf = (uint8_t*)aligned_alloc(64, (size_t)(abytes * M));
  ActRow* rows = (ActRow*)malloc(sizeof(ActRow) * M);
  for (long m = 0; m < M; ++m) rows[m] = quantize_act_row<F>(x + m * K, K, buf + m * abytes);
  const long groups = (N + kWR - 1) / kWR;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (long g = 0; g < groups; ++g) {
    const long n = g * kWR;
    const uint8_t* wn = w.data + n * row_bytes;
    const float* bn = bias ? bias + n : nullptr;
    switch (lmin(kWR, N - n)) {
      case 4: gemv_rows<B, 4>(rows, M, wn, row_bytes, nblocks, y + n, N, bn, accumulate); break;
      case 3: gemv_rows<B, 3>(rows, M, wn, row_bytes, nblocks, y + n, N, bn, accumulate); break;
      case 2: gemv_rows<B, 2>(rows, M, wn, row_bytes, nblocks, y + n, N, bn, accumulate); break;
      default: gemv_rows<B, 1>(rows, M, wn, row_bytes, nblocks, y + n, N, bn, accumulate); break;
    }
  }
  free(rows);
  free(buf);
}

#if defined(PYXF_TARGET_avx512)
// ---- Many rows on AVX-512 VNNI: an int8 GEMM on repacked panels ----
// 32 weight rows (output columns) at a time are unpacked into a panel vpdpbusd reads directly:
// per block of 32 k, two halves of [8 k/4][16 columns][4] unsigned bytes (the stored integers q),
// and per sub-block and column the scale and (q4_k, q5_k, q5_1) the offset. Activation tiles of
// kRows rows hold per block [8 k/4][row][4] signed bytes; per sub-block and row the scale, the
// zero-point correction -zero * sum(x) (added to the integer sums) and, per block of 32, scale * sum.
constexpr int kCols = 32;
constexpr int kRows = 8;

struct Panel {
  uint8_t* w;   // [K / 32][2][8][16][4]
  float* sc;    // [K / sub][32]
  float* off;   // [K / 32][32]
  explicit Panel(long K) {
    w = (uint8_t*)aligned_alloc(64, (size_t)K * kCols);
    sc = (float*)aligned_alloc(64, sizeof(float) * (size_t)(K / 16 + K / QK) * kCols);
    off = sc + (K / 16) * kCols;
  }
  ~Panel() {
    free(sc);
    free(w);
  }
};

// pack_panel from a q5_0, q5_1 or K-quant matrix's strips (decoders'; n0 at a strip): each 16-column half
// of a block of 32 is the strip's 8 value vectors, its scales and offsets the strip's.
void pack_panel_from_strips(const QuantWeight& w, long n0, int ncols, Panel& p) {
  const long nblocks = w.cols / QK;
  const int per_block = QK / info(w.format).sub;  // scales per block of 32
  for (int half = 0; half < 2; ++half) {
    const int live = imax(0, imin(kStripRows, ncols - kStripRows * half));
    const long s = n0 / kStripRows + half;
    for (long b = 0; b < nblocks; ++b) {
      __m512i v[8];
      if (live) {
        strip_block_values(w, s, b, (__mmask16)((1u << live) - 1), v);
      } else {
        for (__m512i& x : v) x = _mm512_setzero_si512();
      }
      for (int kk = 0; kk < 8; ++kk) _mm512_store_si512(p.w + b * 1024 + half * 512 + kk * 64, v[kk]);
      for (int u = b * per_block; u < (b + 1) * per_block; ++u) {
        for (int c = 0; c < kStripRows; ++c) {
          float scale = 0.0f, offset = 0.0f;
          if (c < live) strip_block_scale(w, s, u, c, &scale, &offset);
          p.sc[u * kCols + half * kStripRows + c] = scale;
          if (u % per_block == 0) p.off[b * kCols + half * kStripRows + c] = offset;
        }
      }
    }
  }
}

template <QuantFormat F>
void pack_panel(const QuantWeight& w, long n0, int ncols, Panel& p) {
  // From the strips where the panel starts at one (else from the rows, as pack_vnni: [gate; up]'s
  // up half, I % 16 != 0).
  if constexpr (strip_format(F)) {
    if (has_strips(w) && n0 % kStripRows == 0) {
      pack_panel_from_strips(w, n0, ncols, p);
      return;
    }
  }
  constexpr FormatInfo fi = info(F);
  const long K = w.cols, row_bytes = quant_row_bytes(F, K), nsub = K / fi.sub;
  Unpacked u;
  for (int c = 0; c < kCols; ++c) {
    uint8_t* dst = p.w + (c / 16) * (8 * 64) + (c % 16) * 4;
    if (c >= ncols) {  // absent columns: zero weights, zero scales
      for (long b = 0; b < K / QK; ++b)
        for (int kk = 0; kk < 8; ++kk) memset(dst + b * 1024 + kk * 64, 0, 4);
      for (long s = 0; s < nsub; ++s) p.sc[s * kCols + c] = 0.0f;
      for (long b = 0; b < K / QK; ++b) p.off[b * kCols + c] = 0.0f;
      continue;
    }
    const uint8_t* row = w.data + (n0 + c) * row_bytes;
    for (long blk = 0; blk < K / fi.cols; ++blk) {
      unpack<F>(row + blk * fi.bytes, u);
      for (int g = 0; g < fi.cols / QK; ++g) {
        const long b = blk * (fi.cols / QK) + g;
        for (int kk = 0; kk < 8; ++kk) memcpy(dst + b * 1024 + kk * 64, u.q + g * QK + kk * 4, 4);
        if (fi.offset) p.off[b * kCols + c] = u.offset[g];
      }
      for (int s = 0; s < fi.cols / fi.sub; ++s) p.sc[(blk * (fi.cols / fi.sub) + s) * kCols + c] = u.scale[s];
    }
  }
}

struct TileActs {
  int8_t* q;     // [tiles][K / 32][8][kRows][4]
  float* dx;     // [tiles][K / sub][kRows]
  int32_t* c;    // [tiles][K / sub][kRows]
  float* s;      // [tiles][K / 32][kRows]
  long tiles, K, nsub;
  void free_all() {
    free(q);
    free(dx);
  }
};

template <QuantFormat F>
TileActs quantize_tiles(const float* x, long M, long K) {
  constexpr FormatInfo fi = info(F);
  constexpr int R = kRows;
  TileActs a;
  a.K = K;
  a.nsub = K / fi.sub;
  a.tiles = (M + R - 1) / R;
  const long nb = K / QK, nsub = a.nsub;
  a.q = (int8_t*)aligned_alloc(64, (size_t)(a.tiles * R * K + 63) / 64 * 64);
  const size_t floats = (size_t)a.tiles * R * (2 * nsub + nb);
  a.dx = (float*)aligned_alloc(64, (sizeof(float) * floats + 63) / 64 * 64);
  a.c = (int32_t*)(a.dx + a.tiles * R * nsub);
  a.s = (float*)(a.c + a.tiles * R * nsub);
#pragma omp parallel
  {
    int8_t* q = (int8_t*)malloc(K + 64);
    float* d = (float*)malloc(sizeof(float) * (K / QK + 1));
    int32_t* sum16 = (int32_t*)malloc(sizeof(int32_t) * (K / 16 + 1));
#pragma omp for schedule(static)
    for (long m = 0; m < a.tiles * R; ++m) {
      const long t = m / R;
      const int i = (int)(m % R);
      if (m < M) {
        quantize_act(x + m * K, K, fi.cols, q, d, sum16);
      } else {  // padding rows: zeros
        memset(q, 0, K);
        for (long b = 0; b < K / fi.cols; ++b) d[b] = 0.0f;
        for (long g = 0; g < K / 16; ++g) sum16[g] = 0;
      }
      int8_t* tq = a.q + t * R * K;
      for (long b = 0; b < nb; ++b) {
        for (int kk = 0; kk < 8; ++kk) memcpy(tq + b * QK * R + (kk * R + i) * 4, q + b * QK + kk * 4, 4);
        const float dx = d[b * QK / fi.cols];
        a.s[(t * nb + b) * R + i] = dx * (float)(sum16[2 * b] + sum16[2 * b + 1]);
      }
      for (long s = 0; s < nsub; ++s) {
        const int sum = fi.sub == 16 ? sum16[s] : sum16[2 * s] + sum16[2 * s + 1];
        a.dx[(t * nsub + s) * R + i] = d[s * fi.sub / fi.cols];
        a.c[(t * nsub + s) * R + i] = -fi.zero * sum;
      }
    }
    free(sum16);
    free(d);
    free(q);
  }
  return a;
}

// kRows activation rows (of tile t) x 32 columns. The int32 sums of a sub-block live in registers,
// the float sums in L1 (fa), touched once per sub-block.
template <QuantFormat F>
void k_tile(const TileActs& a, long t, const Panel& p, float* y, long ldy, int rows, int ncols, const float* bias,
            bool accumulate) {
  constexpr FormatInfo fi = info(F);
  constexpr int R = kRows, kSteps = fi.sub / 4;
  alignas(64) float fa[R][kCols];
  for (int i = 0; i < R; ++i) {
    _mm512_store_ps(fa[i], _mm512_setzero_ps());
    _mm512_store_ps(fa[i] + 16, _mm512_setzero_ps());
  }
  const long K = a.K, nsub = a.nsub;
  const int8_t* xq = a.q + t * R * K;
  const float* xd = a.dx + t * R * nsub;
  const int32_t* xc = a.c + t * R * nsub;
  const float* xs = a.s + t * R * (K / QK);
  for (long s = 0; s < nsub; ++s) {
    const long b = s * fi.sub / QK;
    const int kk0 = (int)(s * fi.sub % QK) / 4;
    const uint8_t* wb = p.w + b * 1024 + kk0 * 64;
    const int8_t* xb = xq + b * QK * R + kk0 * 4 * R;
    __m512i ia[R][2];
    for (int i = 0; i < R; ++i) ia[i][0] = ia[i][1] = fi.zero ? _mm512_set1_epi32(xc[s * R + i]) : _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int kk = 0; kk < kSteps; ++kk) {
      const __m512i w0 = _mm512_load_si512(wb + kk * 64), w1 = _mm512_load_si512(wb + 512 + kk * 64);
      for (int i = 0; i < R; ++i) {
        int32_t four;
        memcpy(&four, xb + (kk * R + i) * 4, 4);
        const __m512i xi = _mm512_set1_epi32(four);
        ia[i][0] = _mm512_dpbusd_epi32(ia[i][0], w0, xi);
        ia[i][1] = _mm512_dpbusd_epi32(ia[i][1], w1, xi);
      }
    }
    const __m512 sc0 = _mm512_load_ps(p.sc + s * kCols), sc1 = _mm512_load_ps(p.sc + s * kCols + 16);
    for (int i = 0; i < R; ++i) {
      const __m512 dx = _mm512_set1_ps(xd[s * R + i]);
      __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][0]), _mm512_mul_ps(sc0, dx), _mm512_load_ps(fa[i]));
      __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][1]), _mm512_mul_ps(sc1, dx), _mm512_load_ps(fa[i] + 16));
      if (fi.offset) {  // sub-blocks of 32: s == b
        const __m512 sx = _mm512_set1_ps(xs[b * R + i]);
        f0 = _mm512_fmadd_ps(_mm512_load_ps(p.off + b * kCols), sx, f0);
        f1 = _mm512_fmadd_ps(_mm512_load_ps(p.off + b * kCols + 16), sx, f1);
      }
      _mm512_store_ps(fa[i], f0);
      _mm512_store_ps(fa[i] + 16, f1);
    }
  }
  const __mmask16 k0 = (__mmask16)((1u << imin(16, ncols)) - 1);
  const __mmask16 k1 = (__mmask16)((1u << imax(0, ncols - 16)) - 1);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + 16) : _mm512_setzero_ps();
  for (int i = 0; i < rows; ++i) {
    float* yr = y + i * ldy;
    __m512 v0 = _mm512_add_ps(_mm512_load_ps(fa[i]), b0), v1 = _mm512_add_ps(_mm512_load_ps(fa[i] + 16), b1);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, yr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, yr + 16));
    }
    _mm512_mask_storeu_ps(yr, k0, v0);
    _mm512_mask_storeu_ps(yr + 16, k1, v1);
  }
}

template <QuantFormat F>
void gemm(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate) {
  const long N = w.rows;
  TileActs a = quantize_tiles<F>(x, M, w.cols);
  const long chunks = (N + kCols - 1) / kCols;
#pragma omp parallel
  {
    Panel panel(w.cols);
#pragma omp for schedule(dynamic, 1)
    for (long ch = 0; ch < chunks; ++ch) {
      const long n0 = ch * kCols;
      const int ncols = (int)lmin(kCols, N - n0);
      pack_panel<F>(w, n0, ncols, panel);
      const float* bn = bias ? bias + n0 : nullptr;
      for (long t = 0; t < a.tiles; ++t) {
        k_tile<F>(a, t, panel, y + t * kRows * N + n0, N, (int)lmin(kRows, M - t * kRows), ncols, bn, accumulate);
      }
    }
  }
  a.free_all();
}

// y[M, I] = act(x gate^T) * (x up^T), w = [gate; up]: gate and up columns of a chunk go to a tile
// in L1 and only the product is written.
template <QuantFormat F>
void gemm_gated(const float* x, long M, const QuantWeight& w, Activation act, float* y) {
  constexpr int R = kRows;
  const long I = w.rows / 2;
  TileActs a = quantize_tiles<F>(x, M, w.cols);
  const long chunks = (I + kCols - 1) / kCols;
#pragma omp parallel
  {
    Panel gate(w.cols), up(w.cols);
    alignas(64) float gu[R][2 * kCols];
#pragma omp for schedule(dynamic, 1)
    for (long ch = 0; ch < chunks; ++ch) {
      const long n0 = ch * kCols;
      const int ncols = (int)lmin(kCols, I - n0);
      pack_panel<F>(w, n0, ncols, gate);
      pack_panel<F>(w, I + n0, ncols, up);
      for (long t = 0; t < a.tiles; ++t) {
        const int rows = (int)lmin(R, M - t * R);
        k_tile<F>(a, t, gate, gu[0], 2 * kCols, rows, ncols, nullptr, false);
        k_tile<F>(a, t, up, gu[0] + kCols, 2 * kCols, rows, ncols, nullptr, false);
        for (int i = 0; i < rows; ++i) gated_activation_row(gu[i], gu[i] + kCols, ncols, act, y + (t * R + i) * I + n0);
      }
    }
  }
  a.free_all();
}

#else
// ---- Many rows elsewhere: dequantized slices of weight rows and the packed float GEMM ----
// The activations are first rounded to their 8-bit block values, so the arithmetic is that of the
// integer kernels.
template <QuantFormat F>
void gemm(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate) {
  constexpr FormatInfo fi = info(F);
  const long K = w.cols, N = w.rows, slice = 1024, nb = K / fi.cols;
  float* xr = (float*)aligned_alloc(64, (sizeof(float) * M * K + 63) / 64 * 64);
#pragma omp parallel
  {
    int8_t* q = (int8_t*)malloc(K + 64);
    float* d = (float*)malloc(sizeof(float) * (nb + 1));
    int32_t* sum16 = (int32_t*)malloc(sizeof(int32_t) * (K / 16 + 1));
#pragma omp for schedule(static)
    for (long m = 0; m < M; ++m) {
      quantize_act(x + m * K, K, fi.cols, q, d, sum16);
      for (long i = 0; i < K; ++i) xr[m * K + i] = d[i / fi.cols] * (float)q[i];
    }
    free(sum16);
    free(d);
    free(q);
  }
  float* buf = (float*)aligned_alloc(64, sizeof(float) * slice * K);
  for (long n0 = 0; n0 < N; n0 += slice) {
    const long nc = lmin(slice, N - n0);
#pragma omp parallel for schedule(static)
    for (long r = 0; r < nc; ++r) dequantize_row_f<F>(w, n0 + r, buf + r * K);
    linear_strided(xr, M, K, buf, nc, bias ? bias + n0 : nullptr, y + n0, N, accumulate);
  }
  free(buf);
  free(xr);
}
#endif

template <QuantFormat F>
void linear_f(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate) {
  if (M >= kQuantGemmRows) {
    gemm<F>(x, M, w, bias, y, accumulate);
  } else {
    gemv<F>(x, M, w, bias, y, accumulate);
  }
}

}  // namespace

// Entry points for quant.cc's dispatch (formats with is_quant_k_format).
void linear_quant_k(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate) {
  switch (w.format) {
    case QuantFormat::kQ5_0: linear_f<QuantFormat::kQ5_0>(x, M, w, bias, y, accumulate); break;
    case QuantFormat::kQ5_1: linear_f<QuantFormat::kQ5_1>(x, M, w, bias, y, accumulate); break;
    case QuantFormat::kQ4_K: linear_f<QuantFormat::kQ4_K>(x, M, w, bias, y, accumulate); break;
    case QuantFormat::kQ5_K: linear_f<QuantFormat::kQ5_K>(x, M, w, bias, y, accumulate); break;
    case QuantFormat::kQ6_K:
    default: linear_f<QuantFormat::kQ6_K>(x, M, w, bias, y, accumulate); break;
  }
}

#if defined(PYXF_TARGET_avx512)
// M >= kQuantGemmRows.
void linear_quant_gated_k(const float* x, long M, const QuantWeight& w, Activation act, float* y) {
  switch (w.format) {
    case QuantFormat::kQ5_0: gemm_gated<QuantFormat::kQ5_0>(x, M, w, act, y); break;
    case QuantFormat::kQ5_1: gemm_gated<QuantFormat::kQ5_1>(x, M, w, act, y); break;
    case QuantFormat::kQ4_K: gemm_gated<QuantFormat::kQ4_K>(x, M, w, act, y); break;
    case QuantFormat::kQ5_K: gemm_gated<QuantFormat::kQ5_K>(x, M, w, act, y); break;
    case QuantFormat::kQ6_K:
    default: gemm_gated<QuantFormat::kQ6_K>(x, M, w, act, y); break;
  }
}
#endif

void dequantize_row_k(const QuantWeight& w, long row, float* out) {
  switch (w.format) {
    case QuantFormat::kQ5_0: dequantize_row_f<QuantFormat::kQ5_0>(w, row, out); break;
    case QuantFormat::kQ5_1: dequantize_row_f<QuantFormat::kQ5_1>(w, row, out); break;
    case QuantFormat::kQ4_K: dequantize_row_f<QuantFormat::kQ4_K>(w, row, out); break;
    case QuantFormat::kQ5_K: dequantize_row_f<QuantFormat::kQ5_K>(w, row, out); break;
    case QuantFormat::kQ6_K:
    default: dequantize_row_f<QuantFormat::kQ6_K>(w, row, out); break;
  }
}

}  // namespace pyxf::kernels::PYXF_TARGET_NS
