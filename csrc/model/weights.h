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
  const float* bias = nullptr;
  bool quantized = false;
  kernels::QuantWeight quant{};  // the matrix, when it is in one format
  // A matrix stored in several formats (a Q4_K_M file's q, k rows in Q4_K and v rows in Q6_K):
  // its consecutive row ranges, each in its own format; `quant` is then unused.
  std::vector<kernels::QuantWeight> segments;
};

struct LayerWeights {
  Norm attn_norm;
  Linear qkv;
  Linear attn_out;
  Norm q_norm, k_norm;  // per head, over head_dim (qk_norm)
  Norm attn_post_norm;  // of the attention's output, before the residual add (sandwich_norm)
  Norm ffn_norm;
  Linear ffn_up;    // gate_up when the FFN is gated
  Linear ffn_down;
  Norm ffn_post_norm;   // of the FFN's output, before the residual add (sandwich_norm)
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
