"""Llama-family parity: tiny random LlamaForCausalLM / Qwen2ForCausalLM checkpoints saved with
save_pretrained, converted with pyxf.convert and loaded with pyxf.load, against transformers
(float32, eager attention) on the same token ids.

The specs (tests/helpers.py LLAMA_SPECS) cover head dims 24/32/64/80/128, MQA, GQA and MHA, hidden
sizes that are not a multiple of 16, linear and llama3 RoPE scaling, Qwen2's qkv bias and Llama's
attention/MLP biases, SiLU, tanh-GELU and ReLU gates, and tied and untied heads.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers
from helpers import LLAMA_SPECS

SPECS = sorted(LLAMA_SPECS)


pair = helpers.parity_pair(SPECS)
spec_seed = helpers.spec_seed


@pytest.mark.parametrize("length", [1, 7, 129])
def test_prefill_logits_match_transformers(pair, length):
    hf, px = pair
    helpers.check_prefill(hf, px, length, seed=length + spec_seed(pair))


def test_long_prefill_logits_match_transformers(pair):
    """500 positions (of 512): RoPE angles grow with the position, so a frequency that differs from
    transformers' in its last bits shows up here first."""
    hf, px = pair
    helpers.check_prefill(hf, px, 500, seed=500 + spec_seed(pair))


def test_incremental_decode_matches_transformers(pair):
    hf, px = pair
    helpers.check_incremental_decode(hf, px, prompt_length=7, seed=spec_seed(pair))


@pytest.mark.parametrize("name", ["llama_mqa_d32", "llama_gqa_d80_llama3_bias"])
def test_decode_after_long_prompt(tiny_models, name):
    """32 decode steps after a 129-token prompt: positions past the llama3 spec's
    original_max_position_embeddings (64), keys spanning several attention tiles."""
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models(name)
    helpers.check_incremental_decode(hf, pyxf.load(model_dir), prompt_length=129, seed=3)


def test_kv_cache_equals_full_recomputation(pair):
    helpers.check_cache_equals_recompute(pair[1], seed=spec_seed(pair))


def test_greedy_matches_transformers_generate(pair):
    hf, px = pair
    for n in (1, 6, 20):
        helpers.check_greedy(hf, px, helpers.random_ids(px.vocab_size, n, seed=100 + n))


def test_stop_token_matches_transformers_eos(pair):
    hf, px = pair
    helpers.check_stop_token(hf, px, helpers.random_ids(px.vocab_size, 9, seed=9))


def test_batched_generate_equals_one_at_a_time(pair):
    hf, px = pair
    helpers.check_batched_generate(hf, px, seed=spec_seed(pair))


def test_converted_config_describes_the_model(pair):
    """What the converter wrote is what transformers built (a wrong field would make every other
    test here fail for a reason that is hard to see)."""
    hf, px = pair
    c, h = px.config, hf.config
    assert c["family"] == "llama"
    assert (c["num_layers"], c["hidden_size"], c["intermediate_size"]) == (
        h.num_hidden_layers, h.hidden_size, h.intermediate_size)
    assert (c["num_heads"], c["num_kv_heads"], c["head_dim"]) == (
        h.num_attention_heads, h.num_key_value_heads, h.head_dim)
    assert c["tie_word_embeddings"] == h.tie_word_embeddings
    assert c["eos_token_id"] == [helpers.EOS]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights(tiny_models, dtype):
    """A checkpoint converted to float16/bfloat16 computes what transformers computes in float32
    with its weights rounded to that dtype."""
    helpers.require_core()
    import pyxf

    from pyxf import _core

    hf, model_dir = tiny_models("llama_gqa_d80_llama3_bias", dtype=dtype)
    px = pyxf.load(model_dir, kv_cache_dtype="float32")  # the weights alone: no rounding of the cache
    assert px.config["dtype"] == dtype
    reference = helpers.half_precision_reference(hf, dtype)
    ids = helpers.random_ids(px.vocab_size, 33, seed=33)
    expected = helpers.hf_logits(reference, ids)
    # avx512_bf16 / avx512_amx also round the activations of bf16 products (tests/test_bf16.py bounds that); the
    # widening tables compute exactly this.
    widening = helpers.widening_isas(_core.info()["isas"])[-1]
    before = _core.get_isa()
    try:
        _core.set_isa(widening)
        err = helpers.max_abs_err(px.logits(ids), expected)
        _core.set_isa(_core.info()["isas"][-1])
        err_best = helpers.max_abs_err(px.logits(ids), expected)
    finally:
        _core.set_isa(before)
    assert err <= helpers.LOGITS_ATOL, f"{dtype}: max abs logit error {err:.3g}"
    # Rounding the weights does change the logits: the comparison above is not vacuous.
    weights_rounding = helpers.max_abs_err(helpers.hf_logits(hf, ids), expected)
    assert weights_rounding > 10 * err
    print(f"\n{dtype}: error {err:.3g} ({widening}), {err_best:.3g} (best ISA); rounding the weights moves {weights_rounding:.3g}")
    assert err_best <= (helpers.LOGITS_ATOL if dtype == "float16" else weights_rounding)


def test_logits_are_deterministic_across_threads(tiny_models):
    """One thread and several give the same logits (up to float32 rounding)."""
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models("llama_mqa_d32")
    px = pyxf.load(model_dir)
    ids = helpers.random_ids(px.vocab_size, 129, seed=1)
    before = pyxf.get_num_threads()
    try:
        pyxf.set_num_threads(1)
        one = px.logits(ids)
        pyxf.set_num_threads(max(2, before))
        many = px.logits(ids)
    finally:
        pyxf.set_num_threads(before)
    assert helpers.max_abs_err(one, many) <= 1e-5
    assert helpers.max_abs_err(one, helpers.hf_logits(hf, ids)) <= helpers.LOGITS_ATOL
    np.testing.assert_array_equal(np.argmax(one, -1), np.argmax(many, -1))


def test_sliding_window_is_honoured(tiny_models):
    """A Mistral checkpoint whose sliding window (16) is shorter than its positions: every layer
    attends to the last 16 positions, in prefill and in decode, as transformers' does."""
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models("mistral_window16")
    model = pyxf.load(model_dir)
    assert model.context_length == 512
    ids = [helpers.BOS] + helpers.random_ids(model.vocab_size, 59, seed=3)
    assert helpers.max_abs_err(model.logits(ids), helpers.hf_logits(hf, ids)) <= helpers.LOGITS_ATOL
    helpers.check_incremental_decode(hf, model, prompt_length=7, seed=3)


@pytest.mark.parametrize("extra,window", [
    ({}, None),  # Qwen2's use_sliding_window defaults to false
    ({"use_sliding_window": True}, None),  # max_window_layers (28) >= the 4 layers: none windowed
    ({"use_sliding_window": True, "max_window_layers": 0}, 64),  # every layer windowed
    ({"use_sliding_window": True, "max_window_layers": 2}, ValueError),  # the upper half only
])
def test_qwen2_sliding_window_layers(extra, window):
    """Which Qwen2 layers transformers windows (those from max_window_layers on, with
    use_sliding_window) is what pyxf's config says, or the conversion is refused."""
    from pyxf.convert.families import normalized_config

    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=10, hidden_size=8,
              num_attention_heads=2, num_hidden_layers=4, intermediate_size=8, max_position_embeddings=4096,
              sliding_window=64, **extra)
    if window is ValueError:
        with pytest.raises(ValueError, match="max_window_layers"):
            normalized_config(hf)
    else:
        config = normalized_config(hf)
        assert (config["sliding_window"], config["sliding_window_pattern"]) == (window, None)
