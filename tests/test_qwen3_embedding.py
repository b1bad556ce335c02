"""Qwen3-Embedding: a Qwen3 decoder used as an encoder (causal attention, RoPE, q/k norms, the last
token's state, L2-normalized, with instruction prompts). A tiny random Qwen3 saved as a
sentence-transformers model directory (modules.json: Transformer, Pooling(lasttoken), Normalize;
prompts in config_sentence_transformers.json), converted with pyxf.convert, against
sentence-transformers' own encode with left and right padding, with and without a prompt, through
Model.encode and `pyxf embed`."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

import helpers

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
TEXTS = ["hello world", "the cat sat on the mat, then it slept", "a", "what is the capital of France? Paris is.",
         "hello hello hello hello hello hello hello hello hello hello hello hello hello"]
EOS_TEXT = "<|endoftext|>"


def qwen_like_tokenizer():
    """A byte-level BPE tokenizer whose post-processor appends <|endoftext|> to every text, as
    Qwen3-Embedding's does (the last token, whose state is the embedding, is always that one)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set("".join(TEXTS) + QUERY_PROMPT + "abcdefghijklmnopqrstuvwxyz") - {" ", "\n"}) + ["Ġ", "Ċ"]
    vocab = {EOS_TEXT: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    merges = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("he", "ll"), ("t", "he"), ("Ġ", "the")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TEXT, special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TEXT}", pair=f"$A {EOS_TEXT} $B {EOS_TEXT}", special_tokens=[(EOS_TEXT, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TEXT, pad_token=EOS_TEXT,
                                   padding_side="left")


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    """(sentence-transformers model, pyxf model directory)."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    from pyxf.convert import convert

    root = tmp_path_factory.mktemp("qwen3-embedding")
    tokenizer = qwen_like_tokenizer()
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3Model._from_config(config, attn_implementation="eager").float().eval()
    helpers._init_weights(model, seed=3)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    transformer = models.Transformer(str(root / "hf"), max_seq_length=128)
    st = SentenceTransformer(
        modules=[transformer, models.Pooling(64, pooling_mode="lasttoken"), models.Normalize()],
        prompts={"query": QUERY_PROMPT, "document": ""}, device="cpu")
    st.save(str(root / "st"))
    st = SentenceTransformer(str(root / "st"), device="cpu")  # as users load it: from the saved directory
    return st, convert(root / "st", root / "pyxf", progress=False)


def st_encode(st, texts, padding_side, **kwargs):
    st[0].tokenizer.padding_side = padding_side
    return st.encode(texts, batch_size=len(texts), convert_to_numpy=True, **kwargs)


def assert_same_embeddings(got, expected):
    assert got.shape == expected.shape and got.dtype == np.float32
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.99999, cosine
    assert helpers.max_abs_err(got, expected) <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_converted_as_a_causal_encoder(embedding_model):
    helpers.require_core()
    import pyxf

    model = pyxf.load(embedding_model[1])
    c = model.config
    assert model.is_encoder and c["family"] == "llama" and c["architecture"] == "encoder"
    assert c["causal"] is True and c["position"] == "rope" and c["qk_norm"] is True
    assert c["pooling"] == {"mode": "lasttoken", "normalize": True}
    assert c["prompts"] == {"query": QUERY_PROMPT, "document": ""} and c["default_prompt_name"] is None
    assert c["max_length"] == 128
    # The tokenizer appends <|endoftext|> as sentence-transformers' does: that token's state is pooled.
    assert model.tokenizer.encode_for_encoder(["hello"])[0][0][-1] == 0


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embeddings_match_sentence_transformers(embedding_model, padding_side):
    """Texts of different lengths in one batch (sentence-transformers pads them on either side; pyxf
    packs them without padding)."""
    helpers.require_core()
    import pyxf

    st, path = embedding_model
    model = pyxf.load(path)
    expected = st_encode(st, TEXTS, padding_side)
    batched = model.encode(TEXTS)
    assert_same_embeddings(batched, expected)
    one_at_a_time = np.stack([model.encode(text) for text in TEXTS])
    assert helpers.max_abs_err(batched, one_at_a_time) <= 1e-6


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_query_prompt_matches_sentence_transformers(embedding_model, padding_side):
    helpers.require_core()
    import pyxf

    st, path = embedding_model
    model = pyxf.load(path)
    expected = st_encode(st, TEXTS, padding_side, prompt_name="query")
    assert_same_embeddings(model.encode(TEXTS, prompt_name="query"), expected)
    assert_same_embeddings(model.encode(TEXTS, prompt=QUERY_PROMPT), expected)
    # The prompt matters: without it the vectors differ.
    assert helpers.max_abs_err(model.encode(TEXTS), expected) > 0.01
    with pytest.raises(ValueError, match="'passage' is not one of this model's prompts"):
        model.encode(TEXTS, prompt_name="passage")
    with pytest.raises(ValueError, match="not both"):
        model.encode(TEXTS, prompt_name="query", prompt="x")
    with pytest.raises(ValueError, match="applies to texts"):
        model.encode([[5, 6, 0]], prompt_name="query")


def test_embed_command_with_a_prompt(embedding_model, capsys):
    helpers.require_core()
    from pyxf.cli import main

    st, path = embedding_model
    assert main(["embed", "--model", str(path), "--prompt-name", "query", *TEXTS[:2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == TEXTS[:2]
    got = np.array([line["embedding"] for line in lines], dtype=np.float32)
    assert_same_embeddings(got, st_encode(st, TEXTS[:2], "left", prompt_name="query"))


def test_embedding_model_is_refused_where_pyxf_would_differ(tmp_path, embedding_model):
    """A sliding window (encoders run full attention) and a pooling that leaves the prompt's tokens
    out (include_prompt=False, for mean pooling) are errors, not ignored."""
    helpers.require_core()
    import shutil

    import pyxf
    from pyxf.convert import convert

    _, path = embedding_model
    st_dir = path.parent / "st"
    windowed = tmp_path / "windowed"
    shutil.copytree(st_dir, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "layer_types"}  # every layer windowed, as v4 configs say it
    (windowed / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 16,
                                                      "max_window_layers": 0}))
    with pytest.raises(ValueError, match="sliding attention window"):
        convert(windowed, tmp_path / "out1", progress=False)

    masked = tmp_path / "masked"
    shutil.copytree(st_dir, masked)
    pooling = json.loads((masked / "1_Pooling" / "config.json").read_text())
    pooling.update({"pooling_mode": "mean", "include_prompt": False})
    (masked / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    model = pyxf.load(convert(masked, tmp_path / "out2", progress=False))
    assert model.config["pooling"] == {"mode": "mean", "normalize": True, "include_prompt": False}
    model.encode(TEXTS)  # without a prompt, nothing is left out
    with pytest.raises(ValueError, match="include_prompt"):
        model.encode(TEXTS, prompt_name="query")
