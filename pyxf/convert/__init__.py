"""Converting checkpoints (HF directories, state_dict files, GGUF) into pyxf model directories.

    from pyxf.convert import convert
    convert("path/to/hf_model_or.gguf", "out_dir", dtype="float16")

or from the shell: `pyxf convert SRC OUT [--dtype float16]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from ..tensorfile import SafetensorsWriter, float32_to_bf16
from .families import Checkpoint, build_tensor, plan_tensors, planned_shape

__all__ = ["DTYPES", "convert", "expected_shape", "main"]

# pyxf dtype -> safetensors dtype name
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# config.json key order, as docs/DESIGN.md lists them
_CONFIG_KEYS = [
    "format",
    "format_version",
    "family",
    "architecture",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "norm",
    "norm_eps",
    "norm_position",
    "activation",
    "gated_ffn",
    "position",
    "rope_theta",
    "rope_scaling",
    "rope_interleaved",
    "partial_rotary_factor",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "chat_template",
    "tokenizer",
    "add_bos_token",
    "dtype",
    "source",
]


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_checkpoint(src: Path, config=None) -> Checkpoint:
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if is_gguf(src):
        from .gguf_import import open_gguf

        return open_gguf(src)
    from .hf import open_hf

    return open_hf(src, config)


# ---------------------------------------------------------------------------------------------
# shape checks against docs/DESIGN.md's tensor table


def expected_shape(name: str, cfg: dict) -> tuple | None:
    """The shape DESIGN.md prescribes for a pyxf tensor, or None for names it does not list."""
    H, V, D, I = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"], cfg["intermediate_size"]
    qkv = (cfg["num_heads"] + 2 * cfg["num_kv_heads"]) * D
    parts = name.split(".")
    key = ".".join(parts[2:]) if parts[0] == "layers" else name
    return {
        "embed.weight": (V, H),
        "pos_embed.weight": (cfg["max_position_embeddings"], H),
        "final_norm.weight": (H,),
        "final_norm.bias": (H,),
        "lm_head.weight": (V, H),
        "lm_head.bias": (V,),
        "attn_norm.weight": (H,),
        "attn_norm.bias": (H,),
        "ffn_norm.weight": (H,),
        "ffn_norm.bias": (H,),
        "attn.qkv.weight": (qkv, H),
        "attn.qkv.bias": (qkv,),
        "attn.out.weight": (H, cfg["num_heads"] * D),
        "attn.out.bias": (H,),
        "ffn.gate_up.weight": (2 * I, H),
        "ffn.gate_up.bias": (2 * I,),
        "ffn.up.weight": (I, H),
        "ffn.up.bias": (I,),
        "ffn.down.weight": (H, I),
        "ffn.down.bias": (H,),
    }.get(key)


def _check_shapes(shapes: dict[str, tuple], cfg: dict, src: Path) -> None:
    wrong = [
        f"{name} {list(shape)} (expected {list(expected_shape(name, cfg))})"
        for name, shape in shapes.items()
        if expected_shape(name, cfg) not in (None, tuple(shape))
    ]
    if wrong:
        raise ValueError(f"{src}: tensor shapes disagree with the config: {'; '.join(wrong)}")


# ---------------------------------------------------------------------------------------------
# writing


def _cast(array: np.ndarray, dtype: str, name: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "bfloat16":
        return float32_to_bf16(array)
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    if not np.isfinite(half).all() and np.isfinite(array).all():
        warnings.warn(f"{name}: values beyond float16's range became inf; consider bfloat16")
    return half


def _ordered_config(config: dict) -> dict:
    ordered = {key: config[key] for key in _CONFIG_KEYS if key in config}
    ordered.update({k: v for k, v in config.items() if k not in ordered})
    return ordered


def _progress(items, enabled: bool, total: int):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="converting", unit="tensor")


def _write_weights(path: Path, ckpt: Checkpoint, plan, shapes: dict, dtype: str, progress: bool) -> None:
    specs = [(p.target, DTYPES[dtype], shapes[p.target]) for p in plan]

    def load(name):
        return ckpt.tensors[name].load()

    with SafetensorsWriter(path, specs, metadata={"format": "pt", "producer": "pyxf.convert"}) as writer:
        for p in _progress(plan, progress, len(plan)):
            array = build_tensor(p, load, ckpt.config)
            if tuple(array.shape) != shapes[p.target]:
                raise ValueError(f"{p.target}: built shape {array.shape}, expected {shapes[p.target]}")
            writer.write(p.target, _cast(array, dtype, p.target))


def convert(src, out, dtype: str = "float32", progress: bool = True, config=None) -> Path:
    """Convert `src` (GGUF file, HF model directory, or state_dict file) into the pyxf model
    directory `out`; returns `out`. `config` (path or dict) is the HF config.json for a bare
    state_dict file when none lies beside it. dtype: float32 | float16 | bfloat16."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    ckpt = open_checkpoint(src, config)

    try:
        plan, unused = plan_tensors(ckpt.table, list(ckpt.tensors), ckpt.config)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if unused:
        warnings.warn(f"{src}: {len(unused)} source tensors not used: {', '.join(unused[:10])}")
    shapes = {p.target: planned_shape(p, {n: t.shape for n, t in ckpt.tensors.items()}, ckpt.config) for p in plan}
    _check_shapes(shapes, ckpt.config, src)

    out.mkdir(parents=True, exist_ok=True)
    config = dict(ckpt.config)
    config.update(ckpt.write_tokenizer(out))
    config["dtype"] = dtype
    config["source"] = ckpt.source

    partial = out / "model.safetensors.partial"
    try:
        _write_weights(partial, ckpt, plan, shapes, dtype, progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out / "model.safetensors")
    # config.json last: its presence marks a complete directory
    (out / "config.json").write_text(json.dumps(_ordered_config(config), indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv=None) -> int:
    """`pyxf convert SRC OUT [--dtype D] [--config CONFIG] [--quiet]`"""
    parser = argparse.ArgumentParser(prog="pyxf convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="GGUF file, Hugging Face model directory, or state_dict file")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default float32)")
    parser.add_argument("--config", help="HF config.json for a bare state_dict file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, dtype=args.dtype, progress=not args.quiet, config=args.config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"pyxf convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
