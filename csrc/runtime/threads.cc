#include "runtime/threads.h"

#include <omp.h>

#include <atomic>

namespace pyxf {
namespace {
std::atomic<int> g_threads{0};  // 0: not set, OpenMP's default
}

void set_num_threads(int n) {
  g_threads = n > 0 ? n : 1;
  omp_set_num_threads(g_threads);
}

int num_threads() {
  const int n = g_threads;
  return n > 0 ? n : omp_get_max_threads();
}

void adopt_num_threads() {
  const int n = g_threads;
  if (n > 0 && n != omp_get_max_threads()) omp_set_num_threads(n);
}
}  // namespace pyxf
