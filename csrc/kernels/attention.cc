// Tiled attention with an online softmax (flash-attention style): keys and values are read in
// blocks, scores never exist for a whole row. One work item is (sequence, kv head, query block):
// the query heads that share a kv head are processed together, so K/V are never repeated (GQA/MQA).
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "kernels/kernels.h"
#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {
namespace {

constexpr int kBlockKeys = 64;     // keys per block: scores of one row fit in registers
constexpr int kMaxRows = 64;       // query rows (heads x tokens) per work item
constexpr int kScoreVecs = kBlockKeys / kLanes;
static_assert(kBlockKeys == kKVPageTokens, "a block of keys is one page of a paged KV cache");

// The first key of the block starting at key j0 (a multiple of kBlockKeys) of kv head g; the block's
// keys follow kv_pos_stride apart. `base` is s.k or s.v.
const float* key_block(const float* base, const AttentionSeq& s, int g, int j0) {
  if (s.pages) return base + (long)s.pages[j0 / kBlockKeys] * s.page_stride + (long)g * s.kv_head_stride;
  return base + (long)g * s.kv_head_stride + (long)j0 * s.kv_pos_stride;
}

struct WorkItem {
  int seq;
  int kv_head;
  int q_begin;
  int q_count;
};

struct Scratch {
  float* q;        // [kMaxRows][dp], pre-scaled, zero padded
  float* o;        // [kMaxRows][dp]
  float* kt;       // [head_dim][kBlockKeys], the key block transposed
  float* p;        // [kMaxRows][kBlockKeys], scores, then probabilities
  float* row_max;  // [kMaxRows]
  float* row_sum;  // [kMaxRows]
  float* corr;     // [kMaxRows], this block's rescaling of each row's running output
  int* visible;    // [kMaxRows], keys of this block each row sees
};

int padded(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

constexpr int kTileRows = 4;  // query rows per register tile: 4 x 4 vectors = 16 accumulators

// s[R][0 .. NV vectors) = q[R][D] . kt[D][...] for R query rows: the block's first NV vectors
// of keys (a causal tile on the diagonal sees only some of them).
template <int R, int NV>
void scores_tile(const float* q, int dp, int D, const float* kt, float* s) {
  Vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = vzero();
  for (int d = 0; d < D; ++d) {
    const float* ktd = kt + (long)d * kBlockKeys;
    Vf k[NV];
    for (int c = 0; c < NV; ++c) k[c] = vload(ktd + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vf x = vset1(q[(long)r * dp + d]);
      for (int c = 0; c < NV; ++c) acc[r][c] = vfma(x, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) vstore(s + (long)r * kBlockKeys + c * kLanes, acc[r][c]);
}

// o[r][d0 .. d0 + NV lanes) = corr[r] o[r] + sum_j p[r][j] v[j] over j < n_keys, for R rows;
// `tail` lanes of the last vector are real (v rows end at head_dim). kPartial is a template
// parameter: a branch inside the key loop makes the compiler keep the accumulators on the stack.
template <int R, int NV, bool kPartial>
void pv_tile(const float* p, const float* corr, const float* v, long v_stride, int n_keys, int tail,
             float* o, int dp) {
  Vf acc[R][NV];
  for (int r = 0; r < R; ++r) {
    const Vf c = vset1(corr[r]);
    for (int i = 0; i < NV; ++i) acc[r][i] = vmul(vload(o + (long)r * dp + i * kLanes), c);
  }
  for (int j = 0; j < n_keys; ++j) {
    const float* vj = v + j * v_stride;
    Vf x[NV];
    for (int i = 0; i < NV - 1; ++i) x[i] = vload(vj + i * kLanes);
    x[NV - 1] = kPartial ? vload_n(vj + (NV - 1) * kLanes, tail) : vload(vj + (NV - 1) * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vf pr = vset1(p[(long)r * kBlockKeys + j]);
      for (int i = 0; i < NV; ++i) acc[r][i] = vfma(pr, x[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) vstore(o + (long)r * dp + i * kLanes, acc[r][i]);
}

template <int R, bool kPartial>
void pv_chunk(int nv, const float* p, const float* corr, const float* v, long v_stride, int n_keys, int tail,
              float* o, int dp) {
  switch (nv) {
    case 4: pv_tile<R, 4, kPartial>(p, corr, v, v_stride, n_keys, tail, o, dp); break;
    case 3: pv_tile<R, 3, kPartial>(p, corr, v, v_stride, n_keys, tail, o, dp); break;
    case 2: pv_tile<R, 2, kPartial>(p, corr, v, v_stride, n_keys, tail, o, dp); break;
    default: pv_tile<R, 1, kPartial>(p, corr, v, v_stride, n_keys, tail, o, dp); break;
  }
}

template <int R>
void pv_rows(const float* p, const float* corr, const float* v, long v_stride, int n_keys, int D,
             float* o, int dp) {
  // Head dimensions in chunks of up to 4 vectors.
  for (int d0 = 0; d0 < D; d0 += 4 * kLanes) {
    const int nv = imin(4, (D - d0 + kLanes - 1) / kLanes);
    const int tail = imin(kLanes, D - d0 - (nv - 1) * kLanes);
    const float* vd = v + d0;
    float* od = o + d0;
    if (tail == kLanes) {
      pv_chunk<R, false>(nv, p, corr, vd, v_stride, n_keys, tail, od, dp);
    } else {
      pv_chunk<R, true>(nv, p, corr, vd, v_stride, n_keys, tail, od, dp);
    }
  }
}

// Online softmax of one row's block of scores: p = exp(s - new max) on the first `visible`
// keys (exactly 0 past them, whatever s holds there); returns the factor that rescales the row's
// running output.
float softmax_block(float* s, int visible, float& row_max, float& row_sum) {
  const Vf zero = vzero();
  if (visible <= 0) {
    for (int c = 0; c < kScoreVecs; ++c) vstore(s + c * kLanes, zero);
    return 1.0f;
  }
  const int nv = (visible + kLanes - 1) / kLanes, tail = visible - (nv - 1) * kLanes;
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
    vstore(s + c * kLanes, e);
    vsum_p = vadd(vsum_p, e);
  }
  for (int c = nv; c < kScoreVecs; ++c) vstore(s + c * kLanes, zero);
  row_sum = row_sum * correction + vsum(vsum_p);
  return correction;
}

// score[j] += bias[clamp(rel0 + j, -R, R) + R] for j < n: the relative position bias of one row
// (rel0 = first key position - query position).
void add_position_bias(float* score, int n, int rel0, const float* bias, int R) {
  int j = 0;
  for (; j < n && rel0 + j < -R; ++j) score[j] += bias[0];
  for (; j < n && rel0 + j <= R; ++j) score[j] += bias[rel0 + j + R];
  for (; j < n; ++j) score[j] += bias[2 * R];
}

using PvRows = void (*)(const float*, const float*, const float*, long, int, int, float*, int);
constexpr int capped(int nv) { return nv < kScoreVecs ? nv : kScoreVecs; }

// scores_tile for R rows and the block's first nv (1 .. kScoreVecs) key vectors.
template <int R>
void scores_rows(int nv, const float* q, int dp, int D, const float* kt, float* s) {
  switch (nv) {
    case 1: scores_tile<R, capped(1)>(q, dp, D, kt, s); break;
    case 2: scores_tile<R, capped(2)>(q, dp, D, kt, s); break;
    case 3: scores_tile<R, capped(3)>(q, dp, D, kt, s); break;
    case 4: scores_tile<R, capped(4)>(q, dp, D, kt, s); break;
    case 5: scores_tile<R, capped(5)>(q, dp, D, kt, s); break;
    case 6: scores_tile<R, capped(6)>(q, dp, D, kt, s); break;
    case 7: scores_tile<R, capped(7)>(q, dp, D, kt, s); break;
    default: scores_tile<R, capped(8)>(q, dp, D, kt, s); break;
  }
}
static_assert(kScoreVecs <= 8, "scores_rows covers up to 8 key vectors");
using ScoresRows = void (*)(int, const float*, int, int, const float*, float*);
constexpr ScoresRows kScoresRows[] = {nullptr, scores_rows<1>, scores_rows<2>, scores_rows<3>, scores_rows<4>};
constexpr PvRows kPvRows[] = {nullptr, pv_rows<1>, pv_rows<2>, pv_rows<3>, pv_rows<4>};

// kt[d][j] = k[j][d] for the bk keys of one block (rows kv_pos_stride apart), zero past bk: whole
// vectors of keys by gathers, the rest one by one.
void transpose_key_block(const float* k, long stride, int bk, int D, float* kt) {
  const int bk_vec = bk / kLanes * kLanes;
  for (int d = 0; d < D; ++d) {
    float* ktd = kt + (long)d * kBlockKeys;
    for (int j = 0; j < bk_vec; j += kLanes) vstore(ktd + j, vgather(k + (long)j * stride + d, stride));
    for (int j = bk_vec; j < bk; ++j) ktd[j] = k[(long)j * stride + d];
    for (int j = bk; j < kBlockKeys; ++j) ktd[j] = 0.0f;
  }
}

// shared_kt: this item's kv head's keys already transposed block by block ([block][D][kBlockKeys]),
// or null to transpose each block here.
void run_item(const WorkItem& item, const AttentionSeq& s, const AttentionShape& sh, const float* shared_kt,
              Scratch& sc) {
  const int D = sh.head_dim, dp = padded(D);
  const int group = sh.n_heads / sh.n_kv_heads;
  const int rows = group * item.q_count;

  // Row r is query token item.q_begin + r / group of head kv_head * group + r % group.
  for (int r = 0; r < rows; ++r) {
    const int t = item.q_begin + r / group, h = item.kv_head * group + r % group;
    const float* src = s.q + (long)t * sh.q_row_stride + (long)h * D;
    float* dst = sc.q + (long)r * dp;
    for (int d = 0; d < D; ++d) dst[d] = src[d] * sh.scale;
    for (int d = D; d < dp; ++d) dst[d] = 0.0f;
    memset(sc.o + (long)r * dp, 0, sizeof(float) * dp);
    sc.row_max[r] = -INFINITY;
    sc.row_sum[r] = 0.0f;
  }

  const int last_pos = s.n_past + item.q_begin + item.q_count - 1;
  const int n_keys = sh.causal ? last_pos + 1 : s.n_keys;
  for (int j0 = 0; j0 < n_keys; j0 += kBlockKeys) {
    const int bk = imin(kBlockKeys, n_keys - j0);
    const float* kt = sc.kt;
    if (shared_kt) {
      kt = shared_kt + (long)(j0 / kBlockKeys) * D * kBlockKeys;
    } else {
      transpose_key_block(key_block(s.k, s, item.kv_head, j0), s.kv_pos_stride, bk, D, sc.kt);
    }
    for (int r = 0; r < rows; ++r) {
      const int qpos = s.n_past + item.q_begin + r / group;
      sc.visible[r] = sh.causal ? imax(0, imin(bk, qpos - j0 + 1)) : bk;
    }
    for (int r = 0; r < rows; r += kTileRows) {
      const int n = imin(kTileRows, rows - r);
      int keys = 0;  // the tile's widest row (later rows see more keys)
      for (int i = 0; i < n; ++i) keys = imax(keys, sc.visible[r + i]);
      if (keys == 0) continue;  // softmax_block zeroes these rows
      kScoresRows[n]((keys + kLanes - 1) / kLanes, sc.q + (long)r * dp, dp, D, kt, sc.p + (long)r * kBlockKeys);
    }
    for (int r = 0; r < rows; ++r) {
      const int qpos = s.n_past + item.q_begin + r / group;
      const int visible = sc.visible[r];
      float* score = sc.p + (long)r * kBlockKeys;
      if (sh.pos_bias && visible > 0) {
        const int R = sh.pos_bias_radius, h = item.kv_head * group + r % group;
        add_position_bias(score, visible, j0 - qpos, sh.pos_bias + (long)h * (2 * R + 1), R);
      }
      sc.corr[r] = softmax_block(score, visible, sc.row_max[r], sc.row_sum[r]);
    }
    const float* vblock = key_block(s.v, s, item.kv_head, j0);
    for (int r = 0; r < rows; r += kTileRows) {
      const int n = imin(kTileRows, rows - r);
      int keys = 0;  // the tile's widest row; probabilities past a row's own visible keys are 0
      for (int i = 0; i < n; ++i) keys = imax(keys, sc.visible[r + i]);
      kPvRows[n](sc.p + (long)r * kBlockKeys, sc.corr + r, vblock, s.kv_pos_stride, keys, D,
                 sc.o + (long)r * dp, dp);
    }
  }

  for (int r = 0; r < rows; ++r) {
    const int t = item.q_begin + r / group, h = item.kv_head * group + r % group;
    float* dst = s.out + (long)t * sh.out_row_stride + (long)h * D;
    const float inv = sc.row_sum[r] > 0.0f ? 1.0f / sc.row_sum[r] : 0.0f;
    const float* orow = sc.o + (long)r * dp;
    for (int d = 0; d < D; ++d) dst[d] = orow[d] * inv;
  }
}

}  // namespace

void attention(const AttentionSeq* seqs, int n_seqs, const AttentionShape& sh) {
  const int group = sh.n_heads / sh.n_kv_heads;
  const int q_block = group >= kMaxRows ? 1 : kMaxRows / group;
  const int D = sh.head_dim;
  const long block_floats = (long)D * kBlockKeys;
  // A sequence with several query blocks per kv head transposes its keys once, up front, for all
  // of them (prefill); one block per kv head (decode) transposes inside the item, in L1.
  long n_items = 0, shared_blocks = 0;
  std::vector<long> kt_offset(n_seqs, -1);
  for (int s = 0; s < n_seqs; ++s) {
    const AttentionSeq& a = seqs[s];
    const long q_blocks = (a.n_new + q_block - 1) / q_block;
    n_items += sh.n_kv_heads * q_blocks;
    if (q_blocks > 1) {
      kt_offset[s] = shared_blocks;
      const int keys = sh.causal ? a.n_past + a.n_new : a.n_keys;
      shared_blocks += (long)sh.n_kv_heads * ((keys + kBlockKeys - 1) / kBlockKeys);
    }
  }
  std::vector<WorkItem> items;
  items.reserve(n_items);
  for (int s = 0; s < n_seqs; ++s) {
    for (int q0 = 0; q0 < seqs[s].n_new; q0 += q_block) {
      for (int g = 0; g < sh.n_kv_heads; ++g) items.push_back({s, g, q0, imin(q_block, seqs[s].n_new - q0)});
    }
  }
  float* shared_kt = shared_blocks ? (float*)aligned_alloc(64, sizeof(float) * shared_blocks * block_floats) : nullptr;
  auto blocks_of = [&](int s) {
    const int keys = sh.causal ? seqs[s].n_past + seqs[s].n_new : seqs[s].n_keys;
    return (keys + kBlockKeys - 1) / kBlockKeys;
  };
  const int dp = padded(D);
  const int max_rows = group * q_block;
#pragma omp parallel if (n_items > 1)
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
    const long floats = 2L * max_rows * dp + block_floats + (long)max_rows * kBlockKeys + 4L * max_rows;
    float* mem = (float*)aligned_alloc(64, (sizeof(float) * floats + 63) / 64 * 64);
    Scratch sc;
    sc.q = mem;
    sc.o = sc.q + (long)max_rows * dp;
    sc.kt = sc.o + (long)max_rows * dp;
    sc.p = sc.kt + block_floats;
    sc.row_max = sc.p + (long)max_rows * kBlockKeys;
    sc.row_sum = sc.row_max + max_rows;
    sc.corr = sc.row_sum + max_rows;
    sc.visible = (int*)(sc.corr + max_rows);
#pragma omp for schedule(dynamic, 1)
    for (long i = 0; i < n_items; ++i) {
      const WorkItem& it = items[i];
      const float* kt = kt_offset[it.seq] < 0
                            ? nullptr
                            : shared_kt + (kt_offset[it.seq] + (long)it.kv_head * blocks_of(it.seq)) * block_floats;
      run_item(it, seqs[it.seq], sh, kt, sc);
    }
    free(mem);
  }
  free(shared_kt);
}

}  // namespace pyxf::kernels::PYXF_TARGET_NS
