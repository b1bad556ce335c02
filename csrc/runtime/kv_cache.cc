#include "runtime/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

namespace pyxf {

namespace {

// The memory of the last pool freed, kept for the next one. pyxf.generate makes a pool for each
// call, and a fresh pool's pages are faulted in as a prefill first writes them: 7-44 ms of a
// 520-token SmolLM2 prefill (270-300 ms) on Zen 5, most of it the kernel assembling huge pages.
// A pool takes the kept memory whenever it is large enough (the memory is resident already, and
// generate(1) and generate(n) alternate in a benchmark). The old contents never reach a result:
// attention masks the scores of the positions past a sequence's last. At most kMaxSpare bytes are
// kept.
struct SpareMemory {
  std::mutex mutex;
  void* data = nullptr;
  size_t bytes = 0;
  size_t align = 0;
};
constexpr size_t kMaxSpare = 256u << 20;

SpareMemory& spare() {
  static SpareMemory* s = new SpareMemory;  // never destroyed: pools may outlive static destructors
  return *s;
}

// The kept memory, if it holds `bytes` at `align` (its size and alignment go to *bytes and *align).
void* take_spare(size_t* bytes, size_t* align) {
  SpareMemory& s = spare();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.data || s.bytes < *bytes || s.align < *align) return nullptr;
  void* data = s.data;
  *bytes = s.bytes;
  *align = s.align;
  s.data = nullptr;
  return data;
}

// Keeps `data` as the spare (freeing the one before), or frees it.
void give_spare(void* data, size_t bytes, size_t align) {
  if (bytes > kMaxSpare) {
    std::free(data);
    return;
  }
  SpareMemory& s = spare();
  void* old;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    old = s.data;
    s.data = data;
    s.bytes = bytes;
    s.align = align;
  }
  std::free(old);
}

}  // namespace

KVPool::KVPool(const KVShape& shape, int num_pages)
    : shape_(shape),
      num_pages_(num_pages),
      layer_bytes_((size_t)page_stride() * num_pages * shape.element_bytes()) {
  // A pool between 2 and 32 MiB sits on transparent huge pages where the kernel offers them: a
  // prefill writes every page of its cache once, and 4 KiB pages cost a fault each (SmolLM2 at 512
  // positions: 5,760 faults, ~3% of the prefill). Larger pools keep 4 KiB pages: a shared pool is
  // touched only as pages are first used, and huge pages would make far more of it resident.
  constexpr size_t kHuge = 2u << 20, kMaxHugePool = 32u << 20;
  const size_t want = 2 * (size_t)shape.num_layers * layer_bytes_;
  const size_t align = want >= kHuge && want <= kMaxHugePool ? kHuge : 4096;
  bytes_ = want > 0 ? (want + align - 1) / align * align : 4096;
  align_ = align;
  data_ = static_cast<char*>(take_spare(&bytes_, &align_));
  if (data_) return;
  data_ = static_cast<char*>(std::aligned_alloc(align, bytes_));
  if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(data_, bytes_, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
}

KVPool::~KVPool() { give_spare(data_, bytes_, align_); }

KVCache::KVCache(const KVShape& shape, int capacity)
    : owned_(std::make_unique<KVPool>(shape, (capacity + kPageTokens - 1) / kPageTokens)),
      pool_(owned_.get()),
      limit_(capacity) {
  pages_.resize(pool_->num_pages());
  for (int p = 0; p < (int)pages_.size(); ++p) pages_[p] = p;
}

void KVCache::describe(int layer, kernels::AttentionSeq& a) const {
  a.k = pool_->keys(layer);
  a.v = pool_->values(layer);
  a.pages = pages_.data();
  a.page_stride = pool_->page_stride();
  a.kv_head_stride = pool_->head_stride();
  a.kv_pos_stride = pool_->head_dim();
  a.keys_transposed = true;
  a.kv_type = pool_->shape().type;
}

kernels::KVSlotWrite KVCache::slot_write(int layer, int g, int pos, const float* key, const float* value) const {
  return {block(pool_->keys(layer), g, pos), block(pool_->values(layer), g, pos), pos % kPageTokens, key, value,
          pool_->shape().type};
}

void KVCache::store(int layer, int g, int pos, const float* key, const float* value) {
  const kernels::KVSlotWrite w = slot_write(layer, g, pos, key, value);
  kernels::active().store_kv_slots(&w, 1, head_dim());
}

void KVCache::copy_from(const KVCache& src) {
  const int n = src.length(), D = head_dim();
  const size_t element = pool_->shape().element_bytes(), page = (size_t)pool_->head_stride() * element;
  for (int l = 0; l < pool_->num_layers(); ++l) {
    for (int g = 0; g < pool_->num_kv_heads(); ++g) {
      for (int p0 = 0; p0 < n; p0 += kPageTokens) {
        char* keys = block(pool_->keys(l), g, p0);
        char* values = block(pool_->values(l), g, p0);
        const char* src_keys = src.block(src.pool_->keys(l), g, p0);
        const char* src_values = src.block(src.pool_->values(l), g, p0);
        const int used = std::min(kPageTokens, n - p0);  // positions past the length are never read
        if (used == kPageTokens) {
          std::memcpy(keys, src_keys, page);
          std::memcpy(values, src_values, page);
          continue;
        }
        const size_t key_row = (size_t)kPageTokens * element;  // one dimension of the transposed keys
        for (int d = 0; d < D; ++d) std::memcpy(keys + d * key_row, src_keys + d * key_row, used * element);
        std::memcpy(values, src_values, (size_t)used * D * element);
      }
    }
  }
  length_ = n;
}

}  // namespace pyxf
