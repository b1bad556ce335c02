#include "model/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "model/transformer.h"
#include "runtime/profile.h"

namespace pyxf {

namespace k = kernels;

void ExpertScratch::reserve(const ModelConfig& c, long rows) {
  auto grow = [](auto& v, size_t n) { if (v.size() < n) v.resize(n); };
  const long E = c.num_experts, K = c.experts_per_token, H = c.hidden_size;
  const long width = std::max(c.intermediate_size, c.shared_expert_size);
  grow(probs, rows * E);
  grow(expert, rows * K);
  grow(weight, rows * K);
  grow(start, E + 1);
  grow(assigned, rows * K);
  grow(in, rows * H);
  grow(out, rows * H);
  grow(ffn, rows * 2 * width);
  grow(act, rows * width);
}

namespace {

// The k largest of one row's n probabilities, best first; equal probabilities in index order.
// Their weights are renormalized to sum to 1 when `normalize`.
void top_k(const float* p, int n, int count, bool normalize, int32_t* expert, float* weight) {
  thread_local std::vector<int32_t> order;
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  // NaN ranks last, so that the order stays strict and weak whatever the weights hold.
  auto rank = [p](int32_t i) { return std::isnan(p[i]) ? -INFINITY : p[i]; };
  std::partial_sort(order.begin(), order.begin() + count, order.end(), [&rank](int32_t a, int32_t b) {
    return rank(a) > rank(b) || (rank(a) == rank(b) && a < b);
  });
  float sum = 0.0f;
  for (int j = 0; j < count; ++j) {
    expert[j] = order[j];
    weight[j] = p[order[j]];
    sum += weight[j];
  }
  if (normalize) {
    for (int j = 0; j < count; ++j) weight[j] /= sum;
  }
}

// Chooses every row's experts and groups the (row, slot) assignments by expert (counting sort).
void route(const ModelConfig& c, const ExpertWeights& w, const float* in, long rows, ExpertScratch& s) {
  const k::KernelTable& K = k::active();
  const int E = c.num_experts, top = c.experts_per_token;
  K.linear(in, rows, c.hidden_size, w.router, k::WeightType::kF32, E, nullptr, s.probs.data(), false, nullptr);
  K.softmax(s.probs.data(), rows, E);
  for (long r = 0; r < rows; ++r) {
    top_k(&s.probs[r * E], E, top, c.norm_topk_prob, &s.expert[r * top], &s.weight[r * top]);
  }
  std::fill(s.start.begin(), s.start.begin() + E + 1, 0);
  for (long a = 0; a < rows * top; ++a) ++s.start[s.expert[a] + 1];
  for (int e = 0; e < E; ++e) s.start[e + 1] += s.start[e];
  thread_local std::vector<int32_t> next;
  next.assign(s.start.begin(), s.start.begin() + E);
  for (long a = 0; a < rows * top; ++a) s.assigned[next[s.expert[a]]++] = (int32_t)a;
}

// x += sigmoid(in . gate) * shared_expert(in), row by row (Qwen2-MoE).
void shared_expert(const ModelConfig& c, const ExpertWeights& w, const float* in, long rows, ExpertScratch& s,
                   float* x) {
  const k::KernelTable& K = k::active();
  const long H = c.hidden_size;
  gated_ffn(w.shared_gate_up, w.shared_down, in, rows, H, c.shared_expert_size, c.activation, s.ffn.data(),
            s.act.data(), s.out.data(), false);
  thread_local std::vector<float> gate;
  gate.resize(rows);
  K.linear(in, rows, H, w.shared_gate, k::WeightType::kF32, 1, nullptr, gate.data(), false, nullptr);
  for (long r = 0; r < rows; ++r) {
    const float g = 1.0f / (1.0f + std::exp(-gate[r]));
    float* xr = x + r * H;
    const float* yr = &s.out[r * H];
    for (long d = 0; d < H; ++d) xr[d] += g * yr[d];
  }
}

}  // namespace

void expert_ffn(const ModelConfig& c, const ExpertWeights& w, const float* in, long rows, ExpertScratch& s,
                float* x) {
  const long H = c.hidden_size, top = c.experts_per_token;
  s.reserve(c, rows);
  {
    StageTimer timer(Stage::kFfnUp);  // the router is the FFN's first projection
    route(c, w, in, rows, s);
  }
  for (int e = 0; e < c.num_experts; ++e) {
    const int32_t* group = &s.assigned[s.start[e]];
    const long n = s.start[e + 1] - s.start[e];
    if (n == 0) continue;
    // The expert's rows, gathered into one matrix: one GEMM per expert and step.
    for (long i = 0; i < n; ++i) std::memcpy(&s.in[i * H], in + (group[i] / top) * H, H * sizeof(float));
    gated_ffn(w.gate_up[e], w.down[e], s.in.data(), n, H, c.intermediate_size, c.activation, s.ffn.data(),
              s.act.data(), s.out.data(), false);
    for (long i = 0; i < n; ++i) {
      const float weight = s.weight[group[i]];
      float* xr = x + (group[i] / top) * H;
      const float* yr = &s.out[i * H];
      for (long d = 0; d < H; ++d) xr[d] += weight * yr[d];
    }
  }
  if (c.shared_expert_size > 0) shared_expert(c, w, in, rows, s, x);
}

}  // namespace pyxf
