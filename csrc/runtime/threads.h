// The process-wide thread count. OpenMP keeps the count per calling thread, so threads the core
// starts itself (the serving engine's) adopt the process-wide value before each parallel step.
#pragma once

namespace pyxf {
void set_num_threads(int n);
int num_threads();
// Makes the calling thread's parallel regions use num_threads().
void adopt_num_threads();
// Ends the calling thread's OpenMP worker threads (they are started again by its next parallel
// region). For threads that call into the core now and then (Python's), not the engine's: libgomp
// counts the workers of every thread's pool, and once they outnumber the CPUs every team stops
// spinning at its barriers and sleeps instead, so each barrier costs a futex wake-up (after one
// 512-token prefill from Python, SmolLM2 q8_0 decoding on the engine's thread fell from 210 to
// 105 tokens/s on 2 CPUs). Restarting the workers costs tens of microseconds per call.
void release_thread_pool();
// The number of threads a parallel region started by the calling thread runs (for tests).
int parallel_team_size();
}  // namespace pyxf
