// What the binding files share: turning Python values into the core's types (config values,
// named tensor views, token ids) and the rule for calls into the core. Bindings only translate:
// what the values mean is in csrc/model (config.h, tensors.h, bind.h).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/tensors.h"
#include "runtime/threads.h"

namespace pyxf {

namespace py = pybind11;

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Parallel work started from a Python thread: the thread adopts the process-wide thread count
// first (OpenMP keeps the count per calling thread, so without this pyxf.set_num_threads in one
// thread would not reach work started from another: a new thread runs with OpenMP's default, one
// thread per CPU), and when the work ends its OpenMP workers end too (runtime/threads.h says why:
// left alive, they slow every other thread's parallel regions, the serving engine's included).
class CoreThreads {
 public:
  CoreThreads() { adopt_num_threads(); }
  ~CoreThreads() { release_thread_pool(); }
  CoreThreads(const CoreThreads&) = delete;
  CoreThreads& operator=(const CoreThreads&) = delete;
};

// A call from a Python thread into the core's computation: CoreThreads, and the GIL released for
// its duration.
class CoreCall {
 private:
  py::gil_scoped_release release_;  // released first, taken back last
  CoreThreads threads_;
};

// config.json's dict (plus the values Python computes at load) as the core reads it.
class PyConfig : public ConfigValues {
 public:
  explicit PyConfig(py::dict config) : config_(std::move(config)) {}
  bool has(const std::string& key) const override;
  long integer(const std::string& key) const override;
  double number(const std::string& key) const override;
  bool boolean(const std::string& key) const override;
  std::string text(const std::string& key) const override;
  std::vector<float> floats(const std::string& key) const override;

 private:
  template <typename T>
  T get(const std::string& key, const char* kind) const;
  py::dict config_;
};

// The weights dict as named views, and config.json's quantization formats ("tensor_formats").
// float16 / bfloat16 arrive as uint16 with `dtype` (config.json's) naming them. The arrays are
// kept alive by `keep`.
TensorSet tensor_set(const py::dict& weights, const py::dict& formats, const std::string& dtype,
                     std::vector<py::object>& keep);

// [(name, shape, required), ...] of the tensors a model asked for (tests compare them with pyxf.spec).
py::list requests_list(const std::vector<TensorRequest>& requests);

// Token ids from Python, checked against the vocabulary.
std::vector<int32_t> checked_tokens(py::handle ids, int vocab_size, const std::string& what);

void bind_model(py::module_& m);
void bind_decoder(py::module_& m);
void bind_seq2seq(py::module_& m);
void bind_ops(py::module_& ops);

}  // namespace pyxf
