// Encoder-decoder transformers (the original Transformer, Marian, T5): an encoder stack and a
// decoder stack, both `Transformer`s, the decoder's blocks gaining a cross-attention sub-block
// between self-attention and the FFN.
//
// Sources are packed without padding, as encoder batches are: each decoder sequence attends to the
// rows of its own source only. The encoder runs once per source; its output is projected once per
// decoder layer to cross-attention keys/values (`EncodedSources`), which every hypothesis of that
// source (beam search) reads in place. They are laid out as a KV cache's pages (keys transposed),
// so the attention kernel reads them as it reads the self-attention cache, with no transposes per
// step.
#pragma once
#include <cstdint>
#include <vector>

#include "model/transformer.h"

namespace pyxf {

struct CrossAttentionWeights {
  Norm norm;
  Linear q;     // [q_dim, hidden]
  Linear kv;    // [2 kv_dim, hidden]: k rows, then v rows
  Linear out;   // [hidden, q_dim]
};

// Encoder output of a batch of sources, as cross-attention keys and values of every decoder layer,
// in pages of kKVPageTokens positions laid out as KVPool's: keys [page][kv_head][head_dim][kKVPageTokens]
// (transposed), values [page][kv_head][kKVPageTokens][head_dim]. Source s owns the pages
// first_page[s] .. first_page[s + 1] of every layer; positions past its length are zeros.
struct EncodedSources {
  std::vector<long> offsets;       // source s owns encoder rows offsets[s] .. offsets[s + 1]
  std::vector<int32_t> first_page; // n() + 1 entries
  std::vector<int32_t> page_ids;   // 0, 1, 2, ...: the page table each source's view starts into
  std::vector<float> keys, values; // [decoder layer][page][...] as above
  long page_floats = 0;            // floats of one page (all kv heads), keys or values
  long rows = 0;
  int n() const { return (int)offsets.size() - 1; }
  int length(int s) const { return (int)(offsets[s + 1] - offsets[s]); }
  long layer_floats() const { return (long)page_ids.size() * page_floats; }
};

// New tokens of one decoder sequence (a hypothesis), its self-attention cache and its source.
struct DecoderSeq {
  KVCache* cache;
  const int32_t* tokens;
  int n_new;
  int source;        // index into EncodedSources
  bool all_logits;   // logits for every new token, else only for the last one
};

class Seq2SeqModel {
 public:
  Seq2SeqModel(Transformer encoder, Transformer decoder, std::vector<CrossAttentionWeights> cross);
  const Transformer& encoder() const { return encoder_; }
  const Transformer& decoder() const { return decoder_; }

  // Runs the encoder over complete sources and makes every decoder layer's cross keys/values.
  void encode(const std::vector<std::vector<int32_t>>& sources, Workspace& ws, EncodedSources& out) const;
  // Runs the decoder on new tokens, appends to their caches and writes logit rows (as
  // Transformer::forward: all rows or the last one per sequence) x vocab floats.
  void decode(const DecoderSeq* seqs, int n, const EncodedSources& enc, Workspace& ws, float* logits) const;

 private:
  void cross_attention_block(int layer, const DecoderSeq* seqs, int n, const EncodedSources& enc, Workspace& ws,
                             long rows) const;

  Transformer encoder_;
  Transformer decoder_;
  std::vector<CrossAttentionWeights> cross_;
};

}  // namespace pyxf
