// Vectors whose data start on a cache line (64 bytes). The GEMMs' AMX tiles store rows of 64 bytes:
// into an array that starts off a line, each row of a tile touches two lines (the encoders' GEMMs
// ran ~25% slower into std::vector's 16-byte-aligned buffers).
#pragma once
#include <cstdlib>
#include <new>
#include <vector>

namespace pyxf::kernels {

constexpr std::size_t kCacheLine = 64;

template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + kCacheLine - 1) / kCacheLine * kCacheLine;
    void* p = std::aligned_alloc(kCacheLine, bytes ? bytes : kCacheLine);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace pyxf::kernels
