// The normalized description of a model, filled from pyxf's config.json by the bindings.
#pragma once
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace pyxf {

enum class NormKind { kRms, kLayer };
enum class PositionKind { kRope, kLearned, kNone };

struct ModelConfig {
  std::string family;
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int intermediate_size = 0;
  int max_positions = 0;
  NormKind norm = NormKind::kRms;
  float norm_eps = 1e-5f;
  bool post_norm = false;        // BERT-style: norm after the residual add
  kernels::Activation activation = kernels::Activation::kSilu;
  bool gated_ffn = true;
  PositionKind position = PositionKind::kRope;
  bool rope_interleaved = false;
  int rope_dim = 0;              // rotated dimensions per head (partial rotary)
  std::vector<float> rope_inv_freq;
  float rope_attention_scaling = 1.0f;
  bool tied_embeddings = false;
  bool has_lm_head = true;       // decoders; encoders end at the last hidden state
  bool causal = true;            // false for encoders: every token sees the whole sequence
  int position_offset = 0;       // learned positions start here (RoBERTa: 2)
  int type_vocab_size = 0;       // token type (segment) embeddings, BERT-style
  float embed_scale = 1.0f;      // token embeddings are multiplied by this (sqrt(hidden): Transformer, Marian)
  float attn_scale = 0.0f;       // attention score scale; 0: 1/sqrt(head_dim) (T5: 1)
  int rel_pos_radius = 0;        // relative position bias table radius (T5), with ModelWeights::rel_pos_bias
  float head_scale = 1.0f;       // the LM head's input is multiplied by this (tied T5: hidden^-0.5)

  // Longest sequence the position scheme can address.
  int max_sequence() const {
    return position == PositionKind::kLearned ? max_positions - position_offset : 1 << 30;
  }

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  int ffn_width() const { return gated_ffn ? 2 * intermediate_size : intermediate_size; }
};

}  // namespace pyxf
