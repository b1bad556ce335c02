"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, Conv1D weights stored [in, out]."""

from __future__ import annotations

from ..schema import Family, Rule, TensorTable, activation, common_config, rule
from ..tokenizer_files import write_decoder_tokenizer

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
        "activation": activation(hf.get("activation_function", "gelu_new")),
        "gated_ffn": False,
        "position": "learned",
        "rope_theta": None,  # no RoPE: learned positions
        "rope_scaling": None,
        "rope_interleaved": False,
        "partial_rotary_factor": 1.0,
        "max_position_embeddings": hf.get("n_positions", 1024),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        **common_config(hf),
    }



FAMILY = Family(
    name="gpt2",
    hf_architectures=("GPT2LMHeadModel",),
    hf_model_types=("gpt2",),
    hf=_GPT2_HF,
    hf_config=gpt2_config,
    write_tokenizer=write_decoder_tokenizer,
)
