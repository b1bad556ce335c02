#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>

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
  if (allowed) {
    for (int t = 0; t < vocab_size_; ++t) {
      const bool ok = t / 32 < words && (allowed[t / 32] >> (t % 32)) & 1u;
      if (!ok) logits[t] = -INFINITY;
    }
  }
  for (const auto& [t, bias] : options_.logit_bias) logits[t] += bias;
  for (const auto& [t, count] : generated_counts_) {
    logits[t] -= options_.presence_penalty + options_.frequency_penalty * count;
  }
  const float penalty = options_.repetition_penalty;
  for (int t : seen_list_) logits[t] = logits[t] > 0 ? logits[t] / penalty : logits[t] * penalty;
}

double Sampler::distribution(const float* logits) {
  candidates_.resize(vocab_size_);
  const float inv_t = 1.0f / options_.temperature;
  for (int i = 0; i < vocab_size_; ++i) candidates_[i] = {logits[i] * inv_t, i};
  auto by_logit = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t n = candidates_.size();
  if (options_.top_k > 0 && (size_t)options_.top_k < n) {
    n = options_.top_k;
    std::nth_element(candidates_.begin(), candidates_.begin() + n - 1, candidates_.end(), by_logit);
  }
  std::sort(candidates_.begin(), candidates_.begin() + n, by_logit);

  // Softmax over the survivors, then keep the smallest prefix whose mass reaches top_p.
  const float max_logit = candidates_[0].first;
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    candidates_[i].first = std::exp(candidates_[i].first - max_logit);
    total += candidates_[i].first;
  }
  if (options_.top_p < 1.0f) {
    double mass = 0.0;
    size_t keep = 0;
    while (keep < n) {
      mass += candidates_[keep].first / total;
      ++keep;
      if (mass >= options_.top_p) break;
    }
    n = keep;
    total = 0.0;
    for (size_t i = 0; i < n; ++i) total += candidates_[i].first;
  }
  candidates_.resize(n);
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
    return (int)(std::max_element(logits, logits + vocab_size_) - logits);
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
    const int token = (int)(std::max_element(logits, logits + vocab_size_) - logits);
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
