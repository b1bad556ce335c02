"""GGUF's 5-bit blocks (q5_0, q5_1) and K-quants (q4_k, q5_k, q6_k): kernels, quantizers, and real
llama.cpp files.

- Kernels under every ISA: dequantized values equal to gguf.quants.dequantize (random blocks, edge
  scales), products equal to numpy on those values with the activations quantized as llama.cpp does
  for these weights (q8_K: per 256, q8_0: per 32), on random blocks and on a published Gemma 3
  Q4_K_M file's real tensors.
- Quantizers: q5_0 / q5_1 bit-exact with gguf.quants.quantize; K-quants against llama.cpp's own
  quantizer (ggml_quantize_chunk from llama-cpp-python's libggml).
- SmolLM2-135M in llama.cpp's Q4_K_M / Q5_K_M / Q6_K (tests/kquant_files.py): pyxf chooses the same
  format per tensor as llama.cpp, and runs the files with logits as close to the float model as
  llama.cpp's own logits are, top-1 as llama.cpp's except at its near-ties.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

import helpers
import kquant_files

gguf = pytest.importorskip("gguf")
from pyxf import _core, quant, quant_mix  # noqa: E402

T = gguf.GGMLQuantizationType
FORMATS = {  # format -> (GGML type, weights per block, bytes per block, offsets of its fp16 scales)
    "q5_0": (T.Q5_0, 32, 22, [0]),
    "q5_1": (T.Q5_1, 32, 24, [0, 2]),
    "q4_k": (T.Q4_K, 256, 144, [0, 2]),
    "q5_k": (T.Q5_K, 256, 176, [0, 2]),
    "q6_k": (T.Q6_K, 256, 210, [208]),
}


@pytest.fixture(params=_core.info()["isas"])
def isa(request):
    before = _core.get_isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(before)


def random_blocks(fmt, rows, cols, rng, scales=None):
    """Random bytes (every bit pattern is a valid block) with the fp16 scales set to `scales`
    (default: normal * 0.01), [rows, row bytes]."""
    _, size, nbytes, offsets = FORMATS[fmt]
    blocks = rng.integers(0, 256, size=(rows, cols // size, nbytes), dtype=np.uint8)
    for o in offsets:
        d = scales(rows, cols // size) if scales else rng.standard_normal((rows, cols // size)) * 0.01
        blocks[:, :, o : o + 2] = np.asarray(d, np.float16).view(np.uint8).reshape(rows, cols // size, 2)
    return blocks.reshape(rows, -1)


def reference_dequantize(data, fmt, cols):
    return gguf.quants.dequantize(np.ascontiguousarray(data), FORMATS[fmt][0]).reshape(-1, cols)


def quantized_activations(x, block):
    """x rounded as the kernels quantize it: int8 per `block` values, scale max|x| / 127."""
    m, k = x.shape
    blocks = x.reshape(m, k // block, block)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(blocks * inv) * (amax / np.float32(127))).reshape(m, k)


def reference_linear(x, w_deq, fmt, bias=None):
    ref = quantized_activations(x, FORMATS[fmt][1]).astype(np.float64) @ w_deq.T.astype(np.float64)
    return ref if bias is None else ref + bias


def assert_close(y, ref, rtol=2e-6):
    assert np.abs(y - ref).max() <= rtol * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# kernels


EDGE_SCALES = {
    "zero": lambda r, b: np.zeros((r, b)),
    "largest": lambda r, b: np.full((r, b), 65504.0),
    "subnormal": lambda r, b: np.full((r, b), 2.0**-20),
    "negative": lambda r, b: -np.abs(np.random.default_rng(1).standard_normal((r, b))),
    "mixed": lambda r, b: np.random.default_rng(2).choice([0.0, -0.0, 6e-8, 1.0, -3.5, 65504.0], size=(r, b)),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("scales", [None, *EDGE_SCALES])
def test_dequantized_values_equal_gguf(isa, fmt, scales):
    rng = np.random.default_rng(len(fmt) + len(scales or ""))
    cols = 512
    data = random_blocks(fmt, 9, cols, rng, EDGE_SCALES.get(scales))
    data[0] = 0  # all-zero blocks
    data[1, : FORMATS[fmt][2]] = 0xFF  # a block of all ones
    np.testing.assert_array_equal(_core.ops.dequantize(data, fmt, cols), reference_dequantize(data, fmt, cols))


SHAPES = {  # (rows of x, columns, rows of w): decode (few rows, tiles of 4 + tail) and the GEMM (>= 16)
    32: [(1, 32, 5), (3, 96, 9), (5, 576, 33), (16, 160, 40), (37, 1536, 37)],  # q5: odd block counts too
    256: [(1, 256, 5), (3, 512, 9), (5, 1536, 33), (16, 256, 40), (37, 768, 37)],
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_products_match_numpy(isa, fmt):
    for m, k, n in SHAPES[FORMATS[fmt][1]]:
        rng = np.random.default_rng(m * 100 + n)
        data = random_blocks(fmt, n, k, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        y = _core.ops.linear_quant(x, data, fmt, bias=bias)
        assert_close(y, reference_linear(x, reference_dequantize(data, fmt, k), fmt, bias))


def silu(v):
    return v / (1 + np.exp(-np.clip(v, -80, 80)))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("m", [3, 20, 67])
def test_gated_ffn_up_matches_numpy(isa, fmt, m):
    # w = [gate; up]: silu(x gate^T) * (x up^T); AVX-512 fuses the activation into the GEMM tiles
    rng = np.random.default_rng(m)
    k, inter = (96, 48) if FORMATS[fmt][1] == 32 else (512, 40)
    data = random_blocks(fmt, 2 * inter, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = reference_linear(x, reference_dequantize(data, fmt, k), fmt)
    want = silu(ref[:, :inter]) * ref[:, inter:]
    assert_close(_core.ops.linear_quant_gated(x, data, fmt, activation="silu"), want)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_decode_strips_match_numpy(isa, fmt):
    """Decoders' q5_0, q5_1 and K-quant matrices get strips of 16 rows at load on the AVX-512 tables
    (random blocks: every scale and minimum pattern): the strip GEMV below 32 rows, the GEMM on panels
    packed from the strips from 32 (the same products as from the rows), and [gate; up]."""
    block = FORMATS[fmt][1]
    shapes = SHAPES[block] + [(31, 2 * block, 20), (32, 2 * block, 48)]
    for m, k, n in shapes:
        rng = np.random.default_rng(m * 100 + n + 7)
        data = random_blocks(fmt, n, k, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        if not isa.startswith("avx512"):
            with pytest.raises(ValueError, match="no decode layout"):
                _core.ops.linear_quant(x, data, fmt, bias=bias, panels="decode")
            return
        y = _core.ops.linear_quant(x, data, fmt, bias=bias, panels="decode")
        assert_close(y, reference_linear(x, reference_dequantize(data, fmt, k), fmt, bias))
        if m >= 32:
            np.testing.assert_array_equal(y, _core.ops.linear_quant(x, data, fmt, bias=bias))
    for m, inter in ((3, 40), (40, 40), (33, 24)):  # the up half at a strip, and inside one
        rng = np.random.default_rng(m + inter)
        k = 2 * block
        data = random_blocks(fmt, 2 * inter, k, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref = reference_linear(x, reference_dequantize(data, fmt, k), fmt)
        want = silu(ref[:, :inter]) * ref[:, inter:]
        assert_close(_core.ops.linear_quant_gated(x, data, fmt, activation="silu", panels="decode"), want)


def test_rows_must_fit_the_blocks():
    data = np.zeros((4, 144), np.uint8)
    with pytest.raises(ValueError, match="multiple of 256"):
        _core.ops.linear_quant(np.zeros((1, 128), np.float32), data, "q4_k")


@pytest.fixture(scope="module")
def gemma_tensors():
    path = kquant_files.gemma_gguf()
    picked = {}
    for t in gguf.GGUFReader(path).tensors:
        name = t.tensor_type.name.lower()
        if len(t.shape) == 2 and name in ("q4_k", "q6_k", "q5_0", "q8_0") and len(picked.get(name, [])) < 2:
            cols = int(t.shape[0])
            data = np.asarray(t.data, np.uint8).reshape(int(t.shape[1]), -1)[:300]
            picked.setdefault(name, []).append((t.name, data, cols, t.tensor_type))
    assert set(picked) == {"q4_k", "q6_k", "q5_0", "q8_0"}, set(picked)
    return picked


def test_real_gemma_blocks(isa, gemma_tensors):
    rng = np.random.default_rng(0)
    for fmt, tensors in gemma_tensors.items():
        for name, data, cols, qtype in tensors:
            w = gguf.quants.dequantize(np.ascontiguousarray(data), qtype).reshape(-1, cols)
            np.testing.assert_array_equal(_core.ops.dequantize(data, fmt, cols), w, err_msg=name)
            block = 32 if fmt in ("q5_0", "q8_0") else 256
            for m in (1, 20):
                x = rng.standard_normal((m, cols)).astype(np.float32)
                ref = quantized_activations(x, block).astype(np.float64) @ w.T.astype(np.float64)
                assert_close(_core.ops.linear_quant(x, data, fmt), ref, rtol=5e-6)


# ---------------------------------------------------------------------------------------------
# quantizers


def awkward_matrix(rng, rows, cols):
    """Random rows plus blocks that stress the fits: zeros, constants, one large value, one sign."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :256] = 0
    w[1, :256] = 0.5
    w[2, :16] = 0
    w[3, 7] = 50
    w[4] = np.abs(w[4])
    w[5, :32] = np.linspace(-1, 1, 32)
    return w


@pytest.mark.parametrize("fmt", ["q5_0", "q5_1"])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e3])
def test_q5_quantization_is_bit_exact_with_gguf(fmt, scale):
    w = awkward_matrix(np.random.default_rng(int(scale * 11)), 40, 512) * np.float32(scale)
    mine, _ = quant.quantize(w, fmt)
    np.testing.assert_array_equal(mine, gguf.quants.quantize(w, FORMATS[fmt][0]))


def llama_cpp_quantize(w, fmt):
    """llama.cpp's quantizer for `fmt` (ggml_quantize_chunk, no importance matrix)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    w = np.ascontiguousarray(w, np.float32)
    out = np.zeros((w.shape[0], quant.row_bytes(fmt, w.shape[1])), np.uint8)
    lib.ggml_quantize_chunk(int(FORMATS[fmt][0]), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
    return out


@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e3])
def test_k_quantization_matches_llama_cpp(fmt, scale):
    # the same search as llama.cpp's reference quantizer; float sums in another order flip rare ties
    w = awkward_matrix(np.random.default_rng(int(scale * 13)), 64, 768) * np.float32(scale)
    mine, _ = quant.quantize(w, fmt)
    theirs = llama_cpp_quantize(w, fmt)
    assert mine.shape == theirs.shape
    assert (mine == theirs).mean() > 0.985
    err_mine = np.linalg.norm(quant.dequantize(mine, fmt) - w)
    err_theirs = np.linalg.norm(quant.dequantize(theirs, fmt) - w)
    assert err_mine <= 1.01 * err_theirs


def test_k_quant_fallbacks_and_segments():
    assert quant.fit_format("q4_k", 512) == "q4_k" and quant.fit_format("q4_k", 576) == "q5_0"
    assert quant.fit_format("q5_k", 576) == "q5_1" and quant.fit_format("q6_k", 576) == "q8_0"
    assert quant.fit_format("q6_k", 48) is None  # not even a 32-block: stays float
    w = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32)
    spec = [["q4_k", 4], ["q6_k", 2]]
    data, _ = quant.quantize_as(w, spec)
    assert data.shape == quant.stored_shape(spec, w.shape) == (4 * 144 + 2 * 210,)
    np.testing.assert_array_equal(quant.dequantize(data, spec, shape=w.shape),
                                  np.concatenate([quant.dequantize(quant.quantize(w[:4], "q4_k")[0], "q4_k"),
                                                  quant.dequantize(quant.quantize(w[4:], "q6_k")[0], "q6_k")]))
    for bad in ([["q4_k", 5]], [["int8", 6]], [["q9_9", 6]], "q3_k", [["q4_k"]]):
        with pytest.raises(ValueError):
            quant.segments(bad, 6)


# ---------------------------------------------------------------------------------------------
# llama.cpp's files of SmolLM2


def expected_specs(config, method):
    from pyxf.weights import expected_tensors

    shapes = {n: s for n, (s, _) in expected_tensors(config, max_tensors=10_000).items() if len(s) == 2}
    if config["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    specs = {n: quant_mix.tensor_spec(n, s, config, method, config["tie_word_embeddings"]) for n, s in shapes.items()}
    return {n: s for n, s in specs.items() if s is not None}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """{fmt: (GGUF path, pyxf model kept from it)} and the float reference on 1024 tokens of prose."""
    helpers.require_core()
    import pyxf
    from pyxf.convert import convert
    from test_quant_quality import TEXT

    out = tmp_path_factory.mktemp("kquant")
    f32 = kquant_files.smollm2_gguf("f32")
    reference = pyxf.load(convert(f32, out / "f32", progress=False))
    ids = reference.tokenizer.encode(TEXT)[:1024]
    models = {fmt: (kquant_files.smollm2_gguf(fmt),
                    pyxf.load(convert(kquant_files.smollm2_gguf(fmt), out / fmt, progress=False)))
              for fmt in kquant_files.SMOLLM2_FORMATS}
    return {"f32": f32, "reference": reference, "ids": ids, "models": models}


def llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 8, n_batch=512, n_threads=2, logits_all=True,
                          verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt", kquant_files.SMOLLM2_FORMATS)
def test_llama_cpp_files_keep_their_formats(smollm2, fmt):
    # every tensor as stored (q, k / v rows of one tensor in their own formats), as pyxf would choose
    model = smollm2["models"][fmt][1]
    q = model.config["quantization"]
    assert q["method"] == "gguf" and len(q["tensors"]) == 1 + 4 * model.config["num_layers"]
    method = fmt if fmt.endswith("_m") else "q6_k"
    assert q["tensors"] == expected_specs(model.config, method)
    if fmt == "q4_k_m":
        assert q["tensors"]["layers.0.attn.qkv.weight"] == [["q5_0", 768], ["q8_0", 192]]
        assert q["tensors"]["layers.3.attn.qkv.weight"] == "q5_0"
        assert {q["tensors"][f"layers.{i}.ffn.down.weight"] for i in range(30)} == {"q4_k", "q6_k"}


@pytest.mark.parametrize("fmt", kquant_files.SMOLLM2_FORMATS)
def test_logits_as_close_to_float_as_llama_cpp(smollm2, fmt):
    path, model = smollm2["models"][fmt]
    ids = smollm2["ids"]
    float_logits = smollm2["reference"].logits(ids)
    ours = model.logits(ids)
    theirs = llama_cpp_logits(path, ids)
    their_float = llama_cpp_logits(smollm2["f32"], ids)
    assert relative(their_float, float_logits) < 2e-3  # the same float model in both engines
    ours_err, their_err = relative(ours, float_logits), relative(theirs, their_float)
    ours_right, theirs_right = ours.argmax(1) == float_logits.argmax(1), theirs.argmax(1) == their_float.argmax(1)
    agree_ours, agree_theirs = ours_right.mean(), theirs_right.mean()
    print(f"\n{fmt}: logits vs float32 pyxf {ours_err:.4f}, llama.cpp {their_err:.4f}; "
          f"pyxf vs llama.cpp {relative(ours, theirs):.4f}; top-1 agreement with float32 pyxf "
          f"{agree_ours:.4f}, llama.cpp {agree_theirs:.4f}")
    assert ours_err <= 1.1 * their_err
    # No worse than llama.cpp beyond the noise of 1024 tokens: a rounding-level change to pyxf (e.g. the
    # order of a softmax's sums) moves the int8-quantized activations and with them ~1% of the
    # top-1s. Two standard errors of the paired difference (the tokens where exactly one engine
    # agrees with its float model), at least 0.02.
    discordant = np.count_nonzero(ours_right != theirs_right)
    assert agree_ours >= agree_theirs - max(0.02, 2 * np.sqrt(discordant) / len(ids)), discordant
    # Where pyxf's top-1 is not llama.cpp's, llama.cpp itself nearly ties the two: its margin is
    # within what the two engines' logits differ by (their rms difference: ~0.26 here, from
    # rounding and the int8 activations it flips), at most 5 times that.
    mine, its = ours.argmax(1), theirs.argmax(1)
    differ = np.nonzero(mine != its)[0]
    assert len(differ) <= 0.1 * len(ids)
    gaps = theirs[differ, its[differ]] - theirs[differ, mine[differ]]
    spread = float(np.sqrt(np.mean((ours - theirs) ** 2)))
    assert gaps.max(initial=0) < 5 * spread, (gaps.max(), spread)


def test_greedy_tokens_are_llama_cpp_choices(smollm2):
    # pyxf's greedy continuation, teacher-forced through llama.cpp: every token is llama.cpp's top-1
    # or within a near-tie of it
    import pyxf

    path, model = smollm2["models"]["q4_k_m"]
    for prompt in ("The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"):
        ids = model.tokenizer.encode(prompt)
        new = pyxf.generate(model, [ids], max_new_tokens=24, temperature=0)[0]
        theirs = llama_cpp_logits(path, ids + new)[len(ids) - 1 : len(ids) - 1 + len(new)]
        gaps = theirs.max(1) - theirs[np.arange(len(new)), new]
        assert (gaps == 0).mean() >= 0.8 and gaps.max() < 0.75, (prompt, gaps)
