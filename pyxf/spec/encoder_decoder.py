"""Encoder-decoder models: the original Transformer, Marian, T5. The decoder keeps the decoder-only
names and each layer adds cross-attention; the encoder has the same names under `encoder.`.
Position tables are made at load (not stored): sinusoidal ones for both stacks, or T5's bias by
relative distance [Hq, 2R + 1] from each stack's `rel_bias.weight` buckets."""

from .blocks import SCALE_FIELDS, STACK_FIELDS, block, pre_norm, stack_dims, token_embedding
from .schema import PYTHON, Architecture, Field, Stack, Tensor, norm

SINUSOIDAL_LAYOUTS = ("interleaved", "concat")
# Tables made at load from config values alone (they are not in the weight file), so bounded:
# the sinusoidal position table [max_position_embeddings, hidden_size] ...
MAX_SINUSOIDAL_ENTRIES = 2**28  # 1 GiB of float32
# ... and T5's relative bias by distance [heads, 2 max_distance + 1] (T5 uses 128).
MAX_RELATIVE_DISTANCE = 2**16

FIELDS = STACK_FIELDS + SCALE_FIELDS + (
    Field("num_encoder_layers", "size"),
    Field("source_vocab_size", "size", default=None, doc="encoder vocabulary (default vocab_size)"),
    Field("shared_embeddings", "bool", default=False, doc="the encoder reads embed.weight"),
    Field("sinusoidal_layout", "choice", default="interleaved", choices=SINUSOIDAL_LAYOUTS),
    Field("relative_attention_num_buckets", "size", default=None),
    Field("relative_attention_max_distance", "size", default=None),
    Field("head_scale", "positive", default=None, doc="the LM head's input is multiplied by it"),
    Field("decoder_start_token_id", "ids"),
    Field("forced_eos_token_id", "ids", default=None),
    Field("suppress_token_ids", "ids", default=None),
    Field("renormalize_logits", "bool", default=False),
)


def seq2seq_dims(config):
    dims = stack_dims(config)
    dims["Vs"] = config.get("source_vocab_size") or config["vocab_size"]
    dims["NB"] = config.get("relative_attention_num_buckets") or 0
    dims["R2"] = 2 * (config.get("relative_attention_max_distance") or 0) + 1
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
        Tensor(f"{prefix}rel_bias.weight", ("NB", "Hq"), when=_relative, reader=PYTHON),
        Tensor(f"{prefix}rel_pos_table", ("Hq", "R2"), when=_relative, stored=False),
        Tensor(f"{prefix}pos_embed.weight", ("P", "H"), when=_sinusoidal, stored=False),
    )


def _check(config, fail):
    if config.get("shared_embeddings") and config.get("source_vocab_size", config["vocab_size"]) != config["vocab_size"]:
        fail("shared embeddings need source_vocab_size == vocab_size")
    if config["norm_position"] == "sandwich":
        fail("encoder-decoder models have no sandwich norms (norm_position pre or post)")
    position = config["position"]
    if position not in ("sinusoidal", "relative"):
        fail(f"encoder-decoder models need 'position' sinusoidal or relative, got {position!r}")
    if position == "sinusoidal":
        entries = config["max_position_embeddings"] * config["hidden_size"]
        if entries > MAX_SINUSOIDAL_ENTRIES:
            fail(f"a sinusoidal table of max_position_embeddings x hidden_size = {entries} entries is made at "
                 f"load; pyxf supports at most {MAX_SINUSOIDAL_ENTRIES}")
    if position == "relative":
        buckets = config.get("relative_attention_num_buckets")
        distance = config.get("relative_attention_max_distance")
        for field, value in (("relative_attention_num_buckets", buckets), ("relative_attention_max_distance", distance)):
            if value is None:
                fail(f"{field!r} must be a positive integer, got None")
        if distance > MAX_RELATIVE_DISTANCE:
            fail(f"'relative_attention_max_distance' is {distance}, more than pyxf supports ({MAX_RELATIVE_DISTANCE})")
        if buckets < 4 or distance < buckets // 2:
            fail("relative_attention_num_buckets must be >= 4 and max_distance >= num_buckets / 2")
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
