#include "runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "runtime/profile.h"
#include "runtime/threads.h"

namespace pyxf {

struct Engine::Sequence {
  Sequence(int64_t id, Request r, const KVPool* pool, const KVPool* draft_pool, int vocab_size)
      : id(id),
        request(std::move(r)),
        tokens(request.prompt),
        prompt_len((int)request.prompt.size()),
        cache(pool),
        draft_cache(draft_pool),
        sampler(request.sampling, request.seed, vocab_size) {
    for (int32_t t : tokens) sampler.observe(t);
  }

  // Tokens whose keys and values are not in the cache yet: the prompt's rest, or the last sampled one.
  int pending() const { return (int)tokens.size() - cache.length(); }
  // Leading positions both models hold (the draft model's cache, when the engine has one, may lag
  // the target's by the tokens of the last step).
  int computed(bool with_draft) const {
    return with_draft ? std::min(cache.length(), draft_cache.length()) : cache.length();
  }
  bool drafts_with_model() const { return draft_slots > 0 && request.draft_model; }

  int64_t id;
  Request request;
  std::vector<int32_t> tokens;  // the prompt, then what was generated
  int prompt_len;
  int generated = 0;
  KVCache cache;                // cache.length(): tokens computed
  KVCache draft_cache;          // the draft model's (engines with one): the same page table, its own pool
  Sampler sampler;
  int published = 0;            // leading pages offered to (or found in) the prefix cache
  uint64_t prefix = 0;          // id of the prefix those pages end
  int cached_tokens = 0;
  int step_tokens = 0;          // tokens this step runs
  int draft_slots = 0;          // positions reserved this step for drafts
  std::vector<int32_t> drafts;  // speculative tokens this step verifies
  std::vector<float> draft_probs;  // [drafts][vocab]: the distributions the draft model drew them from
  std::vector<int32_t> step_input;
  bool running = false;         // in running_, else waiting
  bool done = false;
};

namespace {

int pages_for(int positions) { return (positions + kPageTokens - 1) / kPageTokens; }

// Prompt-lookup drafting: the tokens that followed the most recent earlier occurrence of the
// sequence's last n tokens (n = 3, 2, 1: the longest match wins), at most `max_draft` of them.
std::vector<int32_t> prompt_lookup(const std::vector<int32_t>& tokens, int max_draft) {
  const int len = (int)tokens.size();
  for (int n = std::min(3, len - 1); n >= 1; --n) {
    const int32_t* tail = tokens.data() + len - n;
    for (int j = len - n - 1; j >= 0; --j) {
      if (std::equal(tail, tail + n, tokens.data() + j)) {
        const int from = j + n, count = std::min(max_draft, len - from);
        return std::vector<int32_t>(tokens.begin() + from, tokens.begin() + from + count);
      }
    }
  }
  return {};
}

void check_forced(const std::vector<int32_t>& forced, int vocab_size) {
  for (int32_t t : forced) {
    if (t < 0 || t >= vocab_size) throw std::invalid_argument("a forced token is outside the vocabulary");
  }
}

size_t page_bytes(const Transformer* model) {
  if (!model) return 0;
  return KVShape::of(model->config()).page_bytes();
}

// Pages of the budget: a page numbers the target's and the draft model's positions together.
int page_budget(const Transformer& model, const Transformer* draft, size_t bytes) {
  return (int)std::min<size_t>(bytes / (page_bytes(&model) + page_bytes(draft)), 1 << 24);
}

std::unique_ptr<KVPool> draft_pool(const Transformer* draft, int num_pages) {
  if (!draft) return nullptr;
  return std::make_unique<KVPool>(KVShape::of(draft->config()), num_pages);
}

}  // namespace

Engine::Engine(const Transformer& model, const Transformer* draft, const EngineOptions& options)
    : model_(model),
      draft_(draft),
      options_(options),
      pool_(KVShape::of(model.config()), page_budget(model, draft, options.kv_cache_bytes)),
      draft_pool_(draft_pool(draft, pool_.num_pages())),
      pages_(pool_.num_pages()) {
  const ModelConfig& c = model.config();
  if (!c.has_lm_head) throw std::invalid_argument("the engine needs a decoder model (one with an LM head)");
  if (draft && !draft->config().has_lm_head) throw std::invalid_argument("the draft model must be a decoder");
  if (draft && draft->config().vocab_size != c.vocab_size) {
    throw std::invalid_argument("the draft model's vocabulary (" + std::to_string(draft->config().vocab_size) +
                                " tokens) differs from the model's (" + std::to_string(c.vocab_size) + ")");
  }
  if (options_.max_batch <= 0) throw std::invalid_argument("max_batch must be positive");
  if (options_.prefill_chunk <= 0) throw std::invalid_argument("prefill_chunk must be positive");
  if (options_.max_queue < 0) throw std::invalid_argument("max_queue must be >= 0");
  if (pool_.num_pages() == 0) throw std::invalid_argument("kv_cache_mb is too small for one KV page");
  // A sequence can hold at most the whole pool.
  if (options_.context_length <= 0 || options_.context_length > c.max_sequence()) {
    options_.context_length = c.max_sequence();
  }
  if (draft) options_.context_length = std::min(options_.context_length, draft->config().max_sequence());
  options_.context_length = std::min(options_.context_length, pool_.num_pages() * kPageTokens);
  thread_ = std::thread([this] { run(); });
}

Engine::~Engine() {
  close(true);
  if (thread_.joinable()) thread_.join();
}

int64_t Engine::submit(Request request) {
  const ModelConfig& c = model_.config();
  const long n = (long)request.prompt.size();
  if (n == 0) throw std::invalid_argument("the prompt is empty");
  for (int32_t t : request.prompt) {
    if (t < 0 || t >= c.vocab_size) {
      throw std::invalid_argument("prompt token " + std::to_string(t) + " is outside the vocabulary [0, " +
                                  std::to_string(c.vocab_size) + ")");
    }
  }
  for (const auto& [t, bias] : request.sampling.logit_bias) {
    if (t < 0 || t >= c.vocab_size) throw std::invalid_argument("logit_bias token " + std::to_string(t) + " is outside the vocabulary");
  }
  if (request.max_new_tokens <= 0) throw std::invalid_argument("max_new_tokens must be positive");
  if (request.draft_model && !draft_) throw std::invalid_argument("this engine has no draft model");
  if (request.top_logprobs > c.vocab_size) throw std::invalid_argument("top_logprobs exceeds the vocabulary");
  const long total = n + request.max_new_tokens;
  if (total > options_.context_length) {
    throw std::invalid_argument("the prompt has " + std::to_string(n) + " tokens; with max_new_tokens=" +
                                std::to_string(request.max_new_tokens) + " that is " + std::to_string(total) +
                                " tokens, more than the context length " + std::to_string(options_.context_length));
  }
  std::vector<uint32_t> first_mask = std::move(request.first_mask);
  std::vector<int32_t> first_forced = std::move(request.first_forced);
  check_forced(first_forced, c.vocab_size);
  auto seq = std::make_unique<Sequence>(0, std::move(request), &pool_, draft_pool_.get(), c.vocab_size);
  std::lock_guard<std::mutex> lock(mutex_);
  if (closing_) throw std::logic_error("the engine is closed");
  if (n_waiting_ >= options_.max_queue) {
    throw QueueFull("the engine's queue is full (" + std::to_string(options_.max_queue) + " requests waiting)");
  }
  seq->id = next_id_++;
  const int64_t id = seq->id;
  if (seq->request.constrained) masks_[id] = {0, std::move(first_mask), std::move(first_forced)};
  submitted_.push_back(std::move(seq));
  ++n_waiting_;
  work_.notify_one();
  return id;
}

void Engine::cancel(int64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_.insert(id);
  work_.notify_one();
  masks_cv_.notify_all();
}

void Engine::set_mask(int64_t id, int index, std::vector<uint32_t> mask, std::vector<int32_t> forced) {
  check_forced(forced, model_.config().vocab_size);
  std::lock_guard<std::mutex> lock(mutex_);
  masks_[id] = {index, std::move(mask), std::move(forced)};
  masks_cv_.notify_all();
}

// The mask of the sequence's next token (and the tokens forced before it), once its caller has
// supplied it; false when the request is cancelled (or the engine closes) first.
bool Engine::wait_for_mask(const Sequence& s, std::vector<uint32_t>& mask, std::vector<int32_t>& forced) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    const auto it = masks_.find(s.id);
    if (it != masks_.end() && it->second.index == s.generated) {
      mask.swap(it->second.words);
      forced.swap(it->second.forced);
      masks_.erase(it);
      return true;
    }
    if (cancelled_.count(s.id) || cancel_all_) return false;
    masks_cv_.wait(lock);
  }
}

std::vector<TokenEvent> Engine::poll(int timeout_ms) {
  std::unique_lock<std::mutex> lock(mutex_);
  events_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return !events_.empty() || stopped_; });
  std::vector<TokenEvent> out;
  out.swap(events_);
  return out;
}

bool Engine::drained() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stopped_ && events_.empty();
}

void Engine::close(bool cancel_running) {
  std::lock_guard<std::mutex> lock(mutex_);
  closing_ = true;
  cancel_all_ = cancel_all_ || cancel_running;
  work_.notify_one();
  masks_cv_.notify_all();
}

EngineStats Engine::stats() const {
  return {n_running_, n_waiting_, pool_.num_pages(), pages_used_, pages_cached_, kPageTokens,
          prefix_queried_, prefix_hits_, prompt_tokens_, generated_, finished_, steps_,
          draft_proposed_, draft_accepted_, forced_};
}

void Engine::run() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto has_news = [&] { return !submitted_.empty() || !cancelled_.empty() || closing_; };
      if (running_.empty() && waiting_.empty() && !has_news()) {
        // An idle engine hands back its thread's OpenMP workers. Each engine thread has a pool of
        // its own, and with more pool threads than CPUs libgomp barely spins at its barriers: two
        // engines that had both run made the busy one decode ~2.6x slower (every parallel region of
        // a step waited for its workers to wake). The next step makes the pool again (tens of
        // microseconds).
        lock.unlock();
        release_thread_pool();
        lock.lock();
      }
      if (running_.empty() && waiting_.empty()) work_.wait(lock, has_news);
      if (closing_ && submitted_.empty() && running_.empty() && waiting_.empty()) {
        stopped_ = true;
        events_cv_.notify_all();
        return;
      }
    }
    step();
  }
}

// One scheduler step: new requests and cancellations in, the draft model's passes (engines with
// one), one forward pass of the target, tokens out.
bool Engine::step() {
  take_requests();
  std::vector<Sequence*> batch;
  schedule(batch);
  if (batch.empty()) return false;

  std::vector<TokenEvent> events;
  adopt_num_threads();
  if (draft_) run_draft_model(batch, events);
  forward_target(batch, events);
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](const auto& s) { return s->done; }),
                 running_.end());
  ++steps_;
  update_stats();
  emit(events);
  return true;
}

// The target's forward pass over the step's sequences (those not finished already), then each
// sequence's new token, or the verification of its drafts.
void Engine::forward_target(std::vector<Sequence*>& batch, std::vector<TokenEvent>& events) {
  batch.erase(std::remove_if(batch.begin(), batch.end(), [](Sequence* s) { return s->done; }), batch.end());
  if (batch.empty()) return;
  std::vector<SeqBatch> rows;
  rows.reserve(batch.size());
  for (Sequence* s : batch) {
    SeqBatch b{&s->cache, s->tokens.data() + s->cache.length(), s->step_tokens, false};
    if (!s->drafts.empty()) {
      // The last sampled token and its drafts, each with its logits.
      s->step_input.assign(1, s->tokens.back());
      s->step_input.insert(s->step_input.end(), s->drafts.begin(), s->drafts.end());
      b.tokens = s->step_input.data();
      b.all_logits = true;
    }
    b.no_logits = s->step_tokens < s->pending();
    rows.push_back(b);
  }
  const int vocab = model_.config().vocab_size;
  logits_.resize((size_t)Transformer::logit_rows(rows.data(), (int)rows.size()) * vocab);
  try {
    model_.forward(rows.data(), (int)rows.size(), ws_, logits_.data());
  } catch (const std::exception& e) {
    for (Sequence* s : batch) finish(*s, Finish::kError, events, e.what());
  }
  float* row = logits_.data();
  for (Sequence* s : batch) {
    if (s->done) continue;
    if (!s->drafts.empty()) {
      const int rows_of_seq = s->step_tokens;
      verify_drafts(*s, row, events);
      row += (long)rows_of_seq * vocab;
    } else if (s->pending() == 0) {
      sample(*s, row, events);
      row += vocab;
    }
    if (!s->done) publish_full_pages(*s);
  }
}

// The draft model's part of a step. Every sequence of the step first brings the draft model's cache
// up to what the target computes this step (its prompt chunk, or its last tokens), so that the
// pages the prefix cache keeps hold both models' positions; in the same pass the sequences that
// draft with the model get their first draft, and then one more per pass (each pass is one batched
// forward of the draft model) until they have their draft_slots or drafted a stop token.
void Engine::run_draft_model(std::vector<Sequence*>& batch, std::vector<TokenEvent>& events) {
  const int vocab = model_.config().vocab_size;
  std::vector<SeqBatch> rows;
  std::vector<Sequence*> drafting;
  for (Sequence* s : batch) {
    s->draft_cache.pages() = s->cache.pages();  // the same page numbers, in the draft model's pool
    const int from = s->draft_cache.length();
    const int to = std::min((int)s->tokens.size(), s->cache.length() + s->step_tokens);
    SeqBatch b{&s->draft_cache, s->tokens.data() + from, to - from, false};
    b.no_logits = !s->drafts_with_model();
    rows.push_back(b);
    if (s->drafts_with_model()) {
      drafting.push_back(s);
      s->drafts.reserve(s->draft_slots);  // rows point at their last element
      s->draft_probs.resize(s->request.sampling.temperature > 0.0f ? (size_t)s->draft_slots * vocab : 0);
    }
  }
  for (;;) {
    try {
      draft_logits_.resize((size_t)Transformer::logit_rows(rows.data(), (int)rows.size()) * vocab);
      draft_->forward(rows.data(), (int)rows.size(), draft_ws_, draft_logits_.data());
    } catch (const std::exception& e) {
      for (Sequence* s : batch) finish(*s, Finish::kError, events, std::string("the draft model: ") + e.what());
      return;
    }
    // Each drafting sequence's row of logits gives its next draft.
    rows.clear();
    std::vector<Sequence*> going;
    for (size_t i = 0; i < drafting.size(); ++i) {
      Sequence& s = *drafting[i];
      const int n = (int)s.drafts.size();
      float* probs = s.draft_probs.empty() ? nullptr : s.draft_probs.data() + (size_t)n * vocab;
      const int token = s.sampler.draft(draft_logits_.data() + i * (size_t)vocab, probs);
      s.drafts.push_back(token);
      const auto& stops = s.request.stop_ids;
      const bool stop = std::find(stops.begin(), stops.end(), token) != stops.end();
      if (stop || n + 1 == s.draft_slots) continue;
      going.push_back(&s);
      rows.push_back(SeqBatch{&s.draft_cache, &s.drafts.back(), 1, false});
    }
    drafting.swap(going);
    if (drafting.empty()) break;
  }
  // The target runs the last token and the drafts it got.
  for (Sequence* s : batch) {
    if (s->drafts_with_model()) s->step_tokens = 1 + (int)s->drafts.size();
  }
}

void Engine::update_stats() {
  n_running_ = (int)running_.size();
  pages_used_ = pages_.used();
  pages_cached_ = pages_.cached();
}

void Engine::take_requests() {
  std::unordered_set<int64_t> cancelled;
  bool cancel_all;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : submitted_) waiting_.push_back(std::move(s));
    submitted_.clear();
    cancelled.swap(cancelled_);
    cancel_all = cancel_all_;
  }
  if (cancelled.empty() && !cancel_all) return;
  std::vector<TokenEvent> events;
  auto cancel = [&](auto& seqs) {
    for (auto& s : seqs) {
      if (cancel_all || cancelled.count(s->id)) finish(*s, Finish::kCancelled, events);
    }
    seqs.erase(std::remove_if(seqs.begin(), seqs.end(), [](const auto& s) { return s->done; }), seqs.end());
  };
  cancel(waiting_);
  cancel(running_);
  update_stats();
  emit(events);
}

// Picks this step's work: every running sequence's next token (decode), then prompt chunks up to
// prefill_chunk tokens in all, for running sequences first and then for newly admitted ones. A
// running sequence that needs a page when none is left takes the pages of the newest running
// sequence, which goes back to the front of the queue to be recomputed later.
void Engine::schedule(std::vector<Sequence*>& batch) {
  int budget = options_.prefill_chunk;
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& s = *running_[i];
    const int pending = s.pending();
    propose_drafts(s);
    const int n = pending == 1 ? 1 + s.draft_slots : std::min(pending, budget);
    if (n == 0) continue;
    bool preempted_self = false;
    while (!grow(s, s.cache.length() + n)) {
      Sequence& victim = *running_.back();
      preempted_self = &victim == &s;
      preempt(victim);
      if (preempted_self) break;
    }
    if (preempted_self) break;
    if (pending > 1) budget -= n;
    s.step_tokens = n;
    batch.push_back(&s);
  }
  while (!waiting_.empty() && (int)running_.size() < options_.max_batch && budget > 0) {
    Sequence& s = *waiting_.front();
    const bool first_admission = s.generated == 0;
    if (options_.prefix_cache) match_prefix(s);
    if (first_admission) {
      s.cached_tokens = s.cache.length();
      prefix_queried_ += s.prompt_len;
      prefix_hits_ += s.cached_tokens;
    }
    const int n = std::min(s.pending(), budget);
    if (!grow(s, s.cache.length() + n)) {
      preempt_pages(s);
      break;  // the queue's head waits for pages; later requests wait behind it
    }
    budget -= n;
    s.step_tokens = n;
    batch.push_back(&s);
    s.running = true;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    --n_waiting_;
  }
}

// The draft slots of a decoding sequence's step: prompt lookup's drafts, or the number the draft
// model is to draw (run_draft_model).
void Engine::propose_drafts(Sequence& s) {
  s.drafts.clear();
  s.draft_probs.clear();
  s.draft_slots = 0;
  const int k = s.request.draft_tokens;
  if (k <= 0 || s.request.constrained || s.pending() != 1) return;
  // No more drafts than tokens the sequence may still generate (less the one every step gives) or
  // positions it has left.
  const int room = std::min(s.request.max_new_tokens - s.generated, options_.context_length - s.cache.length()) - 1;
  if (room <= 0) return;
  if (s.request.draft_model) {
    s.draft_slots = std::min(k, room);
  } else {
    s.drafts = prompt_lookup(s.tokens, std::min(k, room));
    s.draft_slots = (int)s.drafts.size();
  }
}

bool Engine::grow(Sequence& s, int positions) {
  while (s.cache.capacity() < positions) {
    const int page = pages_.allocate();
    if (page < 0) return false;
    s.cache.pages().push_back(page);
  }
  return true;
}

// Starts the sequence on the longest run of cached pages holding its first tokens, leaving at least
// one token to compute (its logits give the next token).
void Engine::match_prefix(Sequence& s) {
  const int max_pages = ((int)s.tokens.size() - 1) / kPageTokens;
  uint64_t prefix = 0;
  int matched = 0;
  for (; matched < max_pages; ++matched) {
    uint64_t id;
    const int page = pages_.lookup(prefix, s.tokens.data() + (long)matched * kPageTokens, &id);
    if (page < 0) break;
    s.cache.pages().push_back(page);
    prefix = id;
  }
  s.published = matched;
  s.prefix = prefix;
  s.cache.set_length(matched * kPageTokens);
  s.draft_cache.set_length(matched * kPageTokens);  // published pages hold the draft model's positions too
}

void Engine::publish_full_pages(Sequence& s) {
  if (!options_.prefix_cache) return;
  const int computed = s.computed(draft_ != nullptr);
  while (s.prefix != PageManager::kUncacheable && (s.published + 1) * kPageTokens <= computed) {
    s.prefix = pages_.publish(s.cache.pages()[s.published], s.prefix, s.tokens.data() + (long)s.published * kPageTokens);
    ++s.published;
  }
}

// Gives back every page of a sequence and forgets what it computed; its tokens and sampler state
// stay, so it resumes where it was once it is scheduled again.
void Engine::preempt_pages(Sequence& s) {
  for (int page : s.cache.pages()) pages_.release(page);
  s.cache.pages().clear();
  s.cache.set_length(0);
  s.draft_cache.pages().clear();
  s.draft_cache.set_length(0);
  s.drafts.clear();
  s.draft_slots = 0;
  s.published = 0;
  s.prefix = 0;
}

void Engine::preempt(Sequence& s) {
  preempt_pages(s);
  s.running = false;
  for (size_t i = running_.size(); i-- > 0;) {
    if (running_[i].get() == &s) {
      waiting_.push_front(std::move(running_[i]));
      running_.erase(running_.begin() + (long)i);
      ++n_waiting_;
      return;
    }
  }
}

void Engine::finish(Sequence& s, Finish why, std::vector<TokenEvent>& events, const std::string& error) {
  if (s.done) return;
  if (!s.running) --n_waiting_;
  if (s.request.constrained) {
    std::lock_guard<std::mutex> lock(mutex_);
    masks_.erase(s.id);
  }
  preempt_pages(s);
  s.done = true;
  TokenEvent ev;
  ev.request = s.id;
  ev.finish = why;
  ev.prompt_tokens = s.prompt_len;
  ev.cached_tokens = s.cached_tokens;
  ev.error = error;
  events.push_back(std::move(ev));
  ++finished_;
  prompt_tokens_ += s.prompt_len;
}

void Engine::sample(Sequence& s, float* logits, std::vector<TokenEvent>& events) {
  StageTimer timer(Stage::kSample);
  prepare_logprobs(s, logits);
  std::vector<uint32_t> mask;
  if (s.request.constrained) {
    std::vector<int32_t> forced;
    if (!wait_for_mask(s, mask, forced)) {
      finish(s, Finish::kCancelled, events);
      return;
    }
    if (!forced.empty()) {
      // Jump-forward: the constraint fixes the next tokens, so these logits (of the first of them)
      // are not needed. They join the sequence as generated and run in the next step's forward
      // pass, all at once; the mask waits for the token after them.
      for (int32_t t : forced) {
        accept_token(s, t, events);
        ++forced_;
        if (s.done) return;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      masks_[s.id] = {s.generated, std::move(mask), {}};
      return;
    }
    if (std::all_of(mask.begin(), mask.end(), [](uint32_t w) { return w == 0; })) {
      finish(s, Finish::kError, events, "the constraint allows no token here");
      return;
    }
  }
  accept_token(s, s.sampler.sample(logits, mask.empty() ? nullptr : mask.data(), (int)mask.size()), events);
}

// The rows of a step that ran the sequence's last token and its drafts: each row either confirms
// the next draft (go on) or gives the token that replaces it (stop there); the row after the last
// draft gives one more token. Both caches keep the positions of the confirmed tokens only.
void Engine::verify_drafts(Sequence& s, float* rows, std::vector<TokenEvent>& events) {
  StageTimer timer(Stage::kSample);
  const int vocab = model_.config().vocab_size;
  const int d = (int)s.drafts.size();
  const int base = s.cache.length() - (1 + d);  // position of the last sampled token
  int confirmed = 0;
  draft_proposed_ += d;
  for (int i = 0; i <= d && !s.done; ++i) {
    float* row = rows + (long)i * vocab;
    prepare_logprobs(s, row);
    bool is_draft = false;
    const float* q = s.draft_probs.empty() ? nullptr : s.draft_probs.data() + (size_t)i * vocab;
    const int token = i < d ? s.sampler.verify(row, s.drafts[i], q, &is_draft) : s.sampler.sample(row);
    accept_token(s, token, events);
    if (!is_draft) break;
    ++confirmed;
  }
  draft_accepted_ += confirmed;
  if (!s.done) {
    s.cache.set_length(base + 1 + confirmed);
    s.draft_cache.set_length(std::min(s.draft_cache.length(), s.cache.length()));
  }
  s.drafts.clear();
  s.draft_slots = 0;
}

void Engine::prepare_logprobs(const Sequence& s, const float* logits) {
  if (s.request.top_logprobs < 0) return;
  // Log-probabilities of the model's own distribution (before penalties and temperature).
  const int vocab = model_.config().vocab_size;
  logprob_row_.assign(logits, logits + vocab);
  kernels::active().log_softmax(logprob_row_.data(), vocab);
}

// A sampled token: the end of the sequence (a stop token, its length), or one more token out.
void Engine::accept_token(Sequence& s, int token, std::vector<TokenEvent>& events) {
  const auto& stops = s.request.stop_ids;
  if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
    finish(s, Finish::kStop, events);
    return;
  }
  TokenEvent ev;
  ev.request = s.id;
  ev.token = token;
  const int k = s.request.top_logprobs;
  if (k >= 0) {
    const int vocab = model_.config().vocab_size;
    ev.logprob = logprob_row_[token];
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return logprob_row_[a] > logprob_row_[b] || (logprob_row_[a] == logprob_row_[b] && a < b);
    });
    for (int i = 0; i < k; ++i) ev.top.push_back({order[i], logprob_row_[order[i]]});
  }
  events.push_back(std::move(ev));
  s.tokens.push_back(token);
  s.sampler.observe_generated(token);
  ++s.generated;
  ++generated_;
  if (s.generated >= s.request.max_new_tokens || (int)s.tokens.size() >= options_.context_length) {
    finish(s, Finish::kLength, events);
  }
}


void Engine::emit(std::vector<TokenEvent>& events) {
  if (events.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (events_.empty()) {
    events_.swap(events);
  } else {
    for (auto& e : events) events_.push_back(std::move(e));
  }
  events_cv_.notify_all();
}

}  // namespace pyxf
