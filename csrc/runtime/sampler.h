// Picks the next token from a row of logits: the allowed-token mask, logit bias, presence and
// frequency penalties (OpenAI's,
// over generated tokens), repetition penalty (Hugging Face's, over prompt and generated tokens),
// temperature, top-k, top-p, in that order; temperature 0 is greedy.
#pragma once
#include <cstdint>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pyxf {

struct SamplingOptions {
  float temperature = 0.0f;
  int top_k = 0;          // 0: no limit
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;    // subtracted once from every token generated so far
  float frequency_penalty = 0.0f;   // subtracted per occurrence in the generated tokens
  std::vector<std::pair<int, float>> logit_bias;  // (token, bias) added to the logits
};

class Sampler {
 public:
  Sampler(const SamplingOptions& options, uint64_t seed, int vocab_size);
  // Remembers a token for the repetition penalty (prompt and generated tokens).
  void observe(int token);
  // Remembers a generated token (presence and frequency penalties; implies observe).
  void observe_generated(int token);
  // Modifies `logits` in place. `allowed` (optional, structured output): a bitmask of `words` 32-bit
  // words, bit t % 32 of word t / 32 set where token t may come next; every other token is excluded
  // before anything else applies.
  int sample(float* logits, const uint32_t* allowed = nullptr, int words = 0);
  // Speculative decoding, the drafter's side: a token drawn from a draft model's logits as
  // sample() would draw it (without a mask), modifying them in place. When `probs` is given
  // (vocab_size floats) and sampling is on, it receives the distribution the token came from, which
  // verify() needs.
  int draft(float* logits, float* probs);
  // Speculative decoding, the target's side: the token at a position where `draft` was proposed.
  // *accepted says whether it is the draft; either way the token is distributed as sample() would
  // draw it (greedy: the argmax; sampling: speculative sampling's rule: accept with probability
  // min(1, p(draft) / q(draft)), else draw from max(0, p - q), renormalized). `draft_probs` is q,
  // the distribution the draft was drawn from; nullptr: the draft was certain (prompt lookup).
  int verify(float* logits, int draft, const float* draft_probs, bool* accepted);

 private:
  // Mask, bias and penalties applied to the logits in place.
  void adjust(float* logits, const uint32_t* allowed, int words) const;
  // candidates_ = the tokens that survive temperature, top-k and top-p with their unnormalized
  // probabilities, in no particular order; returns their sum.
  double distribution(const float* logits);
  // A candidate drawn in proportion to its weight (total: the weights' sum); never one of weight 0.
  int draw(double total);
  // The token of adjusted logits: the argmax (greedy) or a draw; `probs` (optional, sampling
  // only) receives the distribution drawn from.
  int pick(const float* logits, float* probs);

  SamplingOptions options_;
  int vocab_size_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> seen_;
  std::vector<int> seen_list_;
  std::unordered_map<int, int> generated_counts_;  // token -> count, kept only for the penalties
  std::vector<std::pair<float, int>> candidates_;
  std::vector<float> probs_;  // the softmax's scratch row
};

}  // namespace pyxf
