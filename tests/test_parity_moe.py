"""Mixture-of-experts parity: tiny random MixtralForCausalLM / Qwen2MoeForCausalLM /
Qwen3MoeForCausalLM / OlmoeForCausalLM checkpoints (tests/helpers.py MOE_SPECS: 4-8 experts, top-2,
GQA or MQA, Qwen2-MoE's shared expert, Qwen3-MoE's per-head and OLMoE's whole-projection q/k norms)
saved with save_pretrained, converted and loaded, against transformers (float32, eager attention);
quantized experts; a Mixtral GGUF file as llama.cpp's converter writes it (3-D expert stacks).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import helpers
from helpers import MOE_SPECS
from test_convert import _tiny_gguf_writer, permute_like_llama_cpp, spm_vocabulary

SPECS = sorted(MOE_SPECS)


pair = helpers.parity_pair(SPECS)
spec_seed = helpers.spec_seed


def convert_quiet(src, out, **kwargs):
    import warnings

    from pyxf.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer": these models have none
        return convert(src, out, progress=False, **kwargs)


@pytest.mark.parametrize("length", [1, 7, 129])
def test_prefill_logits_match_transformers(pair, length):
    """129 tokens: every expert gets many rows (one GEMM each); 1 token: two experts of one row."""
    hf, px = pair
    helpers.check_prefill(hf, px, length, seed=length + spec_seed(pair))


def test_incremental_decode_matches_transformers(pair):
    hf, px = pair
    helpers.check_incremental_decode(hf, px, prompt_length=7, seed=spec_seed(pair))


def test_kv_cache_equals_full_recomputation(pair):
    helpers.check_cache_equals_recompute(pair[1], seed=spec_seed(pair))


def test_greedy_matches_transformers_generate(pair):
    hf, px = pair
    for n in (1, 6, 20):
        helpers.check_greedy(hf, px, helpers.random_ids(px.vocab_size, n, seed=100 + n))


def test_batched_generate_equals_one_at_a_time(pair):
    """Batched decode groups the rows of all sequences by expert; each sequence gets what it gets
    alone, and what transformers gives."""
    hf, px = pair
    helpers.check_batched_generate(hf, px, seed=spec_seed(pair))


def test_converted_config_describes_the_model(pair):
    hf, px = pair
    c, h = px.config, hf.config
    assert c["family"] == "llama"
    experts = getattr(h, "num_experts", None) or h.num_local_experts
    assert (c["num_experts"], c["num_experts_per_tok"]) == (experts, h.num_experts_per_tok)
    assert c["intermediate_size"] == (getattr(h, "moe_intermediate_size", None) or h.intermediate_size)
    assert c["norm_topk_prob"] == (h.model_type == "mixtral" or h.norm_topk_prob)
    assert c.get("shared_expert_intermediate_size", 0) == getattr(h, "shared_expert_intermediate_size", 0)
    assert c["qk_norm"] == (h.model_type in ("qwen3_moe", "olmoe"))
    assert c.get("qk_norm_span", "head") == ("projection" if h.model_type == "olmoe" else "head")


def test_decode_bytes_count_the_chosen_experts(pair):
    """weight_summary's decode_bytes (the bandwidth roofline's denominator): a decode step of one
    sequence reads k of the E experts of each stack."""
    _, px = pair
    c, weights = px.config, px._weights
    stacks = sum(a.nbytes for n, a in weights.items() if ".ffn.experts." in n)
    embed = weights["embed.weight"]
    lookup = 0 if c["tie_word_embeddings"] else embed.nbytes - embed.nbytes // embed.shape[0]
    total = sum(a.nbytes for a in weights.values())
    expected = total - lookup - stacks + stacks * c["num_experts_per_tok"] // c["num_experts"]
    assert px.weight_summary()["decode_bytes"] == expected < total


def test_routing_is_not_trivial(pair):
    """The tiny models route tokens to every expert and their choice matters: dropping the
    router's renormalization or the shared expert, or picking other experts, would change the
    logits far beyond the tolerance (so the parity above tests the routing)."""
    hf, px = pair
    ids = helpers.random_ids(px.vocab_size, 40, seed=7)
    layer = hf.model.layers[0]
    block = getattr(layer, "block_sparse_moe", None) or layer.mlp
    hidden = torch.randn(40, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, chosen = block.gate(hidden)
    assert len(set(chosen.flatten().tolist())) == px.config["num_experts"]
    with torch.no_grad():
        original = block.gate.weight.clone()
        block.gate.weight.copy_(original.flip(0))  # the same experts under other router rows
        try:
            moved = helpers.max_abs_err(helpers.hf_logits(hf, ids), px.logits(ids))
        finally:
            block.gate.weight.copy_(original)
    assert moved > 100 * helpers.LOGITS_ATOL


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int8"])
def test_quantized_experts_run_close_to_float(tiny_models, tmp_path, fmt):
    """--quantize covers the stacked experts (one format for every expert's rows); the router and
    the shared gate stay float. Bounds as in tests/test_quant_convert.py."""
    helpers.require_core()
    import pyxf

    name = "qwen3moe_e8_qknorm"  # hidden 64 and expert width 64: every expert matrix has blocks of 32
    _, float_dir = tiny_models(name)
    ids = helpers.random_ids(384, 40, seed=3)
    reference = pyxf.load(float_dir).logits(ids)
    converted = pyxf.load(convert_quiet(float_dir.parent / f"{name}-hf", tmp_path / fmt, quantize=fmt))
    formats = converted.config["quantization"]["tensors"]
    for i in range(2):
        assert formats[f"layers.{i}.ffn.experts.gate_up.weight"] == fmt
        assert formats[f"layers.{i}.ffn.experts.down.weight"] == fmt
        assert f"layers.{i}.ffn.router.weight" not in formats
    at_load = pyxf.load(float_dir, quantize=fmt)
    logits = converted.logits(ids)
    np.testing.assert_array_equal(at_load.logits(ids), logits)
    error = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
    assert 0 < error < {"q8_0": 0.08, "int8": 0.08, "q4_0": 0.5}[fmt]
    one = converted.logits(ids[:9])
    session = converted.session()  # decode (few rows per expert) agrees with prefill (GEMMs)
    rows = np.concatenate([session.feed(ids[:5]), *(session.feed([t]) for t in ids[5:9])])
    assert helpers.max_abs_err(rows, one) < 0.02 * np.abs(one).max()
    assert len(pyxf.generate(converted, [ids[:5]], max_new_tokens=4)[0]) == 4


def test_bfloat16_experts_compute_the_rounded_weights(tiny_models):
    """Converted to bfloat16, the stacked experts (and the router, widened at load) compute what
    transformers computes in float32 with its weights rounded to bfloat16 (the widening kernels)."""
    helpers.require_core()
    import pyxf
    from pyxf import _core

    hf, model_dir = tiny_models("qwen2moe_e6_shared", dtype="bfloat16")
    px = pyxf.load(model_dir, kv_cache_dtype="float32")  # the weights alone: no rounding of the cache
    reference = helpers.half_precision_reference(hf, "bfloat16")
    ids = helpers.random_ids(px.vocab_size, 33, seed=33)
    widening = helpers.widening_isas(_core.info()["isas"])[-1]
    before = _core.get_isa()
    try:
        _core.set_isa(widening)
        err = helpers.max_abs_err(px.logits(ids), helpers.hf_logits(reference, ids))
    finally:
        _core.set_isa(before)
    assert err <= helpers.LOGITS_ATOL
    assert helpers.max_abs_err(helpers.hf_logits(hf, ids), helpers.hf_logits(reference, ids)) > 10 * err


def test_k_quant_mixes_give_expert_down_stacks_more_bits(tiny_models):
    """q4_k_m as llama.cpp's Q4_K_M: the down projections of experts (ffn_down_exps) and of the
    shared expert get q6_k in the layers use_more_bits picks, like a dense ffn.down."""
    from pyxf import quant_mix

    config = {**json.loads((tiny_models("qwen2moe_e6_shared")[1] / "config.json").read_text()), "num_layers": 8}
    shape = (6 * 256, 256)
    picks = [quant_mix.tensor_spec(f"layers.{i}.ffn.experts.down.weight", shape, config, "q4_k_m", False)
             for i in range(8)]
    assert picks == ["q6_k" if quant_mix.more_bits(i, 8) else "q4_k" for i in range(8)]
    assert "q4_k" in picks and "q6_k" in picks
    assert quant_mix.tensor_spec("layers.0.ffn.shared.down.weight", (256, 256), config, "q4_k_m", False) == "q6_k"
    assert quant_mix.tensor_spec("layers.0.ffn.experts.gate_up.weight", shape, config, "q4_k_m", False) == "q4_k"


def test_expert_count_that_disagrees_with_the_weights_is_refused(tiny_models, tmp_path):
    helpers.require_core()
    import shutil

    import pyxf

    _, model_dir = tiny_models("mixtral_e5")
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_experts"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ffn.router.weight"):
        pyxf.load(copy)
    config["num_experts"], config["num_experts_per_tok"] = 5, 6
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        pyxf.load(copy)


def test_router_weights_of_nan_do_not_crash(tiny_models, tmp_path):
    """A router that gives NaN probabilities still picks k experts in range (NaN ranks last): the
    logits are NaN, the core does not crash or read out of bounds."""
    helpers.require_core()
    import shutil

    import pyxf
    from pyxf.tensorfile import read_safetensors, write_safetensors

    _, model_dir = tiny_models("mixtral_e5")
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    tensors = {name: np.array(array) for name, array in read_safetensors(model_dir / "model.safetensors").items()}
    tensors["layers.0.ffn.router.weight"][:3] = np.nan
    write_safetensors(copy / "model.safetensors", tensors)
    logits = pyxf.load(copy).logits(helpers.random_ids(352, 20, seed=1))
    assert logits.shape == (20, 352) and np.isnan(logits).all()


def test_dense_layers_among_expert_layers_are_refused(tmp_path):
    """Qwen-MoE's mlp_only_layers / decoder_sparse_step make some layers dense: not supported, and
    said so rather than converted wrongly."""
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
    )
    hf_dir = tmp_path / "hf"
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(hf_dir)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        convert_quiet(hf_dir, tmp_path / "out")


def test_expert_counts_the_checkpoint_cannot_hold_are_refused(tiny_models, tmp_path):
    """A config.json claiming 10**9 experts (or 2**31 layers with mlp_only_layers) is refused by
    what the checkpoint holds, before any work in proportion to the claim; a count that is not an
    integer is a ValueError too."""
    import shutil

    _, _ = tiny_models("qwen2moe_e6_shared")
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_models.root / "qwen2moe_e6_shared-hf", hf_dir)
    original = json.loads((hf_dir / "config.json").read_text())
    for edit, message in (({"num_experts": 10**9}, "1000000000 experts per layer"),
                          ({"num_experts": "6"}, "number of experts"),
                          ({"num_hidden_layers": 2**31, "mlp_only_layers": [5]}, "dense FFN")):
        (hf_dir / "config.json").write_text(json.dumps({**original, **edit}))
        with pytest.raises(ValueError, match=message):
            convert_quiet(hf_dir, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# GGUF files as llama.cpp's convert_hf_to_gguf writes them: Mixtral as arch llama with
# llama.expert_count / expert_used_count and permuted Q/K rows; Qwen2-MoE as arch qwen2moe with the
# experts' and the shared expert's widths; Qwen3-MoE as arch qwen3moe with per-head q/k norms; the router blk.N.ffn_gate_inp, the experts as 3-D stacks
# blk.N.ffn_{gate,up,down}_exps ([E, I, H], [E, H, I] in numpy order), Qwen2-MoE's shared expert
# blk.N.ffn_{gate,up,down}_shexp and its gate blk.N.ffn_gate_inp_shexp ([H]).

GGUF_IDS = [1, 5, 9, 13, 40, 41, 7, 3, 22, 90, 17, 260]


def _moe_gguf(path, arch, expert_type=None):
    """A tiny MoE checkpoint written as a GGUF file; returns the transformers model."""
    gguf = pytest.importorskip("gguf")
    tokens, scores, types = spm_vocabulary()
    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                 intermediate_size=96, vocab_size=len(tokens), num_experts_per_tok=2, tie_word_embeddings=False,
                 rms_norm_eps=1e-5, max_position_embeddings=128)
    if arch == "llama":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **shape))
        width = 96
    elif arch == "qwen2moe":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
            use_sliding_window=False, **shape))
        width = 32
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=5, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16, use_sliding_window=False,
            **shape))
        width = 32
    model.eval()
    with torch.no_grad():  # unit-scale activations (transformers' std 0.02 gives near-zero logits)
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    experts = hf["model.layers.0.mlp.gate.weight"].shape[0]
    w = _tiny_gguf_writer(gguf, path, arch, (tokens, scores, types))  # the shape above, the vocabulary
    w.add_expert_count(experts)
    w.add_expert_used_count(2)
    if arch != "llama":
        w.add_expert_feed_forward_length(width)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(48)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(model.config.rope_parameters["rope_theta"])

    def add(name, array):
        if expert_type is None or array.ndim != 3:
            w.add_tensor(name, np.ascontiguousarray(array))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array), expert_type), raw_dtype=expert_type)

    def q_k(array, heads):  # llama.cpp permutes the llama architecture's Q/K rows
        return permute_like_llama_cpp(array, heads) if arch == "llama" else array

    add("token_embd.weight", hf["model.embed_tokens.weight"])
    add("output.weight", hf["lm_head.weight"])
    add("output_norm.weight", hf["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        gate_up = hf[p + "mlp.experts.gate_up_proj"]  # transformers' fused stacks [E, 2I, H]: gate, up
        add(f"blk.{i}.attn_q.weight", q_k(hf[p + "self_attn.q_proj.weight"], 4))
        add(f"blk.{i}.attn_k.weight", q_k(hf[p + "self_attn.k_proj.weight"], 2))
        add(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        for x in "qkv":
            if p + f"self_attn.{x}_proj.bias" in hf:  # Qwen2-MoE's q, k, v biases
                add(f"blk.{i}.attn_{x}.bias", hf[p + f"self_attn.{x}_proj.bias"])
        if arch == "qwen3moe":  # per-head q/k norms
            add(f"blk.{i}.attn_q_norm.weight", hf[p + "self_attn.q_norm.weight"])
            add(f"blk.{i}.attn_k_norm.weight", hf[p + "self_attn.k_norm.weight"])
        add(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate_inp.weight", hf[p + "mlp.gate.weight"])
        add(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :width])
        add(f"blk.{i}.ffn_up_exps.weight", gate_up[:, width:])
        add(f"blk.{i}.ffn_down_exps.weight", hf[p + "mlp.experts.down_proj"])
        if arch == "qwen2moe":
            for x in ("gate", "up", "down"):
                add(f"blk.{i}.ffn_{x}_shexp.weight", hf[p + f"mlp.shared_expert.{x}_proj.weight"])
            add(f"blk.{i}.ffn_gate_inp_shexp.weight", hf[p + "mlp.shared_expert_gate.weight"].reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe"])
def test_moe_gguf_runs_like_transformers(tmp_path, arch):
    helpers.require_core()
    import pyxf

    model = _moe_gguf(tmp_path / "moe.gguf", arch)
    px = pyxf.load(convert_quiet(tmp_path / "moe.gguf", tmp_path / "out"))
    c = px.config
    expected = {"llama": (4, 2, True, 96, 0), "qwen2moe": (6, 2, False, 32, 48), "qwen3moe": (5, 2, True, 32, 0)}[arch]
    assert (c["num_experts"], c["num_experts_per_tok"], c["norm_topk_prob"], c["intermediate_size"],
            c.get("shared_expert_intermediate_size", 0)) == expected
    np.testing.assert_allclose(px.logits(GGUF_IDS), helpers.hf_logits(model, GGUF_IDS), atol=helpers.LOGITS_ATOL,
                               rtol=0)
    assert pyxf.generate(px, [GGUF_IDS], max_new_tokens=8)[0] == helpers.strip_eos(
        helpers.hf_greedy(model, GGUF_IDS, 8, eos_token_id=2), {2})


def test_mixtral_gguf_quantized_experts_are_kept(tmp_path):
    """Q8_0 expert stacks are copied as stored (one q8_0 matrix of E * rows) and run close to the
    float model."""
    helpers.require_core()
    import gguf

    import pyxf

    model = _moe_gguf(tmp_path / "mixtral-q8.gguf", "llama", expert_type=gguf.GGMLQuantizationType.Q8_0)
    px = pyxf.load(convert_quiet(tmp_path / "mixtral-q8.gguf", tmp_path / "out"))
    formats = px.config["quantization"]["tensors"]
    assert formats["layers.0.ffn.experts.gate_up.weight"] == "q8_0"
    assert formats["layers.1.ffn.experts.down.weight"] == "q8_0"
    reference = helpers.hf_logits(model, GGUF_IDS)
    logits = px.logits(GGUF_IDS)
    assert 0 < float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)) < 0.08


def test_state_dict_with_transformers_expert_stacks(tiny_models, tmp_path):
    """A torch state_dict of a transformers v5 model holds the experts as its in-memory stacks
    (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]): converted like the per-expert files."""
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models("olmoe_e4_projnorm")
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    px = pyxf.load(convert_quiet(tmp_path / "model.pt", tmp_path / "out"))
    ids = helpers.random_ids(px.vocab_size, 20, seed=20)
    np.testing.assert_array_equal(px.logits(ids), pyxf.load(model_dir).logits(ids))
