"""Tokenizers of converted models (`tokenizers` or sentencepiece files) and their chat templates."""

import json
import re
from datetime import datetime
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class Tokenizer:
    """Text <-> token ids for one model. BOS handling follows the model's config (`add_bos_token`),
    not the tokenizer file, so both backends behave alike."""

    def __init__(self, backend, *, bos_token_id=None, eos_token_ids=(), add_bos_token=False, chat_template=None):
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self._compiled_template = None

    @classmethod
    def from_file(cls, path, config=None):
        """Loads `tokenizer.json` or `tokenizer.model`; special ids and chat template come from `config`."""
        path = Path(path)
        config = config or {}
        if path.suffix == ".json":
            backend = read_tokenizer_file(_HFTokenizersBackend, path)
        elif path.suffix == ".model":
            backend = read_tokenizer_file(_SentencePieceBackend, path)
        else:
            raise ValueError(f"unknown tokenizer file type: {path.name} (expected one of {', '.join(TOKENIZER_FILES)})")
        eos = config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(
            backend,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos,
            add_bos_token=config.get("add_bos_token", False),
            chat_template=config.get("chat_template"),
        )

    @classmethod
    def from_model_dir(cls, model_dir, config):
        """The tokenizer named in config["tokenizer"] (or any known tokenizer file); None if there is none."""
        model_dir = Path(model_dir)
        names = [config["tokenizer"]] if config.get("tokenizer") else list(TOKENIZER_FILES)
        for name in names:
            if (model_dir / name).is_file():
                return cls.from_file(model_dir / name, config)
        if config.get("tokenizer"):
            raise FileNotFoundError(
                f"tokenizer file {config['tokenizer']!r} named in config.json is missing in {model_dir}"
            )
        return None

    @property
    def vocab_size(self):
        return self._backend.vocab_size

    def encode(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        wants_bos = add_special_tokens and self.add_bos_token and self.bos_token_id is not None
        # A chat template may already have rendered the BOS token into the text.
        if wants_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def encode_for_encoder(self, texts, max_length=None):
        """[(ids, type_ids)] for a list of texts, with the special tokens the tokenizer's
        post-processor adds ([CLS] ... [SEP], <s> ... </s>): what transformers' tokenizer(texts)
        gives an encoder. With max_length, each is truncated to that many tokens (specials
        included), as transformers' truncation=True does."""
        if not hasattr(self._backend, "encode_with_post_processor"):
            raise ValueError("encoder models need a tokenizer.json (the `tokenizers` library) tokenizer")
        return self._backend.encode_with_post_processor(list(texts), max_length)

    def token_text(self, token_id):
        """The vocabulary entry of one token (e.g. "<|im_end|>"), as chat templates expect it."""
        return self._backend.token_text(token_id)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead of messages")
        _check_messages(messages)
        import jinja2

        special = {
            "bos_token": self.token_text(self.bos_token_id) if self.bos_token_id is not None else "",
            "eos_token": self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else "",
        }
        # The template comes with the model: what goes wrong inside it is the model file's fault,
        # reported as jinja2's TemplateError (syntax, undefined names, raise_exception) or ValueError.
        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_chat_template(self.chat_template)
            text = self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **{**special, **kwargs}
            )
        except jinja2.exceptions.TemplateError:
            raise
        except (ArithmeticError, AttributeError, IndexError, KeyError, LookupError, RecursionError, TypeError,
                ValueError) as e:
            raise ValueError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
        return text


def read_tokenizer_file(backend, path, *args):
    """backend(path, *args), with what the tokenizer libraries raise on a malformed file (tokenizers:
    a bare Exception; sentencepiece: RuntimeError or OSError) as a ValueError naming the file."""
    try:
        return backend(path, *args)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- see above
        raise ValueError(f"{path}: not a readable tokenizer file: {type(e).__name__}: {e}") from None


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"each message must be a dict with 'role' and 'content', got {message!r}")


def _compile_chat_template(source):
    # The same environment Hugging Face renders chat templates in, so templates from the hub work unchanged.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class _HFTokenizersBackend:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_file(str(path))
        # Padding/truncation saved in the file are settings for a training run; transformers overrides
        # them on every call, and so does pyxf.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._truncating = {}  # max_length -> a copy of the tokenizer that truncates to it
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_with_post_processor(self, texts, max_length):
        tokenizer = self._tokenizer
        if max_length is not None:
            tokenizer = self._truncating.get(max_length)
            if tokenizer is None:
                from tokenizers import Tokenizer as HFTokenizer

                tokenizer = HFTokenizer.from_str(self._tokenizer.to_str())
                tokenizer.enable_truncation(max_length)  # longest_first, from the right: transformers' default
                self._truncating[max_length] = tokenizer
        return [(e.ids, e.type_ids) for e in tokenizer.encode_batch(texts, add_special_tokens=True)]

    def encode(self, text):
        # Special tokens written in the text (e.g. "<|im_start|>") are recognized by `tokenizers` itself;
        # BOS/EOS insertion by its post-processor is left to Tokenizer.encode.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id):
        return self._tokenizer.id_to_token(token_id) or ""


class _SentencePieceBackend:
    def __init__(self, path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self._control_ids = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
        # sentencepiece does not parse control tokens (<s>, </s>, ...) written in text, but chat templates
        # write them; split them out and map them to their ids.
        pieces = sorted((self._sp.id_to_piece(i) for i in self._control_ids), key=len, reverse=True)
        self._control_by_piece = {self._sp.id_to_piece(i): i for i in self._control_ids}
        self._control_pattern = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def encode(self, text):
        if self._control_pattern is None:
            return list(self._sp.encode(text))
        ids = []
        for part in self._control_pattern.split(text):
            if part in self._control_by_piece:
                ids.append(self._control_by_piece[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids, skip_special_tokens):
        # Ids past the tokenizer's vocabulary (a model's padded embedding rows) decode to nothing, as
        # with the `tokenizers` library.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._control_ids])
        # Decode runs of ordinary tokens, writing control tokens out as their pieces.
        text, run = [], []
        for i in ids:
            if i in self._control_ids:
                text += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        text.append(self._sp.decode(run))
        return "".join(text)

    def token_text(self, token_id):
        return self._sp.id_to_piece(token_id)
