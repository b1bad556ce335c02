"""Weight quantization in numpy: the stored formats the core runs (docs/DESIGN.md, "Quantized weights").

Block formats are GGUF's, bit for bit, each row of K weights stored as K/B blocks. B = 32:

    q8_0  34 bytes: fp16 d, int8 q[32]                         w = d * q
    q4_0  18 bytes: fp16 d, uint8 qs[16]                       w = d * (nibble - 8)
    q4_1  20 bytes: fp16 d, fp16 m, uint8 qs[16]               w = d * nibble + m
    q5_0  22 bytes: fp16 d, uint32 qh, uint8 qs[16]            w = d * (q - 16), q = nibble | qh bit << 4
    q5_1  24 bytes: fp16 d, fp16 m, uint32 qh, uint8 qs[16]    w = d * q + m
          (byte j of qs holds weight j in its low nibble and weight j + 16 in its high nibble; bit j
          of qh is the fifth bit of weight j)

and the K-quants, super-blocks of B = 256 (layouts in docs/DESIGN.md):

    q4_k  144 bytes: 8 sub-blocks of 32 with 6-bit scales and mins   w = d * sc * q - dmin * m
    q5_k  176 bytes: as q4_k with 5-bit q
    q6_k  210 bytes: 16 sub-blocks of 16 with int8 scales            w = d * sc * (q - 32)

and `int8`: int8 [N, K] with one float32 scale per output row (symmetric), stored beside the weight
as NAME_scale. The scale is the one between max|w| / 127 and half of it that gives the row the least
squared error: clipping a row's few outliers keeps more levels for the rest (on all-MiniLM-L6-v2
the lowest embedding cosine against float32 rises from 0.9942 to 0.9953).

The 32-blocks are quantized as llama.cpp's reference quantizers do, bit-exact with gguf.quants.quantize;
the K-quants by pyxf's port of llama.cpp's reference search (ggml-quants.c, no importance matrix):
per sub-block a weighted least-squares fit of scale and min over a range of candidate scales, then
the sub-block scales quantized to 6 (8) bits and the weights requantized with them.

Block-format tensors are uint8 arrays [N, row_bytes]; int8 ones are int8 [N, K]. A tensor whose row
ranges have different formats (the q, k, v rows of a Q4_K_M file) is stored as one uint8 array of
its segments' bytes, each segment in its own format (`segments`).
"""

from __future__ import annotations

import numpy as np

from . import _kquant, spec

__all__ = [
    "BLOCK",
    "FORMATS",
    "block_cols",
    "dequantize",
    "fit_format",
    "formats_of",
    "planned_format",
    "quantizable",
    "quantize",
    "quantize_as",
    "row_bytes",
    "scale_name",
    "segments",
    "stored_dtype",
    "stored_shape",
]

FORMATS = ("int8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
BLOCK = 32  # every quantized row holds a multiple of this many weights
SUPER_BLOCK = 256
# format -> (weights per block, bytes per block)
_BLOCKS = {
    "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24),
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
}
# What llama.cpp's quantizer uses for a K-quant when a row's length is not a multiple of 256
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


# Rows are quantized this many at a time, bounding the temporaries of a large embedding.
_CHUNK_ROWS = 2048


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def block_cols(fmt: str) -> int:
    """Weights per block: a row of `fmt` holds a multiple of this many (int8: 1)."""
    return 1 if check_format(fmt) == "int8" else _BLOCKS[fmt][0]


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes of one stored row of `cols` weights (int8: one byte a weight; scales stored apart)."""
    if check_format(fmt) == "int8":
        return cols
    size, nbytes = _BLOCKS[fmt]
    return cols // size * nbytes


def fit_format(fmt: str, cols: int) -> str | None:
    """The format a row of `cols` weights gets when `fmt` is asked for: `fmt` when its blocks fit,
    else llama.cpp's fallback for K-quants (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), else None
    (the tensor stays float)."""
    check_format(fmt)
    if cols <= 0:
        return None
    if cols % block_cols(fmt) == 0:
        return fmt
    fallback = _FALLBACK.get(fmt)
    return fit_format(fallback, cols) if fallback else None


def segments(spec, rows: int) -> list[tuple[str, int]]:
    """A tensor's quantization spec as [(format, rows), ...]: a format name (all rows), or a list of
    [format, rows] pairs covering the rows in order (mixed formats; no int8)."""
    if isinstance(spec, str):
        check_format(spec)
        return [(spec, rows)]
    try:
        parts = [(str(fmt), int(n)) for fmt, n in spec]
    except (TypeError, ValueError):
        raise ValueError(f"a quantization spec is a format name or [[format, rows], ...], got {spec!r}") from None
    for fmt, n in parts:
        if check_format(fmt) == "int8" or n <= 0:
            raise ValueError(f"bad segment {[fmt, n]!r} in {spec!r} (block formats, positive row counts)")
    if sum(n for _, n in parts) != rows:
        raise ValueError(f"the segments of {spec!r} cover {sum(n for _, n in parts)} rows, not {rows}")
    return parts


def formats_of(spec) -> list[str]:
    """The formats a tensor's spec uses, in row order."""
    return [spec] if isinstance(spec, str) else [str(fmt) for fmt, _ in spec]


def stored_shape(spec, shape) -> tuple[int, ...]:
    """The stored array's shape for a [rows, cols] tensor: [rows, row_bytes], or [total bytes] for a
    tensor in several formats."""
    rows, cols = shape
    parts = segments(spec, rows)
    if len(parts) == 1:
        return (rows, row_bytes(parts[0][0], cols))
    return (sum(n * row_bytes(fmt, cols) for fmt, n in parts),)


def stored_dtype(fmt) -> str:
    """The safetensors dtype of a quantized tensor: I8 for int8, U8 (raw blocks) otherwise."""
    return "I8" if isinstance(fmt, str) and check_format(fmt) == "int8" else "U8"


def scale_name(name: str) -> str:
    """Where an int8 tensor's per-row float32 scales are stored."""
    return name + "_scale"


def quantizable(name: str, shape, embeddings: bool = False) -> bool:
    """Whether a pyxf tensor can be stored quantized: the tensors the model specs (pyxf.spec) declare
    quantizable, the layers' linear weights and the head; token embeddings when `embeddings`. Rows
    whose length is not a multiple of 32 stay float, as do norms, biases and other 1-D tensors."""
    kind = spec.quantizable_name(name)
    if not kind or (kind == spec.EMBEDDING and not embeddings):
        return False
    return len(shape) == 2 and shape[1] % BLOCK == 0 and shape[1] > 0


# The output projection's format for `--quantize F` where llama.cpp's quantizer gives it more bits
# than F: the head (lm_head, or the embedding when it is the tied head) of a model of fewer than 8
# bits is q6_k, which falls back to q8_0 where its rows are not a multiple of 256 (as llama.cpp's).
HEAD_FORMATS = dict.fromkeys(("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k"), "q6_k")


def planned_format(name: str, shape, fmt: str, tied_head: bool, embeddings: bool = True) -> str | None:
    """The format `--quantize fmt` stores a pyxf tensor in, or None (it stays float): the tensors
    llama.cpp's quantizer quantizes (every linear weight, the token embedding and the output
    projection; not norms, biases, position embeddings or other small tensors), the head in
    HEAD_FORMATS' format, K-quants falling back where rows are not a multiple of 256 (fit_format).
    `tied_head`: embed.weight is also the head; `embeddings=False` keeps embed.weight (and so a tied
    head) float. llama.cpp's mixes (q4_k_m, q5_k_m) are pyxf.quant_mix's."""
    check_format(fmt)
    if not quantizable(name, shape, embeddings):
        return None
    is_head = name == "lm_head.weight" or (tied_head and name == "embed.weight")
    return fit_format(HEAD_FORMATS.get(fmt, fmt) if is_head else fmt, shape[1])


# ---------------------------------------------------------------------------------------------
# quantizing


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exact in float32 (floor(a + 0.5) is not, near 0.5)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(2 * (a - whole)), x)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[blocks, 32] values 0..15 -> [blocks, 16] bytes: low nibble weight j, high nibble j + 16."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _q8_0_blocks(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(b * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16_bytes(d), q], axis=1)


def _q4_0_blocks(b: np.ndarray) -> np.ndarray:
    # d from the value of largest magnitude, signed, so that it maps to -8 exactly
    extreme = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = extreme / np.float32(-8)
    q = np.minimum(np.trunc(b * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


def _q4_1_blocks(b: np.ndarray) -> np.ndarray:
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(15)
    q = np.minimum(np.trunc((b - lo) * _inverse(d) + np.float32(0.5)), 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)


def _pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """[blocks, 32] values 0..31 -> [blocks, 4] bytes: bit j of the little-endian uint32 is q_j's bit 4."""
    return np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=1, bitorder="little")


def _q5_0_blocks(b: np.ndarray) -> np.ndarray:
    extreme = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    d = extreme / np.float32(-16)
    q = np.minimum(np.trunc(b * _inverse(d) + np.float32(16.5)), 31).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q & np.uint8(15))], axis=1)


def _q5_1_blocks(b: np.ndarray) -> np.ndarray:
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(31)
    q = np.minimum(np.trunc((b - lo) * _inverse(d) + np.float32(0.5)), 31).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_fifth_bits(q), _pack_nibbles(q & np.uint8(15))], axis=1)


def _q4_k_blocks(b: np.ndarray) -> np.ndarray:
    return _kquant.q45_k_blocks(b, bits=4)


def _q5_k_blocks(b: np.ndarray) -> np.ndarray:
    return _kquant.q45_k_blocks(b, bits=5)


def _q6_k_blocks(b: np.ndarray) -> np.ndarray:
    return _kquant.q6_k_blocks(b)


_BLOCK_QUANTIZERS = {
    "q8_0": _q8_0_blocks, "q4_0": _q4_0_blocks, "q4_1": _q4_1_blocks, "q5_0": _q5_0_blocks,
    "q5_1": _q5_1_blocks, "q4_k": _q4_k_blocks, "q5_k": _q5_k_blocks, "q6_k": _q6_k_blocks,
}


def _int8_round(x, s):
    q = np.rint(np.divide(x, s[:, None], out=np.zeros_like(x), where=s[:, None] > 0))
    return np.clip(q, -127, 127).astype(np.int8)


def _int8_row_scales(x):
    """Per row, the scale of least squared error among max|x| / 127 times 1, 0.95, ..., 0.5, then
    refined in steps of 0.01 around the best."""
    top = np.abs(x).max(axis=1) / np.float32(127)
    best, best_err = top.copy(), np.full(len(x), np.inf)

    def consider(factors):
        nonlocal best, best_err
        for f in factors:
            s = (top * np.asarray(f, np.float32)).astype(np.float32)
            err = np.square(_int8_round(x, s).astype(np.float32) * s[:, None] - x).sum(axis=1)
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)

    consider(np.linspace(1.0, 0.5, 11))
    coarse = np.divide(best, top, out=np.ones_like(best), where=top > 0)
    consider([np.clip(coarse + d, 0.5, 1.0) for d in (-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04)])
    return best.astype(np.float32)


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantizes a float matrix [N, K] (K a multiple of 32 for the block formats).

    Returns (data, scales): uint8 [N, row_bytes] and None for the block formats; int8 [N, K] and
    float32 [N] for int8. K-quants need K a multiple of 256."""
    check_format(fmt)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"can only quantize matrices, got shape {w.shape}")
    n, k = w.shape
    if fmt == "int8":
        data, scales = np.empty((n, k), np.int8), np.empty(n, np.float32)
        for r in range(0, n, _CHUNK_ROWS):
            x = np.asarray(w[r : r + _CHUNK_ROWS], dtype=np.float32)
            s = _int8_row_scales(x)
            data[r : r + len(x)] = _int8_round(x, s)
            scales[r : r + len(x)] = s
        return data, scales
    size = block_cols(fmt)
    if k % size:
        raise ValueError(f"{fmt} needs rows whose length is a multiple of {size}, got {k}")
    data = np.empty((n, row_bytes(fmt, k)), np.uint8)
    for r in range(0, n, _CHUNK_ROWS):
        x = np.asarray(w[r : r + _CHUNK_ROWS], dtype=np.float32)
        blocks = _BLOCK_QUANTIZERS[fmt](x.reshape(-1, size))
        data[r : r + len(x)] = blocks.reshape(len(x), -1)
    return data, None


def quantize_as(w: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray | None]:
    """quantize() for a tensor's spec: a format name, or [[format, rows], ...] (the row ranges in
    their formats, as one flat byte array)."""
    if isinstance(spec, str):
        return quantize(w, spec)
    parts, start = [], 0
    for fmt, n in segments(spec, np.asarray(w).shape[0]):
        parts.append(quantize(w[start : start + n], fmt)[0].reshape(-1))
        start += n
    return np.concatenate(parts), None


# ---------------------------------------------------------------------------------------------
# dequantizing (tests, tools; the core has its own)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).astype(np.float32)


def dequantize(data: np.ndarray, fmt, scales: np.ndarray | None = None, shape=None) -> np.ndarray:
    """The float32 matrix [N, K] a quantized tensor stands for. A tensor of several formats (`fmt` a
    list of [format, rows]) is a flat byte array and needs its `shape`."""
    if not isinstance(fmt, str):
        if shape is None:
            raise ValueError("a tensor of several formats needs its shape to be dequantized")
        rows, cols = shape
        out, start = [], 0
        for part, n in segments(fmt, rows):
            size = n * row_bytes(part, cols)
            out.append(dequantize(np.asarray(data)[start : start + size].reshape(n, -1), part))
            start += size
        return np.concatenate(out)
    check_format(fmt)
    data = np.asarray(data)
    if fmt in ("q5_0", "q5_1", "q4_k", "q5_k", "q6_k"):  # gguf's reference dequantizers
        import gguf

        qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
        return gguf.quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8), qtype).reshape(data.shape[0], -1)
    if fmt == "int8":
        if scales is None:
            raise ValueError("int8 tensors need their per-row scales")
        return data.view(np.int8).astype(np.float32) * np.asarray(scales, np.float32)[:, None]
    n = data.shape[0]
    size = _BLOCKS[fmt][1]
    if data.ndim != 2 or data.shape[1] % size:
        raise ValueError(f"{fmt} data must be [N, a multiple of {size}] bytes, got {data.shape}")
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if fmt == "q8_0":
        w = d * b[:, 2:].view(np.int8).astype(np.float32)
    elif fmt == "q4_0":
        w = d * (_unpack_nibbles(b[:, 2:]) - np.float32(8))
    else:
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        w = d * _unpack_nibbles(b[:, 4:]) + m
    return w.reshape(n, -1)
