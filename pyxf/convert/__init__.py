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

from .. import quant, quant_mix
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


def _kept_format(p, ckpt: Checkpoint, shape: tuple):
    """The spec in which `p` can be copied from a GGUF file without dequantizing: all its sources in
    block formats the core runs, moved by whole rows; a format name, or [[format, rows], ...] when
    the sources differ (the q, k / v rows of a Q4_K_M file). None otherwise."""
    if not quant.quantizable(p.target, shape, embeddings=True):
        return None
    if any(s.transform not in _ROW_TRANSFORMS for s in p.sources):
        return None
    parts = []
    for s in p.sources:
        tensor = ckpt.tensors[s.name]
        fmt = getattr(tensor, "block_format", None)
        if fmt is None:
            return None
        if parts and parts[-1][0] == fmt:
            parts[-1][1] += tensor.shape[0]
        else:
            parts.append([fmt, tensor.shape[0]])
    if len(parts) == 1:
        return parts[0][0]
    return None if p.target == "embed.weight" else parts


def _quantization_plan(ckpt, plan, shapes, quantize, quantize_embeddings, keep_quantized):
    """{target: spec} for every tensor stored quantized, and the targets copied as GGUF blocks."""
    formats, kept = {}, set()
    for p in plan:
        shape = shapes[p.target]
        spec = _kept_format(p, ckpt, shape) if keep_quantized else None
        if spec is not None:
            formats[p.target] = spec
            kept.add(p.target)
        elif quantize is not None:
            spec = quant_mix.tensor_spec(p.target, shape, ckpt.config, quantize, quantize_embeddings)
            if spec is not None:
                formats[p.target] = spec
    return formats, kept


def _weight_specs(target: str, dtype: str, shape: tuple, fmt) -> list[tuple]:
    if fmt is None:
        return [(target, DTYPES[dtype], shape)]
    specs = [(target, quant.stored_dtype(fmt), quant.stored_shape(fmt, shape))]
    if fmt == "int8":
        specs.append((quant.scale_name(target), "F32", (shape[0],)))
    return specs


def _build_kept(p, load_raw, config, spec) -> np.ndarray:
    """The GGUF blocks of a kept tensor: [rows, row bytes], or one flat byte array of its sources
    when they are in several formats."""
    if isinstance(spec, str):
        return build_tensor(p, load_raw, config)
    return np.concatenate([build_tensor(type(p)(p.target, (s,)), load_raw, config).reshape(-1) for s in p.sources])


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
                array = _build_kept(p, load_raw, ckpt.config, fmt)
                want = quant.stored_shape(fmt, shapes[p.target])
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
            data, scales = quant.quantize_as(array, fmt)
            writer.write(p.target, data)
            if scales is not None:
                writer.write(quant.scale_name(p.target), scales)


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

    quantize: a format (int8 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k) quantizes the
    layers' linear weights (qkv, attn.out, gate_up/up, down) and an untied lm_head; with
    quantize_embeddings, embed.weight too (which then also serves as a tied head). Rows whose length
    is not a multiple of 32 stay float; K-quants fall back as llama.cpp's do where rows are not a
    multiple of 256 (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0). The mixes q4_k_m | q5_k_m choose per
    tensor as llama.cpp's Q4_K_M / Q5_K_M (pyxf.quant_mix), embeddings included.
    keep_quantized (GGUF sources only): tensors stored in a block format the core runs (Q8_0,
    Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) are copied as they are, embeddings included; a fused
    tensor whose sources differ keeps each source's format. Other types (F16, Q2_K, ...) are
    dequantized, then quantized as `quantize` says when given, else stored as `dtype` floats."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None:
        quant_mix.check_method(quantize)
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
        method = "+".join((["gguf"] if kept else []) + ([quantize] if set(formats) - kept else []))
        config["quantization"] = {"method": method, "tensors": formats}
    config["source"] = ckpt.source

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
        "--quantize", choices=quant_mix.METHODS,
        help="quantize the layers' linear weights and an untied lm_head (int8: per-row scales; "
        "q8_0/q4_0/q4_1/q5_0/q5_1: GGUF blocks of 32; q4_k/q5_k/q6_k: K-quants; q4_k_m/q5_k_m: "
        "llama.cpp's mixes, embeddings included)",
    )
    parser.add_argument(
        "--quantize-embeddings", action="store_true",
        help="with --quantize: embed.weight too (a tied head then runs quantized)",
    )
    parser.add_argument(
        "--keep-quantized", action="store_true",
        help="GGUF: copy tensors in the block formats pyxf runs (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, "
        "Q5_K, Q6_K) as they are, without dequantizing (other types are dequantized, then quantized "
        "as --quantize says if given)",
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
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"pyxf convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
