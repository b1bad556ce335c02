// Loading a decoder-only or encoder model: config and named arrays in, the core's Transformer out.
#pragma once
#include <mutex>
#include <vector>

#include "bindings/common.h"
#include "model/transformer.h"

namespace pyxf {

class PyModel {
 public:
  PyModel(py::dict config, py::dict weights);

  const Transformer& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  py::list bound_tensors() const { return requests_list(requests_); }
  size_t huge_page_bytes() const { return binder_->huge_page_bytes(); }

  // Encoders: hidden states of complete sequences, packed [rows, H]; sequence i at rows
  // offsets[i] .. offsets[i + 1].
  py::tuple encode(py::sequence batch, py::object type_ids);
  std::vector<int32_t> tokens(py::handle ids) const { return checked_tokens(ids, config().vocab_size, "token ids"); }

 private:
  std::vector<py::object> keep_;  // the arrays the weights point into
  TensorSet tensors_;
  std::unique_ptr<WeightBinder> binder_;  // owns widened copies
  std::vector<TensorRequest> requests_;
  std::unique_ptr<Transformer> model_;
  std::mutex workspace_mutex_;
  Workspace workspace_;
};

}  // namespace pyxf
