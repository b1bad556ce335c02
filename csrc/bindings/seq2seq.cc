// The encoder-decoder API (model/seq2seq.h, runtime/beam_search.h): loading, logits, generation.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <memory>

#include "bindings/common.h"
#include "model/bind.h"
#include "model/seq2seq.h"
#include "runtime/beam_search.h"

namespace pyxf {

using namespace pybind11::literals;

namespace {

class PySeq2SeqModel {
 public:
  PySeq2SeqModel(py::dict config, py::dict weights) {
    CoreThreads threads;  // binding packs some matrices in parallel (it reads Python objects: GIL held)
    PyConfig values(config);
    Seq2SeqConfig c = seq2seq_config(values);
    py::dict formats = values.has("tensor_formats") ? config["tensor_formats"].cast<py::dict>() : py::dict();
    tensors_ = tensor_set(weights, formats, values.has("dtype") ? values.text("dtype") : "float32", keep_);
    binder_ = std::make_unique<WeightBinder>(tensors_, QuantPanels::kBatches,  // batches of sources and beams
                                             values.has("huge_pages") && values.boolean("huge_pages"));
    const bool shared = values.has("shared_embeddings") && values.boolean("shared_embeddings");
    ModelWeights encoder = bind_stack(c.encoder, *binder_, "encoder.", shared ? "embed.weight" : "encoder.embed.weight");
    ModelWeights decoder = bind_stack(c.decoder, *binder_);
    std::vector<CrossAttentionWeights> cross = bind_cross_attention(c.decoder, *binder_);
    requests_ = binder_->requests();
    model_ = std::make_unique<Seq2SeqModel>(Transformer(c.encoder, std::move(encoder)),
                                            Transformer(c.decoder, std::move(decoder)), std::move(cross));
  }

  py::list bound_tensors() const { return requests_list(requests_); }
  size_t huge_page_bytes() const { return binder_->huge_page_bytes(); }

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
      KVCache cache(KVShape::of(c), (int)target.size());
      DecoderSeq seq{&cache, target.data(), (int)target.size(), 0, true};
      model_->decode(&seq, 1, enc, ws, data);
    }
    return out;
  }

  // Hypotheses per source: [[(tokens, score), ...], ...], best first.
  py::list generate(py::sequence sources, int beam_size, int num_hypotheses, float length_penalty,
                    int early_stopping, int no_repeat_ngram_size, int max_length, int min_length, float temperature,
                    int top_k, float top_p, float repetition_penalty, uint64_t seed, std::vector<int> eos_ids,
                    std::vector<int> suppress_ids, int forced_bos_id, int forced_eos_id, bool renormalize,
                    int decoder_start_id) {
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
    if (forced_bos_id >= 0) check_id(forced_bos_id, "forced first token");
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
    o.forced_bos_id = forced_bos_id;
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
  std::vector<py::object> keep_;  // the arrays the weights point into
  TensorSet tensors_;
  std::unique_ptr<WeightBinder> binder_;  // owns widened copies
  std::vector<TensorRequest> requests_;
  std::unique_ptr<Seq2SeqModel> model_;
};

}  // namespace

void bind_seq2seq(py::module_& m) {
  py::class_<PySeq2SeqModel, std::shared_ptr<PySeq2SeqModel>>(m, "Seq2SeqModel")
      .def(py::init<py::dict, py::dict>(), "config"_a, "weights"_a)
      .def("logits", &PySeq2SeqModel::logits, "source_ids"_a, "decoder_ids"_a)
      .def("bound_tensors", &PySeq2SeqModel::bound_tensors,
           "[(name, shape, required), ...]: the tensors this model asked for, in order.")
      .def_property_readonly("huge_page_bytes", [](const PySeq2SeqModel& m) { return m.huge_page_bytes(); },
                             "Bytes of the file's matrices on huge pages, copied or repacked at load "
                             "(0: read from the mapping).")
      .def("generate", &PySeq2SeqModel::generate, "sources"_a, "beam_size"_a = 1, "num_hypotheses"_a = 1,
           "length_penalty"_a = 1.0f, "early_stopping"_a = 0, "no_repeat_ngram_size"_a = 0, "max_length"_a = 256,
           "min_length"_a = 0, "temperature"_a = 0.0f, "top_k"_a = 0, "top_p"_a = 1.0f,
           "repetition_penalty"_a = 1.0f, "seed"_a = 0, "eos_ids"_a = std::vector<int>(),
           "suppress_ids"_a = std::vector<int>(), "forced_bos_id"_a = -1, "forced_eos_id"_a = -1, "renormalize"_a = false,
           "decoder_start_id"_a = 0)
      .def_property_readonly("vocab_size", [](const PySeq2SeqModel& m) { return m.decoder_config().vocab_size; })
      .def_property_readonly("source_vocab_size", [](const PySeq2SeqModel& m) { return m.encoder_config().vocab_size; });
}


}  // namespace pyxf
