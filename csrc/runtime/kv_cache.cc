#include "runtime/kv_cache.h"

#include <sys/mman.h>

#include <cstdlib>
#include <new>

namespace pyxf {

KVCache::KVCache(int num_layers, int num_kv_heads, int head_dim, int capacity)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      capacity_(capacity),
      layer_floats_((size_t)num_kv_heads * capacity * head_dim) {
  // A cache between 2 and 32 MiB sits on transparent huge pages where the kernel offers them: a
  // prefill writes every page of its cache once, and 4 KiB pages cost a fault each (SmolLM2 at 512
  // positions: 5,760 faults, ~3% of the prefill). Larger caches keep 4 KiB pages: a long-context
  // session touches a few positions of every [layer][head] region, and huge pages would make all of
  // them resident.
  constexpr size_t kHuge = 2u << 20, kMaxHugeCache = 32u << 20;
  const size_t want = 2 * (size_t)num_layers * layer_floats_ * sizeof(float);
  const size_t align = want >= kHuge && want <= kMaxHugeCache ? kHuge : 4096;
  const size_t bytes = want > 0 ? (want + align - 1) / align * align : 4096;
  data_ = static_cast<float*>(std::aligned_alloc(align, bytes));
  if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(data_, bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
}

KVCache::~KVCache() { std::free(data_); }

}  // namespace pyxf
