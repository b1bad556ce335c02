"""Encoders: BERT, RoBERTa (also XLM-R), DistilBERT, MPNet, ModernBERT; sentence-transformers
checkpoints of them."""

from __future__ import annotations

from ..schema import Family, Rule, TensorTable, common_config, rule
from ..schema import activation as activation_name
from ..tokenizer_files import sentence_transformers_fields, write_encoder_tokenizer

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

# MPNet: BERT's post-norm layers (q, k, v, o named apart) and one table of relative position
# buckets shared by all layers.
_MPNET_HF = TensorTable(
    global_rules=(
        *_BERT_EMBEDDINGS,
        rule("rel_bias.weight", "encoder.relative_attention_bias.weight"),
        *_linear_rules("pooler.dense", "pooler.dense"),
        *_linear_rules("classifier.dense", "classifier.dense"),
        *_linear_rules("classifier", "classifier.out_proj"),
    ),
    layer_rules=_bert_layer_rules(
        "encoder.layer.{i}",
        {
            "q": "attention.attn.q",
            "k": "attention.attn.k",
            "v": "attention.attn.v",
            "attn.out": "attention.attn.o",
            "attn_norm": "attention.LayerNorm",
            "ffn.up": "intermediate.dense",
            "ffn.down": "output.dense",
            "ffn_norm": "output.LayerNorm",
        },
    ),
    strip_prefixes=("mpnet.",),
    # MPNetForMaskedLM's head: not converted (pyxf runs the encoder)
    ignore_suffixes=(
        "embeddings.position_ids", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
        "lm_head.layer_norm.bias", "lm_head.decoder.weight", "lm_head.decoder.bias", "lm_head.bias",
    ),
)


def _modernbert_layer_rules() -> tuple[Rule, ...]:
    """Pre-norm layers; q, k, v already fused (Wqkv), and Wi holds GeGLU's activated half, then the
    other (pyxf's gate rows, then up rows). Biases when the config has them. Layer 0 has no
    attention norm (its input is the embedding norm's output)."""
    base = "layers.{i}"
    rules = [rule("layers.{i}.attn_norm.weight", f"{base}.attn_norm.weight", optional=True),
             rule("layers.{i}.attn_norm.bias", f"{base}.attn_norm.bias", optional=True)]
    for target, source in (("attn.qkv", "attn.Wqkv"), ("attn.out", "attn.Wo"), ("ffn.gate_up", "mlp.Wi"),
                           ("ffn.down", "mlp.Wo")):
        rules.append(rule(f"layers.{{i}}.{target}.weight", f"{base}.{source}.weight"))
        rules.append(rule(f"layers.{{i}}.{target}.bias", f"{base}.{source}.bias", optional=True))
    rules.append(rule("layers.{i}.ffn_norm.weight", f"{base}.mlp_norm.weight"))
    rules.append(rule("layers.{i}.ffn_norm.bias", f"{base}.mlp_norm.bias", optional=True))
    return tuple(rules)


_MODERNBERT_GLOBAL_RULES = (
    rule("embed.weight", "embeddings.tok_embeddings.weight"),
    rule("embed_norm.weight", "embeddings.norm.weight"),
    rule("embed_norm.bias", "embeddings.norm.bias", optional=True),
    rule("final_norm.weight", "final_norm.weight"),
    rule("final_norm.bias", "final_norm.bias", optional=True),
)
_MODERNBERT_HF = TensorTable(
    global_rules=_MODERNBERT_GLOBAL_RULES,
    layer_rules=_modernbert_layer_rules(),
    strip_prefixes=("model.",),
    # ModernBertForMaskedLM's head: not converted (pyxf runs the encoder)
    ignore_suffixes=("head.dense.weight", "head.dense.bias", "head.norm.weight", "head.norm.bias",
                     "decoder.weight", "decoder.bias"),
)
# ModernBertForSequenceClassification: its head (dense, activation, norm) and the classifier.
_MODERNBERT_CLASSIFIER_HF = TensorTable(
    global_rules=(
        *_MODERNBERT_GLOBAL_RULES,
        *_linear_rules("classifier.dense", "head.dense"),
        rule("classifier.norm.weight", "head.norm.weight"),
        rule("classifier.norm.bias", "head.norm.bias", optional=True),
        *_linear_rules("classifier", "classifier"),
    ),
    layer_rules=_modernbert_layer_rules(),
    strip_prefixes=("model.",),
)


def _modernbert_tables(config: dict, names=()) -> TensorTable:
    return _MODERNBERT_CLASSIFIER_HF if config.get("classifier") else _MODERNBERT_HF


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
        "activation": activation_name(activation),
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
        **common_config(hf),
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


# transformers' MPNet buckets relative positions into 32 buckets up to distance 128, whatever
# relative_attention_num_buckets says (MPNetEncoder.compute_position_bias).
MPNET_BUCKETS = 32
MPNET_MAX_DISTANCE = 128


def mpnet_config(hf: dict) -> dict:
    buckets = hf.get("relative_attention_num_buckets", MPNET_BUCKETS)
    if buckets != MPNET_BUCKETS:
        raise ValueError(f"relative_attention_num_buckets is {buckets!r}; transformers' MPNet uses {MPNET_BUCKETS} "
                         "buckets whatever the config says, so pyxf supports only that")
    config = _encoder_config(
        hf, "mpnet", hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"], activation=hf.get("hidden_act", "gelu"),
        eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=0,
        # MPNet numbers positions from padding_idx + 1, padding_idx fixed at 1 in MPNetEmbeddings.
        position_offset=2, classifier=_classifier(hf, "roberta"),
    )
    config.update(relative_attention_num_buckets=MPNET_BUCKETS, relative_attention_max_distance=MPNET_MAX_DISTANCE)
    return config


# ModernBERT's defaults (transformers' ModernBertConfig)
MODERNBERT_GLOBAL_THETA = 160_000.0
MODERNBERT_LOCAL_THETA = 10_000.0


def _modernbert_global_every(hf: dict, layers: int) -> int:
    """n such that layer i is global exactly when i % n == 0: from `layer_types` (transformers v5)
    when given, which must follow that pattern, else global_attn_every_n_layers."""
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("global_attn_every_n_layers", 3)
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"global_attn_every_n_layers must be a positive integer, got {every!r}")
        return every
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"layer_types must list full_attention or sliding_attention for each of the {layers} layers")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    every = full[1] if len(full) > 1 else layers
    if not full or full[0] != 0 or full != list(range(0, layers, every)):
        raise ValueError(f"layer_types {types} are not global every n-th layer from layer 0; pyxf supports only that")
    return every


def _modernbert_rope_thetas(hf: dict) -> tuple[float, float]:
    """(global, local) RoPE bases, from rope_parameters (transformers v5) or global_rope_theta /
    local_rope_theta; scaled RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    for p in (full, sliding, hf.get("rope_scaling") or {}):
        if p.get("rope_type", p.get("type", "default")) != "default":
            raise ValueError(f"RoPE scaling {p!r} is not supported for ModernBERT")
    return (float(full.get("rope_theta", hf.get("global_rope_theta", MODERNBERT_GLOBAL_THETA))),
            float(sliding.get("rope_theta", hf.get("local_rope_theta", MODERNBERT_LOCAL_THETA))))


def modernbert_config(hf: dict) -> dict:
    hidden, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the {heads} heads")
    local_attention = hf.get("local_attention", 128)
    if isinstance(local_attention, bool) or not isinstance(local_attention, int) or local_attention < 0:
        raise ValueError(f"local_attention must be a non-negative integer, got {local_attention!r}")
    global_theta, local_theta = _modernbert_rope_thetas(hf)
    classifier = _classifier(hf, "modernbert")
    if classifier is not None:
        classifier.update(pooling=hf.get("classifier_pooling", "cls"),
                          activation=activation_name(hf.get("classifier_activation", "gelu")))
    return {
        "family": "modernbert",
        "architecture": "encoder",
        "causal": False,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_dim": hidden // heads,
        "intermediate_size": hf["intermediate_size"],
        "norm": "layernorm",
        "norm_eps": float(hf.get("norm_eps", 1e-5)),
        "norm_bias": bool(hf.get("norm_bias", False)),
        "norm_position": "pre",
        "first_attn_norm": False,
        "activation": activation_name(hf.get("hidden_activation", "gelu")),
        "gated_ffn": True,
        "position": "rope",
        "rope_theta": global_theta,
        "rope_local_theta": local_theta,
        "rope_scaling": None,
        "rope_interleaved": False,
        "partial_rotary_factor": 1.0,
        # A local layer sees keys within local_attention / 2 on either side (transformers'
        # sliding_window = local_attention // 2, inclusive); every n-th layer from layer 0 is global.
        "sliding_window": local_attention // 2 + 1,
        "sliding_window_pattern": _modernbert_global_every(hf, layers),
        "global_layer_phase": 0,
        "max_position_embeddings": hf.get("max_position_embeddings", 8192),
        "position_offset": 0,
        "type_vocab_size": 0,
        "tie_word_embeddings": False,
        "pooler": False,
        "classifier": classifier,
        "pooling": None,  # sentence-transformers pooling, filled by the HF reader
        **common_config(hf),
    }


def _modernbert_finalize(config: dict, source_names: set) -> dict:
    """transformers' ModernBERT has no attention norm in layer 0 (an Identity): a checkpoint with
    one would be run differently, and every other layer must have one."""
    if "layers.0.attn_norm.weight" in source_names:
        raise ValueError("layers.0.attn_norm.weight is present, but ModernBERT's layer 0 has no attention norm")
    missing = [f"layers.{i}.attn_norm.weight" for i in range(1, config["num_layers"])
               if f"layers.{i}.attn_norm.weight" not in source_names]
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(missing[:3])}")
    return _encoder_finalize(config, source_names)


_HEAD_SOURCES = {  # classifier kind -> source tensors its head needs
    "bert": ("pooler.dense.weight", "classifier.weight"),
    "roberta": ("classifier.dense.weight", "classifier.out_proj.weight"),
    "distilbert": ("pre_classifier.weight", "classifier.weight"),
    "modernbert": ("head.dense.weight", "head.norm.weight", "classifier.weight"),
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



def _read_files(files_dir, config: dict) -> dict:
    return sentence_transformers_fields(files_dir, config)


def _family(name, architectures, model_types, table, config, finalize=_encoder_finalize, **hooks) -> Family:
    """An encoder family: HF checkpoints, sentence-transformers' settings read beside them."""
    return Family(name=name, hf_architectures=architectures, hf_model_types=model_types, hf=table, hf_config=config,
                  finalize=finalize, write_tokenizer=write_encoder_tokenizer, read_files=_read_files, **hooks)


BERT = _family("bert", ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"), ("bert",), _BERT_HF,
               bert_config)
ROBERTA = _family(
    "roberta",
    ("RobertaModel", "RobertaForSequenceClassification", "XLMRobertaModel", "XLMRobertaForSequenceClassification"),
    ("roberta", "xlm-roberta"), _ROBERTA_HF, roberta_config,
)
DISTILBERT = _family("distilbert", ("DistilBertModel", "DistilBertForSequenceClassification"), ("distilbert",),
                     _DISTILBERT_HF, distilbert_config)
MPNET = _family("mpnet", ("MPNetModel", "MPNetForMaskedLM", "MPNetForSequenceClassification"), ("mpnet",),
                _MPNET_HF, mpnet_config)
MODERNBERT = _family(
    "modernbert", ("ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification"),
    ("modernbert",), _MODERNBERT_HF, modernbert_config, finalize=_modernbert_finalize, hf_tables=_modernbert_tables,
)
