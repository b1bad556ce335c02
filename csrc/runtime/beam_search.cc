#include "runtime/beam_search.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "runtime/profile.h"

namespace pyxf {

namespace {

constexpr float kPenalty = -1.0e9f;  // transformers' "very large negative" beam score offset

bool contains(const std::vector<int>& v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// x <- log_softmax(x), as torch computes it: (x - max) - log(sum(exp(x - max))).
void log_softmax(float* x, int n) { kernels::active().log_softmax(x, n); }

// Bans every token that would repeat an n-gram of `history` (decoder start token included), as
// transformers' NoRepeatNGramLogitsProcessor does.
void ban_repeated_ngrams(float* row, const std::vector<int>& history, int n) {
  const int L = (int)history.size();
  if (n <= 0 || L + 1 < n) return;
  const int* prefix = history.data() + L - (n - 1);
  for (int i = 0; i + n <= L; ++i) {
    if (std::equal(prefix, prefix + n - 1, history.data() + i)) row[history[i + n - 1]] = -INFINITY;
  }
}

// Leaves `token` as the only choice, with log-probability 0 (transformers' forced BOS / EOS).
void force_token(float* row, int vocab, int token) {
  std::fill(row, row + vocab, -INFINITY);
  row[token] = 0.0f;
}

// The logits processors that do not depend on the decoding mode, on a row of logits or
// log-probabilities; `step` tokens have been generated so far.
void process_row(float* row, int vocab, const std::vector<int>& history, int step, const Seq2SeqOptions& o) {
  ban_repeated_ngrams(row, history, o.no_repeat_ngram_size);
  if (step < o.min_length) {
    for (int e : o.eos_ids) row[e] = -INFINITY;
  }
  for (int t : o.suppress_ids) row[t] = -INFINITY;
  if (o.forced_bos_id >= 0 && step == 0) force_token(row, vocab, o.forced_bos_id);
  if (o.forced_eos_id >= 0 && step == o.max_length - 1) force_token(row, vocab, o.forced_eos_id);
}

// Orders candidates best first; ties go to the lower flat index (beam * vocab + token).
struct Candidate {
  float score;
  int beam;
  int token;
};
bool better(const Candidate& a, const Candidate& b, int vocab) {
  if (a.score != b.score) return a.score > b.score;
  return (long)a.beam * vocab + a.token < (long)b.beam * vocab + b.token;
}

// The best k of score[0..n) + offset, as candidates of `beam`, best first.
void top_k(const float* score, int n, float offset, int k, int beam, std::vector<Candidate>& out) {
  thread_local std::vector<float> scores;
  thread_local std::vector<int32_t> tokens;
  scores.resize(k);
  tokens.resize(k);
  const int count = kernels::active().top_k(score, n, offset, k, scores.data(), tokens.data());
  out.clear();
  for (int i = 0; i < count; ++i) out.push_back({scores[i], beam, tokens[i]});
}

std::vector<int> strip_eos(const std::vector<int>& history, const std::vector<int>& eos) {
  // history[0] is the decoder start token; a finished hypothesis ends with its end token.
  auto end = history.end();
  if (history.size() > 1 && contains(eos, history.back())) --end;
  return std::vector<int>(history.begin() + 1, end);
}

// ---------------------------------------------------------------------------------------------
// one hypothesis per source: greedy or sampling

std::vector<std::vector<Hypothesis>> generate_single(const Seq2SeqModel& model, const EncodedSources& enc,
                                                     const Seq2SeqOptions& o, Workspace& ws,
                                                     const InterruptCheck& interrupted) {
  const ModelConfig& c = model.decoder().config();
  const int V = c.vocab_size, n = enc.n();
  struct Hyp {
    std::unique_ptr<KVCache> cache;
    Sampler sampler;
    std::vector<int> history;
    float score = 0.0f;
    bool done = false;
  };
  std::vector<Hyp> hyps;
  hyps.reserve(n);
  for (int s = 0; s < n; ++s) {
    hyps.push_back({std::make_unique<KVCache>(KVShape::of(c), o.max_length),
                    Sampler(o.sampling, o.seed, V), {o.decoder_start_id}});
    hyps.back().sampler.observe(o.decoder_start_id);
  }
  std::vector<DecoderSeq> batch;
  std::vector<int> index;
  std::vector<float> logits;
  for (int step = 0; step < o.max_length; ++step) {
    if (interrupted && interrupted()) break;
    batch.clear();
    index.clear();
    for (int s = 0; s < n; ++s) {
      if (hyps[s].done) continue;
      batch.push_back({hyps[s].cache.get(), &hyps[s].history.back(), 1, s, false});
      index.push_back(s);
    }
    if (batch.empty()) break;
    logits.resize((size_t)batch.size() * V);
    {
      StageTimer timer(Stage::kForward);
      model.decode(batch.data(), (int)batch.size(), enc, ws, logits.data());
    }
#pragma omp parallel for schedule(dynamic, 1) if (batch.size() > 1)
    for (long b = 0; b < (long)batch.size(); ++b) {
      Hyp& h = hyps[index[b]];
      float* row = &logits[b * V];
      process_row(row, V, h.history, step, o);
      // The model's log-probability of the chosen token (after the processors above).
      const float log_z = kernels::active().logsumexp(row, V);
      std::vector<float> raw;
      const int token = [&] {
        if (o.sampling.repetition_penalty == 1.0f && o.sampling.temperature <= 0.0f) return h.sampler.sample(row);
        raw.assign(row, row + V);  // the sampler edits the row
        return h.sampler.sample(row);
      }();
      const float chosen = raw.empty() ? row[token] : raw[token];
      h.score += chosen - log_z;
      h.history.push_back(token);
      h.sampler.observe(token);
      h.done = contains(o.eos_ids, token) || (int)h.history.size() - 1 >= o.max_length;
    }
  }
  std::vector<std::vector<Hypothesis>> out(n);
  for (int s = 0; s < n; ++s) out[s].push_back({strip_eos(hyps[s].history, o.eos_ids), hyps[s].score});
  return out;
}

// ---------------------------------------------------------------------------------------------
// beam search

struct Beam {
  std::vector<int> history;  // decoder start token, then generated tokens
  float score;               // sum of log-probs (plus kPenalty once it hit a stop)
  int slot;                  // index of its KV cache among the source's slots
};

struct Finished {
  std::vector<int> history;
  float score;
};

struct SourceBeams {
  std::vector<Beam> beams;
  std::vector<Finished> finished;  // best first, at most beam_size
  std::vector<std::unique_ptr<KVCache>> slots;
  bool improvable = true;          // transformers' is_early_stop_heuristic_unsatisfied
  bool done = false;
};

std::vector<std::vector<Hypothesis>> generate_beam(const Seq2SeqModel& model, const EncodedSources& enc,
                                                   const Seq2SeqOptions& o, Workspace& ws,
                                                   const InterruptCheck& interrupted) {
  const ModelConfig& c = model.decoder().config();
  const int V = c.vocab_size, n = enc.n(), B = o.beam_size;
  const int n_eos = (int)o.eos_ids.size();
  const int K = std::min<long>(std::max(2, 1 + n_eos) * B, (long)B * V);  // continuations kept per step
  const double lp = o.length_penalty;

  std::vector<SourceBeams> src(n);
  for (auto& s : src) {
    for (int b = 0; b < B; ++b) {
      s.slots.push_back(std::make_unique<KVCache>(KVShape::of(c), o.max_length));
      // Only the first beam is live at the start: the others would repeat its continuations.
      s.beams.push_back({{o.decoder_start_id}, b == 0 ? 0.0f : kPenalty, b});
    }
  }

  struct Row {
    int source;
    int beam;  // -1 at the first step: the row stands for every beam of the source
  };
  std::vector<DecoderSeq> batch;
  std::vector<Row> rows;
  std::vector<float> logits;
  std::vector<std::vector<Candidate>> beam_best;  // per row and beam: its best K continuations
  std::vector<Candidate> merged;
  std::vector<char> hits;
  std::vector<int> order, free_slots;
  // Caches a child takes over from its parent (into the slot of a beam without children): no
  // parent's slot is another's destination, so the copies of a step run in parallel.
  struct Copy {
    KVCache* to;
    const KVCache* from;
  };
  std::vector<Copy> copies;

  for (int step = 0; step < o.max_length; ++step) {
    if (interrupted && interrupted()) break;
    batch.clear();
    rows.clear();
    for (int s = 0; s < n; ++s) {
      if (src[s].done) continue;
      if (step == 0) {
        Beam& b = src[s].beams[0];
        batch.push_back({src[s].slots[b.slot].get(), &b.history.back(), 1, s, false});
        rows.push_back({s, -1});
      } else {
        for (int j = 0; j < B; ++j) {
          Beam& b = src[s].beams[j];
          batch.push_back({src[s].slots[b.slot].get(), &b.history.back(), 1, s, false});
          rows.push_back({s, j});
        }
      }
    }
    if (batch.empty()) break;
    logits.resize((size_t)batch.size() * V);
    {
      StageTimer timer(Stage::kForward);
      model.decode(batch.data(), (int)batch.size(), enc, ws, logits.data());
    }

    // Log-probabilities, processors, and each beam's best K continuations.
    const int per_row = step == 0 ? B : 1;
    beam_best.resize(rows.size() * per_row);
#pragma omp parallel for schedule(dynamic, 1) if (rows.size() > 1)
    for (long r = 0; r < (long)rows.size(); ++r) {
      SourceBeams& s = src[rows[r].source];
      const int j0 = rows[r].beam < 0 ? 0 : rows[r].beam;
      const Beam& beam = s.beams[j0];
      float* row = &logits[r * V];
      log_softmax(row, V);
      const float penalty = o.sampling.repetition_penalty;
      if (penalty != 1.0f) {
        std::vector<int> seen = beam.history;
        std::sort(seen.begin(), seen.end());
        seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
        for (int t : seen) row[t] = row[t] < 0 ? row[t] * penalty : row[t] / penalty;
      }
      process_row(row, V, beam.history, step, o);
      if (o.renormalize) log_softmax(row, V);
      for (int k = 0; k < per_row; ++k) {
        const int j = rows[r].beam < 0 ? k : rows[r].beam;
        top_k(row, V, s.beams[j].score, K, j, beam_best[r * per_row + k]);
      }
    }

    // Per source: the best K continuations over all beams, then the next beams and the finished.
    copies.clear();
    for (size_t r0 = 0; r0 < rows.size();) {
      const int si = rows[r0].source;
      SourceBeams& s = src[si];
      merged.clear();
      size_t r1 = r0;
      while (r1 < rows.size() && rows[r1].source == si) ++r1;
      for (size_t r = r0; r < r1; ++r) {
        for (int k = 0; k < per_row; ++k) {
          const auto& best = beam_best[r * per_row + k];
          merged.insert(merged.end(), best.begin(), best.end());
        }
      }
      r0 = r1;
      std::sort(merged.begin(), merged.end(), [V](const Candidate& a, const Candidate& b) { return better(a, b, V); });
      if ((int)merged.size() > K) merged.resize(K);
      const int k_count = (int)merged.size();

      hits.assign(k_count, 0);
      for (int i = 0; i < k_count; ++i) hits[i] = contains(o.eos_ids, merged[i].token) || step + 1 >= o.max_length;

      // The next beams: the best B continuations that did not stop.
      order.resize(k_count);
      for (int i = 0; i < k_count; ++i) order[i] = i;
      auto penalized = [&](int i) { return merged[i].score + (hits[i] ? kPenalty : 0.0f); };
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return penalized(a) > penalized(b); });

      // Finished hypotheses: stops among the best B continuations, while they can still matter.
      const bool full = (int)s.finished.size() == B;
      if (s.improvable && !(o.early_stopping == EarlyStopping::kTrue && full)) {
        const float norm = (float)std::pow((double)(step + 1), lp);
        for (int i = 0; i < std::min(B, k_count); ++i) {
          if (!hits[i]) continue;
          std::vector<int> history = s.beams[merged[i].beam].history;
          history.push_back(merged[i].token);
          s.finished.push_back({std::move(history), merged[i].score / norm});
        }
        std::stable_sort(s.finished.begin(), s.finished.end(),
                         [](const Finished& a, const Finished& b) { return a.score > b.score; });
        if ((int)s.finished.size() > B) s.finished.resize(B);
      }

      // Reorder: first children inherit their parent's cache slot, later children copy into the
      // slot of a beam without children.
      std::vector<Beam> next;
      next.reserve(B);
      std::vector<char> has_child(B, 0), inherited(B, 0);
      auto parent_of = [&](int i) { return step == 0 ? 0 : merged[i].beam; };  // step 0: one cache for all
      for (int j = 0; j < B && j < k_count; ++j) has_child[parent_of(order[j])] = 1;
      free_slots.clear();
      for (int b = 0; b < B; ++b) {
        if (!has_child[b]) free_slots.push_back(s.beams[b].slot);
      }
      for (int j = 0; j < B && j < k_count; ++j) {
        const int i = order[j], p = parent_of(i);
        std::vector<int> history = s.beams[merged[i].beam].history;
        history.push_back(merged[i].token);
        int slot;
        if (!inherited[p]) {
          inherited[p] = 1;
          slot = s.beams[p].slot;
        } else {
          slot = free_slots.back();
          free_slots.pop_back();
          copies.push_back({s.slots[slot].get(), s.slots[s.beams[p].slot].get()});
        }
        next.push_back({std::move(history), penalized(i), slot});
      }
      s.beams.swap(next);

      // transformers' early-stop heuristic: can the best running beam still beat the worst finished?
      if (s.improvable) {
        const int best_length =
            o.early_stopping == EarlyStopping::kNever && lp > 0.0 ? o.max_length : step + 1;
        const float best = s.beams[0].score / (float)std::pow((double)best_length, lp);
        const float worst = (int)s.finished.size() == B ? s.finished.back().score : kPenalty;
        s.improvable = best > worst;
      }
      s.done = !s.improvable || step + 1 >= o.max_length || (int)s.beams.size() < B ||
               (o.early_stopping == EarlyStopping::kTrue && (int)s.finished.size() == B);
    }
#pragma omp parallel for schedule(dynamic, 1) if (copies.size() > 1)
    for (long i = 0; i < (long)copies.size(); ++i) copies[i].to->copy_from(*copies[i].from);
  }

  std::vector<std::vector<Hypothesis>> out(n);
  for (int si = 0; si < n; ++si) {
    SourceBeams& s = src[si];
    if (s.finished.empty()) {  // interrupted: the running beams are all there is
      for (auto& b : s.beams) s.finished.push_back({b.history, b.score});
    }
    for (int i = 0; i < (int)s.finished.size() && i < o.num_hypotheses; ++i) {
      out[si].push_back({strip_eos(s.finished[i].history, o.eos_ids), s.finished[i].score});
    }
  }
  return out;
}

}  // namespace

std::vector<std::vector<Hypothesis>> seq2seq_generate(const Seq2SeqModel& model,
                                                      const std::vector<std::vector<int32_t>>& sources,
                                                      const Seq2SeqOptions& options,
                                                      const InterruptCheck& interrupted) {
  const ModelConfig& c = model.decoder().config();
  if (options.beam_size < 1) throw std::invalid_argument("beam_size must be >= 1");
  if (options.max_length < 1) throw std::invalid_argument("max_length must be >= 1");
  if (options.num_hypotheses < 1 || options.num_hypotheses > options.beam_size) {
    throw std::invalid_argument("num_hypotheses must be in [1, beam_size]");
  }
  auto check_id = [&](int id) {
    if (id < 0 || id >= c.vocab_size) throw std::out_of_range("token id outside the target vocabulary");
  };
  for (int id : options.eos_ids) check_id(id);
  for (int id : options.suppress_ids) check_id(id);
  if (options.forced_bos_id >= 0) check_id(options.forced_bos_id);
  if (options.forced_eos_id >= 0) check_id(options.forced_eos_id);
  check_id(options.decoder_start_id);

  Workspace ws;
  EncodedSources enc;
  model.encode(sources, ws, enc);
  if (options.beam_size == 1) return generate_single(model, enc, options, ws, interrupted);
  return generate_beam(model, enc, options, ws, interrupted);
}

}  // namespace pyxf
