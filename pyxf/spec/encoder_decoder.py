"""Encoder-decoder models: the original Transformer, Marian, T5, BART, mBART, M2M100 (and NLLB). The
decoder keeps the decoder-only names and each layer adds cross-attention; the encoder has the same
names under `encoder.`. Positions: learned tables stored per stack (BART, mBART), or tables made at
load (not stored): sinusoidal ones for both stacks, or T5's bias by relative distance [Hq, 2R + 1]
from each stack's `rel_bias.weight` buckets."""

from .blocks import (RELATIVE_FIELDS, SCALE_FIELDS, STACK_FIELDS, block, check_relative, pre_norm, relative_bias,
                     relative_dims, stack_dims, token_embedding)
from .schema import Architecture, Field, Stack, Tensor, norm

SINUSOIDAL_LAYOUTS = ("interleaved", "concat", "fairseq")
POSITIONS = ("sinusoidal", "learned", "relative")
# A multilingual model's language tokens: where the source language token goes (MBartTokenizer and
# NLLB's legacy behaviour: after the end token; mBART-50, M2M100, NLLB: before the text) and how the
# target language is asked for (the first generated token, forced; mBART-25: the decoder start).
LANGUAGE_SOURCE_SLOTS = ("prefix", "suffix")
LANGUAGE_TARGET_SLOTS = ("forced_bos", "decoder_start")
# Tables made at load from config values alone (they are not in the weight file), so bounded:
# the sinusoidal position table [max_position_embeddings, hidden_size] ...
MAX_SINUSOIDAL_ENTRIES = 2**28  # 1 GiB of float32

FIELDS = STACK_FIELDS + SCALE_FIELDS + (
    Field("num_encoder_layers", "size"),
    Field("source_vocab_size", "size", default=None, doc="encoder vocabulary (default vocab_size)"),
    Field("shared_embeddings", "bool", default=False, doc="the encoder reads embed.weight"),
    Field("sinusoidal_layout", "choice", default="interleaved", choices=SINUSOIDAL_LAYOUTS),
    Field("position_offset", "count", default=0, doc="position tables start here (BART, mBART, M2M100: 2)"),
    Field("embed_norm", "bool", default=False, doc="a norm of the embeddings of each stack (BART, mBART)"),
    *RELATIVE_FIELDS,
    Field("head_scale", "positive", default=None, doc="the LM head's input is multiplied by it"),
    Field("decoder_start_token_id", "ids"),
    Field("forced_bos_token_id", "ids", default=None, doc="forced as the first generated token"),
    Field("forced_eos_token_id", "ids", default=None),
    Field("suppress_token_ids", "ids", default=None),
    Field("renormalize_logits", "bool", default=False),
    Field("languages", "object", default=None,
          doc="{tokens: {code: token id}, source: prefix | suffix, target: forced_bos | decoder_start}"),
)


def seq2seq_dims(config):
    dims = stack_dims(config)
    dims["Vs"] = config.get("source_vocab_size") or config["vocab_size"]
    dims.update(relative_dims(config))
    return dims


def _sinusoidal(config):
    return config["position"] == "sinusoidal"


def _learned(config):
    return config["position"] == "learned"


def _embed_norm(config):
    return bool(config.get("embed_norm"))


def _relative(config):
    return config["position"] == "relative"


def _post_norm(config):
    return not pre_norm(config)


def _stack_ends(prefix):
    """A stack's embedding norm, its final norm (optional after post-norm blocks: torch.nn.Transformer
    has one) and its position tables."""
    return (
        *norm(f"{prefix}embed_norm", when=_embed_norm),
        *norm(f"{prefix}final_norm", required=pre_norm),
        *relative_bias(prefix, _relative),
        Tensor(f"{prefix}pos_embed.weight", ("P", "H"), when=_sinusoidal, stored=False),
        Tensor(f"{prefix}pos_embed.weight", ("P", "H"), when=_learned, lookup=True),
    )


def _check(config, fail):
    if config.get("shared_embeddings") and config.get("source_vocab_size", config["vocab_size"]) != config["vocab_size"]:
        fail("shared embeddings need source_vocab_size == vocab_size")
    if config["norm_position"] == "sandwich":
        fail("encoder-decoder models have no sandwich norms (norm_position pre or post)")
    position = config["position"]
    if position not in POSITIONS:
        fail(f"encoder-decoder models need 'position' {', '.join(POSITIONS)}, got {position!r}")
    if position != "relative" and config.get("position_offset", 0) >= config["max_position_embeddings"]:
        fail("'position_offset' must be below max_position_embeddings")
    if position == "sinusoidal":
        entries = config["max_position_embeddings"] * config["hidden_size"]
        if entries > MAX_SINUSOIDAL_ENTRIES:
            fail(f"a sinusoidal table of max_position_embeddings x hidden_size = {entries} entries is made at "
                 f"load; pyxf supports at most {MAX_SINUSOIDAL_ENTRIES}")
    if position == "relative":
        check_relative(config, fail)
    _check_languages(config.get("languages"), config["vocab_size"], fail)
    forced = config.get("forced_bos_token_id")
    if forced is not None and (isinstance(forced, bool) or not isinstance(forced, int)
                               or not 0 <= forced < config["vocab_size"]):
        fail(f"'forced_bos_token_id' must be null or a token id of the target vocabulary, got {forced!r}")
    start = config.get("decoder_start_token_id")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < config["vocab_size"]:
        fail(f"'decoder_start_token_id' must be a token id of the target vocabulary, got {start!r}")


def _check_languages(languages, vocab_size, fail):
    if languages is None:
        return
    tokens = languages.get("tokens")
    if not isinstance(tokens, dict) or not tokens:
        fail("'languages.tokens' must map language codes to token ids")
    for code, token in tokens.items():
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            fail(f"'languages.tokens' maps {code!r} to {token!r}, not a token id of the target vocabulary")
    if languages.get("source") not in LANGUAGE_SOURCE_SLOTS:
        fail(f"'languages.source' must be one of {', '.join(LANGUAGE_SOURCE_SLOTS)}, got {languages.get('source')!r}")
    if languages.get("target") not in LANGUAGE_TARGET_SLOTS:
        fail(f"'languages.target' must be one of {', '.join(LANGUAGE_TARGET_SLOTS)}, got {languages.get('target')!r}")


ENCODER_DECODER = Architecture(
    "encoder-decoder",
    families=("transformer", "marian", "t5", "bart", "mbart", "m2m100"),
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
