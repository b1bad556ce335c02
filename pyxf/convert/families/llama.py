"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3 (HF checkpoints), and llama.cpp's llama / qwen2 / qwen3 GGUF files."""

from __future__ import annotations

from dataclasses import replace


from ..schema import Family, TensorTable, activation, common_config, rope_fields, rule, sliding_window_layers
from ..tokenizer_files import write_decoder_tokenizer

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


def _hf_tables(config: dict) -> TensorTable:
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



def _sliding_window(hf: dict) -> tuple[int | None, int | None]:
    """(sliding_window, sliding_window_pattern): from HF's layer_types when the config lists them,
    else as the config classes derive them: Mistral windows every layer, Qwen2 / Qwen3 (with
    use_sliding_window) the layers from max_window_layers on. Never a list as long as the claimed
    layer count (a config may claim 2**31 layers; the converter refuses it later)."""
    window = hf.get("sliding_window")
    if window and window >= hf.get("max_position_embeddings", 0):
        window = None  # as long as the context: full attention
    if hf.get("layer_types") is not None:
        return sliding_window_layers(window, hf["layer_types"], hf["num_hidden_layers"])
    if not window or hf.get("model_type") not in ("qwen2", "qwen3"):
        return window or None, None
    first = hf.get("max_window_layers", 28) if hf.get("use_sliding_window", False) else hf["num_hidden_layers"]
    if first >= hf["num_hidden_layers"]:
        return None, None
    if first > 0:
        raise ValueError(f"only the layers from max_window_layers ({first}) on use the sliding window; pyxf "
                         "supports windows on every layer or on a repeating pattern of layers")
    return window, None


def llama_config(hf: dict) -> dict:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling, partial = rope_fields(hf)
    window, pattern = _sliding_window(hf)
    return {
        "sliding_window": window,
        "sliding_window_pattern": pattern,
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



FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    hf_model_types=("llama", "mistral", "qwen2", "qwen3"),
    hf=_LLAMA_HF,
    hf_tables=_hf_tables,
    hf_config=llama_config,
    gguf={
        "llama": _llama_gguf("unpermute_q", "unpermute_k"),
        "qwen2": _llama_gguf(None, None),
        "qwen3": _with_qk_norm(_llama_gguf(None, None)),
    },
    write_tokenizer=write_decoder_tokenizer,
)
