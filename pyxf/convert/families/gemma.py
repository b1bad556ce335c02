"""Gemma 2 and Gemma 3 text decoders: HF Gemma2ForCausalLM / Gemma3ForCausalLM (gemma3_text), and
llama.cpp's gemma2 / gemma3 GGUF files.

What sets them apart from Llama (docs/DESIGN.md, config.json): RMSNorm by (1 + w), folded into the
stored weights here (llama.cpp's files store the folded weights already); a norm after attention
and after the FFN as well as before (norm_position "sandwich"); GeGLU; embeddings scaled by
sqrt(hidden_size); scores scaled by query_pre_attn_scalar^-0.5; local (sliding-window) layers
between global ones; Gemma 2's soft caps on scores and logits; Gemma 3's per-head q/k norms and
its local layers' own RoPE base.
"""

from __future__ import annotations

from ..schema import Family, TensorTable, activation, common_config, rope_fields, rule, sliding_window_layers
from ..tokenizer_files import write_decoder_tokenizer

GEMMA2, GEMMA3 = "gemma2", "gemma3_text"  # HF model types


def _norm(target: str, source: str, fold: bool):
    """A Gemma norm: HF stores w of (1 + w), folded here; GGUF files hold 1 + w."""
    return rule(target, (source, "plus_one") if fold else source)


def _hf_table(qk_norm: bool) -> TensorTable:
    p = "layers.{i}."
    attn, mlp = p + "self_attn.", p + "mlp."
    layer_rules = (
        _norm(p + "attn_norm.weight", p + "input_layernorm.weight", True),
        rule(p + "attn.qkv.weight", attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
        rule(p + "attn.qkv.bias", attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias", optional=True),
        rule(p + "attn.out.weight", attn + "o_proj.weight"),
        rule(p + "attn.out.bias", attn + "o_proj.bias", optional=True),
        _norm(p + "attn_post_norm.weight", p + "post_attention_layernorm.weight", True),
        _norm(p + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", True),
        rule(p + "ffn.gate_up.weight", mlp + "gate_proj.weight", mlp + "up_proj.weight"),
        rule(p + "ffn.down.weight", mlp + "down_proj.weight"),
        _norm(p + "ffn_post_norm.weight", p + "post_feedforward_layernorm.weight", True),
    )
    if qk_norm:
        layer_rules += (
            _norm(p + "attn.q_norm.weight", attn + "q_norm.weight", True),
            _norm(p + "attn.k_norm.weight", attn + "k_norm.weight", True),
        )
    return TensorTable(
        global_rules=(
            rule("embed.weight", "embed_tokens.weight"),
            _norm("final_norm.weight", "norm.weight", True),
        ),
        layer_rules=layer_rules,
        lm_head=rule("lm_head.weight", "lm_head.weight"),
        strip_prefixes=("model.",),
    )


def _gguf_table(qk_norm: bool) -> TensorTable:
    """llama.cpp's names (NEOX RoPE: Q/K rows as HF has them)."""
    b = "blk.{i}."
    layer_rules = (
        rule("layers.{i}.attn_norm.weight", b + "attn_norm.weight"),
        rule("layers.{i}.attn.qkv.weight", b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"),
        rule("layers.{i}.attn.out.weight", b + "attn_output.weight"),
        rule("layers.{i}.attn_post_norm.weight", b + "post_attention_norm.weight"),
        rule("layers.{i}.ffn_norm.weight", b + "ffn_norm.weight"),
        rule("layers.{i}.ffn.gate_up.weight", b + "ffn_gate.weight", b + "ffn_up.weight"),
        rule("layers.{i}.ffn.down.weight", b + "ffn_down.weight"),
        rule("layers.{i}.ffn_post_norm.weight", b + "post_ffw_norm.weight"),
    )
    if qk_norm:
        layer_rules += (
            rule("layers.{i}.attn.q_norm.weight", b + "attn_q_norm.weight"),
            rule("layers.{i}.attn.k_norm.weight", b + "attn_k_norm.weight"),
        )
    return TensorTable(
        global_rules=(
            rule("embed.weight", "token_embd.weight"),
            rule("final_norm.weight", "output_norm.weight"),
        ),
        layer_rules=layer_rules,
        lm_head=rule("lm_head.weight", "output.weight"),
    )


_HF, _HF_QK_NORM = _hf_table(False), _hf_table(True)


def _hf_tables(config: dict, names=()) -> TensorTable:
    return _HF_QK_NORM if config.get("qk_norm") else _HF


# ---------------------------------------------------------------------------------------------
# configs


def _sliding_window(hf: dict, default_pattern: int) -> tuple[int | None, int | None]:
    """(sliding_window, sliding_window_pattern) from HF's layer_types, or from the pattern its
    config class derives them from (every Nth layer global)."""
    window = hf.get("sliding_window", 4096)
    if hf.get("layer_types") is not None:
        return sliding_window_layers(window, hf["layer_types"], hf["num_hidden_layers"])
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or default_pattern
    if not window or pattern == 1:  # no window, or every layer global
        return None, None
    return window, pattern


def _gemma3_rope(hf: dict) -> tuple[float, dict | None, float, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor, local theta) of a Gemma 3 config: the global
    layers' RoPE (scaled, e.g. linear x8) and the local layers' base, from transformers v5's
    rope_parameters by layer type or v4's rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = {"rope_theta": 1_000_000.0, **(params.get("full_attention") or {})}
        local = {"rope_theta": 10_000.0, **(params.get("sliding_attention") or {})}
        theta, scaling, partial = rope_fields({"rope_parameters": full})
        local_theta, local_scaling, _ = rope_fields({"rope_parameters": local})
    else:
        theta, scaling, partial = rope_fields({"rope_theta": 1_000_000.0, **hf})
        local_theta, local_scaling = float(hf.get("rope_local_base_freq", 10_000.0)), None
    if local_scaling is not None:
        raise ValueError(f"RoPE scaling of the local (sliding_attention) layers is not supported: {local_scaling}")
    return theta, scaling, partial, local_theta


def gemma_config(hf: dict) -> dict:
    model_type = hf.get("model_type")
    if model_type not in (GEMMA2, GEMMA3):
        raise ValueError(f"model_type must be {GEMMA2} or {GEMMA3}, got {model_type!r}")
    gemma3 = model_type == GEMMA3
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (EmbeddingGemma) is not supported: pyxf runs Gemma as a "
                         "causal decoder")
    hidden, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    if gemma3:
        theta, scaling, partial, local_theta = _gemma3_rope(hf)
    else:
        (theta, scaling, partial), local_theta = rope_fields(hf), None
    window, pattern = _sliding_window(hf, 6 if gemma3 else 2)
    if window is None:
        local_theta = None  # every layer global
    defaults = {"attn_logit_softcapping": None, "final_logit_softcapping": None} if gemma3 else {
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}  # the config classes' defaults
    return {
        "family": "gemma",
        "architecture": "decoder",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or 256,
        "intermediate_size": hf["intermediate_size"],
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "norm_position": "sandwich",
        "activation": activation(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"),
        "gated_ffn": True,
        "qk_norm": gemma3,
        "position": "rope",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_interleaved": False,
        "partial_rotary_factor": partial,
        "rope_local_theta": local_theta,
        "sliding_window": window,
        "sliding_window_pattern": pattern,
        "embed_scale": hidden**0.5,
        "attention_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        "attention_softcap": hf.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
        "logit_softcap": hf.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
        "max_position_embeddings": hf.get("max_position_embeddings", 131072 if gemma3 else 8192),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        **common_config(hf),
    }


def _gguf_query_pre_attn_scalar(arch: str, config: dict) -> int:
    """GGUF files do not store it; llama.cpp's rule: hidden / heads for the 27B models (46 and 62
    layers), head_dim for the others."""
    big = {"gemma2": 46, "gemma3": 62}[arch] == config["num_layers"]
    return config["hidden_size"] // config["num_heads"] if big else config["head_dim"]


def gemma_gguf_config(config: dict, meta: dict) -> dict:
    """The Gemma fields of a gemma2 / gemma3 GGUF file, on the llama-like config read from it:
    llama.cpp's layer pattern (every 2nd / 6th layer global), Gemma 3's local RoPE base of 10000
    and Gemma 2's soft caps (defaults 50 and 30), as llama.cpp runs these files."""
    arch = meta["general.architecture"]
    gemma3 = arch == "gemma3"

    def number(key, default=None, integer=False):
        """A positive number (int or float) of the metadata, or the default when absent."""
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (
                integer and value != int(value)):
            raise ValueError(f"GGUF metadata {arch}.{key} must be a positive {'integer' if integer else 'number'}, "
                             f"got {str(value)[:40]}")
        return int(value) if integer else float(value)

    window = number("attention.sliding_window", integer=True)
    return {
        **config,
        "family": "gemma",
        "activation": "gelu_tanh",
        "norm_position": "sandwich",
        "qk_norm": gemma3,
        "sliding_window": window,
        "sliding_window_pattern": (6 if gemma3 else 2) if window else None,
        "rope_local_theta": 10_000.0 if gemma3 and window else None,
        "embed_scale": config["hidden_size"] ** 0.5,
        "attention_scale": float(_gguf_query_pre_attn_scalar(arch, config)) ** -0.5,
        "attention_softcap": number("attn_logit_softcapping", None if gemma3 else 50.0),
        "logit_softcap": number("final_logit_softcapping", None if gemma3 else 30.0),
    }


FAMILY = Family(
    name="gemma",
    hf_architectures=("Gemma2ForCausalLM", "Gemma3ForCausalLM"),
    hf_model_types=(GEMMA2, GEMMA3),
    hf=_HF,
    hf_tables=_hf_tables,
    hf_config=gemma_config,
    gguf={"gemma2": _gguf_table(False), "gemma3": _gguf_table(True)},
    gguf_config=gemma_gguf_config,
    write_tokenizer=write_decoder_tokenizer,
)
