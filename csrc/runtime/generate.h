// The token loop: prefill all prompts together, then decode every unfinished sequence in one
// batch per step. Runs without Python; `on_token` is the only way out (streaming, stop strings,
// interrupts).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/transformer.h"
#include "runtime/sampler.h"

namespace pyxf {

struct GenerateOptions {
  int max_new_tokens = 128;
  SamplingOptions sampling;
  uint64_t seed = 0;
  std::vector<int> stop_ids;
  int context_length = 0;  // KV cache capacity per sequence
};

// Called after each sampled token; returns true to finish that sequence.
using TokenCallback = std::function<bool(int seq, int token)>;

// New tokens of each prompt, stop token excluded.
std::vector<std::vector<int>> generate(const Transformer& model,
                                       const std::vector<std::vector<int32_t>>& prompts,
                                       const GenerateOptions& options,
                                       const TokenCallback& on_token);

}  // namespace pyxf
