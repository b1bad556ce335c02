"""Encoder-decoder models (the original Transformer, Marian, T5, BART, mBART, M2M100 / NLLB): loading,
source tokenizers, language tokens, and generate / translate (greedy, sampling, beam search), which
run in the core without the GIL.

    m = pyxf.load("opus-mt-en-de-pyxf")
    pyxf.translate(m, ["Hello world", "How are you?"], beam_size=4)   # -> list of str
    pyxf.generate(m, "Hello world")                                  # greedy -> str
    m.logits(source_ids, decoder_ids)                                # float32 [len(decoder_ids), vocab]
    nllb.translate("Hello world", source_lang="eng_Latn", target_lang="fra_Latn")
"""

from __future__ import annotations

import difflib
import json
import math
import secrets
from pathlib import Path

import numpy as np

from pyxf.checks import MappedModel, as_token_array, check_int, check_number
from pyxf.engine import Result, Usage
from pyxf.kv_cache import kv_cache_config
from pyxf.relative_position import relative_bias_table
from pyxf.spec.encoder_decoder import SINUSOIDAL_LAYOUTS
from pyxf.tensorfile import bf16_to_float32, read_safetensors
from pyxf.threads import core
from pyxf.weights import cast_weights, check_weights, copies_onto_huge_pages, core_config_of, quantize_weights
from pyxf.tokenizer import read_tokenizer_file

__all__ = ["Seq2SeqModel", "Seq2SeqTokenizer", "generate", "translate", "sinusoidal_table"]

# Options of decoders' generate() that encoder-decoder models do not have, with their defaults
# (a default value is accepted, so that one call can serve both kinds).
DECODER_ONLY_OPTIONS = {
    "logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "logit_bias": None, "stop_token_ids": None, "response_format": None, "regex": None, "choice": None,
    "grammar": None, "tools": None, "tool_choice": None, "speculative": None, "num_draft_tokens": 4,
}
EARLY_STOPPING = {False: 0, True: 1, "never": 2}


def sinusoidal_table(num_positions, dim, layout="interleaved"):
    """float32 [num_positions, dim] sinusoidal position table, computed in float64.

    interleaved (the Transformer paper, PyTorch tutorials): column 2i = sin(pos / 10000^(2i/dim)),
    column 2i+1 = cos(...). concat (Marian): the sines in the first half, the cosines in the second.
    fairseq (M2M100, NLLB): half = dim // 2 frequencies 10000^(-i / (half - 1)), the sines in
    columns [0, half), the cosines in [half, 2 half), a zero column when dim is odd.
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    if layout == "fairseq":
        return _fairseq_sinusoids(pos, dim)
    i = np.arange((dim + 1) // 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, 2.0 * i / dim)
    table = np.zeros((num_positions, dim), dtype=np.float64)
    if layout == "interleaved":
        table[:, 0::2] = np.sin(angle)
        table[:, 1::2] = np.cos(angle[:, : dim // 2])
    elif layout == "concat":
        half = (dim + 1) // 2
        table[:, :half] = np.sin(angle)
        table[:, half:] = np.cos(angle[:, : dim - half])
    else:
        raise ValueError(f"unknown sinusoidal layout {layout!r} ({', '.join(SINUSOIDAL_LAYOUTS)})")
    return table.astype(np.float32)


def _fairseq_sinusoids(pos, dim):
    half = dim // 2
    if half < 2:
        raise ValueError(f"the fairseq sinusoidal layout needs a hidden size of at least 4, got {dim}")
    angle = pos * np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000.0) / (half - 1)))[None, :]
    table = np.zeros((pos.shape[0], dim), dtype=np.float64)
    table[:, :half] = np.sin(angle)
    table[:, half : 2 * half] = np.cos(angle)
    return table.astype(np.float32)


def _as_float32(array, dtype):
    if dtype == "bfloat16":
        return bf16_to_float32(np.asarray(array))
    return np.asarray(array, dtype=np.float32)


def load_seq2seq(path, config, context_length=None, quantize=None, quantize_embeddings=True, dtype=None,
                 kv_cache_dtype=None, huge_pages=True):
    """An encoder-decoder model directory whose config.json is read and checked (pyxf.load).
    context_length does not apply (sources and targets are bounded by the position scheme); dtype,
    kv_cache_dtype (the decoder's self-attention caches) and huge_pages: as pyxf.load's."""
    path = Path(path)
    weights_path = path / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    weights_file = read_safetensors(weights_path)
    arrays = dict(check_weights(config, weights_file))
    huge_pages = copies_onto_huge_pages(huge_pages, config, quantize, dtype)
    if quantize is not None:
        config, arrays = quantize_weights(config, arrays, quantize, quantize_embeddings)
    if dtype is not None:
        config, arrays = cast_weights(config, arrays, dtype)
    core_config = core_config_of(config, huge_pages)
    core_config.update(kv_cache_config(config, kv_cache_dtype))
    if config["position"] == "sinusoidal":
        # Fixed, so not stored: both stacks read the same table as learned positions.
        table = sinusoidal_table(config["max_position_embeddings"], config["hidden_size"],
                                 config.get("sinusoidal_layout", "interleaved"))
        if config["dtype"] != "float32":
            table = table.astype(np.float16) if config["dtype"] == "float16" else _bf16(table)
        arrays["pos_embed.weight"] = arrays["encoder.pos_embed.weight"] = table
    elif config["position"] == "relative":
        nb, md = config["relative_attention_num_buckets"], config["relative_attention_max_distance"]
        for prefix, bidirectional in (("encoder.", True), ("", False)):
            weight = _as_float32(arrays[f"{prefix}rel_bias.weight"], config["dtype"])
            arrays[f"{prefix}rel_pos_table"] = relative_bias_table(weight, bidirectional, nb, md)
        core_config["rel_pos_radius"] = md
    core_model = core().Seq2SeqModel(core_config, arrays)
    tokenizer = Seq2SeqTokenizer.from_model_dir(path, config)
    return Seq2SeqModel(path, config, core_model, arrays, tokenizer, weights_file, core_config["kv_cache_dtype"])


def _bf16(table):
    from pyxf.tensorfile import float32_to_bf16

    return float32_to_bf16(table)


# ---------------------------------------------------------------------------------------------
# tokenizers


class Seq2SeqTokenizer:
    """Source text -> ids (with the end token the model was trained with), target ids -> text."""

    chat_template = None  # source text goes in as it is

    def __init__(self, backend, eos_token_id):
        self._backend = backend
        self.eos_token_id = eos_token_id

    @classmethod
    def from_model_dir(cls, model_dir, config):
        model_dir = Path(model_dir)
        name = config.get("tokenizer")
        eos = (config.get("eos_token_id") or [None])[0]
        if name is None:
            return None
        if name == "marian":
            return cls(read_tokenizer_file(_MarianBackend, model_dir), eos)
        if name == "m2m100":
            return cls(read_tokenizer_file(_M2M100Backend, model_dir, config), eos)
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"tokenizer file {name!r} named in config.json is missing in {model_dir}")
        if name.endswith(".json"):
            return cls(read_tokenizer_file(_TokenizersBackend, model_dir / name), eos)
        return cls(read_tokenizer_file(_SentencePieceBackend, model_dir / name, eos), eos)

    def encode(self, text, add_special_tokens=True):
        """Source ids of one text, the end token appended (add_special_tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens=True):
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)


class _MarianBackend:
    """MarianTokenizer's behaviour: sentencepiece pieces (source.spm / target.spm) mapped through
    vocab.json (unknown pieces -> <unk>), a leading >>lang<< code kept as one token, </s> appended."""

    def __init__(self, model_dir):
        import sentencepiece

        settings = {}
        if (model_dir / "tokenizer_config.json").is_file():
            settings = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.encoder = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        self.separate_vocabs = bool(settings.get("separate_vocabs", False))
        target = self.encoder
        if self.separate_vocabs:
            target = json.loads((model_dir / "target_vocab.json").read_text(encoding="utf-8"))
        self.decoder = {v: k for k, v in target.items()}

        def token(key, default):
            value = settings.get(key, default)
            return value.get("content", default) if isinstance(value, dict) else (value or default)

        self.unk, self.eos, self.pad = token("unk_token", "<unk>"), token("eos_token", "</s>"), token("pad_token", "<pad>")
        self.unk_id = self.encoder[self.unk]
        self.eos_id = self.encoder[self.eos]
        self.special = {self.unk, self.eos, self.pad}
        self.special_ids = {self.encoder[t] for t in self.special if t in self.encoder}
        self.spm_source = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "source.spm"))
        self.spm_target = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "target.spm"))

    def encode(self, text, add_special_tokens):
        code = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2 :]
        pieces = code + self.spm_source.encode(text, out_type=str)
        ids = [self.encoder.get(p, self.unk_id) for p in pieces]
        return ids + [self.eos_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens):
        # transformers decodes with the source model unless the vocabularies are separate.
        sp = self.spm_target if self.separate_vocabs else self.spm_source
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        tokens = [self.decoder.get(i) or sp.IdToPiece(i) or self.unk for i in ids]
        out, run = "", []
        for t in tokens:
            if t in self.special:
                out += sp.decode_pieces(run) + t + " "
                run = []
            else:
                run.append(t)
        out += sp.decode_pieces(run)
        return out.replace("\u2581", " ").strip()


class _M2M100Backend:
    """M2M100Tokenizer's behaviour: sentencepiece pieces (sentencepiece.bpe.model) mapped through
    vocab.json (unknown pieces -> <unk>), language tokens "__xx__" after vocab.json's ids (config.json's
    `languages`), the source language token before the text and </s> after it."""

    def __init__(self, model_dir, config):
        import sentencepiece

        settings = {}
        if (model_dir / "tokenizer_config.json").is_file():
            settings = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

        def token(key, default):
            value = settings.get(key, default)
            return value.get("content", default) if isinstance(value, dict) else (value or default)

        languages = config.get("languages") or {}
        if languages.get("default_source") not in (languages.get("tokens") or {}):
            raise ValueError("config.json's 'languages' must hold the M2M100 tokenizer's language tokens and "
                             "its default source language ('default_source')")
        self.source_id = languages["tokens"][languages["default_source"]]
        self.encoder = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.decoder.update({token_id: f"__{code}__" for code, token_id in languages["tokens"].items()})
        self.unk = token("unk_token", "<unk>")
        self.unk_id = self.encoder[self.unk]
        self.eos_id = self.encoder[token("eos_token", "</s>")]
        names = (token(key, default) for key, default in
                 (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"), ("unk_token", "<unk>")))
        self.special_ids = {self.encoder[t] for t in names if t in self.encoder} | set(languages["tokens"].values())
        self.spm = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "sentencepiece.bpe.model"))

    def encode(self, text, add_special_tokens):
        ids = [self.encoder.get(piece, self.unk_id) for piece in self.spm.encode(text, out_type=str)]
        return [self.source_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        # Runs of pieces through sentencepiece; special tokens written out as they are.
        out, run = "", []
        for i in ids:
            if i in self.special_ids:
                out += self.spm.decode_pieces(run) + self.decoder[i]
                run = []
            else:
                run.append(self.decoder.get(i, self.unk))
        return (out + self.spm.decode_pieces(run)).strip()


class _TokenizersBackend:
    def __init__(self, path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def encode(self, text, add_special_tokens):
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
    def __init__(self, path, eos):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._eos = eos if eos is not None else self._sp.eos_id()
        self._control = {i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)}

    def encode(self, text, add_special_tokens):
        ids = list(self._sp.encode(text))
        return ids + [self._eos] if add_special_tokens and self._eos >= 0 else ids

    def decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control and i != self._eos]
        return self._sp.decode(ids)


# ---------------------------------------------------------------------------------------------
# the model


class Seq2SeqModel(MappedModel):
    """A loaded encoder-decoder model: config, tokenizer (None without one) and the core model."""

    is_encoder = False
    is_encoder_decoder = True

    def __init__(self, path, config, core_model, weights, tokenizer, weights_file=None, kv_cache_dtype="float32"):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config["vocab_size"]
        self.source_vocab_size = config.get("source_vocab_size", self.vocab_size)
        self.eos_token_ids = list(config.get("eos_token_id") or [])
        self.decoder_start_token_id = config["decoder_start_token_id"]
        positions = None  # T5's relative positions: unbounded
        if config["position"] in ("sinusoidal", "learned"):
            positions = config["max_position_embeddings"] - config.get("position_offset", 0)
        self.max_source_length = config.get("max_source_length") or positions  # None: unbounded
        self.max_target_length = positions or 1 << 20
        self.context_length = self.max_target_length
        self.kv_cache_dtype = kv_cache_dtype  # the decoder's self-attention caches
        self._core = core_model
        self._weights = weights  # the memory-mapped arrays the core points into
        self._weights_file = weights_file

    def __repr__(self):
        c = self.config
        return (
            f"pyxf.Seq2SeqModel({str(self.path)!r}, family={c['family']}, layers={c['num_encoder_layers']}+"
            f"{c['num_layers']}, hidden={c['hidden_size']}, vocab={self.vocab_size}, dtype={c['dtype']}, "
            f"kv_cache_dtype={self.kv_cache_dtype})"
        )

    def logits(self, source_ids, decoder_ids):
        """Logits of every decoder position for one source: float32 [len(decoder_ids), vocab].
        decoder_ids normally start with the decoder start token (self.decoder_start_token_id)."""
        source = as_token_array(source_ids, self.source_vocab_size, "source_ids")
        target = as_token_array(decoder_ids, self.vocab_size, "decoder_ids")
        self._check_source_length(len(source), "source_ids")
        return self._core_model.logits(source, target)

    def _check_source_length(self, n, what):
        if self.max_source_length is not None and n > self.max_source_length:
            raise ValueError(
                f"{what} has {n} tokens, more than the model's {self.max_source_length} source positions "
                "(pass truncate=True to cut it)"
            )

    def generate(self, source=None, *, messages=None, stream=False, **options):
        """Target text (or ids) for a source or a batch of sources: the interface of every model's
        generate() (pyxf.generate), the prompt being the source; the options are
        pyxf.seq2seq.generate's (beam search, sampling, lengths). stream=True (one text source)
        returns an iterator over the text: beam search settles the text only at its end, so it
        comes as one piece. Decoder features (messages, logprobs, structured output, tools,
        speculative decoding) are refused by name."""
        used = [name for name, default in DECODER_ONLY_OPTIONS.items() if options.pop(name, default) != default]
        if messages is not None:
            used.insert(0, "messages (an encoder-decoder model has no chat template: pass the source text)")
        if used:
            raise ValueError(f"{', '.join(used)}: not supported for encoder-decoder models")
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        if stream:
            if not isinstance(source, str):
                raise ValueError("stream=True takes a single text source")
            return iter([generate(self, source, **options)])
        return generate(self, source, **options)

    def translate(self, texts, **kwargs):
        """Same as pyxf.translate(self, texts, **kwargs)."""
        return translate(self, texts, **kwargs)


# ---------------------------------------------------------------------------------------------
# generation


def _special_tail(model, ids):
    """How many tokens at the end of a source are the special ones that truncation keeps: the end
    token, and a source language token after it (mBART-25)."""
    languages = (model.config.get("languages") or {})
    if languages.get("source") == "suffix" and len(ids) > 1 and ids[-1] in languages["tokens"].values():
        return 1 + (ids[-2] in model.eos_token_ids)
    return int(ids[-1] in model.eos_token_ids)


def _sources(model, source, add_special_tokens, truncate, source_language=None):
    """(list of source id lists, output form: text | texts | ids | batch_ids). source_language: the
    language token to put where the model's tokenizer puts it, instead of its default one."""
    def check(ids, what):
        if model.max_source_length is not None and len(ids) > model.max_source_length:
            if not truncate:
                model._check_source_length(len(ids), what)
            tail = _special_tail(model, ids) if add_special_tokens else 0
            ids = ids[: model.max_source_length - tail] + ids[len(ids) - tail:]
        return ids

    def encode(text, what):
        if model.tokenizer is None:
            raise ValueError(f"{model.path} has no tokenizer; pass token ids instead of text")
        if not text:
            raise ValueError(f"{what} is empty")
        if source_language is None:
            ids = model.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        else:
            ids = with_source_language(model, model.tokenizer.encode(text, add_special_tokens=False), source_language)
        if not ids:
            raise ValueError(f"{what} encodes to no tokens")
        return check(ids, what)

    if source is None:
        raise ValueError("a source (text or token ids) is required")
    if isinstance(source, str):
        return [encode(source, "the source")], "text"
    if isinstance(source, np.ndarray) and source.ndim == 2:
        source = list(source)
    if not isinstance(source, (list, tuple, np.ndarray)):
        raise TypeError(f"source must be a str, a list of str, or token ids, got {type(source).__name__}")
    if len(source) == 0:
        raise ValueError("source is empty")
    if all(isinstance(s, str) for s in source):
        return [encode(s, f"source {i}") for i, s in enumerate(source)], "texts"
    if source_language is not None:
        raise ValueError("source_lang applies to text sources (token ids already hold their language token)")
    if all(isinstance(s, (list, tuple, np.ndarray)) for s in source):
        return [check(as_token_array(s, model.source_vocab_size, f"source {i}").tolist(), f"source {i}")
                for i, s in enumerate(source)], "batch_ids"
    return [check(as_token_array(source, model.source_vocab_size, "source").tolist(), "source")], "ids"


# ---------------------------------------------------------------------------------------------
# language tokens (mBART, M2M100, NLLB)


def language_token(model, code, what):
    """The token id of a language code of a multilingual model: its tokenizer's language token
    ("fra_Latn" for NLLB, "fr_XX" for mBART; "fr" or "__fr__" for M2M100)."""
    if not isinstance(code, str):
        raise TypeError(f"{what} must be a language code (str), got {type(code).__name__}")
    languages = model.config.get("languages")
    if not languages:
        raise ValueError(f"{what}={code!r}: this model is not multilingual (its tokenizer has no language tokens)")
    tokens = languages["tokens"]
    key = code[2:-2] if len(code) > 4 and code.startswith("__") and code.endswith("__") else code
    if key not in tokens:
        known = sorted(tokens)
        by_lower = {k.lower(): k for k in known}
        close = [by_lower[k] for k in difflib.get_close_matches(key.lower(), by_lower, n=3, cutoff=0.6)]
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        listed = ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
        raise ValueError(f"unknown {what} {code!r}; {hint}this model's languages: {listed}")
    return tokens[key]


def with_source_language(model, ids, code):
    """Source ids of a text (without special tokens) with the end token and the language token of
    `code`, where the model's tokenizer puts it: before the text (mBART-50, M2M100, NLLB) or after
    the end token (mBART-25)."""
    language = language_token(model, code, "source_lang")
    eos = model.tokenizer.eos_token_id
    ends = [eos] if eos is not None else []
    if model.config["languages"]["source"] == "prefix":
        return [language, *ids, *ends]
    return [*ids, *ends, language]


def _target_language(model, code):
    """(decoder start id, forced first token id or -1) for a target language code (None: the
    model's own settings)."""
    forced = model.config.get("forced_bos_token_id")
    start, forced = model.decoder_start_token_id, -1 if forced is None else forced
    if code is None:
        return start, forced
    token = language_token(model, code, "target_lang")
    if model.config["languages"]["target"] == "decoder_start":
        return token, forced
    return start, token


def generate(model, source=None, *, max_new_tokens=None, max_length=None, min_length=0, beam_size=1,
             num_hypotheses=1, length_penalty=1.0, no_repeat_ngram_size=0, early_stopping=False, temperature=0.0,
             top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, stop=None, truncate=False, return_scores=False,
             return_details=False, add_special_tokens=True, target_lang=None, source_lang=None):
    """Target text (or ids) for one source or a batch of sources of an encoder-decoder model.

    source: str -> str; list[str] -> list[str]; list[int] -> list[int]; list[list[int]] -> list[list[int]]
    (ids are source token ids, end token included as the model expects; output ids exclude the end
    token). num_hypotheses > 1 makes each output a list of that many hypotheses, best first;
    return_scores=True makes each hypothesis a (output, score) pair (beam: the length-normalized
    sum of log-probabilities, else the sum of log-probabilities). return_details=True makes each
    hypothesis a pyxf.Result (text, token_ids, finish_reason "stop" or "length", usage), as
    decoders' generate gives.

    max_length (or max_new_tokens): most target tokens per hypothesis, the end token included
    (default 128, at most the model's target positions); min_length: the end token is blocked
    before this many tokens. beam_size 1 is greedy (temperature 0) or sampling (temperature, top_k,
    top_p, seed); beam_size > 1 is beam search with length_penalty, early_stopping (False, True or
    "never", as transformers), num_hypotheses. no_repeat_ngram_size and repetition_penalty apply to
    both. stop: extra end token ids. truncate: cut overlong sources instead of raising.

    target_lang / source_lang (multilingual models: mBART, M2M100, NLLB): language codes as the
    model's tokenizer names them ("fra_Latn", "fr_XX", "fr"). The target language is forced as the
    first generated token (mBART-25: the decoder start token); the source language token takes the
    place of the tokenizer's default one in text sources.
    """
    if max_new_tokens is not None and max_length is not None and max_new_tokens != max_length:
        raise ValueError("pass max_length or max_new_tokens, not both")
    max_length = max_length if max_length is not None else max_new_tokens
    if max_length is None:
        max_length = min(128, model.max_target_length)
    max_length = check_int("max_length", max_length, 1)
    if max_length > model.max_target_length:
        raise ValueError(f"max_length {max_length} exceeds the model's {model.max_target_length} target positions")
    min_length = check_int("min_length", min_length, 0)
    beam_size = check_int("beam_size", beam_size, 1)
    num_hypotheses = check_int("num_hypotheses", num_hypotheses, 1)
    if num_hypotheses > beam_size:
        raise ValueError(f"num_hypotheses ({num_hypotheses}) must not exceed beam_size ({beam_size})")
    no_repeat_ngram_size = check_int("no_repeat_ngram_size", no_repeat_ngram_size, 0)
    top_k = check_int("top_k", top_k, 0)
    length_penalty = check_number("length_penalty", length_penalty)
    temperature = check_number("temperature", temperature)
    top_p = check_number("top_p", top_p)
    repetition_penalty = check_number("repetition_penalty", repetition_penalty)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if temperature > 0 and beam_size > 1:
        raise ValueError("beam search does not sample: use temperature=0 with beam_size > 1")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive (1 disables it), got {repetition_penalty}")
    if return_scores and return_details:
        raise ValueError("pass return_scores or return_details, not both")
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    if seed is None:
        seed = secrets.randbits(63)
    seed = check_int("seed", seed, 0)
    eos = list(model.eos_token_ids)
    for item in [] if stop is None else [stop] if isinstance(stop, (int, np.integer)) else list(stop):
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"stop entries of an encoder-decoder model must be token ids, got {item!r}")
        if not 0 <= item < model.vocab_size:
            raise ValueError(f"stop token id {item} is outside the vocabulary [0, {model.vocab_size})")
        eos.append(int(item))
    if source_lang is not None and not add_special_tokens:
        raise ValueError("source_lang adds the language and end tokens: it needs add_special_tokens=True")
    decoder_start, forced_bos = _target_language(model, target_lang)
    sources, form = _sources(model, source, add_special_tokens, truncate, source_lang)

    config = model.config
    forced = config.get("forced_eos_token_id")
    results = model._core_model.generate(
        sources, beam_size=beam_size, num_hypotheses=num_hypotheses, length_penalty=length_penalty,
        early_stopping=EARLY_STOPPING[early_stopping], no_repeat_ngram_size=no_repeat_ngram_size,
        max_length=max_length, min_length=min_length, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, eos_ids=list(dict.fromkeys(eos)),
        suppress_ids=list(config.get("suppress_token_ids") or []), forced_bos_id=forced_bos,
        forced_eos_id=-1 if forced is None else forced, renormalize=bool(config.get("renormalize_logits", False)),
        decoder_start_id=decoder_start,
    )

    def output(tokens):
        tokens = [int(t) for t in tokens]
        return model.tokenizer.decode(tokens) if form in ("text", "texts") else tokens

    def details(source_ids, tokens):
        tokens = [int(t) for t in tokens]
        text = model.tokenizer.decode(tokens) if model.tokenizer is not None else ""
        # The end token is not in `tokens`; a forced one (Marian) takes the last place when the length runs out.
        finish = "length" if len(tokens) >= max_length - (forced is not None) else "stop"
        return Result(text=text, token_ids=tokens, finish_reason=finish, usage=Usage(len(source_ids), len(tokens)))

    per_source = []
    for source_ids, hyps in zip(sources, results):
        if return_details:
            outs = [details(source_ids, tokens) for tokens, _ in hyps]
        else:
            outs = [(output(tokens), float(score)) if return_scores else output(tokens) for tokens, score in hyps]
        per_source.append(outs if num_hypotheses > 1 else outs[0])
    return per_source[0] if form in ("text", "ids") else per_source


def translate(model, texts, *, beam_size=4, **kwargs):
    """Translations of a text or a list of texts (or token id lists): beam search by default
    (beam_size=4); other options as pyxf.generate."""
    if not getattr(model, "is_encoder_decoder", False):
        raise ValueError("translate() needs an encoder-decoder model (Marian, T5, BART, mBART, M2M100, NLLB, "
                         "the original Transformer)")
    return generate(model, texts, beam_size=beam_size, **kwargs)
