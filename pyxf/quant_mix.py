"""Which format each tensor gets when a model is quantized with a method: one format for every
eligible tensor, or one of llama.cpp's K-quant mixes.

    q4_k_m, q5_k_m   llama.cpp's Q4_K_M / Q5_K_M: q4_k (q5_k) everywhere, except q6_k for the LM head
                     (a tied embedding serves as head), and for the v rows of attention and ffn.down
                     (the experts' and the shared expert's too) in the first and last eighth of the
                     layers and every third layer between (llama.cpp's use_more_bits). The token
                     embedding is included, as with a plain format (quant.planned_format).

Rows whose length is not a multiple of a K-quant's 256 get llama.cpp's fallback (q4_k -> q5_0,
q5_k -> q5_1, q6_k -> q8_0), as in llama.cpp's files: SmolLM2's hidden size is 576.
"""

from __future__ import annotations

import re

from . import quant, spec

# mix -> the format of the tensors it does not single out
MIXES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k"}
METHODS = quant.FORMATS + tuple(MIXES)

_LAYER = re.compile(r"^layers\.(\d+)\.")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; known: {', '.join(METHODS)}")
    return method


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attention v and ffn_down get q6_k in the _M mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_spec(name: str, shape, config: dict, method: str, tied_head: bool, embeddings: bool = True):
    """The quantization of tensor `name` [rows, cols] under `method`: a format name, [[format, rows],
    ...] for a tensor whose row ranges differ (a mix's q, k / v rows), or None (it stays float).
    The tensors are those llama.cpp's quantizer quantizes (pyxf.quant.planned_format; `tied_head`:
    embed.weight is also the head; embeddings=False keeps embed.weight float); a plain format gives
    them quant.planned_format's formats, a mix the formats above."""
    check_method(method)
    if method not in MIXES:
        return quant.planned_format(name, shape, method, tied_head, embeddings)
    if not quant.quantizable(name, shape, embeddings):
        return None
    rows, cols = shape[0], shape[-1]
    base = MIXES[method]
    layer = _LAYER.match(name)
    more = layer is not None and more_bits(int(layer.group(1)), config["num_layers"])
    if name == "lm_head.weight" or (name == "embed.weight" and tied_head):
        return quant.fit_format("q6_k", cols)
    if name.endswith((".ffn.down.weight", ".ffn.experts.down.weight", ".ffn.shared.down.weight")):
        return quant.fit_format("q6_k" if more else base, cols)
    parts = dict(spec.tensor_layout(config).lookup(name).parts)
    if "v" in parts:  # attention's v rows, the last part of a fused q, k, v
        v_rows = parts["v"]
        return _segments([(base, rows - v_rows), ("q6_k" if more else base, v_rows)], cols)
    return quant.fit_format(base, cols)


def _segments(parts, cols):
    """[(format, rows), ...] fitted to the row length and merged: a format name when all agree."""
    merged = []
    for fmt, n in parts:
        fitted = quant.fit_format(fmt, cols)
        if fitted is None:
            return None
        if merged and merged[-1][0] == fitted:
            merged[-1][1] += n
        else:
            merged.append([fitted, n])
    return merged[0][0] if len(merged) == 1 else merged
