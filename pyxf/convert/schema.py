"""The vocabulary of the converter's family declarations (pyxf/convert/families/): how a source
format names a family's tensors (`Rule`s in a `TensorTable`), how its config maps to pyxf's
(`Family.hf_config`), and the hooks a family may add (settling the config from the tensors present,
reading extra files, writing the tokenizer). Also what a source reader hands to the writer
(`SourceTensor`, `Checkpoint`), and the config helpers several families share.

A `Rule` builds one pyxf tensor from one or more source tensors: each source is optionally
transformed (named transforms of pyxf/convert/plan.py: transpose, RoPE un-permutation, ...), then
the results are concatenated along axis 0 (q,k,v -> qkv; gate,up -> gate_up). Names may hold `{i}`,
the layer index. This module imports nothing of pyxf (nor numpy), so that every family module can
import it and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# ---------------------------------------------------------------------------------------------
# tensor tables

@dataclass(frozen=True)
class Source:
    name: str
    transform: str | None = None


@dataclass(frozen=True)
class Rule:
    target: str
    sources: tuple[Source, ...]
    optional: bool = False  # e.g. biases: taken when (all of) the sources are present
    # The sources are stacks of experts [E, rows, cols] (llama.cpp's *_exps): joined expert by
    # expert (expert e's rows of every source, then e + 1's) into [E * rows, cols].
    experts: bool = False


def rule(target: str, *sources, optional: bool = False, experts: bool = False) -> Rule:
    """Shorthand: sources are names or (name, transform) pairs."""
    srcs = tuple(Source(*s) if isinstance(s, tuple) else Source(s) for s in sources)
    return Rule(target, srcs, optional, experts)


@dataclass(frozen=True)
class TensorTable:
    """How one source format names a family's tensors."""

    global_rules: tuple[Rule, ...]
    layer_rules: tuple[Rule, ...]
    lm_head: Rule | None = None  # taken unless the embeddings are tied
    encoder_layer_rules: tuple[Rule, ...] = ()  # encoder-decoder: per encoder layer (num_encoder_layers)
    strip_prefixes: tuple[str, ...] = ()  # e.g. "model." (LlamaForCausalLM vs LlamaModel)
    ignore_suffixes: tuple[str, ...] = ()  # buffers that are not weights (attention masks, ...)


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]  # config.json "architectures"
    hf_model_types: tuple[str, ...]  # config.json "model_type", when architectures is absent
    hf: TensorTable
    hf_config: Callable[[dict], dict]
    gguf: dict[str, TensorTable] = field(default_factory=dict)  # general.architecture -> table
    # (normalized config, source tensor names) -> config: settles what depends on which optional
    # tensors a checkpoint has (an encoder's pooler), and checks that a declared head is there.
    finalize: Callable[[dict, set], dict] | None = None
    # (normalized config, the checkpoint's tensor names) -> the table, for families whose tensor
    # names depend on the config (shared or separate embeddings) or on the checkpoint's lineage
    # (Mixtral's experts beside Qwen-MoE's); `hf` then only gives the prefixes to strip.
    hf_tables: Callable[[dict, set], TensorTable] | None = None
    # (normalized config, general.architecture's table) -> the table of this GGUF file, for
    # architectures whose tensors depend on the metadata (a llama file with experts: Mixtral).
    gguf_tables: Callable[[dict, TensorTable], TensorTable] | None = None
    # (files_dir, out_dir, hf config, normalized config) -> config.json's tokenizer fields: copies or
    # writes the tokenizer files (pyxf/convert/tokenizer_files.py has the shared writers).
    write_tokenizer: Callable | None = None
    # (files_dir, normalized config) -> config fields read from files beside the checkpoint
    # (sentence-transformers' pooling of an encoder).
    read_files: Callable | None = None
    # (config, GGUF metadata) -> config: the family's own fields, on the config read from the
    # llama-like `{arch}.*` keys every GGUF decoder has (pyxf/convert/gguf_import.py).
    gguf_config: Callable[[dict, dict], dict] | None = None


# ---------------------------------------------------------------------------------------------
# what a source reader hands to the writer


@dataclass(frozen=True)
class SourceTensor:
    shape: tuple[int, ...]
    load: Callable[[], object]  # -> float32 numpy array of `shape`
    # -> its bfloat16 bits (uint16 array of `shape`) when stored in bfloat16, so that a bfloat16
    # output is written without a float32 detour; None otherwise
    load_bf16: Callable[[], object] | None = None


@dataclass
class Checkpoint:
    """An opened source checkpoint, ready to be written as a pyxf directory."""

    config: dict  # normalized config.json content; tokenizer fields are filled by write_tokenizer
    table: TensorTable
    tensors: dict[str, SourceTensor]  # source names, prefixes stripped
    write_tokenizer: Callable[[object], dict]  # (out_dir) -> config.json tokenizer fields
    source: dict  # config.json "source"
    # convert's dtype when none is given: a GGUF file's own float type for its matrices
    stored_dtype: str = "float32"



# ---------------------------------------------------------------------------------------------
# planning: which source tensors make which pyxf tensor


@dataclass(frozen=True)
class Planned:
    target: str
    sources: tuple[Source, ...]  # concrete names (no {i})
    optional: bool = False
    experts: bool = False  # Rule.experts


# ---------------------------------------------------------------------------------------------
# configs


ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def rope_fields(hf: dict) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from transformers v4 (`rope_theta`,
    `rope_scaling`) or v5 (`rope_parameters`, which also holds the theta) configs."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta", params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    partial = hf.get("partial_rotary_factor", params.pop("partial_rotary_factor", 1.0))
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), (dict(scaling) if scaling else None), float(partial)


def sliding_window(hf: dict) -> int | None:
    """The attention window W of a checkpoint that attends to the last W positions only, or None
    when it is absent, switched off (`use_sliding_window`) or as long as the context: full attention."""
    window = hf.get("sliding_window")
    if not (window and hf.get("use_sliding_window", True) and window < hf.get("max_position_embeddings", 0)):
        return None
    return window


def sliding_window_layers(window, layer_types, num_layers: int) -> tuple[int | None, int | None]:
    """(sliding_window, sliding_window_pattern) of pyxf's config from a window and HF's layer_types
    ("sliding_attention" / "full_attention" per layer): (None, None) when no layer is local,
    (W, None) when every layer is, (W, N) when layer i is global exactly when (i + 1) % N == 0.
    ValueError for other arrangements, which pyxf cannot run."""
    kinds = {"sliding_attention": True, "full_attention": False}
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or any(t not in kinds for t in layer_types):
        raise ValueError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                         f"{num_layers} layers, got {str(layer_types)[:120]}")
    local = [kinds[t] for t in layer_types]
    if not window or not any(local):
        return None, None
    if all(local):
        return window, None
    pattern = local.index(False) + 1
    if local != [(i + 1) % pattern != 0 for i in range(len(local))]:
        raise ValueError(f"layer_types {layer_types} do not repeat one pattern (local layers, then a global "
                         "one); pyxf supports such patterns only")
    return window, pattern


def gated_rope_decoder(hf: dict, norm_eps: float) -> dict:
    """The fields every Llama-like HF decoder config gives alike: sizes, pre-RMSNorm (`norm_eps` when
    the config has no rms_norm_eps), a gated FFN, RoPE (not interleaved) and a tied or separate head."""
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling, partial = rope_fields(hf)
    return {
        "architecture": "decoder",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hidden // heads,
        "intermediate_size": hf["intermediate_size"],
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", norm_eps)),
        "norm_position": "pre",
        "activation": activation(hf.get("hidden_act", "silu")),
        "gated_ffn": True,
        "position": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_interleaved": False,
        "partial_rotary_factor": partial,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def common_config(hf: dict) -> dict:
    return {
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": token_ids(hf.get("eos_token_id")),
        "pad_token_id": hf.get("pad_token_id"),
        "chat_template": None,
        "tokenizer": None,
        "add_bos_token": False,
    }


