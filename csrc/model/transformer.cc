#include "model/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "runtime/profile.h"

namespace pyxf {

namespace k = kernels;

// Cache slots a layer writes up to which their lines are asked for as soon as the qkv projection
// ends (the stores come after RoPE): a decode step's. Each transposed key is head_dim lines that
// the weights streamed since the last step have evicted; the stores that met them cold took 2.7 us
// a layer in a SmolLM2 q4_0 step (Xeon), 0.6 us after the prefetch (+0.1 us of RoPE). Asked for
// before the projection instead, they slowed its stream by as much. A prompt's slots share lines.
constexpr long kPrefetchedSlotWrites = 64;

void Workspace::reserve(const ModelConfig& c, long rows) {
  auto grow = [](auto& v, size_t n) { if (v.size() < n) v.resize(n); };
  grow(x, rows * c.hidden_size);
  grow(h, rows * c.hidden_size);
  grow(qkv, rows * c.qkv_dim());
  grow(attn, rows * c.q_dim());
  if (!c.moe()) {  // expert_ffn sizes its own scratch
    grow(ffn, rows * c.ffn_width());
    grow(act, rows * c.intermediate_size);
  }
  grow(head_in, rows * c.hidden_size);
  grow(pos, rows);
  grow(rope_cs, rows * c.rope_dim);
  if (c.has_local_rope()) grow(rope_local_cs, rows * c.rope_dim);
}

Transformer::Transformer(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)), weights_(std::move(weights)) {}

long Transformer::logit_rows(const SeqBatch* seqs, int n) {
  long rows = 0;
  for (int s = 0; s < n; ++s) rows += seqs[s].logit_count();
  return rows;
}

// y (+)= x W^T + b on whichever kernel the weight's format needs.
void apply_linear(const Linear& w, const float* x, long rows, long in, long out, float* y, bool accumulate) {
  const k::KernelTable& K = k::active();
  if (!w.segments.empty()) {
    K.linear_quant_segments(x, rows, w.segments.data(), (int)w.segments.size(), w.bias, y, accumulate);
  } else if (w.quantized) {
    K.linear_quant(x, rows, w.quant, w.bias, y, accumulate);
  } else {
    K.linear(x, rows, in, w.weight, w.dtype, out, w.bias, y, accumulate, w.panels);
  }
}

void Transformer::norm(const Norm& w, const float* x, long rows, float* y) const {
  StageTimer timer(Stage::kNorm);
  const k::KernelTable& K = k::active();
  if (config_.norm == NormKind::kRms) {
    K.rmsnorm(x, w.weight, config_.norm_eps, rows, config_.hidden_size, y);
  } else {
    K.layernorm(x, w.weight, w.bias, config_.norm_eps, rows, config_.hidden_size, y);
  }
}

void Transformer::embed(const SeqBatch* seqs, int n, Workspace& ws, long rows) const {
  // Every forward pass starts here: a decode step when each sequence feeds one token. (Written only
  // while profiling: concurrent forward passes would otherwise race on it.)
  if (profile().enabled) {
    bool decode_step = config_.causal;
    for (int s = 0; s < n; ++s) decode_step = decode_step && seqs[s].n_new == 1;
    profile().phase = decode_step ? Phase::kDecode : Phase::kPrefill;
  }
  StageTimer timer(Stage::kEmbed);
  const long H = config_.hidden_size;
  const k::KernelTable& K = k::active();
  long row = 0;
  for (int s = 0; s < n; ++s) {
    const int past = seqs[s].cache ? seqs[s].cache->length() : 0;
    for (int i = 0; i < seqs[s].n_new; ++i, ++row) {
      ws.pos[row] = past + i;
      float* x = &ws.x[row * H];
      const long token = seqs[s].tokens[i];
      if (weights_.embed.quantized) {
        K.dequantize_row(weights_.embed.quant, token, x);
      } else {
        K.load_row(weights_.embed.weight, weights_.embed.dtype, token, H, x);
      }
      if (config_.embed_scale != 1.0f) {
        for (long d = 0; d < H; ++d) x[d] *= config_.embed_scale;
      }
      if (weights_.pos_embed) {
        K.add(x, weights_.pos_embed + (long)(past + i + config_.position_offset) * H, H);
      }
      if (weights_.type_embed) {
        const long type = seqs[s].type_ids ? seqs[s].type_ids[i] : 0;
        K.add(x, weights_.type_embed + type * H, H);
      }
    }
  }
  if (weights_.embed_norm.weight) norm(weights_.embed_norm, ws.x.data(), rows, ws.x.data());
  if (config_.position == PositionKind::kRope) {
    StageTimer rope_timer(Stage::kRope);
    K.rope_table(ws.pos.data(), rows, config_.rope_inv_freq.data(), config_.rope_dim / 2,
                 config_.rope_attention_scaling, ws.rope_cs.data());
    if (config_.has_local_rope()) {  // local layers' frequencies are not scaled (ModernBERT, Gemma 3)
      K.rope_table(ws.pos.data(), rows, config_.rope_local_inv_freq.data(), config_.rope_dim / 2, 1.0f,
                   ws.rope_local_cs.data());
    }
  }
}

// The slots this layer's new keys and values go to (ws.kv_writes), their sources the qkv rows.
void Transformer::plan_cache_writes(int layer, const SeqBatch* seqs, int n, Workspace& ws) const {
  const ModelConfig& c = config_;
  const long D = c.head_dim, qkv_dim = c.qkv_dim();
  ws.kv_writes.clear();
  long row = 0;
  for (int s = 0; s < n; ++s) {
    if (seqs[s].cache) {
      const int past = seqs[s].cache->length();
      for (int i = 0; i < seqs[s].n_new; ++i) {
        const float* src = &ws.qkv[(row + i) * qkv_dim + c.q_dim()];
        for (int g = 0; g < c.num_kv_heads; ++g) {
          ws.kv_writes.push_back(seqs[s].cache->slot_write(layer, g, past + i, src + g * D, src + c.kv_dim() + g * D));
        }
      }
    }
    row += seqs[s].n_new;
  }
}

// Writes the planned keys/values to the caches and describes each sequence's attention problem.
void Transformer::attention_views(int layer, const SeqBatch* seqs, int n, Workspace& ws) const {
  StageTimer timer(Stage::kCacheWrite);
  const ModelConfig& c = config_;
  const long D = c.head_dim, qkv_dim = c.qkv_dim();
  ws.attn_seqs.resize(n);
  long row = 0;
  for (int s = 0; s < n; ++s) {
    k::AttentionSeq& a = ws.attn_seqs[s];
    a = k::AttentionSeq{};
    a.q = &ws.qkv[row * qkv_dim];
    a.out = &ws.attn[row * c.q_dim()];
    a.n_new = seqs[s].n_new;
    if (!seqs[s].cache) {
      // Keys and values stay in the qkv rows.
      a.k = a.q + c.q_dim();
      a.v = a.q + c.q_dim() + c.kv_dim();
      a.kv_head_stride = D;
      a.kv_pos_stride = qkv_dim;
      a.n_past = 0;
      a.n_keys = seqs[s].n_new;
    } else {
      seqs[s].cache->describe(layer, a);
      a.n_past = seqs[s].cache->length();
      a.n_keys = a.n_past + seqs[s].n_new;
    }
    row += seqs[s].n_new;
  }
  k::active().store_kv_slots(ws.kv_writes.data(), (long)ws.kv_writes.size(), (int)D);
}

void Transformer::attention_block(int layer, const SeqBatch* seqs, int n, Workspace& ws,
                                  long rows) const {
  const ModelConfig& c = config_;
  const LayerWeights& L = weights_.layers[layer];
  const k::KernelTable& K = k::active();
  const long H = c.hidden_size, D = c.head_dim, qkv_dim = c.qkv_dim();

  const float* in = ws.x.data();
  if (!c.post_norm && L.attn_norm.weight) {  // absent: layer 0 without first_attn_norm
    norm(L.attn_norm, ws.x.data(), rows, ws.h.data());
    in = ws.h.data();
  }
  {
    StageTimer timer(Stage::kQkv);
    apply_linear(L.qkv, in, rows, H, qkv_dim, ws.qkv.data(), false);
  }
  plan_cache_writes(layer, seqs, n, ws);
  if ((long)ws.kv_writes.size() <= kPrefetchedSlotWrites) {  // a decode step: lines the weights evicted
    K.prefetch_kv_slots(ws.kv_writes.data(), (long)ws.kv_writes.size(), (int)D);
  }
  if (c.qk_norm) {
    StageTimer timer(Stage::kNorm);
    // A token's q, then its k, are adjacent in its qkv row: normalized per head (rows of
    // head_dim) or as a whole projection (one row).
    const long qn = c.q_norm_width(), kn = c.k_norm_width();
    for (long r = 0; r < rows; ++r) {
      float* q = ws.qkv.data() + r * qkv_dim;
      float* k = q + c.q_dim();
      K.rmsnorm(q, L.q_norm.weight, c.norm_eps, c.q_dim() / qn, qn, q);
      K.rmsnorm(k, L.k_norm.weight, c.norm_eps, c.kv_dim() / kn, kn, k);
    }
  }
  if (c.position == PositionKind::kRope) {
    StageTimer timer(Stage::kRope);
    // q and k heads are adjacent in a qkv row: one call rotates both.
    const float* table = c.has_local_rope() && c.local_layer(layer) ? ws.rope_local_cs.data() : ws.rope_cs.data();
    K.rope(ws.qkv.data(), rows, qkv_dim, c.num_heads + c.num_kv_heads, (int)D, c.rope_dim, table,
           c.rope_interleaved);
  }

  attention_views(layer, seqs, n, ws);
  k::AttentionShape shape;
  shape.n_heads = c.num_heads;
  shape.n_kv_heads = c.num_kv_heads;
  shape.head_dim = (int)D;
  shape.q_row_stride = qkv_dim;
  shape.out_row_stride = c.q_dim();
  shape.causal = c.causal;
  attention_shape(shape);
  shape.window = c.attention_window(layer);
  {
    StageTimer timer(Stage::kAttention);
    K.attention(ws.attn_seqs.data(), n, shape);
  }
  {
    StageTimer timer(Stage::kAttnOut);
    add_output(L.attn_out, L.attn_post_norm, ws.attn.data(), rows, c.q_dim(), ws);
  }
  if (c.post_norm) norm(L.attn_norm, ws.x.data(), rows, ws.x.data());
}

// x += post_norm(in W^T + b) with sandwich norms, else x += in W^T + b with the residual add fused
// into the projection.
void Transformer::add_output(const Linear& w, const Norm& post_norm, const float* in, long rows, long in_dim,
                             Workspace& ws) const {
  const long H = config_.hidden_size;
  if (!config_.sandwich_norm) {
    apply_linear(w, in, rows, in_dim, H, ws.x.data(), true);
    return;
  }
  apply_linear(w, in, rows, in_dim, H, ws.h.data(), false);
  add_normed(post_norm, rows, ws);
}

// x += post_norm(h): a sandwich block's output joins the residual stream.
void Transformer::add_normed(const Norm& post_norm, long rows, Workspace& ws) const {
  norm(post_norm, ws.h.data(), rows, ws.h.data());
  k::active().add(ws.x.data(), ws.h.data(), rows * config_.hidden_size);
}

void Transformer::attention_shape(k::AttentionShape& shape) const {
  shape.scale = config_.attn_scale > 0.0f ? config_.attn_scale : 1.0f / std::sqrt((float)config_.head_dim);
  shape.pos_bias = weights_.rel_pos_bias;
  shape.pos_bias_radius = config_.rel_pos_radius;
  shape.softcap = config_.attn_softcap;
  // A model whose projections compute in bf16 takes attention's products in bf16 too; a quantized
  // one where AMX tiles run them (MiniLM int8 encoding: attention 528 -> 384 ms).
  const Linear* qkv = weights_.layers.empty() ? nullptr : &weights_.layers[0].qkv;
  shape.products = !qkv                                  ? k::AttentionProducts::kFloat
                   : qkv->quantized                      ? k::AttentionProducts::kBf16OnTiles
                   : qkv->dtype == k::WeightType::kBF16 ? k::AttentionProducts::kBf16
                                                          : k::AttentionProducts::kFloat;
}

void gated_ffn(const Linear& gate_up, const Linear& down, const float* x, long rows, long H, long I,
               k::Activation act, float* ffn, float* hidden, float* y, bool accumulate) {
  const k::KernelTable& K = k::active();
  const bool fused = !gate_up.bias && gate_up.segments.empty() &&
                     (gate_up.quantized ? K.linear_quant_gated && rows >= k::kQuantGemmRows
                                        : rows >= k::kFloatGemmRows || gate_up.panels);
  if (fused) {
    // The activation runs on the GEMM's tiles (no 2 I-wide intermediate in memory).
    StageTimer timer(Stage::kFfnUp);
    if (gate_up.quantized) {
      K.linear_quant_gated(x, rows, gate_up.quant, act, hidden);
    } else {
      K.linear_gated(x, rows, H, gate_up.weight, gate_up.dtype, I, act, hidden, gate_up.panels);
    }
  } else {
    {
      StageTimer timer(Stage::kFfnUp);
      apply_linear(gate_up, x, rows, H, 2 * I, ffn, false);
    }
    StageTimer timer(Stage::kActivation);
    K.gated_activation(ffn, rows, I, act, hidden);
  }
  StageTimer timer(Stage::kFfnDown);
  apply_linear(down, hidden, rows, I, H, y, accumulate);
}

// y (+)= act(x up^T) down^T for `rows` rows, through the I-wide intermediate `ffn`.
static void plain_ffn(const Linear& up, const Linear& down, const float* x, long rows, long H, long I,
                      k::Activation act, float* ffn, float* y, bool accumulate) {
  {
    StageTimer timer(Stage::kFfnUp);
    apply_linear(up, x, rows, H, I, ffn, false);
  }
  {
    StageTimer timer(Stage::kActivation);
    k::active().activation(ffn, rows * I, act);
  }
  StageTimer timer(Stage::kFfnDown);
  apply_linear(down, ffn, rows, I, H, y, accumulate);
}

// Rows a dense FFN takes at a time when its weights were packed at load (quantized encoders, and
// 16-bit weights whose panels the kernels made): the intermediate (rows x I floats: written by the up
// projection, activated, then read and quantized by the down projection) stays in the caches instead
// of making three passes through memory (a batch of 32 MiniLM sentences is ~2,900 rows, an 18 MB
// intermediate; bf16 on AMX tiles: 5-10% faster encoding). Weights packed per call are not chunked:
// each chunk would pack them again. Nor are gated FFNs on 16-bit panels, whose activation already
// runs on the GEMM's tiles (SmolLM2 bf16 prefill: 8% slower chunked).
constexpr long kFfnChunkRows = 256;

static long ffn_chunk_rows(const Linear& up, const Linear& down, bool gated, long rows) {
  const auto gemm_panels = [](const Linear& w) {
    return w.quantized && w.quant.panel_layout != kernels::PanelLayout::kNone &&
           w.quant.panel_layout != kernels::PanelLayout::kStrips;  // strips: the GEMM packs per call
  };
  const bool quantized = gemm_panels(up) && gemm_panels(down);
  const bool dense = !gated && !up.quantized && up.panels && !down.quantized && down.panels;
  return quantized || dense ? kFfnChunkRows : rows;
}

void Transformer::ffn_block(int layer, Workspace& ws, long rows) const {
  const ModelConfig& c = config_;
  const LayerWeights& L = weights_.layers[layer];
  const long H = c.hidden_size, I = c.intermediate_size;

  const float* in = ws.x.data();
  if (!c.post_norm) {
    norm(L.ffn_norm, ws.x.data(), rows, ws.h.data());
    in = ws.h.data();
  }
  // The FFN's output is added to x; with sandwich norms it goes to h, is normed, then added.
  float* out = c.sandwich_norm ? ws.h.data() : ws.x.data();
  const bool accumulate = !c.sandwich_norm;
  if (c.moe()) {
    expert_ffn(c, L.experts, in, rows, ws.experts, ws.x.data());
  } else {
    const long chunk = ffn_chunk_rows(L.ffn_up, L.ffn_down, c.gated_ffn, rows);
    for (long r0 = 0; r0 < rows; r0 += chunk) {
      const long n = std::min(chunk, rows - r0);
      if (c.gated_ffn) {
        gated_ffn(L.ffn_up, L.ffn_down, in + r0 * H, n, H, I, c.activation, ws.ffn.data(), ws.act.data(),
                  out + r0 * H, accumulate);
      } else {
        plain_ffn(L.ffn_up, L.ffn_down, in + r0 * H, n, H, I, c.activation, ws.ffn.data(), out + r0 * H,
                  accumulate);
      }
    }
  }
  if (c.sandwich_norm) add_normed(L.ffn_post_norm, rows, ws);
  if (c.post_norm) norm(L.ffn_norm, ws.x.data(), rows, ws.x.data());
}

long Transformer::run_layers(const SeqBatch* seqs, int n, Workspace& ws) const {
  const ModelConfig& c = config_;
  long rows = 0;
  for (int s = 0; s < n; ++s) {
    const KVCache* cache = seqs[s].cache;
    const long length = (cache ? cache->length() : 0) + seqs[s].n_new;
    if ((cache && length > cache->capacity()) || length > c.max_sequence()) {
      throw std::length_error("sequence exceeds its KV cache capacity or the model's positions");
    }
    rows += seqs[s].n_new;
  }
  if (rows == 0) return 0;
  ws.reserve(c, rows);

  embed(seqs, n, ws, rows);
  for (int l = 0; l < c.num_layers; ++l) {
    attention_block(l, seqs, n, ws, rows);
    ffn_block(l, ws, rows);
  }
  for (int s = 0; s < n; ++s) {
    if (seqs[s].cache) seqs[s].cache->set_length(seqs[s].cache->length() + seqs[s].n_new);
  }
  return rows;
}

// Rows an encoder's forward pass takes at a time: a batch of more runs as groups of consecutive
// sequences up to this many rows (one sequence at least), all layers each, so that a layer's
// activations stay nearer the cores (MiniLM's qkv is 4.5 KB a row: 1,024 rows fit the L2 of two
// cores, a batch of 32 sentences, ~3,000 rows, does not). MiniLM int8 on AMX: 9% faster than one
// pass over the batch; 512 to 1,536 rows measured within noise of each other.
constexpr long kEncodeGroupRows = 1024;

void Transformer::encode(const SeqBatch* seqs, int n, Workspace& ws, float* hidden) const {
  const long H = config_.hidden_size;
  for (int first = 0; first < n;) {
    int end = first + 1;
    long group = seqs[first].n_new;
    while (end < n && group + seqs[end].n_new <= kEncodeGroupRows) group += seqs[end++].n_new;
    const long rows = run_layers(seqs + first, end - first, ws);
    if (weights_.final_norm.weight) {
      norm(weights_.final_norm, ws.x.data(), rows, hidden);
    } else {
      std::memcpy(hidden, ws.x.data(), rows * H * sizeof(float));
    }
    hidden += rows * H;
    first = end;
  }
}

void Transformer::forward(const SeqBatch* seqs, int n, Workspace& ws, float* logits) const {
  StageTimer forward_timer(Stage::kForward);
  if (run_layers(seqs, n, ws) == 0) return;
  head(seqs, n, ws, logits);
}

void Transformer::head(const SeqBatch* seqs, int n, Workspace& ws, float* logits) const {
  const ModelConfig& c = config_;
  // The head runs only on the rows whose logits are wanted.
  const long H = c.hidden_size;
  long out_rows = 0, row = 0;
  for (int s = 0; s < n; ++s) {
    const int first = seqs[s].n_new - seqs[s].logit_count();
    for (int i = first; i < seqs[s].n_new; ++i) {
      std::memcpy(&ws.head_in[out_rows++ * H], &ws.x[(row + i) * H], H * sizeof(float));
    }
    row += seqs[s].n_new;
  }
  if (out_rows == 0) return;
  if (weights_.final_norm.weight) norm(weights_.final_norm, ws.head_in.data(), out_rows, ws.head_in.data());
  if (c.head_scale != 1.0f) {
    for (long i = 0; i < out_rows * H; ++i) ws.head_in[i] *= c.head_scale;
  }
  StageTimer timer(Stage::kHead);
  apply_linear(weights_.lm_head, ws.head_in.data(), out_rows, H, c.vocab_size, logits, false);
  if (c.logit_softcap > 0.0f) k::active().softcap(logits, out_rows * c.vocab_size, c.logit_softcap);
}

}  // namespace pyxf
