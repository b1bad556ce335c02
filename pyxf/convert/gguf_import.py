"""Importing a GGUF file (llama.cpp): metadata -> normalized config, tensors dequantized.

Every quantization `gguf.quants.dequantize` knows (Q4_0, Q4_1, Q5_*, Q8_0, K-quants, ...) is
expanded to float32 one tensor at a time; the writer then casts to the requested dtype. Q/K rows
of llama-architecture files are un-permuted back to HF's rotate-half order (see families.py).

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
    load_raw: Callable[[], np.ndarray] | None = None  # raw blocks [rows, row_bytes] (KEPT_TYPES only)

    @property
    def block_format(self) -> str | None:
        """pyxf's name of this tensor's block format when its blocks can be kept, else None."""
        return KEPT_TYPES.get(self.ggml_type) if len(self.shape) == 2 else None


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
        return np.asarray(tensor.data, dtype=np.uint8).reshape(shape[0], -1)

    return GGUFTensor(shape, load, ggml_type=kind, load_raw=load_raw if kind in KEPT_TYPES else None)


def _rope_scaling(meta: dict, arch: str, tensor_names) -> dict | None:
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("per-frequency RoPE factors (rope_freqs.weight, e.g. Llama 3.1) are not supported yet")
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


def gguf_config(meta: dict, family_name: str, tensor_names) -> dict:
    """pyxf's normalized config from `{arch}.*` metadata (tokenizer fields filled later): the
    llama-like fields, which a family's `gguf_config` hook completes (Gemma's)."""
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
        "norm": "rmsnorm",
        "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "norm_position": "pre",
        "activation": "silu",
        "gated_ffn": True,
        "qk_norm": arch == "qwen3",  # per-head q/k RMSNorm (blk.N.attn_q_norm / attn_k_norm)
        "position": "rope",
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, tensor_names),
        "rope_interleaved": False,  # the importer restores rotate-half order
        "partial_rotary_factor": rope_dims / head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
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
        config = gguf_config(meta, family.name, tensors.keys())
        if family.gguf_config is not None:
            config = family.gguf_config(config, meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return Checkpoint(
        config=config,
        table=table,
        tensors=tensors,
        write_tokenizer=lambda out_dir: write_tokenizer(tokenizer_meta, out_dir),
        source={"format": "gguf", "path": path.name},
    )
