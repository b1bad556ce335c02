#include "model/tensors.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace pyxf {
namespace {

using std::invalid_argument;

std::string shape_text(const std::vector<long>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

float bf16_to_float(uint16_t v) {
  const uint32_t bits = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

kernels::WeightType weight_type(const std::string& name, DType d) {
  switch (d) {
    case DType::kF32: return kernels::WeightType::kF32;
    case DType::kF16: return kernels::WeightType::kF16;
    case DType::kBF16: return kernels::WeightType::kBF16;
    default: throw invalid_argument("tensor '" + name + "' is not a float tensor");
  }
}

long elements(const std::vector<long>& shape) {
  long n = 1;
  for (long d : shape) n *= d;
  return n;
}

}  // namespace

kernels::QuantFormat quant_format(const std::string& name) {
  using F = kernels::QuantFormat;
  static const std::map<std::string, F> formats = {
      {"q8_0", F::kQ8_0}, {"q4_0", F::kQ4_0}, {"q4_1", F::kQ4_1}, {"q5_0", F::kQ5_0}, {"q5_1", F::kQ5_1},
      {"q4_k", F::kQ4_K}, {"q5_k", F::kQ5_K}, {"q6_k", F::kQ6_K}, {"int8", F::kInt8}};
  auto it = formats.find(name);
  if (it == formats.end()) {
    throw invalid_argument("unknown quantization format '" + name +
                           "' (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, int8)");
  }
  return it->second;
}

kernels::QuantWeight quant_matrix(const std::string& name, const TensorView& w, const TensorView* scales,
                                  kernels::QuantFormat f, long out, long in) {
  const int block = kernels::quant_block_cols(f);
  if (in <= 0 || in % block != 0) {
    throw invalid_argument("tensor '" + name + "': quantized rows need a multiple of " + std::to_string(block) +
                           " columns, got " + std::to_string(in));
  }
  const long row_bytes = kernels::quant_row_bytes(f, in);
  const bool bytes = w.dtype == DType::kU8 || w.dtype == DType::kI8;
  if (!bytes || w.shape.size() != 2 || w.shape[0] != out || w.shape[1] != row_bytes) {
    throw invalid_argument("tensor '" + name + "' must be a C-contiguous 1-byte array of shape [" +
                           std::to_string(out) + ", " + std::to_string(row_bytes) + "]");
  }
  kernels::QuantWeight q{f, static_cast<const uint8_t*>(w.data), nullptr, out, in};
  if (f == kernels::QuantFormat::kInt8) {
    const std::string scale_name = name + "_scale";
    if (scales == nullptr) throw invalid_argument("missing tensor '" + scale_name + "'");
    if (scales->dtype != DType::kF32 || scales->shape.size() != 1 || scales->shape[0] != out) {
      throw invalid_argument("tensor '" + scale_name + "' must be float32 [" + std::to_string(out) + "]");
    }
    q.row_scales = static_cast<const float*>(scales->data);
  }
  return q;
}

const TensorView* WeightBinder::take(const std::string& name, const std::vector<long>& shape, bool required,
                                     bool quantized) {
  requests_.push_back({name, shape, required});
  auto it = set_.tensors.find(name);
  if (it == set_.tensors.end()) {
    if (required) throw invalid_argument("missing tensor '" + name + "'");
    return nullptr;
  }
  const TensorView& t = it->second;
  if (quantized) return &t;  // its stored layout is checked against `shape` by quant_matrix / quantized()
  if (set_.formats.count(name)) throw invalid_argument("tensor '" + name + "' cannot be stored quantized");
  if (t.shape != shape) {
    throw invalid_argument("tensor '" + name + "' has shape " + shape_text(t.shape) + ", expected " +
                           shape_text(shape));
  }
  return &t;
}

const float* WeightBinder::floats(const std::string& name, const std::vector<long>& shape, bool required) {
  const TensorView* t = take(name, shape, required);
  if (t == nullptr) return nullptr;
  if (t->dtype == DType::kF32) return static_cast<const float*>(t->data);
  if (t->dtype != DType::kF16 && t->dtype != DType::kBF16) {
    throw invalid_argument("tensor '" + name + "' is not a float tensor");
  }
  const long n = elements(t->shape);
  auto buf = std::make_unique<float[]>(n);
  const uint16_t* src = static_cast<const uint16_t*>(t->data);
  for (long i = 0; i < n; ++i) buf[i] = t->dtype == DType::kBF16 ? bf16_to_float(src[i]) : half_to_float(src[i]);
  owned_.push_back(std::move(buf));
  return owned_.back().get();
}

Linear WeightBinder::view(const std::string& name, long out, long in) {
  if (set_.formats.count(name)) return quantized(name, out, in);
  const TensorView* t = take(name, {out, in}, true);
  Linear l;
  l.weight = t->data;
  l.dtype = weight_type(name, t->dtype);
  return l;
}

// Whether every part of a quantized matrix (its one format, or each segment) has panels (of
// `layout`, when given).
static bool quant_panels(const Linear& l, kernels::PanelLayout layout = kernels::PanelLayout::kNone) {
  if (!l.quantized) return false;
  const auto has = [&](const kernels::QuantWeight& q) {
    return q.gemm_panels && (layout == kernels::PanelLayout::kNone || q.panel_layout == layout);
  };
  if (l.segments.empty()) return has(l.quant);
  for (const kernels::QuantWeight& s : l.segments) {
    if (!has(s)) return false;
  }
  return true;
}

Linear WeightBinder::matrix(const std::string& name, long out, long in) {
  Linear l = view(name, out, in);
  // Strips replace the rows for every call (a tied head, stacked experts); other panels do not.
  if (!quant_panels(l, kernels::PanelLayout::kStrips)) copy_into_memory(name, l);
  return l;
}

Linear WeightBinder::table(const std::string& name, long out, long in) { return view(name, out, in); }

Linear WeightBinder::linear(const std::string& name, long out, long in) {
  Linear l = view(name + ".weight", out, in);
  l.bias = floats(name + ".bias", {out}, false);
  if (!l.quantized) l.panels = dense_panels(name + ".weight", l, out, in);
  if (!l.panels && !quant_panels(l)) copy_into_memory(name + ".weight", l);  // read whole on every call
  return l;
}

void WeightBinder::copy_into_memory(const std::string& name, Linear& w) {
  if (!memory_.huge_pages()) return;
  // The matrix's bytes: one block of memory whether plain, in one format or in segments.
  const uint8_t* from;
  size_t bytes = 0;
  if (!w.quantized) {
    from = static_cast<const uint8_t*>(w.weight);
    bytes = (size_t)elements(set_.tensors.at(name).shape) * kernels::type_bytes(w.dtype);
  } else if (w.segments.empty()) {
    from = w.quant.data;
    bytes = (size_t)w.quant.rows * kernels::quant_row_bytes(w.quant.format, w.quant.cols);
  } else {
    from = w.segments[0].data;
    for (const kernels::QuantWeight& s : w.segments) bytes += (size_t)s.rows * kernels::quant_row_bytes(s.format, s.cols);
  }
  auto it = copies_.find(name);
  if (it == copies_.end()) {
    uint8_t* to = memory_.allocate(bytes);
    std::memcpy(to, from, bytes);
    release_pages(from, bytes);
    it = copies_.emplace(name, to).first;
  }
  const uint8_t* to = it->second;
  if (!w.quantized) w.weight = to;
  if (w.quantized && w.segments.empty()) w.quant.data = to;
  for (kernels::QuantWeight& s : w.segments) s.data = to + (s.data - from);
}

const void* WeightBinder::dense_panels(const std::string& name, const Linear& w, long out, long in) {
  auto it = panels_.find(name);
  if (it == panels_.end()) {
    const void* p = make_dense_panels(w.weight, w.dtype, out, in, memory_);
    if (p) release_pages(w.weight, (size_t)(out * in * kernels::type_bytes(w.dtype)));
    it = panels_.emplace(name, p).first;
  }
  return it->second;
}

const void* make_dense_panels(const void* w, kernels::WeightType wt, long out, long in, WeightMemory& memory) {
  const kernels::KernelTable& K = kernels::active();
  const long bytes = K.dense_panel_bytes ? K.dense_panel_bytes(wt, in, out) : 0;
  if (bytes <= 0) return nullptr;
  uint8_t* p = memory.allocate((size_t)bytes);
  K.pack_dense_panels(w, wt, in, out, p);
  return p;
}

uint8_t* WeightMemory::allocate(size_t bytes) {
  constexpr size_t kLine = 64, kHugePage = size_t{2} << 20, kChunk = size_t{32} << 20;
  bytes = (bytes + kLine - 1) / kLine * kLine;
  if (bytes > left_) {
    const size_t size = huge_pages_ ? std::max(kChunk, (bytes + kHugePage - 1) / kHugePage * kHugePage) : bytes;
    const size_t mapped = size + (huge_pages_ ? kHugePage : 0);  // room to start on a huge page
    void* m = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    chunks_.emplace_back(m, mapped);
    next_ = static_cast<uint8_t*>(m);
    if (huge_pages_) {
      next_ = reinterpret_cast<uint8_t*>(((uintptr_t)m + kHugePage - 1) / kHugePage * kHugePage);
#ifdef MADV_HUGEPAGE
      madvise(next_, size, MADV_HUGEPAGE);  // advice: refused, the pages are small
#endif
    }
    left_ = size;
  }
  uint8_t* p = next_;
  next_ += bytes;
  left_ -= bytes;
  allocated_ += bytes;
  return p;
}

WeightMemory::Chunk::~Chunk() {
  if (mapping) munmap(mapping, mapped);
}

bool huge_pages_offered() {
  static const bool offered = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string modes;
    std::getline(f, modes);
    return modes.find("[always]") != std::string::npos || modes.find("[madvise]") != std::string::npos;
  }();
  return offered;
}

// The pages wholly inside [data, data + bytes), handed back to the kernel: rows the kernels no
// longer read once their panels exist. For a memory-mapped file (pyxf's model files) the pages
// leave the process's resident set and come back from the file if read again (a table without
// panels, after set_isa); anonymous memory is kept (reclaiming it would need swap), so the call
// changes no value either way. Without it a bf16 model kept both copies resident: SmolLM2's peak
// RSS 544 MB against 343 MB before panels.
void release_pages(const void* data, size_t bytes) {
#ifdef MADV_PAGEOUT
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t begin = ((uintptr_t)data + page - 1) / page * page;
  const uintptr_t end = ((uintptr_t)data + bytes) / page * page;
  if (end > begin) madvise((void*)begin, end - begin, MADV_PAGEOUT);  // advice: failure changes nothing
#else
  (void)data;
  (void)bytes;
#endif
}

// A quantized linear weight as config.json's "tensors" entry describes it: one format (the array
// is [out, row bytes]), or [format, rows] segments (the array is their bytes, one after another).
Linear WeightBinder::quantized(const std::string& name, long out, long in) {
  const TensorView& t = *take(name, {out, in}, true, true);
  const std::vector<QuantSegment>& spec = set_.formats.at(name);
  Linear l;
  l.quantized = true;
  if (spec.size() == 1 && spec[0].rows < 0) {
    auto scales = set_.tensors.find(name + "_scale");
    l.quant = quant_matrix(name, t, scales == set_.tensors.end() ? nullptr : &scales->second,
                           quant_format(spec[0].format), out, in);
    attach_panels(name, l.quant);
    return l;
  }
  if (t.dtype != DType::kU8 || t.shape.size() != 1) {
    throw invalid_argument("tensor '" + name + "' (several formats) must be a C-contiguous 1-D byte array");
  }
  const uint8_t* data = static_cast<const uint8_t*>(t.data);
  long rows = 0, offset = 0;
  for (const QuantSegment& s : spec) {
    const kernels::QuantFormat f = quant_format(s.format);
    if (f == kernels::QuantFormat::kInt8 || s.rows <= 0 || in <= 0 || in % kernels::quant_block_cols(f) != 0) {
      throw invalid_argument("tensor '" + name + "': bad segment (a block format whose blocks fit the " +
                             std::to_string(in) + " columns, and a positive row count)");
    }
    const long bytes = s.rows * kernels::quant_row_bytes(f, in);
    if (offset + bytes > t.shape[0]) throw invalid_argument("tensor '" + name + "' is shorter than its segments");
    l.segments.push_back({f, data + offset, nullptr, s.rows, in});
    rows += s.rows;
    offset += bytes;
  }
  if (rows != out || offset != t.shape[0]) {
    throw invalid_argument("tensor '" + name + "': its segments cover " + std::to_string(rows) + " rows and " +
                           std::to_string(offset) + " bytes, expected " + std::to_string(out) + " rows and " +
                           std::to_string(t.shape[0]) + " bytes");
  }
  if (quant_panels_ == QuantPanels::kDecode) {  // (the many-rows panels are of one format)
    for (size_t i = 0; i < l.segments.size(); ++i) attach_panels(name + "#" + std::to_string(i), l.segments[i]);
  }
  return l;
}

void make_quant_panels(kernels::QuantWeight& w, QuantPanels use, WeightMemory& memory) {
  const kernels::KernelTable& K = kernels::active();
  const bool decode = use == QuantPanels::kDecode;
  const auto bytes_of = decode ? K.decode_panel_bytes : K.gemm_panel_bytes;
  const auto pack = decode ? K.pack_decode_panels : K.pack_gemm_panels;
  const long bytes = use != QuantPanels::kNone && bytes_of ? bytes_of(w) : 0;
  w.gemm_panels = nullptr;
  w.panel_layout = kernels::PanelLayout::kNone;
  if (bytes <= 0) return;
  uint8_t* p = memory.allocate((size_t)bytes);
  w.panel_layout = pack(w, p);
  w.gemm_panels = p;
}

void WeightBinder::attach_panels(const std::string& name, kernels::QuantWeight& w) {
  if (quant_panels_ == QuantPanels::kNone) return;
  if (panels_.find(name) == panels_.end()) {
    kernels::QuantWeight packed = w;
    make_quant_panels(packed, quant_panels_, memory_);
    panels_.emplace(name, packed.gemm_panels);
    panel_layouts_[name] = packed.panel_layout;
    // Strips replace the rows for every call the active kernels make; other tables (set_isa) read
    // the rows again from the file.
    if (packed.panel_layout == kernels::PanelLayout::kStrips) {
      release_pages(w.data, (size_t)w.rows * kernels::quant_row_bytes(w.format, w.cols));
    }
  }
  w.gemm_panels = static_cast<const uint8_t*>(panels_.at(name));
  w.panel_layout = w.gemm_panels ? panel_layouts_.at(name) : kernels::PanelLayout::kNone;
}

Linear row_block(const Linear& w, long rows, long in, long first, long count) {
  if (first < 0 || count <= 0 || first + count > rows) {
    throw invalid_argument("rows " + std::to_string(first) + " .. " + std::to_string(first + count) +
                           " are outside the matrix of " + std::to_string(rows));
  }
  Linear b;
  b.dtype = w.dtype;
  b.quantized = w.quantized;
  b.bias = w.bias ? w.bias + first : nullptr;
  if (!w.quantized) {
    b.weight = static_cast<const uint8_t*>(w.weight) + first * in * kernels::type_bytes(w.dtype);
    return b;
  }
  // The segments (or the one matrix) that overlap the rows, each cut to them.
  const std::vector<kernels::QuantWeight> parts =
      w.segments.empty() ? std::vector<kernels::QuantWeight>{w.quant} : w.segments;
  long start = 0;
  for (const kernels::QuantWeight& s : parts) {
    const long lo = std::max(first, start), hi = std::min(first + count, start + s.rows);
    if (lo < hi) {
      kernels::QuantWeight cut = s;
      // Panels are of the whole matrix; strips serve rows from the start of one.
      const bool strips = s.panel_layout == kernels::PanelLayout::kStrips && (lo - start) % kernels::kStripRows == 0;
      const long strip = (lo - start) / kernels::kStripRows;
      cut.gemm_panels = strips ? s.gemm_panels + strip * kernels::strip_row_bytes(s.format, s.cols) : nullptr;
      cut.panel_layout = strips ? s.panel_layout : kernels::PanelLayout::kNone;
      cut.data = s.data + (lo - start) * kernels::quant_row_bytes(s.format, s.cols);
      cut.row_scales = s.row_scales ? s.row_scales + (lo - start) : nullptr;
      cut.rows = hi - lo;
      b.segments.push_back(cut);
    }
    start += s.rows;
  }
  if (b.segments.size() == 1) {  // one format: the plain quantized matrix
    b.quant = b.segments[0];
    b.segments.clear();
  }
  return b;
}

std::vector<Linear> WeightBinder::stacked(const std::string& name, long blocks, long out, long in) {
  const Linear all = matrix(name, blocks * out, in);
  std::vector<Linear> views;
  for (long e = 0; e < blocks; ++e) views.push_back(row_block(all, blocks * out, in, e * out, out));
  return views;
}

Norm WeightBinder::norm(const std::string& name, long hidden, bool weight_required, bool bias_required) {
  return Norm{floats(name + ".weight", {hidden}, weight_required), floats(name + ".bias", {hidden}, bias_required)};
}

}  // namespace pyxf
