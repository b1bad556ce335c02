"""Quantized model directories: pyxf.quant against the gguf package, `convert --quantize`, GGUF import
without dequantizing (`--keep-quantized`), load-time quantization, and load-time validation.

Tiny random models (tests/helpers.py specs) keep this fast; quality on a real checkpoint is in
test_quant_quality.py.
"""

import json
import warnings

import numpy as np
import pytest

import helpers
from pyxf import quant

gguf = pytest.importorskip("gguf")

QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}


# ---------------------------------------------------------------------------------------------
# pyxf.quant


def awkward_matrix(rng, rows, cols, scale=1.0):
    """Random rows plus blocks that stress rounding: zeros, constants, halves, one large value."""
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    w[0, :32] = 0
    w[1, :32] = 0.5 * scale
    w[2, :32] = np.linspace(-1, 1, 32) * scale
    w[3, :32] = (np.arange(32) - 16) / 16 * scale
    w[4, 7] = 50 * scale
    w[5, :32] = -scale
    return w


@pytest.mark.parametrize("fmt", sorted(QTYPES))
@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e3])
def test_block_quantization_is_bit_exact_with_gguf(fmt, scale):
    w = awkward_matrix(np.random.default_rng(int(scale * 7) + len(fmt)), 70, 192, scale)
    mine, scales = quant.quantize(w, fmt)
    reference = gguf.quants.quantize(w, QTYPES[fmt])
    assert scales is None and mine.dtype == np.uint8 and mine.shape == (70, quant.row_bytes(fmt, 192))
    np.testing.assert_array_equal(mine, reference)
    np.testing.assert_array_equal(quant.dequantize(mine, fmt), gguf.quants.dequantize(reference, QTYPES[fmt]))


def test_block_quantization_in_row_chunks_matches_whole(monkeypatch):
    w = awkward_matrix(np.random.default_rng(1), 50, 64)
    whole = {fmt: quant.quantize(w, fmt) for fmt in quant.FORMATS}
    monkeypatch.setattr(quant, "_CHUNK_ROWS", 7)
    for fmt in quant.FORMATS:
        data, scales = quant.quantize(w, fmt)
        np.testing.assert_array_equal(data, whole[fmt][0])
        if scales is not None:
            np.testing.assert_array_equal(scales, whole[fmt][1])


def test_int8_is_symmetric_per_row():
    w = awkward_matrix(np.random.default_rng(2), 20, 96)
    data, scales = quant.quantize(w, "int8")
    assert data.dtype == np.int8 and data.shape == w.shape and scales.dtype == np.float32
    np.testing.assert_array_equal(scales, np.abs(w).max(1) / np.float32(127))
    assert data[0, :32].tolist() == [0] * 32 and np.abs(data).max(1).tolist()[6:] == [127] * 14
    np.testing.assert_array_equal(data[6:], np.rint(w[6:] / scales[6:, None]).astype(np.int8))
    deq = quant.dequantize(data, "int8", scales)
    assert np.abs(deq - w).max(1).max() <= (scales / 2 * 1.0001).max()
    zero, zero_scale = quant.quantize(np.zeros((2, 32), np.float32), "int8")
    assert not zero.any() and not zero_scale.any()


def test_quantizable_names():
    assert quant.quantizable("layers.3.attn.qkv.weight", (96, 64))
    assert quant.quantizable("layers.0.ffn.gate_up.weight", (10, 32))
    assert quant.quantizable("lm_head.weight", (100, 64))
    assert not quant.quantizable("layers.0.ffn.down.weight", (64, 200))  # 200 columns: stays float
    assert not quant.quantizable("layers.0.attn.qkv.bias", (96,))
    assert not quant.quantizable("layers.0.attn_norm.weight", (64,))
    assert not quant.quantizable("embed.weight", (100, 64))
    assert quant.quantizable("embed.weight", (100, 64), embeddings=True)
    assert not quant.quantizable("pos_embed.weight", (100, 64), embeddings=True)
    assert not quant.quantizable("pooler.dense.weight", (64, 64), embeddings=True)
    with pytest.raises(ValueError, match="unknown quantization format"):
        quant.quantize(np.zeros((1, 32), np.float32), "q5_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.zeros((1, 48), np.float32), "q4_0")


# ---------------------------------------------------------------------------------------------
# convert --quantize, pyxf.load(quantize=...)


def convert_quiet(*args, **kwargs):
    from pyxf.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny models have no tokenizer
        return convert(*args, progress=False, **kwargs)


def read_dir(path):
    from pyxf.tensorfile import read_safetensors

    return json.loads((path / "config.json").read_text()), read_safetensors(path / "model.safetensors")


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_convert_quantizes_linear_weights(tiny_models, tmp_path, fmt):
    # hidden 96, intermediate 200: ffn.down's rows (200) are not a multiple of 32 and stay float
    _, float_dir = tiny_models("llama_mqa_d32")
    out = convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / fmt, quantize=fmt)
    config, tensors = read_dir(out)
    _, floats = read_dir(float_dir)
    expected = {f"layers.{i}.{k}.weight" for i in range(2) for k in ("attn.qkv", "attn.out", "ffn.gate_up")}
    expected.add("lm_head.weight")
    assert config["quantization"] == {"method": fmt, "tensors": dict.fromkeys(expected, fmt)}
    assert config["dtype"] == "float32"
    for name in expected:
        want_dtype = "I8" if fmt == "int8" else "U8"
        assert tensors.dtypes[name] == want_dtype
        rows, cols = floats[name].shape
        assert tensors[name].shape == (rows, quant.row_bytes(fmt, cols))
        data, scales = quant.quantize(np.asarray(floats[name]), fmt)
        np.testing.assert_array_equal(tensors[name], data.view(tensors[name].dtype))
        if fmt == "int8":
            np.testing.assert_array_equal(tensors[name + "_scale"], scales)
    for name in ("embed.weight", "layers.0.ffn.down.weight", "layers.1.attn_norm.weight"):
        assert tensors.dtypes[name] == "F32"
        np.testing.assert_array_equal(tensors[name], floats[name])


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_models_run_close_to_float(tiny_models, tmp_path, fmt):
    helpers.require_core()
    import pyxf

    _, float_dir = tiny_models("llama_mqa_d32")
    ids = helpers.random_ids(384, 40, seed=3)
    reference = pyxf.load(float_dir).logits(ids)
    converted = pyxf.load(convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / fmt, quantize=fmt))
    at_load = pyxf.load(float_dir, quantize=fmt)
    assert at_load.config["quantization"] == converted.config["quantization"]
    assert "quantization=" + fmt in repr(at_load)
    logits = converted.logits(ids)
    np.testing.assert_array_equal(at_load.logits(ids), logits)  # the same arrays, the same arithmetic
    bound = {"int8": 0.08, "q8_0": 0.08, "q4_0": 0.4, "q4_1": 0.4}[fmt]
    assert relative_error(logits, reference) < bound
    generated = pyxf.generate(converted, [ids[:5]], max_new_tokens=4, temperature=0)
    assert len(generated[0]) == 4


def test_quantized_embeddings_serve_as_tied_head(tiny_models, tmp_path):
    helpers.require_core()
    import pyxf

    hf, float_dir = tiny_models("qwen2_d128_tied")
    with pytest.raises(ValueError, match="needs a quantization format"):
        convert_quiet(float_dir.parent / "qwen2_d128_tied-hf", tmp_path / "x", quantize_embeddings=True)
    out = convert_quiet(float_dir.parent / "qwen2_d128_tied-hf", tmp_path / "q8", quantize="q8_0",
                        quantize_embeddings=True)
    config, tensors = read_dir(out)
    assert config["tie_word_embeddings"] and config["quantization"]["tensors"]["embed.weight"] == "q8_0"
    assert "lm_head.weight" not in tensors and tensors.dtypes["embed.weight"] == "U8"
    ids = helpers.random_ids(640, 30, seed=4)
    reference = pyxf.load(float_dir).logits(ids)
    logits = pyxf.load(out).logits(ids)
    assert relative_error(logits, reference) < 0.08
    at_load = pyxf.load(float_dir, quantize="q8_0", quantize_embeddings=True)
    np.testing.assert_array_equal(at_load.logits(ids), logits)
    float_embed = pyxf.load(float_dir, quantize="q8_0")
    assert "embed.weight" not in float_embed.config["quantization"]["tensors"]


def test_half_precision_model_quantizes(tiny_models, tmp_path):
    helpers.require_core()
    import pyxf

    _, bf16_dir = tiny_models("llama_mqa_d32", "bfloat16")
    _, float_dir = tiny_models("llama_mqa_d32")
    ids = helpers.random_ids(384, 20, seed=5)
    model = pyxf.load(bf16_dir, quantize="q8_0")
    assert model.config["dtype"] == "bfloat16"
    assert relative_error(model.logits(ids), pyxf.load(float_dir).logits(ids)) < 0.05
    out = convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / "f16", dtype="float16", quantize="int8")
    config, tensors = read_dir(out)
    assert tensors.dtypes["embed.weight"] == "F16" and tensors.dtypes["layers.0.attn.qkv.weight"] == "I8"
    assert tensors.dtypes["layers.0.attn.qkv.weight_scale"] == "F32"
    assert relative_error(pyxf.load(out).logits(ids), pyxf.load(float_dir).logits(ids)) < 0.05


def test_gpt2_quantizes(tiny_models, tmp_path):
    helpers.require_core()
    import pyxf

    _, float_dir = tiny_models("gpt2_d32")
    ids = helpers.random_ids(400, 30, seed=6)
    model = pyxf.load(float_dir, quantize="q8_0")
    assert len(model.config["quantization"]["tensors"]) == 8  # qkv, out, up, down of 2 layers
    assert relative_error(model.logits(ids), pyxf.load(float_dir).logits(ids)) < 0.03


def test_load_rejects_bad_quantized_directories(tiny_models, tmp_path):
    helpers.require_core()
    import shutil

    import pyxf

    _, float_dir = tiny_models("llama_mqa_d32")
    out = convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / "good", quantize="q4_0")
    with pytest.raises(ValueError, match="already quantized"):
        pyxf.load(out, quantize="int8")

    def variant(name, edit):
        path = tmp_path / name
        shutil.copytree(out, path)
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config))
        return path

    formats = lambda c: c["quantization"]["tensors"]  # noqa: E731
    bad_format = variant("fmt", lambda c: formats(c).update({"lm_head.weight": "q3_k"}))
    with pytest.raises(ValueError, match="unknown format 'q3_k'"):
        pyxf.load(bad_format)
    not_linear = variant("norm", lambda c: formats(c).update({"layers.0.attn_norm.weight": "q8_0"}))
    with pytest.raises(ValueError, match="cannot be stored quantized"):
        pyxf.load(not_linear)
    wrong_shape = variant("shape", lambda c: formats(c).update({"lm_head.weight": "q8_0"}))  # q4_0 bytes stored
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        pyxf.load(wrong_shape)
    not_a_map = variant("map", lambda c: c.update(quantization={"method": "q4_0"}))
    with pytest.raises(ValueError, match="'tensors' map"):
        pyxf.load(not_a_map)
    out = convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / "int8", quantize="int8")
    undeclared = variant("undeclared", lambda c: formats(c).pop("lm_head.weight"))
    with pytest.raises(ValueError, match="unknown for this config: lm_head.weight_scale"):
        pyxf.load(undeclared)
    (undeclared / "model.safetensors").unlink()
    config, tensors = read_dir(out)
    from pyxf.tensorfile import write_safetensors

    write_safetensors(undeclared / "model.safetensors", {k: v for k, v in tensors.items() if not k.startswith("lm_head")}
                      | {"lm_head.weight": tensors["lm_head.weight"]})
    with pytest.raises(ValueError, match="lm_head.weight is stored as I8, expected F32"):
        pyxf.load(undeclared)
    no_scale = variant("no-scale", lambda c: None)
    (no_scale / "model.safetensors").unlink()
    write_safetensors(no_scale / "model.safetensors", {k: v for k, v in tensors.items() if k != "lm_head.weight_scale"})
    with pytest.raises(ValueError, match="lacks 1 expected tensor.*lm_head.weight_scale"):
        pyxf.load(no_scale)


def test_cli_quantize_flags(tiny_models, tmp_path, capsys):
    from pyxf.convert import main

    _, float_dir = tiny_models("llama_mqa_d32")
    hf_dir = float_dir.parent / "llama_mqa_d32-hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(hf_dir), str(tmp_path / "a"), "--quantize", "q4_1", "--quantize-embeddings", "--quiet"]) == 0
    config, _ = read_dir(tmp_path / "a")
    assert config["quantization"]["tensors"]["embed.weight"] == "q4_1"
    assert main([str(hf_dir), str(tmp_path / "b"), "--keep-quantized", "--quiet"]) == 1
    assert "GGUF files only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(hf_dir), str(tmp_path / "c"), "--quantize-embeddings"])


# ---------------------------------------------------------------------------------------------
# GGUF blocks kept as they are


def permute_like_llama_cpp(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    """A 2-layer llama GGUF like llama.cpp's quantized files: Q4_1 attention (permuted Q/K), Q4_0
    gate/up, Q8_0 embedding (tied head); layer 1 mixes a Q4_1 q with a Q8_0 k; F16 down projections."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = [f"t{i}" for i in range(256)]
    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, vocab_size=len(vocab), tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    hf = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    q4_1, q4_0, q8_0 = QTYPES["q4_1"], QTYPES["q4_0"], QTYPES["q8_0"]
    path = tmp_path_factory.mktemp("qgguf") / "tiny-q.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([1] * len(vocab))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, array, qtype=None):
        if qtype is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    add("token_embd.weight", hf["model.embed_tokens.weight"], q8_0)
    add("output_norm.weight", hf["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", permute_like_llama_cpp(hf[p + "self_attn.q_proj.weight"], 4), q4_1)
        add(f"blk.{i}.attn_k.weight", permute_like_llama_cpp(hf[p + "self_attn.k_proj.weight"], 2),
            q4_1 if i == 0 else q8_0)
        add(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"], q4_1)
        add(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"], q4_1)
        add(f"blk.{i}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"], q4_0)
        add(f"blk.{i}.ffn_up.weight", hf[p + "mlp.up_proj.weight"], q4_0)
        add(f"blk.{i}.ffn_down.weight", hf[p + "mlp.down_proj.weight"].astype(np.float16))
        add(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_blocks_are_copied_not_dequantized(quantized_gguf, tmp_path):
    floats_dir = convert_quiet(quantized_gguf, tmp_path / "float")
    kept_dir = convert_quiet(quantized_gguf, tmp_path / "kept", keep_quantized=True)
    _, floats = read_dir(floats_dir)
    config, kept = read_dir(kept_dir)
    assert config["quantization"] == {
        "method": "gguf",
        "tensors": {
            "embed.weight": "q8_0",
            "layers.0.attn.qkv.weight": "q4_1",
            "layers.0.attn.out.weight": "q4_1",
            "layers.0.ffn.gate_up.weight": "q4_0",
            "layers.1.attn.out.weight": "q4_1",
            "layers.1.ffn.gate_up.weight": "q4_0",
        },
    }
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(quantized_gguf).tensors}  # the reference reader
    np.testing.assert_array_equal(kept["embed.weight"], raw["token_embd.weight"])  # byte for byte
    np.testing.assert_array_equal(kept["layers.0.ffn.gate_up.weight"],
                                  np.concatenate([raw["blk.0.ffn_gate.weight"], raw["blk.0.ffn_up.weight"]]))
    # un-permuted block rows dequantize to exactly the float import's un-permuted rows
    for name, fmt in config["quantization"]["tensors"].items():
        np.testing.assert_array_equal(quant.dequantize(kept[name], fmt), floats[name], err_msg=name)
    # mixed Q4_1 / Q8_0 sources, and F16: floats as before
    for name in ("layers.1.attn.qkv.weight", "layers.0.ffn.down.weight"):
        assert kept.dtypes[name] == "F32"
        np.testing.assert_array_equal(kept[name], floats[name])

    # with --quantize, the tensors that could not be kept are quantized to that format
    config, mixed = read_dir(convert_quiet(quantized_gguf, tmp_path / "mixed", keep_quantized=True, quantize="q8_0"))
    assert config["quantization"]["method"] == "gguf+q8_0"
    formats = config["quantization"]["tensors"]
    assert formats["layers.1.attn.qkv.weight"] == formats["layers.0.ffn.down.weight"] == "q8_0"
    assert formats["layers.0.attn.qkv.weight"] == "q4_1" and formats["embed.weight"] == "q8_0"
    np.testing.assert_array_equal(mixed["layers.0.ffn.down.weight"], quant.quantize(floats["layers.0.ffn.down.weight"], "q8_0")[0])


def test_gguf_kept_model_runs_like_its_float_import(quantized_gguf, tmp_path):
    helpers.require_core()
    import pyxf

    floats = pyxf.load(convert_quiet(quantized_gguf, tmp_path / "float"))
    kept = pyxf.load(convert_quiet(quantized_gguf, tmp_path / "kept", keep_quantized=True))
    ids = helpers.random_ids(256, 24, seed=8)
    # the same weights; only the 8-bit rounding of activations in the quantized products differs
    assert relative_error(kept.logits(ids), floats.logits(ids)) < 0.03
