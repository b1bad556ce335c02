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
    for (int r = 0; r < rows; ++r) {
      const int qpos = s.n_past + item.q_begin + r / group;
      const int visible = sh.causal ? imin(bk, qpos - j0 + 1) : bk;
      if (visible <= 0) continue;
      const float* qr = sc.q + (long)r * dp;
      Vf acc[kScoreVecs];
      for (int c = 0; c < kScoreVecs; ++c) acc[c] = vzero();
      for (int d = 0; d < D; ++d) {
        const Vf qd = vset1(qr[d]);
        const float* ktd = sc.kt + (long)d * kBlockKeys;
        for (int c = 0; c < kScoreVecs; ++c) acc[c] = vfma(qd, vload(ktd + c * kLanes), acc[c]);
      }
      alignas(64) float score[kBlockKeys];
      for (int c = 0; c < kScoreVecs; ++c) vstore(score + c * kLanes, acc[c]);

      float block_max = -INFINITY;
      for (int j = 0; j < visible; ++j) block_max = score[j] > block_max ? score[j] : block_max;
      const float new_max = block_max > sc.row_max[r] ? block_max : sc.row_max[r];
      const float correction = expf(sc.row_max[r] - new_max);
      sc.row_max[r] = new_max;
      // Unnormalized probabilities; only the first `visible` keys of the block are used.
      for (int c = 0; c < kScoreVecs; ++c) {
        const Vf e = vexp(vsub(vload(score + c * kLanes), vset1(new_max)));
        vstore(score + c * kLanes, e);
      }
      float block_sum = 0.0f;
      for (int j = 0; j < visible; ++j) block_sum += score[j];
      sc.row_sum[r] = sc.row_sum[r] * correction + block_sum;

      float* orow = sc.o + (long)r * dp;
      const Vf corr = vset1(correction);
      for (int d0 = 0; d0 < dp; d0 += kLanes) {
        const int m = imin(kLanes, D - d0);
        Vf o = vmul(vload(orow + d0), corr);
        const float* vcol = vbase + (long)j0 * s.kv_pos_stride + d0;
        const long vs = s.kv_pos_stride;
        if (m == kLanes) {
          for (int j = 0; j < visible; ++j) o = vfma(vset1(score[j]), vload(vcol + j * vs), o);
        } else {
          for (int j = 0; j < visible; ++j) o = vfma(vset1(score[j]), vload_n(vcol + j * vs, m), o);
        }
        vstore(orow + d0, o);
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
