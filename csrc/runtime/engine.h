// The serving engine: continuous batching over one decoder. Requests join and leave the running
// batch at token granularity; each step is one forward pass over every running sequence's next
// token plus chunks of prompts (at most prefill_chunk prompt tokens a step, so a long prompt does
// not stall everyone's next token). KV memory is one pool of pages under a byte budget; full pages
// are kept in a prefix cache for later requests that start with the same tokens.
//
// Speculative decoding: a request drafts up to draft_tokens tokens a step, by prompt lookup or
// with the engine's draft model (a smaller decoder over the same vocabulary), and the step's one
// forward pass of the target verifies them all. The draft model's keys and values live in a second
// pool with the same page numbering: page i of a sequence holds the target's and the draft's
// positions alike, so one page manager (budget, prefix cache, preemption) serves both.
//
// The scheduler runs on the engine's own thread, without Python. Callers submit requests, cancel
// them, and poll one queue of token events.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "model/transformer.h"
#include "runtime/kv_cache.h"
#include "runtime/page_manager.h"
#include "runtime/sampler.h"

namespace pyxf {

struct EngineOptions {
  int max_batch = 64;           // running sequences at most
  size_t kv_cache_bytes = 1u << 30;
  int prefill_chunk = 512;      // prompt tokens per step at most
  int max_queue = 1024;         // waiting requests at most; submit() beyond raises QueueFull
  int context_length = 0;       // positions per sequence (0: the model's), at most what the pool holds
  bool prefix_cache = true;
};

struct Request {
  std::vector<int32_t> prompt;
  int max_new_tokens = 128;
  SamplingOptions sampling;
  uint64_t seed = 0;
  std::vector<int> stop_ids;
  int top_logprobs = -1;        // -1: no logprobs; k >= 0: the chosen token's and k alternatives
  int draft_tokens = 0;         // speculative decoding: tokens drafted a step (0: off)
  bool draft_model = false;     // drafts come from the engine's draft model, else from prompt lookup
  // Structured output: the tokens allowed as the first new token (a bitmask, see Sampler::sample);
  // the caller supplies the mask of each later token with set_mask once it has seen the previous one.
  // first_forced: tokens the constraint fixes at the start (then first_mask is the mask after them).
  std::vector<uint32_t> first_mask;
  std::vector<int32_t> first_forced;
  bool constrained = false;
};

enum class Finish : int { kNone = 0, kStop = 1, kLength = 2, kCancelled = 3, kError = 4 };

// One new token of a request, or (token -1) only its end. The last event of a request has finish
// set and carries its usage.
struct TokenEvent {
  int64_t request = 0;
  int32_t token = -1;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // best first
  Finish finish = Finish::kNone;
  int prompt_tokens = 0;
  int cached_tokens = 0;        // prompt tokens whose keys and values came from the prefix cache
  std::string error;            // kError: what failed
};

struct EngineStats {
  int running, waiting;
  int pages_total, pages_used, pages_cached, page_tokens;
  int64_t prefix_queried_tokens, prefix_hit_tokens;
  int64_t prompt_tokens, generated_tokens, finished, steps;
  int64_t draft_proposed, draft_accepted;  // speculative tokens proposed and confirmed
  int64_t forced_tokens;                   // tokens a constraint fixed (taken without sampling)
};

class QueueFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Engine {
 public:
  // `draft` (optional): the draft model, with model's vocabulary; both outlive the engine.
  Engine(const Transformer& model, const Transformer* draft, const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request and returns its id. std::invalid_argument when it can never run (empty or
  // out-of-vocabulary prompt, longer than the context or the KV budget), QueueFull when
  // max_queue requests are waiting, std::logic_error after close().
  int64_t submit(Request request);
  // Ends a request within one step (finish kCancelled); unknown or finished ids are ignored.
  void cancel(int64_t id);
  // The allowed-token mask of a constrained request's new token number `index` (0-based). The
  // engine waits for it when it samples that token, so callers compute it while the step's forward
  // pass runs. `forced` (jump-forward decoding): tokens the constraint fixes from `index` on; the
  // engine takes them as they are, without sampling, runs them together in its next step's forward
  // pass, and `mask` is that of the token after them. Callers send no mask for forced tokens.
  void set_mask(int64_t id, int index, std::vector<uint32_t> mask, std::vector<int32_t> forced = {});
  // Events since the last poll, waiting up to timeout_ms for one. Empty on timeout, and for good
  // once the engine is closed and has nothing left to report (then drained() is true).
  std::vector<TokenEvent> poll(int timeout_ms);
  bool drained() const;
  // Stops accepting requests; cancel_running ends the running and waiting ones too. The thread
  // exits once nothing is left to do.
  void close(bool cancel_running);
  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }

 private:
  struct Sequence;

  void run();
  bool step();
  void take_requests();
  void schedule(std::vector<Sequence*>& batch);
  bool grow(Sequence& s, int positions);
  void match_prefix(Sequence& s);
  void publish_full_pages(Sequence& s);
  void preempt(Sequence& s);
  void preempt_pages(Sequence& s);
  void finish(Sequence& s, Finish why, std::vector<TokenEvent>& events, const std::string& error = "");
  void emit(std::vector<TokenEvent>& events);
  void update_stats();
  void sample(Sequence& s, float* logits, std::vector<TokenEvent>& events);
  void verify_drafts(Sequence& s, float* rows, std::vector<TokenEvent>& events);
  void prepare_logprobs(const Sequence& s, const float* logits);
  void accept_token(Sequence& s, int token, std::vector<TokenEvent>& events);
  void propose_drafts(Sequence& s);
  void run_draft_model(std::vector<Sequence*>& batch, std::vector<TokenEvent>& events);
  void forward_target(std::vector<Sequence*>& batch, std::vector<TokenEvent>& events);
  bool wait_for_mask(const Sequence& s, std::vector<uint32_t>& mask, std::vector<int32_t>& forced);

  const Transformer& model_;
  const Transformer* draft_;            // the draft model, or nullptr
  EngineOptions options_;
  KVPool pool_;
  std::unique_ptr<KVPool> draft_pool_;  // the draft model's pages, numbered as pool_'s
  PageManager pages_;

  // Scheduler state, touched only by the engine thread.
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in order of admission
  Workspace ws_, draft_ws_;
  std::vector<float> logits_, draft_logits_, logprob_row_;

  // Shared with callers, under mutex_.
  mutable std::mutex mutex_;
  std::condition_variable work_;      // wakes the engine thread
  std::condition_variable events_cv_; // wakes pollers
  std::condition_variable masks_cv_;  // wakes the engine thread waiting for a mask
  struct PendingMask {
    int index;
    std::vector<uint32_t> words;
    std::vector<int32_t> forced;
  };
  std::unordered_map<int64_t, PendingMask> masks_;
  std::deque<std::unique_ptr<Sequence>> submitted_;
  std::unordered_set<int64_t> cancelled_;
  std::vector<TokenEvent> events_;
  bool closing_ = false, cancel_all_ = false, stopped_ = false;
  int64_t next_id_ = 1;

  std::atomic<int> n_running_{0}, n_waiting_{0}, pages_used_{0}, pages_cached_{0};
  std::atomic<int64_t> prefix_queried_{0}, prefix_hits_{0}, prompt_tokens_{0}, generated_{0}, finished_{0},
      steps_{0}, draft_proposed_{0}, draft_accepted_{0}, forced_{0};

  std::thread thread_;
};

}  // namespace pyxf
