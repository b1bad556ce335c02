#!/usr/bin/env bash
# Builds pyxf's extension with sanitizers and runs tests against it (what .ci/run does after the
# normal tests; the subset it runs by default is README's "Sanitizers").
#
#   bash tools/sanitize.sh                      # ASan + UBSan build, the default test subset
#   bash tools/sanitize.sh address -k engine    # the same build, pytest arguments of your own
#   bash tools/sanitize.sh thread               # TSan build, the thread-safety tests
#   bash tools/sanitize.sh address --build-only # only build; prints the environment to use it
#
# The build lives in build/sanitize-KIND/: the CMake tree, and site/pyxf, a package directory that
# links every Python source of pyxf/ and holds the sanitized _core beside them, so the tests import
# that extension (conftest.py honours PYXF_IMPORT_ROOT) and the in-place or installed builds are
# left alone. A sanitizer report ends the process with a non-zero status, so pytest (and CI) fail.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

kind=${1:-address}
shift || true
case "$kind" in
  address) sanitize=address,undefined; runtime=libasan.so ;;
  thread) sanitize=thread; runtime=libtsan.so ;;
  *) echo "usage: tools/sanitize.sh [address|thread] [--build-only | pytest arguments]" >&2; exit 2 ;;
esac
build=build/sanitize-$kind
cxx=${CXX:-g++}

mkdir -p "$build"
exec 9>"$build/.lock"  # one build at a time (fuzzers start this script in parallel)
flock 9
# RelWithDebInfo: debug information, and none of the link-time optimization and stripping that
# pybind11 adds to Release modules.
cmake -S . -B "$build/cmake" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYXF_SANITIZE="$sanitize" \
  -DCMAKE_CXX_COMPILER="$(command -v "$cxx")" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build/cmake" -j "${JOBS:-2}"

site=$build/site/pyxf
mkdir -p "$site"
for entry in pyxf/*; do
  case "$(basename "$entry")" in _core*|__pycache__) continue ;; esac
  ln -sfn "$root/$entry" "$site/"
done
for so in "$build"/cmake/_core*.so; do  # beside, then renamed: running processes keep their copy
  cp "$so" "$site/.tmp.so" && mv -f "$site/.tmp.so" "$site/$(basename "$so")"
done
flock -u 9

# The sanitizer's runtime must be loaded before anything else in the (uninstrumented) interpreter,
# and libstdc++ with it: the python binary does not link it, and ASan can only intercept
# __cxa_throw (every C++ exception) if libstdc++ is there when it starts.
export LD_PRELOAD="$("$cxx" -print-file-name="$runtime") $("$cxx" -print-file-name=libstdc++.so)"
# Reports go to files (pytest captures the test process's stderr, and a report ends that process).
reports=$root/$build/reports
rm -rf "$reports"
mkdir -p "$reports"
# detect_leaks=0: CPython and numpy keep allocations alive until exit by design (interned objects,
# module state), thousands of reports that are not pyxf's. allocator_may_return_null=1: an
# allocation larger than the machine allows (a test asks for a 64 GiB KV cache) must fail as
# malloc does (std::bad_alloc -> MemoryError), not abort the process as ASan does by default.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:check_initialization_order=1:strict_init_order=1:log_path=$reports/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan}
# libgomp is not built with TSan, so its barriers and task queues are invisible to TSan; the
# suppressions file names those frames and says why each is not a pyxf race.
# history_size=7: the longest access history, so that the earlier access of a report (often an
# OpenMP worker's) has its stack, which the suppressions match.
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:history_size=7:suppressions=$root/tools/tsan.supp:log_path=$reports/tsan}
export PYXF_IMPORT_ROOT=$root/$build/site
# Spinning OpenMP workers make a sanitized run several times slower on a small machine.
export OMP_WAIT_POLICY=PASSIVE

if [ "${1:-}" = "--build-only" ]; then
  echo "LD_PRELOAD='$LD_PRELOAD' PYXF_IMPORT_ROOT=$PYXF_IMPORT_ROOT ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS TSAN_OPTIONS=$TSAN_OPTIONS"
  exit 0
fi
# The tests must import the sanitized extension (conftest.py puts PYXF_IMPORT_ROOT first); so must this.
(cd / && PYTHONPATH=$PYXF_IMPORT_ROOT python -c "import pyxf._core as c, sys; s = c.info()['sanitize']; \
  print('pyxf._core', c.__file__, 'sanitize=' + s); sys.exit(s != '$sanitize')")

status=0
run() { python -m pytest -p no:cacheprovider "$@" || status=$?; }
if [ $# -gt 0 ]; then
  run "$@"
elif [ "$kind" = thread ]; then
  run -q tests/test_threads.py
else
  # The default subset (README "Sanitizers"): every kernel under every ISA the CPU has (the kernel
  # tests loop over them), both GEMM paths and attention tails, the quantized formats (K-quants), the decoder
  # and encoder parity tests, sessions, the engine (speculative decoding), seq2seq with beam search, the threads tests,
  # the resource limits and the fuzz regressions; then the model-level paths with lower ISAs forced.
  run -q tests/test_kernels.py tests/test_quant_kernels.py tests/test_kquant.py tests/test_half_weights.py \
    tests/test_parity_llama.py tests/test_parity_gpt2.py tests/test_parity_gemma.py tests/test_parity_moe.py \
    tests/test_seq2seq_fairseq.py tests/test_engine.py tests/test_speculative.py \
    tests/test_seq2seq.py tests/test_encoders.py tests/test_limits.py tests/test_threads.py \
    tests/test_fuzz_regressions.py
  for isa in avx2 generic; do
    PYXF_ISA=$isa run -q tests/test_parity_llama.py tests/test_seq2seq.py tests/test_engine.py \
      -k "greedy or beam or prefill or decode or transformers"
  done
fi
if compgen -G "$reports/*" >/dev/null; then
  echo "sanitizer reports:" >&2
  cat "$reports"/* >&2
  exit 1
fi
exit $status
