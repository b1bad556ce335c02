// y = x w^T (+ bias): a packed, cache-blocked GEMM for many rows (prefill, encoding) and a
// streaming dot-product kernel for few rows (decode), where reading w once is all that matters.
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {
void gated_activation_row(const float* gate, const float* up, long n, Activation act, float* out);

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

// Depth of the packed blocks for K: as few as KC allows, of equal depth (576 = 2 x 288, not 256 +
// 256 + 64: a shallow block pays the same C tile loads and stores for a quarter of the work).
inline int block_depth(long K) {
  const long blocks = (K + KC - 1) / KC;
  return (int)((K + blocks - 1) / blocks);
}

// Packed weights: for each depth block [k0, k0 + kc) (block_depth(K) deep, the last one shorter), the
// N columns as panels of NR, each [kc][NR], zero padded past N. Block kb starts at kb * depth * n_pad floats and
// panel p of it at p * kc * NR.
inline long padded_cols(long N) { return (N + NR - 1) / NR * NR; }

// Packs w (all of it) into `dst`; one pass over w, done once per call and shared by every thread.
template <typename W>
void pack_weights(const W* w, long K, long N, float* dst) {
  const long n_pad = padded_cols(N), panels = n_pad / NR, depth = block_depth(K), k_blocks = (K + depth - 1) / depth;
#pragma omp for schedule(static) collapse(2)
  for (long kb = 0; kb < k_blocks; ++kb) {
    for (long p = 0; p < panels; ++p) {
      const long k0 = kb * depth;
      const int kc = (int)lmin(depth, K - k0);
      float* panel = dst + kb * depth * n_pad + p * kc * NR;
      if constexpr (sizeof(W) == sizeof(float)) {
        if ((p + 1) * NR <= N) {  // a whole panel of float columns: transposed by gathers
          const float* src = w + p * NR * K + k0;
          for (int k = 0; k < kc; ++k) {
            for (int h = 0; h < NR; h += kLanes) vstore(panel + k * NR + h, vgather(src + h * K + k, K));
          }
          continue;
        }
      }
      for (int j = 0; j < NR; ++j) {
        const long col = p * NR + j;
        if (col < N) {
          const W* src = w + col * K + k0;
          for (int k = 0; k < kc; ++k) panel[k * NR + j] = to_f32(src[k]);
        } else {
          for (int k = 0; k < kc; ++k) panel[k * NR + j] = 0.0f;
        }
      }
    }
  }
}

// Scratch for the packed weights of the calling thread's GEMMs: kept between calls up to
// kKeptPackingFloats (every layer's weights of the models we run fit); a larger request (a
// vocabulary-sized head over many rows) gets its own allocation, freed by release_packing_buffer.
constexpr long kKeptPackingFloats = 4L << 20;  // 16 MiB

float* packing_buffer(long floats) {
  static thread_local float* buffer = nullptr;
  static thread_local long capacity = 0;
  if (floats > kKeptPackingFloats) return (float*)aligned_alloc(64, (sizeof(float) * floats + 63) / 64 * 64);
  if (floats > capacity) {
    free(buffer);
    capacity = floats;
    buffer = (float*)aligned_alloc(64, (sizeof(float) * capacity + 63) / 64 * 64);
  }
  return buffer;
}

void release_packing_buffer(float* buffer, long floats) {
  if (floats > kKeptPackingFloats) free(buffer);
}

// c[ROWS][ncols] (+)= a[ROWS][kc] * panel[kc][NR], then + bias when given.
template <int ROWS>
void micro_tile(const float* a, long lda, const float* panel, int kc, float* c, long ldc,
                int ncols, bool load_c, const float* bias) {
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

using MicroTile = void (*)(const float*, long, const float*, int, float*, long, int, bool,
                           const float*);

template <int... R>
struct TileTable {
  static constexpr MicroTile fns[] = {nullptr, micro_tile<R>...};
};
#if defined(PYXF_TARGET_avx512)
using Tiles = TileTable<1, 2, 3, 4, 5, 6, 7, 8>;
#elif defined(PYXF_TARGET_avx2)
using Tiles = TileTable<1, 2, 3, 4, 5, 6>;
#else
using Tiles = TileTable<1, 2, 3, 4>;
#endif

// One depth block of one chunk: `panels` packed panels (kc x NR each, in L1 in turn) against the
// row tiles of x rows [m_begin, m_end) (in L2). Column p NR + j of row m goes to
// c[(m - m_begin) * ldc + p NR + j]; bias (first depth block only) is indexed alike.
void chunk_block(const float* x, long K, long k0, int kc, const float* block, int nc, long m_begin, long m_end,
                 float* c, long ldc, bool load_c, const float* bias) {
  const int panels = (nc + NR - 1) / NR;
  for (int p = 0; p < panels; ++p) {
    for (long m0 = m_begin; m0 < m_end; m0 += MR) {
      const int rows = (int)lmin(MR, m_end - m0);
      Tiles::fns[rows](x + m0 * K + k0, K, block + (long)p * kc * NR, kc, c + (m0 - m_begin) * ldc + p * NR, ldc,
                       imin(NR, nc - p * NR), load_c, bias ? bias + p * NR : nullptr);
    }
  }
}

template <typename W>
void linear_packed(const float* x, long M, long K, const W* w, long N, const float* bias,
                   float* y, long ldy, bool accumulate) {
  const long n_pad = padded_cols(N);
  float* packed = packing_buffer(n_pad * K);
  const long n_chunks = (N + NC - 1) / NC;
  const long m_blocks = (M + MC - 1) / MC;
  const int depth = block_depth(K);
#pragma omp parallel
  {
    pack_weights(w, K, N, packed);  // ends with the omp for's barrier
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (long ci = 0; ci < n_chunks; ++ci) {
      for (long mb = 0; mb < m_blocks; ++mb) {
        const long n0 = ci * NC, m_begin = mb * MC, m_end = lmin(M, (mb + 1) * MC);
        const int nc = (int)lmin(NC, N - n0);
        for (long k0 = 0; k0 < K; k0 += depth) {
          const int kc = (int)lmin(depth, K - k0);
          const bool first = k0 == 0;
          // panel n0 / NR of depth block k0 / depth
          chunk_block(x, K, k0, kc, packed + k0 * n_pad + n0 * kc, nc, m_begin, m_end, y + m_begin * ldy + n0, ldy,
                      !first || accumulate, first && bias ? bias + n0 : nullptr);
        }
      }
    }
  }
  release_packing_buffer(packed, n_pad * K);
}

// y[M, I] = act(x gate^T) * (x up^T), w = [gate; up] with I % NR == 0: a work item computes the
// gate and up columns of one chunk into an L2 scratch tile and applies the activation there, so
// the 2 I-wide product never goes to memory.
template <typename W>
void linear_packed_gated(const float* x, long M, long K, const W* w, long I, Activation act, float* y) {
  const long N = 2 * I, n_pad = padded_cols(N);
  float* packed = packing_buffer(n_pad * K);
  const long n_chunks = (I + NC - 1) / NC;
  const long m_blocks = (M + MC - 1) / MC;
  const int depth = block_depth(K);
#pragma omp parallel
  {
    pack_weights(w, K, N, packed);  // ends with the omp for's barrier
    float* scratch = (float*)aligned_alloc(64, sizeof(float) * MC * 2 * NC);  // [MC][gate NC | up NC]
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (long ci = 0; ci < n_chunks; ++ci) {
      for (long mb = 0; mb < m_blocks; ++mb) {
        const long n0 = ci * NC, m_begin = mb * MC, m_end = lmin(M, (mb + 1) * MC);
        const int nc = (int)lmin(NC, I - n0);
        for (long k0 = 0; k0 < K; k0 += depth) {
          const int kc = (int)lmin(depth, K - k0);
          for (int half = 0; half < 2; ++half) {  // gate columns n0.., then up columns I + n0..
            chunk_block(x, K, k0, kc, packed + k0 * n_pad + (half * I + n0) * kc, nc, m_begin, m_end,
                        scratch + half * NC, 2 * NC, k0 != 0, nullptr);
          }
        }
        for (long m = m_begin; m < m_end; ++m) {
          const float* row = scratch + (m - m_begin) * 2 * NC;
          gated_activation_row(row, row + NC, nc, act, y + m * I + n0);
        }
      }
    }
    free(scratch);
  }
  release_packing_buffer(packed, n_pad * K);
}

// Dot products of up to 4 rows of x with 4 rows of w: 16 independent accumulators.
template <int XR, int WR, typename W>
void dot_tile(const float* x, long K, const W* w, float* y, long ldy, const float* bias,
              bool accumulate) {
  Vf acc[XR][WR];
  for (int i = 0; i < XR; ++i)
    for (int j = 0; j < WR; ++j) acc[i][j] = vzero();
  long k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vf wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = vload(w + j * K + k);
    for (int i = 0; i < XR; ++i) {
      const Vf xv = vload(x + i * K + k);
      for (int j = 0; j < WR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const int rest = (int)(K - k);
    Vf wv[WR];
    for (int j = 0; j < WR; ++j) wv[j] = vload_n(w + j * K + k, rest);
    for (int i = 0; i < XR; ++i) {
      const Vf xv = vload_n(x + i * K + k, rest);
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

template <int WR, typename W>
void dot_rows(const float* x, long M, long K, const W* w, float* y, long ldy,
              const float* bias, bool accumulate) {
  long m = 0;
  for (; m + 4 <= M; m += 4) dot_tile<4, WR, W>(x + m * K, K, w, y + m * ldy, ldy, bias, accumulate);
  switch (M - m) {
    case 3: dot_tile<3, WR, W>(x + m * K, K, w, y + m * ldy, ldy, bias, accumulate); break;
    case 2: dot_tile<2, WR, W>(x + m * K, K, w, y + m * ldy, ldy, bias, accumulate); break;
    case 1: dot_tile<1, WR, W>(x + m * K, K, w, y + m * ldy, ldy, bias, accumulate); break;
    default: break;
  }
}

template <typename W>
void linear_small_m(const float* x, long M, long K, const W* w, long N, const float* bias,
                    float* y, long ldy, bool accumulate) {
  const long blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) if (N * K > 32768)
  for (long b = 0; b < blocks; ++b) {
    const long n = b * 4;
    const W* wb = w + n * K;
    const float* bb = bias ? bias + n : nullptr;
    switch (lmin(4, N - n)) {
      case 4: dot_rows<4, W>(x, M, K, wb, y + n, ldy, bb, accumulate); break;
      case 3: dot_rows<3, W>(x, M, K, wb, y + n, ldy, bb, accumulate); break;
      case 2: dot_rows<2, W>(x, M, K, wb, y + n, ldy, bb, accumulate); break;
      default: dot_rows<1, W>(x, M, K, wb, y + n, ldy, bb, accumulate); break;
    }
  }
}

}  // namespace

// y has row stride ldy >= N, so a caller can fill a slice of columns.
template <typename W>
void linear_strided(const float* x, long M, long K, const W* w, long N, const float* bias, float* y,
                    long ldy, bool accumulate) {
  if (K <= 0) {  // an empty sum: y is the bias
    for (long m = 0; m < M; ++m)
      for (long n = 0; n < N; ++n) y[m * ldy + n] = (accumulate ? y[m * ldy + n] : 0.0f) + (bias ? bias[n] : 0.0f);
    return;
  }
  if (M < kFloatGemmRows) {
    linear_small_m(x, M, K, w, N, bias, y, ldy, accumulate);
  } else {
    linear_packed(x, M, K, w, N, bias, y, ldy, accumulate);
  }
}
template void linear_strided<float>(const float*, long, long, const float*, long, const float*,
                                    float*, long, bool);

void linear(const float* x, long M, long K, const void* w, WeightType wt, long N, const float* bias,
            float* y, bool accumulate) {
  switch (wt) {
    case WeightType::kBF16:
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
                  float* y) {
  if (M >= kFloatGemmRows && I % NR == 0) {
    switch (wt) {
      case WeightType::kBF16: linear_packed_gated(x, M, K, static_cast<const bf16*>(w), I, act, y); return;
      case WeightType::kF16: linear_packed_gated(x, M, K, static_cast<const f16*>(w), I, act, y); return;
      case WeightType::kF32:
      default: linear_packed_gated(x, M, K, static_cast<const float*>(w), I, act, y); return;
    }
  }
  float* gu = (float*)malloc(sizeof(float) * M * 2 * I + 64);
  linear(x, M, K, w, wt, 2 * I, nullptr, gu, false);
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

}  // namespace pyxf::kernels::PYXF_TARGET_NS
