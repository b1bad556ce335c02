"""Converting checkpoints (HF directories, state_dict files, GGUF) into pyxf model directories.

    from pyxf.convert import convert
    convert("path/to/hf_model_or.gguf", "out_dir", dtype="float16")

or from the shell: `pyxf convert SRC OUT [--dtype float16] [--quantize q4_1 | --dequantize]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import quant, quant_mix, spec
from ..sources import checkpoint_path
from ..tensorfile import SafetensorsWriter, float32_to_bf16
from ..weights import has_tied_head
from .cross_encoder import with_score_activation
from .plan import build_tensor, moves_only, plan_tensors, planned_shape
from .schema import Checkpoint

__all__ = ["DTYPES", "convert", "expected_shape", "main"]

# pyxf dtype -> safetensors dtype name
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# config.json's first keys; then its architecture's fields in the order the spec declares them.
_FIRST_KEYS = ("format", "format_version", "family", "architecture")
_LAST_KEYS = ("quantization", "source")


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
    """The shape the model spec (pyxf.spec) prescribes for a pyxf tensor, or None for names it does
    not list for this config."""
    entry = spec.tensor_layout(cfg).lookup(name)
    return None if entry is None else entry[0]


def _check_shapes(shapes: dict[str, tuple], cfg: dict, src: Path) -> None:
    try:
        layout = spec.tensor_layout(cfg)
    except (KeyError, TypeError, ValueError):
        return  # a malformed config: the check of the written config names the field
    wrong = []
    for name, shape in shapes.items():
        entry = layout.lookup(name)
        if entry is not None and entry[0] != tuple(shape):
            wrong.append(f"{name} {list(shape)} (expected {list(entry[0])})")
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
    """config.json's keys in a stable order: the spec's fields of its architecture, then the rest."""
    fields = [f.name for f in spec.architecture(config).fields]
    keys = [*_FIRST_KEYS, *fields, *(k for k in config if k not in fields and k not in _LAST_KEYS), *_LAST_KEYS]
    return {key: config[key] for key in dict.fromkeys(keys) if key in config}


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


def _stored_format(p, ckpt: Checkpoint, shape: tuple):
    """The spec in which `p` can be copied from a GGUF file as stored: all its sources in natively
    run block types (gguf_import.KEPT_TYPES), moved by whole rows. A format name, or [[format,
    rows], ...] when the sources differ (the q, k / v rows of a Q4_K_M file; not the embedding,
    whose rows are looked up); else None."""
    if not quant.quantizable(p.target, shape, embeddings=True):
        return None
    if any(s.transform not in _ROW_TRANSFORMS for s in p.sources):
        return None
    parts = []
    for s in p.sources:
        tensor = ckpt.tensors[s.name]
        fmt = getattr(tensor, "block_format", None)
        if fmt is None or (len(tensor.shape) == 3) != p.experts:
            return None
        if parts and parts[-1][0] == fmt:
            parts[-1][1] += tensor.shape[0]
        else:
            parts.append([fmt, tensor.shape[0]])
    if len(parts) == 1:
        return parts[0][0]
    # Expert stacks join their sources expert by expert: one format throughout, or floats.
    return None if p.target == "embed.weight" or p.experts else parts


_UNQUANTIZED_TYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def _quantized_source_types(p, ckpt: Checkpoint) -> list[str]:
    """The quantized GGUF types among `p`'s sources (empty for float sources and other checkpoints)."""
    types = {getattr(ckpt.tensors[s.name], "ggml_type", "F32") for s in p.sources}
    return sorted(t for t in types if t not in _UNQUANTIZED_TYPES)


@dataclass
class _FormatPlan:
    formats: dict  # target -> pyxf format (or [[format, rows], ...]), for every tensor stored quantized
    copied: set  # targets whose GGUF blocks are written as stored
    dequantized: dict  # target -> its quantized GGUF source types, for tensors stored as floats


def _plan_formats(ckpt, plan, shapes, quantize, quantize_embeddings, dequantize) -> _FormatPlan:
    """Which format each tensor is stored in. --quantize F (a format or a mix): the tensors llama.cpp's
    quantizer quantizes, in F's formats (quant_mix.tensor_spec), re-quantized from their float values
    unless the source already holds exactly those blocks; no flags: every GGUF tensor in the block
    format(s) it is stored in when the core runs them, else floats; dequantize: floats throughout."""
    tied = has_tied_head(ckpt.config)
    result = _FormatPlan({}, set(), {})
    for p in plan:
        shape = shapes[p.target]
        stored = _stored_format(p, ckpt, shape)
        if quantize is not None:
            fmt = quant_mix.tensor_spec(p.target, shape, ckpt.config, quantize, tied, quantize_embeddings)
        else:
            fmt = None if dequantize else stored
        if fmt is not None:
            result.formats[p.target] = fmt
            if fmt == stored:
                result.copied.add(p.target)
        elif not dequantize and _quantized_source_types(p, ckpt):
            result.dequantized[p.target] = _quantized_source_types(p, ckpt)
    return result


def _dequantized_notice(src: Path, dequantized: dict, dtype: str) -> str:
    """One line on the GGUF tensors stored as floats although their source was quantized."""
    single = sorted({t[0] for t in dequantized.values() if len(t) == 1})
    mixed = [name for name, t in dequantized.items() if len(t) > 1]
    parts = []
    if single:
        parts.append(f"type(s) {', '.join(single)} have no pyxf kernel yet")
    if mixed:
        example = f"{mixed[0]}: {'+'.join(dequantized[mixed[0]])}"
        parts.append(f"{len(mixed)} tensor(s) join parts of different types ({example})")
    return f"{src.name}: {len(dequantized)} quantized tensor(s) stored as {dtype}: {'; '.join(parts)}"


def _weight_specs(target: str, dtype: str, shape: tuple, fmt) -> list[tuple]:
    if fmt is None:
        return [(target, DTYPES[dtype], shape)]
    specs = [(target, quant.stored_dtype(fmt), quant.stored_shape(fmt, shape))]
    if fmt == "int8":
        specs.append((quant.scale_name(target), "F32", (shape[0],)))
    return specs


def _build_stored(p, load_raw, config, spec) -> np.ndarray:
    """The GGUF blocks of a tensor copied as stored: [rows, row bytes], or one flat byte array of its
    sources when they are in several formats."""
    if isinstance(spec, str):
        return build_tensor(p, load_raw, config)
    return np.concatenate([build_tensor(type(p)(p.target, (s,)), load_raw, config).reshape(-1) for s in p.sources])


def _write_weights(path: Path, ckpt: Checkpoint, plan, shapes: dict, dtype: str, progress: bool,
                   formats: _FormatPlan) -> None:
    specs = [
        entry for p in plan for entry in _weight_specs(p.target, dtype, shapes[p.target], formats.formats.get(p.target))
    ]

    def load(name):
        return ckpt.tensors[name].load()

    def load_raw(name):
        return ckpt.tensors[name].load_raw()

    def load_bf16(name):
        return ckpt.tensors[name].load_bf16()

    def stored_bf16(p):  # every source in bfloat16 and only moved: the bits are moved, never widened
        return moves_only(p) and all(getattr(ckpt.tensors[s.name], "load_bf16", None) is not None for s in p.sources)

    with SafetensorsWriter(path, specs, metadata={"format": "pt", "producer": "pyxf.convert"}) as writer:
        for p in _progress(plan, progress, len(plan)):
            fmt = formats.formats.get(p.target)
            if p.target in formats.copied:  # GGUF blocks, as stored
                array = _build_stored(p, load_raw, ckpt.config, fmt)
                want = quant.stored_shape(fmt, shapes[p.target])
                if tuple(array.shape) != want:
                    raise ValueError(f"{p.target}: built {fmt} blocks of shape {array.shape}, expected {want}")
                writer.write(p.target, array)
                continue
            if fmt is None and dtype == "bfloat16" and stored_bf16(p):
                array = build_tensor(p, load_bf16, ckpt.config)  # transforms only move values
                if tuple(array.shape) != shapes[p.target]:
                    raise ValueError(f"{p.target}: built shape {array.shape}, expected {shapes[p.target]}")
                writer.write(p.target, np.ascontiguousarray(array))
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


def _check_written_config(config: dict, src: Path) -> None:
    """What pyxf.load will check, checked before anything is written: a checkpoint whose config the
    loader would refuse (a size out of range, a malformed rope_scaling) fails here, naming it."""
    from ..config import check_config
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
    dtype: str | None = None,
    progress: bool = True,
    config=None,
    quantize: str | None = None,
    quantize_embeddings: bool = True,
    dequantize: bool = False,
    revision: str | None = None,
) -> Path:
    """Convert `src` (GGUF file, HF model directory, state_dict file, or a Hugging Face hub id
    "org/name" at `revision`, resolved with huggingface_hub: pyxf.sources) into the pyxf model
    directory `out`; returns `out`. `config` (path or dict) is the HF config.json for a bare
    state_dict file when none lies beside it. dtype: float32 | float16 | bfloat16, for the tensors
    stored as floats; None: a BF16 or F16 GGUF file's own type, float32 for every other source.

    A GGUF file's tensors keep their quantization where the core runs it (Q8_0, Q4_0, Q4_1, Q5_0,
    Q5_1, Q4_K, Q5_K, Q6_K: the blocks are copied as stored; a fused tensor whose sources differ keeps
    each source's format); tensors of other quantized types are dequantized to `dtype` (with a
    warning naming them). dequantize=True: every tensor as `dtype` floats.

    quantize: a format (int8 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | q4_k | q5_k | q6_k) quantizes the
    tensors llama.cpp's quantizer does (every linear weight, the token embedding and the head; the
    head of a model of fewer than 8 bits at q6_k, see quant.planned_format), from their float values;
    K-quants fall back as llama.cpp's do where rows are not a multiple of 256 (q4_k -> q5_0,
    q5_k -> q5_1, q6_k -> q8_0). The mixes q4_k_m | q5_k_m choose per tensor as llama.cpp's Q4_K_M /
    Q5_K_M (pyxf.quant_mix). quantize_embeddings=False keeps embed.weight (and so a tied head)
    float. Rows whose length is not a multiple of 32 stay float."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None:
        quant_mix.check_method(quantize)
        if dequantize:
            raise ValueError("dequantize and quantize exclude each other")
    src, origin = checkpoint_path(src, revision)
    out = Path(out).expanduser()
    ckpt = open_checkpoint(src, config)
    dtype = dtype or ckpt.stored_dtype
    try:
        plan, unused = plan_tensors(ckpt.table, list(ckpt.tensors), ckpt.config)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if unused:
        warnings.warn(f"{src}: {len(unused)} source tensors not used: {', '.join(unused[:10])}")
    shapes = {p.target: planned_shape(p, {n: t.shape for n, t in ckpt.tensors.items()}, ckpt.config) for p in plan}
    _check_shapes(shapes, ckpt.config, src)
    formats = _plan_formats(ckpt, plan, shapes, quantize, quantize_embeddings, dequantize)
    if formats.dequantized:
        warnings.warn(_dequantized_notice(src, formats.dequantized, dtype))

    out.mkdir(parents=True, exist_ok=True)
    config = dict(ckpt.config)
    if config.get("classifier") and src.is_dir():  # a cross-encoder's score activation, for rank()
        config["classifier"] = with_score_activation(config["classifier"], src)
    config.update(ckpt.write_tokenizer(out))
    config["dtype"] = dtype
    if formats.formats:
        config["quantization"] = {"method": quantize or "gguf", "tensors": formats.formats}
    config["source"] = ckpt.source if origin is None else {"format": ckpt.source["format"], **origin}
    _check_written_config(config, src)

    partial = out / "model.safetensors.partial"
    try:
        _write_weights(partial, ckpt, plan, shapes, dtype, progress, formats)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out / "model.safetensors")
    # config.json last: its presence marks a complete directory
    (out / "config.json").write_text(json.dumps(_ordered_config(config), indent=2, ensure_ascii=False) + "\n")
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"pyxf convert: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """`pyxf convert SRC OUT [--dtype D] [--quantize F [--no-quantize-embeddings] | --dequantize]
    [--config CONFIG] [--quiet]`"""
    parser = argparse.ArgumentParser(prog="pyxf convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="GGUF file, Hugging Face model directory or hub id (org/name), or state_dict file")
    parser.add_argument("out", help="output directory")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES),
        help="dtype of the tensors stored as floats (default: a BF16 or F16 GGUF file's own type, else float32)",
    )
    parser.add_argument(
        "--quantize", choices=quant_mix.METHODS,
        help="quantize the tensors llama.cpp's quantizer does: every linear weight, the token embedding and "
        "the head (below 8 bits at q6_k); int8: per-row scales; q8_0/q4_0/q4_1/q5_0/q5_1: GGUF blocks of 32; "
        "q4_k/q5_k/q6_k: K-quants; q4_k_m/q5_k_m: llama.cpp's mixes",
    )
    parser.add_argument(
        "--quantize-embeddings", action=argparse.BooleanOptionalAction, default=None,
        help="with --quantize: the token embedding (and a tied head) too (default: yes)",
    )
    parser.add_argument(
        "--dequantize", action="store_true",
        help="GGUF: store every tensor as --dtype floats (default: Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K "
        "tensors are kept as stored)",
    )
    # Kept so that older command lines still run: keeping GGUF blocks is now the default.
    parser.add_argument("--keep-quantized", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--revision", help="hub id: the branch, tag or commit to convert (default: main)")
    parser.add_argument("--config", help="HF config.json for a bare state_dict file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quantize_embeddings is not None and not args.quantize:
        parser.error("--quantize-embeddings / --no-quantize-embeddings need --quantize")
    if args.dequantize and (args.quantize or args.keep_quantized):
        parser.error("--dequantize excludes --quantize and --keep-quantized")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line each, no source location
            out = convert(
                args.src, args.out, dtype=args.dtype, progress=not args.quiet, config=args.config,
                quantize=args.quantize, quantize_embeddings=args.quantize_embeddings is not False,
                dequantize=args.dequantize, revision=args.revision,
            )
    except (ValueError, OSError, ImportError) as e:  # OSError: a read-only or full disk, a missing file
        print(f"pyxf convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
