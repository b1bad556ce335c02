"""Converting checkpoints (HF directories, state_dict files, GGUF) into pyxf model directories.

    from pyxf.convert import convert
    convert("path/to/hf_model_or.gguf", "out_dir", dtype="float16")

or from the shell: `pyxf convert SRC OUT [--dtype float16] [--quantize q4_1] [--keep-quantized]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from .. import quant
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
    "causal",
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
    "position_offset",
    "type_vocab_size",
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
    "max_length",
    "pooler",
    "pooling",
    "classifier",
    "dtype",
    "quantization",
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


# Transforms that only move whole rows: they apply to rows of quantized blocks unchanged.
_ROW_TRANSFORMS = (None, "unpermute_q", "unpermute_k")


def _kept_format(p, ckpt: Checkpoint, shape: tuple) -> str | None:
    """The block format in which `p` can be copied from a GGUF file without dequantizing: all its
    sources stored in the same Q8_0/Q4_0/Q4_1 type, moved by whole rows; else None."""
    if not quant.quantizable(p.target, shape, embeddings=True):
        return None
    formats = {getattr(ckpt.tensors[s.name], "block_format", None) for s in p.sources}
    if len(formats) != 1 or None in formats or any(s.transform not in _ROW_TRANSFORMS for s in p.sources):
        return None
    return formats.pop()


def _quantization_plan(ckpt, plan, shapes, quantize, quantize_embeddings, keep_quantized):
    """{target: format} for every tensor stored quantized, and the targets copied as GGUF blocks."""
    formats, kept = {}, set()
    for p in plan:
        shape = shapes[p.target]
        fmt = _kept_format(p, ckpt, shape) if keep_quantized else None
        if fmt is not None:
            formats[p.target] = fmt
            kept.add(p.target)
        elif quantize is not None and quant.quantizable(p.target, shape, quantize_embeddings):
            formats[p.target] = quantize
    return formats, kept


def _weight_specs(target: str, dtype: str, shape: tuple, fmt: str | None) -> list[tuple]:
    if fmt is None:
        return [(target, DTYPES[dtype], shape)]
    specs = [(target, quant.stored_dtype(fmt), (shape[0], quant.row_bytes(fmt, shape[1])))]
    if fmt == "int8":
        specs.append((quant.scale_name(target), "F32", (shape[0],)))
    return specs


def _write_weights(
    path: Path, ckpt: Checkpoint, plan, shapes: dict, dtype: str, progress: bool, formats=None, kept=()
) -> None:
    formats = formats or {}
    specs = [spec for p in plan for spec in _weight_specs(p.target, dtype, shapes[p.target], formats.get(p.target))]

    def load(name):
        return ckpt.tensors[name].load()

    def load_raw(name):
        return ckpt.tensors[name].load_raw()

    with SafetensorsWriter(path, specs, metadata={"format": "pt", "producer": "pyxf.convert"}) as writer:
        for p in _progress(plan, progress, len(plan)):
            fmt = formats.get(p.target)
            if p.target in kept:  # GGUF blocks, copied
                array = build_tensor(p, load_raw, ckpt.config)
                want = (shapes[p.target][0], quant.row_bytes(fmt, shapes[p.target][1]))
                if tuple(array.shape) != want:
                    raise ValueError(f"{p.target}: built {fmt} blocks of shape {array.shape}, expected {want}")
                writer.write(p.target, array)
                continue
            array = build_tensor(p, load, ckpt.config)
            if tuple(array.shape) != shapes[p.target]:
                raise ValueError(f"{p.target}: built shape {array.shape}, expected {shapes[p.target]}")
            if fmt is None:
                writer.write(p.target, _cast(array, dtype, p.target))
                continue
            data, scales = quant.quantize(array, fmt)
            writer.write(p.target, data)
            if scales is not None:
                writer.write(quant.scale_name(p.target), scales)


def _check_written_config(config: dict, src: Path) -> None:
    """What pyxf.load will check, checked before anything is written: a checkpoint whose config the
    loader would refuse (a size out of range, a malformed rope_scaling) fails here, naming it."""
    from ..model import check_config
    from ..rope import rope_parameters

    check_config(config, f"{src} (converted config)")
    if config["position"] == "rope":
        try:
            rope_parameters(config)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None


def convert(
    src,
    out,
    dtype: str = "float32",
    progress: bool = True,
    config=None,
    quantize: str | None = None,
    quantize_embeddings: bool = False,
    keep_quantized: bool = False,
) -> Path:
    """Convert `src` (GGUF file, HF model directory, or state_dict file) into the pyxf model
    directory `out`; returns `out`. `config` (path or dict) is the HF config.json for a bare
    state_dict file when none lies beside it. dtype: float32 | float16 | bfloat16, for the tensors
    stored as floats.

    quantize: int8 | q8_0 | q4_0 | q4_1 quantizes the layers' linear weights (qkv, attn.out,
    gate_up/up, down) and an untied lm_head; with quantize_embeddings, embed.weight too (which
    then also serves as a tied head). Rows whose length is not a multiple of 32 stay float.
    keep_quantized (GGUF sources only): tensors stored as Q8_0/Q4_0/Q4_1 are copied as they are,
    embeddings included; other types (F16, Q6_K, Q5_*, K-quants) are dequantized, then quantized
    to `quantize` when given (and eligible), else stored as `dtype` floats."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None:
        quant.check_format(quantize)
    elif quantize_embeddings:
        raise ValueError("quantize_embeddings needs a quantization format (quantize=...)")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if keep_quantized and src.exists() and not is_gguf(src):
        raise ValueError(f"{src}: keep_quantized applies to GGUF files only (use quantize=... for other checkpoints)")
    ckpt = open_checkpoint(src, config)

    try:
        plan, unused = plan_tensors(ckpt.table, list(ckpt.tensors), ckpt.config)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if unused:
        warnings.warn(f"{src}: {len(unused)} source tensors not used: {', '.join(unused[:10])}")
    shapes = {p.target: planned_shape(p, {n: t.shape for n, t in ckpt.tensors.items()}, ckpt.config) for p in plan}
    _check_shapes(shapes, ckpt.config, src)
    formats, kept = _quantization_plan(ckpt, plan, shapes, quantize, quantize_embeddings, keep_quantized)

    out.mkdir(parents=True, exist_ok=True)
    config = dict(ckpt.config)
    config.update(ckpt.write_tokenizer(out))
    config["dtype"] = dtype
    if formats:
        method = "+".join((["gguf"] if kept else []) + ([quantize] if quantize in formats.values() else []))
        config["quantization"] = {"method": method, "tensors": formats}
    config["source"] = ckpt.source
    _check_written_config(config, src)

    partial = out / "model.safetensors.partial"
    try:
        _write_weights(partial, ckpt, plan, shapes, dtype, progress, formats, kept)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out / "model.safetensors")
    # config.json last: its presence marks a complete directory
    (out / "config.json").write_text(json.dumps(_ordered_config(config), indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv=None) -> int:
    """`pyxf convert SRC OUT [--dtype D] [--quantize F [--quantize-embeddings]] [--keep-quantized]
    [--config CONFIG] [--quiet]`"""
    parser = argparse.ArgumentParser(prog="pyxf convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="GGUF file, Hugging Face model directory, or state_dict file")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default float32)")
    parser.add_argument(
        "--quantize", choices=quant.FORMATS,
        help="quantize the layers' linear weights and an untied lm_head (int8: per-row scales; "
        "q8_0/q4_0/q4_1: GGUF blocks of 32)",
    )
    parser.add_argument(
        "--quantize-embeddings", action="store_true",
        help="with --quantize: embed.weight too (a tied head then runs quantized)",
    )
    parser.add_argument(
        "--keep-quantized", action="store_true",
        help="GGUF: copy Q8_0/Q4_0/Q4_1 tensors as they are, without dequantizing (other types are "
        "dequantized, then quantized to --quantize if given)",
    )
    parser.add_argument("--config", help="HF config.json for a bare state_dict file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quantize_embeddings and not args.quantize:
        parser.error("--quantize-embeddings needs --quantize")
    try:
        out = convert(
            args.src, args.out, dtype=args.dtype, progress=not args.quiet, config=args.config,
            quantize=args.quantize, quantize_embeddings=args.quantize_embeddings,
            keep_quantized=args.keep_quantized,
        )
    except (ValueError, OSError, ImportError) as e:  # OSError: a read-only or full disk, a missing file
        print(f"pyxf convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
