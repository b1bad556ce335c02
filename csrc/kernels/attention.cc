// Tiled attention with an online softmax (flash-attention style): keys and values are read in
// blocks, scores never exist for a whole row. One work item is (sequence, kv head, query block, key
// range): the query heads that share a kv head are processed together, so K/V are never repeated
// (GQA/MQA); where that leaves fewer query rows than a register tile holds (a decode step of a
// model with one query head per kv head), an item takes several kv heads, and a tile's rows read
// their own heads' keys. When there are too few items to occupy every thread (decode), long key
// ranges are split across items and their partial softmaxes merged (flash-decoding). Scores are computed
// against key blocks transposed to [head_dim][kBlockKeys], so each query element multiplies a
// vector of keys; a paged KV cache stores keys that way, other keys are transposed here.
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/scratch.h"
#include "kernels/simd.h"
#if defined(PYXF_AMX)
#include <optional>

#include "kernels/amx.h"
#endif

namespace pyxf::kernels::PYXF_TARGET_NS {
namespace {

constexpr int kBlockKeys = 64;     // keys per block: scores of one row fit in registers
// Query rows (heads x tokens) per work item: three AMX blocks of 32 (SmolLM2, 3 query heads a kv
// head: 32 tokens; MiniLM: a whole ~94-token sentence). On the AMX Xeon 64 and 128 were slower
// with bf16 products (SmolLM2 512-token prefill: 24 / 24 against 22 ms; MiniLM int8 encoding:
// 355 / 305 against 294 ms), and float attention the same within noise.
constexpr int kMaxRows = 96;
constexpr int kScoreVecs = kBlockKeys / kLanes;
constexpr int kTileRows = 4;       // query rows per register tile: 4 x 4 vectors = 16 accumulators
static_assert(kBlockKeys == kKVPageTokens, "a block of keys is one page of a paged KV cache");

// The first key of the block starting at key j0 (a multiple of kBlockKeys) of kv head g; the block's
// keys follow kv_pos_stride apart. `base` is s.k or s.v, whose elements are T.
template <typename T = float>
const T* key_block(const void* base, const AttentionSeq& s, int g, int j0) {
  const T* b = static_cast<const T*>(base);
  if (s.pages) return b + (long)s.pages[j0 / kBlockKeys] * s.page_stride + (long)g * s.kv_head_stride;
  return b + (long)g * s.kv_head_stride + (long)j0 * s.kv_pos_stride;
}

// The keys [begin, end) that the query at position `qpos` sees.
struct KeyRange {
  int begin;
  int end;
};

KeyRange visible_keys(const AttentionSeq& s, const AttentionShape& sh, int qpos) {
  KeyRange r{0, sh.causal ? qpos + 1 : s.n_keys};
  if (sh.window > 0) {
    r.begin = imax(0, qpos - sh.window + 1);
    if (!sh.causal) r.end = imin(r.end, qpos + sh.window);
  }
  return r;
}

// Query rows (the query heads of kv heads kv_head .. kv_head + kv_count - 1, for a block of tokens)
// against a range of keys. An item with a partial slot leaves its unnormalized output and softmax
// statistics there for a merge (a long key range split across items: flash-decoding); one without
// writes the output.
struct WorkItem {
  int seq;
  int kv_head;
  int kv_count;
  int q_begin;
  int q_count;
  int key_begin;  // a multiple of kBlockKeys
  int key_end;
  long partial;   // slot in the partial results, or -1
};

// Row r of an item: query token `t` of query head `h`, which reads kv head `g`. Rows run through
// the query heads of one kv head for each token, then through the item's kv heads.
struct ItemRow {
  int t;
  int h;
  int g;
};

// Rows of an item's q, output, scores and probabilities in its scratch: whole AMX blocks.
int row_capacity(int max_rows) { return (max_rows + 31) / 32 * 32; }

struct ItemScratch {
  float* q;        // [row_capacity][dp], pre-scaled, zero padded
  float* o;        // [row_capacity][dp]
  float* kt_block;  // [head_dim][kBlockKeys], a key block transposed here
  ItemRow* row;                     // [kMaxRows], what each row of the item is (item_row)
  KeyRange* keys;                   // [kMaxRows], the keys each row sees
  float* p;        // [row_capacity][kBlockKeys], scores, then probabilities
  float* row_max;  // [kMaxRows]
  float* row_sum;  // [kMaxRows][kLanes], each row's running sum of probabilities by lane
  float* corr;     // [kMaxRows], this block's rescaling of each row's running output
  int* first;      // [kMaxRows], the first key of this block each row sees
  int* end;        // [kMaxRows], one past the last
  // bf16 products only: q, the block's keys, values and probabilities as pairs (see pair_keys).
  uint16_t* qb;    // [row_capacity][dp]
  uint16_t* kb;    // [dp / 2][kBlockKeys][2]
  uint16_t* vb;    // [kBlockKeys / 2][dp][2]
  uint16_t* pb;    // [row_capacity][kBlockKeys]
};

int padded(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// bf16 halves of one block's keys and values as pairs (bf16 products): keys [dp / 2][kBlockKeys][2],
// then values [kBlockKeys / 2][dp][2].
long pair_halves(int dp) { return 2L * dp * kBlockKeys; }

// A tile's rows read one block of keys or values (kShared: rows[0], loaded once for all rows: the
// query heads of one kv head) or each its own (rows[r]: rows of different kv heads). Either way a
// row's sums run over d (keys) or j (values) in the same order with one accumulator per vector, so
// a row's result does not depend on which tile it is in.

// s[R][0 .. NV vectors) = q[R][D] . kt[D][...] for R query rows: the block's first NV vectors
// of keys (a causal tile on the diagonal sees only some of them).
// Keys and values are float or IEEE half (T: float or f16, widened as they are loaded).
template <int R, int NV, bool kShared, typename T>
void scores_tile(const float* q, int dp, int D, const T* const* kt, float* s) {
  Vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = vzero();
  for (int d = 0; d < D; ++d) {
    Vf k[NV];
    if constexpr (kShared) {
      for (int c = 0; c < NV; ++c) k[c] = vload(kt[0] + (long)d * kBlockKeys + c * kLanes);
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (!kShared) {
        for (int c = 0; c < NV; ++c) k[c] = vload(kt[r] + (long)d * kBlockKeys + c * kLanes);
      }
      const Vf x = vset1(q[(long)r * dp + d]);
      for (int c = 0; c < NV; ++c) acc[r][c] = vfma(x, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) vstore(s + (long)r * kBlockKeys + c * kLanes, acc[r][c]);
}

// o[r][d0 .. d0 + NV lanes) = corr[r] o[r] + sum_j p[r][j] v[j] over j < n_keys, for R rows;
// `tail` lanes of the last vector are real (v rows end at head_dim). v[r] points at column d0 of
// the first value row. kPartial is a template parameter: a branch inside the key loop makes the
// compiler keep the accumulators on the stack.
template <int R, int NV, bool kPartial, bool kShared, typename T>
void pv_tile(const float* p, const float* corr, const T* const* v, long d0, long v_stride, int n_keys,
             int tail, float* o, int dp) {
  Vf acc[R][NV];
  for (int r = 0; r < R; ++r) {
    const Vf c = vset1(corr[r]);
    for (int i = 0; i < NV; ++i) acc[r][i] = vmul(vload(o + (long)r * dp + i * kLanes), c);
  }
  const auto load_row = [&](const T* vj, Vf x[NV]) {
    for (int i = 0; i < NV - 1; ++i) x[i] = vload(vj + i * kLanes);
    x[NV - 1] = kPartial ? vload_n(vj + (NV - 1) * kLanes, tail) : vload(vj + (NV - 1) * kLanes);
  };
  for (int j = 0; j < n_keys; ++j) {
    const long at = d0 + j * v_stride;
    Vf x[NV];
    if constexpr (kShared) load_row(v[0] + at, x);
    for (int r = 0; r < R; ++r) {
      if constexpr (!kShared) load_row(v[r] + at, x);
      const Vf pr = vset1(p[(long)r * kBlockKeys + j]);
      for (int i = 0; i < NV; ++i) acc[r][i] = vfma(pr, x[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) vstore(o + (long)r * dp + i * kLanes, acc[r][i]);
}

template <int R, bool kPartial, bool kShared, typename T>
void pv_chunk(int nv, const float* p, const float* corr, const T* const* v, long d0, long v_stride, int n_keys,
              int tail, float* o, int dp) {
  switch (nv) {
    case 4: pv_tile<R, 4, kPartial, kShared, T>(p, corr, v, d0, v_stride, n_keys, tail, o, dp); break;
    case 3: pv_tile<R, 3, kPartial, kShared, T>(p, corr, v, d0, v_stride, n_keys, tail, o, dp); break;
    case 2: pv_tile<R, 2, kPartial, kShared, T>(p, corr, v, d0, v_stride, n_keys, tail, o, dp); break;
    default: pv_tile<R, 1, kPartial, kShared, T>(p, corr, v, d0, v_stride, n_keys, tail, o, dp); break;
  }
}

template <int R, bool kShared, typename T>
void pv_rows(const float* p, const float* corr, const T* const* v, long v_stride, int n_keys, int D,
             float* o, int dp) {
  // Head dimensions in chunks of up to 4 vectors.
  for (int d0 = 0; d0 < D; d0 += 4 * kLanes) {
    const int nv = imin(4, (D - d0 + kLanes - 1) / kLanes);
    const int tail = imin(kLanes, D - d0 - (nv - 1) * kLanes);
    float* od = o + d0;
    if (tail == kLanes) {
      pv_chunk<R, false, kShared, T>(nv, p, corr, v, d0, v_stride, n_keys, tail, od, dp);
    } else {
      pv_chunk<R, true, kShared, T>(nv, p, corr, v, d0, v_stride, n_keys, tail, od, dp);
    }
  }
}

// Online softmax of one row's block of scores: p = exp(s - new max) on the keys [first, end) of
// the block (exactly 0 outside them, whatever s holds there); returns the factor that rescales the
// row's running output. The running sum stays a vector (row_sum, kLanes floats), summed across
// lanes once the row is done.
float softmax_block(float* s, int first, int end, float& row_max, float* row_sum) {
  const Vf zero = vzero();
  if (end <= first) {
    for (int c = 0; c < kScoreVecs; ++c) vstore(s + c * kLanes, zero);
    return 1.0f;
  }
  for (int j = 0; j < first; ++j) s[j] = -INFINITY;
  const int nv = (end + kLanes - 1) / kLanes, tail = end - (nv - 1) * kLanes;
  const Vf ninf = vset1(-INFINITY);
  Vf vmx = vselect_n(vload(s + (nv - 1) * kLanes), ninf, tail);
  for (int c = 0; c < nv - 1; ++c) vmx = vmax(vmx, vload(s + c * kLanes));
  const float block_max = vmaxr(vmx);
  const float new_max = block_max > row_max ? block_max : row_max;
  const float correction = expf(row_max - new_max);
  row_max = new_max;
  const Vf m = vset1(new_max);
  Vf vsum_p = zero;
  for (int c = 0; c < nv; ++c) {
    Vf e = vexp(vsub(vload(s + c * kLanes), m));
    if (c == nv - 1) e = vselect_n(e, zero, tail);
    const int hidden = first - c * kLanes;  // leading lanes before `first`
    if (hidden > 0) e = vselect_n(zero, e, imin(hidden, kLanes));
    vstore(s + c * kLanes, e);
    vsum_p = vadd(vsum_p, e);
  }
  for (int c = nv; c < kScoreVecs; ++c) vstore(s + c * kLanes, zero);
  vstore(row_sum, vfma(vload(row_sum), vset1(correction), vsum_p));
  return correction;
}

// s[j] = cap * tanh(s[j] / cap) for j < n (rounded up to whole vectors).
void softcap_scores(float* s, int n, float cap) {
  const Vf c = vset1(cap), inv = vset1(1.0f / cap);
  for (int j = 0; j < n; j += kLanes) vstore(s + j, vsoftcap(vload(s + j), c, inv));
}

// score[j] += bias[clamp(rel0 + j, -R, R) + R] for j < n: the relative position bias of one row
// (rel0 = first key position - query position).
void add_position_bias(float* score, int n, int rel0, const float* bias, int R) {
  int j = 0;
  for (; j < n && rel0 + j < -R; ++j) score[j] += bias[0];
  for (; j < n && rel0 + j <= R; ++j) score[j] += bias[rel0 + j + R];
  for (; j < n; ++j) score[j] += bias[2 * R];
}

template <typename T>
using PvRows = void (*)(const float*, const float*, const T* const*, long, int, int, float*, int);
constexpr int capped(int nv) { return nv < kScoreVecs ? nv : kScoreVecs; }

// scores_tile for R rows and the block's first nv (1 .. kScoreVecs) key vectors.
template <int R, bool kShared, typename T>
void scores_rows(int nv, const float* q, int dp, int D, const T* const* kt, float* s) {
  switch (nv) {
    case 1: scores_tile<R, capped(1), kShared, T>(q, dp, D, kt, s); break;
    case 2: scores_tile<R, capped(2), kShared, T>(q, dp, D, kt, s); break;
    case 3: scores_tile<R, capped(3), kShared, T>(q, dp, D, kt, s); break;
    case 4: scores_tile<R, capped(4), kShared, T>(q, dp, D, kt, s); break;
    case 5: scores_tile<R, capped(5), kShared, T>(q, dp, D, kt, s); break;
    case 6: scores_tile<R, capped(6), kShared, T>(q, dp, D, kt, s); break;
    case 7: scores_tile<R, capped(7), kShared, T>(q, dp, D, kt, s); break;
    default: scores_tile<R, capped(8), kShared, T>(q, dp, D, kt, s); break;
  }
}
static_assert(kScoreVecs <= 8, "scores_rows covers up to 8 key vectors");
template <typename T>
using ScoresRows = void (*)(int, const float*, int, int, const T* const*, float*);
// [shared][rows]
template <typename T>
constexpr ScoresRows<T> kScoresRows[2][kTileRows + 1] = {
    {nullptr, scores_rows<1, false, T>, scores_rows<2, false, T>, scores_rows<3, false, T>, scores_rows<4, false, T>},
    {nullptr, scores_rows<1, true, T>, scores_rows<2, true, T>, scores_rows<3, true, T>, scores_rows<4, true, T>}};
template <typename T>
constexpr PvRows<T> kPvRows[2][kTileRows + 1] = {
    {nullptr, pv_rows<1, false, T>, pv_rows<2, false, T>, pv_rows<3, false, T>, pv_rows<4, false, T>},
    {nullptr, pv_rows<1, true, T>, pv_rows<2, true, T>, pv_rows<3, true, T>, pv_rows<4, true, T>}};

// kt[d][j] = k[j][d] for the bk keys of one block (rows kv_pos_stride apart), zero past bk: whole
// vectors of keys by square blocks (or gathers past the last whole block of d), the rest one by one.
void transpose_key_block(const float* k, long stride, int bk, int D, float* kt) {
  const int bk_vec = bk / kLanes * kLanes, d_vec = D / kLanes * kLanes;
  for (int j = 0; j < bk_vec; j += kLanes) {
    const float* kj = k + (long)j * stride;
    for (int d = 0; d < d_vec; d += kLanes) vtranspose_block(kj + d, stride, kt + (long)d * kBlockKeys + j, kBlockKeys);
    for (int d = d_vec; d < D; ++d) vstore(kt + (long)d * kBlockKeys + j, vgather(kj + d, stride));
  }
  for (int d = 0; d < D; ++d) {
    float* ktd = kt + (long)d * kBlockKeys;
    for (int j = bk_vec; j < bk; ++j) ktd[j] = k[(long)j * stride + d];
    for (int j = bk; j < kBlockKeys; ++j) ktd[j] = 0.0f;
  }
}

// Whether this table takes the products of many rows in bf16 (AttentionShape::products): on tiles
// for every model that asks; on vdpbf16ps for bf16 models, unless the CPU's vdpbf16ps is slow
// (bf16_gemm_widens: float FMAs are faster there, SmolLM2's attention 59 -> 45 ms a prefill).
inline bool bf16_products(const AttentionShape& sh) {
#if defined(PYXF_AMX)
  return sh.products != AttentionProducts::kFloat;
#elif defined(PYXF_BF16_DOT)
  return sh.products == AttentionProducts::kBf16 && !bf16_gemm_widens();
#else
  (void)sh;
  return false;
#endif
}

#if defined(PYXF_BF16_DOT)
// ---- bf16 products (AttentionShape::products) ----
//
// vdpbf16ps multiplies pairs: lane i gains a[2i] b[2i] + a[2i+1] b[2i+1] (bf16 products, fp32 sums).
// The scores pair depths: a block's keys are stored [D / 2][kBlockKeys][2] (one vector: 16 keys x 2
// depths) and a query row's pair of depths is one 32-bit broadcast. The values pair keys: [kBlockKeys
// / 2][dp][2] (16 dimensions x 2 keys), against a broadcast pair of probabilities. Scores, the
// softmax and the running output stay float.

// Rows from which an item takes the bf16 path: below, rounding its block of keys and values costs
// more than the products it saves (a decode step's 1-4 query rows).
constexpr int kBf16Rows = 8;

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// 32 bf16 [a0, b0, a1, b1, ...]: the 16 floats of a and b interleaved, rounded to nearest even.
static inline __m512i interleave_bf16(__m512 a, __m512 b) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                         7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

// dst[0, n) = bf16(src[0, n)), n a multiple of kLanes.
void round_to_bf16(const float* src, int n, uint16_t* dst) {
  for (int i = 0; i < n; i += kLanes) _mm256_storeu_si256((__m256i*)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}

// kb[dd][j][2] = (kt[2 dd][j], kt[2 dd + 1][j]) for a transposed block kt [D][kBlockKeys], D even.
template <typename T>
void pair_keys(const T* kt, int D, uint16_t* kb) {
  for (int dd = 0; dd < D / 2; ++dd) {
    const T* k0 = kt + (long)2 * dd * kBlockKeys;
    for (int c = 0; c < kBlockKeys; c += kLanes) {
      _mm512_storeu_si512(kb + ((long)dd * kBlockKeys + c) * 2,
                          interleave_bf16(vload(k0 + c).v, vload(k0 + kBlockKeys + c).v));
    }
  }
}

// vb[jj][d][2] = (v[2 jj][d], v[2 jj + 1][d]) for the bk value rows of a block (`stride` apart),
// zero past bk and past D (up to dp).
template <typename T>
void pair_values(const T* v, long stride, int bk, int D, int dp, uint16_t* vb) {
  for (int jj = 0; jj < kBlockKeys / 2; ++jj) {
    const int j = 2 * jj;
    for (int d = 0; d < dp; d += kLanes) {
      const int n = imin(kLanes, D - d);
      const __m512 a = j < bk ? vload_n(v + (long)j * stride + d, n).v : _mm512_setzero_ps();
      const __m512 b = j + 1 < bk ? vload_n(v + (long)(j + 1) * stride + d, n).v : _mm512_setzero_ps();
      _mm512_storeu_si512(vb + ((long)jj * dp + d) * 2, interleave_bf16(a, b));
    }
  }
}

// Both pairings of one block (bk keys from kt, transposed, and v, rows v_stride apart) into out.
template <typename T>
void pair_block(const T* kt, const T* v, long v_stride, int bk, int D, int dp, uint16_t* out) {
  pair_keys(kt, D, out);
  pair_values(v, v_stride, bk, D, dp, out + (long)dp * kBlockKeys);
}

// One step of a bf16 tile: acc[r][c] += the bf16 pair at a + r * lda (broadcast) times v[c], for R
// rows and NV vectors.
template <int R, int NV>
inline void dp_step(__m512 (&acc)[R][NV], const uint16_t* a, long lda, const __m512bh (&v)[NV]) {
  for (int r = 0; r < R; ++r) {
    int32_t pair;
    memcpy(&pair, a + r * lda, 4);
    const __m512bh x = as_bh(_mm512_set1_epi32(pair));
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x, v[c]);
  }
}

// s[R][0 .. NV vectors) = q[R] . keys of the block, on pairs of depths (qb rows of dp bf16).
template <int R, int NV>
void scores_tile_bf16(const uint16_t* qb, int dp, int D, const uint16_t* kb, float* s) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int dd = 0; dd < D / 2; ++dd) {
    __m512bh k[NV];
    for (int c = 0; c < NV; ++c) k[c] = as_bh(_mm512_loadu_si512(kb + ((long)dd * kBlockKeys + c * kLanes) * 2));
    dp_step<R, NV>(acc, qb + 2 * dd, dp, k);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(s + (long)r * kBlockKeys + c * kLanes, acc[r][c]);
}

template <int R>
void scores_rows_bf16(int nv, const uint16_t* qb, int dp, int D, const uint16_t* kb, float* s) {
  switch (nv) {
    case 1: scores_tile_bf16<R, 1>(qb, dp, D, kb, s); break;
    case 2: scores_tile_bf16<R, 2>(qb, dp, D, kb, s); break;
    case 3: scores_tile_bf16<R, 3>(qb, dp, D, kb, s); break;
    default: scores_tile_bf16<R, 4>(qb, dp, D, kb, s); break;
  }
}
static_assert(kScoreVecs == 4, "scores_rows_bf16 covers 4 key vectors");

// o[R][d0 .. d0 + NV vectors) = corr o + sum over pairs of keys jj < pairs of pb[r][2 jj..] vb[jj].
template <int R, int NV>
void pv_tile_bf16(const uint16_t* pb, const float* corr, const uint16_t* vb, int d0, int pairs, float* o, int dp) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]);
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_mul_ps(_mm512_loadu_ps(o + (long)r * dp + d0 + i * kLanes), c);
  }
  for (int jj = 0; jj < pairs; ++jj) {
    __m512bh x[NV];
    for (int i = 0; i < NV; ++i) x[i] = as_bh(_mm512_loadu_si512(vb + ((long)jj * dp + d0 + i * kLanes) * 2));
    dp_step<R, NV>(acc, pb + 2 * jj, kBlockKeys, x);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + (long)r * dp + d0 + i * kLanes, acc[r][i]);
}

template <int R>
void pv_rows_bf16(const uint16_t* pb, const float* corr, const uint16_t* vb, int pairs, int dp, float* o) {
  for (int d0 = 0; d0 < dp; d0 += 4 * kLanes) {
    switch (imin(4, (dp - d0) / kLanes)) {
      case 1: pv_tile_bf16<R, 1>(pb, corr, vb, d0, pairs, o, dp); break;
      case 2: pv_tile_bf16<R, 2>(pb, corr, vb, d0, pairs, o, dp); break;
      case 3: pv_tile_bf16<R, 3>(pb, corr, vb, d0, pairs, o, dp); break;
      default: pv_tile_bf16<R, 4>(pb, corr, vb, d0, pairs, o, dp); break;
    }
  }
}

using ScoresRowsBf16 = void (*)(int, const uint16_t*, int, int, const uint16_t*, float*);
using PvRowsBf16 = void (*)(const uint16_t*, const float*, const uint16_t*, int, int, float*);
constexpr ScoresRowsBf16 kScoresRowsBf16[kTileRows + 1] = {nullptr, scores_rows_bf16<1>, scores_rows_bf16<2>,
                                                           scores_rows_bf16<3>, scores_rows_bf16<4>};
constexpr PvRowsBf16 kPvRowsBf16[kTileRows + 1] = {nullptr, pv_rows_bf16<1>, pv_rows_bf16<2>, pv_rows_bf16<3>,
                                                   pv_rows_bf16<4>};
#if defined(PYXF_AMX)
// With AMX (amx.h) an item of many rows makes both products on tiles, 32 rows x 32 keys or
// dimensions a block, over the same pairs: the scores take qb [rows][dp] (A, depth d) and kb (B:
// pairs of depths x keys); the values take pb [rows][kBlockKeys] (A, depth j) and vb (B: pairs of
// keys x dimensions). Rows are padded to whole blocks (zeros in qb and pb).
constexpr int kAmxMinRows = 16;

// s[rows][kBlockKeys] = qb . keys of the block, for `blocks` blocks of 32 rows.
void scores_amx(const uint16_t* qb, int dp, int D, const uint16_t* kb, int blocks, float* s) {
  for (int b = 0; b < blocks; ++b) {
    for (int c0 = 0; c0 < kBlockKeys; c0 += amx::kBlock) {
      amx::zero_block();
      amx::multiply_steps(qb + (long)b * amx::kBlock * dp, dp, kb + 2 * c0, 2 * kBlockKeys, 2 * 16, D / amx::kStep);
      amx::store_block(s + (long)b * amx::kBlock * kBlockKeys + c0, kBlockKeys);
    }
  }
}

// o[rows][dp] += pb . values of the block (o already rescaled), for `blocks` blocks of 32 rows.
void pv_amx(const uint16_t* pb, const uint16_t* vb, int dp, int blocks, float* o) {
  for (int b = 0; b < blocks; ++b) {
    for (int d0 = 0; d0 < dp; d0 += amx::kBlock) {
      float* ob = o + (long)b * amx::kBlock * dp + d0;
      amx::load_block(ob, dp);
      amx::multiply_steps(pb + (long)b * amx::kBlock * kBlockKeys, kBlockKeys, vb + 2 * d0, 2 * dp, 2 * 16,
                          kBlockKeys / amx::kStep);
      amx::store_block(ob, dp);
    }
  }
}
#endif  // PYXF_AMX
#endif  // PYXF_BF16_DOT

ItemRow item_row(const WorkItem& item, int group, int r) {
  const int per_kv_head = group * item.q_count, i = r % per_kv_head;
  const int g = item.kv_head + r / per_kv_head;
  return {item.q_begin + i / group, g * group + i % group, g};
}

// Asks for the cache lines of the block of keys from j0 of each kv head of `item`, and its values,
// while the block before it is computed: paged caches only, whose blocks (a page each) lie
// wherever their pages are, so the hardware's prefetchers stop at every block's start.
template <typename T>
void prefetch_blocks(const AttentionSeq& s, const WorkItem& item, int j0) {
  if (!s.pages) return;
  const long bytes = (long)kBlockKeys * s.kv_pos_stride * (long)sizeof(T);  // keys or values of one page
  for (int i = 0; i < item.kv_count; ++i) {
    const char* k = reinterpret_cast<const char*>(key_block<T>(s.k, s, item.kv_head + i, j0));
    const char* v = reinterpret_cast<const char*>(key_block<T>(s.v, s, item.kv_head + i, j0));
    prefetch_lines(k, bytes);
    prefetch_lines(v, bytes);
  }
}

// The block of transposed keys [D][kBlockKeys] of kv head g starting at key j0: straight from a
// cache that stores keys transposed (a half cache always does), from the sequence's shared
// transposes, or transposed here into sc.kt_block (an item of one kv head).
template <typename T>
const T* transposed_keys(int g, const AttentionSeq& s, int D, const float* shared_kt, int j0, int bk, ItemScratch& sc) {
  if constexpr (std::is_same_v<T, f16>) {
    return key_block<f16>(s.k, s, g, j0);
  } else {
    if (s.keys_transposed) return key_block(s.k, s, g, j0);
    if (shared_kt) return shared_kt + (long)(j0 / kBlockKeys) * D * kBlockKeys;
    transpose_key_block(key_block(s.k, s, g, j0), s.kv_pos_stride, bk, D, sc.kt_block);
    return sc.kt_block;
  }
}

// One work item, whose keys and values are T (AttentionSeq::kv_type). shared_kt: this item's kv
// head's keys already transposed block by block ([block][D][kBlockKeys]), or null. shared_pairs:
// its blocks' bf16 pairs (pair_block, pair_halves(dp) a block), or null: the item pairs each block.
template <typename T>
void run_item(const WorkItem& item, const AttentionSeq& s, const AttentionShape& sh, const float* shared_kt,
              const uint16_t* shared_pairs, ItemScratch& sc, float* partial) {
  const int D = sh.head_dim, dp = padded(D);
  const int group = sh.n_heads / sh.n_kv_heads;
  const int rows = item.kv_count * group * item.q_count;
  const int shared = item.kv_count == 1;  // every row reads one kv head's keys and values

  const Vf scale = vset1(sh.scale);
  for (int r = 0; r < rows; ++r) {
    const ItemRow row = sc.row[r] = item_row(item, group, r);
    sc.keys[r] = visible_keys(s, sh, s.n_past + row.t);
    const float* src = s.q + (long)row.t * sh.q_row_stride + (long)row.h * D;
    float* dst = sc.q + (long)r * dp;
    for (int d = 0; d < dp; d += kLanes) {  // zeros past D
      const Vf x = d + kLanes <= D ? vload(src + d) : vload_n(src + d, D - d);
      vstore(dst + d, vmul(x, scale));
      vstore(sc.o + (long)r * dp + d, vzero());
    }
    sc.row_max[r] = -INFINITY;
    vstore(sc.row_sum + (long)r * kLanes, vzero());
  }
#if defined(PYXF_BF16_DOT)
  const bool bf16 = bf16_products(sh) && shared && rows >= kBf16Rows && D % 2 == 0;
  if (bf16) round_to_bf16(sc.q, rows * dp, sc.qb);
#else
  constexpr bool bf16 = false;
#endif
#if defined(PYXF_AMX)
  const bool tiles = bf16 && rows >= kAmxMinRows && D % amx::kStep == 0;
  const int blocks = (rows + amx::kBlock - 1) / amx::kBlock, padded_rows = blocks * amx::kBlock;
  std::optional<amx::TileScope> tile_scope;
  if (tiles) {
    tile_scope.emplace();
    const long pad = (long)(padded_rows - rows);
    memset(sc.qb + (long)rows * dp, 0, sizeof(uint16_t) * pad * dp);
    memset(sc.pb + (long)rows * kBlockKeys, 0, sizeof(uint16_t) * pad * kBlockKeys);
    memset(sc.o + (long)rows * dp, 0, sizeof(float) * pad * dp);
  }
#else
  constexpr bool tiles = false;
#endif

  // The block's transposed keys and values of each kv head of the item, and of a tile's rows.
  const T* kt_of[kTileRows];
  const T* v_of[kTileRows];
  const T* kt[kTileRows];
  const T* v[kTileRows];
  const auto tile_blocks = [&](int r, int n) {
    for (int i = 0; i < n; ++i) {
      kt[i] = kt_of[sc.row[r + i].g - item.kv_head];
      v[i] = v_of[sc.row[r + i].g - item.kv_head];
    }
  };
  for (int j0 = item.key_begin; j0 < item.key_end; j0 += kBlockKeys) {
    const int bk = imin(kBlockKeys, item.key_end - j0);
    if (!shared_pairs && j0 + kBlockKeys < item.key_end) prefetch_blocks<T>(s, item, j0 + kBlockKeys);
    for (int i = 0; i < item.kv_count; ++i) {
      const int g = item.kv_head + i;
      kt_of[i] = transposed_keys<T>(g, s, D, shared_kt, j0, bk, sc);
      v_of[i] = key_block<T>(s.v, s, g, j0);
    }
    for (int r = 0; r < rows; ++r) {
      sc.first[r] = imax(0, sc.keys[r].begin - j0);
      sc.end[r] = imax(0, imin(bk, sc.keys[r].end - j0));
    }
#if defined(PYXF_BF16_DOT)
    const uint16_t* kb = sc.kb;  // the block's keys and values as bf16 pairs
    const uint16_t* vb = sc.vb;
    if (bf16 && shared_pairs) {
      kb = shared_pairs + (long)(j0 / kBlockKeys) * pair_halves(dp);
      vb = kb + (long)dp * kBlockKeys;
    } else if (bf16) {
      pair_keys(kt_of[0], D, sc.kb);
      pair_values(v_of[0], s.kv_pos_stride, bk, D, dp, sc.vb);
    }
#endif
#if defined(PYXF_AMX)
    if (tiles) scores_amx(sc.qb, dp, D, kb, blocks, sc.p);
#endif
    for (int r = 0; r < rows && !tiles; r += kTileRows) {
      const int n = imin(kTileRows, rows - r);
      int keys = 0;  // the tile's widest row (later rows see more keys)
      for (int i = 0; i < n; ++i) keys = imax(keys, sc.end[r + i]);
      if (keys == 0) continue;  // softmax_block zeroes these rows
      const int nv = (keys + kLanes - 1) / kLanes;
#if defined(PYXF_BF16_DOT)
      if (bf16) {
        kScoresRowsBf16[n](nv, sc.qb + (long)r * dp, dp, D, kb, sc.p + (long)r * kBlockKeys);
        continue;
      }
#endif
      tile_blocks(r, n);
      kScoresRows<T>[shared][n](nv, sc.q + (long)r * dp, dp, D, kt, sc.p + (long)r * kBlockKeys);
    }
    for (int r = 0; r < rows; ++r) {
      float* score = sc.p + (long)r * kBlockKeys;
      if (sc.end[r] > sc.first[r]) {
        if (sh.softcap > 0.0f) softcap_scores(score, sc.end[r], sh.softcap);
        if (sh.pos_bias) {
          const ItemRow& row = sc.row[r];
          const int R = sh.pos_bias_radius;
          add_position_bias(score, sc.end[r], j0 - (s.n_past + row.t), sh.pos_bias + (long)row.h * (2 * R + 1), R);
        }
      }
      sc.corr[r] = softmax_block(score, sc.first[r], sc.end[r], sc.row_max[r], sc.row_sum + (long)r * kLanes);
    }
#if defined(PYXF_AMX)
    if (tiles) {
      round_to_bf16(sc.p, rows * kBlockKeys, sc.pb);
      for (int r = 0; r < rows; ++r) {
        const Vf c = vset1(sc.corr[r]);
        for (int d = 0; d < dp; d += kLanes) vstore(sc.o + (long)r * dp + d, vmul(vload(sc.o + (long)r * dp + d), c));
      }
      pv_amx(sc.pb, vb, dp, blocks, sc.o);
    }
#endif
    for (int r = 0; r < rows && !tiles; r += kTileRows) {
      const int n = imin(kTileRows, rows - r);
      int keys = 0;  // the tile's widest row; probabilities outside a row's own keys are 0
      for (int i = 0; i < n; ++i) keys = imax(keys, sc.end[r + i]);
#if defined(PYXF_BF16_DOT)
      if (bf16) {
        round_to_bf16(sc.p + (long)r * kBlockKeys, n * kBlockKeys, sc.pb + (long)r * kBlockKeys);
        kPvRowsBf16[n](sc.pb + (long)r * kBlockKeys, sc.corr + r, vb, (keys + 1) / 2, dp, sc.o + (long)r * dp);
        continue;
      }
#endif
      tile_blocks(r, n);
      kPvRows<T>[shared][n](sc.p + (long)r * kBlockKeys, sc.corr + r, v, s.kv_pos_stride, keys, D,
                         sc.o + (long)r * dp, dp);
    }
  }

  if (partial) {  // [rows][dp] output, then row_max, then row_sum
    memcpy(partial, sc.o, sizeof(float) * rows * dp);
    memcpy(partial + (long)rows * dp, sc.row_max, sizeof(float) * rows);
    for (int r = 0; r < rows; ++r) partial[(long)rows * (dp + 1) + r] = vsum(vload(sc.row_sum + (long)r * kLanes));
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const ItemRow& row = sc.row[r];
    float* dst = s.out + (long)row.t * sh.out_row_stride + (long)row.h * D;
    const float sum = vsum(vload(sc.row_sum + (long)r * kLanes));
    const Vf inv = vset1(sum > 0.0f ? 1.0f / sum : 0.0f);
    const float* orow = sc.o + (long)r * dp;
    int d = 0;
    for (; d + kLanes <= D; d += kLanes) vstore(dst + d, vmul(vload(orow + d), inv));
    if (d < D) vstore_n(dst + d, vmul(vload(orow + d), inv), D - d);
  }
}

// The output of the items [first, first + count) that split one item's keys: softmaxes over
// disjoint key ranges combine by rescaling each to the common maximum.
void merge_partials(const WorkItem* items, int count, const AttentionSeq& s, const AttentionShape& sh,
                    const float* partials, long slot_floats) {
  const int D = sh.head_dim, dp = padded(D);
  const int group = sh.n_heads / sh.n_kv_heads;
  const int rows = items[0].kv_count * group * items[0].q_count;
  for (int r = 0; r < rows; ++r) {
    float m = -INFINITY;
    for (int i = 0; i < count; ++i) {
      const float mi = partials[items[i].partial * slot_floats + (long)rows * dp + r];
      m = mi > m ? mi : m;
    }
    const ItemRow row = item_row(items[0], group, r);
    float* dst = s.out + (long)row.t * sh.out_row_stride + (long)row.h * D;
    for (int d = 0; d < D; ++d) dst[d] = 0.0f;
    if (m == -INFINITY) continue;  // no visible key at all
    float sum = 0.0f;
    for (int i = 0; i < count; ++i) {
      const float* slot = partials + items[i].partial * slot_floats;
      const float w = expf(slot[(long)rows * dp + r] - m);
      sum += w * slot[(long)rows * (dp + 1) + r];
      const float* o = slot + (long)r * dp;
      for (int d = 0; d < D; ++d) dst[d] += w * o[d];
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int d = 0; d < D; ++d) dst[d] *= inv;
  }
}

// Work items in the order they are handed out; items that split one query block's keys are
// adjacent, and `merges` lists each such run (first item, count).
struct Plan {
  std::vector<WorkItem> items;
  std::vector<std::pair<int, int>> merges;
  long n_partials = 0;
};

// Few items (decode: one query block per kv head and sequence) leave threads idle, so each item's
// keys are split into runs of whole blocks until there are about kItemsPerThread items per thread
// (threads 1: a call on one thread, whose keys are never split).
constexpr int kItemsPerThread = 4;
// A call runs on the calling thread alone below both of these: multiply-adds (queries x keys x
// head_dim, scores and values) in all, and the bytes of keys and values of one kv head of a
// sequence. A decode step's attention does little arithmetic on many bytes, and in a decode step
// they come from memory (the step's weights pass through the caches between two reads of one
// layer's cache), where one thread reads at about half the bandwidth of two: SmolLM2 at 150-400
// keys, 30 layers, 2 threads on Zen 5: 1.15 ms a token on one thread, 0.80 ms on two. 16 KiB (32
// keys of 64 dimensions) take about as long to read as starting the thread team. The bytes are
// counted per kv head, so that a head's result (which the split of its keys decides, see
// plan_items) does not depend on the heads computed beside it.
constexpr long kSerialWork = 1L << 19;
constexpr long kSerialHeadBytes = 1L << 14;

bool runs_alone(const AttentionSeq* seqs, int n_seqs, const AttentionShape& sh) {
  long work = 0, head_bytes = 0;
  for (int s = 0; s < n_seqs; ++s) {
    const long keys = sh.causal ? seqs[s].n_past + seqs[s].n_new : seqs[s].n_keys;
    work += 2L * seqs[s].n_new * sh.n_heads * keys * sh.head_dim;
    const long bytes = 2L * type_bytes(seqs[s].kv_type) * keys * sh.head_dim;
    if (bytes > head_bytes) head_bytes = bytes;
  }
  return work < kSerialWork && head_bytes < kSerialHeadBytes;
}

Plan plan_items(const AttentionSeq* seqs, int n_seqs, const AttentionShape& sh, int q_block, int threads) {
  const int group = sh.n_heads / sh.n_kv_heads;
  std::vector<WorkItem> whole;
  for (int s = 0; s < n_seqs; ++s) {
    const AttentionSeq& a = seqs[s];
    for (int q0 = 0; q0 < a.n_new; q0 += q_block) {
      const int count = imin(q_block, a.n_new - q0);
      const int begin = visible_keys(a, sh, a.n_past + q0).begin / kBlockKeys * kBlockKeys;
      const int end = visible_keys(a, sh, a.n_past + q0 + count - 1).end;
      // The rows of one kv head that fill less than a tile (a decode step of one or two query heads
      // per kv head) are joined by the next kv heads' rows; their keys must be stored transposed
      // (a paged cache): an item transposes at most one kv head's keys itself.
      const int rows = group * count;
      const int kv_heads = a.keys_transposed && rows < kTileRows ? kTileRows / rows : 1;
      for (int g = 0; g < sh.n_kv_heads; g += kv_heads) {
        whole.push_back({s, g, imin(kv_heads, sh.n_kv_heads - g), q0, count, begin, imax(begin, end), -1});
      }
    }
  }
  Plan plan;
  const long target = threads > 1 ? (long)kItemsPerThread * threads : 0;
  const int splits = whole.empty() || whole.size() >= (size_t)target ? 1 : (int)((target + whole.size() - 1) / whole.size());
  for (const WorkItem& w : whole) {
    const int blocks = (w.key_end - w.key_begin + kBlockKeys - 1) / kBlockKeys;
    const int parts = imin(splits, blocks);
    if (parts <= 1) {
      plan.items.push_back(w);
      continue;
    }
    const int per = (blocks + parts - 1) / parts;
    plan.merges.push_back({(int)plan.items.size(), 0});
    for (int b = 0; b < blocks; b += per) {
      WorkItem part = w;
      part.key_begin = w.key_begin + b * kBlockKeys;
      part.key_end = imin(w.key_end, part.key_begin + per * kBlockKeys);
      part.partial = plan.n_partials++;
      plan.items.push_back(part);
      ++plan.merges.back().second;
    }
  }
  return plan;
}

// One position's key (transposed) and value into a page of float or half elements T.
template <typename T>
void store_kv_slot(const KVSlotWrite& w, int D) {
  T* keys = static_cast<T*>(w.key_page) + w.slot;
  T* values = static_cast<T*>(w.value_page) + (long)w.slot * D;
  if constexpr (std::is_same_v<T, f16>) {
    for (int d = 0; d < D; ++d) keys[(long)d * kKVPageTokens] = to_f16(w.key[d]);
    int d = 0;
    for (; d + kLanes <= D; d += kLanes) vstore(values + d, vload(w.value + d));
    for (; d < D; ++d) values[d] = to_f16(w.value[d]);
  } else {
    for (int d = 0; d < D; ++d) keys[(long)d * kKVPageTokens] = w.key[d];
    memcpy(values, w.value, sizeof(float) * D);
  }
}

// The lines store_kv_slot<T>(w, D) writes: one per element of the transposed key, the value's row.
template <typename T>
void prefetch_kv_slot(const KVSlotWrite& w, int D) {
  const T* keys = static_cast<const T*>(w.key_page) + w.slot;
  const char* value = reinterpret_cast<const char*>(static_cast<const T*>(w.value_page) + (long)w.slot * D);
  for (int d = 0; d < D; ++d) prefetch_line_for_write(keys + (long)d * kKVPageTokens);
  for (long b = 0; b < (long)sizeof(T) * D; b += 64) prefetch_line_for_write(value + b);
}

}  // namespace

void prefetch_kv_slots(const KVSlotWrite* writes, long n, int head_dim) {
  for (long i = 0; i < n; ++i) {
    if (writes[i].type == WeightType::kF16) {
      prefetch_kv_slot<f16>(writes[i], head_dim);
    } else {
      prefetch_kv_slot<float>(writes[i], head_dim);
    }
  }
}

void store_kv_slots(const KVSlotWrite* writes, long n, int head_dim) {
  for_each_index(n, n >= kParallelSlotWrites, [&](long i) {
    if (writes[i].type == WeightType::kF16) {
      store_kv_slot<f16>(writes[i], head_dim);
    } else {
      store_kv_slot<float>(writes[i], head_dim);
    }
  });
}

void attention(const AttentionSeq* seqs, int n_seqs, const AttentionShape& sh) {
  const int group = sh.n_heads / sh.n_kv_heads;
  const int q_block = group >= kMaxRows ? 1 : kMaxRows / group;
  const int D = sh.head_dim, dp = padded(D);
  const long block_floats = (long)D * kBlockKeys;
  const int max_rows = group * q_block;
  const int threads = runs_alone(seqs, n_seqs, sh) ? 1 : omp_get_max_threads();
  const Plan plan = plan_items(seqs, n_seqs, sh, q_block, threads);
  const long n_items = (long)plan.items.size();

  // A sequence with several query blocks per kv head whose keys are stored as rows has them
  // transposed once, up front, for all of its blocks (prefill); one block per kv head (decode)
  // transposes inside the item, in L1.
  long shared_blocks = 0;
  std::vector<long> kt_offset(n_seqs, -1);
  auto blocks_of = [&](int s) {
    const int keys = sh.causal ? seqs[s].n_past + seqs[s].n_new : seqs[s].n_keys;
    return (keys + kBlockKeys - 1) / kBlockKeys;
  };
  for (int s = 0; s < n_seqs; ++s) {
    if (seqs[s].keys_transposed || seqs[s].n_new <= q_block) continue;
    kt_offset[s] = shared_blocks;
    shared_blocks += (long)sh.n_kv_heads * blocks_of(s);
  }
  float* shared_kt = shared_blocks ? (float*)aligned_alloc(64, sizeof(float) * shared_blocks * block_floats) : nullptr;
  const long slot_floats = (long)max_rows * (dp + 2);
  const Scratch partial_memory(kAttentionPartials, (long)sizeof(float) * plan.n_partials * slot_floats);
  float* const partials = partial_memory.as<float>();  // every slot is written by its item

  // With bf16 products, a sequence with several query blocks has each block of keys and values
  // paired once, up front, instead of by every item that reads it.
  long pair_blocks = 0;
  std::vector<long> pairs_offset(n_seqs, -1);
#if defined(PYXF_BF16_DOT)
  for (int s = 0; s < n_seqs && bf16_products(sh) && D % 2 == 0 && max_rows >= kBf16Rows; ++s) {
    if (seqs[s].n_new <= q_block) continue;
    pairs_offset[s] = pair_blocks;
    pair_blocks += (long)sh.n_kv_heads * blocks_of(s);
  }
  uint16_t* shared_pairs =
      pair_blocks ? (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * pair_blocks * pair_halves(dp)) : nullptr;
#else
  uint16_t* shared_pairs = nullptr;
#endif

#pragma omp parallel if (n_items > 1 && threads > 1)
  {
    if (shared_kt) {
#pragma omp for schedule(static)
      for (int s = 0; s < n_seqs; ++s) {
        if (kt_offset[s] < 0) continue;
        const AttentionSeq& a = seqs[s];
        const int nb = blocks_of(s);
        const int keys = sh.causal ? a.n_past + a.n_new : a.n_keys;
        for (int g = 0; g < sh.n_kv_heads; ++g) {
          for (int b = 0; b < nb; ++b) {
            const long j0 = (long)b * kBlockKeys;
            transpose_key_block(key_block(a.k, a, g, (int)j0), a.kv_pos_stride,
                                imin(kBlockKeys, keys - (int)j0), D,
                                shared_kt + (kt_offset[s] + (long)g * nb + b) * block_floats);
          }
        }
      }
    }
    // bf16 pairs after the floats: q and probabilities of every row, a block's keys and values.
    const long cap = row_capacity(max_rows);
    const long floats = 2L * cap * dp + block_floats + cap * kBlockKeys + (4L + kLanes) * max_rows;
    const long halves = bf16_products(sh) ? cap * dp + 2L * dp * kBlockKeys + cap * kBlockKeys : 0;
    const long item_bytes = (long)(sizeof(ItemRow) + sizeof(KeyRange)) * max_rows;
    const long float_bytes = (long)(sizeof(float) * floats + sizeof(uint16_t) * halves + 63) / 64 * 64;
    const Scratch memory(kAttentionItem, float_bytes + item_bytes);
    float* mem = memory.as<float>();
    ItemScratch sc;
    sc.q = mem;
    sc.o = sc.q + cap * dp;
    sc.kt_block = sc.o + cap * dp;
    sc.p = sc.kt_block + block_floats;
    sc.row_max = sc.p + cap * kBlockKeys;
    sc.row_sum = sc.row_max + max_rows;
    sc.corr = sc.row_sum + (long)max_rows * kLanes;
    sc.first = (int*)(sc.corr + max_rows);
    sc.end = sc.first + max_rows;
    sc.qb = (uint16_t*)(sc.end + max_rows);
    sc.kb = sc.qb + cap * dp;
    sc.vb = sc.kb + (long)dp * kBlockKeys;
    sc.pb = sc.vb + (long)dp * kBlockKeys;
    sc.row = reinterpret_cast<ItemRow*>(memory.as<char>() + float_bytes);
    sc.keys = reinterpret_cast<KeyRange*>(sc.row + max_rows);
#if defined(PYXF_BF16_DOT)
    if (shared_pairs) {  // after the transposes above (the barrier of their omp for)
#pragma omp for schedule(static) collapse(2)
      for (int s = 0; s < n_seqs; ++s) {
        for (int g = 0; g < sh.n_kv_heads; ++g) {
          if (pairs_offset[s] < 0) continue;
          const AttentionSeq& a = seqs[s];
          const int nb = blocks_of(s), keys = sh.causal ? a.n_past + a.n_new : a.n_keys;
          for (int b = 0; b < nb; ++b) {
            const int j0 = b * kBlockKeys, bk = imin(kBlockKeys, keys - j0);
            uint16_t* out = shared_pairs + (pairs_offset[s] + (long)g * nb + b) * pair_halves(dp);
            if (!a.keys_transposed) {
              const float* kt = shared_kt + (kt_offset[s] + (long)g * nb + b) * block_floats;
              pair_block(kt, key_block(a.v, a, g, j0), a.kv_pos_stride, bk, D, dp, out);
            } else if (a.kv_type == WeightType::kF16) {
              pair_block(key_block<f16>(a.k, a, g, j0), key_block<f16>(a.v, a, g, j0), a.kv_pos_stride, bk, D, dp, out);
            } else {
              pair_block(key_block(a.k, a, g, j0), key_block(a.v, a, g, j0), a.kv_pos_stride, bk, D, dp, out);
            }
          }
        }
      }
    }
#endif
#pragma omp for schedule(dynamic, 1)
    for (long i = 0; i < n_items; ++i) {
      const WorkItem& it = plan.items[i];
      const float* kt = kt_offset[it.seq] < 0
                            ? nullptr
                            : shared_kt + (kt_offset[it.seq] + (long)it.kv_head * blocks_of(it.seq)) * block_floats;
      float* partial = it.partial < 0 ? nullptr : partials + it.partial * slot_floats;
      const uint16_t* pairs = pairs_offset[it.seq] < 0
                                  ? nullptr
                                  : shared_pairs + (pairs_offset[it.seq] + (long)it.kv_head * blocks_of(it.seq)) *
                                                       pair_halves(dp);
      if (seqs[it.seq].kv_type == WeightType::kF16) {
        run_item<f16>(it, seqs[it.seq], sh, kt, pairs, sc, partial);
      } else {
        run_item<float>(it, seqs[it.seq], sh, kt, pairs, sc, partial);
      }
    }
    if (!plan.merges.empty()) {
#pragma omp for schedule(static)
      for (long m = 0; m < (long)plan.merges.size(); ++m) {
        const WorkItem* first = &plan.items[plan.merges[m].first];
        merge_partials(first, plan.merges[m].second, seqs[first->seq], sh, partials, slot_floats);
      }
    }
  }
  free(shared_kt);
  free(shared_pairs);
}

}  // namespace pyxf::kernels::PYXF_TARGET_NS
