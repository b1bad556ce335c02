// The decoder API: sessions (one sequence fed incrementally) and the serving engine.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string_view>

#include "bindings/model.h"
#include "runtime/engine.h"

namespace pyxf {

using namespace pybind11::literals;

namespace {

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
    cache_ = std::make_unique<KVCache>(KVShape::of(c), context_length);
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
                 int top_logprobs, py::object first_mask, int draft_tokens, bool draft_model,
                 std::vector<int32_t> first_forced) {
    Request r;
    r.draft_tokens = draft_tokens;
    r.draft_model = draft_model;
    if (!first_mask.is_none()) {
      r.constrained = true;
      r.first_mask = mask_words(first_mask.cast<py::bytes>());
      r.first_forced = std::move(first_forced);
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
                    "draft_tokens_accepted_total"_a = s.draft_accepted, "forced_tokens_total"_a = s.forced_tokens);
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


}  // namespace

void bind_decoder(py::module_& m) {
  py::class_<PySession>(m, "Session")
      .def(py::init<std::shared_ptr<PyModel>, int>(), "model"_a, "context_length"_a)
      .def("feed", &PySession::feed, "ids"_a, "all_logits"_a = true)
      .def_property_readonly("position", &PySession::position)
      .def_property_readonly("capacity", &PySession::capacity)
      .def("reset", &PySession::reset);

  py::register_exception<QueueFull>(m, "QueueFull", PyExc_RuntimeError);
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<std::shared_ptr<PyModel>, int, double, int, int, int, bool, std::shared_ptr<PyModel>>(), "model"_a,
           "max_batch"_a, "kv_cache_mb"_a, "prefill_chunk"_a, "max_queue"_a, "context_length"_a, "prefix_cache"_a,
           "draft"_a = nullptr)
      .def("submit", &PyEngine::submit, "prompt"_a, "max_new_tokens"_a, "temperature"_a, "top_k"_a, "top_p"_a,
           "repetition_penalty"_a, "presence_penalty"_a, "frequency_penalty"_a, "logit_bias"_a, "seed"_a,
           "stop_ids"_a, "top_logprobs"_a, "first_mask"_a = py::none(), "draft_tokens"_a = 0,
           "draft_model"_a = false, "first_forced"_a = std::vector<int32_t>{})
      .def("cancel", [](PyEngine& e, int64_t id) { e.engine().cancel(id); }, "request"_a)
      .def("set_mask", [](PyEngine& e, int64_t id, int index, const py::bytes& mask, std::vector<int32_t> forced) {
        e.engine().set_mask(id, index, PyEngine::mask_words(mask), std::move(forced));
      }, "request"_a, "index"_a, "mask"_a, "forced"_a = std::vector<int32_t>{})
      .def("poll", &PyEngine::poll, "timeout_ms"_a)
      .def_property_readonly("drained", [](PyEngine& e) { return e.engine().drained(); })
      .def("close", [](PyEngine& e, bool cancel) { e.engine().close(cancel); }, "cancel_running"_a = false)
      .def("stats", &PyEngine::stats)
      .def_property_readonly("context_length", [](PyEngine& e) { return e.engine().options().context_length; })
      .def_static("page_bytes", [](const PyModel& m) { return KVShape::of(m.config()).page_bytes(); }, "model"_a, "Bytes of one KV page (kv_page_tokens positions of every layer) of this model.");
  m.attr("kv_page_tokens") = kPageTokens;
}

}  // namespace pyxf
