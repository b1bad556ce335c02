// The process-wide thread count. OpenMP keeps the count per calling thread, so threads the core
// starts itself (the serving engine's) adopt the process-wide value before each parallel step.
#pragma once

namespace pyxf {
void set_num_threads(int n);
int num_threads();
// Makes the calling thread's parallel regions use num_threads().
void adopt_num_threads();
}  // namespace pyxf
