// Tiled attention with an online softmax (flash-attention style): keys and values are read in
// blocks, scores never exist for a whole row. One work item is (sequence, kv head, query block):
// the query heads that share a kv head are processed together, so K/V are never repeated (GQA/MQA).
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {
namespace {

constexpr int kBlockKeys = 64;     // keys per block: scores of one row fit in registers
constexpr int kMaxRows = 64;       // query rows (heads x tokens) per work item
constexpr int kScoreVecs = kBlockKeys / kLanes;

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
  float* row_max;  // [kMaxRows]
  float* row_sum;  // [kMaxRows]
};

int padded(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Scores of one or two query rows against the transposed key block: 2 x kScoreVecs independent
// accumulator chains keep the FMA units busy.
void block_scores(const float* q0, const float* q1, int D, const float* kt, float* s0, float* s1) {
  Vf a0[kScoreVecs], a1[kScoreVecs];
  for (int c = 0; c < kScoreVecs; ++c) a0[c] = a1[c] = vzero();
  if (q1) {
    for (int d = 0; d < D; ++d) {
      const Vf x0 = vset1(q0[d]), x1 = vset1(q1[d]);
      const float* ktd = kt + (long)d * kBlockKeys;
      for (int c = 0; c < kScoreVecs; ++c) {
        const Vf k = vload(ktd + c * kLanes);
        a0[c] = vfma(x0, k, a0[c]);
        a1[c] = vfma(x1, k, a1[c]);
      }
    }
  } else {
    for (int d = 0; d < D; ++d) {
      const Vf x0 = vset1(q0[d]);
      const float* ktd = kt + (long)d * kBlockKeys;
      for (int c = 0; c < kScoreVecs; ++c) a0[c] = vfma(x0, vload(ktd + c * kLanes), a0[c]);
    }
  }
  for (int c = 0; c < kScoreVecs; ++c) {
    vstore(s0 + c * kLanes, a0[c]);
    vstore(s1 + c * kLanes, a1[c]);
  }
}

// Online softmax update of one query row with the first `visible` scores of a key block:
// rescales the running output and adds p_j v_j, four output vectors at a time.
void accumulate_block(float* score, int visible, const float* v, long v_stride, int D, float* o,
                      float& row_max, float& row_sum) {
  // Hidden keys get -inf: their probabilities underflow to (almost exactly) zero and are skipped.
  for (int j = visible; j < kBlockKeys; ++j) score[j] = -INFINITY;
  Vf vmx = vload(score);
  for (int c = 1; c < kScoreVecs; ++c) vmx = vmax(vmx, vload(score + c * kLanes));
  const float block_max = vmaxr(vmx);
  const float new_max = block_max > row_max ? block_max : row_max;
  const float correction = expf(row_max - new_max);
  row_max = new_max;
  Vf vsum_p = vzero();
  for (int c = 0; c < kScoreVecs; ++c) {
    const Vf e = vexp(vsub(vload(score + c * kLanes), vset1(new_max)));
    vstore(score + c * kLanes, e);
    vsum_p = vadd(vsum_p, e);
  }
  const float block_sum = vsum(vsum_p);
  row_sum = row_sum * correction + block_sum;

  const Vf corr = vset1(correction);
  for (int d0 = 0; d0 < D; d0 += 4 * kLanes) {
    const int nvec = imin(4, (D - d0 + kLanes - 1) / kLanes);
    const int tail = D - d0 - (nvec - 1) * kLanes;  // lanes used in the last vector
    Vf acc[4];
    for (int c = 0; c < nvec; ++c) acc[c] = vmul(vload(o + d0 + c * kLanes), corr);
    const float* vd = v + d0;
    if (nvec == 4 && tail == kLanes) {
      for (int j = 0; j < visible; ++j) {
        const Vf p = vset1(score[j]);
        const float* vj = vd + j * v_stride;
        acc[0] = vfma(p, vload(vj), acc[0]);
        acc[1] = vfma(p, vload(vj + kLanes), acc[1]);
        acc[2] = vfma(p, vload(vj + 2 * kLanes), acc[2]);
        acc[3] = vfma(p, vload(vj + 3 * kLanes), acc[3]);
      }
    } else {
      for (int j = 0; j < visible; ++j) {
        const Vf p = vset1(score[j]);
        const float* vj = vd + j * v_stride;
        for (int c = 0; c < nvec; ++c) {
          const Vf x = c == nvec - 1 && tail < kLanes ? vload_n(vj + c * kLanes, tail) : vload(vj + c * kLanes);
          acc[c] = vfma(p, x, acc[c]);
        }
      }
    }
    for (int c = 0; c < nvec; ++c) vstore(o + d0 + c * kLanes, acc[c]);
  }
}

// score[j] += bias[clamp(rel0 + j, -R, R) + R] for j < n: the relative position bias of one row
// (rel0 = first key position - query position).
void add_position_bias(float* score, int n, int rel0, const float* bias, int R) {
  int j = 0;
  for (; j < n && rel0 + j < -R; ++j) score[j] += bias[0];
  for (; j < n && rel0 + j <= R; ++j) score[j] += bias[rel0 + j + R];
  for (; j < n; ++j) score[j] += bias[2 * R];
}

void run_item(const WorkItem& item, const AttentionSeq& s, const AttentionShape& sh, Scratch& sc) {
  const int D = sh.head_dim, dp = padded(D);
  const int group = sh.n_heads / sh.n_kv_heads;
  const int rows = group * item.q_count;
  const float* kbase = s.k + (long)item.kv_head * s.kv_head_stride;
  const float* vbase = s.v + (long)item.kv_head * s.kv_head_stride;

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
    for (int d = 0; d < D; ++d) {
      float* ktd = sc.kt + (long)d * kBlockKeys;
      for (int j = 0; j < bk; ++j) ktd[j] = kbase[(long)(j0 + j) * s.kv_pos_stride + d];
      for (int j = bk; j < kBlockKeys; ++j) ktd[j] = 0.0f;
    }
    for (int r = 0; r < rows; r += 2) {
      const int pair = imin(2, rows - r);
      alignas(64) float score[2][kBlockKeys];
      block_scores(sc.q + (long)r * dp, pair == 2 ? sc.q + (long)(r + 1) * dp : nullptr, D, sc.kt,
                   score[0], score[1]);
      for (int p = 0; p < pair; ++p) {
        const int qpos = s.n_past + item.q_begin + (r + p) / group;
        const int visible = sh.causal ? imin(bk, qpos - j0 + 1) : bk;
        if (visible <= 0) continue;
        if (sh.pos_bias) {
          const int R = sh.pos_bias_radius, h = item.kv_head * group + (r + p) % group;
          add_position_bias(score[p], visible, j0 - qpos, sh.pos_bias + (long)h * (2 * R + 1), R);
        }
        accumulate_block(score[p], visible, vbase + (long)j0 * s.kv_pos_stride, s.kv_pos_stride, D,
                         sc.o + (long)(r + p) * dp, sc.row_max[r + p], sc.row_sum[r + p]);
      }
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
  long n_items = 0;
  for (int s = 0; s < n_seqs; ++s) {
    n_items += (long)sh.n_kv_heads * ((seqs[s].n_new + q_block - 1) / q_block);
  }
  WorkItem* items = (WorkItem*)malloc(sizeof(WorkItem) * (n_items > 0 ? n_items : 1));
  long n = 0;
  for (int s = 0; s < n_seqs; ++s) {
    for (int q0 = 0; q0 < seqs[s].n_new; q0 += q_block) {
      for (int g = 0; g < sh.n_kv_heads; ++g) {
        items[n++] = {s, g, q0, imin(q_block, seqs[s].n_new - q0)};
      }
    }
  }
  const int dp = padded(sh.head_dim);
  const int max_rows = group * q_block;
#pragma omp parallel if (n_items > 1)
  {
    const long floats = 2L * max_rows * dp + (long)sh.head_dim * kBlockKeys + 2L * max_rows;
    float* mem = (float*)aligned_alloc(64, (sizeof(float) * floats + 63) / 64 * 64);
    Scratch sc;
    sc.q = mem;
    sc.o = sc.q + (long)max_rows * dp;
    sc.kt = sc.o + (long)max_rows * dp;
    sc.row_max = sc.kt + (long)sh.head_dim * kBlockKeys;
    sc.row_sum = sc.row_max + max_rows;
#pragma omp for schedule(dynamic, 1)
    for (long i = 0; i < n_items; ++i) run_item(items[i], seqs[items[i].seq], sh, sc);
    free(mem);
  }
  free(items);
}

}  // namespace pyxf::kernels::PYXF_TARGET_NS
