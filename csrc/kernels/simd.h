// One float vector type per compile target. Included only by kernel sources, which are compiled
// once per target with PYXF_TARGET_<name> and PYXF_TARGET_NS defined by the build.
//
// Kernel sources use no C++ standard library templates: inline functions instantiated with
// AVX-512 flags must not be picked by the linker for a generic caller.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

namespace pyxf::kernels::PYXF_TARGET_NS {

// Asks for every cache line of [p, p + bytes) (into L1) without waiting for them. An asm
// statement: GCC deletes a loop that does nothing but __builtin_prefetch as a loop without effects.
static inline void prefetch_lines(const void* p, long bytes) {
  const char* c = static_cast<const char*>(p);
  for (long b = 0; b < bytes; b += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(c[b]));
#else
    __builtin_prefetch(c + b, 0, 3);
#endif
  }
}

// Asks for the cache line of p in a state that lets this core write it, without waiting.
static inline void prefetch_line_for_write(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, 3);
#endif
}

#if defined(PYXF_TARGET_avx512)

constexpr int kLanes = 16;
struct Vf { __m512 v; };
static inline Vf vzero() { return {_mm512_setzero_ps()}; }
static inline Vf vset1(float x) { return {_mm512_set1_ps(x)}; }
static inline Vf vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void vstore(float* p, Vf a) { _mm512_storeu_ps(p, a.v); }
static inline Vf vload_n(const float* p, int n) {
  return {_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p)};
}
static inline void vstore_n(float* p, Vf a, int n) {
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), a.v);
}
static inline Vf vadd(Vf a, Vf b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline Vf vsub(Vf a, Vf b) { return {_mm512_sub_ps(a.v, b.v)}; }
static inline Vf vmul(Vf a, Vf b) { return {_mm512_mul_ps(a.v, b.v)}; }
static inline Vf vdiv(Vf a, Vf b) { return {_mm512_div_ps(a.v, b.v)}; }
static inline Vf vmax(Vf a, Vf b) { return {_mm512_max_ps(a.v, b.v)}; }
static inline Vf vmin(Vf a, Vf b) { return {_mm512_min_ps(a.v, b.v)}; }
static inline Vf vabs(Vf a) { return {_mm512_abs_ps(a.v)}; }
static inline Vf vfma(Vf a, Vf b, Vf c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline Vf vcopysign(Vf mag, Vf sign) {
  const __m512i m = _mm512_set1_epi32(0x80000000);
  return {_mm512_castsi512_ps(_mm512_or_si512(
      _mm512_andnot_si512(m, _mm512_castps_si512(mag.v)),
      _mm512_and_si512(m, _mm512_castps_si512(sign.v))))};
}
// Lanes below n from a, the rest from b.
static inline Vf vselect_n(Vf a, Vf b, int n) { return {_mm512_mask_blend_ps((__mmask16)((1u << n) - 1), b.v, a.v)}; }
static inline float vsum(Vf a) { return _mm512_reduce_add_ps(a.v); }
static inline float vmaxr(Vf a) { return _mm512_reduce_max_ps(a.v); }
// 2^n for integral-valued n.
static inline Vf vpow2i(Vf n, Vf p) { return {_mm512_scalef_ps(p.v, n.v)}; }
static inline Vf vround(Vf a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// Lane i = p[i * stride] (stride in floats, i * stride within int32).
static inline Vf vgather(const float* p, long stride) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32((int)stride));
  return {_mm512_i32gather_ps(idx, p, 4)};
}
// Rows 0-15 of 16 floats in r become its columns: r[c][i] = old r[i][c]. Pairs of rows interleave
// (unpack ps), then quads (unpack pd), leaving in each 128-bit lane L of u[4g + k] column 4L + k of
// rows 4g .. 4g + 3; two rounds of 128-bit lane shuffles gather each column's four lanes.
static inline void transpose_16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x44), v2 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xee);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x44), w2 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xee);
    r[k] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
    r[8 + k] = _mm512_shuffle_f32x4(v2, w2, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(v2, w2, 0xdd);
  }
}
// out[c * ld_out + i] = src[i * ld_src + c] for i, c < kLanes: a block of 32-bit elements transposed
// in registers (64 shuffles where 16 gathers would load element by element).
static inline void vtranspose_block(const float* src, long ld_src, float* out, long ld_out) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  transpose_16x16(r);
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(out + c * ld_out, r[c]);
}

#elif defined(PYXF_TARGET_avx2)

constexpr int kLanes = 8;
struct Vf { __m256 v; };
static inline __m256i tail_mask(int n) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256((const __m256i*)(table + 8 - n));
}
static inline Vf vzero() { return {_mm256_setzero_ps()}; }
static inline Vf vset1(float x) { return {_mm256_set1_ps(x)}; }
static inline Vf vload(const float* p) { return {_mm256_loadu_ps(p)}; }
static inline void vstore(float* p, Vf a) { _mm256_storeu_ps(p, a.v); }
static inline Vf vload_n(const float* p, int n) { return {_mm256_maskload_ps(p, tail_mask(n))}; }
static inline void vstore_n(float* p, Vf a, int n) { _mm256_maskstore_ps(p, tail_mask(n), a.v); }
static inline Vf vselect_n(Vf a, Vf b, int n) { return {_mm256_blendv_ps(b.v, a.v, _mm256_castsi256_ps(tail_mask(n)))}; }
static inline Vf vadd(Vf a, Vf b) { return {_mm256_add_ps(a.v, b.v)}; }
static inline Vf vsub(Vf a, Vf b) { return {_mm256_sub_ps(a.v, b.v)}; }
static inline Vf vmul(Vf a, Vf b) { return {_mm256_mul_ps(a.v, b.v)}; }
static inline Vf vdiv(Vf a, Vf b) { return {_mm256_div_ps(a.v, b.v)}; }
static inline Vf vmax(Vf a, Vf b) { return {_mm256_max_ps(a.v, b.v)}; }
static inline Vf vmin(Vf a, Vf b) { return {_mm256_min_ps(a.v, b.v)}; }
static inline Vf vabs(Vf a) {
  return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)};
}
static inline Vf vfma(Vf a, Vf b, Vf c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
static inline Vf vcopysign(Vf mag, Vf sign) {
  const __m256 m = _mm256_set1_ps(-0.0f);
  return {_mm256_or_ps(_mm256_andnot_ps(m, mag.v), _mm256_and_ps(m, sign.v))};
}
static inline float vsum(Vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float vmaxr(Vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline Vf vpow2i(Vf n, Vf p) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(e))};
}
static inline Vf vround(Vf a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
static inline Vf vgather(const float* p, long stride) {
  const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32((int)stride));
  return {_mm256_i32gather_ps(p, idx, 4)};
}

#else  // portable: plain loops the compiler vectorizes for the baseline ISA

constexpr int kLanes = 8;
struct Vf { float v[kLanes]; };
#define PYXF_LANEWISE(expr) \
  Vf r;                     \
  for (int i = 0; i < kLanes; ++i) r.v[i] = (expr); \
  return r
static inline Vf vzero() { PYXF_LANEWISE(0.0f); }
static inline Vf vset1(float x) { PYXF_LANEWISE(x); }
static inline Vf vload(const float* p) { PYXF_LANEWISE(p[i]); }
static inline void vstore(float* p, Vf a) { for (int i = 0; i < kLanes; ++i) p[i] = a.v[i]; }
static inline Vf vload_n(const float* p, int n) { PYXF_LANEWISE(i < n ? p[i] : 0.0f); }
static inline void vstore_n(float* p, Vf a, int n) { for (int i = 0; i < n; ++i) p[i] = a.v[i]; }
static inline Vf vselect_n(Vf a, Vf b, int n) { PYXF_LANEWISE(i < n ? a.v[i] : b.v[i]); }
static inline Vf vadd(Vf a, Vf b) { PYXF_LANEWISE(a.v[i] + b.v[i]); }
static inline Vf vsub(Vf a, Vf b) { PYXF_LANEWISE(a.v[i] - b.v[i]); }
static inline Vf vmul(Vf a, Vf b) { PYXF_LANEWISE(a.v[i] * b.v[i]); }
static inline Vf vdiv(Vf a, Vf b) { PYXF_LANEWISE(a.v[i] / b.v[i]); }
static inline Vf vmax(Vf a, Vf b) { PYXF_LANEWISE(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
static inline Vf vmin(Vf a, Vf b) { PYXF_LANEWISE(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
static inline Vf vabs(Vf a) { PYXF_LANEWISE(fabsf(a.v[i])); }
static inline Vf vfma(Vf a, Vf b, Vf c) { PYXF_LANEWISE(a.v[i] * b.v[i] + c.v[i]); }
static inline Vf vcopysign(Vf mag, Vf sign) { PYXF_LANEWISE(copysignf(mag.v[i], sign.v[i])); }
static inline Vf vpow2i(Vf n, Vf p) { PYXF_LANEWISE(ldexpf(p.v[i], (int)n.v[i])); }
static inline Vf vround(Vf a) { PYXF_LANEWISE(nearbyintf(a.v[i])); }
static inline Vf vgather(const float* p, long stride) { PYXF_LANEWISE(p[i * stride]); }
#undef PYXF_LANEWISE
static inline float vsum(Vf a) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += a.v[i];
  return s;
}
static inline float vmaxr(Vf a) {
  float m = a.v[0];
  for (int i = 1; i < kLanes; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}

#endif

#if !defined(PYXF_TARGET_avx512)
// out[c * ld_out + i] = src[i * ld_src + c] for i, c < kLanes, by gathers.
static inline void vtranspose_block(const float* src, long ld_src, float* out, long ld_out) {
  for (int c = 0; c < kLanes; ++c) vstore(out + c * ld_out, vgather(src + c, ld_src));
}
#endif


// ---- 16-bit weight storage: bfloat16 and IEEE half, widened to float on load ----
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

static inline float to_f32(float x) { return x; }
static inline float to_f32(bf16 x) {
  const uint32_t bits = (uint32_t)x.bits << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
static inline float to_f32(f16 x) {
#if defined(PYXF_TARGET_avx2) || defined(PYXF_TARGET_avx512)
  return _cvtsh_ss(x.bits);
#else
  const uint16_t h = x.bits;
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 113;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

// IEEE half of a float, rounded to nearest even (overflow to infinity, NaN stays NaN).
static inline f16 to_f16(float f) {
#if defined(PYXF_TARGET_avx2) || defined(PYXF_TARGET_avx512)
  return {(uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
#else
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000, a = x & 0x7fffffff;
  if (a >= 0x7f800000) return {(uint16_t)(sign | 0x7c00 | (a > 0x7f800000 ? 0x200 : 0))};
  if (a >= 0x477ff000) return {(uint16_t)(sign | 0x7c00)};  // 65520 and up round past 65504
  const auto round = [](uint32_t q, uint32_t rem, uint32_t half) {
    return rem > half || (rem == half && (q & 1)) ? q + 1 : q;
  };
  if (a >= 0x38800000) {  // normal: exponent rebased from 127 to 15, 13 mantissa bits rounded off
    return {(uint16_t)(sign | round((a - 0x38000000) >> 13, a & 0x1fff, 0x1000))};
  }
  const int e = (int)(a >> 23);  // subnormal half: units of 2^-24
  if (e < 102) return {(uint16_t)sign};  // below 2^-25
  const uint32_t m = (a & 0x7fffff) | 0x800000, shift = 126 - e;
  return {(uint16_t)(sign | round(m >> shift, m & ((1u << shift) - 1), 1u << (shift - 1)))};
#endif
}

#if defined(PYXF_TARGET_avx512)
static inline Vf vload(const bf16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
static inline Vf vload(const f16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
static inline Vf vload_n(const bf16* p, int n) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
static inline Vf vload_n(const f16* p, int n) {
  return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p))};
}
static inline void vstore(f16* p, Vf a) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(PYXF_TARGET_avx2)
static inline Vf vload(const bf16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
static inline Vf vload(const f16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
static inline void vstore(f16* p, Vf a) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename H>
static inline Vf vload_n(const H* p, int n) {
  H tmp[kLanes] = {};
  memcpy(tmp, p, sizeof(H) * n);
  return vload(tmp);
}
#else
template <typename H>
static inline Vf vload(const H* p) {
  Vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = to_f32(p[i]);
  return r;
}
template <typename H>
static inline Vf vload_n(const H* p, int n) {
  Vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = i < n ? to_f32(p[i]) : 0.0f;
  return r;
}
static inline void vstore(f16* p, Vf a) {
  for (int i = 0; i < kLanes; ++i) p[i] = to_f16(a.v[i]);
}
#endif

// e^x with a relative error of a few ulp: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial.
static inline Vf vexp(Vf x) {
  // The lower clamp keeps n >= -125, so the result (>= 2^-125 e^(-ln2/2)) is never subnormal:
  // subnormal results and operands cost a microcode assist each on x86.
  x = vmax(vmin(x, vset1(88.3762626647949f)), vset1(-86.6f));
  const Vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  Vf r = vfma(n, vset1(-0.693359375f), x);  // ln2 split in two for an exact product
  r = vfma(n, vset1(2.12194440e-4f), r);
  Vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.0f)));
  return vpow2i(n, p);
}

// erf(x), absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26).
static inline Vf verf(Vf x) {
  const Vf a = vabs(x);
  const Vf t = vdiv(vset1(1.0f), vfma(vset1(0.3275911f), a, vset1(1.0f)));
  Vf p = vset1(1.061405429f);
  p = vfma(p, t, vset1(-1.453152027f));
  p = vfma(p, t, vset1(1.421413741f));
  p = vfma(p, t, vset1(-0.284496736f));
  p = vfma(p, t, vset1(0.254829592f));
  p = vmul(p, t);
  const Vf e = vexp(vsub(vzero(), vmul(a, a)));
  return vcopysign(vsub(vset1(1.0f), vmul(p, e)), x);
}

// tanh(x) = 1 - 2 / (e^{2x} + 1), evaluated on |x| and given the sign of x.
static inline Vf vtanh(Vf x) {
  const Vf e = vexp(vmul(vset1(2.0f), vabs(x)));
  const Vf t = vsub(vset1(1.0f), vdiv(vset1(2.0f), vadd(e, vset1(1.0f))));
  return vcopysign(t, x);
}

// Soft-capping (Gemma 2): cap * tanh(x / cap), given cap and 1 / cap.
static inline Vf vsoftcap(Vf x, Vf cap, Vf inv_cap) { return vmul(cap, vtanh(vmul(x, inv_cap))); }

// max |x| of n floats (a multiple of kLanes), for quantizing them by max / 127; *finite says whether
// all are finite. max drops NaNs, so they are looked for apart: x - x is 0, or NaN for inf or NaN.
static inline float vabsmax(const float* x, int n, bool* finite) {
  Vf amax = vzero(), nonfinite = vzero();
  for (int i = 0; i < n; i += kLanes) {
    const Vf v = vload(x + i);
    amax = vmax(amax, vabs(v));
    nonfinite = vadd(nonfinite, vsub(v, v));
  }
  *finite = vsum(nonfinite) == 0.0f;  // false for NaN
  return vmaxr(amax);
}

// body(i) for i in [0, n): shared among a new team's threads when `parallel`, else on the calling
// thread. `#pragma omp parallel for if (c)` enters the OpenMP runtime even when c is false (a team of
// one: 0.23 us a call on the AMX Xeon, against 1.0 us for a real region), which the small kernels
// of a decode step (norms, residual adds, RoPE, cache stores: ~8 a layer) paid on every call.
template <class Body>
static inline void for_each_index(long n, bool parallel, const Body& body) {
  if (parallel) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; ++i) body(i);
  } else {
    for (long i = 0; i < n; ++i) body(i);
  }
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }
static inline long lmin(long a, long b) { return a < b ? a : b; }

}  // namespace pyxf::kernels::PYXF_TARGET_NS
