"""Decoder-only and encoder models (docs/DESIGN.md): loading a converted directory (pyxf.load picks
this module by the config's architecture), logits, sessions, generation, embeddings."""

import warnings
from pathlib import Path

import numpy as np

from pyxf import quant, spec
from pyxf.checks import MappedModel, as_token_array
from pyxf.generation import decoder_generate
from pyxf.kv_cache import kv_cache_config
from pyxf.config import read_config
from pyxf.relative_position import relative_bias_table
from pyxf.rope import longrope_original_context, rope_tables
from pyxf.spec import tensor_layout
from pyxf.tensorfile import bf16_to_float32, read_safetensors
from pyxf.threads import core
from pyxf.weights import (cast_weights, check_weights, copies_onto_huge_pages, core_config_of, has_tied_head,
                          quantize_weights)
from pyxf.tokenizer import Tokenizer


def load_model(path, config, context_length=None, quantize=None, quantize_embeddings=True, dtype=None,
               kv_cache_dtype=None, huge_pages=True):
    """A decoder-only or encoder model directory whose config.json is read and checked (pyxf.load)."""
    if config.get("architecture") == "encoder":  # complete sequences: no KV cache to size
        context_length = config["max_position_embeddings"] - config.get("position_offset", 0)
    else:
        context_length = _check_context_length(config, context_length)

    weights_path = path / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    weights_file = read_safetensors(weights_path)
    weights = check_weights(config, weights_file)
    share_file_pages = not huge_pages
    huge_pages = copies_onto_huge_pages(huge_pages, config, quantize, dtype)
    if quantize is not None:
        config, weights = quantize_weights(config, weights, quantize, quantize_embeddings)
    if dtype is not None:
        config, weights = cast_weights(config, weights, dtype)
    tokenizer = Tokenizer.from_model_dir(path, config)

    core_config = core_config_of(config, huge_pages, share_file_pages)
    core_config.update(kv_cache_config(config, kv_cache_dtype))
    if config["position"] == "rope":
        core_config.update(rope_tables(config, context_length))
    if config.get("relative_attention_num_buckets") is not None:
        weights = _with_relative_table(config, weights)
        core_config["rel_pos_radius"] = config["relative_attention_max_distance"]
    core_model = core().Model(core_config, weights)
    return Model(path, config, core_model, weights, tokenizer, context_length, weights_file,
                 core_config.get("kv_cache_dtype"))


def _with_relative_table(config, weights):
    """An encoder's bias by relative position (MPNet): the bidirectional bucket table
    `rel_bias.weight` expanded into the core's table by relative position, "rel_pos_table"."""
    weight = weights["rel_bias.weight"]
    weight = bf16_to_float32(weight) if config["dtype"] == "bfloat16" else np.asarray(weight, dtype=np.float32)
    table = relative_bias_table(weight, True, config["relative_attention_num_buckets"],
                                config["relative_attention_max_distance"])
    return {**weights, "rel_pos_table": table}


def _decode_share(name, array, one_row, layout, config):
    """The bytes of a stored array (a tensor, or an int8 tensor's scales) one decode step reads."""
    if name in one_row:
        return array.nbytes // array.shape[0]
    entry = layout.lookup(name)
    if entry is not None and entry.tensor.routed:
        return array.nbytes * config["num_experts_per_tok"] // config["num_experts"]
    return array.nbytes


def weight_summary(config, weights):
    """How a model's weights are stored: {"formats": {format: {"tensors": n, "bytes": b}},
    "decode_bytes": b}. Formats are the quantized ones of config.json's "quantization" (an int8
    tensor's scales count with it) and config["dtype"] for every other tensor. decode_bytes: the
    weight bytes one decode step of one sequence reads (every tensor in full, except that an
    embedding which is not also the head and learned positions contribute one row each, and stacked
    experts num_experts_per_tok / num_experts of their bytes); None for other than decoder-only
    models."""
    quantized = (config.get("quantization") or {}).get("tensors") or {}
    scale_of = {quant.scale_name(name): name for name, fmt in quantized.items() if fmt == "int8"}
    layout = tensor_layout(config)
    # Tables whose rows are looked up count one row, unless the table is also the (tied) head.
    tied = has_tied_head(config)
    one_row = {name for name, entry in layout.fixed.items()
               if entry.tensor.lookup and not (tied and entry.tensor.quantizable == spec.EMBEDDING)}
    formats, decode_bytes = {}, 0

    def count(fmt, tensors, nbytes):
        entry = formats.setdefault(fmt, {"tensors": 0, "bytes": 0})
        entry["tensors"] += tensors
        entry["bytes"] += nbytes

    for name, array in weights.items():
        owner = scale_of.get(name, name)
        stored_as = quantized.get(owner, config["dtype"])
        if isinstance(stored_as, str):
            count(stored_as, owner == name, array.nbytes)
        else:  # several formats: each segment's bytes under its format (the tensor counts in each)
            rows, cols = layout.lookup(name)[0]
            for fmt, n in quant.segments(stored_as, rows):
                count(fmt, 1, n * quant.row_bytes(fmt, cols))
        decode_bytes += _decode_share(owner, array, one_row, layout, config)
    if config.get("architecture", "decoder") != "decoder":
        decode_bytes = None  # encoders run whole sequences; encoder-decoder steps read the decoder only
    ordered = dict(sorted(formats.items(), key=lambda item: -item[1]["bytes"]))
    return {"formats": ordered, "decode_bytes": decode_bytes}


def describe_model(model_dir):
    """A converted model directory's family and weight_summary, read from its files (no loading)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights_path = model_dir / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    summary = weight_summary(config, read_safetensors(weights_path))
    return {"path": str(model_dir), "family": config["family"], "architecture": config.get("architecture", "decoder"),
            **summary, "description": describe_weights(summary)}


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


def describe_weights(summary):
    """One line for weight_summary's result: 'q4_1 210 tensors 55.3 MiB, ...; decode reads 92.1 MiB/token'."""
    parts = [f"{fmt} {e['tensors']} tensor{'s' * (e['tensors'] != 1)} {_mib(e['bytes'])}"
             for fmt, e in summary["formats"].items()]
    text = ", ".join(parts)
    if summary["decode_bytes"] is not None:
        text += f"; decode reads {_mib(summary['decode_bytes'])}/token"
    return text


def _default_context_length(config):
    """The positions a model is loaded for unless asked otherwise: all of them, except for LongRoPE,
    where pyxf matches the checkpoint's reference up to the pretraining context (short factors; a
    longer context_length picks the long factors: docs/DESIGN.md, "LongRoPE")."""
    limits = (config["max_position_embeddings"], longrope_original_context(config))
    return min(limit for limit in limits if limit)


def _check_context_length(config, context_length):
    max_positions = config["max_position_embeddings"]
    if context_length is None:
        return _default_context_length(config)
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    if context_length > max_positions:
        if config["position"] == "learned":
            raise ValueError(f"context_length {context_length} exceeds this model's {max_positions} learned positions")
        warnings.warn(
            f"context_length {context_length} is beyond the {max_positions} positions the model was made for; "
            "quality may degrade there",
            stacklevel=3,
        )
    return context_length


class Model(MappedModel):
    """A loaded decoder or encoder: its config, tokenizer (None if the directory has none) and the
    core model. Decoders generate(); encoders encode() and classify()."""

    is_encoder_decoder = False

    def __init__(self, path, config, core_model, weights, tokenizer, context_length, weights_file=None,
                 kv_cache_dtype=None):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config["vocab_size"]
        self.context_length = context_length
        self.kv_cache_dtype = kv_cache_dtype  # decoders' KV cache elements; None for encoders
        eos = config.get("eos_token_id")
        self.eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._core = core_model
        self._weights = weights  # the memory-mapped arrays the core points into
        self._weights_file = weights_file
        self.is_encoder = config.get("architecture") == "encoder"
        head = config.get("classifier") or {}
        self.labels = list(head["id2label"]) if head.get("id2label") else None  # classifier label names

    def __repr__(self):
        c = self.config
        return (
            f"pyxf.Model({str(self.path)!r}, family={c['family']}, layers={c['num_layers']}, "
            f"hidden={c['hidden_size']}, vocab={self.vocab_size}, weights: {describe_weights(self.weight_summary())}, "
            f"context_length={self.context_length}"
            + (f", kv_cache_dtype={self.kv_cache_dtype})" if self.kv_cache_dtype else ")")
        )

    def weight_summary(self):
        """Tensors and bytes per storage format, and the weight bytes one decode step reads (see
        pyxf.model.weight_summary)."""
        return weight_summary(self.config, self._weights)

    def encode(self, texts, batch_size=32, pooling=None, normalize=None, output="sentence", max_length=None,
               truncate=True, progress=False, prompt_name=None, prompt=None):
        """Encoders: sentence embeddings float32 [N, H] (or token states, output="tokens"), optionally
        with a sentence-transformers prompt (prompt_name="query"); see pyxf.encoding.encode."""
        from pyxf.encoding import encode

        self._require_encoder("encode")
        return encode(self, texts, batch_size=batch_size, pooling=pooling, normalize=normalize, output=output,
                      max_length=max_length, truncate=truncate, progress=progress, prompt_name=prompt_name,
                      prompt=prompt)

    def classify(self, texts, batch_size=32, max_length=None, truncate=True, progress=False, return_logits=False):
        """Sequence classifiers: float32 [N, num_labels] probabilities (labels: self.labels); see
        pyxf.encoding.classify."""
        from pyxf.encoding import classify

        self._require_encoder("classify")
        return classify(self, texts, batch_size=batch_size, max_length=max_length, truncate=truncate,
                        progress=progress, return_logits=return_logits)

    def rank(self, query, documents, top_k=None, return_documents=False, batch_size=32, max_length=None,
             truncate=True, progress=False):
        """Cross-encoder reranking, as sentence-transformers' CrossEncoder.rank: [{"corpus_id", "score"
        (, "text")}] best first. See pyxf.encoding.rank."""
        from pyxf.encoding import rank

        self._require_encoder("rank")
        return rank(self, query, documents, top_k=top_k, return_documents=return_documents, batch_size=batch_size,
                    max_length=max_length, truncate=truncate, progress=progress)

    def _require_encoder(self, what):
        if not self.is_encoder:
            raise ValueError(f"{what}() needs an encoder model (BERT, RoBERTa, DistilBERT, an embedding model such as "
                             f"Qwen3-Embedding); this is a {self.config['family']} decoder")

    def _require_decoder(self, what):
        if self.is_encoder:
            raise ValueError(f"{what}() needs a decoder model; this {self.config['family']} encoder has encode()/classify()")

    def logits(self, ids):
        """Logits for every position of one sequence: float32 [len(ids), vocab_size]."""
        self._require_decoder("logits")
        tokens = as_token_array(ids, self.vocab_size)
        if len(tokens) > self.context_length:
            raise ValueError(f"{len(tokens)} tokens exceed the context length {self.context_length}")
        session = core().Session(self._core_model, len(tokens))
        return session.feed(tokens, True)

    def session(self, context_length=None):
        """A sequence with its own KV cache, fed incrementally."""
        self._require_decoder("session")
        return Session(self, self.context_length if context_length is None else context_length)

    def generate(self, prompt=None, **kwargs):
        """Continues a prompt (or a batch; pyxf.generation.decoder_generate has the options)."""
        self._require_decoder("generate")
        return decoder_generate(self, prompt, **kwargs)


def kv_cache_bytes(model, context_length):
    """Bytes of keys and values a sequence of context_length positions takes (whole pages)."""
    pages = -(-context_length // core().kv_page_tokens)
    return pages * core().Engine.page_bytes(model._core_model)


class Session:
    """One sequence with its own KV cache: feed(ids) appends tokens and returns their logits."""

    def __init__(self, model, context_length):
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
        if not 0 < context_length <= model.context_length:
            raise ValueError(f"context_length must be in [1, {model.context_length}], got {context_length}")
        self.model = model
        self.context_length = context_length
        try:
            self._session = core().Session(model._core_model, context_length)
        except MemoryError:
            raise MemoryError(
                f"a KV cache of {context_length} positions needs {kv_cache_bytes(model, context_length) / 2**30:.1f} "
                "GiB of address space, more than this machine grants; pass a smaller context_length"
            ) from None

    @property
    def position(self):
        """Number of tokens fed so far."""
        return self._session.position

    def feed(self, ids, all_logits=True):
        """Appends tokens; returns float32 logits [len(ids), vocab] (or [1, vocab] for the last only)."""
        tokens = as_token_array(ids, self.model.vocab_size)
        self.model._core_model  # noqa: B018 -- checks the weight file is intact
        if self.position + len(tokens) > self.context_length:
            raise ValueError(
                f"feeding {len(tokens)} tokens at position {self.position} exceeds the session's "
                f"context length {self.context_length}"
            )
        return self._session.feed(tokens, bool(all_logits))

    def reset(self):
        self._session.reset()
