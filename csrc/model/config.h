// The normalized description of a model, and what config.json's keys mean to the core: defaults,
// enumerations, and the values derived from them (the configs of an encoder-decoder's two stacks).
// The bindings only hand over the keys (ConfigValues); the meaning is here.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"

namespace pyxf {

enum class NormKind { kRms, kLayer };
enum class PositionKind { kRope, kLearned, kNone };
enum class Presence { kAbsent, kOptional, kRequired };

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
  bool norm_bias = true;         // LayerNorms have a bias (ModernBERT: none)
  bool post_norm = false;        // BERT-style: norm after the residual add
  bool first_attn_norm = true;   // layer 0 normalizes attention's input (ModernBERT: no, the embedding norm did)
  bool sandwich_norm = false;    // Gemma 2/3: pre-norm blocks whose output is normed again before the add
  kernels::Activation activation = kernels::Activation::kSilu;
  bool gated_ffn = true;
  bool qk_norm = false;          // RMSNorm of q and of k before RoPE: over each head (Qwen3, Gemma 3), or
  bool qk_norm_projection = false;  // over the whole q and k projections (OLMoE)
  // Mixture of experts (model/moe.h): num_experts gated FFNs of intermediate_size replace the
  // dense FFN; each token runs the experts_per_token best by the router's softmax.
  int num_experts = 0;           // 0: a dense FFN
  int experts_per_token = 0;
  bool norm_topk_prob = false;   // the chosen experts' weights are renormalized to sum to 1
  int shared_expert_size = 0;    // the shared expert's width (Qwen2-MoE); 0: none
  PositionKind position = PositionKind::kRope;
  bool rope_interleaved = false;
  int rope_dim = 0;              // rotated dimensions per head (partial rotary)
  std::vector<float> rope_inv_freq;
  float rope_attention_scaling = 1.0f;
  // Local layers' own RoPE frequencies (ModernBERT's local_rope_theta, Gemma 3's local base); empty:
  // they use rope_inv_freq.
  std::vector<float> rope_local_inv_freq;
  // Sliding-window attention: a query at position p sees keys j with |p - j| < sliding_window (0:
  // every key; causal stacks see only j <= p besides). With sliding_window_pattern N > 0 only the
  // local layers are windowed: layer i is global when i % N == global_layer_phase (default N - 1,
  // the last of every N as Gemma 2 / 3; ModernBERT: 0, the first).
  int sliding_window = 0;
  int sliding_window_pattern = 0;
  int global_layer_phase = -1;
  float attn_softcap = 0.0f;     // attention scores s become attn_softcap * tanh(s / attn_softcap); 0: none
  float logit_softcap = 0.0f;    // the LM head's logits, likewise (Gemma 2)
  bool tied_embeddings = false;
  // The KV caches' element type: kF32, or kF16 (IEEE half). Chosen at load ("kv_cache_dtype"),
  // not by the checkpoint; only caches made for this model read it.
  kernels::WeightType kv_type = kernels::WeightType::kF32;
  bool has_lm_head = true;       // decoders; encoders end at the last hidden state
  bool causal = true;            // false for encoders: every token sees the whole sequence
  int position_offset = 0;       // learned positions start here (RoBERTa: 2)
  int type_vocab_size = 0;       // token type (segment) embeddings, BERT-style
  float embed_scale = 1.0f;      // token embeddings are multiplied by this (sqrt(hidden): Transformer, Marian)
  float attn_scale = 0.0f;       // attention score scale; 0: 1/sqrt(head_dim) (T5: 1)
  int rel_pos_radius = 0;        // relative position bias table radius (T5), with ModelWeights::rel_pos_bias
  float head_scale = 1.0f;       // the LM head's input is multiplied by this (tied T5: hidden^-0.5)
  // A norm of the summed embeddings (embed_norm.*): encoders may have one, BART and mBART have one.
  Presence embed_norm = Presence::kAbsent;
  bool optional_final_norm = false;  // encoder-decoder stacks: a final norm may follow post-norm blocks

  // Longest sequence the position scheme can address.
  int max_sequence() const {
    return position == PositionKind::kLearned ? max_positions - position_offset : 1 << 30;
  }

  // Whether layer `layer` attends within the sliding window (and rotates with the local RoPE table).
  bool local_layer(int layer) const {
    if (sliding_window == 0) return false;
    if (sliding_window_pattern == 0) return true;
    const int phase = global_layer_phase < 0 ? sliding_window_pattern - 1 : global_layer_phase;
    return layer % sliding_window_pattern != phase;
  }
  int attention_window(int layer) const { return local_layer(layer) ? sliding_window : 0; }
  bool has_local_rope() const { return !rope_local_inv_freq.empty(); }

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  int ffn_width() const { return gated_ffn ? 2 * intermediate_size : intermediate_size; }
  bool moe() const { return num_experts > 0; }
  int q_norm_width() const { return qk_norm_projection ? q_dim() : head_dim; }
  int k_norm_width() const { return qk_norm_projection ? kv_dim() : head_dim; }
};

// config.json's values as the bindings read them; every accessor throws std::invalid_argument
// naming the key when it is missing or of the wrong type. has(): present and not null.
class ConfigValues {
 public:
  virtual ~ConfigValues() = default;
  virtual bool has(const std::string& key) const = 0;
  virtual long integer(const std::string& key) const = 0;
  virtual double number(const std::string& key) const = 0;
  virtual bool boolean(const std::string& key) const = 0;
  virtual std::string text(const std::string& key) const = 0;
  virtual std::vector<float> floats(const std::string& key) const = 0;
};

// "silu" | "gelu" | "gelu_tanh" | "relu"; std::invalid_argument otherwise.
kernels::Activation activation_from_name(const std::string& name);

// A decoder-only or encoder model (config.json "architecture" decoder | encoder). Besides
// config.json's keys the core reads "rope_inv_freq" and "rope_attention_scaling" (made in Python
// from rope_theta / rope_scaling) for RoPE models, "rope_local_inv_freq" for local layers with a
// RoPE base of their own, and "rel_pos_radius" for encoders with a relative position bias table.
ModelConfig model_config(const ConfigValues& values);

// An encoder-decoder model's two stacks: sinusoidal positions arrive as tables and become learned
// ones, T5's relative positions arrive as bias tables by distance (radius "rel_pos_radius"). Learned
// and sinusoidal tables start at "position_offset" (BART, mBART, M2M100: 2).
struct Seq2SeqConfig {
  ModelConfig encoder, decoder;
};
Seq2SeqConfig seq2seq_config(const ConfigValues& values);

}  // namespace pyxf
