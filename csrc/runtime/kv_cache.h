// Keys and values of one sequence for every layer, preallocated to a fixed capacity.
// Layout per layer: [kv_head][position][head_dim], so one head's keys are contiguous.
#pragma once
#include <cstddef>

namespace pyxf {

class KVCache {
 public:
  KVCache(int num_layers, int num_kv_heads, int head_dim, int capacity);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  float* keys(int layer) { return data_ + (2 * (size_t)layer) * layer_floats_; }
  float* values(int layer) { return data_ + (2 * (size_t)layer + 1) * layer_floats_; }
  long head_stride() const { return (long)capacity_ * head_dim_; }
  int head_dim() const { return head_dim_; }
  int capacity() const { return capacity_; }
  int length() const { return length_; }
  void set_length(int n) { length_ = n; }

 private:
  int num_layers_, num_kv_heads_, head_dim_, capacity_;
  int length_ = 0;
  size_t layer_floats_;
  float* data_;  // pages are touched only as positions fill, so resident memory follows length
};

}  // namespace pyxf
