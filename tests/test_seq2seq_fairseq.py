"""BART, mBART and M2M100 (NLLB's architecture) against transformers: tiny random checkpoints of odd
sizes (head dims 15, 18 and 12), teacher-forced logits, greedy and beam-search tokens and scores,
batched equal to single; the language-token mechanics (source language token, target language
forced as the first token) against transformers' tokenizer and generate(forced_bos_token_id=...)."""

import string
import warnings

import numpy as np
import pytest

core = pytest.importorskip("pyxf._core", reason="pyxf._core is not built (bash tools/dev_build.sh)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyxf  # noqa: E402
from helpers import randomize  # noqa: E402
from pyxf.seq2seq import sinusoidal_table  # noqa: E402

LOGITS_ATOL = 1e-4
BOS, PAD, EOS = 0, 1, 2
TEXTS = ["hello world", "the quick brown fox jumps", "ich bin ein berliner"]

# family -> (model class, config class, config kwargs): encoder and decoder depths differ, head
# dims are not multiples of 16, and each family keeps its own defaults (norms, activation, scale).
SPECS = {
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(
        d_model=60, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=88, decoder_ffn_dim=88,
        encoder_layers=2, decoder_layers=3, max_position_embeddings=64, activation_function="gelu",
        scale_embedding=False)),
    "mbart": ("MBartForConditionalGeneration", "MBartConfig", dict(
        d_model=54, encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=70, decoder_ffn_dim=70,
        encoder_layers=3, decoder_layers=2, max_position_embeddings=64, activation_function="gelu",
        scale_embedding=True)),
    "m2m100": ("M2M100ForConditionalGeneration", "M2M100Config", dict(
        d_model=60, encoder_attention_heads=5, decoder_attention_heads=5, encoder_ffn_dim=76, decoder_ffn_dim=76,
        encoder_layers=2, decoder_layers=2, max_position_embeddings=64, activation_function="relu",
        scale_embedding=True)),
}


def max_abs_err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def convert_quietly(src, out):
    from pyxf.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(src, out, progress=False)


def nllb_tokenizer(directory):
    """A character-level NLLB tokenizer (BPE over Metaspace pieces) with three language tokens."""
    vocab = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3, "\u2581": 4}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab["\u2581" + c] = len(vocab)
    merges = [("\u2581", c) for c in string.ascii_lowercase]
    return transformers.NllbTokenizer(vocab=vocab, merges=merges, additional_special_tokens=["eng_Latn", "fra_Latn", "deu_Latn"])


def unigram_pieces():
    """A character-level unigram vocabulary over Metaspace pieces, fairseq's special tokens first."""
    pieces = [(c, -3.0) for c in string.ascii_lowercase] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *pieces]


def mbart25_tokenizer(directory):
    """mBART-25's tokenizer with its 25 language tokens."""
    return transformers.MBartTokenizer(vocab=unigram_pieces())


def mbart50_tokenizer(directory):
    """mBART-50's tokenizer with its 52 language tokens."""
    return transformers.MBart50Tokenizer(vocab=unigram_pieces())


def m2m100_tokenizer(directory):
    """M2M100's tokenizer: sentencepiece pieces mapped through a vocab.json whose ids are not
    sentencepiece's (fairseq's dictionary order), its 100 language tokens after them."""
    import json

    import sentencepiece
    from helpers import train_sentencepiece

    sp_path = train_sentencepiece(directory, unk_id=3, bos_id=0, eos_id=2, pad_id=1)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    vocab = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3}
    for i in reversed(range(sp.get_piece_size())):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    return transformers.M2M100Tokenizer(vocab_file=str(directory / "vocab.json"), spm_file=str(sp_path))


def build(family, root, vocab_size=97, tokenizer=None, generation=None, **overrides):
    """A tiny random checkpoint of `family` saved under root/hf (with `tokenizer` and the
    generation config settings `generation`); (model, pyxf model)."""
    model_class, config_class, kwargs = SPECS[family]
    settings = dict(vocab_size=vocab_size, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS,
                    decoder_start_token_id=EOS, forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0)
    config = getattr(transformers, config_class)(**{**settings, **kwargs, **overrides})
    torch.manual_seed(len(family))
    model = getattr(transformers, model_class)(config).eval()
    randomize(model, 1.5, 2.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # learned positions (BART, mBART)
                p.copy_(0.5 * torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.copy_(0.3 * torch.randn_like(model.final_logits_bias))
        # As nn.Embedding(padding_idx=...) makes it: pad is then never generated (logit 0), and
        # M2M100's positions, which skip pad tokens, stay those of a sequence without them.
        model.get_input_embeddings().weight[PAD].zero_()
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(root / "hf")
    if tokenizer is not None:
        tokenizer.save_pretrained(root / "hf")
    return model, pyxf.load(convert_quietly(root / "hf", root / "pyxf"))


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, tmp_path_factory):
    return request.param, *build(request.param, tmp_path_factory.mktemp(request.param))


def random_ids(rng, n, vocab_size):
    return rng.integers(EOS + 2, vocab_size, n).tolist()  # no bos, pad or eos inside


def test_config(pair):
    family, model, px = pair
    c = px.config
    assert c["family"] == family and c["position_offset"] == 2
    assert c["position"] == ("sinusoidal" if family == "m2m100" else "learned")
    assert c["norm_position"] == ("post" if family == "bart" else "pre")
    assert c["embed_norm"] == (family != "m2m100")
    assert c["languages"] is None and c["decoder_start_token_id"] == EOS
    assert px.max_source_length == px.max_target_length == 64  # max_position_embeddings, after the offset


def test_logits_match_transformers(pair):
    _, model, px = pair
    rng = np.random.default_rng(0)
    for src_len, tgt_len in ((1, 1), (6, 9), (33, 20), (64, 64)):
        src = random_ids(rng, src_len - 1, px.vocab_size) + [EOS]
        dec = [EOS] + random_ids(rng, tgt_len - 1, px.vocab_size)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0].numpy()
        got = px.logits(src, dec)
        assert got.shape == ref.shape and max_abs_err(got, ref) <= LOGITS_ATOL, (src_len, tgt_len)


def cut_at_eos(tokens):
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def reference_generate(model, src, beams, max_new_tokens, no_repeat_ngram_size=0, **kwargs):
    """transformers' generate for one source: (tokens after the start token, before the end token, score)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([src]), num_beams=beams, max_new_tokens=max_new_tokens,
                             do_sample=False, length_penalty=1.0, early_stopping=False,
                             no_repeat_ngram_size=no_repeat_ngram_size, output_scores=True,
                             return_dict_in_generate=True, **kwargs)
    score = float(out.sequences_scores[0]) if beams > 1 else None
    return cut_at_eos(out.sequences[0].tolist()[1:]), score


# Random models tend to repeat one token; banning repeated tokens (n-grams of 1) makes every step
# choose among fresh ones, so that the hypotheses take many different paths.
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("ngram", [0, 1])
def test_generation_matches_transformers(pair, beams, ngram):
    _, model, px = pair
    rng = np.random.default_rng(beams)
    sources = [random_ids(rng, n, px.vocab_size) + [EOS] for n in (2, 7, 15, 30)]
    expected = [reference_generate(model, src, beams, 12, no_repeat_ngram_size=ngram) for src in sources]
    options = dict(beam_size=beams, max_length=12, no_repeat_ngram_size=ngram)
    got = pyxf.translate(px, sources, return_scores=True, **options)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    if beams > 1:
        assert max_abs_err([s for _, s in got], [s for _, s in expected]) <= 1e-4
    # a batch gives what each source gives alone
    assert [pyxf.translate(px, [src], **options)[0] for src in sources] == [tokens for tokens, _ in got]


def test_float16_cache_beam_search_matches_transformers(pair):
    """The decoder's self-attention cache in float16 (beam search copies its pages between
    hypotheses): the same hypotheses as transformers in float32, scores within the rounding."""
    _, model, px = pair
    half = pyxf.load(px.path, kv_cache_dtype="float16")
    assert half.kv_cache_dtype == "float16" and px.kv_cache_dtype == "float32"
    rng = np.random.default_rng(7)
    sources = [random_ids(rng, n, px.vocab_size) + [EOS] for n in (3, 9, 20)]
    expected = [reference_generate(model, src, 3, 12, no_repeat_ngram_size=1) for src in sources]
    got = pyxf.translate(half, sources, beam_size=3, max_length=12, no_repeat_ngram_size=1, return_scores=True)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    assert max_abs_err([s for _, s in got], [s for _, s in expected]) <= 1e-3


def test_generation_settings_of_the_checkpoint(tmp_path):
    """bart-large-cnn's settings: a forced first token (bos) and a forced end token, applied as
    transformers' generate applies them from the checkpoint's generation config."""
    model, px = build("bart", tmp_path, generation=dict(forced_bos_token_id=BOS, forced_eos_token_id=EOS))
    assert px.config["forced_bos_token_id"] == BOS and px.config["forced_eos_token_id"] == EOS
    rng = np.random.default_rng(5)
    for beams in (1, 3):
        for n in (3, 11):
            src = random_ids(rng, n, px.vocab_size) + [EOS]
            expected, score = reference_generate(model, src, beams, 9, no_repeat_ngram_size=1)
            assert expected[0] == BOS
            tokens, got_score = pyxf.translate(px, src, beam_size=beams, max_length=9, no_repeat_ngram_size=1,
                                               return_scores=True)
            assert tokens == expected
            if beams > 1:
                assert abs(got_score - score) <= 1e-4


def test_bart_tokenizer_from_vocab_and_merges(tmp_path):
    """A BART checkpoint with only vocab.json + merges.txt (byte-level BPE): the converter makes
    the tokenizer.json, <s> ... </s> as BartTokenizer gives."""
    import json

    vocab = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3}
    for c in string.ascii_lowercase + "\u0120.,":  # \u0120: byte-level BPE's space
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab["\u0120" + c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    files = tmp_path / "files"
    files.mkdir()
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n" + "".join(f"\u0120 {c}\n" for c in string.ascii_lowercase))
    tokenizer = transformers.BartTokenizer.from_pretrained(str(files))
    model, _ = build("bart", tmp_path, len(vocab))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).write_bytes((files / name).read_bytes())
    px = pyxf.load(convert_quietly(tmp_path / "hf", tmp_path / "px"))
    assert px.config["tokenizer"] == "tokenizer.json"
    for text in TEXTS:
        assert px.tokenizer.encode(text) == tokenizer(text).input_ids
        expected, _ = reference_generate(model, tokenizer(text).input_ids, 1, 10, no_repeat_ngram_size=1)
        assert px.translate(text, beam_size=1, max_length=10, no_repeat_ngram_size=1) == \
            tokenizer.decode(expected, skip_special_tokens=True)


def test_fairseq_sinusoids_match_m2m100():
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    for dim in (60, 17):
        expected = M2M100SinusoidalPositionalEmbedding.get_embedding(70, dim).numpy()
        assert max_abs_err(sinusoidal_table(70, dim, "fairseq"), expected) <= 2e-5, dim
    with pytest.raises(ValueError, match="at least 4"):
        sinusoidal_table(10, 3, "fairseq")


# ---------------------------------------------------------------------------------------------
# language tokens, as transformers' tokenizers and generate() use them: an M2M100 model with an NLLB
# tokenizer (NLLB's checkpoints are M2M100 models: the source language before the text, the target
# forced as the first token), an mBART model with mBART-25's tokenizer (the source language after
# the end token, the target as the decoder start token) and with mBART-50's (as NLLB), and M2M100
# with its own tokenizer (language tokens after vocab.json's ids)

MULTILINGUAL = {
    # name: (family, tokenizer, (default, other, third) language codes, source slot, generate()'s argument)
    "nllb": ("m2m100", nllb_tokenizer, ("eng_Latn", "fra_Latn", "deu_Latn"), "prefix", "forced_bos_token_id"),
    "mbart25": ("mbart", mbart25_tokenizer, ("en_XX", "fr_XX", "de_DE"), "suffix", "decoder_start_token_id"),
    "mbart50": ("mbart", mbart50_tokenizer, ("en_XX", "fr_XX", "de_DE"), "prefix", "forced_bos_token_id"),
    "m2m100": ("m2m100", m2m100_tokenizer, ("en", "fr", "de"), "prefix", "forced_bos_token_id"),
}
@pytest.fixture(scope="module", params=sorted(MULTILINGUAL))
def multilingual(request, tmp_path_factory):
    family, make_tokenizer, codes, slot, target_argument = MULTILINGUAL[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = make_tokenizer(root)
    # M2M100's language tokens (and 8 "made-up words") follow the tokenizer's vocabulary
    vocab_size = len(tokenizer) if family != "m2m100" or request.param == "nllb" else tokenizer.vocab_size + 108
    model, px = build(family, root, vocab_size, tokenizer)
    yield model, tokenizer, px, codes, slot, target_argument
    tokenizer.src_lang = codes[0]


def language_id(tokenizer, code):
    """transformers' id of a language code (M2M100: of its "__code__" token)."""
    if isinstance(tokenizer, transformers.M2M100Tokenizer):
        return tokenizer.get_lang_id(code)
    return tokenizer.convert_tokens_to_ids(code)


def decoded(tokenizer, ids):
    """transformers' text of ids without their language tokens (transformers 5's M2M100Tokenizer
    does not count them as special tokens, and writes them out)."""
    return tokenizer.decode([i for i in ids if i != language_id(tokenizer, tokenizer.src_lang) and
                             i not in getattr(tokenizer, "lang_code_to_id", {}).values()], skip_special_tokens=True)


def test_language_tokens_are_read_from_the_tokenizer(multilingual):
    _, tokenizer, px, codes, slot, target_argument = multilingual
    languages = px.config["languages"]
    assert {code: languages["tokens"][code] for code in codes} == {code: language_id(tokenizer, code) for code in codes}
    if isinstance(tokenizer, transformers.M2M100Tokenizer):  # codes also as their tokens
        assert pyxf.seq2seq.language_token(px, "__fr__", "target_lang") == language_id(tokenizer, "fr")
    assert languages["source"] == slot
    assert languages["target"] == ("forced_bos" if target_argument == "forced_bos_token_id" else "decoder_start")
    for code in (None, *codes[1:]):
        tokenizer.src_lang = code or codes[0]
        for text in TEXTS:
            ids = px.tokenizer.encode(text) if code is None else pyxf.seq2seq.with_source_language(
                px, px.tokenizer.encode(text, add_special_tokens=False), code)
            assert ids == tokenizer(text).input_ids


@pytest.mark.parametrize("beams", [1, 3])
def test_translation_languages_match_transformers(multilingual, beams):
    model, tokenizer, px, (first, second, third), _, target_argument = multilingual
    for source_lang, target_lang in ((second, third), (third, first), (None, second)):
        tokenizer.src_lang = source_lang or first
        target = language_id(tokenizer, target_lang)
        for text in TEXTS:
            expected, score = reference_generate(model, tokenizer(text).input_ids, beams, 10, no_repeat_ngram_size=1,
                                                 **{target_argument: target})
            options = dict(beam_size=beams, max_length=10, no_repeat_ngram_size=1, source_lang=source_lang,
                           target_lang=target_lang)
            result = px.translate(text, return_details=True, **options)
            assert result.token_ids == expected, (source_lang, target_lang, text)
            if target_argument == "forced_bos_token_id":
                assert expected[0] == target
            assert result.text == decoded(tokenizer, expected)
            if beams > 1:  # a forced token counts in the length, as in transformers
                assert abs(px.translate(text, return_scores=True, **options)[1] - score) <= 1e-4


def test_truncation_keeps_the_special_tokens(multilingual):
    """truncate=True cuts the text and keeps the language and end tokens, as transformers' truncation."""
    _, tokenizer, px, (_, second, third), _, _ = multilingual
    tokenizer.src_lang = second
    long_text = " ".join(["hello world"] * 20)
    ids = tokenizer(long_text, truncation=True, max_length=px.max_source_length).input_ids
    assert len(tokenizer(long_text).input_ids) > len(ids) == px.max_source_length
    options = dict(beam_size=1, max_length=6, target_lang=third)
    assert px.translate(long_text, truncate=True, source_lang=second, **options) == \
        px.tokenizer.decode(px.translate(ids, **options))


def test_language_errors(multilingual, pair):
    px, (first, second, _) = multilingual[2], multilingual[3]
    with pytest.raises(ValueError, match="unknown target_lang 'klingon'; this model's languages: "):
        px.translate("hello", target_lang="klingon")
    with pytest.raises(ValueError, match=f"did you mean '{second}'"):
        px.translate("hello", target_lang=second.upper())
    with pytest.raises(ValueError, match="unknown source_lang"):
        px.translate("hello", source_lang="french", target_lang=second)
    with pytest.raises(ValueError, match="source_lang applies to text"):
        px.translate([4, 5, EOS], source_lang=first)
    _, _, plain = pair
    with pytest.raises(ValueError, match="not multilingual"):
        pyxf.translate(plain, [[4, 5, EOS]], target_lang=second)


def test_cli_target_lang(multilingual, capsys):
    from pyxf.cli import main

    model, tokenizer, px, (first, second, third), _, target_argument = multilingual
    main(["translate", "--model", str(px.path), "--source-lang", second, "--target-lang", third, "--beam-size", "1",
          "--max-length", "8", TEXTS[0]])
    tokenizer.src_lang = second
    expected, _ = reference_generate(model, tokenizer(TEXTS[0]).input_ids, 1, 8,
                                     **{target_argument: language_id(tokenizer, third)})
    assert capsys.readouterr().out == decoded(tokenizer, expected) + "\n"
