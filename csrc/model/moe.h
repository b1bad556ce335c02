// The mixture-of-experts FFN (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a router picks each token's
// experts, and the tokens are grouped by expert so that every expert runs one GEMM (or, for few
// rows, one pass over its weights) over all the rows routed to it in this step, prefill and
// batched decode alike, never one product per token.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/aligned.h"
#include "model/config.h"
#include "model/weights.h"

namespace pyxf {

// Scratch of the MoE FFN; grows to the largest batch seen and is reused.
struct ExpertScratch {
  std::vector<float> probs;      // [rows, E]: router logits, then probabilities
  std::vector<int32_t> expert;   // [rows, k]: each row's chosen experts, best first
  std::vector<float> weight;     // [rows, k]: their weights
  std::vector<int32_t> start;    // [E + 1]: where each expert's assignments begin in `assigned`
  std::vector<int32_t> assigned; // [rows k]: row * k + slot, grouped by expert, rows ascending
  kernels::AlignedVector<float> in, out;  // [rows, H]: one expert's gathered rows, and its output
  kernels::AlignedVector<float> ffn, act;  // [rows, 2 I'], [rows, I']: the gated FFN's scratch (I' = widest FFN)
  void reserve(const ModelConfig& c, long rows);
};

// x[rows, H] += the MoE FFN of in[rows, H]: router logits in W_router^T, softmax over the experts,
// the experts_per_token largest probabilities (equal ones in index order, as torch.topk), divided
// by their sum when norm_topk_prob; each chosen expert's gated FFN weighted by its probability,
// experts in index order; plus sigmoid(in . shared_gate) times the shared expert, when present.
void expert_ffn(const ModelConfig& c, const ExpertWeights& w, const float* in, long rows, ExpertScratch& s,
                float* x);

}  // namespace pyxf
