// Coverage for atheris under gcc's AddressSanitizer.
//
// atheris reports Python coverage and comparisons to the libFuzzer inside its extension module
// (core_with_libfuzzer) through the __sanitizer_cov_* functions. gcc's libasan, which has to be
// preloaded to run pyxf's sanitized build, defines the same functions as weak no-ops, and the
// dynamic linker binds every call to the first definition it finds, libasan's: libFuzzer would see
// no coverage at all and fuzz blindly. Preloaded before libasan, this library defines them
// strongly and forwards each call to libFuzzer's own, looked up in the module by its path
// (PYXF_LIBFUZZER_MODULE, which tools/fuzz.py sets; the module is loaded by the time atheris calls).
// Every forwarded function takes at most three integer or pointer arguments, which the x86-64
// calling convention passes in registers, so one forwarding shape serves them all.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*Forward)(uint64_t, uint64_t, uint64_t);

static Forward lookup(const char* name) {
  const char* path = getenv("PYXF_LIBFUZZER_MODULE");
  void* module = path ? dlopen(path, RTLD_NOLOAD | RTLD_LAZY) : NULL;
  Forward f = module ? (Forward)dlsym(module, name) : NULL;
  if (!f) {
    fprintf(stderr, "coverage_shim: %s not found in PYXF_LIBFUZZER_MODULE=%s\n", name, path ? path : "(unset)");
    abort();
  }
  return f;
}

#define FORWARD(name)                                       \
  void name(uint64_t a, uint64_t b, uint64_t c) {           \
    static Forward f;                                       \
    if (!f) f = lookup(#name);                              \
    f(a, b, c);                                             \
  }

FORWARD(__sanitizer_cov_8bit_counters_init)
FORWARD(__sanitizer_cov_pcs_init)
FORWARD(__sanitizer_cov_trace_cmp1)
FORWARD(__sanitizer_cov_trace_cmp2)
FORWARD(__sanitizer_cov_trace_cmp4)
FORWARD(__sanitizer_cov_trace_cmp8)
FORWARD(__sanitizer_cov_trace_const_cmp1)
FORWARD(__sanitizer_cov_trace_const_cmp2)
FORWARD(__sanitizer_cov_trace_const_cmp4)
FORWARD(__sanitizer_cov_trace_const_cmp8)
FORWARD(__sanitizer_cov_trace_div4)
FORWARD(__sanitizer_cov_trace_div8)
FORWARD(__sanitizer_cov_trace_gep)
FORWARD(__sanitizer_cov_trace_switch)
FORWARD(__sanitizer_cov_trace_pc_indir)
