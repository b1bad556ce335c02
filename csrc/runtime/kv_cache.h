// Keys and values in pages of kKVPageTokens positions. A KVPool holds the pages of every layer; a
// KVCache is one sequence's view: its page table and length. A cache either owns a private pool
// sized to a fixed capacity (sessions, beam search) or borrows pages from a shared pool that a
// block manager hands out (the serving engine).
// Layout per layer: keys [page][kv_head][head_dim][kKVPageTokens] (transposed, so that attention
// multiplies each query element by a vector of keys), values [page][kv_head][kKVPageTokens][head_dim];
// a page of one head's keys or values is contiguous and a sequence's pages need not be.
#pragma once
#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/kernels.h"
#include "model/config.h"

namespace pyxf {

constexpr int kPageTokens = kernels::kKVPageTokens;

// What a model's caches hold: the stack's sizes and the element type (float, or IEEE half: half
// the bytes to write and to read in every attention call, rounded to 11 significant bits).
struct KVShape {
  int num_layers;
  int num_kv_heads;
  int head_dim;
  kernels::WeightType type;

  static KVShape of(const ModelConfig& c) { return {c.num_layers, c.num_kv_heads, c.head_dim, c.kv_type}; }
  size_t element_bytes() const { return (size_t)kernels::type_bytes(type); }
  // Bytes of one page across all layers (keys and values).
  size_t page_bytes() const { return 2 * (size_t)num_layers * num_kv_heads * kPageTokens * head_dim * element_bytes(); }
};

class KVPool {
 public:
  KVPool(const KVShape& shape, int num_pages);
  ~KVPool();
  KVPool(const KVPool&) = delete;
  KVPool& operator=(const KVPool&) = delete;

  const KVShape& shape() const { return shape_; }
  // Keys and values of a layer: elements of shape().type, the strides below count elements.
  char* keys(int layer) const { return data_ + (2 * (size_t)layer) * layer_bytes_; }
  char* values(int layer) const { return data_ + (2 * (size_t)layer + 1) * layer_bytes_; }
  long page_stride() const { return (long)shape_.num_kv_heads * head_stride(); }
  long head_stride() const { return (long)kPageTokens * shape_.head_dim; }
  int head_dim() const { return shape_.head_dim; }
  int num_kv_heads() const { return shape_.num_kv_heads; }
  int num_layers() const { return shape_.num_layers; }
  int num_pages() const { return num_pages_; }

 private:
  KVShape shape_;
  int num_pages_;
  size_t layer_bytes_, bytes_, align_;
  char* data_;  // pages are touched only as they are first written, so resident memory follows use
                // (or the memory of a pool freed before, see kv_cache.cc)
};

class KVCache {
 public:
  // A private pool of ceil(capacity / kPageTokens) pages, in order.
  KVCache(const KVShape& shape, int capacity);
  // Pages borrowed from `pool`: the owner appends them to pages() before positions reach them.
  explicit KVCache(const KVPool* pool) : pool_(pool) {}
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVPool& pool() const { return *pool_; }
  std::vector<int32_t>& pages() { return pages_; }
  const std::vector<int32_t>& pages() const { return pages_; }
  int head_dim() const { return pool_->head_dim(); }
  // Positions it can hold: its pages, and for a private pool the capacity it was made with.
  int capacity() const { return std::min(limit_, (int)pages_.size() * kPageTokens); }
  int length() const { return length_; }
  void set_length(int n) { length_ = n; }

  // Writes the key and value of position `pos` of kv head g of `layer` (head_dim floats each).
  void store(int layer, int g, int pos, const float* key, const float* value);
  // The same write, described for kernels::store_kv_slots (which runs many at once).
  kernels::KVSlotWrite slot_write(int layer, int g, int pos, const float* key, const float* value) const;
  // Points `a` (an attention problem) at this cache's keys and values of `layer`.
  void describe(int layer, kernels::AttentionSeq& a) const;
  // Copies the first `length` positions of `src` (same shape) and takes its length.
  void copy_from(const KVCache& src);

 private:
  // The page block of kv head g that holds position `pos`: kKVPageTokens positions of it.
  char* block(char* base, int g, int pos) const {
    const long element = (long)pool_->shape().element_bytes();
    return base + ((long)pages_[pos / kPageTokens] * pool_->page_stride() + (long)g * pool_->head_stride()) * element;
  }

  std::unique_ptr<KVPool> owned_;
  const KVPool* pool_;
  std::vector<int32_t> pages_;
  int limit_ = INT_MAX;
  int length_ = 0;
};

}  // namespace pyxf
