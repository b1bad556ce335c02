"""Llama-style decoders: Llama, Mistral, Qwen2, Qwen3 and the mixtures of experts Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE (HF checkpoints), and llama.cpp's llama (also Mixtral) / qwen2 / qwen3 / qwen2moe /
qwen3moe GGUF files; a Qwen3 checkpoint saved as a sentence-transformers model (Qwen3-Embedding)
becomes a causal encoder."""

from __future__ import annotations

from dataclasses import replace


from ..schema import (
    Family, TensorTable, common_config, gated_rope_decoder, rule, sliding_window, sliding_window_layers,
)
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


# The dense FFN's rules, which a mixture of experts replaces.
_DENSE_FFN = ("layers.{i}.ffn.gate_up.weight", "layers.{i}.ffn.gate_up.bias", "layers.{i}.ffn.down.weight",
              "layers.{i}.ffn.down.bias")


def _expert_rules_hf(config: dict, names) -> tuple:
    """The experts of an HF checkpoint, one source per expert (pyxf stacks them along the rows):
    Mixtral's block_sparse_moe.experts.E.w1 / w3 / w2, or Qwen-MoE's and OLMoE's
    mlp.experts.E.gate_proj / up_proj / down_proj; or transformers v5's in-memory stacks
    mlp.experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I] (a saved state_dict); plus Qwen2-MoE's
    shared expert."""
    experts = range(config["num_experts"])
    if "layers.0.mlp.experts.gate_up_proj" not in names and len(experts) > len(names):
        # each expert has tensors of its own: no work in proportion to a count the file cannot hold
        raise ValueError(f"the config describes {len(experts)} experts per layer, but the checkpoint has "
                         f"{len(names)} tensors")
    if "layers.0.block_sparse_moe.gate.weight" in names:  # Mixtral
        moe, gate, up, down = "layers.{i}.block_sparse_moe", "w1", "w3", "w2"
    else:
        moe, gate, up, down = "layers.{i}.mlp", "gate_proj", "up_proj", "down_proj"
    if "layers.0.mlp.experts.gate_up_proj" in names:  # transformers v5's own stacks (a state_dict)
        stacks = (
            rule("layers.{i}.ffn.experts.gate_up.weight", f"{moe}.experts.gate_up_proj", experts=True),
            rule("layers.{i}.ffn.experts.down.weight", f"{moe}.experts.down_proj", experts=True),
        )
    else:
        stacks = (
            rule("layers.{i}.ffn.experts.gate_up.weight",
                 *(f"{moe}.experts.{e}.{proj}.weight" for e in experts for proj in (gate, up))),
            rule("layers.{i}.ffn.experts.down.weight", *(f"{moe}.experts.{e}.{down}.weight" for e in experts)),
        )
    rules = (rule("layers.{i}.ffn.router.weight", f"{moe}.gate.weight"), *stacks)
    if config.get("shared_expert_intermediate_size"):
        rules += (
            rule("layers.{i}.ffn.shared.gate_up.weight", f"{moe}.shared_expert.gate_proj.weight",
                 f"{moe}.shared_expert.up_proj.weight"),
            rule("layers.{i}.ffn.shared.down.weight", f"{moe}.shared_expert.down_proj.weight"),
            rule("layers.{i}.ffn.shared_gate.weight", f"{moe}.shared_expert_gate.weight"),
        )
    return rules


def _hf_tables(config: dict, names=()) -> TensorTable:
    """Llama's table, with Qwen3's / OLMoE's q/k norms and the experts where the config has them; an
    embedding model (Qwen3-Embedding) ends at the last hidden state: a head saved beside it is not part of it."""
    layer_rules = _LLAMA_HF.layer_rules
    if config.get("qk_norm"):
        layer_rules += _QK_NORM_HF
    if config.get("num_experts"):
        layer_rules = tuple(r for r in layer_rules if r.target not in _DENSE_FFN) + _expert_rules_hf(config, names)
    table = replace(_LLAMA_HF, layer_rules=layer_rules)
    if config["architecture"] == "encoder":
        table = replace(table, lm_head=None, ignore_suffixes=table.ignore_suffixes + ("lm_head.weight",))
    return table


def _with_qk_norm(table: TensorTable) -> TensorTable:
    return replace(table, layer_rules=table.layer_rules + _QK_NORM_GGUF)


# llama.cpp's expert stacks [E, rows, cols] (ffn_*_exps) and Qwen2-MoE's shared expert (*_shexp).
_EXPERTS_GGUF = (
    rule("layers.{i}.ffn.router.weight", "blk.{i}.ffn_gate_inp.weight"),
    rule("layers.{i}.ffn.experts.gate_up.weight", "blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight",
         experts=True),
    rule("layers.{i}.ffn.experts.down.weight", "blk.{i}.ffn_down_exps.weight", experts=True),
)
_SHARED_EXPERT_GGUF = (
    rule("layers.{i}.ffn.shared.gate_up.weight", "blk.{i}.ffn_gate_shexp.weight", "blk.{i}.ffn_up_shexp.weight"),
    rule("layers.{i}.ffn.shared.down.weight", "blk.{i}.ffn_down_shexp.weight"),
    rule("layers.{i}.ffn.shared_gate.weight", ("blk.{i}.ffn_gate_inp_shexp.weight", "one_row")),
)


def _gguf_tables(config: dict, table: TensorTable) -> TensorTable:
    """A GGUF architecture's table, its dense FFN replaced by the experts when the file has them
    (`{arch}.expert_count`: Mixtral's llama files, qwen2moe, qwen3moe)."""
    if not config.get("num_experts"):
        return table
    rules = tuple(r for r in table.layer_rules if r.target not in _DENSE_FFN) + _EXPERTS_GGUF
    if config.get("shared_expert_intermediate_size"):
        rules += _SHARED_EXPERT_GGUF
    return replace(table, layer_rules=rules)


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



def _expert_config(hf: dict) -> dict:
    """The mixture-of-experts fields of an HF config: Mixtral (num_local_experts, always
    renormalized), Qwen2-MoE / Qwen3-MoE (num_experts, or num_local_experts as transformers v5
    saves Qwen3-MoE; moe_intermediate_size; Qwen2-MoE's shared expert), OLMoE (num_experts)."""
    model_type = hf.get("model_type")
    experts = hf.get("num_experts") or hf.get("num_local_experts")  # transformers v4 / v5 names
    if not experts:
        return {}
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 0:
        raise ValueError(f"the number of experts must be a non-negative integer, got {experts!r}")
    if _has_dense_layers(hf):
        raise ValueError(f"some layers have a dense FFN among expert layers (decoder_sparse_step "
                         f"{hf.get('decoder_sparse_step')}, mlp_only_layers {hf.get('mlp_only_layers')}): "
                         "pyxf runs models whose every layer has experts")
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv ({hf['clip_qkv']}) is not supported")
    config = {
        "num_experts": experts,
        "num_experts_per_tok": hf["num_experts_per_tok"],
        "norm_topk_prob": True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        "intermediate_size": hf.get("moe_intermediate_size") or hf["intermediate_size"],
    }
    if hf.get("shared_expert_intermediate_size"):
        config["shared_expert_intermediate_size"] = hf["shared_expert_intermediate_size"]
    return config


def _has_dense_layers(hf: dict) -> bool:
    """Whether Qwen-MoE's decoder_sparse_step (layer i has experts when (i + 1) % step == 0: a step
    above 1 leaves layer 0 dense) or mlp_only_layers make some layer dense (Mixtral and OLMoE have
    experts in every layer). Without a loop over the layers a config claims."""
    layers = hf["num_hidden_layers"]
    dense = [i for i in hf.get("mlp_only_layers") or [] if isinstance(i, int) and 0 <= i < layers]
    return bool(dense) or (hf.get("decoder_sparse_step") or 1) != 1


# HF model types whose q and k are normalized before RoPE: over each head, or (OLMoE) over the
# whole projection.
_QK_NORM_SPAN = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "projection"}


def _sliding_window(hf: dict) -> tuple[int | None, int | None]:
    """(sliding_window, sliding_window_pattern): from HF's layer_types when the config lists them,
    else as the config classes derive them: Mistral windows every layer, Qwen2 / Qwen3 and their
    MoE (with use_sliding_window) the layers from max_window_layers on. Never a list as long as the
    claimed layer count (a config may claim 2**31 layers; the converter refuses it later)."""
    window = sliding_window(hf)
    if hf.get("layer_types") is not None:
        return sliding_window_layers(window, hf["layer_types"], hf["num_hidden_layers"])
    if not window or hf.get("model_type") not in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        return window, None
    first = hf.get("max_window_layers", 28)
    if first >= hf["num_hidden_layers"]:
        return None, None
    if first > 0:
        raise ValueError(f"only the layers from max_window_layers ({first}) on use the sliding window; pyxf "
                         "supports windows on every layer or on a repeating pattern of layers")
    return window, None


def llama_config(hf: dict) -> dict:
    qk_norm_span = _QK_NORM_SPAN.get(hf.get("model_type"))
    experts = _expert_config(hf)
    window, pattern = _sliding_window(hf)
    return {
        "sliding_window": window,
        "sliding_window_pattern": pattern,
        "family": "llama",
        **gated_rope_decoder(hf, norm_eps=1e-6),
        "qk_norm": qk_norm_span is not None,
        **({"qk_norm_span": qk_norm_span} if qk_norm_span == "projection" else {}),
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        **experts,
        **common_config(hf),
    }


def _embedding_model(files_dir, config: dict) -> dict:
    """A Qwen3 checkpoint saved as a sentence-transformers model (modules.json: Transformer, Pooling,
    Normalize; Qwen3-Embedding) is an embedding model: an encoder that keeps the decoder's causal
    attention and RoPE, with sentence-transformers' pooling (last token), normalization and prompts."""
    if not is_sentence_transformers_model(files_dir):
        return {}
    if not config["qk_norm"] or config.get("num_experts"):
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
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3Model",
                      "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"),
    hf_model_types=("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
    hf=_LLAMA_HF,
    hf_tables=_hf_tables,
    hf_config=llama_config,
    gguf={
        "llama": _llama_gguf("unpermute_q", "unpermute_k"),
        "qwen2": _llama_gguf(None, None),
        "qwen3": _with_qk_norm(_llama_gguf(None, None)),
        "qwen2moe": _llama_gguf(None, None),
        "qwen3moe": _with_qk_norm(_llama_gguf(None, None)),
    },
    read_files=_embedding_model,
    gguf_tables=_gguf_tables,
    write_tokenizer=_write_tokenizer,
)
