// Decoding for encoder-decoder models: greedy or sampled (one hypothesis per source) and beam search,
// batched over sources of different lengths. Every source is encoded once; each step runs the
// decoder once on the newest token of every live hypothesis of every source.
//
// Beam search follows transformers' (v5) algorithm step for step, so that the same settings give
// the same hypotheses: log-softmax, logits processors on the log-probabilities, the best
// max(2, 1 + #eos) * beam_size continuations over all beams of a source, finished hypotheses scored
// sum_logprob / generated_length ** length_penalty, and its early-stop heuristic.
//
// KV caches: every source owns beam_size physical caches ("slots"); a hypothesis holds an index to
// one. When the beams are reordered, the first child of a beam inherits its parent's slot (no copy)
// and any further child takes the slot of a beam that left no child, copying the parent's prefix
// into it. So caches are copied only when beams diverge (a beam with k children costs k - 1
// copies), never shuffled, and no cache memory is allocated after the start.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/seq2seq.h"
#include "runtime/sampler.h"

namespace pyxf {

enum class EarlyStopping : int { kHeuristic = 0, kTrue = 1, kNever = 2 };  // transformers' False / True / "never"

struct Seq2SeqOptions {
  int beam_size = 1;             // 1: greedy or sampling (sampling options), else beam search
  int num_hypotheses = 1;        // returned per source, best first (<= beam_size)
  float length_penalty = 1.0f;
  EarlyStopping early_stopping = EarlyStopping::kHeuristic;
  int no_repeat_ngram_size = 0;  // 0: off; n-grams include the decoder start token, as transformers'
  int max_length = 256;          // generated tokens per hypothesis, the end token included
  int min_length = 0;            // end tokens are blocked before this many tokens were generated
  SamplingOptions sampling;      // beam_size 1 only; temperature 0 is greedy
  uint64_t seed = 0;
  std::vector<int> eos_ids;      // end a hypothesis; not returned
  std::vector<int> suppress_ids; // never generated (Marian's pad)
  int forced_bos_id = -1;        // >= 0: forced as the first token (a target language: mBART-50, M2M100, NLLB)
  int forced_eos_id = -1;        // >= 0: forced as the max_length-th token
  bool renormalize = false;      // beam search: log-softmax again after the processors
  int decoder_start_id = 0;
};

struct Hypothesis {
  std::vector<int> tokens;  // end token excluded
  float score;              // beam: sum of log-probs / length ** length_penalty; else sum of log-probs
};

// Returns true to abandon the generation (checked once per step).
using InterruptCheck = std::function<bool()>;

std::vector<std::vector<Hypothesis>> seq2seq_generate(const Seq2SeqModel& model,
                                                      const std::vector<std::vector<int32_t>>& sources,
                                                      const Seq2SeqOptions& options,
                                                      const InterruptCheck& interrupted);

}  // namespace pyxf
