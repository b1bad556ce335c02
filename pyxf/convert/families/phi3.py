"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (HF Phi3ForCausalLM) and llama.cpp's phi3 GGUF files.

The block is Llama's (RMSNorm, RoPE in rotate-half order, SwiGLU, GQA) with the projections
already fused as pyxf stores them: `qkv_proj` is q rows, then k rows, then v rows (pyxf's
`attn.qkv`), `gate_up_proj` gate rows, then up rows (`ffn.gate_up`), so every rule copies one
tensor. Phi-4-mini rotates part of each head (`partial_rotary_factor`); the long-context models
use LongRoPE (`rope_scaling` of type "longrope", formerly "su"), whose short/long factor choice
is made at load (docs/DESIGN.md, "LongRoPE").
"""

from __future__ import annotations

from ..schema import Family, TensorTable, common_config, gated_rope_decoder, rule, sliding_window
from ..tokenizer_files import write_decoder_tokenizer

_PHI3_HF = TensorTable(
    global_rules=(
        rule("embed.weight", "embed_tokens.weight"),
        rule("final_norm.weight", "norm.weight"),
    ),
    layer_rules=(
        rule("layers.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight"),
        rule("layers.{i}.attn.qkv.weight", "layers.{i}.self_attn.qkv_proj.weight"),
        rule("layers.{i}.attn.out.weight", "layers.{i}.self_attn.o_proj.weight"),
        rule("layers.{i}.ffn_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
        rule("layers.{i}.ffn.gate_up.weight", "layers.{i}.mlp.gate_up_proj.weight"),
        rule("layers.{i}.ffn.down.weight", "layers.{i}.mlp.down_proj.weight"),
    ),
    lm_head=rule("lm_head.weight", "lm_head.weight"),
    strip_prefixes=("model.",),
    ignore_suffixes=("rotary_emb.inv_freq",),
)

# llama.cpp's phi3 names: the same fused matrices (NEOX RoPE: no Q/K row permutation). The LongRoPE
# factors it stores as tensors (rope_factors_long / rope_factors_short) are read into the config's
# rope_scaling by the GGUF importer, not written as weights.
_PHI3_GGUF = TensorTable(
    global_rules=(
        rule("embed.weight", "token_embd.weight"),
        rule("final_norm.weight", "output_norm.weight"),
    ),
    layer_rules=(
        rule("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
        rule("layers.{i}.attn.qkv.weight", "blk.{i}.attn_qkv.weight"),
        rule("layers.{i}.attn.out.weight", "blk.{i}.attn_output.weight"),
        rule("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
        rule("layers.{i}.ffn.gate_up.weight", "blk.{i}.ffn_up.weight"),
        rule("layers.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight"),
    ),
    lm_head=rule("lm_head.weight", "output.weight"),
    ignore_suffixes=("rope_factors_long.weight", "rope_factors_short.weight"),
)

# Phi-3's older spellings of LongRoPE, renamed as transformers' Phi3Config renames them.
_LONGROPE_ALIASES = ("su", "yarn")


def _longrope_scaling(hf: dict, scaling: dict | None) -> dict | None:
    """rope_scaling with its type spelled "longrope" and the pretraining context it switches at:
    Phi-3 keeps `original_max_position_embeddings` beside rope_scaling (v4 configs), and
    transformers prefers that top-level value over one inside rope_parameters."""
    if scaling is None:
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    scaling.pop("type", None)
    scaling["rope_type"] = "longrope" if kind in _LONGROPE_ALIASES else kind
    if scaling["rope_type"] == "longrope" and hf.get("original_max_position_embeddings") is not None:
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return scaling


def phi3_config(hf: dict) -> dict:
    fields = gated_rope_decoder(hf, norm_eps=1e-5)
    return {
        "family": "phi3",
        **fields,
        "rope_scaling": _longrope_scaling(hf, fields["rope_scaling"]),
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "sliding_window": sliding_window(hf),
        **common_config(hf),
    }


FAMILY = Family(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_types=("phi3",),
    hf=_PHI3_HF,
    hf_config=phi3_config,
    gguf={"phi3": _PHI3_GGUF},
    write_tokenizer=write_decoder_tokenizer,
)
