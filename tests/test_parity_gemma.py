"""Gemma 2 / Gemma 3 parity: tiny random Gemma2ForCausalLM / Gemma3ForCausalLM checkpoints
(tests/helpers.py GEMMA_SPECS: sliding windows shorter than the sequences, Gemma 2's soft caps,
Gemma 3's q/k norms and two RoPE bases, GQA and MQA, tied and untied heads) converted with
pyxf.convert, against transformers (float32, eager attention) on the same token ids; a tiny gemma2
GGUF file as llama.cpp lays it out; and the configs of both transformers versions' spellings.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers
from helpers import GEMMA_SPECS

SPECS = sorted(GEMMA_SPECS)


pair = helpers.parity_pair(SPECS)
spec_seed = helpers.spec_seed


@pytest.mark.parametrize("length", [1, 7, 129])
def test_prefill_logits_match_transformers(pair, length):
    hf, px = pair
    helpers.check_prefill(hf, px, length, seed=length + spec_seed(pair))


def test_long_prefill_logits_match_transformers(pair):
    """500 positions: the local layers see 8 or 12 keys, the global ones all of them."""
    hf, px = pair
    helpers.check_prefill(hf, px, 500, seed=500 + spec_seed(pair))


def test_incremental_decode_matches_transformers(pair):
    """Decode steps past the window: the KV cache keeps every key, local layers see their window."""
    hf, px = pair
    helpers.check_incremental_decode(hf, px, prompt_length=7, seed=spec_seed(pair))


def test_kv_cache_equals_full_recomputation(pair):
    helpers.check_cache_equals_recompute(pair[1], seed=spec_seed(pair))


def test_greedy_matches_transformers_generate(pair):
    hf, px = pair
    for n in (1, 6, 20):
        helpers.check_greedy(hf, px, helpers.random_ids(px.vocab_size, n, seed=100 + n))


def test_batched_generate_equals_one_at_a_time(pair):
    """The engine with several sequences of different lengths (windows at different places)."""
    hf, px = pair
    helpers.check_batched_generate(hf, px, seed=spec_seed(pair))


def test_converted_config_describes_the_model(pair):
    hf, px = pair
    c, h = px.config, hf.config
    assert c["family"] == "gemma" and c["norm_position"] == "sandwich" and c["activation"] == "gelu_tanh"
    assert (c["num_layers"], c["num_heads"], c["num_kv_heads"], c["head_dim"]) == (
        h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads, h.head_dim)
    assert c["sliding_window"] == h.sliding_window
    pattern = c["sliding_window_pattern"]
    assert ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(c["num_layers"])] == h.layer_types
    assert c["attention_scale"] == h.query_pre_attn_scalar**-0.5
    assert c["embed_scale"] == h.hidden_size**0.5
    assert (c["attention_softcap"], c["logit_softcap"]) == (h.attn_logit_softcapping, h.final_logit_softcapping)
    assert c["qk_norm"] == (h.model_type == "gemma3_text")
    assert c["tie_word_embeddings"] == h.tie_word_embeddings


_GLOBAL_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}


@pytest.mark.parametrize("name,change", [
    ("gemma2_gqa_d40_softcap", {"attn_logit_softcapping": None}),
    ("gemma2_gqa_d40_softcap", {"final_logit_softcapping": None}),
    ("gemma2_gqa_d40_softcap", {"layer_types": ["full_attention"] * 3}),
    ("gemma3_mqa_d56_untied", {"layer_types": ["full_attention"] * 4}),
    ("gemma3_mqa_d56_untied", {"rope_parameters": {"full_attention": _GLOBAL_ROPE,
                                                   "sliding_attention": _GLOBAL_ROPE}}),
])
def test_gemma_features_change_the_logits(tiny_models, name, change):
    """The features the tests above exercise are not no-ops for these checkpoints: without a soft
    cap, with every layer global, or with the global RoPE on the local layers, transformers' logits
    on 40 tokens move far beyond 1e-4."""
    import copy

    hf, _ = tiny_models(name)
    ids = helpers.random_ids(hf.config.vocab_size, 40, seed=4)
    config = copy.deepcopy(hf.config)
    for key, value in change.items():
        setattr(config, key, value)
    other = type(hf)._from_config(config, attn_implementation="eager").float().eval()
    other.load_state_dict(hf.state_dict())
    assert helpers.max_abs_err(helpers.hf_logits(other, ids), helpers.hf_logits(hf, ids)) > 1e-2


def test_bfloat16_checkpoint_folds_the_norms(tiny_models, tmp_path):
    """A bfloat16 checkpoint converted to bfloat16: the norm weights are 1 + w (computed in float32,
    then rounded), not w's bits moved as they are (what other tensors of such a conversion get)."""
    import copy

    import torch

    from pyxf.convert import convert
    from pyxf.tensorfile import bf16_to_float32, float32_to_bf16, read_safetensors

    hf, _ = tiny_models("gemma3_mqa_d56_untied")
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path / "hf")
    state = {k: v.float().numpy() for k, v in hf_bf16.state_dict().items()}
    out = convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", progress=False)
    stored = read_safetensors(out / "model.safetensors")
    for ours, theirs in [("final_norm.weight", "model.norm.weight"),
                         ("layers.1.attn.k_norm.weight", "model.layers.1.self_attn.k_norm.weight"),
                         ("layers.0.ffn_post_norm.weight", "model.layers.0.post_feedforward_layernorm.weight")]:
        expected = bf16_to_float32(float32_to_bf16(state[theirs] + np.float32(1)))
        np.testing.assert_array_equal(bf16_to_float32(np.asarray(stored[ours])), expected)
    np.testing.assert_array_equal(bf16_to_float32(np.asarray(stored["layers.0.ffn.down.weight"])),
                                  state["model.layers.0.mlp.down_proj.weight"])


# ---------------------------------------------------------------------------------------------
# configs as transformers v4 and v5 write them


def _gemma3_v4_config(**overrides):
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16, "sliding_window_pattern": 6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, **overrides,
    }


def test_gemma3_v4_config_spelling():
    """transformers v4's spelling (rope_theta, rope_scaling, rope_local_base_freq,
    sliding_window_pattern) reads as v5's (rope_parameters by layer type, layer_types)."""
    from pyxf.convert.families import normalized_config

    c = normalized_config(_gemma3_v4_config())
    assert (c["rope_theta"], c["rope_local_theta"]) == (1000000.0, 10000.0)
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert (c["sliding_window"], c["sliding_window_pattern"]) == (16, 6)
    assert c["attention_softcap"] is None and c["logit_softcap"] is None
    v5 = normalized_config(_gemma3_v4_config(
        rope_theta=None, rope_local_base_freq=None, rope_scaling=None, sliding_window_pattern=None,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention"],
    ))
    assert {k: v5[k] for k in c} == c


@pytest.mark.parametrize("overrides,message", [
    (dict(layer_types=["full_attention", "sliding_attention"] + ["sliding_attention"] * 5), "one pattern"),
    (dict(layer_types=["sliding_attention"] * 6 + ["chunked_attention"]), "layer_types"),
    (dict(use_bidirectional_attention=True), "bidirectional"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "local"),
])
def test_gemma_configs_pyxf_cannot_honour_are_refused(overrides, message):
    from pyxf.convert.families import normalized_config

    with pytest.raises(ValueError, match=message):
        normalized_config(_gemma3_v4_config(**overrides))


def test_every_layer_global_has_no_window():
    from pyxf.convert.families import normalized_config

    c = normalized_config(_gemma3_v4_config(layer_types=["full_attention"] * 7))
    assert c["sliding_window"] is None and c["sliding_window_pattern"] is None and c["rope_local_theta"] is None


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("key,value", [("attention.sliding_window", "512"), ("attention.sliding_window", 0.5),
                                       ("attn_logit_softcapping", [50.0]), ("final_logit_softcapping", -1.0)])
def test_gemma_gguf_metadata_of_the_wrong_kind_is_refused(key, value):
    from pyxf.convert.families.gemma import gemma_gguf_config

    config = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "head_dim": 16}
    with pytest.raises(ValueError, match=f"gemma2.{key}"):
        gemma_gguf_config(config, {"general.architecture": "gemma2", f"gemma2.{key}": value})


def test_gemma2_gguf_runs_like_transformers(tmp_path):
    """A gemma2 GGUF as llama.cpp writes one (norm weights stored as 1 + w, no Q/K permutation,
    soft caps and the window in the metadata, every 2nd layer global): converted, its logits equal
    transformers' Gemma2ForCausalLM on the same weights, past the window."""
    gguf = pytest.importorskip("gguf")
    import torch
    import transformers

    import pyxf
    from pyxf.convert import convert
    from test_convert import hf_state, spm_vocabulary

    tokens, scores, types = spm_vocabulary()
    config = transformers.Gemma2Config(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=5.0,
        final_logit_softcapping=7.0, max_position_embeddings=128, rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()
    helpers._init_weights(model, seed=1)
    hf = hf_state(model)
    path = tmp_path / "gemma2.gguf"
    w = gguf.GGUFWriter(path, arch="gemma2")
    w.add_block_count(3)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(24)
    w.add_value_length(24)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(6)
    w.add_attn_logit_softcapping(5.0)
    w.add_final_logit_softcapping(7.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"] + 1)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    norms = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    for i in range(3):
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", hf[f"model.layers.{i}.{theirs}.weight"])
        for ours, theirs in norms.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", hf[f"model.layers.{i}.{theirs}.weight"] + 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    px = pyxf.load(convert(path, tmp_path / "out", progress=False))
    c = px.config
    assert (c["sliding_window"], c["sliding_window_pattern"]) == (6, 2)
    assert (c["attention_softcap"], c["logit_softcap"]) == (5.0, 7.0)
    ids = helpers.random_ids(len(tokens), 40, seed=2)
    expected = helpers.hf_logits(model, ids)
    assert helpers.max_abs_err(px.logits(ids), expected) <= helpers.LOGITS_ATOL


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M, as published) against transformers reading the same file

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory):
    """(transformers' Gemma3ForCausalLM on the file's dequantized float32 weights, pyxf with the
    quantized blocks kept, pyxf converted to float32, the prompts as token ids)."""
    helpers.require_core()
    pytest.importorskip("gguf")
    import torch
    import transformers

    import kquant_files
    import pyxf
    from pyxf.convert import convert

    path = kquant_files.gemma_gguf()
    root = tmp_path_factory.mktemp("gemma3-270m")
    kept = pyxf.load(convert(path, root / "kept", progress=False))
    floats = pyxf.load(convert(path, root / "f32", dequantize=True, progress=False))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, torch_dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [kept.tokenizer.encode(p) for p in PROMPTS]
    return hf, kept, floats, prompts


def _hf_next_tokens(hf, ids):
    return np.argmax(helpers.hf_logits(hf, ids), -1)


def test_gemma3_270m_gguf_config(gemma3_270m):
    """What pyxf read from the file's metadata, beside what transformers read."""
    hf, kept, _, prompts = gemma3_270m
    c, h = kept.config, hf.config
    assert c["family"] == "gemma" and c["qk_norm"] and c["norm_position"] == "sandwich"
    assert (c["num_layers"], c["hidden_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"]) == (
        h.num_hidden_layers, h.hidden_size, h.num_attention_heads, h.num_key_value_heads, h.head_dim)
    assert (c["sliding_window"], c["sliding_window_pattern"], c["rope_local_theta"]) == (512, 6, 10000.0)
    assert c["attention_scale"] == h.query_pre_attn_scalar**-0.5
    # A tensor is one format, or [[format, rows], ...] when its parts differ (qkv: q, k in Q5_0, v in Q8_0).
    formats = {f for spec in c["quantization"]["tensors"].values()
               for f in ([spec] if isinstance(spec, str) else [part[0] for part in spec])}
    assert {"q4_k", "q6_k", "q5_0", "q8_0"} <= formats
    assert all(p[0] == c["bos_token_id"] for p in prompts)


def test_gemma3_270m_float32_matches_transformers(gemma3_270m):
    """The float32 conversion: logits within float32 rounding of transformers' on the same
    dequantized weights, the same next token at every position, the same greedy continuation."""
    hf, _, floats, prompts = gemma3_270m
    for ids in prompts:
        expected = helpers.hf_logits(hf, ids)
        got = floats.logits(ids)
        assert helpers.max_abs_err(got, expected) <= 5e-4
        np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
        assert pyxf_greedy(floats, ids) == hf_greedy(hf, floats, ids)


def test_gemma3_270m_quantized_agrees_with_transformers(gemma3_270m):
    """The blocks kept as stored (activations quantized on the fly, as llama.cpp does): the next
    token after each prompt and at nearly every position agrees with transformers' float32."""
    hf, kept, _, prompts = gemma3_270m
    agree = total = 0
    for ids in prompts:
        expected = _hf_next_tokens(hf, ids)
        got = np.argmax(kept.logits(ids), -1)
        assert got[-1] == expected[-1]
        agree, total = agree + int((got == expected).sum()), total + len(ids)
    assert agree >= 0.9 * total, f"{agree} of {total} positions agree"
    for ids in prompts:
        _check_quantized_greedy(hf, kept, ids)


# How far quantizing moves this model's logits from the float32 reference: 0.5-1.4 at most over a
# prompt's positions (and as much between two builds of pyxf whose float rounding differs in the
# last bit, since that moves an activation across a rounding step of its 8-bit quantization).
QUANTIZED_LOGIT_NOISE = 1.0


def _check_quantized_greedy(hf, model, ids):
    """A quantized model's greedy continuation against transformers' float32 one. Where the
    reference's two best tokens are closer than quantization moves logits, either is a faithful
    choice, so: the two continuations are equal up to the reference's first such near-tie, and
    every token pyxf picks is one transformers, fed pyxf's own continuation, rates within the
    noise of its best."""
    got, expected = pyxf_greedy(model, ids), hf_greedy(hf, model, ids)
    reference = helpers.hf_logits(hf, ids + expected)[len(ids) - 1:][:len(expected)]
    top2 = np.sort(reference, -1)[:, -2:]
    near_tie = next((i for i, m in enumerate(top2[:, 1] - top2[:, 0]) if m < QUANTIZED_LOGIT_NOISE), len(expected))
    assert got[:near_tie] == expected[:near_tie]
    rated = helpers.hf_logits(hf, ids + got)[len(ids) - 1:][:len(got)]
    shortfall = rated.max(-1) - rated[np.arange(len(got)), got]
    assert shortfall.max(initial=0) <= QUANTIZED_LOGIT_NOISE, (got, expected, shortfall)


def pyxf_greedy(model, ids):
    import pyxf

    return pyxf.generate(model, [ids], max_new_tokens=GREEDY_TOKENS)[0]


def hf_greedy(hf, model, ids):
    """transformers' greedy continuation, stopping (and cut) where pyxf stops: at the model's EOS."""
    eos = model.eos_token_ids
    return helpers.strip_eos(helpers.hf_greedy(hf, ids, GREEDY_TOKENS, eos_token_id=eos), set(eos))
