"""Encoder-decoder models: the original Transformer, Marian, T5. The decoder keeps the decoder-only
names and each layer adds cross-attention; the encoder has the same names under `encoder.`.
Position tables are made at load (not stored): sinusoidal ones for both stacks, or T5's bias by
relative distance [Hq, 2R + 1] from each stack's `rel_bias.weight` buckets."""

from .blocks import (RELATIVE_FIELDS, STACK_FIELDS, block, check_relative, pre_norm, relative_bias, relative_dims,
                     stack_dims, token_embedding)
from .schema import Architecture, Field, Stack, Tensor, norm

SINUSOIDAL_LAYOUTS = ("interleaved", "concat")
# Tables made at load from config values alone (they are not in the weight file), so bounded:
# the sinusoidal position table [max_position_embeddings, hidden_size] ...
MAX_SINUSOIDAL_ENTRIES = 2**28  # 1 GiB of float32

FIELDS = STACK_FIELDS + (
    Field("num_encoder_layers", "size"),
    Field("source_vocab_size", "size", default=None, doc="encoder vocabulary (default vocab_size)"),
    Field("shared_embeddings", "bool", default=False, doc="the encoder reads embed.weight"),
    Field("sinusoidal_layout", "choice", default="interleaved", choices=SINUSOIDAL_LAYOUTS),
    *RELATIVE_FIELDS,
    Field("embed_scale", "positive", default=None, doc="token embeddings are multiplied by it"),
    Field("attention_scale", "positive", default=None, doc="score scale; null: 1/sqrt(head_dim)"),
    Field("head_scale", "positive", default=None, doc="the LM head's input is multiplied by it"),
    Field("decoder_start_token_id", "ids"),
    Field("forced_eos_token_id", "ids", default=None),
    Field("suppress_token_ids", "ids", default=None),
    Field("renormalize_logits", "bool", default=False),
)


def seq2seq_dims(config):
    dims = stack_dims(config)
    dims["Vs"] = config.get("source_vocab_size") or config["vocab_size"]
    dims.update(relative_dims(config))
    return dims


def _sinusoidal(config):
    return config["position"] == "sinusoidal"


def _relative(config):
    return config["position"] == "relative"


def _post_norm(config):
    return not pre_norm(config)


def _stack_ends(prefix):
    """A stack's final norm (optional after post-norm blocks: torch.nn.Transformer has one) and its
    position tables."""
    return (
        *norm(f"{prefix}final_norm", required=pre_norm),
        *relative_bias(prefix, _relative),
        Tensor(f"{prefix}pos_embed.weight", ("P", "H"), when=_sinusoidal, stored=False),
    )


def _check(config, fail):
    if config.get("shared_embeddings") and config.get("source_vocab_size", config["vocab_size"]) != config["vocab_size"]:
        fail("shared embeddings need source_vocab_size == vocab_size")
    position = config["position"]
    if position not in ("sinusoidal", "relative"):
        fail(f"encoder-decoder models need 'position' sinusoidal or relative, got {position!r}")
    if position == "sinusoidal":
        entries = config["max_position_embeddings"] * config["hidden_size"]
        if entries > MAX_SINUSOIDAL_ENTRIES:
            fail(f"a sinusoidal table of max_position_embeddings x hidden_size = {entries} entries is made at "
                 f"load; pyxf supports at most {MAX_SINUSOIDAL_ENTRIES}")
    if position == "relative":
        check_relative(config, fail)
    start = config.get("decoder_start_token_id")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < config["vocab_size"]:
        fail(f"'decoder_start_token_id' must be a token id of the target vocabulary, got {start!r}")


ENCODER_DECODER = Architecture(
    "encoder-decoder",
    families=("transformer", "marian", "t5"),
    fields=FIELDS,
    dims=seq2seq_dims,
    tensors=(
        token_embedding(),
        token_embedding("encoder.embed.weight", "Vs", when=lambda c: not c.get("shared_embeddings")),
        *_stack_ends("encoder."),
        *_stack_ends(""),
        Tensor("lm_head.weight", ("V", "H"), quantizable=True, when=lambda c: not c["tie_word_embeddings"]),
        Tensor("lm_head.bias", ("V",), required=False),
    ),
    stacks=(
        Stack("encoder.layers.", "num_encoder_layers", block()),
        Stack("layers.", "num_layers", block(cross=True)),
    ),
    check=_check,
    doc="an encoder stack, and a decoder stack whose blocks add cross-attention",
)
