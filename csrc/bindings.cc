// pyxf._core: the only file that knows about Python. Everything crossing this boundary is checked
// here once (names, shapes, dtypes, token ids, lengths); the engine behind it runs unchecked.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "kernels/kernels.h"
#include "model/transformer.h"
#include "model/seq2seq.h"
#include "runtime/beam_search.h"
#include "runtime/engine.h"
#include "runtime/profile.h"
#include "runtime/threads.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace pyxf {
namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// A call from a Python thread into the core's computation: the GIL is released for its duration,
// and the thread adopts the process-wide thread count first. OpenMP keeps the count per calling
// thread, so without this pyxf.set_num_threads in one thread would not reach work started from
// another (a new thread runs with OpenMP's default, one thread per CPU).
class CoreCall {
 public:
  CoreCall() { adopt_num_threads(); }

 private:
  py::gil_scoped_release release_;
};

template <typename T>
T config_value(const py::dict& cfg, const char* key) {
  if (!cfg.contains(key)) throw py::key_error(std::string("config is missing '") + key + "'");
  try {
    return cfg[key].cast<T>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string("config '") + key + "' has the wrong type");
  }
}

template <typename T>
T config_value(const py::dict& cfg, const char* key, T fallback) {
  if (!cfg.contains(key) || cfg[key].is_none()) return fallback;
  return config_value<T>(cfg, key);
}

kernels::Activation parse_activation(const std::string& name) {
  if (name == "silu") return kernels::Activation::kSilu;
  if (name == "gelu") return kernels::Activation::kGelu;
  if (name == "gelu_tanh") return kernels::Activation::kGeluTanh;
  if (name == "relu") return kernels::Activation::kRelu;
  throw py::value_error("unknown activation '" + name + "' (silu, gelu, gelu_tanh, relu)");
}

ModelConfig parse_config(const py::dict& cfg) {
  ModelConfig c;
  c.family = config_value<std::string>(cfg, "family");
  c.vocab_size = config_value<int>(cfg, "vocab_size");
  c.hidden_size = config_value<int>(cfg, "hidden_size");
  c.num_layers = config_value<int>(cfg, "num_layers");
  c.num_heads = config_value<int>(cfg, "num_heads");
  c.num_kv_heads = config_value<int>(cfg, "num_kv_heads", c.num_heads);
  c.head_dim = config_value<int>(cfg, "head_dim", c.num_heads ? c.hidden_size / c.num_heads : 0);
  c.intermediate_size = config_value<int>(cfg, "intermediate_size");
  c.max_positions = config_value<int>(cfg, "max_position_embeddings");
  const std::string norm = config_value<std::string>(cfg, "norm");
  if (norm != "rmsnorm" && norm != "layernorm") throw py::value_error("unknown norm '" + norm + "'");
  c.norm = norm == "rmsnorm" ? NormKind::kRms : NormKind::kLayer;
  c.norm_eps = config_value<float>(cfg, "norm_eps");
  const std::string placement = config_value<std::string>(cfg, "norm_position", std::string("pre"));
  if (placement != "pre" && placement != "post") throw py::value_error("unknown norm_position '" + placement + "'");
  c.post_norm = placement == "post";
  c.activation = parse_activation(config_value<std::string>(cfg, "activation"));
  c.gated_ffn = config_value<bool>(cfg, "gated_ffn");
  const std::string position = config_value<std::string>(cfg, "position");
  if (position == "rope") c.position = PositionKind::kRope;
  else if (position == "learned") c.position = PositionKind::kLearned;
  else if (position == "none") c.position = PositionKind::kNone;
  else throw py::value_error("unknown position scheme '" + position + "'");
  c.tied_embeddings = config_value<bool>(cfg, "tie_word_embeddings", false);
  const std::string architecture = config_value<std::string>(cfg, "architecture", std::string("decoder"));
  if (architecture != "decoder" && architecture != "encoder") {
    throw py::value_error("architecture '" + architecture + "' is not supported by this build");
  }
  c.causal = config_value<bool>(cfg, "causal", architecture == "decoder");
  c.position_offset = config_value<int>(cfg, "position_offset", 0);
  c.type_vocab_size = config_value<int>(cfg, "type_vocab_size", 0);
  c.has_lm_head = architecture == "decoder";
  if (c.position_offset < 0 || c.type_vocab_size < 0) throw py::value_error("position_offset and type_vocab_size must be >= 0");

  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 ||
      c.num_kv_heads <= 0 || c.head_dim <= 0 || c.intermediate_size <= 0 || c.max_positions <= 0) {
    throw py::value_error("config sizes must be positive");
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    throw py::value_error("num_heads must be a multiple of num_kv_heads");
  }
  if (c.position == PositionKind::kRope) {
    c.rope_interleaved = config_value<bool>(cfg, "rope_interleaved", false);
    FloatArray inv_freq = config_value<FloatArray>(cfg, "rope_inv_freq");
    c.rope_inv_freq.assign(inv_freq.data(), inv_freq.data() + inv_freq.size());
    c.rope_dim = 2 * (int)inv_freq.size();
    c.rope_attention_scaling = config_value<float>(cfg, "rope_attention_scaling", 1.0f);
    if (c.rope_dim == 0 || c.rope_dim > c.head_dim || c.rope_dim > 1024) {
      throw py::value_error("rope_inv_freq must have between 1 and head_dim/2 entries");
    }
  }
  return c;
}

// Owns what the raw weight pointers point into: the caller's arrays, or widened copies.
class WeightStore {
 public:
  WeightStore(py::dict arrays, std::string dtype) : arrays_(std::move(arrays)), dtype_(std::move(dtype)) {}

  // A float tensor, widened to float32 once when stored in 16 bits (norms, biases).
  const float* get(const std::string& name, std::vector<long> shape, bool required = true) {
    py::object found = checked(name, shape, required);
    if (found.is_none()) return nullptr;
    py::array a = found.cast<py::array>();
    if (a.dtype().is(py::dtype::of<float>())) return static_cast<const float*>(a.data());
    return widen(name, a);
  }

  // A weight matrix as stored: float32, or 16-bit that the kernels widen in registers.
  std::pair<const void*, kernels::WeightType> get_matrix(const std::string& name, std::vector<long> shape) {
    py::array a = checked(name, shape, true).cast<py::array>();
    if (a.dtype().is(py::dtype::of<float>())) return {a.data(), kernels::WeightType::kF32};
    if (a.itemsize() == 2 && (a.dtype().kind() == 'f' || dtype_ == "float16")) return {a.data(), kernels::WeightType::kF16};
    if (a.itemsize() == 2 && a.dtype().kind() == 'u' && dtype_ == "bfloat16") return {a.data(), kernels::WeightType::kBF16};
    throw py::type_error("tensor '" + name + "' has unsupported dtype");
  }

 private:
  // The named array after checking layout, shape and element size; None when optional and absent.
  py::object checked(const std::string& name, const std::vector<long>& shape, bool required) {
    if (!arrays_.contains(name)) {
      if (required) throw py::key_error("missing tensor '" + name + "'");
      return py::none();
    }
    py::array a = py::reinterpret_borrow<py::array>(arrays_[name.c_str()]);
    if (!(a.flags() & py::array::c_style)) throw py::value_error("tensor '" + name + "' is not C-contiguous");
    if ((size_t)a.ndim() != shape.size()) throw py::value_error("tensor '" + name + "' has the wrong rank");
    for (size_t i = 0; i < shape.size(); ++i) {
      if (a.shape(i) != shape[i]) {
        throw py::value_error("tensor '" + name + "' has shape mismatch at dim " + std::to_string(i) +
                              ": " + std::to_string(a.shape(i)) + " != " + std::to_string(shape[i]));
      }
    }
    if (!a.dtype().is(py::dtype::of<float>()) && a.itemsize() != 2) {
      throw py::type_error("tensor '" + name + "' has unsupported dtype " + std::string(py::str(a.dtype())));
    }
    keep_.push_back(a);
    return a;
  }

  // float16 / bfloat16 weights are widened once at load.
  const float* widen(const std::string& name, const py::array& a) {
    const size_t n = a.size();
    auto buf = std::make_unique<float[]>(n);
    const uint16_t* src = static_cast<const uint16_t*>(a.data());
    const bool bf16 = a.dtype().kind() == 'u' && dtype_ == "bfloat16";
    if (a.itemsize() != 2 || (a.dtype().kind() == 'u' && !bf16 && dtype_ != "float16")) {
      throw py::type_error("tensor '" + name + "' has unsupported dtype");
    }
    for (size_t i = 0; i < n; ++i) buf[i] = bf16 ? bf16_to_float(src[i]) : half_to_float(src[i]);
    owned_.push_back(std::move(buf));
    return owned_.back().get();
  }
  static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
      if (mant == 0) {
        bits = sign;
      } else {  // subnormal: renormalize
        exp = 127 - 15 + 1;
        while (!(mant & 0x400)) { mant <<= 1; --exp; }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
      }
    } else if (exp == 31) {
      bits = sign | 0x7f800000 | (mant << 13);
    } else {
      bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }

  public:
  py::dict arrays() const { return arrays_; }
  std::vector<py::array>& kept() { return keep_; }

 private:
  py::dict arrays_;
  std::string dtype_;
  std::vector<py::array> keep_;
  std::vector<std::unique_ptr<float[]>> owned_;
};

kernels::QuantFormat parse_quant_format(const std::string& name) {
  if (name == "q8_0") return kernels::QuantFormat::kQ8_0;
  if (name == "q4_0") return kernels::QuantFormat::kQ4_0;
  if (name == "q4_1") return kernels::QuantFormat::kQ4_1;
  if (name == "int8") return kernels::QuantFormat::kInt8;
  if (name == "q5_0") return kernels::QuantFormat::kQ5_0;
  if (name == "q5_1") return kernels::QuantFormat::kQ5_1;
  if (name == "q4_k") return kernels::QuantFormat::kQ4_K;
  if (name == "q5_k") return kernels::QuantFormat::kQ5_K;
  if (name == "q6_k") return kernels::QuantFormat::kQ6_K;
  throw py::value_error("unknown quantization format '" + name +
                        "' (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, int8)");
}

// A stored quantized matrix: uint8 rows of blocks, or int8 rows plus per-row float scales.
kernels::QuantWeight quant_view(py::dict arrays, const std::string& name, kernels::QuantFormat f, long out,
                                long in, std::vector<py::array>& keep) {
  const int block = kernels::quant_block_cols(f);
  if (in <= 0 || in % block != 0) {
    throw py::value_error("tensor '" + name + "': quantized rows need a multiple of " + std::to_string(block) +
                          " columns, got " + std::to_string(in));
  }
  if (!arrays.contains(name)) throw py::key_error("missing tensor '" + name + "'");
  py::array a = py::reinterpret_borrow<py::array>(arrays[name.c_str()]);
  const long row_bytes = kernels::quant_row_bytes(f, in);
  if (!(a.flags() & py::array::c_style) || a.itemsize() != 1 || a.ndim() != 2 || a.shape(0) != out ||
      a.shape(1) != row_bytes) {
    throw py::value_error("tensor '" + name + "' must be a C-contiguous 1-byte array of shape [" +
                          std::to_string(out) + ", " + std::to_string(row_bytes) + "]");
  }
  keep.push_back(a);
  kernels::QuantWeight q{f, static_cast<const uint8_t*>(a.data()), nullptr, out, in};
  if (f == kernels::QuantFormat::kInt8) {
    const std::string scale_name = name + "_scale";
    if (!arrays.contains(scale_name)) throw py::key_error("missing tensor '" + scale_name + "'");
    py::array sc = py::reinterpret_borrow<py::array>(arrays[scale_name.c_str()]);
    if (!sc.dtype().is(py::dtype::of<float>()) || sc.ndim() != 1 || sc.shape(0) != out ||
        !(sc.flags() & py::array::c_style)) {
      throw py::value_error("tensor '" + scale_name + "' must be float32 [" + std::to_string(out) + "]");
    }
    keep.push_back(sc);
    q.row_scales = static_cast<const float*>(sc.data());
  }
  return q;
}

// A quantized linear weight as config.json's "tensors" entry describes it: a format name (the
// array is [out, row bytes]), or a list of [format, rows] for a matrix stored in several formats
// (the array is the segments' bytes, one after the other).
void bind_quantized(Linear& l, py::dict arrays, const std::string& name, py::handle spec, long out, long in,
                    std::vector<py::array>& keep) {
  l.quantized = true;
  if (py::isinstance<py::str>(spec)) {
    l.quant = quant_view(arrays, name, parse_quant_format(spec.cast<std::string>()), out, in, keep);
    return;
  }
  if (!arrays.contains(name)) throw py::key_error("missing tensor '" + name + "'");
  py::array a = py::reinterpret_borrow<py::array>(arrays[name.c_str()]);
  if (!(a.flags() & py::array::c_style) || a.itemsize() != 1 || a.ndim() != 1) {
    throw py::value_error("tensor '" + name + "' (several formats) must be a C-contiguous 1-D byte array");
  }
  keep.push_back(a);
  const uint8_t* data = static_cast<const uint8_t*>(a.data());
  long rows = 0, offset = 0;
  for (py::handle item : spec) {
    const py::sequence pair = py::reinterpret_borrow<py::sequence>(item);
    if (pair.size() != 2) throw py::value_error("tensor '" + name + "': segments are [format, rows] pairs");
    const kernels::QuantFormat f = parse_quant_format(pair[0].cast<std::string>());
    const long n = pair[1].cast<long>();
    const int block = kernels::quant_block_cols(f);
    if (f == kernels::QuantFormat::kInt8 || n <= 0 || in <= 0 || in % block != 0) {
      throw py::value_error("tensor '" + name + "': bad segment (a block format whose blocks fit the " +
                            std::to_string(in) + " columns, and a positive row count)");
    }
    const long bytes = n * kernels::quant_row_bytes(f, in);
    if (offset + bytes > a.shape(0)) throw py::value_error("tensor '" + name + "' is shorter than its segments");
    l.segments.push_back({f, data + offset, nullptr, n, in});
    rows += n;
    offset += bytes;
  }
  if (rows != out || offset != a.shape(0)) {
    throw py::value_error("tensor '" + name + "': its segments cover " + std::to_string(rows) + " rows and " +
                          std::to_string(offset) + " bytes, expected " + std::to_string(out) + " rows and " +
                          std::to_string(a.shape(0)) + " bytes");
  }
}

ModelWeights bind_weights(const ModelConfig& c, WeightStore& w, py::dict formats) {
  const long H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const bool layer_norm = c.norm == NormKind::kLayer;
  auto norm = [&](const std::string& name) {
    return Norm{w.get(name + ".weight", {H}), w.get(name + ".bias", {H}, layer_norm)};
  };
  auto linear = [&](const std::string& name, long out, long in) {
    Linear l;
    const std::string weight = name + ".weight";
    if (formats.contains(weight)) {
      bind_quantized(l, w.arrays(), weight, formats[weight.c_str()], out, in, w.kept());
    } else {
      std::tie(l.weight, l.dtype) = w.get_matrix(weight, {out, in});
    }
    l.bias = w.get(name + ".bias", {out}, false);
    return l;
  };
  ModelWeights m;
  m.embed = linear("embed", V, H);
  if (!m.embed.segments.empty()) throw py::value_error("embed.weight must be stored in one format (rows are looked up)");
  if (c.position == PositionKind::kLearned) m.pos_embed = w.get("pos_embed.weight", {c.max_positions, H});
  if (c.type_vocab_size > 0) m.type_embed = w.get("token_type_embed.weight", {c.type_vocab_size, H});
  m.embed_norm = Norm{w.get("embed_norm.weight", {H}, false), w.get("embed_norm.bias", {H}, false)};
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LayerWeights L;
    L.attn_norm = norm(p + "attn_norm");
    L.qkv = linear(p + "attn.qkv", c.qkv_dim(), H);
    L.attn_out = linear(p + "attn.out", H, c.q_dim());
    L.ffn_norm = norm(p + "ffn_norm");
    L.ffn_up = linear(p + (c.gated_ffn ? "ffn.gate_up" : "ffn.up"), c.ffn_width(), H);
    L.ffn_down = linear(p + "ffn.down", H, I);
    m.layers.push_back(L);
  }
  if (!c.post_norm) m.final_norm = norm("final_norm");
  if (c.has_lm_head) {
    if (c.tied_embeddings) {
      m.lm_head = m.embed;
      m.lm_head.bias = w.get("lm_head.bias", {V}, false);
    } else {
      m.lm_head = linear("lm_head", V, H);
    }
  }
  return m;
}

class PyModel {
 public:
  PyModel(py::dict config, py::dict weights)
      : store_(weights, config_value<std::string>(config, "dtype", std::string("float32"))),
        config_(parse_config(config)),
        model_(config_, bind_weights(config_, store_, config_value<py::dict>(config, "tensor_formats", py::dict()))) {}

  const Transformer& model() const { return model_; }
  const ModelConfig& config() const { return config_; }

  // Runs complete sequences through an encoder: hidden states of all tokens, packed [rows, H],
  // sequence i at rows offsets[i] .. offsets[i + 1].
  py::tuple encode(py::sequence batch, py::object type_ids) {
    std::vector<std::vector<int32_t>> ids, types;
    std::vector<long> offsets{0};
    for (py::handle item : batch) {
      ids.push_back(tokens(item));
      const size_t len = ids.back().size();
      if (len == 0) throw py::value_error("sequence " + std::to_string(ids.size() - 1) + " is empty");
      if ((long)len > config_.max_sequence()) {
        throw py::value_error("sequence " + std::to_string(ids.size() - 1) + " has " + std::to_string(len) +
                              " tokens, more than the model's " + std::to_string(config_.max_sequence()) +
                              " positions");
      }
      offsets.push_back(offsets.back() + (long)len);
    }
    if (!type_ids.is_none()) {
      py::sequence type_seq = type_ids.cast<py::sequence>();
      if ((size_t)py::len(type_seq) != ids.size()) throw py::value_error("one type_ids row per sequence");
      for (size_t i = 0; i < ids.size(); ++i) {
        auto t = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(type_seq[i]);
        if (!t || (size_t)t.size() != ids[i].size()) throw py::value_error("type_ids must match the token ids in length");
        std::vector<int32_t> row(t.size());
        for (ssize_t j = 0; j < t.size(); ++j) {
          if (t.data()[j] < 0 || t.data()[j] >= std::max(1, config_.type_vocab_size)) {
            throw py::value_error("token type id " + std::to_string(t.data()[j]) + " is out of range");
          }
          row[j] = (int32_t)t.data()[j];
        }
        types.push_back(std::move(row));
      }
    }
    std::vector<SeqBatch> seqs;
    for (size_t i = 0; i < ids.size(); ++i) {
      seqs.push_back({nullptr, ids[i].data(), (int)ids[i].size(), true, types.empty() ? nullptr : types[i].data()});
    }
    py::array_t<float> hidden({offsets.back(), (long)config_.hidden_size});
    float* out = hidden.mutable_data();
    {
      CoreCall call;
      std::lock_guard<std::mutex> lock(workspace_mutex_);
      model_.encode(seqs.data(), (int)seqs.size(), workspace_, out);
    }
    return py::make_tuple(hidden, py::cast(offsets));
  }

  // Token ids from Python, checked against the vocabulary.
  std::vector<int32_t> tokens(py::handle ids) const {
    py::array arr = py::array::ensure(ids);
    if (!arr) throw py::type_error("token ids must be a sequence of ints");
    if (arr.ndim() != 1) throw py::value_error("token ids must be one-dimensional");
    if (arr.size() > 0 && arr.dtype().kind() != 'i' && arr.dtype().kind() != 'u') {
      throw py::type_error("token ids must be integers, got dtype " + std::string(py::str(arr.dtype())));
    }
    auto as_i64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    std::vector<int32_t> out(as_i64.size());
    for (ssize_t i = 0; i < as_i64.size(); ++i) {
      const int64_t t = as_i64.data()[i];
      if (t < 0 || t >= config_.vocab_size) {
        throw py::value_error("token id " + std::to_string(t) + " at index " + std::to_string(i) +
                              " is outside the vocabulary [0, " + std::to_string(config_.vocab_size) + ")");
      }
      out[i] = (int32_t)t;
    }
    return out;
  }

 private:
  WeightStore store_;
  ModelConfig config_;
  Transformer model_;
  std::mutex workspace_mutex_;
  Workspace workspace_;
};

// One sequence fed incrementally: the KV cache persists between feeds.
class PySession {
 public:
  PySession(std::shared_ptr<PyModel> model, int context_length) : model_(std::move(model)) {
    const ModelConfig& c = model_->config();
    if (context_length <= 0) throw py::value_error("context_length must be positive");
    if (!c.has_lm_head) throw py::value_error("sessions need a decoder model");
    if (context_length > c.max_sequence()) {
      throw py::value_error("context_length " + std::to_string(context_length) + " exceeds the model's " +
                            std::to_string(c.max_sequence()) + " positions");
    }
    cache_ = std::make_unique<KVCache>(c.num_layers, c.num_kv_heads, c.head_dim, context_length);
  }

  // Feeds from two threads at once run one after the other (the mutex covers the length check
  // and the forward pass, so neither can write past the cache).
  py::array_t<float> feed(py::handle ids, bool all_logits) {
    std::vector<int32_t> tokens = model_->tokens(ids);
    if (tokens.empty()) throw py::value_error("feed() needs at least one token");
    SeqBatch batch{cache_.get(), tokens.data(), (int)tokens.size(), all_logits};
    const long rows = Transformer::logit_rows(&batch, 1);
    py::array_t<float> logits({rows, (long)model_->config().vocab_size});
    float* out = logits.mutable_data();
    {
      CoreCall call;
      std::lock_guard<std::mutex> lock(mutex_);
      if (cache_->length() + (long)tokens.size() > cache_->capacity()) {
        throw py::value_error("sequence of " + std::to_string(cache_->length() + tokens.size()) +
                              " tokens exceeds the context length " + std::to_string(cache_->capacity()));
      }
      model_->model().forward(&batch, 1, workspace_, out);
    }
    return logits;
  }

  int position() {
    CoreCall call;  // waits for a feed in another thread without holding the GIL
    std::lock_guard<std::mutex> lock(mutex_);
    return cache_->length();
  }
  int capacity() const { return cache_->capacity(); }
  void reset() {
    CoreCall call;
    std::lock_guard<std::mutex> lock(mutex_);
    cache_->set_length(0);
  }

 private:
  std::shared_ptr<PyModel> model_;
  std::unique_ptr<KVCache> cache_;
  std::mutex mutex_;
  Workspace workspace_;
};

// The serving engine over one decoder: requests in, token events out. Arguments arrive checked by
// pyxf/engine.py; the engine itself rejects what would be unsafe (token ids, lengths).
class PyEngine {
 public:
  PyEngine(std::shared_ptr<PyModel> model, int max_batch, double kv_cache_mb, int prefill_chunk, int max_queue,
           int context_length, bool prefix_cache, std::shared_ptr<PyModel> draft)
      : model_(std::move(model)),
        draft_(std::move(draft)),
        engine_(model_->model(), draft_ ? &draft_->model() : nullptr,
                EngineOptions{max_batch, (size_t)(kv_cache_mb * (1 << 20)), prefill_chunk, max_queue, context_length,
                              prefix_cache}) {}

  int64_t submit(py::handle prompt, int max_new_tokens, float temperature, int top_k, float top_p,
                 float repetition_penalty, float presence_penalty, float frequency_penalty,
                 std::vector<std::pair<int, float>> logit_bias, uint64_t seed, std::vector<int> stop_ids,
                 int top_logprobs, py::object first_mask, int draft_tokens, bool draft_model) {
    Request r;
    r.draft_tokens = draft_tokens;
    r.draft_model = draft_model;
    if (!first_mask.is_none()) {
      r.constrained = true;
      r.first_mask = mask_words(first_mask.cast<py::bytes>());
    }
    r.prompt = model_->tokens(prompt);
    r.max_new_tokens = max_new_tokens;
    r.sampling = {temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty,
                  std::move(logit_bias)};
    r.seed = seed;
    r.stop_ids = std::move(stop_ids);
    r.top_logprobs = top_logprobs;
    return engine_.submit(std::move(r));
  }

  // [(request, token, logprob, top, finish, prompt_tokens, cached_tokens, error), ...]
  py::list poll(int timeout_ms) {
    std::vector<TokenEvent> events;
    {
      py::gil_scoped_release release;
      events = engine_.poll(timeout_ms);
    }
    py::list out;
    for (const TokenEvent& e : events) {
      out.append(py::make_tuple(e.request, e.token, e.logprob, py::cast(e.top), (int)e.finish, e.prompt_tokens,
                                e.cached_tokens, e.error));
    }
    return out;
  }

  py::dict stats() const {
    const EngineStats s = engine_.stats();
    return py::dict("running"_a = s.running, "waiting"_a = s.waiting, "kv_blocks_total"_a = s.pages_total,
                    "kv_blocks_used"_a = s.pages_used, "kv_blocks_cached"_a = s.pages_cached,
                    "kv_block_tokens"_a = s.page_tokens, "prefix_cache_queried_tokens"_a = s.prefix_queried_tokens,
                    "prefix_cache_hit_tokens"_a = s.prefix_hit_tokens, "prompt_tokens_total"_a = s.prompt_tokens,
                    "generated_tokens_total"_a = s.generated_tokens, "requests_finished_total"_a = s.finished,
                    "steps_total"_a = s.steps, "draft_tokens_proposed_total"_a = s.draft_proposed,
                    "draft_tokens_accepted_total"_a = s.draft_accepted);
  }

  Engine& engine() { return engine_; }

  // A token bitmask from Python bytes: little-endian 32-bit words (llguidance's layout).
  static std::vector<uint32_t> mask_words(const py::bytes& b) {
    const std::string_view bytes = b;
    std::vector<uint32_t> words(bytes.size() / 4);
    std::memcpy(words.data(), bytes.data(), words.size() * 4);
    return words;
  }

 private:
  std::shared_ptr<PyModel> model_;
  std::shared_ptr<PyModel> draft_;  // or null
  Engine engine_;
};

void bind_engine(py::module_& m) {
  py::register_exception<QueueFull>(m, "QueueFull", PyExc_RuntimeError);
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<std::shared_ptr<PyModel>, int, double, int, int, int, bool, std::shared_ptr<PyModel>>(), "model"_a,
           "max_batch"_a, "kv_cache_mb"_a, "prefill_chunk"_a, "max_queue"_a, "context_length"_a, "prefix_cache"_a,
           "draft"_a = nullptr)
      .def("submit", &PyEngine::submit, "prompt"_a, "max_new_tokens"_a, "temperature"_a, "top_k"_a, "top_p"_a,
           "repetition_penalty"_a, "presence_penalty"_a, "frequency_penalty"_a, "logit_bias"_a, "seed"_a,
           "stop_ids"_a, "top_logprobs"_a, "first_mask"_a = py::none(), "draft_tokens"_a = 0,
           "draft_model"_a = false)
      .def("cancel", [](PyEngine& e, int64_t id) { e.engine().cancel(id); }, "request"_a)
      .def("set_mask", [](PyEngine& e, int64_t id, int index, const py::bytes& mask) {
        e.engine().set_mask(id, index, PyEngine::mask_words(mask));
      }, "request"_a, "index"_a, "mask"_a)
      .def("poll", &PyEngine::poll, "timeout_ms"_a)
      .def_property_readonly("drained", [](PyEngine& e) { return e.engine().drained(); })
      .def("close", [](PyEngine& e, bool cancel) { e.engine().close(cancel); }, "cancel_running"_a = false)
      .def("stats", &PyEngine::stats)
      .def_property_readonly("context_length", [](PyEngine& e) { return e.engine().options().context_length; })
      .def_static("page_bytes", [](const PyModel& m) {
        const ModelConfig& c = m.config();
        return KVPool::page_bytes(c.num_layers, c.num_kv_heads, c.head_dim);
      }, "model"_a, "Bytes of one KV page (kv_page_tokens positions of every layer) of this model.");
  m.attr("kv_page_tokens") = kPageTokens;
}

py::dict info() {
  const char* names[8];
  const int n = kernels::available_isas(names, 8);
  py::list isas;
  for (int i = 0; i < n; ++i) isas.append(names[i]);
  return py::dict("version"_a = PYXF_VERSION, "isa"_a = kernels::active().name, "isas"_a = isas,
                  "quant_gemv"_a = kernels::quant_gemv_name(), "num_threads"_a = num_threads(),
                  "compiler"_a = PYXF_COMPILER,
                  "build_flags"_a = PYXF_BUILD_FLAGS, "sanitize"_a = PYXF_SANITIZE);
}


// Kernels on numpy arrays, for tests: each runs on the active ISA table.
void bind_ops(py::module_& ops) {
  auto check_2d = [](const FloatArray& a, const char* name) {
    if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D");
  };
  // w: float32, float16, or uint16 holding bfloat16 bits.
  // The weight type of a float weight matrix for x [M, K] (checked: 2-D, C-contiguous, K columns).
  auto float_weight = [=](const FloatArray& x, const py::array& w) {
    check_2d(x, "x");
    if (w.ndim() != 2) throw py::value_error("w must be 2-D");
    if (x.shape(1) != w.shape(1)) throw py::value_error("x and w disagree on the inner dimension");
    if (!(w.flags() & py::array::c_style)) throw py::value_error("w must be C-contiguous");
    if (w.dtype().is(py::dtype::of<float>())) return kernels::WeightType::kF32;
    if (w.dtype().kind() == 'f' && w.itemsize() == 2) return kernels::WeightType::kF16;
    if (w.dtype().is(py::dtype::of<uint16_t>())) return kernels::WeightType::kBF16;
    throw py::type_error("w must be float32, float16 or uint16 (bfloat16 bits)");
  };
  // w = [gate; up] (2 I rows): act(x gate^T) * (x up^T).
  ops.def("linear_gated", [=](FloatArray x, py::array w, const std::string& activation) {
    const kernels::WeightType wt = float_weight(x, w);
    const kernels::Activation act = parse_activation(activation);
    if (w.shape(0) % 2) throw py::value_error("a gated weight has an even number of rows (gate, then up)");
    py::array_t<float> y({x.shape(0), w.shape(0) / 2});
    kernels::active().linear_gated(x.data(), x.shape(0), x.shape(1), w.data(), wt, w.shape(0) / 2, act,
                                   y.mutable_data());
    return y;
  }, "x"_a, "w"_a, "activation"_a = "silu");
  ops.def("linear", [=](FloatArray x, py::array w, py::object bias) {
    const kernels::WeightType wt = float_weight(x, w);
    FloatArray b;
    if (!bias.is_none()) {
      b = bias.cast<FloatArray>();
      if (b.ndim() != 1 || b.shape(0) != w.shape(0)) throw py::value_error("bias must be [N]");
    }
    py::array_t<float> y({x.shape(0), w.shape(0)});
    kernels::active().linear(x.data(), x.shape(0), x.shape(1), w.data(), wt, w.shape(0),
                             bias.is_none() ? nullptr : b.data(), y.mutable_data(), false);
    return y;
  }, "x"_a, "w"_a, "bias"_a = py::none());
  // w: [N, row bytes] uint8 blocks (or int8 [N, K] with row_scales for "int8").
  ops.def("linear_quant", [=](FloatArray x, py::array w, const std::string& format, py::object row_scales,
                              py::object bias) {
    check_2d(x, "x");
    const kernels::QuantFormat f = parse_quant_format(format);
    const long K = x.shape(1);
    py::dict arrays;
    arrays["w"] = w;
    if (!row_scales.is_none()) arrays["w_scale"] = row_scales.cast<FloatArray>();
    std::vector<py::array> keep;
    const kernels::QuantWeight q = quant_view(arrays, "w", f, w.ndim() == 2 ? w.shape(0) : -1, K, keep);
    FloatArray b;
    if (!bias.is_none()) {
      b = bias.cast<FloatArray>();
      if (b.ndim() != 1 || b.shape(0) != q.rows) throw py::value_error("bias must be [N]");
    }
    py::array_t<float> y({x.shape(0), (ssize_t)q.rows});
    kernels::active().linear_quant(x.data(), x.shape(0), q, bias.is_none() ? nullptr : b.data(),
                                   y.mutable_data(), false);
    return y;
  }, "x"_a, "w"_a, "format"_a, "row_scales"_a = py::none(), "bias"_a = py::none());
  // w = [gate; up] (2 I rows): act(x gate^T) * (x up^T), fused where the ISA has the kernel.
  ops.def("linear_quant_gated", [=](FloatArray x, py::array w, const std::string& format, py::object row_scales,
                                    const std::string& activation) {
    check_2d(x, "x");
    const kernels::QuantFormat f = parse_quant_format(format);
    const kernels::Activation act = parse_activation(activation);
    py::dict arrays;
    arrays["w"] = w;
    if (!row_scales.is_none()) arrays["w_scale"] = row_scales.cast<FloatArray>();
    std::vector<py::array> keep;
    const kernels::QuantWeight q = quant_view(arrays, "w", f, w.ndim() == 2 ? w.shape(0) : -1, x.shape(1), keep);
    if (q.rows % 2) throw py::value_error("a gated weight has an even number of rows (gate, then up)");
    const long M = x.shape(0), I = q.rows / 2;
    py::array_t<float> y({M, I});
    const kernels::KernelTable& K = kernels::active();
    if (K.linear_quant_gated && M >= kernels::kQuantGemmRows) {
      K.linear_quant_gated(x.data(), M, q, act, y.mutable_data());
    } else {
      std::vector<float> gu((size_t)M * q.rows);
      K.linear_quant(x.data(), M, q, nullptr, gu.data(), false);
      K.gated_activation(gu.data(), M, I, act, y.mutable_data());
    }
    return y;
  }, "x"_a, "w"_a, "format"_a, "row_scales"_a = py::none(), "activation"_a = "silu");
  ops.def("dequantize", [=](py::array w, const std::string& format, long cols, py::object row_scales) {
    const kernels::QuantFormat f = parse_quant_format(format);
    py::dict arrays;
    arrays["w"] = w;
    if (!row_scales.is_none()) arrays["w_scale"] = row_scales.cast<FloatArray>();
    std::vector<py::array> keep;
    const kernels::QuantWeight q = quant_view(arrays, "w", f, w.ndim() == 2 ? w.shape(0) : -1, cols, keep);
    py::array_t<float> y({(ssize_t)q.rows, (ssize_t)cols});
    for (long r = 0; r < q.rows; ++r) kernels::active().dequantize_row(q, r, y.mutable_data() + r * cols);
    return y;
  }, "w"_a, "format"_a, "cols"_a, "row_scales"_a = py::none());
  ops.def("rmsnorm", [=](FloatArray x, FloatArray w, float eps) {
    check_2d(x, "x");
    if (w.size() != x.shape(1)) throw py::value_error("w must match the row width");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    kernels::active().rmsnorm(x.data(), w.data(), eps, x.shape(0), x.shape(1), y.mutable_data());
    return y;
  });
  ops.def("layernorm", [=](FloatArray x, FloatArray w, FloatArray b, float eps) {
    check_2d(x, "x");
    if (w.size() != x.shape(1) || b.size() != x.shape(1)) throw py::value_error("w, b must match the row width");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    kernels::active().layernorm(x.data(), w.data(), b.data(), eps, x.shape(0), x.shape(1), y.mutable_data());
    return y;
  });
  ops.def("softmax", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    kernels::active().softmax(y.mutable_data(), x.shape(0), x.shape(1));
    return y;
  });
  ops.def("log_softmax", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    for (long r = 0; r < x.shape(0); ++r) kernels::active().log_softmax(y.mutable_data() + r * x.shape(1), x.shape(1));
    return y;
  });
  ops.def("logsumexp", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<float> y(x.shape(0));
    for (long r = 0; r < x.shape(0); ++r) {
      y.mutable_data()[r] = kernels::active().logsumexp(x.data() + r * x.shape(1), x.shape(1));
    }
    return y;
  });
  ops.def("activation", [](FloatArray x, const std::string& kind) {
    py::array_t<float> y(std::vector<ssize_t>(x.shape(), x.shape() + x.ndim()));
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    kernels::active().activation(y.mutable_data(), x.size(), parse_activation(kind));
    return y;
  });
  ops.def("gated_activation", [=](FloatArray gu, const std::string& kind) {
    check_2d(gu, "gate_up");
    if (gu.shape(1) % 2) throw py::value_error("gate_up rows must have an even width");
    const long n = gu.shape(1) / 2;
    py::array_t<float> y({(long)gu.shape(0), n});
    kernels::active().gated_activation(gu.data(), gu.shape(0), n, parse_activation(kind), y.mutable_data());
    return y;
  });
  ops.def("rope", [=](FloatArray x, py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos,
                      FloatArray inv_freq, int head_dim, bool interleaved, float scaling) {
    check_2d(x, "x");
    if (pos.size() != x.shape(0)) throw py::value_error("one position per row");
    if (head_dim <= 0 || x.shape(1) % head_dim) throw py::value_error("row width must be a multiple of head_dim");
    if (inv_freq.size() == 0 || 2 * inv_freq.size() > head_dim || inv_freq.size() > 512) {
      throw py::value_error("inv_freq must have between 1 and head_dim/2 entries");
    }
    py::array_t<float> y({x.shape(0), x.shape(1)});
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    const int half = (int)inv_freq.size();
    std::vector<float> table((size_t)x.shape(0) * 2 * half);
    kernels::active().rope_table(pos.data(), x.shape(0), inv_freq.data(), half, scaling, table.data());
    kernels::active().rope(y.mutable_data(), x.shape(0), x.shape(1), (int)(x.shape(1) / head_dim), head_dim,
                           2 * half, table.data(), interleaved);
    return y;
  }, "x"_a, "pos"_a, "inv_freq"_a, "head_dim"_a, "interleaved"_a = false, "scaling"_a = 1.0f);
  // q: [n_new, n_heads * head_dim]; k, v: [n_keys, n_kv_heads * head_dim] (token-major, as torch).
  ops.def("attention", [=](FloatArray q, FloatArray k, FloatArray v, int n_heads, int n_kv_heads,
                           bool causal, float scale, py::object pos_bias) {
    check_2d(q, "q");
    check_2d(k, "k");
    check_2d(v, "v");
    if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads) throw py::value_error("bad head counts");
    if (q.shape(1) % n_heads) throw py::value_error("q width must be a multiple of n_heads");
    const int D = (int)(q.shape(1) / n_heads);
    const long n_new = q.shape(0), n_keys = k.shape(0);
    if (k.shape(1) != (long)n_kv_heads * D || v.shape(1) != k.shape(1) || v.shape(0) != n_keys) {
      throw py::value_error("k and v must be [n_keys, n_kv_heads * head_dim]");
    }
    if (n_keys < n_new) throw py::value_error("need at least as many keys as queries");
    // Rearrange to the cache layout [kv_head][position][head_dim].
    std::vector<float> kc(k.size()), vc(v.size());
    for (long t = 0; t < n_keys; ++t)
      for (int g = 0; g < n_kv_heads; ++g)
        for (int d = 0; d < D; ++d) {
          kc[((long)g * n_keys + t) * D + d] = k.data()[t * n_kv_heads * D + g * D + d];
          vc[((long)g * n_keys + t) * D + d] = v.data()[t * n_kv_heads * D + g * D + d];
        }
    py::array_t<float> out({n_new, (long)q.shape(1)});
    kernels::AttentionSeq seq{q.data(), out.mutable_data(), kc.data(), vc.data(), n_keys * D, D,
                              (int)n_new, (int)(n_keys - n_new), (int)n_keys};
    kernels::AttentionShape shape{n_heads, n_kv_heads, D, q.shape(1), q.shape(1), scale, causal};
    FloatArray bias;  // [n_heads, 2 R + 1]: bias by relative position key - query, clamped to [-R, R]
    if (!pos_bias.is_none()) {
      bias = pos_bias.cast<FloatArray>();
      if (bias.ndim() != 2 || bias.shape(0) != n_heads || bias.shape(1) % 2 != 1) {
        throw py::value_error("pos_bias must be [n_heads, 2 R + 1]");
      }
      shape.pos_bias = bias.data();
      shape.pos_bias_radius = (int)(bias.shape(1) / 2);
    }
    kernels::active().attention(&seq, 1, shape);
    return out;
  }, "q"_a, "k"_a, "v"_a, "n_heads"_a, "n_kv_heads"_a, "causal"_a = true, "scale"_a, "pos_bias"_a = py::none());
}

// ---------------------------------------------------------------------------------------------
// Encoder-decoder models (model/seq2seq.h, runtime/beam_search.h)

// The tensors of `weights` whose names start with `prefix`, without it (or, with `exclude`, the
// others); `extra` names are added from the full dict when the subset lacks them.
py::dict tensor_subset(const py::dict& weights, const std::string& prefix, bool exclude) {
  py::dict out;
  for (auto item : weights) {
    const std::string name = item.first.cast<std::string>();
    const bool has = name.compare(0, prefix.size(), prefix) == 0;
    if (exclude && !has) out[name.c_str()] = item.second;
    if (!exclude && has) out[name.substr(prefix.size()).c_str()] = item.second;
  }
  return out;
}

std::vector<int32_t> checked_tokens(py::handle ids, int vocab_size, const std::string& what) {
  py::array arr = py::array::ensure(ids);
  if (!arr) throw py::type_error(what + " must be a sequence of ints");
  if (arr.ndim() != 1) throw py::value_error(what + " must be one-dimensional");
  if (arr.size() > 0 && arr.dtype().kind() != 'i' && arr.dtype().kind() != 'u') {
    throw py::type_error(what + " must hold integer token ids, got dtype " + std::string(py::str(arr.dtype())));
  }
  auto as_i64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  std::vector<int32_t> out(as_i64.size());
  for (ssize_t i = 0; i < as_i64.size(); ++i) {
    const int64_t t = as_i64.data()[i];
    if (t < 0 || t >= vocab_size) {
      throw py::value_error("token id " + std::to_string(t) + " in " + what + " is outside the vocabulary [0, " +
                            std::to_string(vocab_size) + ")");
    }
    out[i] = (int32_t)t;
  }
  return out;
}

// config.json of an encoder-decoder model (docs/DESIGN.md) -> the configs of its two stacks.
// Sinusoidal positions arrive as tables ("pos_embed.weight", "encoder.pos_embed.weight") made in
// Python, so the stacks see learned positions; T5's relative positions arrive as per-head bias
// tables by relative distance ("rel_pos_table", "encoder.rel_pos_table", [heads, 2 R + 1]).
std::pair<ModelConfig, ModelConfig> parse_seq2seq_config(const py::dict& cfg) {
  py::dict enc = cfg.attr("copy")(), dec = cfg.attr("copy")();
  const std::string position = config_value<std::string>(cfg, "position");
  std::string core_position;
  if (position == "sinusoidal" || position == "learned") core_position = "learned";
  else if (position == "relative" || position == "none") core_position = "none";
  else throw py::value_error("unknown position scheme '" + position + "' for an encoder-decoder model");
  for (py::dict* d : {&enc, &dec}) (*d)["position"] = core_position;
  enc["architecture"] = "encoder";
  enc["causal"] = false;
  enc["num_layers"] = config_value<int>(cfg, "num_encoder_layers");
  enc["vocab_size"] = config_value<int>(cfg, "source_vocab_size", config_value<int>(cfg, "vocab_size"));
  dec["architecture"] = "decoder";
  dec["causal"] = true;
  ModelConfig e = parse_config(enc), d = parse_config(dec);
  const float embed_scale = config_value<float>(cfg, "embed_scale", 1.0f);
  const float attn_scale = config_value<float>(cfg, "attention_scale", 0.0f);
  const int radius = position == "relative" ? config_value<int>(cfg, "rel_pos_radius") : 0;
  if (!(embed_scale > 0) || attn_scale < 0 || radius < 0) {
    throw py::value_error("embed_scale must be positive, attention_scale and rel_pos_radius non-negative");
  }
  for (ModelConfig* c : {&e, &d}) {
    c->embed_scale = embed_scale;
    c->attn_scale = attn_scale;
    c->rel_pos_radius = radius;
  }
  d.head_scale = config_value<float>(cfg, "head_scale", 1.0f);
  return {e, d};
}

// One stack's weights: the decoder-only table plus what encoder-decoder stacks may add (a final
// norm after post-norm blocks, the relative position bias table).
ModelWeights bind_stack(const ModelConfig& c, WeightStore& w, py::dict formats) {
  ModelWeights m = bind_weights(c, w, formats);
  const long H = c.hidden_size;
  if (c.post_norm) {
    m.final_norm = Norm{w.get("final_norm.weight", {H}, false), w.get("final_norm.bias", {H}, false)};
    if (c.norm == NormKind::kLayer && m.final_norm.weight && !m.final_norm.bias) {
      throw py::key_error("missing tensor 'final_norm.bias'");
    }
  }
  if (c.rel_pos_radius > 0) m.rel_pos_bias = w.get("rel_pos_table", {c.num_heads, 2L * c.rel_pos_radius + 1});
  return m;
}

class PySeq2SeqModel {
 public:
  PySeq2SeqModel(py::dict config, py::dict weights) {
    const std::string dtype = config_value<std::string>(config, "dtype", std::string("float32"));
    py::dict formats = config_value<py::dict>(config, "tensor_formats", py::dict());
    py::dict enc_arrays = tensor_subset(weights, "encoder.", false);
    if (!enc_arrays.contains("embed.weight") && weights.contains("embed.weight")) {
      enc_arrays["embed.weight"] = weights["embed.weight"];  // shared source/target embeddings
    }
    py::dict enc_formats = tensor_subset(formats, "encoder.", false);
    if (!enc_formats.contains("embed.weight") && formats.contains("embed.weight")) {
      enc_formats["embed.weight"] = formats["embed.weight"];
    }
    enc_store_ = std::make_unique<WeightStore>(enc_arrays, dtype);
    dec_store_ = std::make_unique<WeightStore>(tensor_subset(weights, "encoder.", true), dtype);
    auto [ec, dc] = parse_seq2seq_config(config);
    ModelWeights ew = bind_stack(ec, *enc_store_, enc_formats);
    ModelWeights dw = bind_stack(dc, *dec_store_, tensor_subset(formats, "encoder.", true));
    std::vector<CrossAttentionWeights> cross;
    const long H = dc.hidden_size;
    const bool layer_norm = dc.norm == NormKind::kLayer;
    py::dict dec_formats = tensor_subset(formats, "encoder.", true);
    auto linear = [&](const std::string& name, long out, long in) {
      Linear l;
      const std::string weight = name + ".weight";
      if (dec_formats.contains(weight)) {
        bind_quantized(l, dec_store_->arrays(), weight, dec_formats[weight.c_str()], out, in, dec_store_->kept());
      } else {
        std::tie(l.weight, l.dtype) = dec_store_->get_matrix(weight, {out, in});
      }
      l.bias = dec_store_->get(name + ".bias", {out}, false);
      return l;
    };
    for (int i = 0; i < dc.num_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      CrossAttentionWeights x;
      x.norm = Norm{dec_store_->get(p + "cross_norm.weight", {H}), dec_store_->get(p + "cross_norm.bias", {H}, layer_norm)};
      x.q = linear(p + "cross_attn.q", dc.q_dim(), H);
      x.kv = linear(p + "cross_attn.kv", 2L * dc.kv_dim(), H);
      x.out = linear(p + "cross_attn.out", H, dc.q_dim());
      cross.push_back(x);
    }
    model_ = std::make_unique<Seq2SeqModel>(Transformer(ec, ew), Transformer(dc, dw), std::move(cross));
  }

  const ModelConfig& encoder_config() const { return model_->encoder().config(); }
  const ModelConfig& decoder_config() const { return model_->decoder().config(); }

  std::vector<int32_t> source(py::handle ids, const std::string& what) const {
    std::vector<int32_t> out = checked_tokens(ids, encoder_config().vocab_size, what);
    if (out.empty()) throw py::value_error(what + " is empty");
    if ((long)out.size() > encoder_config().max_sequence()) {
      throw py::value_error(what + " has " + std::to_string(out.size()) + " tokens, more than the model's " +
                            std::to_string(encoder_config().max_sequence()) + " source positions");
    }
    return out;
  }

  // Logits of every decoder position for one source: [len(decoder_ids), target vocab].
  py::array_t<float> logits(py::handle source_ids, py::handle decoder_ids) {
    std::vector<std::vector<int32_t>> sources{source(source_ids, "the source")};
    std::vector<int32_t> target = checked_tokens(decoder_ids, decoder_config().vocab_size, "decoder_ids");
    if (target.empty()) throw py::value_error("decoder_ids is empty");
    if ((long)target.size() > decoder_config().max_sequence()) {
      throw py::value_error("decoder_ids has " + std::to_string(target.size()) + " tokens, more than the model's " +
                            std::to_string(decoder_config().max_sequence()) + " target positions");
    }
    const ModelConfig& c = decoder_config();
    py::array_t<float> out({(long)target.size(), (long)c.vocab_size});
    float* data = out.mutable_data();
    {
      CoreCall call;
      Workspace ws;
      EncodedSources enc;
      model_->encode(sources, ws, enc);
      KVCache cache(c.num_layers, c.num_kv_heads, c.head_dim, (int)target.size());
      DecoderSeq seq{&cache, target.data(), (int)target.size(), 0, true};
      model_->decode(&seq, 1, enc, ws, data);
    }
    return out;
  }

  // Hypotheses per source: [[(tokens, score), ...], ...], best first.
  py::list generate(py::sequence sources, int beam_size, int num_hypotheses, float length_penalty,
                    int early_stopping, int no_repeat_ngram_size, int max_length, int min_length, float temperature,
                    int top_k, float top_p, float repetition_penalty, uint64_t seed, std::vector<int> eos_ids,
                    std::vector<int> suppress_ids, int forced_eos_id, bool renormalize, int decoder_start_id) {
    const ModelConfig& c = decoder_config();
    if (beam_size < 1) throw py::value_error("beam_size must be >= 1");
    if (num_hypotheses < 1 || num_hypotheses > beam_size) throw py::value_error("num_hypotheses must be in [1, beam_size]");
    if (max_length < 1) throw py::value_error("max_length must be positive");
    if (max_length > c.max_sequence()) {
      throw py::value_error("max_length " + std::to_string(max_length) + " exceeds the model's " +
                            std::to_string(c.max_sequence()) + " target positions");
    }
    if (min_length < 0 || no_repeat_ngram_size < 0) throw py::value_error("min_length and no_repeat_ngram_size must be >= 0");
    if (early_stopping < 0 || early_stopping > 2) throw py::value_error("early_stopping must be 0, 1 or 2");
    if (temperature < 0) throw py::value_error("temperature must be >= 0");
    if (top_k < 0) throw py::value_error("top_k must be >= 0");
    if (!(top_p > 0 && top_p <= 1)) throw py::value_error("top_p must be in (0, 1]");
    if (!(repetition_penalty > 0)) throw py::value_error("repetition_penalty must be > 0");
    if (beam_size > 1 && temperature > 0) throw py::value_error("beam search does not sample: use temperature 0");
    auto check_id = [&](int id, const char* what) {
      if (id < 0 || id >= c.vocab_size) {
        throw py::value_error(std::string(what) + " " + std::to_string(id) + " is outside the target vocabulary");
      }
    };
    for (int id : eos_ids) check_id(id, "end token");
    for (int id : suppress_ids) check_id(id, "suppressed token");
    if (forced_eos_id >= 0) check_id(forced_eos_id, "forced end token");
    check_id(decoder_start_id, "decoder start token");

    std::vector<std::vector<int32_t>> ids;
    for (py::handle s : sources) ids.push_back(source(s, "source " + std::to_string(ids.size())));
    Seq2SeqOptions o;
    o.beam_size = beam_size;
    o.num_hypotheses = num_hypotheses;
    o.length_penalty = length_penalty;
    o.early_stopping = (EarlyStopping)early_stopping;
    o.no_repeat_ngram_size = no_repeat_ngram_size;
    o.max_length = max_length;
    o.min_length = min_length;
    o.sampling = {temperature, top_k, top_p, repetition_penalty};
    o.seed = seed;
    o.eos_ids = std::move(eos_ids);
    o.suppress_ids = std::move(suppress_ids);
    o.forced_eos_id = forced_eos_id;
    o.renormalize = renormalize;
    o.decoder_start_id = decoder_start_id;

    // Each step briefly takes the GIL to notice Ctrl-C.
    InterruptCheck interrupted = [] {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      return false;
    };
    std::vector<std::vector<Hypothesis>> out;
    {
      CoreCall call;
      out = seq2seq_generate(*model_, ids, o, interrupted);
    }
    py::list result;
    for (auto& hyps : out) {
      py::list per_source;
      for (auto& h : hyps) per_source.append(py::make_tuple(py::cast(h.tokens), h.score));
      result.append(per_source);
    }
    return result;
  }

 private:
  std::unique_ptr<WeightStore> enc_store_, dec_store_;
  std::unique_ptr<Seq2SeqModel> model_;
};

void bind_seq2seq(py::module_& m) {
  py::class_<PySeq2SeqModel, std::shared_ptr<PySeq2SeqModel>>(m, "Seq2SeqModel")
      .def(py::init<py::dict, py::dict>(), "config"_a, "weights"_a)
      .def("logits", &PySeq2SeqModel::logits, "source_ids"_a, "decoder_ids"_a)
      .def("generate", &PySeq2SeqModel::generate, "sources"_a, "beam_size"_a = 1, "num_hypotheses"_a = 1,
           "length_penalty"_a = 1.0f, "early_stopping"_a = 0, "no_repeat_ngram_size"_a = 0, "max_length"_a = 256,
           "min_length"_a = 0, "temperature"_a = 0.0f, "top_k"_a = 0, "top_p"_a = 1.0f,
           "repetition_penalty"_a = 1.0f, "seed"_a = 0, "eos_ids"_a = std::vector<int>(),
           "suppress_ids"_a = std::vector<int>(), "forced_eos_id"_a = -1, "renormalize"_a = false,
           "decoder_start_id"_a = 0)
      .def_property_readonly("vocab_size", [](const PySeq2SeqModel& m) { return m.decoder_config().vocab_size; })
      .def_property_readonly("source_vocab_size", [](const PySeq2SeqModel& m) { return m.encoder_config().vocab_size; });
}

}  // namespace
}  // namespace pyxf

PYBIND11_MODULE(_core, m) {
  using namespace pyxf;
  m.doc() = "pyxf's C++ engine";
  m.def("info", &info);
  m.def("get_isa", [] { return std::string(kernels::active().name); });
  m.def("set_isa", [](const std::string& name) {
    if (!kernels::set_isa(name.c_str())) {
      throw py::value_error("ISA '" + name + "' is unknown or not supported by this CPU");
    }
  });
  m.def("set_quant_gemv", [](const std::string& name) {
    if (!kernels::set_quant_gemv(name.c_str())) {
      throw py::value_error("unknown quantized GEMV variant '" + name + "' (rows, stream)");
    }
  }, "Picks the AVX-512 decode GEMV on quantized weights: 'stream' (AMD's default) or 'rows'.");
  m.def("get_quant_gemv", [] { return std::string(kernels::quant_gemv_name()); });
  m.def("set_num_threads", [](int n) {
    if (n <= 0) throw py::value_error("number of threads must be positive");
    set_num_threads(n);
  });
  m.def("get_num_threads", &num_threads);
  m.def("set_profiling", [](bool on) { profile().enabled = on; profile().reset(); },
        "Turns per-stage timing of the forward pass on or off (and clears it).");
  m.def("profile", [] {
    py::dict out;
    for (int i = 0; i < (int)Stage::kCount; ++i) {
      out[stage_name((Stage)i)] = py::make_tuple(profile().seconds[i], profile().calls[i]);
    }
    return out;
  }, "Seconds and calls per stage since profiling was turned on: {stage: (seconds, calls)}.");

  py::class_<PyModel, std::shared_ptr<PyModel>>(m, "Model")
      .def(py::init<py::dict, py::dict>(), "config"_a, "weights"_a)
      .def("encode", &PyModel::encode, "batch"_a, "type_ids"_a = py::none())
      .def_property_readonly("vocab_size", [](const PyModel& m) { return m.config().vocab_size; });

  py::class_<PySession>(m, "Session")
      .def(py::init<std::shared_ptr<PyModel>, int>(), "model"_a, "context_length"_a)
      .def("feed", &PySession::feed, "ids"_a, "all_logits"_a = true)
      .def_property_readonly("position", &PySession::position)
      .def_property_readonly("capacity", &PySession::capacity)
      .def("reset", &PySession::reset);

  bind_engine(m);
  bind_seq2seq(m);

  py::module_ ops = m.def_submodule("ops", "kernels on numpy arrays, for tests");
  bind_ops(ops);
}
