// Picks the next token from a row of logits: repetition penalty, temperature, top-k, top-p,
// in that order (as Hugging Face applies them); temperature 0 is greedy.
#pragma once
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace pyxf {

struct SamplingOptions {
  float temperature = 0.0f;
  int top_k = 0;          // 0: no limit
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
};

class Sampler {
 public:
  Sampler(const SamplingOptions& options, uint64_t seed, int vocab_size);
  // Remembers a token for the repetition penalty (prompt and generated tokens).
  void observe(int token);
  // Modifies `logits` in place.
  int sample(float* logits);

 private:
  SamplingOptions options_;
  int vocab_size_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> seen_;
  std::vector<int> seen_list_;
  std::vector<std::pair<float, int>> candidates_;
};

}  // namespace pyxf
