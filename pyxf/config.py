"""config.json of a converted model: read and checked against its architecture's spec (pyxf.spec).

Checks are field by field, without work proportional to any size the config claims; a malformed
value is a ValueError naming the field. The converter checks what it writes with the same code.
"""

import json
import math
from pathlib import Path

from pyxf import quant, spec
from pyxf.spec.schema import REQUIRED

FORMAT_VERSION = 1
# The core holds sizes, positions and token ids in 32-bit ints.
MAX_INT = 2**31 - 1


def read_config(model_dir):
    """config.json of a converted model, checked enough that later errors cannot be cryptic."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        what = "does not exist" if not model_dir.exists() else "has no config.json"
        raise FileNotFoundError(
            f"{model_dir} {what}: not a pyxf model directory (convert a checkpoint with `pyxf convert SRC OUT`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {type(e).__name__}: {e}") from None
    return check_config(config, config_path)


def check_config(config, config_path="config.json"):
    """Checks a pyxf config (config.json's dict) against its architecture's fields; returns it."""
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")

    def fail(message):
        raise ValueError(f"{config_path}: {message}")

    if config.get("format") != "pyxf":
        hint = " (it looks like a Hugging Face checkpoint)" if "model_type" in config else ""
        raise ValueError(
            f"{config_path} is not a pyxf config{hint}; convert the checkpoint with `pyxf convert SRC OUT`"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {config.get('format_version')!r}; this pyxf reads version "
            f"{FORMAT_VERSION} (re-convert the model with this version of pyxf)"
        )
    family, architecture = config.get("family"), config.get("architecture", "decoder")
    if not isinstance(family, str) or family not in spec.FAMILIES:
        fail(f"unknown model family {config.get('family')!r}; known: {', '.join(spec.FAMILIES)}")
    if not isinstance(architecture, str) or architecture not in spec.ARCHITECTURES:
        fail(f"architecture {config.get('architecture')!r} is not supported; "
             f"supported: {', '.join(spec.ARCHITECTURES)}")
    arch = spec.architecture(config)
    fields = {f.name: f for f in arch.fields}
    # Sizes first: the derived sizes and the other checks read them.
    for field in sorted(fields.values(), key=lambda f: f.kind != "size"):
        _check_field(field, config, fail)
    _check_derived_sizes(config, fail)
    if config["num_heads"] % config["num_kv_heads"]:
        fail(f"num_heads ({config['num_heads']}) is not a multiple of num_kv_heads ({config['num_kv_heads']})")
    if arch.check is not None:
        arch.check(config, fail)
    if config.get("quantization") is not None:
        _check_quantization(config, fail)
    return config


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(field, config, fail):
    """One field by its kind (pyxf.spec.schema.Field); absent or null is its default, if it has one."""
    name, value = field.name, config.get(field.name)
    if field.default is not REQUIRED and (field.name not in config or (value is None and field.kind != "bool")):
        return  # its default
    kind = field.kind
    if kind == "size":
        if not _is_int(value) or value <= 0:
            fail(f"{name!r} must be a positive integer, got {value!r}")
        if value > MAX_INT:
            fail(f"{name!r} is {value}, more than pyxf supports ({MAX_INT})")
    elif kind == "count" and (not _is_int(value) or value < 0):
        fail(f"{name!r} must be a non-negative integer, got {value!r}")
    elif kind == "bool" and not isinstance(value, bool):
        fail(f"{name!r} must be true or false, got {value!r}")
    elif kind == "choice" and value not in field.choices:
        fail(f"{name!r} must be one of {', '.join(field.choices)}, got {value!r}")
    elif kind == "number" and name == "norm_eps" and (not _is_number(value) or value < 0):
        fail(f"'norm_eps' must be a non-negative number, got {value!r}")
    elif kind == "number" and name == "partial_rotary_factor" and (not _is_number(value) or not 0 < value <= 1):
        fail(f"'partial_rotary_factor' must be a number in (0, 1], got {value!r}")
    elif kind == "positive" and (not _is_number(value) or value <= 0):
        fail(f"{name!r} must be a positive number{'' if field.default is REQUIRED else ' or null'}, got {value!r}")
    elif kind == "object" and not isinstance(value, dict):
        fail(f"{name!r} must be null or an object, got {value!r}")
    elif kind == "ids":
        _check_ids(name, value, fail)
    elif kind == "text":
        _check_text(name, value, fail)


def _check_ids(name, value, fail):
    # Token ids are not required to be in the vocabulary here (some checkpoints name ids of tokens
    # they lack): prompts are checked against it, and a stop id the model cannot produce never stops.
    for item in value if isinstance(value, list) else [value]:
        if item is not None and (not _is_int(item) or not 0 <= item <= MAX_INT):
            fail(f"{name!r} must be null or non-negative token ids, got {value!r}")


def _check_text(name, value, fail):
    if name == "tokenizer":
        if not isinstance(value, str) or Path(value).name != value or value in ("", ".", "..") or "\\" in value:
            fail(f"'tokenizer' must be null or the name of a file in the model directory, got {value!r}")
    elif not isinstance(value, str):
        fail(f"{name!r} must be null or a string, got {type(value).__name__}")


def _check_derived_sizes(config, fail):
    """Sizes the core computes from the config's (products of heads and head size, the fused FFN
    width) fit its ints as well."""
    D, I = config["head_dim"], config["intermediate_size"]
    derived = {
        "(num_heads + 2 num_kv_heads) * head_dim": (config["num_heads"] + 2 * config["num_kv_heads"]) * D,
        "2 * intermediate_size": 2 * I,
    }
    for what, value in derived.items():
        if value > MAX_INT:
            fail(f"{what} is {value}, more than pyxf supports ({MAX_INT})")


def _check_quantization(config, fail):
    """config.json's "quantization": {"method": str, "tensors": {name: spec}} (docs/DESIGN.md); a spec
    is a format name or, for a tensor stored in several formats, [[format, rows], ...]."""
    q = config["quantization"]
    if not isinstance(q, dict) or not isinstance(q.get("tensors"), dict):
        fail(f"'quantization' must be an object with a 'tensors' map, got {q!r}")
    layout = spec.tensor_layout(config)
    for name, fmt_spec in q["tensors"].items():
        entry = layout.lookup(name)
        if entry is None or not entry.tensor.quantizable or not quant.quantizable(name, entry[0], embeddings=True):
            fail(
                f"{name} cannot be stored quantized (only embed.weight, lm_head.weight and "
                f"the layers' linear weights with a multiple of {quant.BLOCK} columns can)"
            )
        rows, cols = entry[0]
        if isinstance(fmt_spec, str) and fmt_spec not in quant.FORMATS:
            fail(f"quantization of {name}: unknown format {fmt_spec!r}; known: {', '.join(quant.FORMATS)}")
        try:
            parts = quant.segments(fmt_spec, rows)
        except ValueError as e:
            fail(f"quantization of {name}: {e}; known formats: {', '.join(quant.FORMATS)}")
        for fmt, _ in parts:
            if cols % quant.block_cols(fmt):
                fail(f"quantization of {name}: {fmt} needs rows of a multiple of "
                     f"{quant.block_cols(fmt)} weights, the tensor has {cols}")
        if entry.tensor.quantizable == spec.EMBEDDING and len(parts) > 1:
            fail(f"{name} must be stored in one format (its rows are looked up)")
