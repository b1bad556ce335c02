// A model's tensors as the bindings hand them over (named views of arrays the caller keeps alive,
// and config.json's quantization formats), and the binder that turns them into the weight views
// of model/weights.h: it checks each tensor's presence, shape and element type as it is taken,
// widens 16-bit vectors once, and records every request so that tests can compare what the core
// binds with the model spec (pyxf/spec).
#pragma once
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "model/weights.h"

namespace pyxf {

enum class DType { kF32, kF16, kBF16, kU8, kI8 };

struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<long> shape;
};

// A quantized tensor's storage: one format for all rows (rows == -1), or consecutive row ranges.
struct QuantSegment {
  std::string format;
  long rows = -1;
};

struct TensorSet {
  std::map<std::string, TensorView> tensors;
  std::map<std::string, std::vector<QuantSegment>> formats;  // quantized tensors only
};

// One tensor the model asked for: its name, expected shape ([out, in] for a quantized matrix) and
// whether it must be present.
struct TensorRequest {
  std::string name;
  std::vector<long> shape;
  bool required;
};

kernels::QuantFormat quant_format(const std::string& name);  // std::invalid_argument if unknown

// A quantized matrix [out, in] stored as `w` (row bytes of blocks, or int8 with float `scales`).
kernels::QuantWeight quant_matrix(const std::string& name, const TensorView& w, const TensorView* scales,
                                  kernels::QuantFormat f, long out, long in);

struct FreeBytes {
  void operator()(uint8_t* p) const { std::free(p); }
};
using PanelBytes = std::unique_ptr<uint8_t, FreeBytes>;
// w repacked in the active kernels' many-rows layout: sets w.gemm_panels and w.panel_layout (null
// and none where they have no such layout) and returns the memory, which must outlive w's use.
PanelBytes make_gemm_panels(kernels::QuantWeight& w);
// A float or 16-bit matrix w [out, in] of type wt packed by the active kernels
// (KernelTable::pack_dense_panels); null where they pack that type per call only.
PanelBytes make_dense_panels(const void* w, kernels::WeightType wt, long out, long in);
// `bytes` of 64-byte aligned memory (rounded up to 64); std::bad_alloc when there is none.
PanelBytes allocate_panels(long bytes);
// Advises the kernel that the pages wholly inside [data, data + bytes) are not needed now (values
// unchanged: a mapped file's pages are dropped from the resident set and read again on use).
void release_pages(const void* data, size_t bytes);

// Rows first .. first + count of a [rows, in] matrix, as a matrix of its own (a view: float, 16-bit,
// quantized or segmented alike). std::invalid_argument when they are not all within the matrix.
Linear row_block(const Linear& w, long rows, long in, long first, long count);

class WeightBinder {
 public:
  // gemm_panels: give each quantized matrix of one format the active kernels' many-rows layout
  // (kernels::QuantWeight::gemm_panels), made now and owned here; for models whose every call
  // runs many rows (encoders, encoder-decoders), where repacking per call would cost more.
  explicit WeightBinder(const TensorSet& set, bool gemm_panels = false) : set_(set), gemm_panels_(gemm_panels) {}

  // A float vector or table, widened to float32 once when stored in 16 bits; null when optional
  // and absent.
  const float* floats(const std::string& name, const std::vector<long>& shape, bool required = true);
  // A weight matrix [out, in]: float, 16-bit (widened in the kernels' registers), or quantized as
  // `formats` says.
  Linear matrix(const std::string& name, long out, long in);
  // `name.weight` (a matrix) and an optional `name.bias` [out]. A float or 16-bit matrix is also
  // packed once where the active kernels multiply its type on panels of their own (bf16 on
  // avx512_bf16): Linear::panels, owned here. (Not the embedding, a table of rows.)
  Linear linear(const std::string& name, long out, long in);
  // `name` [blocks * out, in]: `blocks` matrices [out, in] stacked along the rows (experts), each
  // a view of its rows.
  std::vector<Linear> stacked(const std::string& name, long blocks, long out, long in);
  // `name.weight` and `name.bias` [hidden]; the bias is required for LayerNorm.
  Norm norm(const std::string& name, long hidden, bool weight_required, bool bias_required);

  const std::vector<TensorRequest>& requests() const { return requests_; }

 private:
  // The named view after checking its shape (quantized: its layout is checked by the caller);
  // null when optional and absent. Records the request.
  const TensorView* take(const std::string& name, const std::vector<long>& shape, bool required,
                         bool quantized = false);
  Linear quantized(const std::string& name, long out, long in);
  // Gives w the many-rows layout (made once per tensor name), where the kernels have one.
  void attach_panels(const std::string& name, kernels::QuantWeight& w);
  // The panels of a float or 16-bit matrix (made once per tensor name), or null.
  const void* dense_panels(const std::string& name, const Linear& w, long out, long in);

  const TensorSet& set_;
  std::vector<TensorRequest> requests_;
  bool gemm_panels_;
  std::vector<std::unique_ptr<float[]>> owned_;  // widened copies
  std::map<std::string, PanelBytes> panels_;  // by tensor name: dense panels, and quantized ones' memory
  std::map<std::string, kernels::PanelLayout> panel_layouts_;  // quantized ones' layouts
};

}  // namespace pyxf
