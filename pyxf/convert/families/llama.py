"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3 (HF checkpoints), and llama.cpp's llama / qwen2 / qwen3 GGUF
files; a Qwen3 checkpoint saved as a sentence-transformers model (Qwen3-Embedding) becomes a causal encoder."""

from __future__ import annotations

from dataclasses import replace


from ..schema import Family, TensorTable, activation, common_config, rope_fields, rule, sliding_window
from ..tokenizer_files import (
    is_sentence_transformers_model, sentence_transformers_fields, write_decoder_tokenizer, write_encoder_tokenizer,
)

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


# Qwen3's per-head q/k norms, beside the Llama tables' rules.
_QK_NORM_HF = (
    rule("layers.{i}.attn.q_norm.weight", "layers.{i}.self_attn.q_norm.weight"),
    rule("layers.{i}.attn.k_norm.weight", "layers.{i}.self_attn.k_norm.weight"),
)
_QK_NORM_GGUF = (
    rule("layers.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    rule("layers.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
)
_QWEN3_HF = replace(_LLAMA_HF, layer_rules=_LLAMA_HF.layer_rules + _QK_NORM_HF)


# An embedding model ends at the last hidden state: a head saved beside it is not part of it.
_QWEN3_EMBEDDING_HF = replace(_QWEN3_HF, lm_head=None, ignore_suffixes=_QWEN3_HF.ignore_suffixes + ("lm_head.weight",))


def _hf_tables(config: dict) -> TensorTable:
    if config["architecture"] == "encoder":
        return _QWEN3_EMBEDDING_HF
    return _QWEN3_HF if config.get("qk_norm") else _LLAMA_HF


def _with_qk_norm(table: TensorTable) -> TensorTable:
    return replace(table, layer_rules=table.layer_rules + _QK_NORM_GGUF)


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



def llama_config(hf: dict) -> dict:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling, partial = rope_fields(hf)
    return {
        "sliding_window": sliding_window(hf),
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
        "activation": activation(hf.get("hidden_act", "silu")),
        "gated_ffn": True,
        "qk_norm": hf.get("model_type") == "qwen3",
        "position": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_interleaved": False,
        "partial_rotary_factor": partial,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **common_config(hf),
    }


def _embedding_model(files_dir, config: dict) -> dict:
    """A Qwen3 checkpoint saved as a sentence-transformers model (modules.json: Transformer, Pooling,
    Normalize; Qwen3-Embedding) is an embedding model: an encoder that keeps the decoder's causal
    attention and RoPE, with sentence-transformers' pooling (last token), normalization and prompts."""
    if not is_sentence_transformers_model(files_dir):
        return {}
    if not config["qk_norm"]:
        raise ValueError("sentence-transformers models of this family are supported for Qwen3 (Qwen3-Embedding) only")
    if config["sliding_window"]:
        raise ValueError(f"an embedding model with a sliding attention window ({config['sliding_window']}) is not "
                         "supported: encoders run whole sequences with full attention")
    # No LM head: the stack ends at the (final-normed) last hidden state.
    return {"architecture": "encoder", "causal": True, "tie_word_embeddings": False,
            **sentence_transformers_fields(files_dir, config)}


def _write_tokenizer(files_dir, out_dir, hf_config: dict, config: dict) -> dict:
    """An embedding model tokenizes as sentence-transformers does: with the tokenizer's post-processor."""
    writer = write_encoder_tokenizer if config["architecture"] == "encoder" else write_decoder_tokenizer
    return writer(files_dir, out_dir, hf_config, config)


FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3Model"),
    hf_model_types=("llama", "mistral", "qwen2", "qwen3"),
    hf=_LLAMA_HF,
    hf_tables=_hf_tables,
    hf_config=llama_config,
    gguf={
        "llama": _llama_gguf("unpermute_q", "unpermute_k"),
        "qwen2": _llama_gguf(None, None),
        "qwen3": _with_qk_norm(_llama_gguf(None, None)),
    },
    read_files=_embedding_model,
    write_tokenizer=_write_tokenizer,
)
