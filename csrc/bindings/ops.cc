// Test-only entry points: the kernels on numpy arrays (`pyxf._core.ops`), each on the active ISA
// table. Nothing in pyxf's Python package calls them; tests compare them with numpy and torch.
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "kernels/kernels.h"
#include "runtime/kv_cache.h"
#include "runtime/threads.h"

namespace pyxf {

using namespace pybind11::literals;

namespace {

// A quantized weight argument: `w` in `format` ([N, row bytes] blocks, or int8 [N, K] with
// per-row `row_scales`), checked as the model binder checks stored tensors.
struct QuantArg {
  // panels: also give the matrix the active ISA's layout for that use (gemm_panels), as models
  // have it: kBatches as encoders', kDecode as decoders' (ValueError where the table has none).
  QuantArg(const py::array& w, const std::string& format, const py::object& row_scales, long cols,
           QuantPanels panels = QuantPanels::kNone) {
    TensorView view{w.data(), w.dtype().kind() == 'i' ? DType::kI8 : DType::kU8,
                    std::vector<long>(w.shape(), w.shape() + w.ndim())};
    // Not bytes, or not C-contiguous: refused by quant_matrix, which names the layout it needs.
    if (w.itemsize() != 1 || !(w.flags() & py::array::c_style)) view.dtype = DType::kF32;
    TensorView scale_view;
    if (!row_scales.is_none()) {
      scales = row_scales.cast<FloatArray>();
      scale_view = TensorView{scales.data(), DType::kF32, std::vector<long>(scales.shape(), scales.shape() + scales.ndim())};
    }
    q = quant_matrix("w", view, row_scales.is_none() ? nullptr : &scale_view, quant_format(format),
                     w.ndim() == 2 ? w.shape(0) : -1, cols);
    make_quant_panels(q, panels, memory);
    if (panels == QuantPanels::kDecode && !q.gemm_panels) {
      throw py::value_error(std::string("the ") + kernels::active().name + " kernels have no decode layout for " +
                            format);
    }
  }
  FloatArray scales;
  WeightMemory memory{false};
  kernels::QuantWeight q;
};

// A `panels` argument: False (the rows as stored), True or "batches" (encoders' many-rows layout),
// "decode" (decoders' layout).
QuantPanels quant_panels_arg(const py::object& panels) {
  if (py::isinstance<py::bool_>(panels)) return panels.cast<bool>() ? QuantPanels::kBatches : QuantPanels::kNone;
  if (py::isinstance<py::str>(panels)) {
    const std::string name = panels.cast<std::string>();
    if (name == "batches") return QuantPanels::kBatches;
    if (name == "decode") return QuantPanels::kDecode;
  }
  throw py::value_error("panels must be False, True, 'batches' or 'decode'");
}

// Kernels on numpy arrays, for tests: each runs on the active ISA table.
}  // namespace

void bind_ops(py::module_& ops) {
  auto check_2d = [](const FloatArray& a, const char* name) {
    if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D");
  };
  // w: float32, float16, or uint16 holding bfloat16 bits.
  // The weight type of a float weight matrix for x [M, K] (checked: 2-D, C-contiguous, K columns).
  auto float_weight = [=](const FloatArray& x, const py::array& w) {
    check_2d(x, "x");
    if (w.ndim() != 2) throw py::value_error("w must be 2-D");
    if (x.shape(1) != w.shape(1)) throw py::value_error("x and w disagree on the inner dimension");
    if (!(w.flags() & py::array::c_style)) throw py::value_error("w must be C-contiguous");
    if (w.dtype().is(py::dtype::of<float>())) return kernels::WeightType::kF32;
    if (w.dtype().kind() == 'f' && w.itemsize() == 2) return kernels::WeightType::kF16;
    if (w.dtype().is(py::dtype::of<uint16_t>())) return kernels::WeightType::kBF16;
    throw py::type_error("w must be float32, float16 or uint16 (bfloat16 bits)");
  };
  ops.def("team_size", [] {  // a parallel region's size, started as every call into the core starts
    CoreCall call;
    return parallel_team_size();
  });
  // panels: w packed once first (KernelTable::pack_dense_panels), as models pack their matrices at
  // load; ValueError where the active table packs that type per call only.
  auto dense_panels = [](const py::array& w, kernels::WeightType wt, bool wanted, WeightMemory& memory) {
    const void* p = wanted ? make_dense_panels(w.data(), wt, w.shape(0), w.shape(1), memory) : nullptr;
    if (wanted && !p) {
      throw py::value_error(std::string("the ") + kernels::active().name +
                            " kernels pack this weight type per call only");
    }
    return p;
  };
  // w = [gate; up] (2 I rows): act(x gate^T) * (x up^T).
  ops.def("linear_gated", [=](FloatArray x, py::array w, const std::string& activation, bool panels) {
    const kernels::WeightType wt = float_weight(x, w);
    const kernels::Activation act = activation_from_name(activation);
    if (w.shape(0) % 2) throw py::value_error("a gated weight has an even number of rows (gate, then up)");
    WeightMemory memory{false};
    const void* packed = dense_panels(w, wt, panels, memory);
    py::array_t<float> y({x.shape(0), w.shape(0) / 2});
    kernels::active().linear_gated(x.data(), x.shape(0), x.shape(1), w.data(), wt, w.shape(0) / 2, act,
                                   y.mutable_data(), packed);
    return y;
  }, "x"_a, "w"_a, "activation"_a = "silu", "panels"_a = false);
  ops.def("linear", [=](FloatArray x, py::array w, py::object bias, bool panels) {
    const kernels::WeightType wt = float_weight(x, w);
    FloatArray b;
    if (!bias.is_none()) {
      b = bias.cast<FloatArray>();
      if (b.ndim() != 1 || b.shape(0) != w.shape(0)) throw py::value_error("bias must be [N]");
    }
    WeightMemory memory{false};
    const void* packed = dense_panels(w, wt, panels, memory);
    py::array_t<float> y({x.shape(0), w.shape(0)});
    kernels::active().linear(x.data(), x.shape(0), x.shape(1), w.data(), wt, w.shape(0),
                             bias.is_none() ? nullptr : b.data(), y.mutable_data(), false, packed);
    return y;
  }, "x"_a, "w"_a, "bias"_a = py::none(), "panels"_a = false);
  // w: [N, row bytes] uint8 blocks (or int8 [N, K] with row_scales for "int8").
  // repeat: the product computed that many times (kernel timings without the packing and checks).
  ops.def("linear_quant", [=](FloatArray x, py::array w, const std::string& format, py::object row_scales,
                              py::object bias, py::object panels, int repeat) {
    check_2d(x, "x");
    QuantArg arg(w, format, row_scales, x.shape(1), quant_panels_arg(panels));
    const kernels::QuantWeight& q = arg.q;
    FloatArray b;
    if (!bias.is_none()) {
      b = bias.cast<FloatArray>();
      if (b.ndim() != 1 || b.shape(0) != q.rows) throw py::value_error("bias must be [N]");
    }
    py::array_t<float> y({x.shape(0), (ssize_t)q.rows});
    if (repeat < 1) throw py::value_error("repeat must be at least 1");
    CoreCall call;
    for (int i = 0; i < repeat; ++i) {
      kernels::active().linear_quant(x.data(), x.shape(0), q, bias.is_none() ? nullptr : b.data(),
                                     y.mutable_data(), false);
    }
    return y;
  }, "x"_a, "w"_a, "format"_a, "row_scales"_a = py::none(), "bias"_a = py::none(), "panels"_a = py::bool_(false),
     "repeat"_a = 1);
  // w = [gate; up] (2 I rows): act(x gate^T) * (x up^T), fused where the ISA has the kernel.
  ops.def("linear_quant_gated", [=](FloatArray x, py::array w, const std::string& format, py::object row_scales,
                                    const std::string& activation, py::object panels) {
    check_2d(x, "x");
    const kernels::Activation act = activation_from_name(activation);
    QuantArg arg(w, format, row_scales, x.shape(1), quant_panels_arg(panels));
    const kernels::QuantWeight& q = arg.q;
    if (q.rows % 2) throw py::value_error("a gated weight has an even number of rows (gate, then up)");
    const long M = x.shape(0), I = q.rows / 2;
    py::array_t<float> y({M, I});
    const kernels::KernelTable& K = kernels::active();
    if (K.linear_quant_gated && M >= kernels::kQuantGemmRows) {
      K.linear_quant_gated(x.data(), M, q, act, y.mutable_data());
    } else {
      std::vector<float> gu((size_t)M * q.rows);
      K.linear_quant(x.data(), M, q, nullptr, gu.data(), false);
      K.gated_activation(gu.data(), M, I, act, y.mutable_data());
    }
    return y;
  }, "x"_a, "w"_a, "format"_a, "row_scales"_a = py::none(), "activation"_a = "silu", "panels"_a = py::bool_(false));
  ops.def("dequantize", [=](py::array w, const std::string& format, long cols, py::object row_scales) {
    QuantArg arg(w, format, row_scales, cols);
    const kernels::QuantWeight& q = arg.q;
    py::array_t<float> y({(ssize_t)q.rows, (ssize_t)cols});
    for (long r = 0; r < q.rows; ++r) kernels::active().dequantize_row(q, r, y.mutable_data() + r * cols);
    return y;
  }, "w"_a, "format"_a, "cols"_a, "row_scales"_a = py::none());
  ops.def("rmsnorm", [=](FloatArray x, FloatArray w, float eps) {
    check_2d(x, "x");
    if (w.size() != x.shape(1)) throw py::value_error("w must match the row width");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    kernels::active().rmsnorm(x.data(), w.data(), eps, x.shape(0), x.shape(1), y.mutable_data());
    return y;
  });
  ops.def("layernorm", [=](FloatArray x, FloatArray w, FloatArray b, float eps) {
    check_2d(x, "x");
    if (w.size() != x.shape(1) || b.size() != x.shape(1)) throw py::value_error("w, b must match the row width");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    kernels::active().layernorm(x.data(), w.data(), b.data(), eps, x.shape(0), x.shape(1), y.mutable_data());
    return y;
  });
  ops.def("softmax", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    kernels::active().softmax(y.mutable_data(), x.shape(0), x.shape(1));
    return y;
  });
  ops.def("log_softmax", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<float> y({x.shape(0), x.shape(1)});
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    for (long r = 0; r < x.shape(0); ++r) kernels::active().log_softmax(y.mutable_data() + r * x.shape(1), x.shape(1));
    return y;
  });
  ops.def("logsumexp", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<float> y(x.shape(0));
    for (long r = 0; r < x.shape(0); ++r) {
      y.mutable_data()[r] = kernels::active().logsumexp(x.data() + r * x.shape(1), x.shape(1));
    }
    return y;
  });
  ops.def("argmax", [=](FloatArray x) {
    check_2d(x, "x");
    py::array_t<int64_t> y(x.shape(0));
    for (long r = 0; r < x.shape(0); ++r) y.mutable_data()[r] = kernels::active().argmax(x.data() + r * x.shape(1), x.shape(1));
    return y;
  });
  ops.def("top_k", [=](FloatArray x, float offset, int k) {
    check_2d(x, "x");
    if (k < 1) throw py::value_error("k must be >= 1");
    py::array_t<float> scores({x.shape(0), (ssize_t)k});
    py::array_t<int32_t> indices({x.shape(0), (ssize_t)k});
    std::fill(scores.mutable_data(), scores.mutable_data() + scores.size(), NAN);
    std::fill(indices.mutable_data(), indices.mutable_data() + indices.size(), -1);
    for (long r = 0; r < x.shape(0); ++r) {
      kernels::active().top_k(x.data() + r * x.shape(1), x.shape(1), offset, k, scores.mutable_data() + r * k,
                              indices.mutable_data() + r * k);
    }
    return py::make_tuple(scores, indices);
  });
  ops.def("activation", [](FloatArray x, const std::string& kind) {
    py::array_t<float> y(std::vector<ssize_t>(x.shape(), x.shape() + x.ndim()));
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    kernels::active().activation(y.mutable_data(), x.size(), activation_from_name(kind));
    return y;
  });
  ops.def("softcap", [](FloatArray x, float cap) {
    if (!(cap > 0.0f)) throw py::value_error("cap must be positive");
    py::array_t<float> y(std::vector<ssize_t>(x.shape(), x.shape() + x.ndim()));
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    kernels::active().softcap(y.mutable_data(), x.size(), cap);
    return y;
  });
  ops.def("gated_activation", [=](FloatArray gu, const std::string& kind) {
    check_2d(gu, "gate_up");
    if (gu.shape(1) % 2) throw py::value_error("gate_up rows must have an even width");
    const long n = gu.shape(1) / 2;
    py::array_t<float> y({(long)gu.shape(0), n});
    kernels::active().gated_activation(gu.data(), gu.shape(0), n, activation_from_name(kind), y.mutable_data());
    return y;
  });
  ops.def("rope", [=](FloatArray x, py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos,
                      FloatArray inv_freq, int head_dim, bool interleaved, float scaling) {
    check_2d(x, "x");
    if (pos.size() != x.shape(0)) throw py::value_error("one position per row");
    if (head_dim <= 0 || x.shape(1) % head_dim) throw py::value_error("row width must be a multiple of head_dim");
    if (inv_freq.size() == 0 || 2 * inv_freq.size() > head_dim || inv_freq.size() > 512) {
      throw py::value_error("inv_freq must have between 1 and head_dim/2 entries");
    }
    py::array_t<float> y({x.shape(0), x.shape(1)});
    std::memcpy(y.mutable_data(), x.data(), x.size() * sizeof(float));
    const int half = (int)inv_freq.size();
    std::vector<float> table((size_t)x.shape(0) * 2 * half);
    kernels::active().rope_table(pos.data(), x.shape(0), inv_freq.data(), half, scaling, table.data());
    kernels::active().rope(y.mutable_data(), x.shape(0), x.shape(1), (int)(x.shape(1) / head_dim), head_dim,
                           2 * half, table.data(), interleaved);
    return y;
  }, "x"_a, "pos"_a, "inv_freq"_a, "head_dim"_a, "interleaved"_a = false, "scaling"_a = 1.0f);
  // q: [n_new, n_heads * head_dim]; k, v: [n_keys, n_kv_heads * head_dim] (token-major, as torch).
  // paged: keys and values go through a KV cache whose pages are in reverse order (what decoding
  // reads); otherwise they are rows [kv_head][position][head_dim] (encoders, cross-attention).
  ops.def("attention", [=](FloatArray q, FloatArray k, FloatArray v, int n_heads, int n_kv_heads,
                           bool causal, float scale, py::object pos_bias, int window, float softcap, bool paged,
                           bool bf16_products, const std::string& kv_dtype) {
    check_2d(q, "q");
    check_2d(k, "k");
    check_2d(v, "v");
    if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads) throw py::value_error("bad head counts");
    if (q.shape(1) % n_heads) throw py::value_error("q width must be a multiple of n_heads");
    const int D = (int)(q.shape(1) / n_heads);
    const long n_new = q.shape(0), n_keys = k.shape(0);
    if (k.shape(1) != (long)n_kv_heads * D || v.shape(1) != k.shape(1) || v.shape(0) != n_keys) {
      throw py::value_error("k and v must be [n_keys, n_kv_heads * head_dim]");
    }
    if (n_keys < n_new) throw py::value_error("need at least as many keys as queries");
    if (kv_dtype != "float32" && kv_dtype != "float16") throw py::value_error("kv_dtype must be float32 or float16");
    if (kv_dtype == "float16" && !paged) throw py::value_error("kv_dtype float16 needs paged=True (a KV cache)");
    if (window < 0 || softcap < 0.0f) throw py::value_error("window and softcap must be >= 0");
    py::array_t<float> out({n_new, (long)q.shape(1)});
    kernels::AttentionSeq seq{q.data(), out.mutable_data(), nullptr, nullptr, n_keys * D, D,
                              (int)n_new, (int)(n_keys - n_new), (int)n_keys};
    std::vector<float> kc, vc;
    std::unique_ptr<KVCache> cache;
    if (paged) {
      const auto type = kv_dtype == "float16" ? kernels::WeightType::kF16 : kernels::WeightType::kF32;
      cache = std::make_unique<KVCache>(KVShape{1, n_kv_heads, D, type}, (int)std::max(n_keys, 1L));
      std::reverse(cache->pages().begin(), cache->pages().end());
      for (long t = 0; t < n_keys; ++t)
        for (int g = 0; g < n_kv_heads; ++g)
          cache->store(0, g, (int)t, k.data() + (t * n_kv_heads + g) * D, v.data() + (t * n_kv_heads + g) * D);
      cache->describe(0, seq);
    } else {  // the row layout [kv_head][position][head_dim]
      kc.resize(k.size());
      vc.resize(v.size());
      for (long t = 0; t < n_keys; ++t)
        for (int g = 0; g < n_kv_heads; ++g)
          for (int d = 0; d < D; ++d) {
            kc[((long)g * n_keys + t) * D + d] = k.data()[t * n_kv_heads * D + g * D + d];
            vc[((long)g * n_keys + t) * D + d] = v.data()[t * n_kv_heads * D + g * D + d];
          }
      seq.k = kc.data();
      seq.v = vc.data();
    }
    kernels::AttentionShape shape{n_heads, n_kv_heads, D, q.shape(1), q.shape(1), scale, causal};
    shape.window = window;
    shape.softcap = softcap;
    shape.products = bf16_products ? kernels::AttentionProducts::kBf16 : kernels::AttentionProducts::kFloat;
    FloatArray bias;  // [n_heads, 2 R + 1]: bias by relative position key - query, clamped to [-R, R]
    if (!pos_bias.is_none()) {
      bias = pos_bias.cast<FloatArray>();
      if (bias.ndim() != 2 || bias.shape(0) != n_heads || bias.shape(1) % 2 != 1) {
        throw py::value_error("pos_bias must be [n_heads, 2 R + 1]");
      }
      shape.pos_bias = bias.data();
      shape.pos_bias_radius = (int)(bias.shape(1) / 2);
    }
    kernels::active().attention(&seq, 1, shape);
    return out;
  }, "q"_a, "k"_a, "v"_a, "n_heads"_a, "n_kv_heads"_a, "causal"_a = true, "scale"_a, "pos_bias"_a = py::none(),
     "window"_a = 0, "softcap"_a = 0.0f, "paged"_a = false, "bf16_products"_a = false, "kv_dtype"_a = "float32");
}


}  // namespace pyxf
