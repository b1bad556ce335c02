// Which named tensors each model reads (docs/DESIGN.md's tensor tables; pyxf/spec declares the
// same and tests/test_spec.py checks that the two agree for every family).
#pragma once
#include <string>
#include <vector>

#include "model/config.h"
#include "model/seq2seq.h"
#include "model/tensors.h"
#include "model/weights.h"

namespace pyxf {

// One transformer stack: names under `prefix` ("encoder." for an encoder-decoder's encoder), its
// token embedding named `embed_name` (an encoder-decoder's shared embeddings are the decoder's).
ModelWeights bind_stack(const ModelConfig& c, WeightBinder& w, const std::string& prefix = "",
                        const std::string& embed_name = "embed.weight");

// The decoder's cross-attention sub-blocks of an encoder-decoder model.
std::vector<CrossAttentionWeights> bind_cross_attention(const ModelConfig& decoder, WeightBinder& w);

}  // namespace pyxf
