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
  bool sandwich_norm = false;    // Gemma 2/3: pre-norm blocks whose output is normed again before the add
  kernels::Activation activation = kernels::Activation::kSilu;
  bool gated_ffn = true;
  bool qk_norm = false;          // RMSNorm over each head of q and of k before RoPE (Qwen3, Gemma 3)
  PositionKind position = PositionKind::kRope;
  bool rope_interleaved = false;
  int rope_dim = 0;              // rotated dimensions per head (partial rotary)
  std::vector<float> rope_inv_freq;
  float rope_attention_scaling = 1.0f;
  // Local (windowed) layers' own RoPE frequencies (Gemma 3); empty: they use rope_inv_freq.
  std::vector<float> rope_local_inv_freq;
  // Sliding-window attention: a query at position p sees keys j with p - j < sliding_window (0:
  // every key). With sliding_window_pattern N > 0 only the local layers are windowed: layer i is
  // global when (i + 1) % N == 0 (Gemma 2: N = 2, Gemma 3: N = 6).
  int sliding_window = 0;
  int sliding_window_pattern = 0;
  float attn_softcap = 0.0f;     // attention scores s become attn_softcap * tanh(s / attn_softcap); 0: none
  float logit_softcap = 0.0f;    // the LM head's logits, likewise (Gemma 2)
  bool tied_embeddings = false;
  bool has_lm_head = true;       // decoders; encoders end at the last hidden state
  bool causal = true;            // false for encoders: every token sees the whole sequence
  int position_offset = 0;       // learned positions start here (RoBERTa: 2)
  int type_vocab_size = 0;       // token type (segment) embeddings, BERT-style
  float embed_scale = 1.0f;      // token embeddings are multiplied by this (sqrt(hidden): Transformer, Marian)
  float attn_scale = 0.0f;       // attention score scale; 0: 1/sqrt(head_dim) (T5: 1)
  int rel_pos_radius = 0;        // relative position bias table radius (T5), with ModelWeights::rel_pos_bias
  float head_scale = 1.0f;       // the LM head's input is multiplied by this (tied T5: hidden^-0.5)
  bool has_embed_norm = false;   // encoders: a norm of the summed embeddings (embed_norm.*) may be present
  bool optional_final_norm = false;  // encoder-decoder stacks: a final norm may follow post-norm blocks

  // Longest sequence the position scheme can address.
  int max_sequence() const {
    return position == PositionKind::kLearned ? max_positions - position_offset : 1 << 30;
  }

  // Whether layer `layer` attends within the sliding window (and rotates with the local RoPE table).
  bool local_layer(int layer) const {
    return sliding_window > 0 && (sliding_window_pattern == 0 || (layer + 1) % sliding_window_pattern != 0);
  }
  int attention_window(int layer) const { return local_layer(layer) ? sliding_window : 0; }
  bool has_local_rope() const { return !rope_local_inv_freq.empty(); }

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  int ffn_width() const { return gated_ffn ? 2 * intermediate_size : intermediate_size; }
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
// from rope_theta / rope_scaling) for RoPE models.
ModelConfig model_config(const ConfigValues& values);

// An encoder-decoder model's two stacks: sinusoidal positions arrive as tables and become learned
// ones, T5's relative positions arrive as bias tables by distance (radius "rel_pos_radius").
struct Seq2SeqConfig {
  ModelConfig encoder, decoder;
};
Seq2SeqConfig seq2seq_config(const ConfigValues& values);

}  // namespace pyxf
