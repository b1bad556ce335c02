#include "bindings/model.h"

#include <pybind11/stl.h>

#include "model/bind.h"

namespace pyxf {

using namespace pybind11::literals;

PyModel::PyModel(py::dict config, py::dict weights) {
  CoreThreads threads;  // binding packs some matrices in parallel (it reads Python objects: GIL held)
  PyConfig values(config);
  ModelConfig c = model_config(values);
  py::dict formats = values.has("tensor_formats") ? config["tensor_formats"].cast<py::dict>() : py::dict();
  tensors_ = tensor_set(weights, formats, values.has("dtype") ? values.text("dtype") : "float32", keep_);
  // Encoders: batches only. Decoders: the decode layout, unless the file's pages are to be shared.
  const bool share = values.has("share_file_pages") && values.boolean("share_file_pages");
  const QuantPanels panels = !c.causal ? QuantPanels::kBatches : share ? QuantPanels::kNone : QuantPanels::kDecode;
  binder_ = std::make_unique<WeightBinder>(tensors_, panels,
                                           values.has("huge_pages") && values.boolean("huge_pages"));
  ModelWeights w = bind_stack(c, *binder_);
  requests_ = binder_->requests();
  model_ = std::make_unique<Transformer>(std::move(c), std::move(w));
}

py::tuple PyModel::encode(py::sequence batch, py::object type_ids) {
  const ModelConfig& c = config();
  std::vector<std::vector<int32_t>> ids, types;
  std::vector<long> offsets{0};
  for (py::handle item : batch) {
    ids.push_back(tokens(item));
    const size_t len = ids.back().size();
    if (len == 0) throw py::value_error("sequence " + std::to_string(ids.size() - 1) + " is empty");
    if ((long)len > c.max_sequence()) {
      throw py::value_error("sequence " + std::to_string(ids.size() - 1) + " has " + std::to_string(len) +
                            " tokens, more than the model's " + std::to_string(c.max_sequence()) + " positions");
    }
    offsets.push_back(offsets.back() + (long)len);
  }
  if (!type_ids.is_none()) {
    py::sequence type_seq = type_ids.cast<py::sequence>();
    if ((size_t)py::len(type_seq) != ids.size()) throw py::value_error("one type_ids row per sequence");
    for (size_t i = 0; i < ids.size(); ++i) {
      auto t = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(type_seq[i]);
      if (!t || (size_t)t.size() != ids[i].size()) throw py::value_error("type_ids must match the token ids in length");
      std::vector<int32_t> row(t.size());
      for (ssize_t j = 0; j < t.size(); ++j) {
        if (t.data()[j] < 0 || t.data()[j] >= std::max(1, c.type_vocab_size)) {
          throw py::value_error("token type id " + std::to_string(t.data()[j]) + " is out of range");
        }
        row[j] = (int32_t)t.data()[j];
      }
      types.push_back(std::move(row));
    }
  }
  std::vector<SeqBatch> seqs;
  for (size_t i = 0; i < ids.size(); ++i) {
    seqs.push_back({nullptr, ids[i].data(), (int)ids[i].size(), true, types.empty() ? nullptr : types[i].data()});
  }
  py::array_t<float> hidden({offsets.back(), (long)c.hidden_size});
  float* out = hidden.mutable_data();
  {
    CoreCall call;
    std::lock_guard<std::mutex> lock(workspace_mutex_);
    model_->encode(seqs.data(), (int)seqs.size(), workspace_, out);
  }
  return py::make_tuple(hidden, py::cast(offsets));
}

void bind_model(py::module_& m) {
  py::class_<PyModel, std::shared_ptr<PyModel>>(m, "Model")
      .def(py::init<py::dict, py::dict>(), "config"_a, "weights"_a)
      .def("encode", &PyModel::encode, "batch"_a, "type_ids"_a = py::none())
      .def("bound_tensors", &PyModel::bound_tensors,
           "[(name, shape, required), ...]: the tensors this model asked for, in order.")
      .def_property_readonly("huge_page_bytes", [](const PyModel& m) { return m.huge_page_bytes(); },
                             "Bytes of the file's matrices on huge pages, copied or repacked at load "
                             "(0: read from the mapping).")
      .def_property_readonly("vocab_size", [](const PyModel& m) { return m.config().vocab_size; });
}

}  // namespace pyxf
