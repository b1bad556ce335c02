"""Decoder-only language models: Llama / Mistral / Qwen2 / Qwen3 / SmolLM2 and the mixtures of experts
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) (family llama), Phi-3 / Phi-4 (family phi3: the llama block,
its projections stored fused as pyxf stores them), Gemma 2 / 3 (family gemma) and GPT-2."""

from .blocks import LOCAL_FIELDS, SCALE_FIELDS, STACK_FIELDS, block, check_local, pre_norm, stack_dims, token_embedding
from .schema import Architecture, Field, Stack, Tensor, norm


def _learned(config):
    return config["position"] == "learned"


def _untied(config):
    return not config["tie_word_embeddings"]


def _check(config, fail):
    experts, k = config.get("num_experts") or 0, config.get("num_experts_per_tok") or 0
    if experts and not 1 <= k <= experts:
        fail(f"num_experts_per_tok must be between 1 and num_experts ({experts}), got {k}")
    if experts and not config["gated_ffn"]:
        fail("experts are gated FFNs: num_experts needs gated_ffn")
    if experts * 2 * max(config["intermediate_size"], config["hidden_size"]) > 2**31 - 1:
        fail(f"{experts} experts' stacked rows exceed what pyxf supports (2**31 - 1)")
    if 2 * (config.get("shared_expert_intermediate_size") or 0) > 2**31 - 1:
        fail("2 * shared_expert_intermediate_size exceeds what pyxf supports (2**31 - 1)")
    if not experts and config.get("shared_expert_intermediate_size"):
        fail("a shared expert needs num_experts")
    check_local(config, fail)


DECODER = Architecture(
    "decoder",
    families=("llama", "phi3", "gemma", "gpt2"),
    fields=(
        *STACK_FIELDS,
        *SCALE_FIELDS,
        *LOCAL_FIELDS,
        Field("qk_norm", "bool", default=False, doc="RMSNorm of q and of k before RoPE (Qwen3, OLMoE)"),
        Field("qk_norm_span", "choice", default="head", choices=("head", "projection"),
              doc="qk_norm over each head's D (Qwen3) or over the whole q and k projections (OLMoE)"),
        # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): every layer's FFN is
        # num_experts gated FFNs of intermediate_size; each token runs the num_experts_per_tok
        # best by the router's softmax, weighted by their probabilities (renormalized to sum to 1
        # when norm_topk_prob), plus the shared expert when present.
        Field("num_experts", "count", default=0, doc="E: experts per layer; 0: a dense FFN"),
        Field("num_experts_per_tok", "count", default=0, doc="k: experts each token runs (1 <= k <= E)"),
        Field("norm_topk_prob", "bool", default=False, doc="the k weights are renormalized to sum to 1"),
        Field("shared_expert_intermediate_size", "count", default=0,
              doc="the shared expert's width (Qwen2-MoE); 0: none"),
        Field("attention_softcap", "positive", default=None, doc="scores s -> c tanh(s / c) (Gemma 2)"),
        Field("logit_softcap", "positive", default=None, doc="logits z -> c tanh(z / c) (Gemma 2)"),
    ),
    dims=stack_dims,
    tensors=(
        token_embedding(),
        Tensor("pos_embed.weight", ("P", "H"), when=_learned, lookup=True),
        *norm("final_norm", when=pre_norm),
        # Untied: the head's own weight. Tied: embed.weight is the head (a bias may still come).
        Tensor("lm_head.weight", ("V", "H"), when=_untied, quantizable=True),
        Tensor("lm_head.bias", ("V",), required=False),
    ),
    stacks=(Stack("layers.", "num_layers", block()),),
    check=_check,
    doc="causal self-attention with a KV cache, an LM head",
)
