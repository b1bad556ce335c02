#include "model/seq2seq.h"

#include "runtime/profile.h"

#include <stdexcept>
#include <utility>

namespace pyxf {

namespace k = kernels;

Seq2SeqModel::Seq2SeqModel(Transformer encoder, Transformer decoder, std::vector<CrossAttentionWeights> cross)
    : encoder_(std::move(encoder)), decoder_(std::move(decoder)), cross_(std::move(cross)) {
  if (encoder_.config().hidden_size != decoder_.config().hidden_size) {
    throw std::invalid_argument("encoder and decoder hidden sizes differ");
  }
  if ((int)cross_.size() != decoder_.config().num_layers) {
    throw std::invalid_argument("one cross-attention per decoder layer");
  }
}

void Seq2SeqModel::encode(const std::vector<std::vector<int32_t>>& sources, Workspace& ws,
                          EncodedSources& out) const {
  StageTimer timer(Stage::kEncode);
  const ModelConfig& c = decoder_.config();
  const long H = c.hidden_size, kv2 = 2L * c.kv_dim();
  const int n = (int)sources.size();
  std::vector<SeqBatch> batch(n);
  out.offsets.assign(1, 0);
  for (int s = 0; s < n; ++s) {
    batch[s] = SeqBatch{nullptr, sources[s].data(), (int)sources[s].size(), false};
    out.offsets.push_back(out.offsets.back() + (long)sources[s].size());
  }
  out.rows = out.offsets.back();
  constexpr int P = kernels::kKVPageTokens;
  out.first_page.assign(1, 0);
  for (int s = 0; s < n; ++s) out.first_page.push_back(out.first_page.back() + (out.length(s) + P - 1) / P);
  out.page_ids.resize(out.first_page.back());
  for (size_t p = 0; p < out.page_ids.size(); ++p) out.page_ids[p] = (int32_t)p;
  const long D = c.head_dim, G = c.num_kv_heads;
  out.page_floats = G * D * P;
  out.keys.assign((size_t)c.num_layers * out.layer_floats(), 0.0f);
  out.values.assign((size_t)c.num_layers * out.layer_floats(), 0.0f);
  if (out.rows == 0) return;
  std::vector<float> hidden((size_t)out.rows * H), kv((size_t)out.rows * kv2);
  encoder_.encode(batch.data(), n, ws, hidden.data());
  for (int l = 0; l < c.num_layers; ++l) {
    apply_linear(cross_[l].kv, hidden.data(), out.rows, H, kv2, kv.data(), false);
    float* keys = out.keys.data() + (size_t)l * out.layer_floats();
    float* values = out.values.data() + (size_t)l * out.layer_floats();
    ws.kv_writes.clear();
    for (int s = 0; s < n; ++s) {
      for (int i = 0; i < out.length(s); ++i) {
        const float* row = &kv[(size_t)(out.offsets[s] + i) * kv2];
        const long page = (out.first_page[s] + i / P) * out.page_floats;
        for (long g = 0; g < G; ++g) {
          ws.kv_writes.push_back({keys + page + g * D * P, values + page + g * D * P, i % P, row + g * D,
                                  row + c.kv_dim() + g * D});
        }
      }
    }
    kernels::active().store_kv_slots(ws.kv_writes.data(), (long)ws.kv_writes.size(), (int)D);
  }
}

void Seq2SeqModel::cross_attention_block(int layer, const DecoderSeq* seqs, int n, const EncodedSources& enc,
                                         Workspace& ws, long rows) const {
  StageTimer timer(Stage::kCrossAttention);
  const ModelConfig& c = decoder_.config();
  const CrossAttentionWeights& W = cross_[layer];
  const long H = c.hidden_size, D = c.head_dim, qd = c.q_dim();

  const float* in = ws.x.data();
  if (!c.post_norm) {
    decoder_.norm(W.norm, ws.x.data(), rows, ws.h.data());
    in = ws.h.data();
  }
  apply_linear(W.q, in, rows, H, qd, ws.qkv.data(), false);

  // One attention problem per run of sequences of the same source (a source's beams): their
  // queries are consecutive rows and see the same keys, which are then read once for all of them.
  ws.attn_seqs.clear();
  long row = 0;
  for (int s = 0; s < n; ++s) {
    const int source = seqs[s].source;
    if (s > 0 && source == seqs[s - 1].source) {
      ws.attn_seqs.back().n_new += seqs[s].n_new;
      row += seqs[s].n_new;
      continue;
    }
    k::AttentionSeq a{};
    a.q = &ws.qkv[row * qd];
    a.out = &ws.attn[row * qd];
    a.k = enc.keys.data() + (size_t)layer * enc.layer_floats();
    a.v = enc.values.data() + (size_t)layer * enc.layer_floats();
    a.pages = enc.page_ids.data() + enc.first_page[source];
    a.page_stride = enc.page_floats;
    a.kv_head_stride = D * kernels::kKVPageTokens;  // a page's kv heads, as KVPool's
    a.kv_pos_stride = D;
    a.keys_transposed = true;
    a.n_new = seqs[s].n_new;
    a.n_past = 0;
    a.n_keys = enc.length(source);
    ws.attn_seqs.push_back(a);
    row += seqs[s].n_new;
  }
  k::AttentionShape shape;
  shape.n_heads = c.num_heads;
  shape.n_kv_heads = c.num_kv_heads;
  shape.head_dim = (int)D;
  shape.q_row_stride = qd;
  shape.out_row_stride = qd;
  decoder_.attention_shape(shape);
  shape.pos_bias = nullptr;  // positions mean nothing across the two sequences
  shape.pos_bias_radius = 0;
  shape.causal = false;
  k::active().attention(ws.attn_seqs.data(), (int)ws.attn_seqs.size(), shape);

  apply_linear(W.out, ws.attn.data(), rows, qd, H, ws.x.data(), true);
  if (c.post_norm) decoder_.norm(W.norm, ws.x.data(), rows, ws.x.data());
}

void Seq2SeqModel::decode(const DecoderSeq* seqs, int n, const EncodedSources& enc, Workspace& ws,
                          float* logits) const {
  const ModelConfig& c = decoder_.config();
  std::vector<SeqBatch> batch(n);
  long rows = 0;
  for (int s = 0; s < n; ++s) {
    const KVCache& cache = *seqs[s].cache;
    const long length = cache.length() + seqs[s].n_new;
    if (length > cache.capacity() || length > c.max_sequence()) {
      throw std::length_error("target sequence exceeds its KV cache capacity or the model's positions");
    }
    if (seqs[s].source < 0 || seqs[s].source >= enc.n()) throw std::out_of_range("bad source index");
    batch[s] = SeqBatch{seqs[s].cache, seqs[s].tokens, seqs[s].n_new, seqs[s].all_logits};
    rows += seqs[s].n_new;
  }
  if (rows == 0) return;
  ws.reserve(c, rows);
  decoder_.embed(batch.data(), n, ws, rows);
  for (int l = 0; l < c.num_layers; ++l) {
    decoder_.attention_block(l, batch.data(), n, ws, rows);
    cross_attention_block(l, seqs, n, enc, ws, rows);
    decoder_.ffn_block(l, ws, rows);
  }
  for (int s = 0; s < n; ++s) seqs[s].cache->set_length(seqs[s].cache->length() + seqs[s].n_new);
  decoder_.head(batch.data(), n, ws, logits);
}

}  // namespace pyxf
