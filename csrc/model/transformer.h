// The decoder-style transformer: embeddings, a stack of identical blocks parameterized by the
// config (norm kind and placement, position scheme, activation, gated FFN, GQA), a final norm and
// the LM head. Many sequences run together: their new tokens are packed as rows of one matrix
// (no padding); only attention looks at sequences one by one.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/aligned.h"
#include "model/config.h"
#include "model/moe.h"
#include "model/weights.h"
#include "runtime/kv_cache.h"

namespace pyxf {

// The new tokens of one sequence; their keys and values are appended to `cache`. Without a
// cache (encoders) the sequence is complete and attention reads keys/values where they were made.
struct SeqBatch {
  KVCache* cache;
  const int32_t* tokens;
  int n_new;
  bool all_logits;                  // logits for every new token, else only for the last one
  const int32_t* type_ids = nullptr;  // token types, when the model has them
  bool no_logits = false;             // no logits at all (a prompt chunk that does not end the prompt)

  // Logit rows this sequence gets: its last new tokens.
  int logit_count() const { return no_logits ? 0 : all_logits ? n_new : 1; }
};

// y (+)= x W^T + b on whichever kernel the weight's format needs.
void apply_linear(const Linear& w, const float* x, long rows, long in, long out, float* y, bool accumulate);

// y[rows, H] (+)= down(act(x gate^T) * (x up^T)) for gate_up = [gate; up] (2 I rows): a gated FFN
// on whichever kernels the weights' formats need (the activation fused into the GEMM where one
// runs). `ffn` and `hidden` are scratch of rows * 2 I and rows * I floats.
void gated_ffn(const Linear& gate_up, const Linear& down, const float* x, long rows, long H, long I,
               kernels::Activation act, float* ffn, float* hidden, float* y, bool accumulate);

// Activations for one forward pass; grows to the largest batch seen and is reused.
struct Workspace {
  kernels::AlignedVector<float> x, h, qkv, attn, ffn, act, head_in;
  std::vector<float> rope_cs;  // [rows][rope_dim]: cos, sin of each row's position
  std::vector<float> rope_local_cs;  // the same with the local layers' frequencies (has_local_rope)
  std::vector<int32_t> pos;
  std::vector<kernels::AttentionSeq> attn_seqs;
  std::vector<kernels::KVSlotWrite> kv_writes;  // a layer's new keys and values
  ExpertScratch experts;  // mixture-of-experts FFNs
  void reserve(const ModelConfig& c, long rows);
};

class Transformer {
 public:
  Transformer(ModelConfig config, ModelWeights weights);
  const ModelConfig& config() const { return config_; }

  // Rows of logits `forward` writes for this batch.
  static long logit_rows(const SeqBatch* seqs, int n);
  // Runs the batch, appends to the caches and writes logit_rows() x vocab floats.
  void forward(const SeqBatch* seqs, int n, Workspace& ws, float* logits) const;
  // Runs complete sequences (no cache) and writes the last hidden state of every token.
  void encode(const SeqBatch* seqs, int n, Workspace& ws, float* hidden) const;

  // The pieces of a forward pass, for models built around this stack (model/seq2seq.h). They work
  // on ws.x (the residual stream, `rows` packed rows) and leave cache lengths alone.
  void embed(const SeqBatch* seqs, int n, Workspace& ws, long rows) const;
  void attention_block(int layer, const SeqBatch* seqs, int n, Workspace& ws, long rows) const;
  void ffn_block(int layer, Workspace& ws, long rows) const;
  void norm(const Norm& w, const float* x, long rows, float* y) const;
  // Final norm and LM head on the rows whose logits are wanted.
  void head(const SeqBatch* seqs, int n, Workspace& ws, float* logits) const;
  // Scale, soft cap and relative position bias of this stack's self-attention.
  void attention_shape(kernels::AttentionShape& shape) const;

 private:
  long run_layers(const SeqBatch* seqs, int n, Workspace& ws) const;
  void plan_cache_writes(int layer, const SeqBatch* seqs, int n, Workspace& ws) const;
  void attention_views(int layer, const SeqBatch* seqs, int n, Workspace& ws) const;
  void add_output(const Linear& w, const Norm& post_norm, const float* in, long rows, long in_dim,
                  Workspace& ws) const;
  void add_normed(const Norm& post_norm, long rows, Workspace& ws) const;

  ModelConfig config_;
  ModelWeights weights_;
};

}  // namespace pyxf
