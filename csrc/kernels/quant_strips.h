// Quantized matrices repacked at load into strips of 16 rows (PanelLayout::kStrips), the layout the
// AVX-512 decode GEMV reads (quant_strips.cc) and the many-rows GEMM packs its panels from.
//
// A strip holds rows 16 s .. 16 s + 15 of an int8, q8_0, q4_0, q4_1, q5_0 or q5_1 matrix (rows past
// the matrix: zero weights, scale 0), block after block of 32 columns:
//   quants  [nblocks][vectors][16 rows][4 bytes]: vector g < groups is bytes 4g .. 4g + 3 of each
//           row's block, so one 64-byte load is a vpdpbusd operand for 16 rows at once. int8 and
//           q8_0: 8 groups, the bytes stored as w + 128 (unsigned, as vpdpbusd multiplies them); the others
//           4 groups of the stored nibble bytes (low nibbles: columns 4g .., high nibbles: 16 + 4g ..;
//           values w + 8, q5_0 w + 16 with its fifth bits), and q5_0 / q5_1 a fifth vector, each
//           row's 32 fifth bits: byte i of its dword has bit g for column 4g + i and bit 4 + g for
//           column 16 + 4g + i, so group g's bits reach bit 4 of their bytes by one shift;
//   scales  [nblocks][16 rows] fp16, after all the quants; q4_1 and q5_1 then their offsets m alike;
//           none for int8 (its row scales stay in QuantWeight::row_scales).
// q4_k's and q5_k's blocks are super-blocks of 256 columns, 8 sub-blocks of 32: quants [nblocks][4
// groups][8][16 rows][4 bytes], vector (g, j) bytes 4j .. 4j + 3 of the row's quant group g (low
// nibbles: sub-block 2g, high: 2g + 1, columns 4j ..); q5_k then 8 vectors 32 + j of its fifth-bit
// bytes 4j .. 4j + 3 as stored (bit t of byte l: column l of sub-block t); then the 6-bit scales
// [nblocks][8][16 rows] and minima alike as bytes, then d and dmin [nblocks][16 rows] fp16 each.
// q6_k (as many bytes as stored): its 128 low-bit bytes as vectors (h, a, j) = 16 h + 8 a + j, bytes
// 64 h + 32 a + 4 j .. (low nibbles: columns 128 h + 32 a + 4 j .., high: + 64), its 64 high-bit
// bytes as vectors 32 + 8 h + j, bytes 32 h + 4 j .. (bits 2p, 2p + 1: columns 128 h + 32 p + 4 j ..),
// then the int8 scales [nblocks][16 sub-blocks][16 rows] and d [nblocks][16 rows] fp16.
// Bytes per strip equal those of the 16 rows as stored (q4_k and q5_k a little more): the layout
// adds next to nothing to what a decode step reads, and the rows' own pages are released once the
// strips exist.
#pragma once

#include "kernels/kernels.h"

#if defined(PYXF_TARGET_avx512)
#include <immintrin.h>
#endif

namespace pyxf::kernels::PYXF_TARGET_NS {

constexpr bool strip_format(QuantFormat f) {
  return f == QuantFormat::kInt8 || f == QuantFormat::kQ8_0 || f == QuantFormat::kQ4_0 || f == QuantFormat::kQ4_1 ||
         f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1 || f == QuantFormat::kQ4_K || f == QuantFormat::kQ5_K ||
         f == QuantFormat::kQ6_K;
}
// The 32-column formats with a vector of fifth bits per block, and those with offsets (w = d q + m).
constexpr bool strip_fifth_bits(QuantFormat f) { return f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1; }
constexpr bool strip_has_offsets(QuantFormat f) { return f == QuantFormat::kQ4_1 || f == QuantFormat::kQ5_1; }
constexpr bool strip_8bit(QuantFormat f) { return f == QuantFormat::kQ8_0 || f == QuantFormat::kInt8; }
constexpr int strip_groups(QuantFormat f) { return strip_8bit(f) ? 8 : 4; }

inline long strip_count(const QuantWeight& w) { return (w.rows + kStripRows - 1) / kStripRows; }
inline long strip_bytes(const QuantWeight& w) { return strip_row_bytes(w.format, w.cols); }
inline long strip_blocks(const QuantWeight& w) { return w.cols / quant_block_cols(w.format); }
inline bool has_strips(const QuantWeight& w) { return w.gemm_panels && w.panel_layout == PanelLayout::kStrips; }
// Strip s's quants, and its block scales (fp16) after them.
inline const uint8_t* strip_quants(const QuantWeight& w, long s) { return w.gemm_panels + s * strip_bytes(w); }
inline const uint16_t* strip_scales(const QuantWeight& w, long s) {
  return reinterpret_cast<const uint16_t*>(strip_quants(w, s) + strip_blocks(w) * strip_vectors(w.format) * 64L);
}
inline const uint16_t* strip_offsets(const QuantWeight& w, long s) {  // q4_1's and q5_1's m
  return strip_scales(w, s) + strip_blocks(w) * kStripRows;
}
// q4_k and q5_k: the sub-block scales and minima (bytes), then d and dmin (fp16).
inline const uint8_t* strip_k_scales(const QuantWeight& w, long s) {
  return strip_quants(w, s) + strip_blocks(w) * strip_vectors(w.format) * 64L;
}
inline const uint8_t* strip_k_mins(const QuantWeight& w, long s) {
  return strip_k_scales(w, s) + strip_blocks(w) * 8 * kStripRows;
}
inline const uint16_t* strip_k_d(const QuantWeight& w, long s) {
  return reinterpret_cast<const uint16_t*>(strip_k_mins(w, s) + strip_blocks(w) * 8 * kStripRows);
}
inline const uint16_t* strip_k_dmin(const QuantWeight& w, long s) {
  return strip_k_d(w, s) + strip_blocks(w) * kStripRows;
}
// q6_k: the int8 sub-block scales, then d (fp16).
inline const int8_t* strip_q6_scales(const QuantWeight& w, long s) {
  return reinterpret_cast<const int8_t*>(strip_k_scales(w, s));
}
inline const uint16_t* strip_q6_d(const QuantWeight& w, long s) {
  return reinterpret_cast<const uint16_t*>(strip_q6_scales(w, s) + strip_blocks(w) * 16 * kStripRows);
}

// Bytes of w's strips (0 for formats without them) and the repacking into `out` (that many bytes).
long strips_bytes(const QuantWeight& w);
void pack_strips(const QuantWeight& w, uint8_t* out);

#if defined(PYXF_TARGET_avx512)
// M activation rows quantized for the strip GEMV (per row: int8 blocks, their scales, and the
// int32 each block's sum starts from: -128 or -8 times the sum of its activations).
struct StripActivations {
  long K, nblocks;  // columns; blocks of 32 columns (K-quants: of 256)
  long sums;        // init entries per row
  int8_t* q;      // [M][K]
  float* dx;      // [M][nblocks]
  int32_t* init;  // [M][sums]: per block (q4_k: per 32 columns' sum(q); q6_k: per 16's)
  float* s;       // [M][nblocks]: dx * sum(q), which q4_1's offsets multiply
};
StripActivations prepare_strip_rows(const float* x, long M, long K, QuantFormat f);
// Block b of 32 columns (K-quants: columns 32 (b % 8) .. of super-block b / 8) of a q5_0, q5_1, q4_k,
// q5_k or q6_k strip s as the GEMM's panel half wants it: out[kk], columns 4 kk .. 4 kk + 3 of the 16
// rows, their stored integers as unsigned bytes (q5_0: w + 16, q6_k: w + 32); rows not in `live` zero. And
// row r's scale and offset for sub-block u (of the format's size), the floats unpacking the stored
// block gives (w = scale (q - zero) + offset).
void strip_block_values(const QuantWeight& w, long s, long b, __mmask16 live, __m512i out[8]);
void strip_block_scale(const QuantWeight& w, long s, long u, int r, float* scale, float* offset);
void free_strip_rows(StripActivations& a);
// y[M][ldy] (+)= the prepared rows times w^T + bias, w's strips shared among the threads of the
// enclosing parallel region (a static share each, no barrier at the end).
void strip_tiles(const StripActivations& a, long M, const QuantWeight& w, const float* bias, float* y, long ldy,
                 bool accumulate);
#endif

}  // namespace pyxf::kernels::PYXF_TARGET_NS
