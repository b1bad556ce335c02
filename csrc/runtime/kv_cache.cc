#include "runtime/kv_cache.h"

#include <cstdlib>
#include <new>

namespace pyxf {

KVCache::KVCache(int num_layers, int num_kv_heads, int head_dim, int capacity)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      capacity_(capacity),
      layer_floats_((size_t)num_kv_heads * capacity * head_dim) {
  const size_t bytes = (2 * (size_t)num_layers * layer_floats_ * sizeof(float) + 4095) / 4096 * 4096;
  data_ = static_cast<float*>(std::aligned_alloc(4096, bytes > 0 ? bytes : 4096));
  if (!data_) throw std::bad_alloc();
}

KVCache::~KVCache() { std::free(data_); }

}  // namespace pyxf
