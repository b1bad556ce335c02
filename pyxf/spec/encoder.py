"""Encoders: BERT, RoBERTa (also XLM-R), DistilBERT, MPNet and ModernBERT, and decoders used as encoders
(Qwen3-Embedding: family llama, causal attention, RoPE, last-token pooling). Complete sequences, the
last hidden state out; pooling and classifier heads run in numpy (pyxf/encoding.py), so the head
tensors are read by Python, not the core.

Positions are learned (BERT's family), learned plus a bias by relative position shared by all
layers (MPNet), or RoPE (ModernBERT, whose local layers see a window of keys and may rotate by a
RoPE base of their own)."""

from .blocks import (LOCAL_FIELDS, RELATIVE_FIELDS, STACK_FIELDS, block, check_local, check_relative, pre_norm,
                     relative_bias, relative_dims, stack_dims, token_embedding)
from .schema import PYTHON, Architecture, Field, Stack, Tensor, linear, norm

CLASSIFIER_KINDS = ("bert", "roberta", "distilbert", "modernbert")
# ModernBERT's head: the pooled state (first token or mean) -> dense -> activation -> norm -> classifier.
CLASSIFIER_POOLINGS = ("cls", "mean")
CLASSIFIER_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
SCORE_ACTIVATIONS = ("sigmoid", "identity", "tanh")  # a cross-encoder's, for rank() (pyxf.encoding)
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
POSITIONS = ("learned", "rope")

FIELDS = STACK_FIELDS + (
    Field("causal", "bool", default=False, doc="each token sees those before it only (decoders as encoders)"),
    Field("qk_norm", "bool", default=False, doc="RMSNorm over each head of q and of k before RoPE (Qwen3)"),
    Field("position_offset", "count", default=0, doc="learned positions start here (RoBERTa: 2)"),
    Field("type_vocab_size", "count", default=0, doc="token type rows; 0: none"),
    Field("max_length", "size", default=None, doc="default tokenization length"),
    Field("pooler", "bool", default=False, doc="BERT's tanh pooler is present"),
    Field("pooling", "object", default=None,
          doc=f"{{mode: {' | '.join(POOLING_MODES)}, normalize, include_prompt (default true)}}"),
    Field("prompts", "object", default=None, doc="sentence-transformers' prompts: {name: text put before a text}"),
    Field("default_prompt_name", "text", default=None, doc="the prompt used when none is asked for"),
    Field("classifier", "object", default=None,
          doc="{kind, num_labels, id2label, problem_type, score_activation; modernbert: pooling, activation}"),
    *RELATIVE_FIELDS,  # MPNet's bias by relative position (bidirectional buckets)
    Field("norm_bias", "bool", default=True, doc="LayerNorms have a bias (ModernBERT: false)"),
    Field("first_attn_norm", "bool", default=True, doc="false: layer 0 has no attention norm (pre-norm only)"),
    *LOCAL_FIELDS,  # ModernBERT's local layers
)


def encoder_dims(config):
    head = config.get("classifier") or {}
    return {**stack_dims(config), **relative_dims(config), "T": config.get("type_vocab_size", 0),
            "L": head.get("num_labels", 0)}


def _head_kind(config):
    return (config.get("classifier") or {}).get("kind")


def _types(config):
    return config.get("type_vocab_size", 0) > 0


def _learned(config):
    return config["position"] == "learned"


def _relative(config):
    return config.get("relative_attention_num_buckets") is not None


def _check(config, fail):
    position = config["position"]
    if position not in POSITIONS:
        fail(f"encoders need learned or rope positions, got {position!r}")
    if position == "learned" and config.get("position_offset", 0) >= config["max_position_embeddings"]:
        fail("position_offset must be below max_position_embeddings")
    if _relative(config) or config.get("relative_attention_max_distance") is not None:
        check_relative(config, fail)
    if config.get("first_attn_norm") is False and config["norm_position"] != "pre":
        fail("'first_attn_norm' false needs norm_position pre")
    check_local(config, fail)
    pooling = config.get("pooling")
    if pooling is not None:
        if not isinstance(pooling, dict) or pooling.get("mode") not in POOLING_MODES:
            fail(f"'pooling' must be null or hold a mode ({', '.join(POOLING_MODES)}) and normalize, got {pooling!r}")
        for flag in ("normalize", "include_prompt"):
            if not isinstance(pooling.get(flag, False), bool):
                fail(f"'pooling.{flag}' must be true or false, got {pooling.get(flag)!r}")
    _check_prompts(config, fail)
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
        if head.get("pooling", "cls") not in CLASSIFIER_POOLINGS:
            fail(f"'classifier.pooling' must be one of {', '.join(CLASSIFIER_POOLINGS)}, got {head.get('pooling')!r}")
        if head.get("activation", "gelu") not in CLASSIFIER_ACTIVATIONS:
            fail(f"'classifier.activation' must be one of {', '.join(CLASSIFIER_ACTIVATIONS)}, "
                 f"got {head.get('activation')!r}")
        if head.get("score_activation", "sigmoid") not in SCORE_ACTIVATIONS:
            fail(f"'classifier.score_activation' must be one of {', '.join(SCORE_ACTIVATIONS)}, "
                 f"got {head.get('score_activation')!r}")


def _check_prompts(config, fail):
    prompts = config.get("prompts") or {}
    if not all(isinstance(name, str) and isinstance(text, str) for name, text in prompts.items()):
        fail(f"'prompts' must map prompt names to texts, got {str(prompts)[:80]}")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        fail(f"'default_prompt_name' {default!r} is not one of the prompts ({', '.join(prompts) or 'none'})")


ENCODER = Architecture(
    "encoder",
    families=("bert", "roberta", "distilbert", "mpnet", "modernbert", "llama"),
    fields=FIELDS,
    dims=encoder_dims,
    tensors=(
        token_embedding(),
        Tensor("pos_embed.weight", ("P", "H"), when=_learned, lookup=True),
        *relative_bias("", _relative),
        Tensor("token_type_embed.weight", ("T", "H"), when=_types, lookup=True),
        *norm("embed_norm", required=False),
        *norm("final_norm", when=pre_norm),
        # Heads, applied in numpy to the first token's last hidden state.
        *linear("pooler.dense", "H", "H", quantizable=False, reader=PYTHON,
                required=lambda c: bool(c.get("pooler")) or _head_kind(c) == "bert"),
        *linear("classifier.dense", "H", "H", quantizable=False, reader=PYTHON,
                required=lambda c: _head_kind(c) in ("roberta", "distilbert", "modernbert")),
        Tensor("classifier.norm.weight", ("H",), reader=PYTHON, when=lambda c: _head_kind(c) == "modernbert"),
        Tensor("classifier.norm.bias", ("H",), reader=PYTHON,
               when=lambda c: _head_kind(c) == "modernbert" and c.get("norm_bias", True) is not False),
        *linear("classifier", "L", "H", quantizable=False, reader=PYTHON, when=lambda c: bool(c.get("classifier"))),
    ),
    stacks=(Stack("layers.", "num_layers", block()),),
    check=_check,
    doc="self-attention over complete sequences (non-causal, or causal for decoders used as encoders); "
        "ends at the last hidden state",
)
