#include "runtime/generate.h"

#include <algorithm>
#include <memory>

#include "runtime/profile.h"

namespace pyxf {

namespace {

struct Sequence {
  std::unique_ptr<KVCache> cache;
  Sampler sampler;
  std::vector<int> output;
  int32_t next = 0;
  bool done = false;
};

}  // namespace

std::vector<std::vector<int>> generate(const Transformer& model,
                                       const std::vector<std::vector<int32_t>>& prompts,
                                       const GenerateOptions& options,
                                       const TokenCallback& on_token) {
  const ModelConfig& c = model.config();
  std::vector<Sequence> seqs;
  seqs.reserve(prompts.size());
  for (const auto& prompt : prompts) {
    // Each cache holds exactly what this sequence can reach.
    const int capacity = std::min<long>(options.context_length,
                                        (long)prompt.size() + options.max_new_tokens);
    seqs.push_back({std::make_unique<KVCache>(c.num_layers, c.num_kv_heads, c.head_dim, capacity),
                    Sampler(options.sampling, options.seed, c.vocab_size), {}, 0, false});
    for (int32_t t : prompt) seqs.back().sampler.observe(t);
  }

  Workspace ws;
  std::vector<SeqBatch> batch;
  std::vector<int> batch_index;
  std::vector<float> logits;
  for (size_t i = 0; i < seqs.size(); ++i) {
    batch.push_back({seqs[i].cache.get(), prompts[i].data(), (int)prompts[i].size(), false});
    batch_index.push_back((int)i);
  }

  while (!batch.empty()) {
    logits.resize((size_t)batch.size() * c.vocab_size);
    model.forward(batch.data(), (int)batch.size(), ws, logits.data());

    for (size_t b = 0; b < batch.size(); ++b) {
      Sequence& s = seqs[batch_index[b]];
      int token;
      {
        StageTimer timer(Stage::kSample);
        token = s.sampler.sample(&logits[b * c.vocab_size]);
      }
      const bool is_stop =
          std::find(options.stop_ids.begin(), options.stop_ids.end(), token) != options.stop_ids.end();
      if (!is_stop) {
        s.output.push_back(token);
        s.sampler.observe(token);
        s.next = token;
      }
      const bool stop_requested = !is_stop && on_token && on_token(batch_index[b], token);
      s.done = is_stop || stop_requested || (int)s.output.size() >= options.max_new_tokens ||
               s.cache->length() >= s.cache->capacity();
    }

    std::vector<SeqBatch> next_batch;
    std::vector<int> next_index;
    for (int i : batch_index) {
      if (seqs[i].done) continue;
      next_batch.push_back({seqs[i].cache.get(), &seqs[i].next, 1, false});
      next_index.push_back(i);
    }
    batch.swap(next_batch);
    batch_index.swap(next_index);
  }

  std::vector<std::vector<int>> out;
  out.reserve(seqs.size());
  for (auto& s : seqs) out.push_back(std::move(s.output));
  return out;
}

}  // namespace pyxf
