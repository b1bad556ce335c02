// config.json's meaning to the core (docs/DESIGN.md): which keys, their defaults and allowed values,
// and what is derived from them.
#include "model/config.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace pyxf {
namespace {

using std::invalid_argument;

// A key with a default: the value when present and not null.
long integer_or(const ConfigValues& v, const std::string& key, long fallback) {
  return v.has(key) ? v.integer(key) : fallback;
}
double number_or(const ConfigValues& v, const std::string& key, double fallback) {
  return v.has(key) ? v.number(key) : fallback;
}
bool boolean_or(const ConfigValues& v, const std::string& key, bool fallback) {
  return v.has(key) ? v.boolean(key) : fallback;
}
std::string text_or(const ConfigValues& v, const std::string& key, const std::string& fallback) {
  return v.has(key) ? v.text(key) : fallback;
}

// A size the core holds in an int.
int size(long value, const std::string& key) {
  if (value <= 0 || value > (1L << 31) - 1) throw invalid_argument("config '" + key + "' must be a positive int");
  return (int)value;
}

}  // namespace

kernels::Activation activation_from_name(const std::string& name) {
  if (name == "silu") return kernels::Activation::kSilu;
  if (name == "gelu") return kernels::Activation::kGelu;
  if (name == "gelu_tanh") return kernels::Activation::kGeluTanh;
  if (name == "relu") return kernels::Activation::kRelu;
  throw invalid_argument("unknown activation '" + name + "' (silu, gelu, gelu_tanh, relu)");
}

namespace {

PositionKind position_kind(const std::string& name) {
  if (name == "rope") return PositionKind::kRope;
  if (name == "learned") return PositionKind::kLearned;
  if (name == "none") return PositionKind::kNone;
  throw invalid_argument("unknown position scheme '" + name + "'");
}

// The mixture-of-experts keys (absent: a dense FFN).
void read_experts(const ConfigValues& v, ModelConfig& c) {
  const long experts = integer_or(v, "num_experts", 0);
  if (experts == 0) return;
  c.num_experts = size(experts, "num_experts");
  c.experts_per_token = size(integer_or(v, "num_experts_per_tok", 0), "num_experts_per_tok");
  if (c.experts_per_token > c.num_experts) throw invalid_argument("num_experts_per_tok exceeds num_experts");
  if (!c.gated_ffn) throw invalid_argument("experts are gated FFNs: num_experts needs gated_ffn");
  if (c.sandwich_norm) throw invalid_argument("experts with sandwich norms are not supported");
  if ((long)c.num_experts * 2 * std::max(c.intermediate_size, c.hidden_size) > (1L << 31) - 1) {
    throw invalid_argument("num_experts: the stacked experts' rows exceed 2**31 - 1");
  }
  c.norm_topk_prob = boolean_or(v, "norm_topk_prob", false);
  const long shared = integer_or(v, "shared_expert_intermediate_size", 0);
  c.shared_expert_size = shared == 0 ? 0 : size(shared, "shared_expert_intermediate_size");
  if (2L * c.shared_expert_size > (1L << 31) - 1) {
    throw invalid_argument("shared_expert_intermediate_size is too large");
  }
}

// Scales of the embeddings and of the attention scores, and the soft caps of scores and logits.
void read_scales(const ConfigValues& v, ModelConfig& c) {
  c.embed_scale = (float)number_or(v, "embed_scale", 1.0);
  c.attn_scale = (float)number_or(v, "attention_scale", 0.0);
  c.attn_softcap = (float)number_or(v, "attention_softcap", 0.0);
  c.logit_softcap = (float)number_or(v, "logit_softcap", 0.0);
  if (!(c.embed_scale > 0) || !(c.attn_scale >= 0) || !(c.attn_softcap >= 0) || !(c.logit_softcap >= 0)) {
    throw invalid_argument("embed_scale must be positive; attention_scale, attention_softcap and logit_softcap "
                           "non-negative");
  }
}

// Which layers attend within a sliding window, and how far.
void read_sliding_window(const ConfigValues& v, ModelConfig& c) {
  c.sliding_window = v.has("sliding_window") ? size(v.integer("sliding_window"), "sliding_window") : 0;
  c.sliding_window_pattern =
      v.has("sliding_window_pattern") ? size(v.integer("sliding_window_pattern"), "sliding_window_pattern") : 0;
  if (v.has("global_layer_phase")) {
    const long phase = v.integer("global_layer_phase");
    if (phase < 0 || phase >= c.sliding_window_pattern) {
      throw invalid_argument("global_layer_phase must be in [0, sliding_window_pattern)");
    }
    c.global_layer_phase = (int)phase;
  }
  if (c.has_local_rope() && c.sliding_window == 0) {
    throw invalid_argument("rope_local_inv_freq needs a sliding_window (local layers)");
  }
}

// What every stack has: sizes, norms, FFN, position scheme. `position` is the stack's own scheme.
ModelConfig stack_config(const ConfigValues& v, PositionKind position) {
  ModelConfig c;
  c.family = v.text("family");
  c.vocab_size = size(v.integer("vocab_size"), "vocab_size");
  c.hidden_size = size(v.integer("hidden_size"), "hidden_size");
  c.num_layers = size(v.integer("num_layers"), "num_layers");
  c.num_heads = size(v.integer("num_heads"), "num_heads");
  c.num_kv_heads = size(integer_or(v, "num_kv_heads", c.num_heads), "num_kv_heads");
  c.head_dim = size(integer_or(v, "head_dim", c.hidden_size / c.num_heads), "head_dim");
  c.intermediate_size = size(v.integer("intermediate_size"), "intermediate_size");
  c.max_positions = size(v.integer("max_position_embeddings"), "max_position_embeddings");
  if (c.num_heads % c.num_kv_heads != 0) throw invalid_argument("num_heads must be a multiple of num_kv_heads");
  const std::string norm = v.text("norm");
  if (norm != "rmsnorm" && norm != "layernorm") throw invalid_argument("unknown norm '" + norm + "'");
  c.norm = norm == "rmsnorm" ? NormKind::kRms : NormKind::kLayer;
  c.norm_eps = (float)v.number("norm_eps");
  c.norm_bias = boolean_or(v, "norm_bias", true);
  const std::string placement = text_or(v, "norm_position", "pre");
  if (placement != "pre" && placement != "post" && placement != "sandwich") {
    throw invalid_argument("unknown norm_position '" + placement + "'");
  }
  c.post_norm = placement == "post";
  c.sandwich_norm = placement == "sandwich";
  c.first_attn_norm = boolean_or(v, "first_attn_norm", true);
  if (c.post_norm && !c.first_attn_norm) throw invalid_argument("first_attn_norm false needs norm_position pre");
  c.activation = activation_from_name(v.text("activation"));
  c.gated_ffn = v.boolean("gated_ffn");
  c.qk_norm = boolean_or(v, "qk_norm", false);
  const std::string qk_span = text_or(v, "qk_norm_span", "head");
  if (qk_span != "head" && qk_span != "projection") throw invalid_argument("unknown qk_norm_span '" + qk_span + "'");
  c.qk_norm_projection = qk_span == "projection";
  read_experts(v, c);
  c.position = position;
  c.tied_embeddings = boolean_or(v, "tie_word_embeddings", false);
  const std::string kv_dtype = text_or(v, "kv_cache_dtype", "float32");
  if (kv_dtype != "float32" && kv_dtype != "float16") {
    throw invalid_argument("unknown kv_cache_dtype '" + kv_dtype + "' (float32, float16)");
  }
  c.kv_type = kv_dtype == "float16" ? kernels::WeightType::kF16 : kernels::WeightType::kF32;
  if (c.position == PositionKind::kRope) {
    c.rope_interleaved = boolean_or(v, "rope_interleaved", false);
    c.rope_inv_freq = v.floats("rope_inv_freq");
    c.rope_dim = 2 * (int)c.rope_inv_freq.size();
    c.rope_attention_scaling = (float)number_or(v, "rope_attention_scaling", 1.0);
    if (c.rope_dim == 0 || c.rope_dim > c.head_dim || c.rope_dim > 1024) {
      throw invalid_argument("rope_inv_freq must have between 1 and head_dim/2 entries");
    }
    if (v.has("rope_local_inv_freq")) {
      c.rope_local_inv_freq = v.floats("rope_local_inv_freq");
      if (c.rope_local_inv_freq.size() != c.rope_inv_freq.size()) {
        throw invalid_argument("rope_local_inv_freq must have as many entries as rope_inv_freq");
      }
    }
  }
  read_scales(v, c);
  read_sliding_window(v, c);
  return c;
}

// The radius of a relative position bias table ("rel_pos_radius", made in Python from the
// checkpoint's buckets); 0: none.
int relative_radius(const ConfigValues& v) {
  const long radius = integer_or(v, "rel_pos_radius", 0);
  if (radius < 0 || radius > (1L << 20)) throw invalid_argument("rel_pos_radius must be in [0, 2^20]");
  return (int)radius;
}

}  // namespace

ModelConfig model_config(const ConfigValues& v) {
  const std::string architecture = text_or(v, "architecture", "decoder");
  if (architecture != "decoder" && architecture != "encoder") {
    throw invalid_argument("architecture '" + architecture + "' is not a decoder or an encoder");
  }
  ModelConfig c = stack_config(v, position_kind(v.text("position")));
  const bool encoder = architecture == "encoder";
  c.has_lm_head = !encoder;
  c.causal = boolean_or(v, "causal", !encoder);
  c.embed_norm = encoder ? Presence::kOptional : Presence::kAbsent;
  c.position_offset = (int)integer_or(v, "position_offset", 0);
  c.type_vocab_size = encoder ? (int)integer_or(v, "type_vocab_size", 0) : 0;
  if (c.position_offset < 0 || c.type_vocab_size < 0) {
    throw invalid_argument("position_offset and type_vocab_size must be >= 0");
  }
  if (c.position == PositionKind::kLearned && c.position_offset >= c.max_positions) {
    throw invalid_argument("position_offset must be below max_position_embeddings");
  }
  c.rel_pos_radius = encoder ? relative_radius(v) : 0;
  return c;
}

Seq2SeqConfig seq2seq_config(const ConfigValues& v) {
  const std::string position = v.text("position");
  PositionKind stack_position;
  // Learned positions read their stored tables; sinusoidal ones a table made at load.
  if (position == "sinusoidal" || position == "learned") stack_position = PositionKind::kLearned;
  else if (position == "relative") stack_position = PositionKind::kNone;  // a bias in attention
  else throw invalid_argument("unknown position scheme '" + position + "' for an encoder-decoder model");
  const long radius = position == "relative" ? v.integer("rel_pos_radius") : 0;
  if (radius < 0 || radius > (1L << 20)) throw invalid_argument("rel_pos_radius must be in [0, 2^20]");
  const long offset = integer_or(v, "position_offset", 0);
  Seq2SeqConfig s{stack_config(v, stack_position), stack_config(v, stack_position)};
  if (offset < 0 || (stack_position == PositionKind::kLearned && offset >= s.decoder.max_positions)) {
    throw invalid_argument("position_offset must be >= 0 and below max_position_embeddings");
  }
  const Presence embed_norm = boolean_or(v, "embed_norm", false) ? Presence::kRequired : Presence::kAbsent;
  s.encoder.num_layers = size(v.integer("num_encoder_layers"), "num_encoder_layers");
  s.encoder.vocab_size = size(integer_or(v, "source_vocab_size", s.decoder.vocab_size), "source_vocab_size");
  s.encoder.causal = false;
  s.encoder.has_lm_head = false;
  s.decoder.head_scale = (float)number_or(v, "head_scale", 1.0);
  for (ModelConfig* c : {&s.encoder, &s.decoder}) {
    c->rel_pos_radius = (int)radius;
    c->position_offset = (int)offset;
    c->embed_norm = embed_norm;
    c->optional_final_norm = c->post_norm;
  }
  return s;
}

}  // namespace pyxf
