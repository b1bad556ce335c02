#include "runtime/threads.h"

#include <omp.h>

namespace pyxf {
void set_num_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }
int num_threads() { return omp_get_max_threads(); }
}  // namespace pyxf
