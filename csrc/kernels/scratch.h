// Scratch memory of the calling thread, one buffer per slot, kept between calls up to
// kKeptScratchBytes (a GEMM work item's packed columns, the bf16 activations of thousands of rows,
// an attention work item's tiles and a call's partial softmaxes fit); a larger request gets its own
// allocation, freed with the Scratch. A decode step makes hundreds of kernel calls, and allocating
// their scratch each time cost malloc, free and page faults on every call. Each slot is one
// buffer per thread: a thread holds at most one Scratch of a slot at a time.
#pragma once
#include <stdlib.h>

namespace pyxf::kernels {

constexpr long kKeptScratchBytes = 16L << 20;
enum ScratchSlot {
  kPackedWeights = 0,
  kRoundedActivations = 1,
  kTileSums = 2,
  kAttentionItem = 3,      // an attention work item's tiles (each thread of the call)
  kAttentionPartials = 4,  // a split attention call's partial results (the calling thread)
  kNumScratchSlots = 5
};

class Scratch {
 public:
  Scratch(ScratchSlot slot, long bytes) : bytes_(bytes) {
    if (bytes > kKeptScratchBytes) {
      data_ = aligned_alloc(64, (bytes + 63) / 64 * 64);
    } else {
      Kept& k = kept();
      if (bytes > k.capacity[slot]) {
        free(k.data[slot]);
        k.capacity[slot] = bytes;
        k.data[slot] = aligned_alloc(64, (bytes + 63) / 64 * 64);
      }
      data_ = k.data[slot];
    }
  }
  ~Scratch() {
    if (bytes_ > kKeptScratchBytes) free(data_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  // A thread's kept buffers, freed when the thread ends (an idle engine ends its OpenMP workers).
  struct Kept {
    void* data[kNumScratchSlots] = {};
    long capacity[kNumScratchSlots] = {};
    ~Kept() {
      for (void* p : data) free(p);
    }
  };
  static Kept& kept() {
    static thread_local Kept k;
    return k;
  }
  void* data_;
  long bytes_;
};

}  // namespace pyxf::kernels
