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

int Sampler::sample(float* logits) {
  for (const auto& [t, bias] : options_.logit_bias) logits[t] += bias;
  for (const auto& [t, count] : generated_counts_) {
    logits[t] -= options_.presence_penalty + options_.frequency_penalty * count;
  }
  const float penalty = options_.repetition_penalty;
  for (int t : seen_list_) logits[t] = logits[t] > 0 ? logits[t] / penalty : logits[t] * penalty;

  if (options_.temperature <= 0.0f) {
    return (int)(std::max_element(logits, logits + vocab_size_) - logits);
  }

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
  std::uniform_real_distribution<double> uniform(0.0, total);
  double u = uniform(rng_);
  for (size_t i = 0; i < n; ++i) {
    u -= candidates_[i].first;
    if (u <= 0.0) return candidates_[i].second;
  }
  return candidates_[n - 1].second;
}

}  // namespace pyxf
