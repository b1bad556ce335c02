"""Phi-3 family parity: tiny random Phi3ForCausalLM checkpoints (fused qkv_proj / gate_up_proj, partial
rotary, LongRoPE with short and long factors) saved with save_pretrained, converted with
pyxf.convert, against transformers (float32, eager attention); and a phi3 GGUF laid out as
llama.cpp's converter writes it.

LongRoPE: transformers uses the short factors while a forward pass stays within
original_max_position_embeddings (128 here) and the long ones beyond. pyxf fixes the factors at
load by the context it is loaded for (docs/DESIGN.md, "LongRoPE"): by default that context is 128
(short factors: transformers' results for every sequence pyxf then accepts); with a longer
context_length the long factors, which are transformers' for sequences longer than 128.
"""

import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers
from helpers import PHI3_SPECS

SPECS = sorted(PHI3_SPECS)
LONGROPE = sorted(name for name in SPECS if "longrope" in name)
ORIGINAL_CONTEXT = 128


@pytest.fixture(scope="module")
def loaded():
    """(spec, context_length) -> (transformers model, pyxf model), loaded once per module."""
    return {}


def load_pair(tiny_models, loaded, name, context_length=None):
    helpers.require_core()
    import pyxf

    if (name, context_length) not in loaded:
        hf, model_dir = tiny_models(name)
        loaded[name, context_length] = (hf, pyxf.load(model_dir, context_length=context_length))
    return loaded[name, context_length]


@pytest.fixture(params=SPECS)
def pair(request, tiny_models, loaded):
    return load_pair(tiny_models, loaded, request.param)


@pytest.fixture(params=LONGROPE)
def long_pair(request, tiny_models, loaded):
    """A LongRoPE model loaded for 512 positions: its long factors."""
    return load_pair(tiny_models, loaded, request.param, context_length=512)


def test_converted_config_describes_the_model(pair):
    hf, px = pair
    c, h = px.config, hf.config
    assert c["family"] == "phi3"
    assert (c["num_layers"], c["hidden_size"], c["intermediate_size"]) == (
        h.num_hidden_layers, h.hidden_size, h.intermediate_size)
    assert (c["num_heads"], c["num_kv_heads"], c["head_dim"]) == (
        h.num_attention_heads, h.num_key_value_heads, h.hidden_size // h.num_attention_heads)
    assert c["partial_rotary_factor"] == h.rope_parameters.get("partial_rotary_factor", 1.0)
    assert c["tie_word_embeddings"] == h.tie_word_embeddings
    if "longrope" in px.path.name:
        assert c["rope_scaling"]["rope_type"] == "longrope"
        assert c["rope_scaling"]["original_max_position_embeddings"] == ORIGINAL_CONTEXT
        assert px.context_length == ORIGINAL_CONTEXT  # the short factors' range, by default
    else:
        assert c["rope_scaling"] is None and px.context_length == h.max_position_embeddings


@pytest.mark.parametrize("length", [1, 7, ORIGINAL_CONTEXT])
def test_prefill_logits_match_transformers(pair, length):
    hf, px = pair
    helpers.check_prefill(hf, px, length, seed=length + px.vocab_size)


def test_incremental_decode_matches_transformers(pair):
    hf, px = pair
    helpers.check_incremental_decode(hf, px, prompt_length=7, seed=px.vocab_size)


def test_greedy_matches_transformers_generate(pair):
    hf, px = pair
    for n in (1, 20):
        helpers.check_greedy(hf, px, helpers.random_ids(px.vocab_size, n, seed=100 + n))


def test_batched_generate_equals_one_at_a_time(pair):
    hf, px = pair
    helpers.check_batched_generate(hf, px, seed=px.vocab_size)


def test_long_context_prefill_uses_the_long_factors(long_pair):
    """Loaded for 512 positions, a LongRoPE model computes transformers' logits for a sequence past
    the original 128 positions (transformers' long factors), up to 500 positions."""
    hf, px = long_pair
    assert px.context_length == 512
    for length in (ORIGINAL_CONTEXT + 1, 500):
        helpers.check_prefill(hf, px, length, seed=length)


def test_long_context_decode_and_greedy(long_pair):
    """A 140-token prompt and 32 decode steps: every transformers forward pass is past 128 positions,
    so it runs the long factors throughout, as pyxf does."""
    hf, px = long_pair
    helpers.check_incremental_decode(hf, px, prompt_length=140, seed=3)
    helpers.check_greedy(hf, px, helpers.random_ids(px.vocab_size, 140, seed=140))


def test_context_picks_the_factors(tiny_models, loaded):
    """The factors follow the context the model is loaded for: within the original context the short
    ones (so a short sequence gives transformers' logits), beyond it the long ones (so the same short
    sequence no longer does: transformers would switch back to the short factors for it)."""
    import pyxf

    hf, short = load_pair(tiny_models, loaded, "phi3_longrope_partial_mqa")
    _, long = load_pair(tiny_models, loaded, "phi3_longrope_partial_mqa", context_length=512)
    ids = helpers.random_ids(short.vocab_size, 40, seed=40)
    expected = helpers.hf_logits(hf, ids)
    assert helpers.max_abs_err(short.logits(ids), expected) <= helpers.LOGITS_ATOL
    assert helpers.max_abs_err(long.logits(ids), expected) > 0.01
    with pytest.raises(ValueError, match="exceed the context length 128"):
        short.logits(helpers.random_ids(short.vocab_size, ORIGINAL_CONTEXT + 1, seed=1))
    with pytest.raises(ValueError):
        pyxf.generate(short, ids + ids + ids, max_new_tokens=16)  # 120 + 16 tokens leave the 128


@pytest.mark.parametrize("name", LONGROPE)
def test_longrope_frequencies_match_transformers(name):
    """rope_parameters for a context within and beyond the original one: transformers' short and long
    inverse frequencies (its init function at those lengths) and its attention factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pyxf.convert.families import normalized_config
    from pyxf.rope import rope_parameters

    hf_config = helpers._config(name)
    config = normalized_config(hf_config.to_dict())
    for context, seq_len in ((ORIGINAL_CONTEXT, None), (ORIGINAL_CONTEXT + 1, ORIGINAL_CONTEXT + 1)):
        expected, expected_scaling = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=seq_len)
        inv_freq, scaling = rope_parameters(config, context)
        np.testing.assert_array_equal(inv_freq, expected.numpy())
        assert scaling == pytest.approx(expected_scaling, rel=1e-12)


def test_phi3_configs_as_published():
    """Phi-3 checkpoints' config.json as published (transformers v4 keys): LongRoPE spelled "su" or
    "longrope" in rope_scaling with original_max_position_embeddings beside it, and Phi-3-mini-4k's
    sliding window of 2047 (of 4096 positions), which limits the context as Mistral's does."""
    from pyxf.convert.families import normalized_config
    from pyxf.rope import rope_parameters

    base = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "intermediate_size": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": 32000}
    mini_4k = normalized_config({**base, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                                 "rope_scaling": None, "sliding_window": 2047})
    assert mini_4k["family"] == "phi3" and mini_4k["sliding_window"] == 2047 and mini_4k["rope_scaling"] is None
    factors = {"short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    for spelled in ("su", "longrope"):
        long = normalized_config({**base, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                  "rope_scaling": {"type": spelled, **factors}, "sliding_window": 262144})
        assert long["rope_scaling"] == {"rope_type": "longrope", **factors, "original_max_position_embeddings": 4096}
        assert long["sliding_window"] is None  # longer than the context: full attention
    phi4_mini = normalized_config({**base, "max_position_embeddings": 131072, "partial_rotary_factor": 0.75,
                                   "num_attention_heads": 24, "num_key_value_heads": 8,
                                   "original_max_position_embeddings": 4096, "tie_word_embeddings": True,
                                   "rope_scaling": {"type": "longrope", **factors}, "sliding_window": 262144})
    assert phi4_mini["partial_rotary_factor"] == 0.75 and phi4_mini["head_dim"] == 128
    assert rope_parameters(phi4_mini, 4096)[0].shape == (48,)  # 96 of 128 dimensions rotate


def write_phi3_gguf(path, hf, original_context=True):
    """A phi3 GGUF as llama.cpp's converter writes one (Phi3MiniModel): the fused attn_qkv and ffn_up
    (gate rows, then up rows) as they are, the LongRoPE factors as rope_factors_short / long tensors
    with the original context and the attention factor in the metadata, rope.dimension_count the
    rotated dimensions of a head."""
    import gguf

    c = hf.config
    state = {name: t.detach().numpy() for name, t in hf.state_dict().items()}
    scaling = c.rope_parameters
    heads, hidden = c.num_attention_heads, c.hidden_size
    w = gguf.GGUFWriter(path, arch="phi3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    if original_context:
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(int(scaling.get("partial_rotary_factor", 1.0) * hidden) // heads)
    w.add_rope_freq_base(scaling["rope_theta"])
    w.add_sliding_window(c.sliding_window or 0)  # 0: none (Phi-4's)
    w.add_vocab_size(c.vocab_size)
    if scaling["rope_type"] == "longrope":
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)))
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", state["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", state[f"model.layers.{i}.{theirs}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_phi3_gguf_runs_like_transformers(tiny_models, tmp_path):
    """A phi3 GGUF of the Phi-4-mini-shaped model (partial rotary, LongRoPE, tied head), converted:
    transformers' logits within the original context (short factors) and, loaded for 512
    positions, beyond it (long factors)."""
    pytest.importorskip("gguf")
    helpers.require_core()
    import pyxf
    from pyxf.convert import convert

    hf, _ = tiny_models("phi3_longrope_partial_mqa")
    write_phi3_gguf(tmp_path / "phi3.gguf", hf)
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = convert(tmp_path / "phi3.gguf", tmp_path / "out", progress=False)
    short = pyxf.load(out)
    assert short.config["family"] == "phi3" and short.config["partial_rotary_factor"] == 0.75
    assert short.config["sliding_window"] is None and short.context_length == ORIGINAL_CONTEXT
    ids = helpers.random_ids(short.vocab_size, 60, seed=60)
    assert helpers.max_abs_err(short.logits(ids), helpers.hf_logits(hf, ids)) <= helpers.LOGITS_ATOL
    long = pyxf.load(out, context_length=512)
    ids = helpers.random_ids(short.vocab_size, 200, seed=200)
    assert helpers.max_abs_err(long.logits(ids), helpers.hf_logits(hf, ids)) <= helpers.LOGITS_ATOL

    # Factors without the context they switch at cannot be honoured: an error, not a guess.
    write_phi3_gguf(tmp_path / "no-original.gguf", hf, original_context=False)
    with pytest.raises(ValueError, match="original_context_length"):
        convert(tmp_path / "no-original.gguf", tmp_path / "out2", progress=False)


def test_malformed_longrope_is_a_value_error(tiny_models, tmp_path):
    """A converted config.json whose LongRoPE fields are wrong: ValueError naming them at load."""
    helpers.require_core()
    import json
    import shutil

    import pyxf

    _, model_dir = tiny_models("phi3_longrope_partial_mqa")
    for change, match in ((dict(original_max_position_embeddings="4k"), "original_max_position_embeddings"),
                          (dict(long_factor=[1.0, 2.0]), "long_factor must list 15 numbers")):
        broken = tmp_path / f"broken{len(change)}{match[:4]}"
        shutil.copytree(model_dir, broken)
        config = json.loads((broken / "config.json").read_text())
        config["rope_scaling"].update(change)
        (broken / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            pyxf.load(broken)


def test_sliding_window_is_honoured(tiny_models, tmp_path):
    """Phi-3-mini-4k's sliding window, in small (16 of 512 positions), from the HF checkpoint and from
    its GGUF: every layer attends to the last 16 positions, in prefill and in decode, as transformers'
    does, over the whole context."""
    helpers.require_core()
    import pyxf
    from pyxf.convert import convert

    hf, model_dir = tiny_models("phi3_window16")
    write_phi3_gguf(tmp_path / "window.gguf", hf)
    with pytest.warns(UserWarning, match="no tokenizer"):
        from_gguf = convert(tmp_path / "window.gguf", tmp_path / "out", progress=False)
    ids = helpers.random_ids(hf.config.vocab_size, 48, seed=16)
    expected = helpers.hf_logits(hf, ids)
    for path in (model_dir, from_gguf):
        model = pyxf.load(path)
        assert model.config["sliding_window"] == 16 and model.context_length == 512
        assert helpers.max_abs_err(model.logits(ids), expected) <= helpers.LOGITS_ATOL
        helpers.check_incremental_decode(hf, model, prompt_length=9, seed=16, steps=14)
