"""Encoders: BERT, RoBERTa (also XLM-R), DistilBERT; sentence-transformers checkpoints of them."""

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



def _read_files(files_dir, config: dict) -> dict:
    return sentence_transformers_fields(files_dir, config)


BERT = Family(
    name="bert",
    hf_architectures=("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
    hf_model_types=("bert",),
    hf=_BERT_HF,
    hf_config=bert_config,
    finalize=_encoder_finalize,
    write_tokenizer=write_encoder_tokenizer,
    read_files=_read_files,
)

ROBERTA = Family(
    name="roberta",
    hf_architectures=(
        "RobertaModel", "RobertaForSequenceClassification", "XLMRobertaModel", "XLMRobertaForSequenceClassification",
    ),
    hf_model_types=("roberta", "xlm-roberta"),
    hf=_ROBERTA_HF,
    hf_config=roberta_config,
    finalize=_encoder_finalize,
    write_tokenizer=write_encoder_tokenizer,
    read_files=_read_files,
)

DISTILBERT = Family(
    name="distilbert",
    hf_architectures=("DistilBertModel", "DistilBertForSequenceClassification"),
    hf_model_types=("distilbert",),
    hf=_DISTILBERT_HF,
    hf_config=distilbert_config,
    finalize=_encoder_finalize,
    write_tokenizer=write_encoder_tokenizer,
    read_files=_read_files,
)
