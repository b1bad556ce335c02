#!/usr/bin/env bash
# Builds the extension in place (pyxf/_core*.so) for development; `pip install .` is the real build.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>build/.dev_build.lock 2>/dev/null || { mkdir -p build; exec 9>build/.dev_build.lock; }
flock 9
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build build/dev -j "${JOBS:-2}"
# Copy beside, then rename: a running process that has the old .so mapped keeps its (unlinked) file;
# copying over it in place would change pages under that process (SIGBUS).
for so in build/dev/_core*.so; do
  name=$(basename "$so")
  cp "$so" "pyxf/.$name.tmp" && mv -f "pyxf/.$name.tmp" "pyxf/$name"
done
