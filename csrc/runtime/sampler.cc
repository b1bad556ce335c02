#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>

#include "kernels/kernels.h"

namespace pyxf {

Sampler::Sampler(const SamplingOptions& options, uint64_t seed, int vocab_size)
    : options_(options), vocab_size_(vocab_size), rng_(seed), seen_(vocab_size, 0) {}

void Sampler::observe(int token) {
  if (options_.repetition_penalty != 1.0f && !seen_[token]) {
    seen_[token] = 1;
    seen_list_.push_back(token);
  }
}

void Sampler::observe_generated(int token) {
  observe(token);
  if (options_.presence_penalty == 0.0f && options_.frequency_penalty == 0.0f) return;
  ++generated_counts_[token];
}

void Sampler::adjust(float* logits, const uint32_t* allowed, int words) const {
  if (allowed) {  // a word at a time: most words of a mask are all ones or all zeros
    for (int w = 0; w * 32 < vocab_size_; ++w) {
      const uint32_t bits = w < words ? allowed[w] : 0u;
      if (bits == ~0u) continue;
      for (int t = w * 32; t < std::min(vocab_size_, w * 32 + 32); ++t) {
        if (!((bits >> (t % 32)) & 1u)) logits[t] = -INFINITY;
      }
    }
  }
  for (const auto& [t, bias] : options_.logit_bias) logits[t] += bias;
  for (const auto& [t, count] : generated_counts_) {
    logits[t] -= options_.presence_penalty + options_.frequency_penalty * count;
  }
  const float penalty = options_.repetition_penalty;
  for (int t : seen_list_) logits[t] = logits[t] > 0 ? logits[t] / penalty : logits[t] * penalty;
}

namespace {

// Higher logit first; equal logits in token order, so that top-k and top-p keep the same tokens
// whatever order they arrive in.
bool by_logit(const std::pair<float, int>& a, const std::pair<float, int>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// How many of the most probable of c[0, n) (probabilities) reach probability mass top_p. Only the
// prefix it needs is ordered: blocks of doubling size are selected (nth_element) and sorted, so a
// peaked distribution costs a few hundred comparisons, not a sort of the whole vocabulary.
size_t nucleus(std::pair<float, int>* c, size_t n, float top_p) {
  double mass = 0.0;
  for (size_t done = 0, block = 64; done < n; done += block, block *= 2) {
    const size_t end = std::min(n, done + block);
    if (end < n) std::nth_element(c + done, c + end - 1, c + n, by_logit);
    std::sort(c + done, c + end, by_logit);
    for (size_t i = done; i < end; ++i) {
      mass += c[i].first;
      if (mass >= top_p) return i + 1;
    }
  }
  return n;
}

}  // namespace

double Sampler::distribution(const float* logits) {
  // Tokens a mask or a bias ruled out (-inf) never enter; if nothing is left, all do.
  candidates_.clear();
  const float inv_t = 1.0f / options_.temperature;
  for (int i = 0; i < vocab_size_; ++i) {
    if (logits[i] > -INFINITY) candidates_.push_back({logits[i] * inv_t, i});
  }
  if (candidates_.empty()) {
    for (int i = 0; i < vocab_size_; ++i) candidates_.push_back({0.0f, i});
  }
  size_t n = candidates_.size();
  if (options_.top_k > 0 && (size_t)options_.top_k < n) {
    n = options_.top_k;
    std::nth_element(candidates_.begin(), candidates_.begin() + n - 1, candidates_.end(), by_logit);
  }
  // Softmax over the survivors (unordered: the draw does not need an order) by the vectorized
  // kernel, then, for top-p, the smallest set of the most probable ones whose mass reaches top_p.
  probs_.resize(n);
  for (size_t i = 0; i < n; ++i) probs_[i] = candidates_[i].first;
  kernels::active().softmax(probs_.data(), 1, (long)n);
  for (size_t i = 0; i < n; ++i) candidates_[i].first = probs_[i];
  if (options_.top_p < 1.0f) n = nucleus(candidates_.data(), n, options_.top_p);
  candidates_.resize(n);
  double total = 0.0;
  for (const auto& [weight, token] : candidates_) total += weight;
  return total;
}

int Sampler::draw(double total) {
  std::uniform_real_distribution<double> uniform(0.0, total);
  double u = uniform(rng_);
  int last = -1;
  for (const auto& [weight, token] : candidates_) {
    if (weight <= 0.0f) continue;
    last = token;
    u -= weight;
    if (u <= 0.0) return token;
  }
  return last;
}

int Sampler::pick(const float* logits, float* probs) {
  if (options_.temperature <= 0.0f) {
    return (int)kernels::active().argmax(logits, vocab_size_);
  }
  const double total = distribution(logits);
  const int token = draw(total);
  if (probs) {
    std::fill(probs, probs + vocab_size_, 0.0f);
    for (const auto& [weight, t] : candidates_) probs[t] = (float)(weight / total);
  }
  return token;
}

int Sampler::sample(float* logits, const uint32_t* allowed, int words) {
  adjust(logits, allowed, words);
  return pick(logits, nullptr);
}

int Sampler::draft(float* logits, float* probs) {
  adjust(logits, nullptr, 0);
  return pick(logits, probs);
}

int Sampler::verify(float* logits, int draft, const float* draft_probs, bool* accepted) {
  adjust(logits, nullptr, 0);
  if (options_.temperature <= 0.0f) {
    const int token = (int)kernels::active().argmax(logits, vocab_size_);
    *accepted = token == draft;
    return token;
  }
  // q(t): the draft's distribution; a certain draft is all its mass on one token.
  auto q = [&](int t) { return draft_probs ? (double)draft_probs[t] : t == draft ? 1.0 : 0.0; };
  const double total = distribution(logits);
  double p_draft = 0.0;
  for (const auto& [weight, token] : candidates_) {
    if (token == draft) p_draft = weight / total;
  }
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const double q_draft = q(draft);
  *accepted = true;
  if (q_draft > 0.0 && uniform(rng_) * q_draft < p_draft) return draft;
  // Rejected: a draw from the residual max(0, p - q). It is empty only when p == q (up to
  // rounding), where rejection has probability 0: the draft stands.
  double residual = 0.0;
  for (auto& [weight, token] : candidates_) {
    weight = (float)std::max(0.0, weight / total - q(token));
    residual += weight;
  }
  if (residual <= 0.0) return draft;
  *accepted = false;
  return draw(residual);
}

}  // namespace pyxf
