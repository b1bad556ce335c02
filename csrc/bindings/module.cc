// pyxf._core: the module, its information and process-wide settings (ISA, threads, profiling).
// The models' bindings are in model.cc, decoder.cc and seq2seq.cc, the test-only kernel entry
// points in ops.cc; everything crossing into the core is checked once, where it is translated.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/common.h"
#include "kernels/kernels.h"
#include "runtime/profile.h"
#include "runtime/threads.h"

namespace pyxf {
namespace {

using namespace pybind11::literals;

py::dict info() {
  const char* names[8];
  const int n = kernels::available_isas(names, 8);
  py::list isas;
  for (int i = 0; i < n; ++i) isas.append(names[i]);
  return py::dict("version"_a = PYXF_VERSION, "isa"_a = kernels::active().name, "isas"_a = isas,
                  "quant_gemv"_a = kernels::quant_gemv_name(), "bf16_gemm"_a = kernels::bf16_gemm_name(),
                  "bf16_gemm_widens"_a = kernels::bf16_gemm_widens(), "num_threads"_a = num_threads(),
                  "compiler"_a = PYXF_COMPILER,
                  "build_flags"_a = PYXF_BUILD_FLAGS, "sanitize"_a = PYXF_SANITIZE);
}


}  // namespace
}  // namespace pyxf

PYBIND11_MODULE(_core, m) {
  using namespace pyxf;
  m.doc() = "pyxf's C++ engine";
  m.def("info", &info);
  m.def("get_isa", [] { return std::string(kernels::active().name); });
  m.def("set_isa", [](const std::string& name) {
    if (!kernels::set_isa(name.c_str())) {
      throw py::value_error("ISA '" + name + "' is unknown or not supported by this CPU");
    }
  });
  m.def("set_quant_gemv", [](const std::string& name) {
    if (!kernels::set_quant_gemv(name.c_str())) {
      throw py::value_error("unknown quantized GEMV variant '" + name + "' (rows, stream, auto)");
    }
  }, "Picks the AVX-512 decode GEMV on quantized weights: 'stream', 'rows', or 'auto' (the default: by CPU and format).");
  m.def("get_quant_gemv", [] { return std::string(kernels::quant_gemv_name()); });
  m.def("set_bf16_gemm", [](const std::string& name) {
    if (!kernels::set_bf16_gemm(name.c_str())) {
      throw py::value_error("unknown bf16 GEMM variant '" + name + "' (dot, widen, auto)");
    }
  }, "How avx512_bf16 multiplies bf16 weights by many rows: 'dot' (vdpbf16ps), 'widen' (FMAs), or 'auto' (the default: by CPU).");
  m.def("get_bf16_gemm", [] { return std::string(kernels::bf16_gemm_name()); });
  m.def("set_num_threads", [](int n) {
    if (n <= 0) throw py::value_error("number of threads must be positive");
    set_num_threads(n);
  });
  m.def("get_num_threads", &num_threads);
  m.def("set_profiling", [](bool on) { profile().enabled = on; profile().reset(); },
        "Turns per-stage timing of the forward pass on or off (and clears it).");
  m.def("profile", [](py::object phase) {
    int first = 0, last = (int)Phase::kCount - 1;
    if (!phase.is_none()) {
      const std::string name = phase.cast<std::string>();
      if (name != "prefill" && name != "decode") {
        throw py::value_error("phase must be 'prefill', 'decode' or None (both), got '" + name + "'");
      }
      first = last = name == "prefill" ? (int)Phase::kPrefill : (int)Phase::kDecode;
    }
    py::dict out;
    for (int i = 0; i < (int)Stage::kCount; ++i) {
      double seconds = 0.0;
      long calls = 0;
      for (int p = first; p <= last; ++p) seconds += profile().seconds[p][i], calls += profile().calls[p][i];
      out[stage_name((Stage)i)] = py::make_tuple(seconds, calls);
    }
    return out;
  }, "phase"_a = py::none(),
     "Seconds and calls per stage since profiling was turned on: {stage: (seconds, calls)}, of the\n"
     "prompts' forward passes ('prefill'), of the decode steps ('decode': every sequence feeds one\n"
     "token), or of both (None).");

  bind_model(m);
  bind_decoder(m);
  bind_seq2seq(m);

  py::module_ ops = m.def_submodule("ops", "kernels on numpy arrays, for tests");
  bind_ops(ops);
}
