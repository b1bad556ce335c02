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

// The memory a model's weights are read from once loaded: the panels packed at load and the
// copies of the matrices every token reads (WeightBinder). Handed out in 64-byte aligned pieces
// of chunks that live as long as this object. With huge_pages the chunks are at least 32 MiB,
// 2 MiB aligned and advised as transparent huge pages (MADV_HUGEPAGE) before their first touch
// (memory from malloc may already be on small pages, so they are mapped here): a decode step streams
// every matrix, and on 4 KiB pages (a mapped file's) the page walks cost 6-24% of SmolLM2's
// decode (docs/DESIGN.md, "Weights in memory").
class WeightMemory {
 public:
  explicit WeightMemory(bool huge_pages) : huge_pages_(huge_pages) {}
  bool huge_pages() const { return huge_pages_; }
  // `bytes` (rounded up to 64); std::bad_alloc when there is none.
  uint8_t* allocate(size_t bytes);
  size_t allocated() const { return allocated_; }  // bytes handed out

 private:
  // Pages of its own (mmap), so that every page is first touched after the advice.
  struct Chunk {
    void* mapping = nullptr;
    size_t mapped = 0;
    Chunk(void* m, size_t n) : mapping(m), mapped(n) {}
    Chunk(Chunk&& o) noexcept : mapping(o.mapping), mapped(o.mapped) { o.mapping = nullptr; }
    Chunk(const Chunk&) = delete;
    ~Chunk();
  };
  bool huge_pages_;
  std::vector<Chunk> chunks_;
  uint8_t* next_ = nullptr;  // in the last chunk
  size_t left_ = 0;
  size_t allocated_ = 0;
};

// Whether the kernel offers transparent huge pages to a process that asks (enabled: always or
// madvise), read once.
bool huge_pages_offered();

// The layout a model's quantized matrices are repacked into at load, for the calls it makes most.
enum class QuantPanels {
  kNone,     // the rows as stored
  kBatches,  // many rows a call (encoders, encoder-decoders): the many-rows kernel's panels
  kDecode,   // decoders, mostly a few rows a call: the few-rows kernel's (KernelTable::pack_decode_panels)
};

// w repacked in the active kernels' layout for `use`, in `memory`: sets w.gemm_panels and
// w.panel_layout (null and none where they have no such layout).
void make_quant_panels(kernels::QuantWeight& w, QuantPanels use, WeightMemory& memory);
// A float or 16-bit matrix w [out, in] of type wt packed by the active kernels
// (KernelTable::pack_dense_panels) into `memory`; null where they pack that type per call only.
const void* make_dense_panels(const void* w, kernels::WeightType wt, long out, long in, WeightMemory& memory);
// Advises the kernel that the pages wholly inside [data, data + bytes) are not needed now (values
// unchanged: a mapped file's pages are dropped from the resident set and read again on use).
void release_pages(const void* data, size_t bytes);

// Rows first .. first + count of a [rows, in] matrix, as a matrix of its own (a view: float, 16-bit,
// quantized or segmented alike). std::invalid_argument when they are not all within the matrix.
Linear row_block(const Linear& w, long rows, long in, long first, long count);

class WeightBinder {
 public:
  // quant_panels: the layout each quantized matrix (each segment) gets where the active kernels
  // have one (kernels::QuantWeight::gemm_panels), made now and owned here; the stored rows' pages
  // are then released (decode layouts replace the rows for every call these kernels make).
  // huge_pages: panels, and copies of the matrices read whole on every call (those without
  // panels), on transparent huge pages (WeightMemory); otherwise those matrices are read where the
  // caller keeps them (the model file's mapping).
  WeightBinder(const TensorSet& set, QuantPanels quant_panels, bool huge_pages)
      : set_(set), quant_panels_(quant_panels), memory_(huge_pages && huge_pages_offered()) {}

  // A float vector or table, widened to float32 once when stored in 16 bits; null when optional
  // and absent.
  const float* floats(const std::string& name, const std::vector<long>& shape, bool required = true);
  // A weight matrix [out, in]: float, 16-bit (widened in the kernels' registers), or quantized as
  // `formats` says.
  Linear matrix(const std::string& name, long out, long in);
  // A matrix whose rows are looked up one at a time (an embedding that is not also the LM head):
  // left where the caller keeps it.
  Linear table(const std::string& name, long out, long in);
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
  // Bytes of matrices on huge pages: copies (copy_into_memory) and layouts repacked at load; 0
  // without huge pages.
  size_t huge_page_bytes() const { return memory_.huge_pages() ? memory_.allocated() : 0; }

 private:
  // The named view after checking its shape (quantized: its layout is checked by the caller);
  // null when optional and absent. Records the request.
  const TensorView* take(const std::string& name, const std::vector<long>& shape, bool required,
                         bool quantized = false);
  // The matrix as stored (float, 16-bit or quantized), a view of the caller's memory.
  Linear view(const std::string& name, long out, long in);
  Linear quantized(const std::string& name, long out, long in);
  // w's bytes copied once per tensor name into memory_ (huge pages), w pointed at the copy and the
  // original's pages released; nothing without huge pages.
  void copy_into_memory(const std::string& name, Linear& w);
  // Gives w the layout quant_panels_ asks for (made once per name), where the kernels have one.
  void attach_panels(const std::string& name, kernels::QuantWeight& w);
  // The panels of a float or 16-bit matrix (made once per tensor name), or null.
  const void* dense_panels(const std::string& name, const Linear& w, long out, long in);

  const TensorSet& set_;
  std::vector<TensorRequest> requests_;
  QuantPanels quant_panels_;
  WeightMemory memory_;
  std::vector<std::unique_ptr<float[]>> owned_;  // widened copies
  std::map<std::string, const void*> panels_;  // by tensor name: dense panels, and quantized ones' memory
  std::map<std::string, kernels::PanelLayout> panel_layouts_;  // quantized ones' layouts
  std::map<std::string, const uint8_t*> copies_;  // by tensor name: copies in memory_
};

}  // namespace pyxf
