"""Encoder-decoder families: the original Transformer (pyxf.torch_models.TransformerSeq2Seq, a
torch.nn.Transformer with embeddings, sinusoidal positions and an output projection), Marian
(MarianMTModel), T5 (T5ForConditionalGeneration), and the fairseq-born BART
(BartForConditionalGeneration), mBART (MBartForConditionalGeneration) and M2M100
(M2M100ForConditionalGeneration, also NLLB's checkpoints). Same declarative tables as families.py; the
encoder's per-layer rules are `encoder_layer_rules`, expanded over `num_encoder_layers`.

pyxf names (docs/DESIGN.md): the decoder keeps the decoder-only names (`embed.weight`,
`layers.{i}.attn.*`, `layers.{i}.ffn*`, `final_norm`, `lm_head`) and adds per layer `cross_norm`,
`cross_attn.q`, `cross_attn.kv` (k rows, then v rows) and `cross_attn.out`; the encoder's tensors are
the same names under `encoder.`. `encoder.embed.weight` is absent when the embeddings are shared.
"""

from __future__ import annotations

import math

from ..schema import Family, TensorTable, activation, rule
from ..tokenizer_files import eos_list, write_seq2seq_tokenizer

# ---------------------------------------------------------------------------------------------
# shared pieces


def _linear(target: str, source: str, bias: bool = True) -> tuple:
    rules = [rule(f"{target}.weight", f"{source}.weight")]
    if bias:
        rules.append(rule(f"{target}.bias", f"{source}.bias", optional=True))
    return tuple(rules)


def _norm(target: str, source: str, bias: bool = True) -> tuple:
    return _linear(target, source, bias)


def _seq2seq_config(**fields) -> dict:
    """The encoder-decoder config.json fields, with the decoder-only keys that do not apply."""
    base = {
        "architecture": "encoder-decoder",
        "rope_theta": None,
        "rope_scaling": None,
        "rope_interleaved": False,
        "partial_rotary_factor": 1.0,
        "chat_template": None,
        "tokenizer": None,
        "add_bos_token": False,
        "attention_scale": None,
        "head_scale": 1.0,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "suppress_token_ids": [],
        "renormalize_logits": False,
        "languages": None,
    }
    base.update(fields)
    return base



# ---------------------------------------------------------------------------------------------
# the original Transformer: pyxf.torch_models.TransformerSeq2Seq (torch.nn.Transformer inside)


def transformer_config(hf: dict) -> dict:
    d, heads = int(hf["d_model"]), int(hf["nhead"])
    if d % heads:
        raise ValueError(f"d_model {d} is not a multiple of nhead {heads}")
    if hf.get("share_embeddings") and hf["src_vocab_size"] != hf["tgt_vocab_size"]:
        raise ValueError("share_embeddings needs src_vocab_size == tgt_vocab_size")
    return _seq2seq_config(
        family="transformer",
        vocab_size=int(hf["tgt_vocab_size"]),
        source_vocab_size=int(hf["src_vocab_size"]),
        shared_embeddings=bool(hf.get("share_embeddings", False)),
        hidden_size=d,
        num_layers=int(hf["num_decoder_layers"]),
        num_encoder_layers=int(hf["num_encoder_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        intermediate_size=int(hf["dim_feedforward"]),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        norm_position="pre" if hf.get("norm_first") else "post",
        activation=activation(hf.get("activation", "relu")),
        gated_ffn=False,
        position="sinusoidal",
        sinusoidal_layout="interleaved",
        max_position_embeddings=int(hf.get("max_len", 512)),
        embed_scale=math.sqrt(d),
        tie_word_embeddings=bool(hf.get("tie_output", False)),
        bos_token_id=hf.get("bos_id"),
        eos_token_id=eos_list(hf.get("eos_id")),
        pad_token_id=hf.get("pad_id"),
        decoder_start_token_id=hf.get("bos_id"),
    )


def _transformer_layer(base: str, target: str, cross: bool) -> tuple:
    # nn.MultiheadAttention names its fused q, k, v projection in_proj_weight / in_proj_bias.
    rules = [
        rule(f"{target}.attn.qkv.weight", f"{base}.self_attn.in_proj_weight"),
        rule(f"{target}.attn.qkv.bias", f"{base}.self_attn.in_proj_bias", optional=True),
        *_linear(f"{target}.attn.out", f"{base}.self_attn.out_proj"),
        *_norm(f"{target}.attn_norm", f"{base}.norm1"),
        *_linear(f"{target}.ffn.up", f"{base}.linear1"),
        *_linear(f"{target}.ffn.down", f"{base}.linear2"),
    ]
    if cross:
        rules += [
            rule(f"{target}.cross_attn.q.weight", (f"{base}.multihead_attn.in_proj_weight", "rows_q")),
            rule(f"{target}.cross_attn.q.bias", (f"{base}.multihead_attn.in_proj_bias", "rows_q"), optional=True),
            rule(f"{target}.cross_attn.kv.weight", (f"{base}.multihead_attn.in_proj_weight", "rows_kv")),
            rule(f"{target}.cross_attn.kv.bias", (f"{base}.multihead_attn.in_proj_bias", "rows_kv"), optional=True),
            *_linear(f"{target}.cross_attn.out", f"{base}.multihead_attn.out_proj"),
            *_norm(f"{target}.cross_norm", f"{base}.norm2"),
            *_norm(f"{target}.ffn_norm", f"{base}.norm3"),
        ]
    else:
        rules += list(_norm(f"{target}.ffn_norm", f"{base}.norm2"))
    return tuple(rules)


def _transformer_table(config: dict, names=()) -> TensorTable:
    shared = config.get("shared_embeddings", False)
    global_rules = [
        rule("embed.weight", "tgt_embed.weight"),
        *_norm("encoder.final_norm", "transformer.encoder.norm"),
        *_norm("final_norm", "transformer.decoder.norm"),
        rule("lm_head.bias", "generator.bias", optional=True),
    ]
    if not shared:
        global_rules.insert(1, rule("encoder.embed.weight", "src_embed.weight"))
    return TensorTable(
        global_rules=tuple(global_rules),
        layer_rules=_transformer_layer("transformer.decoder.layers.{i}", "layers.{i}", cross=True),
        encoder_layer_rules=_transformer_layer("transformer.encoder.layers.{i}", "encoder.layers.{i}", cross=False),
        lm_head=rule("lm_head.weight", "generator.weight"),
        ignore_suffixes=("src_embed.weight",) if shared else (),
    )


# ---------------------------------------------------------------------------------------------
# Marian (MarianMTModel)


def marian_config(hf: dict) -> dict:
    d = int(hf["d_model"])
    heads, dec_heads = int(hf["encoder_attention_heads"]), int(hf["decoder_attention_heads"])
    ffn, dec_ffn = int(hf["encoder_ffn_dim"]), int(hf["decoder_ffn_dim"])
    if heads != dec_heads or ffn != dec_ffn:
        raise ValueError("Marian models with different encoder/decoder head counts or FFN sizes are not supported")
    if d % heads:
        raise ValueError(f"d_model {d} is not a multiple of {heads} heads")
    if hf.get("normalize_before") or hf.get("normalize_embedding") or hf.get("add_final_layer_norm"):
        raise ValueError("Marian variants with pre-norm / embedding norms are not supported")
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    vocab = int(hf["vocab_size"])
    target_vocab = vocab if shared else int(hf.get("decoder_vocab_size") or vocab)
    pad = hf.get("pad_token_id")
    return _seq2seq_config(
        family="marian",
        vocab_size=target_vocab,
        source_vocab_size=vocab,
        shared_embeddings=shared,
        hidden_size=d,
        num_layers=int(hf["decoder_layers"]),
        num_encoder_layers=int(hf["encoder_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        intermediate_size=ffn,
        norm="layernorm",
        norm_eps=1e-5,  # nn.LayerNorm's default, which Marian uses
        norm_position="post",
        activation=activation(hf.get("activation_function", "swish")),
        gated_ffn=False,
        position="sinusoidal",
        sinusoidal_layout="concat",  # Marian: sin in the first half of the vector, cos in the second
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        embed_scale=math.sqrt(d) if hf.get("scale_embedding") else 1.0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_list(hf.get("eos_token_id")),
        pad_token_id=pad,
        decoder_start_token_id=hf.get("decoder_start_token_id", pad),
        forced_eos_token_id=hf.get("forced_eos_token_id"),
    )


def _bart_layer(base: str, target: str, cross: bool) -> tuple:
    rules = []
    for part in ("weight", "bias"):
        rules.append(rule(f"{target}.attn.qkv.{part}", *(f"{base}.self_attn.{n}_proj.{part}" for n in "qkv")))
    rules += [
        *_linear(f"{target}.attn.out", f"{base}.self_attn.out_proj"),
        *_norm(f"{target}.attn_norm", f"{base}.self_attn_layer_norm"),
        *_linear(f"{target}.ffn.up", f"{base}.fc1"),
        *_linear(f"{target}.ffn.down", f"{base}.fc2"),
        *_norm(f"{target}.ffn_norm", f"{base}.final_layer_norm"),
    ]
    if cross:
        for part in ("weight", "bias"):
            rules.append(rule(f"{target}.cross_attn.q.{part}", f"{base}.encoder_attn.q_proj.{part}"))
            rules.append(rule(f"{target}.cross_attn.kv.{part}", *(f"{base}.encoder_attn.{n}_proj.{part}" for n in "kv")))
        rules += [
            *_linear(f"{target}.cross_attn.out", f"{base}.encoder_attn.out_proj"),
            *_norm(f"{target}.cross_norm", f"{base}.encoder_attn_layer_norm"),
        ]
    return tuple(rules)


def _marian_table(config: dict, names=()) -> TensorTable:
    shared = config.get("shared_embeddings", True)
    embeddings = (
        (rule("embed.weight", "shared.weight"),)
        if shared
        else (rule("embed.weight", "decoder.embed_tokens.weight"), rule("encoder.embed.weight", "encoder.embed_tokens.weight"))
    )
    return TensorTable(
        global_rules=(*embeddings, rule("lm_head.bias", ("final_logits_bias", "flatten"), optional=True)),
        layer_rules=_bart_layer("decoder.layers.{i}", "layers.{i}", cross=True),
        encoder_layer_rules=_bart_layer("encoder.layers.{i}", "encoder.layers.{i}", cross=False),
        lm_head=rule("lm_head.weight", "lm_head.weight"),
        strip_prefixes=("model.",),
        # fixed sinusoids (pyxf computes them), and copies of the shared embeddings
        ignore_suffixes=("embed_positions.weight",)
        + (("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") if shared else ()),
    )


# ---------------------------------------------------------------------------------------------
# BART, mBART, M2M100 / NLLB: Marian's layer names, each with its own embeddings and norms
#
#                 positions (offset 2)          embedding norm   blocks     final norms  FFN
#   BART          learned                       yes              post-norm  no           gelu
#   mBART         learned                       yes              pre-norm   yes          gelu
#   M2M100, NLLB  sinusoidal (fairseq layout)   no               pre-norm   yes          relu
#
# transformers builds these from the model class alone: the flags of fairseq-era configs
# (normalize_before, add_final_layer_norm, normalize_embedding) are ignored there, and here.

FAIRSEQ_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's offset; M2M100's: pad_token_id + 1


def _fairseq_config(hf: dict, family: str, *, pre_norm: bool, learned: bool, scale_default: bool) -> dict:
    d = int(hf["d_model"])
    heads, dec_heads = int(hf["encoder_attention_heads"]), int(hf["decoder_attention_heads"])
    ffn, dec_ffn = int(hf["encoder_ffn_dim"]), int(hf["decoder_ffn_dim"])
    if heads != dec_heads or ffn != dec_ffn:
        raise ValueError(f"{family} models with different encoder/decoder head counts or FFN sizes are not supported")
    if d % heads:
        raise ValueError(f"d_model {d} is not a multiple of {heads} heads")
    pad, bos = hf.get("pad_token_id"), hf.get("bos_token_id")
    start = hf.get("decoder_start_token_id")
    # transformers' generate starts the decoder with bos when the config names no start token.
    start = bos if start is None else start
    if not learned and pad is None:
        raise ValueError(f"{family} positions count from pad_token_id + 1: the config needs a pad_token_id")
    # M2M100 counts positions from pad_token_id + 1 (create_position_ids_from_input_ids).
    offset = FAIRSEQ_POSITION_OFFSET if learned else int(pad) + 1
    return _seq2seq_config(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        source_vocab_size=int(hf["vocab_size"]),
        shared_embeddings=True,
        hidden_size=d,
        num_layers=int(hf["decoder_layers"]),
        num_encoder_layers=int(hf["encoder_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        intermediate_size=ffn,
        norm="layernorm",
        norm_eps=1e-5,  # nn.LayerNorm's default, which these models use
        norm_position="pre" if pre_norm else "post",
        activation=activation(hf.get("activation_function", "gelu")),
        gated_ffn=False,
        position="learned" if learned else "sinusoidal",
        sinusoidal_layout="fairseq",
        position_offset=offset,
        # The position table's rows: max_position_embeddings positions after the offset.
        max_position_embeddings=int(hf.get("max_position_embeddings", 1024)) + FAIRSEQ_POSITION_OFFSET,
        embed_norm=learned,  # BART's and mBART's layernorm_embedding
        embed_scale=math.sqrt(d) if hf.get("scale_embedding", scale_default) else 1.0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=bos,
        eos_token_id=eos_list(hf.get("eos_token_id")),
        pad_token_id=pad,
        decoder_start_token_id=start,
        forced_bos_token_id=hf.get("forced_bos_token_id"),
        forced_eos_token_id=hf.get("forced_eos_token_id"),
    )


def bart_config(hf: dict) -> dict:
    return _fairseq_config(hf, "bart", pre_norm=False, learned=True, scale_default=False)


def mbart_config(hf: dict) -> dict:
    return _fairseq_config(hf, "mbart", pre_norm=True, learned=True, scale_default=False)


def m2m100_config(hf: dict) -> dict:
    return _fairseq_config(hf, "m2m100", pre_norm=True, learned=False, scale_default=True)


def _fairseq_table(config: dict, names=()) -> TensorTable:
    rules = [rule("embed.weight", "shared.weight"),
             rule("lm_head.bias", ("final_logits_bias", "flatten"), optional=True)]
    for source, target in (("encoder.", "encoder."), ("decoder.", "")):
        if config.get("position") == "learned":
            rules.append(rule(f"{target}pos_embed.weight", f"{source}embed_positions.weight"))
        if config.get("embed_norm"):
            rules += _norm(f"{target}embed_norm", f"{source}layernorm_embedding")
        if config.get("norm_position") == "pre":
            rules += _norm(f"{target}final_norm", f"{source}layer_norm")
    return TensorTable(
        global_rules=tuple(rules),
        layer_rules=_bart_layer("decoder.layers.{i}", "layers.{i}", cross=True),
        encoder_layer_rules=_bart_layer("encoder.layers.{i}", "encoder.layers.{i}", cross=False),
        lm_head=rule("lm_head.weight", "lm_head.weight"),
        strip_prefixes=("model.",),
        # copies of the shared embeddings; M2M100's sinusoids (made at load) if a checkpoint has them
        ignore_suffixes=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embed_positions.weights",
                         "embed_positions._float_tensor"),
    )


# ---------------------------------------------------------------------------------------------
# T5 (T5ForConditionalGeneration)


def t5_config(hf: dict) -> dict:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    d = int(hf["d_model"])
    scale_outputs = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    return _seq2seq_config(
        family="t5",
        vocab_size=int(hf["vocab_size"]),
        source_vocab_size=int(hf["vocab_size"]),
        shared_embeddings=True,
        hidden_size=d,
        num_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        num_encoder_layers=int(hf["num_layers"]),
        num_heads=int(hf["num_heads"]),
        num_kv_heads=int(hf["num_heads"]),
        head_dim=int(hf["d_kv"]),
        intermediate_size=int(hf["d_ff"]),
        norm="rmsnorm",  # T5LayerNorm: no mean subtraction, no bias
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        norm_position="pre",
        activation=activation(act),
        gated_ffn=gated,
        position="relative",
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        max_position_embeddings=int(hf.get("n_positions", 512)),
        embed_scale=1.0,
        attention_scale=1.0,  # T5 does not scale q.k
        head_scale=d**-0.5 if scale_outputs else 1.0,
        tie_word_embeddings=True,  # settled by _t5_finalize from the tensors present
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_list(hf.get("eos_token_id", 1)),
        pad_token_id=pad,
        decoder_start_token_id=pad if start is None else start,
    )


def _t5_layer(base: str, target: str, cross: bool, gated: bool) -> tuple:
    attn = f"{base}.layer.0.SelfAttention"
    ffn_layer = 2 if cross else 1
    ff = f"{base}.layer.{ffn_layer}.DenseReluDense"
    rules = [
        rule(f"{target}.attn.qkv.weight", *(f"{attn}.{n}.weight" for n in "qkv")),
        rule(f"{target}.attn.out.weight", f"{attn}.o.weight"),
        rule(f"{target}.attn_norm.weight", f"{base}.layer.0.layer_norm.weight"),
        rule(f"{target}.ffn_norm.weight", f"{base}.layer.{ffn_layer}.layer_norm.weight"),
        rule(f"{target}.ffn.down.weight", f"{ff}.wo.weight"),
        rule(f"{target}.ffn.gate_up.weight", f"{ff}.wi_0.weight", f"{ff}.wi_1.weight")
        if gated
        else rule(f"{target}.ffn.up.weight", f"{ff}.wi.weight"),
    ]
    if cross:
        x = f"{base}.layer.1.EncDecAttention"
        rules += [
            rule(f"{target}.cross_attn.q.weight", f"{x}.q.weight"),
            rule(f"{target}.cross_attn.kv.weight", f"{x}.k.weight", f"{x}.v.weight"),
            rule(f"{target}.cross_attn.out.weight", f"{x}.o.weight"),
            rule(f"{target}.cross_norm.weight", f"{base}.layer.1.layer_norm.weight"),
        ]
    return tuple(rules)


def _t5_table(config: dict, names=()) -> TensorTable:
    gated = config.get("gated_ffn", False)
    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    return TensorTable(
        global_rules=(
            rule("embed.weight", "shared.weight"),
            rule("encoder.rel_bias.weight", f"encoder.block.0.{bias}"),
            rule("rel_bias.weight", f"decoder.block.0.{bias}"),
            rule("encoder.final_norm.weight", "encoder.final_layer_norm.weight"),
            rule("final_norm.weight", "decoder.final_layer_norm.weight"),
        ),
        layer_rules=_t5_layer("decoder.block.{i}", "layers.{i}", cross=True, gated=gated),
        encoder_layer_rules=_t5_layer("encoder.block.{i}", "encoder.layers.{i}", cross=False, gated=gated),
        lm_head=rule("lm_head.weight", "lm_head.weight"),
        ignore_suffixes=(
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "EncDecAttention.relative_attention_bias.weight",
        ),
    )


def _t5_finalize(config: dict, source_names: set) -> dict:
    """An untied head when the checkpoint has its own lm_head (T5 v1.1, flan-t5)."""
    return dict(config, tie_word_embeddings="lm_head.weight" not in source_names)



def _family(name, architecture, model_type, config, tables, **hooks) -> Family:
    """An encoder-decoder family: HF checkpoints of one class, tables by config, seq2seq tokenizers."""
    return Family(name=name, hf_architectures=(architecture,), hf_model_types=(model_type,), hf=tables({}),
                  hf_config=config, hf_tables=tables, write_tokenizer=write_seq2seq_tokenizer, **hooks)


TRANSFORMER = _family("transformer", "TransformerSeq2Seq", "pyxf-transformer", transformer_config, _transformer_table)
MARIAN = _family("marian", "MarianMTModel", "marian", marian_config, _marian_table)
T5 = _family("t5", "T5ForConditionalGeneration", "t5", t5_config, _t5_table, finalize=_t5_finalize)
BART = _family("bart", "BartForConditionalGeneration", "bart", bart_config, _fairseq_table)
MBART = _family("mbart", "MBartForConditionalGeneration", "mbart", mbart_config, _fairseq_table)
M2M100 = _family("m2m100", "M2M100ForConditionalGeneration", "m2m_100", m2m100_config, _fairseq_table)
