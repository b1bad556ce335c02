#include "model/bind.h"

#include <stdexcept>

namespace pyxf {
namespace {

// A norm over the hidden size: LayerNorm's bias is required unless the config has none
// (norm_bias false: not requested at all), RMSNorm's optional.
Norm hidden_norm(const ModelConfig& c, WeightBinder& w, const std::string& name, bool required) {
  if (!c.norm_bias) return Norm{w.floats(name + ".weight", {c.hidden_size}, required), nullptr};
  return w.norm(name, c.hidden_size, required, required && c.norm == NormKind::kLayer);
}

// A mixture-of-experts FFN: the router, the stacked experts (a view of each expert's rows) and the
// optional shared expert with its gate.
ExpertWeights bind_experts(const ModelConfig& c, WeightBinder& w, const std::string& p) {
  const long H = c.hidden_size, I = c.intermediate_size, E = c.num_experts, S = c.shared_expert_size;
  ExpertWeights x;
  x.router = w.floats(p + "router.weight", {E, H});
  x.gate_up = w.stacked(p + "experts.gate_up.weight", E, 2 * I, H);
  x.down = w.stacked(p + "experts.down.weight", E, H, I);
  if (S > 0) {
    x.shared_gate_up = w.matrix(p + "shared.gate_up.weight", 2 * S, H);
    x.shared_down = w.matrix(p + "shared.down.weight", H, S);
    x.shared_gate = w.floats(p + "shared_gate.weight", {1, H});
  }
  return x;
}

}  // namespace

ModelWeights bind_stack(const ModelConfig& c, WeightBinder& w, const std::string& prefix,
                        const std::string& embed_name) {
  const long H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  ModelWeights m;
  // A tied LM head reads the whole table on every call; otherwise rows are only looked up.
  const bool head = c.has_lm_head && c.tied_embeddings;
  m.embed = head ? w.matrix(embed_name, V, H) : w.table(embed_name, V, H);
  if (!m.embed.segments.empty()) {
    throw std::invalid_argument(embed_name + " must be stored in one format (rows are looked up)");
  }
  if (c.position == PositionKind::kLearned) m.pos_embed = w.floats(prefix + "pos_embed.weight", {c.max_positions, H});
  if (c.type_vocab_size > 0) m.type_embed = w.floats(prefix + "token_type_embed.weight", {c.type_vocab_size, H});
  if (c.embed_norm != Presence::kAbsent) {
    m.embed_norm = hidden_norm(c, w, prefix + "embed_norm", c.embed_norm == Presence::kRequired);
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = prefix + "layers." + std::to_string(i) + ".";
    LayerWeights L;
    // Without first_attn_norm the tensor is optional in every layer (one pattern for the stack),
    // and only layer 0 may lack it.
    L.attn_norm = hidden_norm(c, w, p + "attn_norm", c.first_attn_norm);
    if (i > 0 && !L.attn_norm.weight) throw std::invalid_argument("missing tensor '" + p + "attn_norm.weight'");
    L.qkv = w.linear(p + "attn.qkv", c.qkv_dim(), H);
    L.attn_out = w.linear(p + "attn.out", H, c.q_dim());
    if (c.qk_norm) {
      // RMSNorms: a weight and no bias.
      L.q_norm.weight = w.floats(p + "attn.q_norm.weight", {c.q_norm_width()});
      L.k_norm.weight = w.floats(p + "attn.k_norm.weight", {c.k_norm_width()});
    }
    if (c.sandwich_norm) L.attn_post_norm = hidden_norm(c, w, p + "attn_post_norm", true);
    L.ffn_norm = hidden_norm(c, w, p + "ffn_norm", true);
    if (c.moe()) {
      L.experts = bind_experts(c, w, p + "ffn.");
    } else {
      L.ffn_up = w.linear(p + (c.gated_ffn ? "ffn.gate_up" : "ffn.up"), c.ffn_width(), H);
      L.ffn_down = w.linear(p + "ffn.down", H, I);
    }
    if (c.sandwich_norm) L.ffn_post_norm = hidden_norm(c, w, p + "ffn_post_norm", true);
    m.layers.push_back(L);
  }
  if (!c.post_norm) {
    m.final_norm = hidden_norm(c, w, prefix + "final_norm", true);
  } else if (c.optional_final_norm) {
    m.final_norm = w.norm(prefix + "final_norm", H, false, false);
    if (c.norm == NormKind::kLayer && m.final_norm.weight && !m.final_norm.bias) {
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
