"""Tokenizer files of Hugging Face checkpoints, copied or written into a pyxf model directory: the
shared writers that families name as their `write_tokenizer` hook (decoders, encoders,
encoder-decoders), and sentence-transformers' settings of an encoder. Imports nothing of the
converter, so that family declarations can name these functions.

BOS handling: `tokenizer.json` / `tokenizer.model` are copied. pyxf's config.json `add_bos_token`
is the single switch for prepending BOS, so a tokenizer.json whose post-processor prepends BOS
(Llama's TemplateProcessing "<s> $A") gets that BOS removed and `add_bos_token` set instead. If BOS
is added some other way we cannot edit, the file is kept as is and `add_bos_token` is false, so BOS
is never doubled.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

def read_json(path: Path, kind: type = dict):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: invalid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: must hold a JSON {'object' if kind is dict else 'array'}, got {type(value).__name__}")
    return value


def optional_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _chat_template(files_dir: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (files_dir / "chat_template.jinja").is_file():
        template = (files_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (files_dir / "chat_template.json").is_file():
        template = read_json(files_dir / "chat_template.json").get("chat_template")
    return template


def _special_ids(hf_config: dict, generation_config: dict) -> dict:
    """bos/eos/pad ids; generation_config.json wins (it often lists several eos ids)."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = generation_config.get(key)
        ids[key] = value if value is not None else hf_config.get(key)
    eos = ids["eos_token_id"]
    ids["eos_token_id"] = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return ids


def _bos_token_text(tokenizer: dict, tokenizer_config: dict, bos_id) -> str | None:
    if bos_id is not None:
        for added in tokenizer.get("added_tokens", []):
            if added.get("id") == bos_id:
                return added["content"]
    bos = tokenizer_config.get("bos_token")
    return bos.get("content") if isinstance(bos, dict) else bos


def _strip_bos_from_template(processor: dict, bos: str) -> bool:
    """Remove BOS from a TemplateProcessing (also inside a Sequence); True if it was there."""
    if processor.get("type") == "Sequence":
        stripped = [_strip_bos_from_template(p, bos) for p in processor.get("processors", [])]  # all, no short cut
        return any(stripped)
    if processor.get("type") != "TemplateProcessing":
        return False

    def is_bos(piece):
        return "SpecialToken" in piece and piece["SpecialToken"]["id"] == bos

    found = any(is_bos(p) for p in processor["single"])
    for key in ("single", "pair"):
        processor[key] = [p for p in processor[key] if not is_bos(p)]
    processor.get("special_tokens", {}).pop(bos, None)
    return found


def _adds_bos_otherwise(processor: dict | None) -> bool:
    """Post-processors that always add a start token we do not rewrite (BERT/RoBERTa style)."""
    if not processor:
        return False
    if processor.get("type") == "Sequence":
        return any(_adds_bos_otherwise(p) for p in processor.get("processors", []))
    return processor.get("type") in ("BertProcessing", "RobertaProcessing")


def _write_tokenizer_json(src: Path, out_dir: Path, tokenizer_config: dict, bos_id) -> bool:
    """Copy tokenizer.json with BOS taken out of its post-processor; returns add_bos_token."""
    tokenizer = read_json(src)
    bos = _bos_token_text(tokenizer, tokenizer_config, bos_id)
    processor = tokenizer.get("post_processor")
    template_adds_bos = bool(processor and bos and _strip_bos_from_template(processor, bos))
    if _adds_bos_otherwise(processor):
        add_bos = False  # the tokenizer adds it; adding it again would double it
    elif "add_bos_token" in tokenizer_config:  # transformers rebuilds the template from this flag
        add_bos = bool(tokenizer_config["add_bos_token"])
    else:
        add_bos = template_adds_bos
    text = json.dumps(tokenizer, ensure_ascii=False)
    from tokenizers import Tokenizer

    Tokenizer.from_str(text)  # still a valid tokenizer after the edit
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    return add_bos


def _tokenizer_json_from_bpe_files(vocab: Path, merges: Path, out_dir: Path) -> None:
    """GPT-2 style repos that ship only vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out_dir / "tokenizer.json"))


def _write_encoder_tokenizer(files_dir: Path, out_dir: Path, tokenizer_config: dict) -> str | None:
    """Encoders keep their tokenizer's post-processor ([CLS] ... [SEP], <s> ... </s>) as it is: pyxf
    tokenizes with it, as transformers does. Without tokenizer.json, one is built from BERT's
    vocab.txt or RoBERTa's vocab.json + merges.txt; returns the file name, or None."""
    from tokenizers import Tokenizer, processors

    out = out_dir / "tokenizer.json"
    if (files_dir / "tokenizer.json").is_file():
        Tokenizer.from_file(str(files_dir / "tokenizer.json"))  # fails early on a broken file
        shutil.copyfile(files_dir / "tokenizer.json", out)
    elif (files_dir / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        tokenizer = BertWordPieceTokenizer(
            str(files_dir / "vocab.txt"), lowercase=bool(tokenizer_config.get("do_lower_case", True)),
            strip_accents=tokenizer_config.get("strip_accents"),
            handle_chinese_chars=bool(tokenizer_config.get("tokenize_chinese_chars", True)),
        )
        tokenizer.save(str(out))
    elif (files_dir / "vocab.json").is_file() and (files_dir / "merges.txt").is_file():
        _tokenizer_json_from_bpe_files(files_dir / "vocab.json", files_dir / "merges.txt", out_dir)
        tokenizer = Tokenizer.from_file(str(out))
        bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
        if bos is None or eos is None:
            raise ValueError(f"{files_dir}: vocab.json has no <s> / </s> tokens for the RoBERTa post-processor")
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos), trim_offsets=True)
        tokenizer.save(str(out))
    else:
        return None
    return "tokenizer.json"


def write_hf_tokenizer(files_dir: Path, out_dir: Path, hf_config: dict, encoder: bool = False) -> dict:
    """Copy the tokenizer files into out_dir; returns the config.json tokenizer fields."""
    tokenizer_config = optional_json(files_dir / "tokenizer_config.json")
    fields = _special_ids(hf_config, optional_json(files_dir / "generation_config.json"))
    fields["chat_template"] = _chat_template(files_dir, tokenizer_config)
    fields["tokenizer"] = None
    fields["add_bos_token"] = bool(tokenizer_config.get("add_bos_token", False))

    if encoder:
        fields["add_bos_token"] = False
        fields["tokenizer"] = _write_encoder_tokenizer(files_dir, out_dir, tokenizer_config)
        if fields["tokenizer"] is None:
            warnings.warn(f"{files_dir}: no tokenizer.json, vocab.txt or vocab.json+merges.txt; none copied")
        elif (files_dir / "tokenizer_config.json").is_file():
            shutil.copyfile(files_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json")
        return fields
    if (files_dir / "tokenizer.model").is_file():
        shutil.copyfile(files_dir / "tokenizer.model", out_dir / "tokenizer.model")
        fields["tokenizer"] = "tokenizer.model"
        # sentencepiece adds nothing itself; Llama's slow tokenizer prepends BOS by default
        fields["add_bos_token"] = bool(tokenizer_config.get("add_bos_token", True))
    if (files_dir / "tokenizer.json").is_file():
        fields["add_bos_token"] = _write_tokenizer_json(
            files_dir / "tokenizer.json", out_dir, tokenizer_config, fields["bos_token_id"]
        )
        fields["tokenizer"] = "tokenizer.json"
    elif fields["tokenizer"] is None and (files_dir / "vocab.json").is_file() and (files_dir / "merges.txt").is_file():
        _tokenizer_json_from_bpe_files(files_dir / "vocab.json", files_dir / "merges.txt", out_dir)
        fields["tokenizer"] = "tokenizer.json"
    if fields["tokenizer"] is None:
        warnings.warn(f"{files_dir}: no tokenizer.json, tokenizer.model or vocab.json+merges.txt; none copied")
    elif (files_dir / "tokenizer_config.json").is_file():
        shutil.copyfile(files_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    return fields


# ---------------------------------------------------------------------------------------------
# encoders: sentence-transformers pooling and the tokenization length

# sentence-transformers Pooling config flag -> pyxf pooling mode
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


def _pooling_mode(pooling_config: dict, path: Path) -> str | None:
    if isinstance(pooling_config.get("pooling_mode"), str):  # newer sentence-transformers
        modes = [{"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(m, m)
                 for m in pooling_config["pooling_mode"].split("-")]
    else:
        modes = [mode for flag, mode in _POOLING_FLAGS.items() if pooling_config.get(flag)]
    if len(modes) == 1 and modes[0] in _POOLING_MODES:
        return modes[0]
    warnings.warn(
        f"{path}: pooling {'+'.join(modes) or 'none'} is not supported ({', '.join(_POOLING_MODES)}, one at a "
        "time); the converted model has no default pooling and embeddings will differ from sentence-transformers'"
    )
    return None


def _modules(files_dir: Path) -> list | None:
    """sentence-transformers' modules.json (its list of modules), or None."""
    modules_path = files_dir / "modules.json"
    return read_json(modules_path, list) if modules_path.is_file() else None


def _module_kind(module) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""


def is_sentence_transformers_model(files_dir) -> bool:
    """Whether a checkpoint directory is a sentence-transformers model: modules.json lists a Pooling
    module (a decoder saved so is an embedding model, e.g. Qwen3-Embedding)."""
    modules = _modules(Path(files_dir))
    return isinstance(modules, list) and any(_module_kind(m) == "Pooling" for m in modules)


def _prompts(files_dir: Path) -> dict:
    """`prompts` ({name: text} or None) and `default_prompt_name` from config_sentence_transformers.json:
    the texts sentence-transformers puts before a text when asked for a prompt by name."""
    path = files_dir / "config_sentence_transformers.json"
    settings = optional_json(path)
    prompts = settings.get("prompts") or None
    if prompts is not None and not (
        isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
    ):
        raise ValueError(f"{path}: 'prompts' must map prompt names to texts")
    default = settings.get("default_prompt_name")
    if default is not None and default not in (prompts or {}):
        raise ValueError(f"{path}: default_prompt_name {default!r} is not one of the prompts")
    return {"prompts": prompts, "default_prompt_name": default}


def sentence_transformers_fields(files_dir: Path, config: dict) -> dict:
    """config.json `pooling` ({"mode", "normalize"[, "include_prompt": false]} or None) from a
    sentence-transformers checkpoint (modules.json, 1_Pooling/config.json), its `prompts` and
    `default_prompt_name`, and `max_length`: the tokenization length (sentence_bert_config.json's
    max_seq_length, else the tokenizer's model_max_length), capped by the positions."""
    modules_path = files_dir / "modules.json"
    modules = _modules(files_dir)
    pooling_dirs, normalize = [], False
    if isinstance(modules, list):
        for module in modules:
            kind = _module_kind(module)
            if kind == "Pooling":
                pooling_dirs.append(files_dir / module.get("path", ""))
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                warnings.warn(f"{modules_path}: sentence-transformers module {kind or str(module)[:80]} is not supported "
                              "and is left out; embeddings will differ from sentence-transformers'")
    elif (files_dir / "1_Pooling" / "config.json").is_file():
        pooling_dirs.append(files_dir / "1_Pooling")
    pooling = None
    if pooling_dirs:
        pooling_config = optional_json(pooling_dirs[0] / "config.json")
        mode = _pooling_mode(pooling_config, pooling_dirs[0] / "config.json")
        if mode is not None:
            pooling = {"mode": mode, "normalize": normalize}
            if pooling_config.get("include_prompt", True) is False:  # a prompt's tokens are not pooled
                pooling["include_prompt"] = False

    max_positions = config["max_position_embeddings"] - config.get("position_offset", 0)
    st_config = optional_json(files_dir / "sentence_bert_config.json")
    model_max = optional_json(files_dir / "tokenizer_config.json").get("model_max_length")
    max_length = st_config.get("max_seq_length")
    if not isinstance(max_length, int) and isinstance(model_max, int) and 0 < model_max < 1_000_000:
        max_length = model_max
    if not isinstance(max_length, int) or max_length <= 0:
        max_length = max_positions
    return {"pooling": pooling, "max_length": min(max_length, max_positions), **_prompts(files_dir)}




def write_decoder_tokenizer(files_dir, out_dir, hf_config: dict, config: dict) -> dict:
    """A decoder's tokenizer (Family.write_tokenizer)."""
    return write_hf_tokenizer(Path(files_dir), Path(out_dir), hf_config, encoder=False)


def write_encoder_tokenizer(files_dir, out_dir, hf_config: dict, config: dict) -> dict:
    """An encoder's tokenizer (Family.write_tokenizer): its post-processor kept."""
    return write_hf_tokenizer(Path(files_dir), Path(out_dir), hf_config, encoder=True)


# ---------------------------------------------------------------------------------------------
# encoder-decoder models: tokenizers and generation settings

def eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


M2M100_SPM = "sentencepiece.bpe.model"  # M2M100Tokenizer's pieces, mapped to ids through vocab.json
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json")


def write_seq2seq_tokenizer(files_dir: Path, out_dir: Path, hf_config: dict, config: dict) -> dict:
    """Copies the tokenizer files; returns config.json fields: special ids, generation settings
    from generation_config.json, `tokenizer` ("marian", "m2m100", "tokenizer.json", a sentencepiece
    file name, or None) and the language tokens of a multilingual tokenizer (`languages`)."""
    generation = optional_json(files_dir / "generation_config.json")
    fields = {}
    for key in ("bos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        if generation.get(key) is not None:
            fields[key] = generation[key]
    if generation.get("eos_token_id") is not None:
        fields["eos_token_id"] = eos_list(generation["eos_token_id"])
    bad = generation.get("bad_words_ids") or []
    suppress = [int(w[0]) for w in bad if isinstance(w, list) and len(w) == 1]
    if len(suppress) != len(bad):
        warnings.warn("bad_words_ids of more than one token are not supported; only single tokens are suppressed")
    suppress += [int(t) for t in generation.get("suppress_tokens") or []]
    fields["suppress_token_ids"] = sorted(set(suppress))
    fields["renormalize_logits"] = bool(generation.get("renormalize_logits", False))

    tokenizer = None
    if (files_dir / "source.spm").is_file() and (files_dir / "vocab.json").is_file():
        for name in MARIAN_FILES:
            if (files_dir / name).is_file():
                shutil.copyfile(files_dir / name, out_dir / name)
        if not (files_dir / "target.spm").is_file():
            shutil.copyfile(files_dir / "source.spm", out_dir / "target.spm")
        tokenizer = "marian"
    elif (files_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(files_dir / "tokenizer.json"))  # fails early on a broken file
        shutil.copyfile(files_dir / "tokenizer.json", out_dir / "tokenizer.json")
        tokenizer = "tokenizer.json"
        fields["languages"] = language_tokens(read_json(files_dir / "tokenizer.json"),
                                              optional_json(files_dir / "tokenizer_config.json"))
    elif (files_dir / M2M100_SPM).is_file() and (files_dir / "vocab.json").is_file():
        for name in (M2M100_SPM, "vocab.json"):
            shutil.copyfile(files_dir / name, out_dir / name)
        tokenizer = "m2m100"
        fields["languages"] = m2m100_languages(read_json(files_dir / "vocab.json"),
                                               optional_json(files_dir / "tokenizer_config.json"))
    elif (files_dir / "vocab.json").is_file() and (files_dir / "merges.txt").is_file():  # BART's byte-level BPE
        tokenizer = _write_encoder_tokenizer(files_dir, out_dir, {})
    else:
        for name in ("spiece.model", "tokenizer.model", "sentencepiece.model"):
            if (files_dir / name).is_file():
                shutil.copyfile(files_dir / name, out_dir / name)
                tokenizer = name
                break
    if tokenizer is None:
        warnings.warn(f"{files_dir}: no tokenizer files found (Marian's source.spm/vocab.json, tokenizer.json, "
                      "or a sentencepiece model); the converted model takes token ids only")
    elif (files_dir / "tokenizer_config.json").is_file():
        shutil.copyfile(files_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    fields["tokenizer"] = tokenizer
    return fields


# A multilingual tokenizer's language tokens, by their shape: NLLB's "fra_Latn", mBART's "fr_XX",
# M2M100's "__fr__" (whose language code is "fr").
LANGUAGE_TOKEN = re.compile(r"^(?:[a-z]{3}_[A-Z][a-z]{3}|[a-z]{2}_[A-Z]{2}|__([a-z]{2,3})__)$")
# Tokenizers that start the decoder with the target language instead of forcing it as the first
# generated token (mBART-25: transformers' docs pass decoder_start_token_id=lang_code_to_id[...]).
DECODER_START_LANGUAGE_TOKENIZERS = ("MBartTokenizer", "MBartTokenizerFast")


def language_tokens(tokenizer: dict, tokenizer_config: dict) -> dict | None:
    """config.json's `languages` for a tokenizer.json with language tokens (special added tokens
    shaped like language codes), else None: {tokens: {code: id}, source: where the post-processor
    puts the source language token (prefix | suffix), target: forced_bos | decoder_start}."""
    tokens = {}
    for added in tokenizer.get("added_tokens", []):
        match = LANGUAGE_TOKEN.match(str(added.get("content", "")))
        if added.get("special") and match:
            tokens[match.group(1) or added["content"]] = int(added["id"])
    if not tokens:
        return None
    return {
        "tokens": tokens,
        "source": _language_slot(tokenizer.get("post_processor"), set(tokens.values()),
                                 {a["content"]: a["id"] for a in tokenizer.get("added_tokens", [])}),
        "target": "decoder_start" if tokenizer_config.get("tokenizer_class") in DECODER_START_LANGUAGE_TOKENIZERS
        else "forced_bos",
    }


def _language_slot(processor: dict | None, language_ids: set, ids: dict) -> str:
    """Where a TemplateProcessing's single-text template has its language token: before the text
    ("prefix": mBART-50, M2M100, NLLB) or after it ("suffix": mBART-25, NLLB's legacy behaviour)."""
    processors = [processor] if processor else []
    if processor and processor.get("type") == "Sequence":
        processors = processor.get("processors", [])
    for p in processors:
        if p.get("type") != "TemplateProcessing":
            continue
        seen_text = False
        for piece in p.get("single", []):
            if "Sequence" in piece:
                seen_text = True
            elif ids.get(piece.get("SpecialToken", {}).get("id")) in language_ids:
                return "suffix" if seen_text else "prefix"
    return "prefix"


# M2M100Tokenizer's language codes (fairseq's lists, by its `language_codes` setting): the token of
# code c is "__c__", and its id follows vocab.json's: len(vocab.json) + the code's index.
M2M100_LANGUAGE_CODES = {
    "m2m100": (
        "af am ar ast az ba be bg bn br bs ca ceb cs cy da de el en es et fa ff fi fr fy ga gd gl gu ha he hi hr ht "
        "hu hy id ig ilo is it ja jv ka kk km kn ko lb lg ln lo lt lv mg mk ml mn mr ms my ne nl no ns oc or pa pl "
        "ps pt ro ru sd si sk sl so sq sr ss su sv sw ta th tl tn tr uk ur uz vi wo xh yi yo zh zu"
    ).split(),
    "wmt21": "en ha is ja cs ru zh de".split(),
}


def m2m100_languages(vocab: dict, tokenizer_config: dict) -> dict:
    """config.json's `languages` for M2M100Tokenizer: its language tokens follow vocab.json's ids;
    the source language goes before the text, the target one is forced as the first token."""
    kind = tokenizer_config.get("language_codes", "m2m100")
    if kind not in M2M100_LANGUAGE_CODES:
        raise ValueError(f"M2M100 tokenizer language_codes {kind!r} is not supported "
                         f"({', '.join(M2M100_LANGUAGE_CODES)})")
    codes = M2M100_LANGUAGE_CODES[kind]
    return {"tokens": {code: len(vocab) + i for i, code in enumerate(codes)}, "source": "prefix",
            "target": "forced_bos", "default_source": tokenizer_config.get("src_lang") or "en"}
