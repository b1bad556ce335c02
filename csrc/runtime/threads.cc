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

void release_thread_pool() {
  // OpenMP 5.0: a soft pause frees the calling thread's resources (libgomp: its thread pool), and
  // only when it is outside any parallel region; otherwise it returns non-zero and changes nothing.
  if (!omp_in_parallel()) omp_pause_resource_all(omp_pause_soft);
}

int parallel_team_size() {
  int n = 0;
#pragma omp parallel
  {
#pragma omp single
    n = omp_get_num_threads();
  }
  return n;
}
}  // namespace pyxf
