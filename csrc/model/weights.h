// Views of a model's weights: pointers into the memory-mapped file (or into buffers the model
// owns when the stored dtype had to be widened). Optional tensors are null.
#pragma once
#include <vector>

#include "kernels/kernels.h"

namespace pyxf {

struct Norm {
  const float* weight = nullptr;
  const float* bias = nullptr;
};

struct Linear {
  const void* weight = nullptr;   // [out, in] of `dtype`, when not quantized
  kernels::WeightType dtype = kernels::WeightType::kF32;
  // `weight` packed once for the kernels that made it (KernelTable::pack_dense_panels), or null;
  // a view of some of the rows (a row block) has none.
  const void* panels = nullptr;
  const float* bias = nullptr;
  bool quantized = false;
  kernels::QuantWeight quant{};  // the matrix, when it is in one format
  // A matrix stored in several formats (a Q4_K_M file's q, k rows in Q4_K and v rows in Q6_K):
  // its consecutive row ranges, each in its own format; `quant` is then unused.
  std::vector<kernels::QuantWeight> segments;
};

// A mixture-of-experts FFN (model/moe.h). Every expert is a view of its rows of the stacked
// tensors (ffn.experts.gate_up: [gate; up] of expert e at rows e 2I .. (e+1) 2I; ffn.experts.down:
// rows e H .. (e+1) H).
struct ExpertWeights {
  const float* router = nullptr;   // [num_experts, hidden]
  std::vector<Linear> gate_up;     // per expert, [2 I, hidden]
  std::vector<Linear> down;        // per expert, [hidden, I]
  Linear shared_gate_up;           // the shared expert (Qwen2-MoE), when shared_expert_size > 0
  Linear shared_down;
  const float* shared_gate = nullptr;  // [hidden]: sigmoid(x . shared_gate) weighs the shared expert
};

struct LayerWeights {
  Norm attn_norm;
  Linear qkv;
  Linear attn_out;
  Norm q_norm, k_norm;  // over each head's head_dim, or the whole projection (qk_norm)
  Norm attn_post_norm;  // of the attention's output, before the residual add (sandwich_norm)
  Norm ffn_norm;
  Linear ffn_up;    // gate_up when the FFN is gated (dense FFNs)
  Linear ffn_down;
  Norm ffn_post_norm;   // of the FFN's output, before the residual add (sandwich_norm)
  ExpertWeights experts;  // mixture-of-experts FFNs
};

struct ModelWeights {
  Linear embed;                      // [vocab, hidden]; rows are looked up (and dequantized)
  const float* pos_embed = nullptr;  // [max_positions, hidden]
  const float* type_embed = nullptr; // [type_vocab_size, hidden]
  Norm embed_norm;                   // applied to the summed embeddings when present
  std::vector<LayerWeights> layers;
  Norm final_norm;
  Linear lm_head;                    // weight == embed when tied
  const float* rel_pos_bias = nullptr;  // [num_heads][2 rel_pos_radius + 1] (T5), see AttentionShape
};

}  // namespace pyxf
