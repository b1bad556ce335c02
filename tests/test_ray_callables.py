"""pyxf.ray without a cluster: the Ray Data callables called on batches in this process (dicts of
numpy arrays and pandas DataFrames, as Ray Data hands them over), their errors, process_memory, and
serve_app's / build_app's arguments. The cluster tests are in test_ray.py."""

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pd = pytest.importorskip("pandas")

import pyxf  # noqa: E402
from pyxf import hub  # noqa: E402
from pyxf.ray import Embedder, Generator, Translator, build_app, process_memory, serve_app  # noqa: E402

TEXTS = ["a cat sleeps on the mat", "the river runs under the old bridge", "music at night"]


@pytest.fixture(scope="module")
def embedder():
    return Embedder(str(hub.minilm_model_path()))


@pytest.fixture(scope="module")
def generator():
    return Generator(str(hub.default_model_path()), max_new_tokens=6)


def test_embedder_on_numpy_and_pandas_batches(embedder):
    expected = embedder.model.encode(TEXTS)
    out = embedder({"text": np.array(TEXTS), "id": np.arange(3)})
    assert list(out["id"]) == [0, 1, 2]
    np.testing.assert_array_equal(out["embedding"], expected)
    frame = embedder(pd.DataFrame({"text": TEXTS}))
    np.testing.assert_array_equal(np.stack(frame["embedding"]), expected)
    empty = embedder({"text": np.array([], dtype=str)})
    assert empty["embedding"].shape == (0, embedder.model.config["hidden_size"])


def test_embedder_options_and_errors(embedder):
    custom = Embedder(str(embedder.model.path), column="body", output_column="vector", pooling="cls", normalize=False)
    np.testing.assert_array_equal(custom({"body": np.array(TEXTS)})["vector"],
                                  embedder.model.encode(TEXTS, pooling="cls", normalize=False))
    with pytest.raises(ValueError, match="no 'text' column"):
        embedder({"body": np.array(TEXTS)})
    with pytest.raises(ValueError, match="needs an encoder model"):
        Embedder(str(hub.default_model_path()))


def test_generator_prompts_and_messages(generator):
    prompts = ["The capital of France is", "One, two,"]
    out = generator({"prompt": np.array(prompts)})
    expected = pyxf.generate(generator.model, prompts, max_new_tokens=6, return_details=True)
    assert list(out["text"]) == [e.text for e in expected]
    assert list(out["finish_reason"]) == [e.finish_reason for e in expected]
    assert list(out["completion_tokens"]) == [e.usage.completion_tokens for e in expected]
    # Arrow hands a list-of-structs column over as arrays of dicts.
    conversation = [{"role": "user", "content": "Say hi"}]
    messages = np.empty(1, dtype=object)
    messages[0] = np.array(conversation, dtype=object)
    assert list(generator({"messages": messages})["text"]) == [
        pyxf.generate(generator.model, messages=conversation, max_new_tokens=6)]
    with pytest.raises(ValueError, match="'prompt' or a 'messages' column"):
        generator({"question": np.array(prompts)})


def test_translator_needs_a_translation_model():
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        Translator(str(hub.minilm_model_path()))


def test_process_memory_counts_the_mapped_weights(embedder):
    usage = process_memory(files_under=embedder.model.path)
    assert 0 < usage["files_rss"] <= usage["rss"]
    assert 0 < usage["files_pss"] <= usage["files_rss"]
    assert usage["pss"] <= usage["rss"]
    assert embedder.memory()["weights_rss"] == pytest.approx(usage["files_rss"], rel=0.1)


def test_serve_app_arguments():
    assert serve_app(["chat=models/x"], replicas=2) is not None
    assert serve_app(replicas=4, autoscaling={"min_replicas": 2, "target_ongoing_requests": 8}) is not None
    for bad in (dict(replicas=0), dict(replicas=2.5), dict(threads=0),
                dict(replicas=2, autoscaling={"min_replicas": 3})):
        with pytest.raises(ValueError):
            serve_app(**bad)
    assert build_app({"models": "chat=models/x,embed=models/y", "replicas": "2", "kv_cache_mb": "256"}) is not None
    with pytest.raises(ValueError):
        build_app({"replicas": "0"})
