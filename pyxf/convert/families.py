"""Declarative tables: how each source format names a family's tensors, and how configs map.

A `Rule` builds one pyxf tensor from one or more source tensors: each source is optionally
transformed (transpose, RoPE un-permutation), then the results are concatenated along axis 0
(q,k,v -> qkv; gate,up -> gate_up). Names may hold `{i}`, the layer index. Adding a family means
adding a `Family` entry to `FAMILIES` (plus, if needed, a transform to `TRANSFORMS`), not code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# ---------------------------------------------------------------------------------------------
# transforms: (array, normalized config) -> array, with a matching shape function


def _undo_gguf_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows of each head interleaved for its pairwise RoPE: HF row
    h*D + s*D/2 + j (s = half, j < D/2) sits at GGUF row h*D + 2*j + s. Put rows back."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Transform:
    apply: Callable[[np.ndarray, dict], np.ndarray]
    shape: Callable[[tuple, dict], tuple]


TRANSFORMS: dict[str, Transform] = {
    # GPT-2's Conv1D stores weights [in, out]; pyxf wants nn.Linear's [out, in].
    "transpose": Transform(lambda a, cfg: a.T, lambda s, cfg: tuple(reversed(s))),
    "unpermute_q": Transform(lambda a, cfg: _undo_gguf_rope_permutation(a, cfg["num_heads"]), lambda s, cfg: s),
    "unpermute_k": Transform(lambda a, cfg: _undo_gguf_rope_permutation(a, cfg["num_kv_heads"]), lambda s, cfg: s),
    # torch's nn.MultiheadAttention in_proj (q, k, v rows): cross-attention takes q apart from k, v.
    "rows_q": Transform(lambda a, cfg: a[: a.shape[0] // 3], lambda s, cfg: (s[0] // 3, *s[1:])),
    "rows_kv": Transform(lambda a, cfg: a[a.shape[0] // 3 :], lambda s, cfg: (s[0] - s[0] // 3, *s[1:])),
    # Marian's final_logits_bias [1, V] -> [V]
    "flatten": Transform(lambda a, cfg: a.reshape(-1), lambda s, cfg: (int(np.prod(s)),)),
}


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


def rule(target: str, *sources, optional: bool = False) -> Rule:
    """Shorthand: sources are names or (name, transform) pairs."""
    srcs = tuple(Source(*s) if isinstance(s, tuple) else Source(s) for s in sources)
    return Rule(target, srcs, optional)


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
    # normalized config -> the table, for families whose tensor names depend on the config (shared
    # or separate embeddings); `hf` then only gives the prefixes to strip.
    hf_tables: Callable[[dict], TensorTable] | None = None


_LLAMA_HF = TensorTable(
    global_rules=(
        rule("embed.weight", "embed_tokens.weight"),
        rule("final_norm.weight", "norm.weight"),
    ),
    layer_rules=(
        rule("layers.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight"),
        rule(
            "layers.{i}.attn.qkv.weight",
            "layers.{i}.self_attn.q_proj.weight",
            "layers.{i}.self_attn.k_proj.weight",
            "layers.{i}.self_attn.v_proj.weight",
        ),
        rule(
            "layers.{i}.attn.qkv.bias",
            "layers.{i}.self_attn.q_proj.bias",
            "layers.{i}.self_attn.k_proj.bias",
            "layers.{i}.self_attn.v_proj.bias",
            optional=True,
        ),
        rule("layers.{i}.attn.out.weight", "layers.{i}.self_attn.o_proj.weight"),
        rule("layers.{i}.attn.out.bias", "layers.{i}.self_attn.o_proj.bias", optional=True),
        rule("layers.{i}.ffn_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
        rule("layers.{i}.ffn.gate_up.weight", "layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
        rule(
            "layers.{i}.ffn.gate_up.bias",
            "layers.{i}.mlp.gate_proj.bias",
            "layers.{i}.mlp.up_proj.bias",
            optional=True,
        ),
        rule("layers.{i}.ffn.down.weight", "layers.{i}.mlp.down_proj.weight"),
        rule("layers.{i}.ffn.down.bias", "layers.{i}.mlp.down_proj.bias", optional=True),
    ),
    lm_head=rule("lm_head.weight", "lm_head.weight"),
    strip_prefixes=("model.",),
    ignore_suffixes=("rotary_emb.inv_freq",),
)


def _llama_gguf(q_transform: str | None, k_transform: str | None) -> TensorTable:
    """llama.cpp's names; llama permutes Q/K rows for its pairwise RoPE, qwen2 (NEOX RoPE) does not."""
    return TensorTable(
        global_rules=(
            rule("embed.weight", "token_embd.weight"),
            rule("final_norm.weight", "output_norm.weight"),
        ),
        layer_rules=(
            rule("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
            rule(
                "layers.{i}.attn.qkv.weight",
                ("blk.{i}.attn_q.weight", q_transform),
                ("blk.{i}.attn_k.weight", k_transform),
                "blk.{i}.attn_v.weight",
            ),
            rule(
                "layers.{i}.attn.qkv.bias",
                ("blk.{i}.attn_q.bias", q_transform),
                ("blk.{i}.attn_k.bias", k_transform),
                "blk.{i}.attn_v.bias",
                optional=True,
            ),
            rule("layers.{i}.attn.out.weight", "blk.{i}.attn_output.weight"),
            rule("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
            rule("layers.{i}.ffn.gate_up.weight", "blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
            rule("layers.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight"),
        ),
        lm_head=rule("lm_head.weight", "output.weight"),
        ignore_suffixes=("rope_freqs.weight",),
    )


def _gpt2_layer_rules() -> tuple[Rule, ...]:
    rules = []
    for target, source, transposed in (
        ("attn_norm", "ln_1", False),
        ("attn.qkv", "attn.c_attn", True),
        ("attn.out", "attn.c_proj", True),
        ("ffn_norm", "ln_2", False),
        ("ffn.up", "mlp.c_fc", True),
        ("ffn.down", "mlp.c_proj", True),
    ):
        weight = (f"h.{{i}}.{source}.weight", "transpose") if transposed else f"h.{{i}}.{source}.weight"
        rules.append(rule(f"layers.{{i}}.{target}.weight", weight))
        rules.append(rule(f"layers.{{i}}.{target}.bias", f"h.{{i}}.{source}.bias"))
    return tuple(rules)


_GPT2_HF = TensorTable(
    global_rules=(
        rule("embed.weight", "wte.weight"),
        rule("pos_embed.weight", "wpe.weight"),
        rule("final_norm.weight", "ln_f.weight"),
        rule("final_norm.bias", "ln_f.bias"),
    ),
    layer_rules=_gpt2_layer_rules(),
    lm_head=rule("lm_head.weight", "lm_head.weight"),
    strip_prefixes=("transformer.",),
    # causal-mask buffers that old checkpoints saved alongside the weights
    ignore_suffixes=(".attn.bias", ".attn.masked_bias"),
)


# Encoders (BERT family). Heads beside the encoder, run in numpy by pyxf.encoding: `pooler.dense`
# (BERT pooler, tanh), `classifier.dense` (RoBERTa's classifier.dense, DistilBERT's pre_classifier)
# and `classifier` (the final projection to the labels).


def _bert_layer_rules(base: str, names: dict[str, str]) -> tuple[Rule, ...]:
    """Post-LN encoder layer: q,k,v fused into attn.qkv; `names` maps pyxf parts to source parts."""
    rules = []
    for part in ("weight", "bias"):
        rules.append(rule(f"layers.{{i}}.attn.qkv.{part}", *(f"{base}.{names[n]}.{part}" for n in ("q", "k", "v"))))
        for target in ("attn.out", "attn_norm", "ffn.up", "ffn.down", "ffn_norm"):
            rules.append(rule(f"layers.{{i}}.{target}.{part}", f"{base}.{names[target]}.{part}"))
    return tuple(rules)


def _linear_rules(target: str, source: str) -> tuple[Rule, ...]:
    return tuple(rule(f"{target}.{p}", f"{source}.{p}", optional=True) for p in ("weight", "bias"))


_BERT_EMBEDDINGS = (
    rule("embed.weight", "embeddings.word_embeddings.weight"),
    rule("pos_embed.weight", "embeddings.position_embeddings.weight"),
    rule("embed_norm.weight", "embeddings.LayerNorm.weight"),
    rule("embed_norm.bias", "embeddings.LayerNorm.bias"),
)
_BERT_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "attn.out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}

_BERT_HF = TensorTable(
    global_rules=(
        *_BERT_EMBEDDINGS,
        rule("token_type_embed.weight", "embeddings.token_type_embeddings.weight"),
        *_linear_rules("pooler.dense", "pooler.dense"),
        *_linear_rules("classifier", "classifier"),
    ),
    layer_rules=_bert_layer_rules("encoder.layer.{i}", _BERT_LAYER_NAMES),
    strip_prefixes=("bert.",),
    # BertForMaskedLM / BertForPreTraining heads: not converted (pyxf runs the encoder)
    ignore_suffixes=(
        "embeddings.position_ids", "embeddings.token_type_ids", "cls.predictions.bias",
        "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
        "cls.seq_relationship.weight", "cls.seq_relationship.bias",
    ),
)

_ROBERTA_HF = TensorTable(
    global_rules=(
        *_BERT_EMBEDDINGS,
        rule("token_type_embed.weight", "embeddings.token_type_embeddings.weight"),
        *_linear_rules("pooler.dense", "pooler.dense"),
        *_linear_rules("classifier.dense", "classifier.dense"),
        *_linear_rules("classifier", "classifier.out_proj"),
    ),
    layer_rules=_bert_layer_rules("encoder.layer.{i}", _BERT_LAYER_NAMES),
    strip_prefixes=("roberta.",),
    ignore_suffixes=("embeddings.position_ids", "embeddings.token_type_ids"),
)

_DISTILBERT_HF = TensorTable(
    global_rules=(
        *_BERT_EMBEDDINGS,
        *_linear_rules("classifier.dense", "pre_classifier"),
        *_linear_rules("classifier", "classifier"),
    ),
    layer_rules=_bert_layer_rules(
        "transformer.layer.{i}",
        {
            "q": "attention.q_lin",
            "k": "attention.k_lin",
            "v": "attention.v_lin",
            "attn.out": "attention.out_lin",
            "attn_norm": "sa_layer_norm",
            "ffn.up": "ffn.lin1",
            "ffn.down": "ffn.lin2",
            "ffn_norm": "output_layer_norm",
        },
    ),
    strip_prefixes=("distilbert.",),
    ignore_suffixes=("embeddings.position_ids",),
)


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


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope(hf: dict) -> tuple[float, dict | None, float]:
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


def _common_config(hf: dict) -> dict:
    return {
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": _token_ids(hf.get("eos_token_id")),
        "pad_token_id": hf.get("pad_token_id"),
        "chat_template": None,
        "tokenizer": None,
        "add_bos_token": False,
    }


def llama_config(hf: dict) -> dict:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling, partial = _rope(hf)
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < hf.get("max_position_embeddings", 0):
        warnings.warn(f"sliding-window attention ({window}) is not supported; the full context is attended")
    return {
        "family": "llama",
        "architecture": "decoder",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hidden // heads,
        "intermediate_size": hf["intermediate_size"],
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "norm_position": "pre",
        "activation": _activation(hf.get("hidden_act", "silu")),
        "gated_ffn": True,
        "position": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_interleaved": False,
        "partial_rotary_factor": partial,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **_common_config(hf),
    }


def gpt2_config(hf: dict) -> dict:
    hidden, heads = hf["n_embd"], hf["n_head"]
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ValueError("GPT-2 variants with non-standard attention scaling are not supported")
    return {
        "family": "gpt2",
        "architecture": "decoder",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "num_layers": hf["n_layer"],
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_dim": hidden // heads,
        "intermediate_size": hf.get("n_inner") or 4 * hidden,
        "norm": "layernorm",
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "norm_position": "pre",
        "activation": _activation(hf.get("activation_function", "gelu_new")),
        "gated_ffn": False,
        "position": "learned",
        "rope_theta": None,  # no RoPE: learned positions
        "rope_scaling": None,
        "rope_interleaved": False,
        "partial_rotary_factor": 1.0,
        "max_position_embeddings": hf.get("n_positions", 1024),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        **_common_config(hf),
    }


# Labels named LABEL_i one by one when a config gives num_labels without id2label (as transformers
# does): bounded, since the count is not backed by the weights yet at this point.
MAX_LABELS = 1 << 16


def _classifier(hf: dict, kind: str) -> dict | None:
    """The sequence-classification head of a *ForSequenceClassification checkpoint, else None."""
    if not any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return None
    id2label = hf.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must map label ids to names, got {type(id2label).__name__}")
    num_labels = len(id2label) or hf.get("num_labels", 2)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 0 < num_labels <= MAX_LABELS:
        raise ValueError(f"num_labels must be an integer in [1, {MAX_LABELS}] (or id2label given), got {num_labels!r}")
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)]
    problem = hf.get("problem_type")
    if problem is None:  # transformers' default when training: one label is a regression
        problem = "regression" if num_labels == 1 else "single_label_classification"
    if problem not in ("regression", "single_label_classification", "multi_label_classification"):
        raise ValueError(f"unknown problem_type {problem!r}")
    return {"kind": kind, "num_labels": num_labels, "id2label": labels, "problem_type": problem}


def _encoder_config(hf: dict, family: str, *, hidden, layers, heads, intermediate, activation, eps,
                    type_vocab_size, position_offset, classifier) -> dict:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported (only absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("BERT-family decoders (is_decoder / cross-attention) are not supported; only encoders")
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the {heads} heads")
    return {
        "family": family,
        "architecture": "encoder",
        "causal": False,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_dim": hidden // heads,
        "intermediate_size": intermediate,
        "norm": "layernorm",
        "norm_eps": float(eps),
        "norm_position": "post",
        "activation": _activation(activation),
        "gated_ffn": False,
        "position": "learned",
        "position_offset": position_offset,
        "type_vocab_size": type_vocab_size,
        "rope_theta": None,
        "rope_scaling": None,
        "rope_interleaved": False,
        "partial_rotary_factor": 1.0,
        "max_position_embeddings": hf.get("max_position_embeddings", 512),
        "tie_word_embeddings": False,
        "pooler": False,  # settled by _encoder_finalize from the tensors present
        "classifier": classifier,
        "pooling": None,  # sentence-transformers pooling, filled by the HF reader
        **_common_config(hf),
    }


def bert_config(hf: dict) -> dict:
    return _encoder_config(
        hf, "bert", hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"], activation=hf.get("hidden_act", "gelu"),
        eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=int(hf.get("type_vocab_size", 2)), position_offset=0,
        classifier=_classifier(hf, "bert"),
    )


def roberta_config(hf: dict) -> dict:
    # RoBERTa numbers positions from padding_idx + 1 (its position ids skip the pad id's row).
    pad = hf.get("pad_token_id")
    return _encoder_config(
        hf, "roberta", hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"], activation=hf.get("hidden_act", "gelu"),
        eps=hf.get("layer_norm_eps", 1e-5), type_vocab_size=int(hf.get("type_vocab_size", 1)),
        position_offset=(1 if pad is None else int(pad)) + 1, classifier=_classifier(hf, "roberta"),
    )


def distilbert_config(hf: dict) -> dict:
    return _encoder_config(
        hf, "distilbert", hidden=hf["dim"], layers=hf["n_layers"], heads=hf["n_heads"],
        intermediate=hf["hidden_dim"], activation=hf.get("activation", "gelu"), eps=1e-12,  # fixed in DistilBERT
        type_vocab_size=0, position_offset=0, classifier=_classifier(hf, "distilbert"),
    )


_HEAD_SOURCES = {  # classifier kind -> source tensors its head needs
    "bert": ("pooler.dense.weight", "classifier.weight"),
    "roberta": ("classifier.dense.weight", "classifier.out_proj.weight"),
    "distilbert": ("pre_classifier.weight", "classifier.weight"),
}


def _encoder_finalize(config: dict, source_names: set) -> dict:
    """`pooler` from the tensors present; a declared classifier must have its tensors."""
    config = dict(config)
    config["pooler"] = "pooler.dense.weight" in source_names
    head = config.get("classifier")
    if head is not None:
        missing = [n for n in _HEAD_SOURCES[head["kind"]] if n not in source_names]
        if missing:
            raise ValueError(f"the sequence-classification head lacks {', '.join(missing)}")
    return config


FAMILIES: dict[str, Family] = {
    "llama": Family(
        name="llama",
        hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        hf_model_types=("llama", "mistral", "qwen2"),
        hf=_LLAMA_HF,
        hf_config=llama_config,
        gguf={
            "llama": _llama_gguf("unpermute_q", "unpermute_k"),
            "qwen2": _llama_gguf(None, None),
        },
    ),
    "gpt2": Family(
        name="gpt2",
        hf_architectures=("GPT2LMHeadModel",),
        hf_model_types=("gpt2",),
        hf=_GPT2_HF,
        hf_config=gpt2_config,
    ),
    "bert": Family(
        name="bert",
        hf_architectures=("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
        hf_model_types=("bert",),
        hf=_BERT_HF,
        hf_config=bert_config,
        finalize=_encoder_finalize,
    ),
    "roberta": Family(
        name="roberta",
        hf_architectures=(
            "RobertaModel", "RobertaForSequenceClassification", "XLMRobertaModel", "XLMRobertaForSequenceClassification",
        ),
        hf_model_types=("roberta", "xlm-roberta"),
        hf=_ROBERTA_HF,
        hf_config=roberta_config,
        finalize=_encoder_finalize,
    ),
    "distilbert": Family(
        name="distilbert",
        hf_architectures=("DistilBertModel", "DistilBertForSequenceClassification"),
        hf_model_types=("distilbert",),
        hf=_DISTILBERT_HF,
        hf_config=distilbert_config,
        finalize=_encoder_finalize,
    ),
}


# ---------------------------------------------------------------------------------------------
# what a source reader hands to the writer


@dataclass(frozen=True)
class SourceTensor:
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  # -> float32 array of `shape`
    # -> its bfloat16 bits (uint16 array of `shape`) when stored in bfloat16, so that a bfloat16
    # output is written without a float32 detour; None otherwise
    load_bf16: Callable[[], np.ndarray] | None = None


@dataclass
class Checkpoint:
    """An opened source checkpoint, ready to be written as a pyxf directory."""

    config: dict  # normalized config.json content; tokenizer fields are filled by write_tokenizer
    table: TensorTable
    tensors: dict[str, SourceTensor]  # source names, prefixes stripped
    write_tokenizer: Callable[[object], dict]  # (out_dir) -> config.json tokenizer fields
    source: dict  # config.json "source"


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.hf_architectures)


def family_for_hf_config(hf: dict) -> Family:
    """The family for an HF config.json dict, by "architectures" (or "model_type")."""
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"'architectures' must be a list of class names, got {str(architectures)[:80]}")
    if not isinstance(hf.get("model_type", ""), (str, type(None))):
        raise ValueError(f"'model_type' must be a string, got {str(hf['model_type'])[:80]}")
    for family in FAMILIES.values():
        if any(a in family.hf_architectures for a in architectures):
            return family
    if not architectures:
        for family in FAMILIES.values():
            if hf.get("model_type") in family.hf_model_types:
                return family
    named = architectures or [hf.get("model_type")]
    raise ValueError(
        f"unsupported architecture {', '.join(map(str, named))}; supported: {', '.join(supported_architectures())}"
    )


def family_for_gguf(arch: str) -> tuple[Family, TensorTable]:
    for family in FAMILIES.values():
        if arch in family.gguf:
            return family, family.gguf[arch]
    supported = sorted(a for f in FAMILIES.values() for a in f.gguf)
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported)}")


def normalized_config(hf: dict) -> dict:
    """pyxf's config.json content (without dtype/source/tokenizer details) from an HF config dict."""
    family = family_for_hf_config(hf)
    try:
        config = family.hf_config(hf)
    except KeyError as e:
        raise ValueError(f"config lacks {e.args[0]!r}, needed for a {family.name} model") from None
    except (TypeError, ArithmeticError, AttributeError, IndexError) as e:  # a value of the wrong kind
        raise ValueError(f"config has a value pyxf cannot use for a {family.name} model: "
                         f"{type(e).__name__}: {e}") from None
    return {"format": "pyxf", "format_version": 1, **config}


# ---------------------------------------------------------------------------------------------
# planning: which source tensors make which pyxf tensor


@dataclass(frozen=True)
class Planned:
    target: str
    sources: tuple[Source, ...]  # concrete names (no {i})
    optional: bool = False


def _expand(r: Rule, i: int | None) -> Planned:
    fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
    return Planned(fmt(r.target), tuple(Source(fmt(s.name), s.transform) for s in r.sources), r.optional)


def _required_sources(rules: tuple[Rule, ...]) -> int:
    return len({s.name for r in rules if not r.optional for s in r.sources})


def _check_layer_counts(table: TensorTable, layers, encoder_layers, available: int) -> None:
    """The layer counts a config claims, against the tensors the checkpoint has, before any work
    proportional to them (a config.json claiming 2**31 layers must not make us list them). Up to
    twice the tensors present are accepted here, so that a checkpoint missing some gets a message
    naming them."""
    for what, count in (("num_layers", layers), ("num_encoder_layers", encoder_layers)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {count!r}")
    needed = layers * _required_sources(table.layer_rules) + encoder_layers * _required_sources(
        table.encoder_layer_rules
    )
    if needed > 2 * available + 64:  # up to twice as many are listed: missing ones are then named
        raise ValueError(
            f"the config describes {layers} layers" + (f" and {encoder_layers} encoder layers" if encoder_layers else "")
            + f", at least {needed} source tensors, but the checkpoint has {available}"
        )


def plan_tensors(table: TensorTable, source_names, config: dict) -> tuple[list[Planned], list[str]]:
    """The pyxf tensors to build, in output order, and the source names nobody uses.

    `source_names` are the names after prefix stripping. Raises ValueError listing every missing
    required source tensor (an optional rule whose sources are all absent is skipped).
    """
    available = set(source_names)
    encoder_layers = config.get("num_encoder_layers", 0) if table.encoder_layer_rules else 0
    _check_layer_counts(table, config["num_layers"], encoder_layers, len(available))
    rules = [_expand(r, None) for r in table.global_rules]
    for i in range(encoder_layers):
        rules += [_expand(r, i) for r in table.encoder_layer_rules]
    for i in range(config["num_layers"]):
        rules += [_expand(r, i) for r in table.layer_rules]
    if table.lm_head is not None and not config["tie_word_embeddings"]:
        rules.append(_expand(table.lm_head, None))

    planned, missing = [], []
    for r in rules:
        absent = [s.name for s in r.sources if s.name not in available]
        if not absent:
            planned.append(r)
        elif not r.optional or len(absent) < len(r.sources):
            missing += absent
    if missing:
        raise ValueError(f"missing source tensors ({len(missing)}): {', '.join(missing)}")

    used = {s.name for r in planned for s in r.sources}
    if config["tie_word_embeddings"] and table.lm_head is not None:
        used |= {s.name for s in table.lm_head.sources}  # a saved copy of the tied head
    unused = [n for n in source_names if n not in used and not any(n.endswith(suf) for suf in table.ignore_suffixes)]
    return planned, unused


def planned_shape(p: Planned, shapes: dict[str, tuple], config: dict) -> tuple:
    """Shape of the built tensor from its sources' shapes, without loading anything."""
    parts = []
    for s in p.sources:
        shape = tuple(shapes[s.name])
        parts.append(TRANSFORMS[s.transform].shape(shape, config) if s.transform else shape)
    if len(parts) == 1:
        return parts[0]
    if any(len(sh) != len(parts[0]) or sh[1:] != parts[0][1:] for sh in parts):
        raise ValueError(f"cannot concatenate {[s.name for s in p.sources]} with shapes {parts} into {p.target}")
    return (sum(sh[0] for sh in parts), *parts[0][1:])


def build_tensor(p: Planned, load: Callable[[str], np.ndarray], config: dict) -> np.ndarray:
    """Load, transform and concatenate the sources of one pyxf tensor (float32)."""
    parts = []
    for s in p.sources:
        array = load(s.name)
        parts.append(TRANSFORMS[s.transform].apply(array, config) if s.transform else array)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


# Encoder-decoder families (the original Transformer, Marian, T5) live in their own module.
from .seq2seq_families import SEQ2SEQ_FAMILIES  # noqa: E402

FAMILIES.update(SEQ2SEQ_FAMILIES)
