"""Importing a GGUF file (llama.cpp): metadata -> normalized config, tensors dequantized.

Every quantization `gguf.quants.dequantize` knows (Q4_0, Q4_1, Q5_*, Q8_0, K-quants, ...) is
expanded to float32 one tensor at a time; the writer then casts to the requested dtype. BF16
tensors also offer their bits (`load_bf16`): converted to bfloat16 they are moved, never widened.
Q/K rows of llama-architecture files are un-permuted back to HF's rotate-half order (see
families.py).

Tensors stored in a type the core runs natively (KEPT_TYPES: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K) also offer their raw blocks, uint8 [rows, row_bytes] (`GGUFTensor.load_raw`), which
`convert` copies as they are by default: the Q/K un-permutation and the q,k,v / gate,up
concatenations move whole rows, so they apply to block rows unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .families import family_for_gguf
from .schema import Checkpoint, SourceTensor
from .gguf_file import read_gguf
from .tokenizer_gguf import write_tokenizer


# GGUF tensor types whose blocks the core runs as they are stored -> pyxf's format name. A type
# added here is kept by `pyxf convert` (no flags); the others are dequantized to floats.
KEPT_TYPES = {
    "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1",
    "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k",
}


@dataclass(frozen=True)
class GGUFTensor(SourceTensor):
    ggml_type: str = "F32"  # GGMLQuantizationType name
    # raw blocks [rows, row_bytes], or [experts, rows, row_bytes] for expert stacks (KEPT_TYPES only)
    load_raw: Callable[[], np.ndarray] | None = None

    @property
    def block_format(self) -> str | None:
        """pyxf's name of this tensor's block format when its blocks can be kept, else None."""
        return KEPT_TYPES.get(self.ggml_type) if len(self.shape) in (2, 3) else None


def _dequantizer(tensor, path: Path):
    import gguf

    shape = tuple(reversed(tensor.dims))  # ggml lists dimensions innermost first
    kind = tensor.ggml_type.name

    def load() -> np.ndarray:
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.ggml_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name!r}: cannot dequantize type {kind}") from None
        return np.asarray(array, dtype=np.float32).reshape(shape)

    def load_raw() -> np.ndarray:
        return np.asarray(tensor.data, dtype=np.uint8).reshape(*shape[:-1], -1)

    def load_bf16() -> np.ndarray:  # the stored bits: a bfloat16 output is written without widening
        return np.asarray(tensor.data, dtype=np.uint8).view("<u2").reshape(shape)

    return GGUFTensor(shape, load, load_bf16=load_bf16 if kind == "BF16" else None, ggml_type=kind,
                      load_raw=load_raw if kind in KEPT_TYPES else None)


# llama.cpp's LongRoPE (phi3): the per-frequency factors as tensors, the rest as metadata.
_LONGROPE_TENSORS = {"short_factor": "rope_factors_short.weight", "long_factor": "rope_factors_long.weight"}


def _longrope_scaling(meta: dict, arch: str, tensors) -> dict:
    """HF's longrope rope_scaling from llama.cpp's rope_factors_short / rope_factors_long tensors,
    {arch}.rope.scaling.attn_factor and {arch}.rope.scaling.original_context_length."""
    missing = [name for name in _LONGROPE_TENSORS.values() if name not in tensors]
    if missing:
        raise ValueError(f"LongRoPE factors need both rope_factors_short and rope_factors_long; {missing[0]} is missing")
    key = f"{arch}.rope.scaling.original_context_length"
    original = meta.get(key)
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ValueError(f"LongRoPE factors need {key} as a positive integer, got {original!r}")
    scaling = {"rope_type": "longrope", "original_max_position_embeddings": original}
    for factors, name in _LONGROPE_TENSORS.items():
        scaling[factors] = [float(f) for f in np.ravel(tensors[name].load())]
    key = f"{arch}.rope.scaling.attn_factor"
    attention_factor = meta.get(key)
    if attention_factor is not None:
        if isinstance(attention_factor, bool) or not isinstance(attention_factor, (int, float)):
            raise ValueError(f"{key} must be a number, got {str(attention_factor)[:80]}")
        scaling["attention_factor"] = float(attention_factor)
    return scaling


def _rope_scaling(meta: dict, arch: str, tensors) -> dict | None:
    if "rope_freqs.weight" in tensors:
        raise ValueError("per-frequency RoPE factors (rope_freqs.weight, e.g. Llama 3.1) are not supported yet")
    if any(name in tensors for name in _LONGROPE_TENSORS.values()):
        return _longrope_scaling(meta, arch, tensors)
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _single_value(value, key: str) -> int:
    """Some files give per-layer arrays (e.g. head_count_kv); pyxf needs one value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{key} differs between layers ({sorted(set(value))}); not supported")
        value = value[0]
    return int(value)


def _sliding_window(meta: dict, arch: str, context_length: int) -> int | None:
    """{arch}.attention.sliding_window when shorter than the context (0, absent or longer: none), as
    the converter reads an HF config's sliding_window."""
    window = meta.get(f"{arch}.attention.sliding_window")
    if window is None:
        return None
    window = _single_value(window, "attention.sliding_window")
    return window if 0 < window < context_length else None


# Whether llama.cpp renormalizes the chosen experts' weights, by architecture, for files without
# `{arch}.expert_weights_norm`: Mixtral (llama) and Qwen3-MoE do, Qwen2-MoE does not.
_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True}


def _expert_config(meta: dict, arch: str) -> dict:
    """The mixture-of-experts fields of `{arch}.expert_*` metadata (none: a dense model)."""
    experts = meta.get(f"{arch}.expert_count")
    if not experts:
        return {}
    used = meta.get(f"{arch}.expert_used_count")
    if used is None:
        raise ValueError(f"GGUF metadata has {arch}.expert_count but lacks {arch}.expert_used_count")
    gating = meta.get(f"{arch}.expert_gating_func")
    if gating not in (None, 1):  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise ValueError(f"GGUF metadata {arch}.expert_gating_func = {gating}: only softmax routing is supported")
    scale = meta.get(f"{arch}.expert_weights_scale")
    if scale not in (None, 1, 1.0):
        raise ValueError(f"GGUF metadata {arch}.expert_weights_scale = {scale}: "
                         "scaled expert weights are not supported")
    config = {
        "num_experts": _single_value(experts, "expert_count"),
        "num_experts_per_tok": _single_value(used, "expert_used_count"),
        "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", _EXPERT_WEIGHTS_NORM.get(arch, True))),
    }
    width = meta.get(f"{arch}.expert_feed_forward_length")
    if width is not None:  # Qwen-MoE: the experts' width, apart from the (unused) dense one
        config["intermediate_size"] = _single_value(width, "expert_feed_forward_length")
    shared = meta.get(f"{arch}.expert_shared_feed_forward_length")
    if shared:
        config["shared_expert_intermediate_size"] = _single_value(shared, "expert_shared_feed_forward_length")
    return config


def gguf_config(meta: dict, family_name: str, tensors) -> dict:
    """pyxf's normalized config from `{arch}.*` metadata (tokenizer fields filled later); `tensors`
    maps the file's tensor names to SourceTensors (LongRoPE factors are read from them). The
    llama-like fields (llama, qwen2, qwen3, phi3, and with experts llama (Mixtral), qwen2moe,
    qwen3moe), which a family's `gguf_config` hook completes (Gemma's)."""
    arch = meta["general.architecture"]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    def size(key, value):  # sizes are divided by and allocated with: a positive integer or an error
        value = _single_value(value, key)
        if value <= 0:
            raise ValueError(f"GGUF metadata {arch}.{key} must be a positive integer, got {value}")
        return value

    hidden = size("embedding_length", get("embedding_length"))
    heads = size("attention.head_count", get("attention.head_count"))
    kv_heads = size("attention.head_count_kv", get("attention.head_count_kv", heads))
    head_dim = size("attention.key_length", get("attention.key_length", hidden // heads))
    rope_dims = size("rope.dimension_count", get("rope.dimension_count", head_dim))
    context_length = int(get("context_length", 2048))
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "format": "pyxf",
        "format_version": 1,
        "family": family_name,
        "architecture": "decoder",
        "vocab_size": len(tokens) if tokens else int(get("vocab_size")),  # tokens are authoritative
        "hidden_size": hidden,
        "num_layers": int(get("block_count")),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": _single_value(get("feed_forward_length"), "feed_forward_length"),
        **_expert_config(meta, arch),
        "norm": "rmsnorm",
        "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "norm_position": "pre",
        "activation": "silu",
        "gated_ffn": True,
        "qk_norm": arch in ("qwen3", "qwen3moe"),  # per-head q/k RMSNorm (blk.N.attn_q_norm / attn_k_norm)
        "position": "rope",
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, tensors),
        "rope_interleaved": False,  # the importer restores rotate-half order
        "partial_rotary_factor": rope_dims / head_dim,
        "max_position_embeddings": context_length,
        "sliding_window": _sliding_window(meta, arch, context_length),
        "tie_word_embeddings": "output.weight" not in tensors,
    }


def open_gguf(path) -> Checkpoint:
    """Open a GGUF file for conversion."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        import gguf  # noqa: F401 -- its tables and dequantizers
    except ImportError:
        raise ImportError(f"reading {path} needs the gguf package (pip install gguf)") from None
    file = read_gguf(path)
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise ValueError(f"{path}: GGUF metadata lacks general.architecture")
    try:
        family, table = family_for_gguf(arch)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tensors = {t.name: _dequantizer(t, path) for t in file.tensors}
    try:
        config = gguf_config(meta, family.name, tensors)
        if family.gguf_config is not None:
            config = family.gguf_config(config, meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if family.gguf_tables is not None:
        table = family.gguf_tables(config, table)
    tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return Checkpoint(
        config=config,
        table=table,
        tensors=tensors,
        write_tokenizer=lambda out_dir: write_tokenizer(tokenizer_meta, out_dir),
        source={"format": "gguf", "path": path.name},
        stored_dtype=_stored_dtype(tensors),
    )


# GGUF float types -> pyxf's dtype names
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _stored_dtype(tensors: dict[str, GGUFTensor]) -> str:
    """A BF16 or F16 file's 16-bit type (every matrix in it), which convert keeps when no dtype is
    given, as it keeps quantized blocks; float32 for any other file. Vectors (norms, biases) do not
    count: llama.cpp stores them in F32 in every file type."""
    kinds = {t.ggml_type for t in tensors.values() if len(t.shape) >= 2}
    return _FLOAT_TYPES[kinds.pop()] if len(kinds) == 1 and kinds <= set(_FLOAT_TYPES) else "float32"
