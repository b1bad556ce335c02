"""Decoder-only language models: Llama / Mistral / Qwen2 / Qwen3 / SmolLM2 (family llama), Phi-3 / Phi-4
(family phi3: the llama block, its projections stored fused as pyxf stores them) and GPT-2."""

from .blocks import STACK_FIELDS, block, pre_norm, stack_dims, token_embedding
from .schema import Architecture, Field, Stack, Tensor, norm


def _learned(config):
    return config["position"] == "learned"


def _untied(config):
    return not config["tie_word_embeddings"]


DECODER = Architecture(
    "decoder",
    families=("llama", "phi3", "gpt2"),
    fields=(
        *STACK_FIELDS,
        # Mistral-style local attention: each position sees the last W positions. pyxf has no
        # windowed attention yet; a sequence of at most W tokens attends to all of them either way,
        # so pyxf.load limits the context to W (asking for more is an error) and the window is honoured.
        Field("sliding_window", "size", default=None, doc="W: attention sees the last W positions"),
        Field("qk_norm", "bool", default=False, doc="RMSNorm over each head of q and of k before RoPE (Qwen3)"),
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
    doc="causal self-attention with a KV cache, an LM head",
)
