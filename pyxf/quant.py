"""Weight quantization in numpy: the stored formats the core runs (docs/DESIGN.md, "Quantized weights").

Block formats are GGUF's, bit for bit (llama.cpp's reference quantizers, ggml-quants.c), 32 weights
per block, each row of K weights stored as K/32 blocks:

    q8_0  34 bytes: fp16 d, int8 q[32]                 w = d * q
    q4_0  18 bytes: fp16 d, uint8 qs[16]               w = d * (nibble - 8)
    q4_1  20 bytes: fp16 d, fp16 m, uint8 qs[16]       w = d * nibble + m
          (byte j of qs holds weight j in its low nibble and weight j + 16 in its high nibble)

and `int8`: int8 [N, K] with one float32 scale per output row (symmetric, scale = max|w| / 127),
stored beside the weight as NAME_scale.

Block-format tensors are uint8 arrays [N, row_bytes]; int8 ones are int8 [N, K].
"""

from __future__ import annotations

import re

import numpy as np

__all__ = [
    "BLOCK",
    "FORMATS",
    "dequantize",
    "planned_format",
    "quantizable",
    "quantize",
    "row_bytes",
    "scale_name",
    "stored_dtype",
]

FORMATS = ("int8", "q8_0", "q4_0", "q4_1")
BLOCK = 32
_BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16, "q4_1": 4 + 16}

# The linear layers the core runs quantized (besides embed.weight).
_LINEAR = re.compile(r"^(layers\.\d+\.(attn\.qkv|attn\.out|ffn\.gate_up|ffn\.up|ffn\.down)|lm_head)\.weight$")

# Rows are quantized this many at a time, bounding the temporaries of a large embedding.
_CHUNK_ROWS = 2048


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes of one stored row of `cols` weights (int8: one byte a weight; scales stored apart)."""
    check_format(fmt)
    if fmt == "int8":
        return cols
    return cols // BLOCK * _BLOCK_BYTES[fmt]


def stored_dtype(fmt: str) -> str:
    """The safetensors dtype of a quantized tensor: I8 for int8, U8 (raw blocks) otherwise."""
    return "I8" if check_format(fmt) == "int8" else "U8"


def scale_name(name: str) -> str:
    """Where an int8 tensor's per-row float32 scales are stored."""
    return name + "_scale"


def quantizable(name: str, shape, embeddings: bool = False) -> bool:
    """Whether a pyxf tensor can be stored quantized: the layers' linear weights (qkv, attn.out,
    gate_up/up, down) and lm_head; embed.weight when `embeddings`. Rows whose length is not a
    multiple of 32 stay float, as do norms, biases and other 1-D tensors."""
    if not (_LINEAR.match(name) or (embeddings and name == "embed.weight")):
        return False
    return len(shape) == 2 and shape[1] % BLOCK == 0 and shape[1] > 0


# The output projection's format for `--quantize F` where llama.cpp's quantizer gives it more bits
# than F: the head (lm_head, or the embedding when it is the tied head) of a 4-bit model stays at 8
# bits (llama.cpp: Q6_K when its rows are a multiple of 256, else Q8_0; pyxf has no Q6_K yet).
HEAD_FORMATS = {"q4_0": "q8_0", "q4_1": "q8_0"}


def planned_format(name: str, shape, fmt: str, tied_head: bool, embeddings: bool = True) -> str | None:
    """The format `--quantize fmt` stores a pyxf tensor in, or None (it stays float): the tensors
    llama.cpp's quantizer quantizes (every linear weight, the token embedding and the output
    projection; not norms, biases, position embeddings or other small tensors), the head in
    HEAD_FORMATS' format. `tied_head`: embed.weight is also the head; `embeddings=False` keeps
    embed.weight (and so a tied head) float."""
    check_format(fmt)
    if not quantizable(name, shape, embeddings):
        return None
    is_head = name == "lm_head.weight" or (tied_head and name == "embed.weight")
    return HEAD_FORMATS.get(fmt, fmt) if is_head else fmt


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


_BLOCK_QUANTIZERS = {"q8_0": _q8_0_blocks, "q4_0": _q4_0_blocks, "q4_1": _q4_1_blocks}


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantizes a float matrix [N, K] (K a multiple of 32 for the block formats).

    Returns (data, scales): uint8 [N, row_bytes] and None for the block formats; int8 [N, K] and
    float32 [N] for int8."""
    check_format(fmt)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"can only quantize matrices, got shape {w.shape}")
    n, k = w.shape
    if fmt == "int8":
        data, scales = np.empty((n, k), np.int8), np.empty(n, np.float32)
        for r in range(0, n, _CHUNK_ROWS):
            x = np.asarray(w[r : r + _CHUNK_ROWS], dtype=np.float32)
            s = np.abs(x).max(axis=1) / np.float32(127)
            q = np.rint(np.divide(x, s[:, None], out=np.zeros_like(x), where=s[:, None] > 0))
            data[r : r + len(x)] = np.clip(q, -127, 127).astype(np.int8)
            scales[r : r + len(x)] = s
        return data, scales
    if k % BLOCK:
        raise ValueError(f"{fmt} needs rows whose length is a multiple of {BLOCK}, got {k}")
    data = np.empty((n, row_bytes(fmt, k)), np.uint8)
    for r in range(0, n, _CHUNK_ROWS):
        x = np.asarray(w[r : r + _CHUNK_ROWS], dtype=np.float32)
        blocks = _BLOCK_QUANTIZERS[fmt](x.reshape(-1, BLOCK))
        data[r : r + len(x)] = blocks.reshape(len(x), -1)
    return data, None


# ---------------------------------------------------------------------------------------------
# dequantizing (tests, tools; the core has its own)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).astype(np.float32)


def dequantize(data: np.ndarray, fmt: str, scales: np.ndarray | None = None) -> np.ndarray:
    """The float32 matrix [N, K] a quantized tensor stands for."""
    check_format(fmt)
    data = np.asarray(data)
    if fmt == "int8":
        if scales is None:
            raise ValueError("int8 tensors need their per-row scales")
        return data.view(np.int8).astype(np.float32) * np.asarray(scales, np.float32)[:, None]
    n = data.shape[0]
    size = _BLOCK_BYTES[fmt]
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
