// Picks a kernel table from what the CPU supports (cpuid via the compiler's builtins).
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "kernels/kernels.h"

namespace pyxf::kernels {
namespace generic { void fill_table(KernelTable* t); }
namespace avx2 { void fill_table(KernelTable* t); }
namespace avx512 { void fill_table(KernelTable* t); }
namespace avx512bf16 { void fill_table(KernelTable* t); }
#if PYXF_WITH_AMX
namespace avx512amx { void fill_table(KernelTable* t); }
#endif

namespace {

struct Isa {
  const char* name;
  void (*fill)(KernelTable*);
  bool (*supported)();
};

bool always() { return true; }
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("bmi2");
}
// AVX512_BF16 (vdpbf16ps): Intel from Cooper Lake / Sapphire Rapids, AMD from Zen 4.
bool has_avx512_bf16() {
  __builtin_cpu_init();
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}

#if PYXF_WITH_AMX
// AMX-TILE and AMX-BF16 (cpuid leaf 7: edx bits 24 and 22), and the tile state granted: Linux keeps
// it off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); the grant is
// the process's, for every thread. A kernel that refuses (or predates the call) leaves AMX unused.
bool has_amx_bf16() {
  static const bool usable = [] {
    if (!has_avx512_bf16()) return false;
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((edx >> 24) & 1) || !((edx >> 22) & 1)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}
#endif

const Isa kIsas[] = {
    {"generic", generic::fill_table, always},
    {"avx2", avx2::fill_table, has_avx2},
    {"avx512", avx512::fill_table, has_avx512},
    {"avx512_bf16", avx512bf16::fill_table, has_avx512_bf16},
#if PYXF_WITH_AMX
    {"avx512_amx", avx512amx::fill_table, has_amx_bf16},
#endif
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

KernelTable g_table;

bool select(const char* name) {
  for (const Isa& isa : kIsas) {
    if (std::strcmp(isa.name, name) == 0 && isa.supported()) {
      isa.fill(&g_table);
      return true;
    }
  }
  return false;
}

bool init_default() {
  const char* forced = std::getenv("PYXF_ISA");
  if (forced && *forced && select(forced)) return true;
  for (int i = kNumIsas - 1; i >= 0; --i) {
    if (kIsas[i].supported()) return select(kIsas[i].name);
  }
  return false;
}

const bool g_initialized = init_default();

// A kernel-variant setting: its names (indexed by the enum's values) and the index of a name, or -1.
template <int N>
int variant_index(const char* const (&names)[N], const char* name) {
  for (int i = 0; name && i < N; ++i) {
    if (std::strcmp(name, names[i]) == 0) return i;
  }
  return -1;
}

// A setting's start: the environment variable's value when it names a variant, else the last (auto).
template <class E, int N>
E initial_variant(const char* const (&names)[N], const char* variable) {
  const int i = variant_index(names, std::getenv(variable));
  return (E)(i < 0 ? N - 1 : i);
}

const char* const kQuantGemvNames[] = {"rows", "stream", "auto"};
QuantGemv g_quant_gemv = initial_variant<QuantGemv>(kQuantGemvNames, "PYXF_QUANT_GEMV");

const char* const kBf16GemmNames[] = {"dot", "widen", "auto"};
Bf16Gemm g_bf16_gemm = initial_variant<Bf16Gemm>(kBf16GemmNames, "PYXF_BF16_GEMM");

bool is_amd() {
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
}

}  // namespace

const KernelTable& active() {
  (void)g_initialized;
  return g_table;
}

int available_isas(const char** names, int max_names) {
  int n = 0;
  for (const Isa& isa : kIsas) {
    if (isa.supported() && n < max_names) names[n++] = isa.name;
  }
  return n;
}

bool set_isa(const char* name) { return select(name); }

QuantGemv quant_gemv(QuantFormat f) {
  if (g_quant_gemv != QuantGemv::kAuto) return g_quant_gemv;
  const bool five_bit = f == QuantFormat::kQ5_0 || f == QuantFormat::kQ5_1;
  return is_amd() || !five_bit ? QuantGemv::kStream : QuantGemv::kRows;
}
const char* quant_gemv_name() { return kQuantGemvNames[(int)g_quant_gemv]; }
bool set_quant_gemv(const char* name) {
  const int i = variant_index(kQuantGemvNames, name);
  if (i >= 0) g_quant_gemv = (QuantGemv)i;
  return i >= 0;
}

bool bf16_gemm_widens() {
  return g_bf16_gemm == Bf16Gemm::kAuto ? !is_amd() : g_bf16_gemm == Bf16Gemm::kWiden;
}
const char* bf16_gemm_name() { return kBf16GemmNames[(int)g_bf16_gemm]; }
bool set_bf16_gemm(const char* name) {
  const int i = variant_index(kBf16GemmNames, name);
  if (i >= 0) g_bf16_gemm = (Bf16Gemm)i;
  return i >= 0;
}

int quant_row_bytes(QuantFormat f, long cols) {
  const long blocks = cols / quant_block_cols(f);
  switch (f) {
    case QuantFormat::kQ8_0: return (int)(blocks * (2 + kQuantBlock));
    case QuantFormat::kQ4_0: return (int)(blocks * (2 + kQuantBlock / 2));
    case QuantFormat::kQ4_1: return (int)(blocks * (4 + kQuantBlock / 2));
    case QuantFormat::kQ5_0: return (int)(blocks * (2 + 4 + kQuantBlock / 2));
    case QuantFormat::kQ5_1: return (int)(blocks * (4 + 4 + kQuantBlock / 2));
    case QuantFormat::kQ4_K: return (int)(blocks * 144);
    case QuantFormat::kQ5_K: return (int)(blocks * 176);
    case QuantFormat::kQ6_K: return (int)(blocks * 210);
    case QuantFormat::kInt8:
    default: return (int)cols;
  }
}

}  // namespace pyxf::kernels
