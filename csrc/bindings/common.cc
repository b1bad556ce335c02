#include "bindings/common.h"

#include <pybind11/stl.h>

#include <stdexcept>

namespace pyxf {

bool PyConfig::has(const std::string& key) const {
  return config_.contains(key) && !config_[key.c_str()].is_none();
}

template <typename T>
T PyConfig::get(const std::string& key, const char* kind) const {
  if (!has(key)) throw std::invalid_argument("config is missing '" + key + "'");
  try {
    return config_[key.c_str()].cast<T>();
  } catch (const py::cast_error&) {
    throw std::invalid_argument("config '" + key + "' must be " + kind);
  }
}

long PyConfig::integer(const std::string& key) const {
  py::object value = config_.contains(key) ? py::object(config_[key.c_str()]) : py::none();
  if (py::isinstance<py::bool_>(value) || (!value.is_none() && !py::isinstance<py::int_>(value))) {
    throw std::invalid_argument("config '" + key + "' must be an integer");
  }
  return get<long>(key, "an integer");
}
double PyConfig::number(const std::string& key) const { return get<double>(key, "a number"); }
bool PyConfig::boolean(const std::string& key) const { return get<bool>(key, "true or false"); }
std::string PyConfig::text(const std::string& key) const { return get<std::string>(key, "a string"); }
std::vector<float> PyConfig::floats(const std::string& key) const {
  FloatArray a = get<FloatArray>(key, "float32 values");
  return std::vector<float>(a.data(), a.data() + a.size());
}

namespace {

DType view_dtype(const std::string& name, const py::array& a, const std::string& dtype) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::kF32;
  if (a.itemsize() == 2 && a.dtype().kind() == 'f') return DType::kF16;
  if (a.itemsize() == 2 && a.dtype().kind() == 'u' && dtype == "bfloat16") return DType::kBF16;
  if (a.itemsize() == 2 && a.dtype().kind() == 'u' && dtype == "float16") return DType::kF16;
  if (a.itemsize() == 1 && a.dtype().kind() == 'u') return DType::kU8;
  if (a.itemsize() == 1 && a.dtype().kind() == 'i') return DType::kI8;
  throw py::type_error("tensor '" + name + "' has unsupported dtype " + std::string(py::str(a.dtype())));
}

std::vector<QuantSegment> quant_segments(const std::string& name, py::handle spec) {
  if (py::isinstance<py::str>(spec)) return {{spec.cast<std::string>(), -1}};
  std::vector<QuantSegment> segments;
  for (py::handle item : spec) {
    const py::sequence pair = py::reinterpret_borrow<py::sequence>(item);
    if (pair.size() != 2) throw py::value_error("tensor '" + name + "': segments are [format, rows] pairs");
    segments.push_back({pair[0].cast<std::string>(), pair[1].cast<long>()});
  }
  return segments;
}

}  // namespace

TensorSet tensor_set(const py::dict& weights, const py::dict& formats, const std::string& dtype,
                     std::vector<py::object>& keep) {
  TensorSet set;
  for (auto item : weights) {
    const std::string name = item.first.cast<std::string>();
    py::array a = py::reinterpret_borrow<py::array>(item.second);
    if (!py::isinstance<py::array>(item.second)) throw py::type_error("tensor '" + name + "' is not a numpy array");
    if (!(a.flags() & py::array::c_style)) throw py::value_error("tensor '" + name + "' is not C-contiguous");
    keep.push_back(a);
    set.tensors[name] = TensorView{a.data(), view_dtype(name, a, dtype),
                                   std::vector<long>(a.shape(), a.shape() + a.ndim())};
  }
  for (auto item : formats) {
    const std::string name = item.first.cast<std::string>();
    set.formats[name] = quant_segments(name, item.second);
  }
  return set;
}

py::list requests_list(const std::vector<TensorRequest>& requests) {
  py::list out;
  for (const TensorRequest& r : requests) {
    out.append(py::make_tuple(r.name, py::tuple(py::cast(r.shape)), r.required));
  }
  return out;
}

std::vector<int32_t> checked_tokens(py::handle ids, int vocab_size, const std::string& what) {
  py::array arr = py::array::ensure(ids);
  if (!arr) throw py::type_error(what + " must be a sequence of ints");
  if (arr.ndim() != 1) throw py::value_error(what + " must be one-dimensional");
  if (arr.size() > 0 && arr.dtype().kind() != 'i' && arr.dtype().kind() != 'u') {
    throw py::type_error(what + " must hold integer token ids, got dtype " + std::string(py::str(arr.dtype())));
  }
  auto as_i64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  std::vector<int32_t> out(as_i64.size());
  for (ssize_t i = 0; i < as_i64.size(); ++i) {
    const int64_t t = as_i64.data()[i];
    if (t < 0 || t >= vocab_size) {
      throw py::value_error("token id " + std::to_string(t) + " at index " + std::to_string(i) + " in " + what +
                            " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    }
    out[i] = (int32_t)t;
  }
  return out;
}

}  // namespace pyxf
