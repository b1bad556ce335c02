"""Loading a converted model directory (docs/DESIGN.md) and running it: logits and sessions."""

import json
import math
import warnings
from pathlib import Path

import numpy as np

from pyxf import quant, quant_mix
from pyxf.rope import rope_parameters
from pyxf.tensorfile import bf16_to_float32, float32_to_bf16, read_safetensors
from pyxf.threads import check_num_threads, core
from pyxf.tokenizer import Tokenizer

FORMAT_VERSION = 1
KNOWN_FAMILIES = ("llama", "gpt2", "bert", "roberta", "distilbert", "transformer", "marian", "t5")
SUPPORTED_ARCHITECTURES = ("decoder", "encoder", "encoder-decoder")
CLASSIFIER_KINDS = ("bert", "roberta", "distilbert")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

# Allowed values of the config's enumerated fields.
CONFIG_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "activation": ("silu", "gelu", "gelu_tanh", "relu"),
    "position": ("rope", "learned", "none", "sinusoidal", "relative"),  # the last two: encoder-decoder
    "dtype": ("float32", "float16", "bfloat16"),
}
POSITIVE_INT_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "max_position_embeddings",
)
BOOL_FIELDS = ("gated_ffn", "tie_word_embeddings")
# The core holds sizes, positions and token ids in 32-bit ints.
MAX_INT = 2**31 - 1
# How each config dtype is stored in safetensors. numpy has no bfloat16: such tensors are read as
# uint16 bit patterns, and the core widens half types at load.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def load(path=None, context_length=None, threads=None, quantize=None, quantize_embeddings=True, dtype=None):
    """Loads a converted model directory; with no path, the default model (downloaded on first use).

    context_length: the longest sequence (prompt + generated tokens) the model will be asked to handle;
    default max_position_embeddings. threads: sets the process-wide thread count (pyxf.set_num_threads).
    quantize: a format ("int8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k") or one
    of llama.cpp's mixes ("q4_k_m", "q5_k_m") quantizes a float model's weights in memory at load, the
    tensors `pyxf convert --quantize` would (pyxf.quant_mix; quantize_embeddings=False: embed.weight
    stays float). dtype: "bfloat16" | "float16" | "float32" stores the model's float tensors in that
    type in memory (cast at load; None: as the file has them). bfloat16 halves float32's bytes and,
    on CPUs with AVX512_BF16, multiplies on vdpbf16ps (`pyxf convert --dtype bfloat16` stores it so).
    """
    if dtype is not None and dtype not in CONFIG_CHOICES["dtype"]:
        raise ValueError(f"dtype must be one of {', '.join(CONFIG_CHOICES['dtype'])} or None, got {dtype!r}")
    if path is None:
        from pyxf.hub import default_model_path

        path = default_model_path()
    path = Path(path)
    config = read_config(path)
    if config.get("architecture") == "encoder-decoder":
        from pyxf.seq2seq import load_seq2seq

        if quantize is not None:
            raise ValueError("quantize= is not supported for encoder-decoder models yet")
        return load_seq2seq(path, config, threads=threads, dtype=dtype)
    if config.get("architecture") == "encoder":  # complete sequences: no KV cache to size
        context_length = config["max_position_embeddings"] - config.get("position_offset", 0)
    else:
        context_length = _check_context_length(config, context_length)
    if threads is not None:
        core().set_num_threads(check_num_threads(threads))

    weights_path = path / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    weights_file = read_safetensors(weights_path)
    weights = check_weights(config, weights_file)
    if quantize is not None:
        config, weights = quantize_weights(config, weights, quantize, quantize_embeddings)
    if dtype is not None:
        config, weights = cast_weights(config, weights, dtype)
    tokenizer = Tokenizer.from_model_dir(path, config)

    core_config = dict(config)
    formats = (config.get("quantization") or {}).get("tensors")
    if formats:
        core_config["tensor_formats"] = dict(formats)
    if config["position"] == "rope":
        core_config["rope_inv_freq"], core_config["rope_attention_scaling"] = rope_parameters(config)
    core_model = core().Model(core_config, weights)
    return Model(path, config, core_model, weights, tokenizer, context_length, weights_file)


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
    """Checks a pyxf config (config.json's dict) field by field, without work proportional to any
    size it claims; returns it. ValueError names the field. The converter checks what it writes
    with this too."""
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object")

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
    if config.get("family") not in KNOWN_FAMILIES:
        raise ValueError(
            f"{config_path}: unknown model family {config.get('family')!r}; known: {', '.join(KNOWN_FAMILIES)}"
        )
    if config.get("architecture", "decoder") not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{config_path}: architecture {config.get('architecture')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    for field in POSITIVE_INT_FIELDS:
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{config_path}: {field!r} must be a positive integer, got {value!r}")
        if value > MAX_INT:
            raise ValueError(f"{config_path}: {field!r} is {value}, more than pyxf supports ({MAX_INT})")
    _check_derived_sizes(config, config_path)
    for field in BOOL_FIELDS:
        if not isinstance(config.get(field), bool):
            raise ValueError(f"{config_path}: {field!r} must be true or false, got {config.get(field)!r}")
    for field, choices in CONFIG_CHOICES.items():
        if config.get(field) not in choices:
            raise ValueError(f"{config_path}: {field!r} must be one of {', '.join(choices)}, got {config.get(field)!r}")
    if config["num_heads"] % config["num_kv_heads"]:
        raise ValueError(
            f"{config_path}: num_heads ({config['num_heads']}) is not a multiple of "
            f"num_kv_heads ({config['num_kv_heads']})"
        )
    if config.get("architecture") == "encoder":
        _check_encoder_config(config, config_path)
    if config.get("architecture") == "encoder-decoder":
        from pyxf.seq2seq import check_seq2seq_config

        check_seq2seq_config(config, config_path)
    _check_scalars(config, config_path)
    if config.get("quantization") is not None:
        _check_quantization(config, config_path)
    return config


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_scalars(config, config_path):
    """The numbers, token ids and names besides the sizes."""

    def fail(message):
        raise ValueError(f"{config_path}: {message}")

    if not _is_number(config.get("norm_eps")) or config["norm_eps"] < 0:
        fail(f"'norm_eps' must be a non-negative number, got {config.get('norm_eps')!r}")
    if config["position"] == "rope":
        theta = config.get("rope_theta")
        if theta is not None and (not _is_number(theta) or theta <= 0):
            fail(f"'rope_theta' must be a positive number, got {theta!r}")
        if not isinstance(config.get("rope_scaling") or {}, dict):
            fail(f"'rope_scaling' must be null or an object, got {config.get('rope_scaling')!r}")
    # Token ids are not required to be in the vocabulary here (some checkpoints name ids of tokens
    # they lack): prompts are checked against it, and a stop id the model cannot produce never stops.
    eos = config.get("eos_token_id")
    ids = {"bos_token_id": [config.get("bos_token_id")], "pad_token_id": [config.get("pad_token_id")],
           "eos_token_id": eos if isinstance(eos, list) else [eos]}
    for field, values in ids.items():
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT):
                fail(f"{field!r} must be null or non-negative token ids, got {config.get(field)!r}")
    tokenizer = config.get("tokenizer")
    if tokenizer is not None and (not isinstance(tokenizer, str) or Path(tokenizer).name != tokenizer
                                  or tokenizer in ("", ".", "..") or "\\" in tokenizer):
        fail(f"'tokenizer' must be null or the name of a file in the model directory, got {tokenizer!r}")
    if not isinstance(config.get("chat_template") or "", str):
        fail(f"'chat_template' must be null or a string, got {type(config['chat_template']).__name__}")
    if not isinstance(config.get("add_bos_token", False), bool):
        fail(f"'add_bos_token' must be true or false, got {config['add_bos_token']!r}")


def _check_derived_sizes(config, config_path):
    """Sizes the core computes from the config's (products of heads and head size, the fused FFN
    width, the rotated dimensions) fit its ints as well."""
    D, I = config["head_dim"], config["intermediate_size"]
    derived = {
        "(num_heads + 2 num_kv_heads) * head_dim": (config["num_heads"] + 2 * config["num_kv_heads"]) * D,
        "2 * intermediate_size": 2 * I,
    }
    for what, value in derived.items():
        if value > MAX_INT:
            raise ValueError(f"{config_path}: {what} is {value}, more than pyxf supports ({MAX_INT})")
    factor = config.get("partial_rotary_factor", 1.0)
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1):
        raise ValueError(f"{config_path}: 'partial_rotary_factor' must be a number in (0, 1], got {factor!r}")


def _check_quantization(config, config_path):
    """config.json's "quantization": {"method": str, "tensors": {name: spec}} (docs/DESIGN.md); a spec
    is a format name or, for a tensor stored in several formats, [[format, rows], ...]."""
    q = config["quantization"]
    if not isinstance(q, dict) or not isinstance(q.get("tensors"), dict):
        raise ValueError(f"{config_path}: 'quantization' must be an object with a 'tensors' map, got {q!r}")
    layout = tensor_layout(config)
    for name, spec in q["tensors"].items():
        entry = layout.lookup(name)
        if entry is None or not quant.quantizable(name, entry[0], embeddings=True):
            raise ValueError(
                f"{config_path}: {name} cannot be stored quantized (only embed.weight, lm_head.weight and "
                f"the layers' linear weights with a multiple of {quant.BLOCK} columns can)"
            )
        rows, cols = entry[0]
        if isinstance(spec, str) and spec not in quant.FORMATS:
            raise ValueError(
                f"{config_path}: quantization of {name}: unknown format {spec!r}; known: {', '.join(quant.FORMATS)}"
            )
        try:
            parts = quant.segments(spec, rows)
        except ValueError as e:
            raise ValueError(f"{config_path}: quantization of {name}: {e}; known formats: {', '.join(quant.FORMATS)}") from None
        for fmt, _ in parts:
            if cols % quant.block_cols(fmt):
                raise ValueError(
                    f"{config_path}: quantization of {name}: {fmt} needs rows of a multiple of "
                    f"{quant.block_cols(fmt)} weights, the tensor has {cols}"
                )
        if name == "embed.weight" and len(parts) > 1:
            raise ValueError(f"{config_path}: embed.weight must be stored in one format (its rows are looked up)")


def quantized_layout(config):
    """{name: (shape, safetensors dtype)} of the quantized tensors config.json declares, with the
    per-row scales of int8 ones (NAME_scale)."""
    formats = (config.get("quantization") or {}).get("tensors") or {}
    expected = tensor_layout(config)
    layout = {}
    for name, spec in formats.items():
        shape = expected.lookup(name)[0]
        layout[name] = (quant.stored_shape(spec, shape), quant.stored_dtype(spec))
        if spec == "int8":
            layout[quant.scale_name(name)] = ((shape[0],), "F32")
    return layout


def has_tied_head(config):
    """Whether embed.weight is also the output projection (a decoder with tied embeddings)."""
    return config.get("architecture", "decoder") == "decoder" and bool(config.get("tie_word_embeddings"))


def quantize_weights(config, weights, method, embeddings=True):
    """Quantizes a float model's weights in memory, the tensors `pyxf convert --quantize` would, in
    the formats `method` (a format or a mix) gives them (pyxf.quant_mix.tensor_spec); returns the
    config with its "quantization" entry and the new {name: array} (the float arrays of the
    quantized tensors are no longer referenced)."""
    quant_mix.check_method(method)
    if config.get("quantization"):
        raise ValueError(
            f"this model is already quantized ({config['quantization'].get('method')}); "
            "quantize= applies to models stored as floats"
        )
    weights, formats, tied = dict(weights), {}, has_tied_head(config)
    for name, array in list(weights.items()):
        spec = quant_mix.tensor_spec(name, array.shape, config, method, tied, embeddings)
        if spec is None:
            continue
        floats = bf16_to_float32(array) if config["dtype"] == "bfloat16" else array
        data, scales = quant.quantize_as(floats, spec)
        weights[name] = data
        if scales is not None:
            weights[quant.scale_name(name)] = scales
        formats[name] = spec
    config = dict(config)
    config["quantization"] = {"method": method, "tensors": formats}
    return config, weights


def cast_weights(config, weights, dtype):
    """The model's float tensors in `dtype` (float32 | float16 | bfloat16), made in memory; quantized
    tensors and their scales stay as they are. Returns the config (its "dtype" updated) and the new
    {name: array}."""
    if dtype == config["dtype"]:
        return config, weights
    quantized = quantized_layout(config)
    cast = {}
    for name, array in weights.items():
        if name in quantized:
            cast[name] = array
            continue
        floats = bf16_to_float32(array) if config["dtype"] == "bfloat16" else np.asarray(array, dtype=np.float32)
        if dtype == "bfloat16":
            cast[name] = float32_to_bf16(floats)
        elif dtype == "float16":
            with np.errstate(over="ignore"):
                cast[name] = floats.astype(np.float16)
            if not np.isfinite(cast[name]).all() and np.isfinite(floats).all():
                raise ValueError(f"tensor {name} has values beyond float16's range; use dtype='bfloat16'")
        else:
            cast[name] = np.ascontiguousarray(floats)
    return {**config, "dtype": dtype}, cast


def weight_summary(config, weights):
    """How a model's weights are stored: {"formats": {format: {"tensors": n, "bytes": b}},
    "decode_bytes": b}. Formats are the quantized ones of config.json's "quantization" (an int8
    tensor's scales count with it) and config["dtype"] for every other tensor. decode_bytes: the
    weight bytes one decode step reads (every tensor in full, except that an embedding which is not
    also the head and learned positions contribute one row each); None for other than decoder-only
    models."""
    quantized = (config.get("quantization") or {}).get("tensors") or {}
    scale_of = {quant.scale_name(name): name for name, fmt in quantized.items() if fmt == "int8"}
    one_row = {"pos_embed.weight", "token_type_embed.weight"}
    if not has_tied_head(config):
        one_row.add("embed.weight")
    layout = tensor_layout(config)
    formats, decode_bytes = {}, 0

    def count(fmt, tensors, nbytes):
        entry = formats.setdefault(fmt, {"tensors": 0, "bytes": 0})
        entry["tensors"] += tensors
        entry["bytes"] += nbytes

    for name, array in weights.items():
        owner = scale_of.get(name, name)
        spec = quantized.get(owner, config["dtype"])
        if isinstance(spec, str):
            count(spec, owner == name, array.nbytes)
        else:  # several formats: each segment's bytes under its format (the tensor counts in each)
            rows, cols = layout.lookup(name)[0]
            for fmt, n in quant.segments(spec, rows):
                count(fmt, 1, n * quant.row_bytes(fmt, cols))
        decode_bytes += array.nbytes // array.shape[0] if owner in one_row else array.nbytes
    if config.get("architecture", "decoder") != "decoder":
        decode_bytes = None  # encoders run whole sequences; encoder-decoder steps read the decoder only
    ordered = dict(sorted(formats.items(), key=lambda item: -item[1]["bytes"]))
    return {"formats": ordered, "decode_bytes": decode_bytes}


def describe_model(model_dir):
    """A converted model directory's family and weight_summary, read from its files (no loading)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights_path = model_dir / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    summary = weight_summary(config, read_safetensors(weights_path))
    return {"path": str(model_dir), "family": config["family"], "architecture": config.get("architecture", "decoder"),
            **summary, "description": describe_weights(summary)}


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


def describe_weights(summary):
    """One line for weight_summary's result: 'q4_1 210 tensors 55.3 MiB, ...; decode reads 92.1 MiB/token'."""
    parts = [f"{fmt} {e['tensors']} tensor{'s' * (e['tensors'] != 1)} {_mib(e['bytes'])}"
             for fmt, e in summary["formats"].items()]
    text = ", ".join(parts)
    if summary["decode_bytes"] is not None:
        text += f"; decode reads {_mib(summary['decode_bytes'])}/token"
    return text


def _check_encoder_config(config, config_path):
    """The encoder keys of config.json (docs/DESIGN.md)."""

    def fail(message):
        raise ValueError(f"{config_path}: {message}")

    for field in ("type_vocab_size", "position_offset"):
        value = config.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"{field!r} must be a non-negative integer, got {value!r}")
    if config["position"] != "learned" or config.get("position_offset", 0) >= config["max_position_embeddings"]:
        fail("encoders need learned positions, with position_offset below max_position_embeddings")
    max_length = config.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0):
        fail(f"'max_length' must be a positive integer, got {max_length!r}")
    pooling = config.get("pooling")
    if pooling is not None:
        if not isinstance(pooling, dict) or pooling.get("mode") not in ("mean", "cls", "max", "mean_sqrt_len"):
            fail(f"'pooling' must be null or hold a mode (mean, cls, max, mean_sqrt_len) and normalize, got {pooling!r}")
        if not isinstance(pooling.get("normalize", False), bool):
            fail(f"'pooling.normalize' must be true or false, got {pooling.get('normalize')!r}")
    head = config.get("classifier")
    if head is not None:
        if not isinstance(head, dict) or head.get("kind") not in CLASSIFIER_KINDS:
            fail(f"'classifier.kind' must be one of {', '.join(CLASSIFIER_KINDS)}, got {head!r}")
        n = head.get("num_labels")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            fail(f"'classifier.num_labels' must be a positive integer, got {n!r}")
        labels = head.get("id2label")
        if labels is not None and (not isinstance(labels, list) or len(labels) != n):
            fail(f"'classifier.id2label' must list {n} label names, got {labels!r}")
        if head.get("problem_type", "single_label_classification") not in PROBLEM_TYPES:
            fail(f"'classifier.problem_type' must be one of {', '.join(PROBLEM_TYPES)}, got {head.get('problem_type')!r}")


class TensorLayout:
    """The tensors a config describes: fixed ones, and stacks of layers that repeat one pattern.

    Kept in this form, not enumerated, so that the size of a config's claims can be checked against
    the weight file before any work proportional to them: a 1 KB config.json with num_layers 2**31
    must not make pyxf list 2**31 layers."""

    def __init__(self, fixed, stacks):
        self.fixed = fixed    # {name: (shape, required)}
        self.stacks = stacks  # [(prefix, count, {suffix: (shape, required)})]: names "{prefix}{i}.{suffix}"

    def required_count(self):
        return sum(required for _, required in self.fixed.values()) + sum(
            count * sum(required for _, required in layer.values()) for _, count, layer in self.stacks
        )

    def lookup(self, name):
        """(shape, required) of one tensor name, or None when the config has no such tensor."""
        if name in self.fixed:
            return self.fixed[name]
        for prefix, count, layer in self.stacks:
            if name.startswith(prefix):
                index, _, suffix = name[len(prefix):].partition(".")
                if index.isdigit() and index == str(int(index)) and int(index) < count and suffix in layer:
                    return layer[suffix]
        return None

    def enumerate(self, max_tensors):
        """{name: (shape, required)} of every tensor; ValueError, before listing them, when the
        config requires far more tensors than the `max_tensors` the weight file holds (up to twice
        as many are listed, so that a file missing a few gets a message naming them)."""
        required = self.required_count()
        if required > 2 * max_tensors + 64:
            raise ValueError(
                f"the config describes {' and '.join(f'{count} layers {prefix}N' for prefix, count, _ in self.stacks)}, "
                f"at least {required} tensors, but model.safetensors holds {max_tensors}"
            )
        tensors = dict(self.fixed)
        for prefix, count, layer in self.stacks:
            for i in range(count):
                tensors.update({f"{prefix}{i}.{suffix}": entry for suffix, entry in layer.items()})
        return tensors


def tensor_layout(config):
    """The TensorLayout of every tensor a model with `config` may have (DESIGN.md)."""
    if config.get("architecture") == "encoder-decoder":
        from pyxf.seq2seq import seq2seq_tensor_layout

        return seq2seq_tensor_layout(config)
    H, V, D, I = config["hidden_size"], config["vocab_size"], config["head_dim"], config["intermediate_size"]
    Hq, Hkv, P = config["num_heads"], config["num_kv_heads"], config["max_position_embeddings"]
    qkv_rows = (Hq + 2 * Hkv) * D
    up_name, up_rows = ("gate_up", 2 * I) if config["gated_ffn"] else ("up", I)

    def linear(name, rows, cols, required=True):
        return {f"{name}.weight": ((rows, cols), required), f"{name}.bias": ((rows,), False)}

    def norm(name):
        # The core requires LayerNorm biases; RMSNorm has none.
        return {f"{name}.weight": ((H,), True), f"{name}.bias": ((H,), config["norm"] == "layernorm")}

    tensors = {"embed.weight": ((V, H), True)}
    if config["position"] == "learned":
        tensors["pos_embed.weight"] = ((P, H), True)
    encoder = config.get("architecture") == "encoder"
    if encoder:
        if config.get("type_vocab_size", 0) > 0:
            tensors["token_type_embed.weight"] = ((config["type_vocab_size"], H), True)
        tensors.update({"embed_norm.weight": ((H,), False), "embed_norm.bias": ((H,), False)})
        head = config.get("classifier") or {}
        tensors.update(linear("pooler.dense", H, H, required=bool(config.get("pooler")) or head.get("kind") == "bert"))
        tensors.update(linear("classifier.dense", H, H, required=head.get("kind") in ("roberta", "distilbert")))
        if head:
            tensors.update(linear("classifier", head["num_labels"], H))
    layer = {
        **norm("attn_norm"),
        **linear("attn.qkv", qkv_rows, H),
        **linear("attn.out", H, Hq * D),
        **norm("ffn_norm"),
        **linear(f"ffn.{up_name}", up_rows, H),
        **linear("ffn.down", H, I),
    }
    if config["norm_position"] == "pre":
        tensors.update(norm("final_norm"))
    if not encoder:
        tensors.update(linear("lm_head", V, H, required=not config["tie_word_embeddings"]))
    return TensorLayout(tensors, [("layers.", config["num_layers"], layer)])


def expected_tensors(config, max_tensors):
    """{name: (shape, required)} for every tensor a model with `config` may have (DESIGN.md);
    ValueError when that is more than the `max_tensors` the weight file holds."""
    return tensor_layout(config).enumerate(max_tensors)


def check_weights(config, tensors):
    """Checks names, shapes, dtypes and layout of `tensors` (from read_safetensors) against the
    config; returns the arrays for the core (no copies)."""
    expected = expected_tensors(config, max_tensors=len(tensors))
    quantized = quantized_layout(config)
    expected.update({name: (shape, True) for name, (shape, _) in quantized.items()})
    missing = [name for name, (_, required) in expected.items() if required and name not in tensors]
    unknown = [name for name in tensors if name not in expected]
    if missing:
        raise ValueError(f"model.safetensors lacks {len(missing)} expected tensor(s): {_some(missing)}")
    if unknown:
        raise ValueError(f"model.safetensors has {len(unknown)} tensor(s) unknown for this config: {_some(unknown)}")

    wanted_dtype = SAFETENSORS_DTYPES[config["dtype"]]
    for name, array in tensors.items():
        shape = expected[name][0]
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name} has shape {list(array.shape)}, expected {list(shape)}")
        if name in quantized:
            if tensors.dtypes[name] != quantized[name][1]:
                raise ValueError(
                    f"tensor {name} is stored as {tensors.dtypes[name]}, expected {quantized[name][1]} "
                    "(config.json lists it as quantized)"
                )
        elif tensors.dtypes[name] != wanted_dtype:
            raise ValueError(
                f"tensor {name} is stored as {tensors.dtypes[name]}, expected {wanted_dtype} "
                f"(config.json says dtype {config['dtype']})"
            )
        if not array.flags.c_contiguous:
            raise ValueError(f"tensor {name} is not C-contiguous")
    return dict(tensors)


def _some(names, limit=8):
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_context_length(config, context_length):
    max_positions = config["max_position_embeddings"]
    if context_length is None:
        return max_positions
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    if context_length > max_positions:
        if config["position"] == "learned":
            raise ValueError(f"context_length {context_length} exceeds this model's {max_positions} learned positions")
        warnings.warn(
            f"context_length {context_length} is beyond the {max_positions} positions the model was made for; "
            "quality may degrade there",
            stacklevel=3,
        )
    return context_length


def as_token_array(ids, vocab_size, what="ids"):
    """A non-empty int32 array of token ids from a list/tuple/array, or a clear exception."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    elif isinstance(ids, (list, tuple)):
        for token in ids:
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                raise TypeError(f"{what} must hold integer token ids, got {type(token).__name__} {token!r}")
    else:
        raise TypeError(f"{what} must be a list of token ids or a 1-D integer numpy array, got {type(ids).__name__}")
    if len(ids) == 0:
        raise ValueError(f"{what} is empty")
    try:
        array = np.asarray(ids, dtype=np.int64)
    except OverflowError:
        raise ValueError(f"a token id in {what} is outside the vocabulary [0, {vocab_size})") from None
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(array[bad][0])} in {what} is outside the vocabulary [0, {vocab_size})")
    return np.ascontiguousarray(array, dtype=np.int32)


class MappedModel:
    """The core model behind a loaded model, reached through a check that the memory-mapped weight
    file it points into is still whole (SafetensorsFile.check_intact: a file truncated under a
    loaded model raises FileChangedError on the next call instead of killing the process)."""

    _core = None
    _weights_file = None

    @property
    def _core_model(self):
        if self._weights_file is not None:
            self._weights_file.check_intact()
        return self._core


class Model(MappedModel):
    """A loaded model: its config, tokenizer (None if the directory has none) and the core model."""

    def __init__(self, path, config, core_model, weights, tokenizer, context_length, weights_file=None):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config["vocab_size"]
        self.context_length = context_length
        eos = config.get("eos_token_id")
        self.eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._core = core_model
        self._weights = weights  # the memory-mapped arrays the core points into
        self._weights_file = weights_file
        self.is_encoder = config.get("architecture") == "encoder"
        head = config.get("classifier") or {}
        self.labels = list(head["id2label"]) if head.get("id2label") else None  # classifier label names

    def __repr__(self):
        c = self.config
        return (
            f"pyxf.Model({str(self.path)!r}, family={c['family']}, layers={c['num_layers']}, "
            f"hidden={c['hidden_size']}, vocab={self.vocab_size}, weights: {describe_weights(self.weight_summary())}, "
            f"context_length={self.context_length})"
        )

    def weight_summary(self):
        """Tensors and bytes per storage format, and the weight bytes one decode step reads (see
        pyxf.model.weight_summary)."""
        return weight_summary(self.config, self._weights)

    def encode(self, texts, batch_size=32, pooling=None, normalize=None, output="sentence", max_length=None,
               truncate=True, progress=False):
        """Encoders: sentence embeddings float32 [N, H] (or token states, output="tokens"); see
        pyxf.encoding.encode."""
        from pyxf.encoding import encode

        self._require_encoder("encode")
        return encode(self, texts, batch_size=batch_size, pooling=pooling, normalize=normalize, output=output,
                      max_length=max_length, truncate=truncate, progress=progress)

    def classify(self, texts, batch_size=32, max_length=None, truncate=True, progress=False, return_logits=False):
        """Sequence classifiers: float32 [N, num_labels] probabilities (labels: self.labels); see
        pyxf.encoding.classify."""
        from pyxf.encoding import classify

        self._require_encoder("classify")
        return classify(self, texts, batch_size=batch_size, max_length=max_length, truncate=truncate,
                        progress=progress, return_logits=return_logits)

    def _require_encoder(self, what):
        if not self.is_encoder:
            raise ValueError(f"{what}() needs an encoder model (BERT, RoBERTa, DistilBERT); this is a {self.config['family']} decoder")

    def _require_decoder(self, what):
        if self.is_encoder:
            raise ValueError(f"{what}() needs a decoder model; this {self.config['family']} encoder has encode()/classify()")

    def logits(self, ids):
        """Logits for every position of one sequence: float32 [len(ids), vocab_size]."""
        self._require_decoder("logits")
        tokens = as_token_array(ids, self.vocab_size)
        if len(tokens) > self.context_length:
            raise ValueError(f"{len(tokens)} tokens exceed the context length {self.context_length}")
        session = core().Session(self._core_model, len(tokens))
        return session.feed(tokens, True)

    def session(self, context_length=None):
        """A sequence with its own KV cache, fed incrementally."""
        self._require_decoder("session")
        return Session(self, self.context_length if context_length is None else context_length)

    def generate(self, prompt=None, **kwargs):
        """Same as pyxf.generate(self, prompt, **kwargs)."""
        from pyxf.generation import generate

        self._require_decoder("generate")
        return generate(self, prompt, **kwargs)


def kv_cache_bytes(model, context_length):
    """Bytes of keys and values a sequence of context_length positions takes (whole pages)."""
    pages = -(-context_length // core().kv_page_tokens)
    return pages * core().Engine.page_bytes(model._core_model)


class Session:
    """One sequence with its own KV cache: feed(ids) appends tokens and returns their logits."""

    def __init__(self, model, context_length):
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if not 0 < context_length <= model.context_length:
            raise ValueError(f"context_length must be in [1, {model.context_length}], got {context_length}")
        self.model = model
        self.context_length = context_length
        try:
            self._session = core().Session(model._core_model, context_length)
        except MemoryError:
            raise MemoryError(
                f"a KV cache of {context_length} positions needs {kv_cache_bytes(model, context_length) / 2**30:.1f} "
                "GiB of address space, more than this machine grants; pass a smaller context_length"
            ) from None

    @property
    def position(self):
        """Number of tokens fed so far."""
        return self._session.position

    def feed(self, ids, all_logits=True):
        """Appends tokens; returns float32 logits [len(ids), vocab] (or [1, vocab] for the last only)."""
        tokens = as_token_array(ids, self.model.vocab_size)
        self.model._core_model  # noqa: B018 -- checks the weight file is intact
        if self.position + len(tokens) > self.context_length:
            raise ValueError(
                f"feeding {len(tokens)} tokens at position {self.position} exceeds the session's "
                f"context length {self.context_length}"
            )
        return self._session.feed(tokens, bool(all_logits))

    def reset(self):
        self._session.reset()
