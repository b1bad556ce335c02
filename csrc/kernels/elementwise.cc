// Row-wise kernels: norms, activations, softmax, rotary embeddings.
#include "kernels/kernels.h"
#include "kernels/simd.h"

namespace pyxf::kernels::PYXF_TARGET_NS {
namespace {

constexpr long kParallelFloats = 1L << 15;  // below this much work a single thread is faster

float sum_squares(const float* x, long n) {
  Vf acc = vzero();
  long i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vf v = vload(x + i);
    acc = vfma(v, v, acc);
  }
  if (i < n) {
    const Vf v = vload_n(x + i, (int)(n - i));
    acc = vfma(v, v, acc);
  }
  return vsum(acc);
}

float sum(const float* x, long n) {
  Vf acc = vzero();
  long i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vadd(acc, vload(x + i));
  if (i < n) acc = vadd(acc, vload_n(x + i, (int)(n - i)));
  return vsum(acc);
}

// y = (x - shift) * scale * w + b, with w and b optional.
void scale_row(const float* x, float shift, float scale, const float* w, const float* b, long n,
               float* y) {
  const Vf vs = vset1(scale), vm = vset1(shift);
  long i = 0;
  for (; i < n; i += kLanes) {
    const int m = (int)lmin(kLanes, n - i);
    Vf v = vmul(vsub(m == kLanes ? vload(x + i) : vload_n(x + i, m), vm), vs);
    if (w) v = vmul(v, m == kLanes ? vload(w + i) : vload_n(w + i, m));
    if (b) v = vadd(v, m == kLanes ? vload(b + i) : vload_n(b + i, m));
    if (m == kLanes) vstore(y + i, v); else vstore_n(y + i, v, m);
  }
}

Vf activate(Vf x, Activation act) {
  switch (act) {
    case Activation::kSilu:
      return vdiv(x, vadd(vset1(1.0f), vexp(vsub(vzero(), x))));
    case Activation::kGelu:
      return vmul(vmul(vset1(0.5f), x), vadd(vset1(1.0f), verf(vmul(x, vset1(0.70710678118654752f)))));
    case Activation::kGeluTanh: {
      const Vf inner = vmul(vset1(0.79788456080286536f),
                            vfma(vmul(vset1(0.044715f), vmul(x, x)), x, x));
      return vmul(vmul(vset1(0.5f), x), vadd(vset1(1.0f), vtanh(inner)));
    }
    case Activation::kRelu:
    default:
      return vmax(x, vzero());
  }
}

}  // namespace

void rmsnorm(const float* x, const float* w, float eps, long rows, long n, float* y) {
  for_each_index(rows, rows * n > kParallelFloats, [&](long r) {
    const float* xr = x + r * n;
    const float scale = 1.0f / sqrtf(sum_squares(xr, n) / (float)n + eps);
    scale_row(xr, 0.0f, scale, w, nullptr, n, y + r * n);
  });
}

void layernorm(const float* x, const float* w, const float* b, float eps, long rows, long n,
               float* y) {
  for_each_index(rows, rows * n > kParallelFloats, [&](long r) {
    const float* xr = x + r * n;
    const float mean = sum(xr, n) / (float)n;
    // Two passes: the variance of x - mean does not cancel catastrophically.
    const Vf vm = vset1(mean);
    Vf acc = vzero();
    long i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const Vf d = vsub(vload(xr + i), vm);
      acc = vfma(d, d, acc);
    }
    float var = vsum(acc);
    for (; i < n; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    scale_row(xr, mean, 1.0f / sqrtf(var / (float)n + eps), w, b, n, y + r * n);
  });
}

void add(float* y, const float* x, long n) {
  for_each_index((n + kLanes - 1) / kLanes, n > kParallelFloats, [&](long b) {
    const long i = b * kLanes;
    const int m = (int)lmin(kLanes, n - i);
    if (m == kLanes) vstore(y + i, vadd(vload(y + i), vload(x + i)));
    else vstore_n(y + i, vadd(vload_n(y + i, m), vload_n(x + i, m)), m);
  });
}

void activation(float* x, long n, Activation act) {
  for_each_index((n + kLanes - 1) / kLanes, n > kParallelFloats, [&](long b) {
    const long i = b * kLanes;
    const int m = (int)lmin(kLanes, n - i);
    if (m == kLanes) vstore(x + i, activate(vload(x + i), act));
    else vstore_n(x + i, activate(vload_n(x + i, m), act), m);
  });
}

void softcap(float* x, long n, float cap) {
  const Vf vcap = vset1(cap), inv = vset1(1.0f / cap);
  for_each_index((n + kLanes - 1) / kLanes, n > kParallelFloats, [&](long b) {
    const long i = b * kLanes;
    const int m = (int)lmin(kLanes, n - i);
    const Vf v = m == kLanes ? vload(x + i) : vload_n(x + i, m);
    const Vf capped = vsoftcap(v, vcap, inv);
    if (m == kLanes) vstore(x + i, capped); else vstore_n(x + i, capped, m);
  });
}

void gated_activation_row(const float* gate, const float* up, long n, Activation act, float* out) {
  for (long i = 0; i < n; i += kLanes) {
    const int m = (int)lmin(kLanes, n - i);
    if (m == kLanes) {
      vstore(out + i, vmul(activate(vload(gate + i), act), vload(up + i)));
    } else {
      vstore_n(out + i, vmul(activate(vload_n(gate + i, m), act), vload_n(up + i, m)), m);
    }
  }
}

void gated_activation(const float* gu, long rows, long n, Activation act, float* out) {
  for_each_index(rows, rows * n > kParallelFloats,
                 [&](long r) { gated_activation_row(gu + r * 2 * n, gu + r * 2 * n + n, n, act, out + r * n); });
}

void softmax(float* x, long rows, long n) {  // one row stays on the calling thread (the sampler's)
  for_each_index(rows, rows > 1 && rows * n > kParallelFloats, [&](long r) {
    float* xr = x + r * n;
    Vf vmx = vset1(-INFINITY);
    long i = 0;
    for (; i + kLanes <= n; i += kLanes) vmx = vmax(vmx, vload(xr + i));
    float mx = vmaxr(vmx);
    for (; i < n; ++i) mx = xr[i] > mx ? xr[i] : mx;
    const Vf vm = vset1(mx);
    Vf acc = vzero();
    for (i = 0; i + kLanes <= n; i += kLanes) {
      const Vf e = vexp(vsub(vload(xr + i), vm));
      vstore(xr + i, e);
      acc = vadd(acc, e);
    }
    float total = vsum(acc);
    if (i < n) {
      const int m = (int)(n - i);
      const Vf e = vexp(vsub(vload_n(xr + i, m), vm));
      vstore_n(xr + i, e, m);
      alignas(64) float tail[kLanes];
      vstore(tail, e);
      for (int j = 0; j < m; ++j) total += tail[j];
    }
    const float inv = 1.0f / total;
    scale_row(xr, 0.0f, inv, nullptr, nullptr, n, xr);
  });
}

// max(x) and log(sum(exp(x - max))); max is -inf when every entry is.
void max_and_log_sum(const float* x, long n, float* max_out, float* log_sum_out) {
  Vf vmx = vset1(-INFINITY);
  long i = 0;
  for (; i + kLanes <= n; i += kLanes) vmx = vmax(vmx, vload(x + i));
  float mx = vmaxr(vmx);
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  *max_out = mx;
  *log_sum_out = 0.0f;
  if (!(mx > -INFINITY)) return;
  // Float lanes, added up in double per 1024 entries: a long row (a vocabulary) loses no more
  // than a float sum of one chunk.
  const Vf vm = vset1(mx);
  double total = 0.0;
  for (i = 0; i + kLanes <= n;) {
    Vf acc = vzero();
    const long end = lmin(n / kLanes * kLanes, i + 1024);
    for (; i < end; i += kLanes) acc = vadd(acc, vexp(vsub(vload(x + i), vm)));
    total += vsum(acc);
  }
  for (; i < n; ++i) total += expf(x[i] - mx);
  *log_sum_out = logf((float)total);
}

// The largest of the kGroup values at p (4 vectors): scans that look for rare values (the
// maximum, a top-k candidate) skip whole groups by it.
constexpr long kGroup = 4 * kLanes;
static inline float group_max(const float* p) {
  return vmaxr(vmax(vmax(vload(p), vload(p + kLanes)), vmax(vload(p + 2 * kLanes), vload(p + 3 * kLanes))));
}

long argmax(const float* x, long n) {
  if (n <= 0) return -1;
  float mx;
  {
    Vf vmx = vset1(-INFINITY);
    long i = 0;
    for (; i + kLanes <= n; i += kLanes) vmx = vmax(vmx, vload(x + i));
    mx = vmaxr(vmx);
    for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  }
  // The first position that holds it: whole groups are passed over by their maximum.
  long i = 0;
  for (; i + kGroup <= n; i += kGroup) {
    if (group_max(x + i) == mx) break;
  }
  for (; i < n; ++i) {
    if (x[i] == mx) return i;
  }
  return 0;  // no comparable value (NaNs only)
}

// Inserts (score, index) into the k best so far (scores[0..*count), best first), after its equals.
static void insert_best(float score, int32_t index, int k, float* scores, int32_t* indices, int* count) {
  int at = *count < k ? *count : k - 1;
  while (at > 0 && scores[at - 1] < score) {
    if (at < k) scores[at] = scores[at - 1], indices[at] = indices[at - 1];
    --at;
  }
  scores[at] = score;
  indices[at] = index;
  if (*count < k) ++*count;
}

int top_k(const float* x, long n, float offset, int k, float* scores, int32_t* indices) {
  int count = 0;
  const auto consider = [&](long t) {
    const float s = x[t] + offset;
    if (count < k || s > scores[k - 1]) insert_best(s, (int32_t)t, k, scores, indices, &count);
  };
  // Groups are passed over by their maximum once k candidates are held (after the first few
  // hundred entries of a long row almost none gets in); rounding is monotonic, so the group's
  // largest sum is its largest value + offset.
  long i = 0;
  for (; i + kGroup <= n; i += kGroup) {
    if (count == k && !(group_max(x + i) + offset > scores[k - 1])) continue;
    for (long t = i; t < i + kGroup; ++t) consider(t);
  }
  for (; i < n; ++i) consider(i);
  return count;
}

float logsumexp(const float* x, long n) {
  float mx, log_sum;
  max_and_log_sum(x, n, &mx, &log_sum);
  return mx + log_sum;
}

void log_softmax(float* x, long n) {
  float mx, log_sum;
  max_and_log_sum(x, n, &mx, &log_sum);
  if (!(mx > -INFINITY)) return;  // nothing possible: the row stays at -inf
  // (x - max) - log(sum), in torch's order of operations.
  const Vf vm = vset1(mx), vl = vset1(log_sum);
  long i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(x + i, vsub(vsub(vload(x + i), vm), vl));
  for (; i < n; ++i) x[i] = (x[i] - mx) - log_sum;
}

void rope_table(const int32_t* pos, long rows, const float* inv_freq, int half, float scaling, float* cs) {
  for_each_index(rows, rows * half > kParallelFloats / 8, [&](long r) {
    float* c = cs + r * 2 * half;
    for (int i = 0; i < half; ++i) {
      const float angle = (float)pos[r] * inv_freq[i];  // a float product, as in torch
      c[i] = (float)cos((double)angle) * scaling;
      c[half + i] = (float)sin((double)angle) * scaling;
    }
  });
}

void rope(float* x, long rows, long row_stride, int n_heads, int head_dim, int rot_dim, const float* table,
          bool interleaved) {
  const int half = rot_dim / 2;
  for_each_index(rows, rows * n_heads * head_dim > kParallelFloats, [&](long r) {
    const float* cs = table + r * 2 * half;
    const float* sn = cs + half;
    float* row = x + r * row_stride;
    for (int h = 0; h < n_heads; ++h) {
      float* v = row + (long)h * head_dim;
      if (interleaved) {
        for (int i = 0; i < half; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * cs[i] - b * sn[i];
          v[2 * i + 1] = b * cs[i] + a * sn[i];
        }
      } else {
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cs[i] - b * sn[i];
          v[i + half] = b * cs[i] + a * sn[i];
        }
      }
    }
  });
}

void linear(const float* x, long M, long K, const void* w, WeightType wt, long N, const float* bias,
            float* y, bool accumulate, const void* panels);
void linear_gated(const float* x, long M, long K, const void* w, WeightType wt, long I, Activation act,
                  float* y, const void* panels);
void load_row(const void* w, WeightType wt, long row, long n, float* out);
void attention(const AttentionSeq* seqs, int n_seqs, const AttentionShape& shape);
void store_kv_slots(const KVSlotWrite* writes, long n, int head_dim);
void prefetch_kv_slots(const KVSlotWrite* writes, long n, int head_dim);
void linear_quant(const float* x, long M, const QuantWeight& w, const float* bias, float* y,
                  bool accumulate);
void linear_quant_gated(const float* x, long M, const QuantWeight& w, Activation act, float* y);
void linear_quant_segments(const float* x, long M, const QuantWeight* w, int n, const float* bias, float* y,
                           bool accumulate);
void dequantize_row(const QuantWeight& w, long row, float* out);
long gemm_panel_bytes(const QuantWeight& w);
PanelLayout pack_gemm_panels(const QuantWeight& w, uint8_t* out);
long decode_panel_bytes(const QuantWeight& w);
PanelLayout pack_decode_panels(const QuantWeight& w, uint8_t* out);

void fill_table(KernelTable* t) {
#if defined(PYXF_TARGET_avx512)
  t->name = "avx512";
#elif defined(PYXF_TARGET_avx2)
  t->name = "avx2";
#else
  t->name = "generic";
#endif
  t->linear = linear;
  t->linear_gated = linear_gated;
  t->dense_panel_bytes = nullptr;  // packed per call (the avx512_bf16 table packs bf16 once)
  t->pack_dense_panels = nullptr;
  t->load_row = load_row;
  t->rmsnorm = rmsnorm;
  t->layernorm = layernorm;
  t->add = add;
  t->activation = activation;
  t->softcap = softcap;
  t->gated_activation = gated_activation;
  t->softmax = softmax;
  t->log_softmax = log_softmax;
  t->logsumexp = logsumexp;
  t->argmax = argmax;
  t->top_k = top_k;
  t->rope_table = rope_table;
  t->rope = rope;
  t->attention = attention;
  t->store_kv_slots = store_kv_slots;
  t->prefetch_kv_slots = prefetch_kv_slots;
  t->linear_quant = linear_quant;
  t->linear_quant_segments = linear_quant_segments;
#if defined(PYXF_TARGET_avx512)
  t->linear_quant_gated = linear_quant_gated;
  t->gemm_panel_bytes = gemm_panel_bytes;
  t->pack_gemm_panels = pack_gemm_panels;
  t->decode_panel_bytes = decode_panel_bytes;
  t->pack_decode_panels = pack_decode_panels;
#else
  t->linear_quant_gated = nullptr;
  t->gemm_panel_bytes = nullptr;
  t->pack_gemm_panels = nullptr;
  t->decode_panel_bytes = nullptr;
  t->pack_decode_panels = nullptr;
#endif
  t->dequantize_row = dequantize_row;
}

}  // namespace pyxf::kernels::PYXF_TARGET_NS
