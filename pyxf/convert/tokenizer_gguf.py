"""Build a `tokenizer.json` from a GGUF file's tokenizer metadata.

A GGUF carries the vocabulary, merges and special ids under llama.cpp's `tokenizer.ggml.*` keys
but no tokenizer.json. We rebuild the tokenizer that transformers builds from the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so both encode identically:

- `gpt2`: byte-level BPE; the split regex is chosen by `tokenizer.ggml.pre`.
- `llama`: sentencepiece-style BPE with byte fallback; merges come from the file or are
  recovered from the token scores.

Control tokens become special added tokens, user-defined ones plain added tokens. The
tokenizer.json never adds BOS itself; `add_bos_token` in pyxf's config.json says whether to.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes by `tokenizer.ggml.pre`, as llama.cpp / the original tokenizers define them.
# Names not listed use GPT-2's regex (built into the ByteLevel pre-tokenizer).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "megrez": _QWEN2_SPLIT,
}
# Known to use GPT-2's regex (no warning for these).
_GPT2_REGEX_PRE = {"default", "gpt2", "smollm", "starcoder", "refact", "olmo", "jais", "poro-chat"}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the rest are moved to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


# Deriving merges tries every split of a token: quadratic in its length, so a file with a few
# megabyte-long "tokens" would take hours. Real vocabularies' longest tokens are far shorter
# (sentencepiece's default limit is 16; byte-level BPE runs of spaces reach a few dozen).
MAX_MERGED_TOKEN_LENGTH = 256


def derive_merges(vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two vocabulary tokens.

    With `scores` (sentencepiece), merges producing higher-scoring tokens come first; without,
    merges producing lower ids come first. Ties: longer left piece, then longer right piece
    (with scores), pieces ordered by id within one token. This is the order transformers uses.
    """
    by_score = scores is not None
    priority = scores if by_score else vocab
    long_tokens = [token for token in priority if len(token) > MAX_MERGED_TOKEN_LENGTH]
    if long_tokens:
        warnings.warn(
            f"{len(long_tokens)} tokens longer than {MAX_MERGED_TOKEN_LENGTH} characters get no merges "
            f"(e.g. one of {len(long_tokens[0])}); BPE will not produce them"
        )
    merges = []
    for token, score in priority.items():
        if len(token) > MAX_MERGED_TOKEN_LENGTH:
            continue
        pairs = [
            (token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab
        ]
        pairs.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += pairs
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=by_score)
    return [(left, right) for left, right, _ in merges]


def _merges_from_file(meta: dict) -> list[tuple[str, str]] | None:
    if "tokenizer.ggml.merges" not in meta:
        return None
    return [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]


def _byte_level_bpe(meta: dict) -> tuple[Tokenizer, dict[str, int]]:
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (rare; e.g. raw-UTF-8 spellings) are re-spelled in it.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = _merges_from_file(meta) or derive_merges(vocab)
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        if pre not in _GPT2_REGEX_PRE:
            warnings.warn(f"unknown tokenizer.ggml.pre {pre!r}; splitting text with GPT-2's regex")
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, vocab


def _sentencepiece_bpe(meta: dict) -> tuple[Tokenizer, dict[str, int]]:
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_file(meta)
    if merges is None:
        merges = derive_merges(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    tokenizer = Tokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=True, byte_fallback=True))
    prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # "first": only the start of the text gets the "▁" prefix, not text after a special token.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, vocab


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _add_special_tokens(tokenizer: Tokenizer, vocab: dict[str, int], meta: dict) -> None:
    """Control tokens match whole as special tokens; user-defined ones as plain added tokens.
    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel; adding it would grow the vocabulary, so it is skipped (as transformers does)."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    alphabet = set(byte_to_unicode().values())
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL and (not byte_level or set(t) <= alphabet)]
    # Named special ids (bos/eos/unk/pad) are special even when typed otherwise.
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        named = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
        if named in vocab and named not in control:
            control.append(named)
    if control:
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user_defined = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    if user_defined:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])


# The tokenizer metadata pyxf reads, and the kind of value each must hold.
_METADATA_KINDS = {
    "tokenizer.ggml.tokens": (list, str), "tokenizer.ggml.merges": (list, str), "tokenizer.ggml.scores": (list, float),
    "tokenizer.ggml.token_type": (list, int), "tokenizer.ggml.model": (str, None), "tokenizer.ggml.pre": (str, None),
    "tokenizer.ggml.bos_token_id": (int, None), "tokenizer.ggml.eos_token_id": (int, None),
    "tokenizer.ggml.eot_token_id": (int, None), "tokenizer.ggml.unknown_token_id": (int, None),
    "tokenizer.ggml.padding_token_id": (int, None), "tokenizer.ggml.add_bos_token": (bool, None),
    "tokenizer.ggml.add_space_prefix": (bool, None), "tokenizer.chat_template": (str, None),
}


def check_tokenizer_metadata(meta: dict) -> None:
    """ValueError unless every tokenizer key pyxf reads holds the kind of value it should (a file
    could say anything: token ids as strings, merges as numbers)."""
    for key, (kind, item) in _METADATA_KINDS.items():
        value = meta.get(key)
        if value is None:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and item is not None:
            allowed = (int, float) if item is float else item
            ok = all(isinstance(v, allowed) and not isinstance(v, bool) for v in value)
        if not ok or (kind is int and value < 0):
            raise ValueError(f"GGUF metadata {key} must be {_describe(kind, item)}, got {str(value)[:80]}")


def _describe(kind, item) -> str:
    names = {list: "a list", str: "a string", int: "a non-negative integer", bool: "true or false"}
    return names[kind] + (f" of {'numbers' if item is float else item.__name__ + 's'}" if item else "")


def build_tokenizer(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` from GGUF metadata (a dict of `tokenizer.*` keys)."""
    check_tokenizer_metadata(meta)
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise ValueError(f"cannot build a tokenizer for tokenizer.ggml.model {kind!r}; supported: {sorted(_BUILDERS)}")
    try:
        tokenizer, vocab = _BUILDERS[kind](meta)
        _add_special_tokens(tokenizer, vocab, meta)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- the tokenizers library raises bare Exceptions
        raise ValueError(f"GGUF tokenizer metadata does not make a tokenizer: {e}") from None
    return tokenizer


def tokenizer_config(meta: dict) -> dict:
    """The config.json fields the tokenizer metadata determines."""
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")  # end of turn: chat models stop there too
    eos_ids = [int(t) for t in (eos, eot) if t is not None]
    # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
    default_add_bos = meta.get("tokenizer.ggml.model") == "llama"
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(eos_ids)),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
    }


def write_tokenizer(meta: dict, out_dir) -> dict:
    """Write tokenizer.json into out_dir; returns the config.json fields for the tokenizer."""
    check_tokenizer_metadata(meta)
    if not meta.get("tokenizer.ggml.tokens"):
        warnings.warn("the GGUF file has no tokenizer (tokenizer.ggml.tokens); none written")
        return {"tokenizer": None, **tokenizer_config(meta)}
    build_tokenizer(meta).save(str(Path(out_dir) / "tokenizer.json"))
    return {"tokenizer": "tokenizer.json", **tokenizer_config(meta)}
