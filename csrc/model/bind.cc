#include "model/bind.h"

#include <stdexcept>

namespace pyxf {

ModelWeights bind_stack(const ModelConfig& c, WeightBinder& w, const std::string& prefix,
                        const std::string& embed_name) {
  const long H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const bool layer_norm = c.norm == NormKind::kLayer;
  ModelWeights m;
  m.embed = w.matrix(embed_name, V, H);
  if (!m.embed.segments.empty()) {
    throw std::invalid_argument(embed_name + " must be stored in one format (rows are looked up)");
  }
  if (c.position == PositionKind::kLearned) m.pos_embed = w.floats(prefix + "pos_embed.weight", {c.max_positions, H});
  if (c.type_vocab_size > 0) m.type_embed = w.floats(prefix + "token_type_embed.weight", {c.type_vocab_size, H});
  if (c.has_embed_norm) m.embed_norm = w.norm(prefix + "embed_norm", H, false, false);
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = prefix + "layers." + std::to_string(i) + ".";
    LayerWeights L;
    L.attn_norm = w.norm(p + "attn_norm", H, true, layer_norm);
    L.qkv = w.linear(p + "attn.qkv", c.qkv_dim(), H);
    L.attn_out = w.linear(p + "attn.out", H, c.q_dim());
    if (c.qk_norm) {  // RMSNorms over head_dim: a weight, no bias
      L.q_norm.weight = w.floats(p + "attn.q_norm.weight", {c.head_dim});
      L.k_norm.weight = w.floats(p + "attn.k_norm.weight", {c.head_dim});
    }
    if (c.sandwich_norm) L.attn_post_norm = w.norm(p + "attn_post_norm", H, true, layer_norm);
    L.ffn_norm = w.norm(p + "ffn_norm", H, true, layer_norm);
    L.ffn_up = w.linear(p + (c.gated_ffn ? "ffn.gate_up" : "ffn.up"), c.ffn_width(), H);
    L.ffn_down = w.linear(p + "ffn.down", H, I);
    if (c.sandwich_norm) L.ffn_post_norm = w.norm(p + "ffn_post_norm", H, true, layer_norm);
    m.layers.push_back(L);
  }
  if (!c.post_norm) {
    m.final_norm = w.norm(prefix + "final_norm", H, true, layer_norm);
  } else if (c.optional_final_norm) {
    m.final_norm = w.norm(prefix + "final_norm", H, false, false);
    if (layer_norm && m.final_norm.weight && !m.final_norm.bias) {
      throw std::invalid_argument("missing tensor '" + prefix + "final_norm.bias'");
    }
  }
  if (c.rel_pos_radius > 0) m.rel_pos_bias = w.floats(prefix + "rel_pos_table", {c.num_heads, 2L * c.rel_pos_radius + 1});
  if (c.has_lm_head) {
    if (c.tied_embeddings) {
      m.lm_head = m.embed;
      m.lm_head.bias = w.floats(prefix + "lm_head.bias", {V}, false);
    } else {
      m.lm_head = w.linear(prefix + "lm_head", V, H);
    }
  }
  return m;
}

std::vector<CrossAttentionWeights> bind_cross_attention(const ModelConfig& c, WeightBinder& w) {
  const long H = c.hidden_size;
  std::vector<CrossAttentionWeights> cross;
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    CrossAttentionWeights x;
    x.norm = w.norm(p + "cross_norm", H, true, c.norm == NormKind::kLayer);
    x.q = w.linear(p + "cross_attn.q", c.q_dim(), H);
    x.kv = w.linear(p + "cross_attn.kv", 2L * c.kv_dim(), H);
    x.out = w.linear(p + "cross_attn.out", H, c.q_dim());
    cross.push_back(x);
  }
  return cross;
}

}  // namespace pyxf
