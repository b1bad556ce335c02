// y = x w^T (+ bias): a packed, cache-blocked GEMM for many rows (prefill, encoding) and a
// streaming dot-product kernel for few rows (decode), where reading w once is all that matters.
//
// Compiled once per ISA, and once more as the `avx512_bf16` table (PYXF_BF16_DOT): there bfloat16
// weights are multiplied by vdpbf16ps (pairs of bf16 products summed into fp32 lanes) with the
// activations rounded to bf16, instead of being widened to float and multiplied by FMAs. A fifth
// time as the `avx512_amx` table (PYXF_AMX as well): the same, with the many-rows bf16 products on
// AMX tiles (tdpbf16ps: a 16 x 16 fp32 tile gains 16 rows x 32 depths x 16 columns a step).
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include <type_traits>

#include "kernels/kernels.h"
#include "kernels/scratch.h"
#include "kernels/simd.h"
#if defined(PYXF_AMX)
#include "kernels/amx.h"
#endif

#if defined(PYXF_AMX)
namespace pyxf::kernels::avx512bf16 {
void fill_table(KernelTable* t);
}  // namespace pyxf::kernels::avx512bf16
#endif
#if defined(PYXF_BF16_DOT)
namespace pyxf::kernels::avx512 {
void fill_table(KernelTable* t);
void gated_activation_row(const float* gate, const float* up, long n, Activation act, float* out);
void linear_quant(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate);
void linear_quant_gated(const float* x, long M, const QuantWeight& w, Activation act, float* y);
long gemm_panel_bytes(const QuantWeight& w);
PanelLayout pack_gemm_panels(const QuantWeight& w, uint8_t* out);
long decode_panel_bytes(const QuantWeight& w);
}  // namespace pyxf::kernels::avx512
#endif

namespace pyxf::kernels::PYXF_TARGET_NS {
#if defined(PYXF_BF16_DOT)
using avx512::gated_activation_row;  // this table adds GEMMs and attention; the rest is avx512's
void attention(const AttentionSeq* seqs, int n_seqs, const AttentionShape& shape);  // attention.cc
#else
void gated_activation_row(const float* gate, const float* up, long n, Activation act, float* out);
#endif

namespace {

// Register tile of the packed kernel: MR rows of x by NR = 2 vectors of columns.
#if defined(PYXF_TARGET_avx512)
constexpr int MR = 8;
#elif defined(PYXF_TARGET_avx2)
constexpr int MR = 6;
#else
constexpr int MR = 4;
#endif
constexpr int NR = 2 * kLanes;
constexpr int KC = 288;      // deepest packed block: an NR x KC panel (36 KiB) stays in L1
constexpr int NC = 4 * NR;   // columns packed together; one work item
constexpr int MC = 16 * MR;  // rows per work item

// Depth of the packed blocks for K: as few as `deepest` allows, of equal depth (576 = 2 x 288, not
// 256 + 256 + 64: a shallow block pays the same C tile loads and stores for a quarter of the work).
inline int block_depth(long K, int deepest = KC) {
  const long blocks = (K + deepest - 1) / deepest;
  return (int)((K + blocks - 1) / blocks);
}

inline long padded_cols(long N) { return (N + NR - 1) / NR * NR; }

// Writes a finished register tile: c[ROWS][ncols] (+)= acc + bias (bias may be null).
template <int ROWS>
inline void store_tile(const Vf* acc0, const Vf* acc1, float* c, long ldc, int ncols, bool load_c,
                       const float* bias) {
  if (ncols == NR) {
    const Vf bias0 = bias ? vload(bias) : vzero();
    const Vf bias1 = bias ? vload(bias + kLanes) : vzero();
    for (int r = 0; r < ROWS; ++r) {
      float* cr = c + r * ldc;
      Vf y0 = vadd(acc0[r], bias0), y1 = vadd(acc1[r], bias1);
      if (load_c) {
        y0 = vadd(y0, vload(cr));
        y1 = vadd(y1, vload(cr + kLanes));
      }
      vstore(cr, y0);
      vstore(cr + kLanes, y1);
    }
    return;
  }
  alignas(64) float tile[NR];
  for (int r = 0; r < ROWS; ++r) {
    vstore(tile, acc0[r]);
    vstore(tile + kLanes, acc1[r]);
    float* cr = c + r * ldc;
    for (int j = 0; j < ncols; ++j) {
      float y = tile[j] + (bias ? bias[j] : 0.0f);
      cr[j] = load_c ? cr[j] + y : y;
    }
  }
}

template <typename A, typename P>
using MicroTile = void (*)(const A* a, long lda, const P* panel, int kc, float* c, long ldc, int ncols,
                           bool load_c, const float* bias);

// A policy's micro tiles for 1, 2, ... rows, indexed by the row count.
template <class Policy, typename A, typename P, int... R>
struct TileTable {
  static constexpr MicroTile<A, P> fns[] = {nullptr, Policy::template micro_tile<R>...};
};

// ---- float panels: the weights widened to float once per call, FMAs on float activations ----

// The micro tiles of float panels: FMAs, one broadcast activation per row and depth.
struct FloatTiles {
  // c[ROWS][ncols] (+)= a[ROWS][kc] * panel[kc][NR], then + bias when given.
  template <int ROWS>
  static void micro_tile(const float* a, long lda, const float* panel, int kc, float* c, long ldc, int ncols,
                         bool load_c, const float* bias) {
    Vf acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = vzero();
    for (int k = 0; k < kc; ++k) {
      const Vf b0 = vload(panel + k * NR);
      const Vf b1 = vload(panel + k * NR + kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const Vf ar = vset1(a[r * lda + k]);
        acc0[r] = vfma(ar, b0, acc0[r]);
        acc1[r] = vfma(ar, b1, acc1[r]);
      }
    }
    store_tile<ROWS>(acc0, acc1, c, ldc, ncols, load_c, bias);
  }

#if defined(PYXF_TARGET_avx512)
  using Tiles = TileTable<FloatTiles, float, float, 1, 2, 3, 4, 5, 6, 7, 8>;
#elif defined(PYXF_TARGET_avx2)
  using Tiles = TileTable<FloatTiles, float, float, 1, 2, 3, 4, 5, 6>;
#else
  using Tiles = TileTable<FloatTiles, float, float, 1, 2, 3, 4>;
#endif
};

// panel[k * NR + j] = src[j * ld + k] for k < n, j < NR: NR rows of 32-bit elements (ld apart)
// transposed into a panel, by kLanes x kLanes blocks, the last few depths by gathers.
static void transpose_panel(const float* src, long ld, int n, float* panel) {
  int k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int h = 0; h < NR; h += kLanes) vtranspose_block(src + h * ld + k, ld, panel + k * NR + h, NR);
  }
  for (; k < n; ++k) {
    for (int h = 0; h < NR; h += kLanes) vstore(panel + k * NR + h, vgather(src + h * ld + k, ld));
  }
}

// Packed weights (the columns of one work item, see pack_columns): for each depth block [k0, k0 + kc)
// (block_depth(K) deep, the last one shorter), the columns as panels of NR, each [kc][NR], zero padded
// past N. Block kb starts at kb * depth * n_pad floats and panel p of it at p * kc * NR.
template <typename W>
struct FloatPanels : FloatTiles {
  using Weight = W;
  using Packed = float;
  using Operand = float;  // what the micro tile reads of x

  static int depth(long K) { return block_depth(K); }
  static int stored_depth(int kc) { return kc; }
  static long packed_elements(long K, long N) { return padded_cols(N) * K; }

  // The panel of columns [c0, c0 + NR) and depths [k0, k0 + kc) of w [N][K], zero past N.
  static void pack_panel(const W* w, long K, long N, long k0, int kc, long c0, float* panel) {
    if constexpr (sizeof(W) == sizeof(float)) {
      if (c0 + NR <= N) {  // a whole panel of float columns
        transpose_panel(w + c0 * K + k0, K, kc, panel);
        return;
      }
    }
    for (int j = 0; j < NR; ++j) {
      const long col = c0 + j;
      if (col < N) {
        const W* src = w + col * K + k0;
        for (int k = 0; k < kc; ++k) panel[k * NR + j] = to_f32(src[k]);
      } else {
        for (int k = 0; k < kc; ++k) panel[k * NR + j] = 0.0f;
      }
    }
  }

  // The activations as the micro tiles read them: x itself.
  struct Activations {
    Activations(const float* x, long, long K) : data(x), ld(K) {}
    const float* data;
    long ld;
  };
};

#if defined(PYXF_BF16_DOT)
// ---- bf16 pair panels for vdpbf16ps ----
//
// vdpbf16ps multiplies pairs: lane i of the accumulator gains a[2i] b[2i] + a[2i+1] b[2i+1] (bf16
// products, fp32 sums). A packed panel holds its NR columns by pairs of depths, [kc / 2][NR][2]
// bf16, so one 512-bit load is 16 columns x 2 depths; the activations are rounded to bf16 once per
// call, rows of even length (a zero past an odd K), and a row's pair at depth k is one 32-bit
// broadcast. Depth blocks are even (the last one is padded with a zero depth when K is odd), so block
// kb starts at kb * depth * n_pad elements and panel p of it at p * stored_depth(kc) * NR.
inline long round_up_even(long n) { return (n + 1) & ~1L; }

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// dst[m][0, ld) = bf16(x[m][0, K)), round to nearest even, zeros past K (ld >= K).
void round_rows_to_bf16(const float* x, long M, long K, long ld, uint16_t* dst) {
  for_each_index(M, M * K > 65536, [&](long m) {
    const float* src = x + m * K;
    uint16_t* out = dst + m * ld;
    long k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i*)(out + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
    if (k < K) {
      const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + k));
      _mm256_mask_storeu_epi16(out + k, mask, (__m256i)v);
    }
    for (k = K; k < ld; ++k) out[k] = 0;
  });
}

// How far ahead of its loads decode's pass over bf16 panels prefetches. SmolLM2 bf16 decode steps
// on the AMX Xeon (ms, medians of 4 processes, panels read in static runs): 3 KiB 9.1, 2 KiB 9.4,
// 4 KiB 9.8; 1 KiB about as 4, 8 KiB ~5% slower, no prefetch 12.5.
constexpr int kPanelPrefetchBytes = 3072;

struct Bf16PairPanels {
  using Weight = bf16;
  using Packed = uint16_t;
  using Operand = uint16_t;

  // A bf16 panel of depth 2 KC has the bytes of a float one of KC: BERT-sized K = 384 is one block.
  static int depth(long K) { return (int)round_up_even(block_depth(K, 2 * KC)); }
  static int stored_depth(int kc) { return (int)round_up_even(kc); }
  static long packed_elements(long K, long N) { return padded_cols(N) * round_up_even(K); }

  // The panel of columns [c0, c0 + NR) and depths [k0, k0 + kc) of w [N][K], zero past N and K.
  static void pack_panel(const bf16* w, long K, long N, long k0, int kc, long c0, uint16_t* panel) {
    const uint16_t* bits = &w->bits;
    const int pairs = stored_depth(kc) / 2;
    if (c0 + NR <= N && K % 2 == 0) {
      // Whole panel, even rows: a pair of depths is one 32-bit element of a row, so the panel is
      // the transpose of 32-bit elements.
      transpose_panel((const float*)(bits + c0 * K + k0), K / 2, pairs, (float*)panel);
      return;
    }
    for (int j = 0; j < NR; ++j) {
      const long col = c0 + j;
      for (int k = 0; k < 2 * pairs; ++k) {
        panel[((k / 2) * NR + j) * 2 + k % 2] = col < N && k < kc ? bits[col * K + k0 + k] : 0;
      }
    }
  }

  // c[ROWS][ncols] (+)= a[ROWS][kc] * panel[kc][NR] on bf16 pairs (kc even), then + bias.
  template <int ROWS>
  static void micro_tile(const uint16_t* a, long lda, const uint16_t* panel, int kc, float* c, long ldc,
                         int ncols, bool load_c, const float* bias) {
    Vf acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = vzero();
    // Decode's one or two rows: the even and odd pairs of depths in accumulators of their own, so
    // that consecutive vdpbf16ps do not wait on each other (4 chains, not 2).
    constexpr int kChains = ROWS <= 2 ? 2 : 1;
    Vf acc2[ROWS], acc3[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) acc2[r] = acc3[r] = vzero();
    const auto step = [&](int q, Vf* even, Vf* odd) {
      if constexpr (kChains == 2) {  // decode streams the panels from memory: ahead of the prefetcher
        _mm_prefetch((const char*)(panel + q * 2 * NR) + kPanelPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)(panel + q * 2 * NR) + kPanelPrefetchBytes + 64, _MM_HINT_T0);
      }
      const __m512bh b0 = as_bh(_mm512_loadu_si512(panel + q * 2 * NR));
      const __m512bh b1 = as_bh(_mm512_loadu_si512(panel + q * 2 * NR + 2 * kLanes));
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        int32_t pair;
        memcpy(&pair, a + r * lda + 2 * q, 4);
        const __m512bh ar = as_bh(_mm512_set1_epi32(pair));
        even[r].v = _mm512_dpbf16_ps(even[r].v, ar, b0);
        odd[r].v = _mm512_dpbf16_ps(odd[r].v, ar, b1);
      }
    };
    int q = 0;
    for (; kChains == 2 && q + 2 <= kc / 2; q += 2) {
      step(q, acc0, acc1);
      step(q + 1, acc2, acc3);
    }
    for (; q < kc / 2; ++q) step(q, acc0, acc1);
    if constexpr (kChains == 2) {
      for (int r = 0; r < ROWS; ++r) acc0[r] = vadd(acc0[r], acc2[r]), acc1[r] = vadd(acc1[r], acc3[r]);
    }
    store_tile<ROWS>(acc0, acc1, c, ldc, ncols, load_c, bias);
  }

  using Tiles = TileTable<Bf16PairPanels, uint16_t, uint16_t, 1, 2, 3, 4, 5, 6, 7, 8>;

  // Decode's one row against NP whole panels at once: c[0, NP NR) (+)= a[kc] * [panel 0 | ...] (+
  // bias), the panels (kc deep, stored) one after another. NP streams a panel (36 KiB at K = 576) apart instead of one,
  // each prefetched: the hardware prefetcher follows a stream within 4 KiB pages, and two keep more
  // lines in flight (SmolLM2 bf16 step on the AMX Xeon 9.5-10.1 -> 9.2-9.9 ms; four: as two).
  template <int NP>
  static void row_panels(const uint16_t* a, const uint16_t* panel, int kc, float* c, bool load_c, const float* bias) {
    Vf acc[2 * NP];
    for (int i = 0; i < 2 * NP; ++i) acc[i] = vzero();
    for (int q = 0; q < kc / 2; ++q) {
      int32_t pair;
      memcpy(&pair, a + 2 * q, 4);
      const __m512bh ar = as_bh(_mm512_set1_epi32(pair));
#pragma GCC unroll 8
      for (int h = 0; h < NP; ++h) {
        const uint16_t* at = panel + ((long)h * kc + q * 2) * NR;
        _mm_prefetch((const char*)at + kPanelPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)at + kPanelPrefetchBytes + 64, _MM_HINT_T0);
        acc[2 * h].v = _mm512_dpbf16_ps(acc[2 * h].v, ar, as_bh(_mm512_loadu_si512(at)));
        acc[2 * h + 1].v = _mm512_dpbf16_ps(acc[2 * h + 1].v, ar, as_bh(_mm512_loadu_si512(at + 2 * kLanes)));
      }
    }
    for (int h = 0; h < NP; ++h) {
      store_tile<1>(&acc[2 * h], &acc[2 * h + 1], c + h * NR, 0, NR, load_c, bias ? bias + h * NR : nullptr);
    }
  }

  // The activations rounded to bf16, rows of even length, in the calling thread's scratch.
  struct Activations {
    Activations(const float* x, long M, long K)
        : ld(round_up_even(K)), scratch(kRoundedActivations, sizeof(uint16_t) * M * ld) {
      round_rows_to_bf16(x, M, K, ld, scratch.as<uint16_t>());
      data = scratch.as<uint16_t>();
    }
    long ld;
    Scratch scratch;
    const uint16_t* data;
  };
};

// ---- the same pair panels widened to float in registers: FMAs on float activations ----
//
// Where vdpbf16ps issues at half the rate of float FMAs (Intel without AMX; bf16_gemm_widens), many
// rows multiply the pair panels by FMAs instead: a 512-bit load of a panel is 16 columns x 2 depths
// of bf16, each 32-bit lane (the depth pair of one column) giving the even depth's float by a shift
// left by 16 and the odd depth's by masking the low half. The activations stay float (no rounding):
// the products are those of the bf16 weights widened (FloatPanels<bf16>), on the panels bf16
// matrices keep, packed at load or per call alike.
struct WidenedPairPanels : Bf16PairPanels {
  using Operand = float;

  // c[ROWS][ncols] (+)= a[ROWS][kc] * panel[kc][NR] (kc even; a's rows hold kc floats), then + bias.
  template <int ROWS>
  static void micro_tile(const float* a, long lda, const uint16_t* panel, int kc, float* c, long ldc, int ncols,
                         bool load_c, const float* bias) {
    Vf acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = vzero();
    const __m512i odd_half = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int q = 0; q < kc / 2; ++q) {
      const __m512i p0 = _mm512_loadu_si512(panel + q * 2 * NR);
      const __m512i p1 = _mm512_loadu_si512(panel + q * 2 * NR + 2 * kLanes);
      const __m512 even0 = _mm512_castsi512_ps(_mm512_slli_epi32(p0, 16));
      const __m512 odd0 = _mm512_castsi512_ps(_mm512_and_si512(p0, odd_half));
      const __m512 even1 = _mm512_castsi512_ps(_mm512_slli_epi32(p1, 16));
      const __m512 odd1 = _mm512_castsi512_ps(_mm512_and_si512(p1, odd_half));
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        const __m512 ae = _mm512_set1_ps(a[r * lda + 2 * q]), ao = _mm512_set1_ps(a[r * lda + 2 * q + 1]);
        acc0[r].v = _mm512_fmadd_ps(ao, odd0, _mm512_fmadd_ps(ae, even0, acc0[r].v));
        acc1[r].v = _mm512_fmadd_ps(ao, odd1, _mm512_fmadd_ps(ae, even1, acc1[r].v));
      }
    }
    store_tile<ROWS>(acc0, acc1, c, ldc, ncols, load_c, bias);
  }

  using Tiles = TileTable<WidenedPairPanels, float, uint16_t, 1, 2, 3, 4, 5, 6, 7, 8>;

  // The activations as they are, rows of even length: x itself when K is even, else a copy with a
  // zero after each row (the panels' last pair).
  struct Activations {
    Activations(const float* x, long M, long K)
        : ld(round_up_even(K)), scratch(kRoundedActivations, K % 2 ? sizeof(float) * M * ld : 0) {
      data = x;
      if (K % 2 == 0) return;
      float* out = scratch.as<float>();
      for (long m = 0; m < M; ++m) {
        memcpy(out + m * ld, x + m * K, sizeof(float) * K);
        out[m * ld + K] = 0.0f;
      }
      data = out;
    }
    long ld;
    Scratch scratch;
    const float* data;
  };
};

#if defined(PYXF_AMX)
// ---- AMX tiles on the same bf16 pair panels (amx.h) ----
constexpr long kAmxMinRows = 16;  // fewer rows per call: vdpbf16ps (most of a block would be padding)

struct AmxPanels : Bf16PairPanels {
  static_assert(NR == amx::kBlock, "a panel is one block of columns");
  // Rows of amx::kBlock (A tiles read whole blocks): rows past M are zeros.
  struct Activations {
    Activations(const float* x, long M, long K)
        : ld(round_up_even(K)),
          rows((M + amx::kBlock - 1) / amx::kBlock * amx::kBlock),
          scratch(kRoundedActivations, sizeof(uint16_t) * rows * ld) {
      uint16_t* out = scratch.as<uint16_t>();
      round_rows_to_bf16(x, M, K, ld, out);
      memset(out + M * ld, 0, sizeof(uint16_t) * (rows - M) * ld);
      data = out;
    }
    long ld, rows;
    Scratch scratch;
    const uint16_t* data;
  };

  // c[m][0, nc) (+)= a[m] * the chunk's columns (+ bias) for rows [m_begin, m_end), by blocks of
  // 32 x 32 (panel by panel, every block of rows against one panel): a block's sums stay in the C
  // tiles over the whole depth, started from the bias (a tile load of stride 0 repeats its row) or
  // from c, and are stored once, into c itself; a block past m_end or nc goes through `edge`. A depth
  // block's last kc % 32 depths run on vdpbf16ps (micro_tile) after the store. Storing a block into
  // a scratch and summing over passes there instead (as the other tables do in c) costs ~30% more:
  // the tiles' stores and loads of partial sums, not the products, bound the small-K GEMMs.
  template <class Panels>
  static void chunk_product(const uint16_t* a, long lda, long K, int depth, const Panels& panels, long nc,
                            long m_begin, long m_end, float* c, long ldc, bool accumulate, const float* bias) {
    constexpr int B = amx::kBlock;
    alignas(64) float edge[B * B], start_row[NR];
    const amx::TileScope tiles;
    for (long p = 0; p * NR < nc; ++p) {
      const int cols = (int)lmin(NR, nc - p * NR);
      const auto panel = [&](long k0, int kc) { return panels.block(k0, kc) + p * stored_depth(kc) * NR; };
      const float* bias_row = nullptr;
      if (bias) {
        for (int j = 0; j < NR; ++j) start_row[j] = j < cols ? bias[p * NR + j] : 0.0f;
        bias_row = start_row;
      }
      for (long m0 = m_begin; m0 < m_end; m0 += B) {
        const int rows = (int)lmin(B, m_end - m0);
        float* cb = c + (m0 - m_begin) * ldc + p * NR;
        const bool whole = rows == B && cols == NR;
        float* out = whole ? cb : edge;
        const long ld = whole ? ldc : NR;
        if (accumulate && whole && !bias_row) {
          amx::load_block(cb, ldc);
        } else if (accumulate) {
          for (int r = 0; r < B; ++r) {
            for (int j = 0; j < NR; ++j) {
              edge[r * NR + j] = (r < rows && j < cols ? cb[r * ldc + j] : 0.0f) + (bias_row ? bias_row[j] : 0.0f);
            }
          }
          amx::load_block(edge, NR);
        } else if (bias_row) {
          amx::load_row_block(bias_row);
        } else {
          amx::zero_block();
        }
        for (long k0 = 0; k0 < K; k0 += depth) {
          const int kc = (int)lmin(depth, K - k0);
          amx::multiply_steps(a + m0 * lda + k0, lda, panel(k0, kc), 2 * NR, 2 * 16, kc / amx::kStep);
        }
        amx::store_block(out, ld);
        for (long k0 = 0; k0 < K; k0 += depth) {  // the depths that make no whole step
          const int kc = (int)lmin(depth, K - k0), full = kc / amx::kStep * amx::kStep;
          const int tail = (int)round_up_even(kc - full);
          for (int r = 0; tail > 0 && r < rows; r += MR) {
            Tiles::fns[imin(MR, rows - r)](a + (m0 + r) * lda + k0 + full, lda, panel(k0, kc) + (long)full * NR, tail,
                                           out + r * ld, ld, NR, true, nullptr);
          }
        }
        if (!whole) {
          for (int r = 0; r < rows; ++r) memcpy(cb + r * ldc, edge + r * NR, sizeof(float) * cols);
        }
      }
    }
  }
};

// ---- int8 weights (the int8 format: one scale per row) on the same tiles ----
//
// Each work item packs its panels from the int8 rows times their scales, rounded to bf16 (an int8
// value times a scale is exact to bf16's 8-bit mantissa but for one rounding, 2^-9 relative), and
// runs AmxPanels' tiles on bf16 activations. tdpbusd would multiply bytes twice as fast a step, but
// an integer sum over the whole depth needs one activation scale per row, and a byte per value over
// a row's range lost too much: MiniLM's int8 embeddings of test_bf16's sentences fell to a lowest
// cosine of 0.9923 against sentence-transformers (blocks of 32, the other tables: 0.9953; bf16
// activations: 0.9968), though the encoder's GEMMs ran ~15% faster than here.
struct Int8Rows {
  const int8_t* q;     // [N][K]
  const float* scale;  // [N]
};

struct AmxInt8Panels : AmxPanels {
  using Weight = Int8Rows;

  // The panel of columns [c0, c0 + NR) and depths [k0, k0 + kc) of w, zero past N: the rows
  // dequantized to bf16 (kc of each, in a scratch), then their 32-bit pairs transposed.
  static void pack_panel(const Int8Rows* w, long K, long N, long k0, int kc, long c0, uint16_t* panel) {
    alignas(64) uint16_t rows[NR * 2 * KC];  // kc <= depth(K) <= 2 KC
    for (int j = 0; j < NR; ++j) {
      uint16_t* out = rows + j * kc;
      const long col = c0 + j;
      if (col >= N) {
        memset(out, 0, sizeof(uint16_t) * kc);
        continue;
      }
      const int8_t* src = w->q + col * K + k0;
      const __m512 scale = _mm512_set1_ps(w->scale[col]);
      for (int k = 0; k < kc; k += 16) {
        const __mmask16 live = (__mmask16)(kc - k >= 16 ? 0xffff : (1u << (kc - k)) - 1);
        const __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, src + k));
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(q), scale));
        _mm256_mask_storeu_epi16(out + k, live, (__m256i)v);
      }
    }
    transpose_panel(reinterpret_cast<const float*>(rows), kc / 2, kc / 2, reinterpret_cast<float*>(panel));
  }
};
#endif  // PYXF_AMX
#endif  // PYXF_BF16_DOT

// One depth block of one chunk: `panels` packed panels (L1 in turn) against the row tiles of
// activation rows [m_begin, m_end) (in L2); a single row of bf16 products (decode) takes the panels
// two at a time (Bf16PairPanels::row_panels). Column p NR + j of row m goes to
// c[(m - m_begin) * ldc + p NR + j]; bias (first depth block only) is indexed alike.
template <class P>
void chunk_block(const typename P::Operand* a, long lda, long k0, int kc, const typename P::Packed* block, int nc,
                 long m_begin, long m_end, float* c, long ldc, bool load_c, const float* bias) {
  const int panels = (nc + NR - 1) / NR, stored = P::stored_depth(kc);
  int p = 0;
#if defined(PYXF_BF16_DOT)
  if constexpr (std::is_same_v<P, Bf16PairPanels>) {
    for (; m_end - m_begin == 1 && (p + 2) * NR <= nc; p += 2) {
      P::template row_panels<2>(a + m_begin * lda + k0, block + (long)p * stored * NR, stored, c + p * NR, load_c,
                                bias ? bias + p * NR : nullptr);
    }
  }
#endif
  for (; p < panels; ++p) {
    for (long m0 = m_begin; m0 < m_end; m0 += MR) {
      const int rows = (int)lmin(MR, m_end - m0);
      P::Tiles::fns[rows](a + m0 * lda + k0, lda, block + (long)p * stored * NR, stored, c + (m0 - m_begin) * ldc + p * NR,
                          ldc, imin(NR, nc - p * NR), load_c, bias ? bias + p * NR : nullptr);
    }
  }
}

// Where the panels of columns [n0, ...) of depth block k0 start in the packed weights.
template <class P>
inline long block_offset(long k0, long n0, int kc, long n_pad) {
  return k0 * n_pad + n0 * P::stored_depth(kc);
}

// c[m][0, nc) (+)= a[m] * the chunk's panels (+ bias) for rows [m_begin, m_end): depth block by
// depth block, the partial sums in c (AMX keeps a block's sums in its tiles over the whole depth).
template <class P, class Panels>
void chunk_product(const typename P::Operand* a, long lda, long K, int depth, const Panels& panels, long nc,
                   long m_begin, long m_end, float* c, long ldc, bool accumulate, const float* bias) {
#if defined(PYXF_AMX)
  if constexpr (std::is_base_of_v<AmxPanels, P>) {
    P::chunk_product(a, lda, K, depth, panels, nc, m_begin, m_end, c, ldc, accumulate, bias);
  } else
#endif
  {
    for (long k0 = 0; k0 < K; k0 += depth) {
      const int kc = (int)lmin(depth, K - k0);
      const bool first = k0 == 0;
      chunk_block<P>(a, lda, k0, kc, panels.block(k0, kc), (int)nc, m_begin, m_end, c, ldc, !first || accumulate,
                     first ? bias : nullptr);
    }
  }
}

// Columns per work item of the packed GEMMs: at most NC, and few enough that each thread gets about
// kChunksPerThread of them (a 576-column projection on 2 threads: 6 chunks of 96); narrowed, where
// that evens the threads' shares, to a width whose chunk count is a multiple of the threads (MiniLM's
// 1,152-column qkv on 2 threads: 12 chunks of 96, not 9 of 128, 5 for one thread and 4 for the other).
constexpr long kChunksPerThread = 3;
inline long chunk_cols(long N) {
  const long threads = omp_get_max_threads(), panels = (N + NR - 1) / NR;
  const long per = (N + kChunksPerThread * threads - 1) / (kChunksPerThread * threads);
  const long widest = lmin(NC, padded_cols(per)) / NR;  // panels a chunk, at least 1
  for (long p = widest; p > widest / 2; --p) {
    if (((panels + p - 1) / p) % threads == 0) return p * NR;
  }
  return widest * NR;
}

// The panels of columns [n0, n0 + nc) of w [N][K] (n0 a multiple of NR), packed as a matrix of
// padded_cols(nc) columns of its own: depth block k0 at k0 * padded_cols(nc), then panel by panel.
template <class P>
void pack_columns(const typename P::Weight* w, long K, long N, long n0, long nc, typename P::Packed* dst) {
  const long nc_pad = padded_cols(nc), dep = P::depth(K);
  for (long k0 = 0; k0 < K; k0 += dep) {
    const int kc = (int)lmin(dep, K - k0);
    for (long c = 0; c < nc_pad; c += NR) P::pack_panel(w, K, N, k0, kc, n0 + c, dst + block_offset<P>(k0, c, kc, nc_pad));
  }
}

// The panels of one chunk of columns: packed per call into the thread's scratch (a matrix of the
// chunk's own, columns from 0) or a view of the whole matrix packed once (columns from n0).
template <class P>
struct ChunkPanels {
  const typename P::Packed* base;
  long col0, n_pad;
  // Depth block k0 (kc deep) of the chunk: its first panel.
  const typename P::Packed* block(long k0, int kc) const { return base + block_offset<P>(k0, col0, kc, n_pad); }
};

// The panels of columns [n0, n0 + nc) of w [N][K]: `prepacked` (all of w, pack_columns'd whole) when
// given, else packed now into `scratch`.
template <class P>
ChunkPanels<P> chunk_panels(const typename P::Weight* w, const typename P::Packed* prepacked, long K, long N,
                            long n0, long nc, typename P::Packed* scratch) {
  if (prepacked) return {prepacked, n0, padded_cols(N)};
  pack_columns<P>(w, K, N, n0, nc, scratch);
  return {scratch, 0, padded_cols(nc)};
}

// How the threads share a GEMM of many rows. By columns (the default): a work item is one chunk of
// columns, packed by the thread that takes it (in its L2) and run against every row block. There is
// no packing pass over the whole matrix before the products start: one thread's packing (waiting on
// memory) overlaps the other's multiply-adds. With `prepacked` (w packed once, see
// pack_dense_panels) the items only read their panels.
//
// By rows (AMX tiles, weights packed at load, kSplitRowsPerThread rows a thread and more): each
// thread takes a share of the rows, rounds them to bf16 itself and runs every chunk of columns
// against them. Split by columns, every thread reads every rounded row, half of which the other core
// has just written: on the AMX Xeon those lines' moves between the cores cost more than the
// products (SmolLM2's 512 x 1536 x 576 projection: 0.59 ms, 0.33 with the rounding left out).
template <class P>
constexpr bool kSplitsRows =
#if defined(PYXF_AMX)
    std::is_base_of_v<AmxPanels, P>;
#else
    false;
#endif
constexpr long kSplitRowsPerThread = 128;

template <class P>
bool splits_rows(long M, const typename P::Packed* prepacked) {
  return kSplitsRows<P> && prepacked && M >= kSplitRowsPerThread * omp_get_max_threads();
}

// body(a, r0, rows) on every thread of a team: its share of x's M rows from row r0 (whole blocks of
// 32), as activations it made itself.
template <class P, class Body>
void on_row_shares(const float* x, long M, long K, Body body) {
#pragma omp parallel
  {
    const long n = omp_get_num_threads(), share = ((M + n - 1) / n + 31) / 32 * 32;
    const long r0 = lmin(M, omp_get_thread_num() * share), rows = lmin(M - r0, share);
    const typename P::Activations a(x + r0 * K, rows, K);
    body(a, r0, rows);
  }
}

// fn(ci) for every chunk of a packed GEMM, shared by the threads of the enclosing team. Panels packed
// once and few rows (decode) make a call a pass over memory: each thread takes a run of consecutive
// chunks, one sequential stream; otherwise chunks go to threads as they come free (balance).
constexpr long kStreamRows = 4;
template <class Fn>
void share_chunks(long n_chunks, bool stream, Fn fn) {
  if (stream) {
#pragma omp for schedule(static)
    for (long ci = 0; ci < n_chunks; ++ci) fn(ci);
  } else {
#pragma omp for schedule(dynamic, 1)
    for (long ci = 0; ci < n_chunks; ++ci) fn(ci);
  }
}

template <class P>
void linear_packed(const float* x, long M, long K, const typename P::Weight* w, long N, const float* bias,
                   float* y, long ldy, bool accumulate, const typename P::Packed* prepacked = nullptr) {
  const int depth = P::depth(K);
  if (splits_rows<P>(M, prepacked)) {
    const long cols = lmin(NC, padded_cols(N));
    on_row_shares<P>(x, M, K, [&](const typename P::Activations& a, long r0, long rows) {
      for (long n0 = 0; n0 < N; n0 += cols) {
        const long nc = lmin(cols, N - n0);
        const ChunkPanels<P> panels = chunk_panels<P>(w, prepacked, K, N, n0, nc, nullptr);
        for (long m_begin = 0; m_begin < rows; m_begin += MC) {
          chunk_product<P>(a.data, a.ld, K, depth, panels, nc, m_begin, lmin(rows, m_begin + MC),
                           y + (r0 + m_begin) * ldy + n0, ldy, accumulate, bias ? bias + n0 : nullptr);
        }
      }
    });
    return;
  }
  const typename P::Activations a(x, M, K);
  const long cols = chunk_cols(N), n_chunks = (N + cols - 1) / cols;
#pragma omp parallel
  {
    const Scratch packing(kPackedWeights, prepacked ? 0 : sizeof(typename P::Packed) * P::packed_elements(K, cols));
    share_chunks(n_chunks, prepacked && M <= kStreamRows, [&](long ci) {
      const long n0 = ci * cols, nc = lmin(cols, N - n0);
      const ChunkPanels<P> panels =
          chunk_panels<P>(w, prepacked, K, N, n0, nc, packing.template as<typename P::Packed>());
      for (long m_begin = 0; m_begin < M; m_begin += MC) {
        chunk_product<P>(a.data, a.ld, K, depth, panels, nc, m_begin, lmin(M, m_begin + MC), y + m_begin * ldy + n0,
                         ldy, accumulate, bias ? bias + n0 : nullptr);
      }
    });
  }
}

// y[M, I] = act(x gate^T) * (x up^T), w = [gate; up] with I % NR == 0: a work item packs the gate
// and up columns of one chunk (or finds them in `prepacked`, all of w packed once), computes them
// into an L2 scratch tile and applies the activation there, so the 2 I-wide product never goes to
// memory. The threads share the work as linear_packed's do.
template <class P>
void linear_packed_gated(const float* x, long M, long K, const typename P::Weight* w, long I, Activation act,
                         float* y, const typename P::Packed* prepacked = nullptr) {
  const long N = 2 * I;
  const bool by_rows = splits_rows<P>(M, prepacked);
  const long cols = by_rows ? lmin(NC, I) : chunk_cols(I), n_chunks = (I + cols - 1) / cols;
  const int depth = P::depth(K);
  // Rows [m_begin, m_end) of a (rounded activations) against chunk ci, into y_rows (y's row of a's row 0).
  const auto chunk_rows = [&](const typename P::Activations& a, const ChunkPanels<P> (&halves)[2], long ci,
                              long m_begin, long m_end, float* scratch, float* y_rows) {
    const long n0 = ci * cols, nc = lmin(cols, I - n0);
    for (int half = 0; half < 2; ++half) {  // gate columns n0.., then up columns I + n0..
      chunk_product<P>(a.data, a.ld, K, depth, halves[half], nc, m_begin, m_end, scratch + half * cols, 2 * cols,
                       false, nullptr);
    }
    for (long m = m_begin; m < m_end; ++m) {
      const float* row = scratch + (m - m_begin) * 2 * cols;
      gated_activation_row(row, row + cols, nc, act, y_rows + m * I + n0);
    }
  };
  if (by_rows) {
    on_row_shares<P>(x, M, K, [&](const typename P::Activations& a, long r0, long rows) {
      const Scratch sums(kTileSums, sizeof(float) * MC * 2 * cols);  // [MC][gate | up]
      for (long ci = 0; ci < n_chunks; ++ci) {
        const long n0 = ci * cols, nc = lmin(cols, I - n0);
        const ChunkPanels<P> halves[2] = {chunk_panels<P>(w, prepacked, K, N, n0, nc, nullptr),
                                          chunk_panels<P>(w, prepacked, K, N, I + n0, nc, nullptr)};
        for (long m_begin = 0; m_begin < rows; m_begin += MC) {
          chunk_rows(a, halves, ci, m_begin, lmin(rows, m_begin + MC), sums.as<float>(), y + r0 * I);
        }
      }
    });
    return;
  }
  const typename P::Activations a(x, M, K);
#pragma omp parallel
  {
    // The chunk's gate panels, then its up panels.
    const long half_elements = prepacked ? 0 : P::packed_elements(K, cols);
    const Scratch packing(kPackedWeights, 2 * sizeof(typename P::Packed) * half_elements);
    typename P::Packed* packed = packing.template as<typename P::Packed>();
    const Scratch sums(kTileSums, sizeof(float) * MC * 2 * cols);  // [MC][gate | up]
    share_chunks(n_chunks, prepacked && M <= kStreamRows, [&](long ci) {
      const long n0 = ci * cols, nc = lmin(cols, I - n0);
      const ChunkPanels<P> halves[2] = {chunk_panels<P>(w, prepacked, K, N, n0, nc, packed),
                                        chunk_panels<P>(w, prepacked, K, N, I + n0, nc, packed + half_elements)};
      for (long m_begin = 0; m_begin < M; m_begin += MC) chunk_rows(a, halves, ci, m_begin, lmin(M, m_begin + MC), sums.as<float>(), y);
    });
  }
}

// Dot products of up to 4 rows of x (row stride ldx) with WR rows of w: 16 independent accumulators.
template <int XR, int WR, typename W>
void dot_tile(const float* x, long ldx, long K, const W* w, float* y, long ldy, const float* bias,
              bool accumulate) {
  Vf acc[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) acc[i][j] = vzero();
  long k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vf wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = vload(w + j * K + k);
    for (int i = 0; i < XR; ++i) {
      const Vf xv = vload(x + i * ldx + k);
      for (int j = 0; j < WR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const int rest = (int)(K - k);
    Vf wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = vload_n(w + j * K + k, rest);
    for (int i = 0; i < XR; ++i) {
      const Vf xv = vload_n(x + i * ldx + k, rest);
      for (int j = 0; j < WR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < XR; ++i) {
    for (int j = 0; j < WR; ++j) {
      float v = vsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + v : v;
    }
  }
}

#if defined(PYXF_BF16_DOT)
// The same on bf16 activations and bf16 weights: vdpbf16ps takes 32 depths a step.
constexpr int kPrefetchRows = 8;
template <int XR, int WR, typename W>
void dot_tile(const uint16_t* x, long ldx, long K, const W* w, float* y, long ldy, const float* bias,
              bool accumulate) {
  static_assert(sizeof(W) == 2, "bf16 weights");
  const uint16_t* wb = &w->bits;
  __m512 acc[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) acc[i][j] = _mm512_setzero_ps();
  long k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[WR];
    for (int j = 0; j < WR; ++j) {
      // The next tiles' rows, ahead of the hardware prefetcher (rows of bf16 are short streams).
      _mm_prefetch((const char*)(wb + (j + kPrefetchRows) * K + k), _MM_HINT_T0);
      wv[j] = as_bh(_mm512_loadu_si512(wb + j * K + k));
    }
    for (int i = 0; i < XR; ++i) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(x + i * ldx + k));
      for (int j = 0; j < WR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = as_bh(_mm512_maskz_loadu_epi16(mask, wb + j * K + k));
    for (int i = 0; i < XR; ++i) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(mask, x + i * ldx + k));
      for (int j = 0; j < WR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < XR; ++i) {
    for (int j = 0; j < WR; ++j) {
      float v = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.0f);
      y[i * ldy + j] = accumulate ? y[i * ldy + j] + v : v;
    }
  }
}
#endif

template <int WR, typename A, typename W>
void dot_rows(const A* x, long ldx, long M, long K, const W* w, float* y, long ldy,
              const float* bias, bool accumulate) {
  long m = 0;
  for (; m + 4 <= M; m += 4) dot_tile<4, WR, W>(x + m * ldx, ldx, K, w, y + m * ldy, ldy, bias, accumulate);
  switch (M - m) {
    case 3: dot_tile<3, WR, W>(x + m * ldx, ldx, K, w, y + m * ldy, ldy, bias, accumulate); break;
    case 2: dot_tile<2, WR, W>(x + m * ldx, ldx, K, w, y + m * ldy, ldy, bias, accumulate); break;
    case 1: dot_tile<1, WR, W>(x + m * ldx, ldx, K, w, y + m * ldy, ldy, bias, accumulate); break;
    default: break;
  }
}

// x: the activations as the policy's micro tiles read them (row stride ldx).
template <typename A, typename W>
void linear_small_m(const A* x, long ldx, long M, long K, const W* w, long N, const float* bias,
                    float* y, long ldy, bool accumulate) {
  const long blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (long b = 0; b < blocks; ++b) {
    const long n = b * 4;
    const W* wb = w + n * K;
    const float* bb = bias ? bias + n : nullptr;
    switch (lmin(4, N - n)) {
      case 4: dot_rows<4>(x, ldx, M, K, wb, y + n, ldy, bb, accumulate); break;
      case 3: dot_rows<3>(x, ldx, M, K, wb, y + n, ldy, bb, accumulate); break;
      case 2: dot_rows<2>(x, ldx, M, K, wb, y + n, ldy, bb, accumulate); break;
      default: dot_rows<1>(x, ldx, M, K, wb, y + n, ldy, bb, accumulate); break;
    }
  }
}

// How weights of type W are multiplied: widened to float, except bf16 where vdpbf16ps runs.
template <typename W>
struct PanelsFor {
  using type = FloatPanels<W>;
};
#if defined(PYXF_AMX)
template <>
struct PanelsFor<bf16> {
  using type = AmxPanels;
};
#elif defined(PYXF_BF16_DOT)
template <>
struct PanelsFor<bf16> {
  using type = Bf16PairPanels;
};
#endif

#if defined(PYXF_BF16_DOT)
// Whether M rows of bf16 products take float FMAs (WidenedPairPanels) on this table: from
// kWidenRows rows where the CPU's vdpbf16ps is slow (bf16_gemm_widens), never on AMX's.
inline bool widens(long M) {
#if defined(PYXF_AMX)
  (void)M;
  return false;
#else
  return M >= kWidenRows && bf16_gemm_widens();
#endif
}

// Calls fn with the policy for bf16 products of M rows on pair panels: AMX tiles from
// kAmxMinRows rows where the table has them, else widened FMAs where widens(M), else vdpbf16ps.
template <class Fn>
void with_bf16_policy(long M, Fn fn) {
#if defined(PYXF_AMX)
  if (M >= kAmxMinRows) return fn(AmxPanels{});
#endif
  if (widens(M)) return fn(WidenedPairPanels{});
  fn(Bf16PairPanels{});
}
#endif

}  // namespace

// y has row stride ldy >= N, so a caller can fill a slice of columns.
template <typename W>
void linear_strided(const float* x, long M, long K, const W* w, long N, const float* bias, float* y,
                    long ldy, bool accumulate) {
  using P = typename PanelsFor<W>::type;
  if (K <= 0) {  // an empty sum: y is the bias
    for (long m = 0; m < M; ++m)
      for (long n = 0; n < N; ++n) y[m * ldy + n] = (accumulate ? y[m * ldy + n] : 0.0f) + (bias ? bias[n] : 0.0f);
    return;
  }
  if (M < kFloatGemmRows) {
    const typename P::Activations a(x, M, K);
    linear_small_m(a.data, a.ld, M, K, w, N, bias, y, ldy, accumulate);
  } else {
    linear_packed<P>(x, M, K, w, N, bias, y, ldy, accumulate);
  }
}
template void linear_strided<float>(const float*, long, long, const float*, long, const float*,
                                    float*, long, bool);

void linear(const float* x, long M, long K, const void* w, WeightType wt, long N, const float* bias,
            float* y, bool accumulate, const void* panels) {
  switch (wt) {
    case WeightType::kBF16:
#if defined(PYXF_BF16_DOT)
      if ((panels || M >= kFloatGemmRows) && K > 0) {  // the packed GEMM: on panels, or packing per call
        with_bf16_policy(M, [&](auto policy) {
          linear_packed<decltype(policy)>(x, M, K, static_cast<const bf16*>(w), N, bias, y, N, accumulate,
                                          static_cast<const uint16_t*>(panels));
        });
        break;
      }
      if (widens(M) && K > 0) {  // fewer rows without panels: dot products on float activations
        linear_small_m(x, K, M, K, static_cast<const bf16*>(w), N, bias, y, N, accumulate);
        break;
      }
#endif
      linear_strided(x, M, K, static_cast<const bf16*>(w), N, bias, y, N, accumulate);
      break;
    case WeightType::kF16:
      linear_strided(x, M, K, static_cast<const f16*>(w), N, bias, y, N, accumulate);
      break;
    case WeightType::kF32:
    default:
      linear_strided(x, M, K, static_cast<const float*>(w), N, bias, y, N, accumulate);
      break;
  }
}

void linear_gated(const float* x, long M, long K, const void* w, WeightType wt, long I, Activation act,
                  float* y, const void* panels) {
  if ((M >= kFloatGemmRows || panels) && I % NR == 0 && K > 0) {
    switch (wt) {
      case WeightType::kBF16:
#if defined(PYXF_BF16_DOT)
        with_bf16_policy(M, [&](auto policy) {
          linear_packed_gated<decltype(policy)>(x, M, K, static_cast<const bf16*>(w), I, act, y,
                                                static_cast<const uint16_t*>(panels));
        });
#else
        linear_packed_gated<PanelsFor<bf16>::type>(x, M, K, static_cast<const bf16*>(w), I, act, y);
#endif
        return;
      case WeightType::kF16:
        linear_packed_gated<PanelsFor<f16>::type>(x, M, K, static_cast<const f16*>(w), I, act, y);
        return;
      case WeightType::kF32:
      default:
        linear_packed_gated<PanelsFor<float>::type>(x, M, K, static_cast<const float*>(w), I, act, y);
        return;
    }
  }
  float* gu = (float*)malloc(sizeof(float) * M * 2 * I + 64);
  linear(x, M, K, w, wt, 2 * I, nullptr, gu, false, panels);
  for (long m = 0; m < M; ++m) gated_activation_row(gu + m * 2 * I, gu + m * 2 * I + I, I, act, y + m * I);
  free(gu);
}

void load_row(const void* w, WeightType wt, long row, long n, float* out) {
  switch (wt) {
    case WeightType::kBF16: {
      const bf16* src = static_cast<const bf16*>(w) + row * n;
      for (long i = 0; i < n; ++i) out[i] = to_f32(src[i]);
      break;
    }
    case WeightType::kF16: {
      const f16* src = static_cast<const f16*>(w) + row * n;
      for (long i = 0; i < n; ++i) out[i] = to_f32(src[i]);
      break;
    }
    case WeightType::kF32:
    default:
      memcpy(out, static_cast<const float*>(w) + row * n, sizeof(float) * n);
      break;
  }
}

#if defined(PYXF_BF16_DOT)
// bf16 matrices packed once: the whole matrix as one chunk of columns (pack_columns), so a work
// item's chunk [n0, n0 + nc) is found at column n0 of each depth block (ChunkPanels).
long dense_panel_bytes(WeightType wt, long K, long N) {
  return wt == WeightType::kBF16 && K > 0 ? (long)sizeof(uint16_t) * Bf16PairPanels::packed_elements(K, N) : 0;
}

namespace {
// All of w packed as policy P's panels (the layout linear_packed's `prepacked` reads), by chunks of
// NC columns in parallel: each chunk's panels are its own range of every block.
template <class P>
void pack_matrix(const typename P::Weight* w, long K, long N, typename P::Packed* dst) {
  const long dep = P::depth(K), n_pad = padded_cols(N);
#pragma omp parallel for schedule(dynamic, 1)
  for (long n0 = 0; n0 < n_pad; n0 += NC) {
    for (long k0 = 0; k0 < K; k0 += dep) {
      const int kc = (int)lmin(dep, K - k0);
      for (long c = n0; c < lmin(n_pad, n0 + NC); c += NR) {
        P::pack_panel(w, K, N, k0, kc, c, dst + block_offset<P>(k0, c, kc, n_pad));
      }
    }
  }
}
}  // namespace

void pack_dense_panels(const void* w, WeightType wt, long K, long N, void* out) {
  if (dense_panel_bytes(wt, K, N) == 0) return;
  pack_matrix<Bf16PairPanels>(static_cast<const bf16*>(w), K, N, static_cast<uint16_t*>(out));
}

#if defined(PYXF_AMX)
// The int8 format from kAmxMinRows rows on tiles (AmxInt8Panels); everything else on the avx512
// kernels (quant.cc).
namespace {
// w's panels made at load for the tiles, or null (packed per call).
const uint16_t* tile_panels(const QuantWeight& w) {
  return w.panel_layout == PanelLayout::kBf16Tiles ? reinterpret_cast<const uint16_t*>(w.gemm_panels) : nullptr;
}
}  // namespace

void linear_quant(const float* x, long M, const QuantWeight& w, const float* bias, float* y, bool accumulate) {
  if (w.format != QuantFormat::kInt8 || M < kAmxMinRows) {
    avx512::linear_quant(x, M, w, bias, y, accumulate);
    return;
  }
  const Int8Rows rows{reinterpret_cast<const int8_t*>(w.data), w.row_scales};
  linear_packed<AmxInt8Panels>(x, M, w.cols, &rows, w.rows, bias, y, w.rows, accumulate, tile_panels(w));
}

void linear_quant_gated(const float* x, long M, const QuantWeight& w, Activation act, float* y) {
  const long I = w.rows / 2;
  if (w.format != QuantFormat::kInt8 || M < kAmxMinRows) {
    avx512::linear_quant_gated(x, M, w, act, y);
    return;
  }
  const Int8Rows rows{reinterpret_cast<const int8_t*>(w.data), w.row_scales};
  if (I % NR == 0) {
    linear_packed_gated<AmxInt8Panels>(x, M, w.cols, &rows, I, act, y, tile_panels(w));
    return;
  }
  float* gu = (float*)malloc(sizeof(float) * M * 2 * I + 64);  // the gate and up halves apart
  linear_packed<AmxInt8Panels>(x, M, w.cols, &rows, 2 * I, nullptr, gu, 2 * I, false, tile_panels(w));
  for (long m = 0; m < M; ++m) gated_activation_row(gu + m * 2 * I, gu + m * 2 * I + I, I, act, y + m * I);
  free(gu);
}

// The int8 format's panels at load: the tiles' (bf16, 2 bytes a weight); other formats avx512's.
long gemm_panel_bytes(const QuantWeight& w) {
  if (w.format != QuantFormat::kInt8) return avx512::gemm_panel_bytes(w);
  return (long)sizeof(uint16_t) * AmxInt8Panels::packed_elements(w.cols, w.rows);
}

PanelLayout pack_gemm_panels(const QuantWeight& w, uint8_t* out) {
  if (w.format != QuantFormat::kInt8) return avx512::pack_gemm_panels(w, out);
  const Int8Rows rows{reinterpret_cast<const int8_t*>(w.data), w.row_scales};
  pack_matrix<AmxInt8Panels>(&rows, w.cols, w.rows, reinterpret_cast<uint16_t*>(out));
  return PanelLayout::kBf16Tiles;
}

// No strips for the int8 format here: the tiles' GEMM above reads its rows.
long decode_panel_bytes(const QuantWeight& w) {
  return w.format == QuantFormat::kInt8 ? 0 : avx512::decode_panel_bytes(w);
}
#endif

// The avx512_bf16 table: avx512's, with this file's GEMMs (bf16 weights on vdpbf16ps) and attention
// with bf16 products (AttentionShape::bf16_products). The avx512_amx table: avx512_bf16's, the same
// with the products of many rows on AMX tiles (over the same panels).
void fill_table(KernelTable* t) {
#if defined(PYXF_AMX)
  avx512bf16::fill_table(t);
  t->name = "avx512_amx";
#else
  avx512::fill_table(t);
  t->name = "avx512_bf16";
#endif
  t->linear = linear;
  t->linear_gated = linear_gated;
  t->dense_panel_bytes = dense_panel_bytes;
  t->pack_dense_panels = pack_dense_panels;
  t->attention = attention;
#if defined(PYXF_AMX)
  t->linear_quant = linear_quant;
  t->linear_quant_gated = linear_quant_gated;
  t->gemm_panel_bytes = gemm_panel_bytes;
  t->pack_gemm_panels = pack_gemm_panels;
  t->decode_panel_bytes = decode_panel_bytes;
#endif
}
#endif

}  // namespace pyxf::kernels::PYXF_TARGET_NS
