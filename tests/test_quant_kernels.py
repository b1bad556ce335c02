"""Quantized kernels under every ISA against numpy doing the same quantized arithmetic.

Weights are quantized by the `gguf` package (llama.cpp's reference layout); activations are
quantized per block of 32 to int8 with scale max|x|/127, as the kernels do. The reference then
multiplies the dequantized values in float64, so the only difference left is fp32 rounding. Where
the avx512_amx table runs the int8 format's many rows on bf16 tiles, the reference rounds the
activations and the dequantized weights to bf16 instead (reference_product).
"""
import numpy as np
import pytest
from helpers import bf16_bits

gguf = pytest.importorskip("gguf")
from pyxf import _core  # noqa: E402

QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
}


# Every ISA; on AVX-512 both decode GEMVs (the CPU picks one: "stream" on AMD, "rows" elsewhere).
KERNELS = [isa for isa in _core.info()["isas"] if isa != "avx512"] + (
    ["avx512-rows", "avx512-stream"] if "avx512" in _core.info()["isas"] else [])


@pytest.fixture(params=KERNELS)
def isa(request):
    before, gemv_before = _core.get_isa(), _core.get_quant_gemv()
    name, _, gemv = request.param.partition("-")
    _core.set_isa(name)
    if gemv:
        _core.set_quant_gemv(gemv)
    yield name
    _core.set_isa(before)
    _core.set_quant_gemv(gemv_before)


def quantized_activations(x):
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(blocks * inv) * (amax / np.float32(127))).reshape(m, k)


def on_tiles(isa, fmt, m):
    """Whether m rows of the int8 format run on the AMX table's bf16 tiles (from 16 rows)."""
    return isa == "avx512_amx" and fmt == "int8" and m >= 16


def reference_product(x, w_deq, isa, fmt, rows=None):
    """x w_deq^T in float64 after the rounding the kernel serving x (in a call of `rows` rows,
    default all of x's) applies."""
    if on_tiles(isa, fmt, len(x) if rows is None else rows):
        return bf16_bits(x)[1].astype(np.float64) @ bf16_bits(w_deq)[1].T.astype(np.float64)
    return quantized_activations(x).astype(np.float64) @ w_deq.T.astype(np.float64)


def quantized_weight(w, fmt):
    """(stored weight, int8 row scales or None, its dequantized values) of float w in fmt."""
    if fmt == "int8":
        scales = (np.abs(w).max(1) / 127).astype(np.float32)
        wq = np.rint(w / scales[:, None]).astype(np.int8)
        return wq, scales, wq * scales[:, None]
    wq = gguf.quants.quantize(w, QTYPES[fmt])
    return wq, None, gguf.quants.dequantize(wq, QTYPES[fmt]).reshape(w.shape)


@pytest.mark.parametrize("fmt", sorted(QTYPES))
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (3, 576, 100), (17, 96, 33), (40, 1536, 7)])
def test_block_formats_match_reference(isa, fmt, m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    wq = gguf.quants.quantize(w, QTYPES[fmt])
    w_deq = gguf.quants.dequantize(wq, QTYPES[fmt]).reshape(n, k)

    np.testing.assert_array_equal(_core.ops.dequantize(wq, fmt, k), w_deq)
    ref = quantized_activations(x).astype(np.float64) @ w_deq.T.astype(np.float64) + bias
    y = _core.ops.linear_quant(x, wq, fmt, bias=bias)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def product_case(fmt, m, k, n, seed):
    """Random activations x [m, k], a weight [n, k] in fmt (stored, row scales, dequantized), a bias."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return (x, *quantized_weight(w, fmt), bias)


@pytest.mark.parametrize("fmt", sorted(QTYPES) + ["int8"])
@pytest.mark.parametrize("m,k,n", [(2, 96, 9), (4, 160, 13), (5, 224, 8), (8, 576, 37), (15, 32, 6), (18, 64, 10)])
def test_decode_batches_match_reference(isa, fmt, m, k, n):
    # Few rows (decode, batches below the GEMM's 16 rows, 20 where the GEMM would repack the weights
    # per call): the streaming kernels' tiles of 1-4 activation rows x 4 weight rows plus single
    # leftover rows, steps of 2 or 4 blocks with partial last ones.
    x, wq, scales, w_deq, bias = product_case(fmt, m, k, n, seed=m * 31 + k + n)
    y = _core.ops.linear_quant(x, wq, fmt, scales, bias=bias)
    ref = reference_product(x, w_deq, isa, fmt) + bias
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


# Few rows; GEMM tiles with partial ones; (AMX) 16 rows, and depth blocks that are no whole tile step.
@pytest.mark.parametrize("m,k,n", [(5, 128, 40), (40, 128, 37), (130, 128, 64), (16, 32, 5), (200, 1600, 70)])
def test_int8_per_channel_matches_reference(isa, m, k, n):
    rng = np.random.default_rng(7 + m)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    scale = (np.abs(w).max(1) / 127).astype(np.float32)
    wq = np.rint(w / scale[:, None]).astype(np.int8)
    ref = reference_product(x, wq * scale[:, None], isa, "int8")
    y = _core.ops.linear_quant(x, wq, "int8", scale)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def silu(v):
    return v / (1 + np.exp(-v))


def assert_gated_matches_reference(isa, fmt, m, inter, k, panels=False):
    """ffn_up of a gated FFN, silu(x gate^T) * (x up^T) for w = [gate; up], against float64."""
    rng = np.random.default_rng(m + inter)
    w = rng.standard_normal((2 * inter, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    wq, scales, w_deq = quantized_weight(w, fmt)
    gu = reference_product(x, w_deq, isa, fmt)
    ref = silu(gu[:, :inter]) * gu[:, inter:]
    y = _core.ops.linear_quant_gated(x, wq, fmt, scales, "silu", panels=panels)
    assert y.shape == (m, inter)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("m,inter", [(3, 64), (20, 48), (67, 96)])
def test_gated_ffn_up_matches_reference(isa, fmt, m, inter):
    # The fused kernel (AVX-512) applies the activation to GEMM tiles, others run the product and
    # the activation apart.
    assert_gated_matches_reference(isa, fmt, m, inter, k=160)


def test_quantized_product_is_close_to_float(isa):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    exact = x @ w.T
    for fmt, tol in [("q8_0", 0.02), ("q4_0", 0.15), ("q4_1", 0.15)]:
        y = _core.ops.linear_quant(x, gguf.quants.quantize(w, QTYPES[fmt]), fmt)
        assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < tol, fmt


def test_quant_gemv_choice():
    assert _core.info()["quant_gemv"] == _core.get_quant_gemv() in ("rows", "stream", "auto")
    with pytest.raises(ValueError, match="unknown quantized GEMV variant"):
        _core.set_quant_gemv("fast")


def test_bad_quantized_shapes_raise():
    x = np.ones((2, 48), np.float32)  # 48 is not a multiple of the block size
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.ops.linear_quant(x, np.zeros((3, 54), np.uint8), "q8_0")
    with pytest.raises(ValueError, match="shape"):
        _core.ops.linear_quant(np.ones((2, 64), np.float32), np.zeros((3, 10), np.uint8), "q8_0")
    with pytest.raises(ValueError, match="unknown quantization"):
        _core.ops.linear_quant(np.ones((2, 64), np.float32), np.zeros((3, 68), np.uint8), "q3_x")


@pytest.mark.parametrize("fmt", sorted(QTYPES) + ["int8"])
@pytest.mark.parametrize("m", [1, 20])  # the GEMV and (AVX-512) the VNNI GEMM
def test_non_finite_and_tiny_activations(isa, fmt, m):
    """A block of activations holding inf or NaN gives NaN outputs, as float math would (it was
    converted to integers: undefined behaviour, garbage in practice); a block of values so small
    that 127 / max overflows counts as zeros. Found by fuzzing model files under UBSan."""
    rng = np.random.default_rng(5)
    k, n = 96, 24
    w = rng.standard_normal((n, k)).astype(np.float32)
    if fmt == "int8":
        scale = (np.abs(w).max(1) / 127).astype(np.float32)
        wq, row_scales = np.rint(w / scale[:, None]).astype(np.int8), scale
        w_deq = wq * scale[:, None]
    else:
        wq, row_scales = gguf.quants.quantize(w, QTYPES[fmt]), None
        w_deq = gguf.quants.dequantize(wq, QTYPES[fmt]).reshape(n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 3], x[-1, 70] = np.inf, np.nan        # rows 0 and m-1: blocks 0 and 2
    x[m // 2, 32:64] = np.float32(1e-40)        # a block of denormals
    y = _core.ops.linear_quant(x, wq, fmt, row_scales=row_scales)
    if on_tiles(isa, fmt, m):  # float products: inf times the weights is +-inf (NaN where a weight is 0)
        assert not np.isfinite(y[0]).any() and np.isnan(y[-1]).all()
    else:
        assert np.isnan(y[0]).all() and np.isnan(y[-1]).all()
    clean = np.ones(m, bool)
    clean[[0, m - 1]] = False
    expected_x = x.copy()
    expected_x[m // 2, 32:64] = 0
    if clean.any():
        ref = reference_product(expected_x[clean], w_deq, isa, fmt, rows=m)
        assert np.isfinite(y[clean]).all()
        assert np.abs(y[clean] - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("fmt", ["q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("m", [1, 20])
def test_non_finite_activations_k_quants(isa, fmt, m):
    """The same for the formats whose activations are quantized by quant_k.cc: an inf or NaN in a
    row makes that row's outputs NaN; the other rows stay finite."""
    from pyxf import quant

    rng = np.random.default_rng(6)
    k, n = 512, 16
    data, _ = quant.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 300] = np.nan
    x[-1, 5] = -np.inf
    y = _core.ops.linear_quant(x, data, fmt)
    assert np.isnan(y[0]).all() and np.isnan(y[-1]).all()
    assert np.isfinite(y[1:-1]).all()


@pytest.mark.parametrize("fmt", ["int8", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("m,n", [(24, 32), (40, 37), (20, 128), (67, 100)])
def test_panels_made_at_load_give_the_same_products(isa, fmt, m, n):
    # Encoders and encoder-decoders give their matrices the GEMM's panel layout once at load
    # (panels=True here); the products must be those of panels packed per call, bit for bit, for
    # whole and partial 32-column panels, and for the gated FFN's up half that starts inside one.
    rng = np.random.default_rng(m * 7 + n)
    k = 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    wq, scales, w_deq = quantized_weight(w, fmt)
    ref = reference_product(x, w_deq, isa, fmt) + bias
    packed = _core.ops.linear_quant(x, wq, fmt, scales, bias=bias, panels=True)
    np.testing.assert_array_equal(packed, _core.ops.linear_quant(x, wq, fmt, scales, bias=bias))
    assert np.abs(packed - ref).max() <= 1e-5 * np.abs(ref).max()
    if n % 2 == 0:
        gated = _core.ops.linear_quant_gated(x, wq, fmt, scales, "silu", panels=True)
        np.testing.assert_array_equal(gated, _core.ops.linear_quant_gated(x, wq, fmt, scales, "silu"))
        gu = ref - bias
        assert np.abs(gated - silu(gu[:, :n // 2]) * gu[:, n // 2:]).max() <= 1e-5 * np.abs(gated).max() + 1e-6


STRIP_FORMATS = ["int8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
STRIP_KERNELS = [name for name in KERNELS if name.startswith("avx512")]


def has_strips(isa, fmt):
    """Whether the table repacks a decoder's fmt matrices into strips (AVX-512; the int8 format
    not on avx512_amx, whose tiles' GEMM reads its rows)."""
    return isa.startswith("avx512") and not (isa == "avx512_amx" and fmt == "int8")


@pytest.mark.parametrize("fmt", STRIP_FORMATS)
@pytest.mark.parametrize("m,k,n", [(1, 32, 16), (1, 576, 37), (3, 96, 5), (4, 160, 48), (5, 64, 17), (19, 1536, 33),
                                   (31, 96, 20), (32, 96, 37), (40, 576, 70)])
def test_decode_strips_match_reference(isa, fmt, m, k, n):
    # Decoders' int8 / q8_0 / q4_0 / q4_1 / q5_0 / q5_1 matrices are repacked at load into strips of
    # 16 rows where the table has that layout (AVX-512): the GEMV reads them below 32 rows, the GEMM
    # packs its panels from them from 32 (whole, partial and lone strips; one to four rows a tile and
    # leftovers).
    x, wq, scales, w_deq, bias = product_case(fmt, m, k, n, seed=m * 101 + k + n)
    if not has_strips(isa, fmt):
        with pytest.raises(ValueError, match="no decode layout"):
            _core.ops.linear_quant(x, wq, fmt, scales, bias=bias, panels="decode")
        return
    ref = reference_product(x, w_deq, isa, fmt) + bias
    y = _core.ops.linear_quant(x, wq, fmt, scales, bias=bias, panels="decode")
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    if m >= 32:  # the GEMM: the same panels as packed from the rows, so the same products
        np.testing.assert_array_equal(y, _core.ops.linear_quant(x, wq, fmt, scales, bias=bias))


@pytest.mark.parametrize("isa", STRIP_KERNELS, indirect=True)
@pytest.mark.parametrize("fmt", STRIP_FORMATS)
@pytest.mark.parametrize("m,inter", [(2, 24), (40, 24), (33, 64)])
def test_decode_strips_gated(isa, fmt, m, inter):
    # [gate; up] on strips: the up half starts inside a strip when inter % 16 != 0 (its panels are
    # then packed from the rows).
    if not has_strips(isa, fmt):
        with pytest.raises(ValueError, match="no decode layout"):
            assert_gated_matches_reference(isa, fmt, m, inter, k=128, panels="decode")
        return
    assert_gated_matches_reference(isa, fmt, m, inter, k=128, panels="decode")


@pytest.mark.parametrize("isa", STRIP_KERNELS, indirect=True)
def test_decode_strips_non_finite_rows(isa):
    """An inf or NaN in an activation row makes that row's outputs NaN on the strips too."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x[0, 50] = np.nan
    x[2, 3] = np.inf
    for fmt in filter(lambda f: has_strips(isa, f), STRIP_FORMATS):
        wq, scales, _ = quantized_weight(w, fmt)
        y = _core.ops.linear_quant(x, wq, fmt, scales, panels="decode")
        assert np.isnan(y[0]).all() and np.isnan(y[2]).all() and np.isfinite(y[1]).all()


def test_panels_argument_is_checked():
    x = np.ones((1, 32), np.float32)
    wq = gguf.quants.quantize(np.ones((4, 32), np.float32), QTYPES["q8_0"])
    with pytest.raises(ValueError, match="panels must be"):
        _core.ops.linear_quant(x, wq, "q8_0", panels="sideways")
    with pytest.raises(ValueError, match="repeat"):
        _core.ops.linear_quant(x, wq, "q8_0", repeat=0)
