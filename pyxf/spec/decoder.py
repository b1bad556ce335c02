"""Decoder-only language models: Llama / Mistral / Qwen2 / Qwen3 / SmolLM2 (family llama), Gemma 2 / 3
(family gemma) and GPT-2."""

from .blocks import SCALE_FIELDS, STACK_FIELDS, block, pre_norm, stack_dims, token_embedding
from .schema import Architecture, Field, Stack, Tensor, norm


def _learned(config):
    return config["position"] == "learned"


def _untied(config):
    return not config["tie_word_embeddings"]


def _check(config, fail):
    local = ("sliding_window_pattern", "rope_local_theta")
    for field in local:
        if config.get(field) is not None and config.get("sliding_window") is None:
            fail(f"{field!r} describes local layers, but 'sliding_window' is null")
    if config.get("rope_local_theta") is not None and config["position"] != "rope":
        fail("'rope_local_theta' needs position rope")


DECODER = Architecture(
    "decoder",
    families=("llama", "gemma", "gpt2"),
    fields=(
        *STACK_FIELDS,
        *SCALE_FIELDS,
        # Local attention: a query at position p sees the keys at p - W + 1 .. p.
        Field("sliding_window", "size", default=None, doc="W: attention sees the last W positions"),
        Field("sliding_window_pattern", "size", default=None,
              doc="N: only some layers are local, layer i global when (i + 1) % N == 0; null: all"),
        Field("rope_local_theta", "positive", default=None,
              doc="the local layers' RoPE base, unscaled (Gemma 3); null: rope_theta as every layer"),
        Field("qk_norm", "bool", default=False, doc="RMSNorm over each head of q and of k before RoPE (Qwen3)"),
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
