"""Quantized model directories: pyxf.quant against the gguf package, `convert --quantize`, GGUF import
keeping the blocks the core runs (the default) or dequantizing (`--dequantize`), load-time
quantization, and load-time validation.

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
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
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
    w = awkward_matrix(np.random.default_rng(1), 50, 256)
    whole = {fmt: quant.quantize(w, fmt) for fmt in quant.FORMATS}
    monkeypatch.setattr(quant, "_CHUNK_ROWS", 7)
    for fmt in quant.FORMATS:
        data, scales = quant.quantize(w, fmt)
        np.testing.assert_array_equal(data, whole[fmt][0])
        if scales is not None:
            np.testing.assert_array_equal(scales, whole[fmt][1])


def test_int8_is_symmetric_per_row():
    """Per row one scale between max|w| / 127 and half of it, the one of least squared error; the
    weights rounded to it and clipped to +-127."""
    w = awkward_matrix(np.random.default_rng(2), 20, 96)
    data, scales = quant.quantize(w, "int8")
    assert data.dtype == np.int8 and data.shape == w.shape and scales.dtype == np.float32
    top = np.abs(w).max(1) / np.float32(127)
    assert (scales <= top).all() and (scales >= 0.5 * top * 0.9999).all()
    np.testing.assert_array_equal(data, np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8))
    assert data[0, :32].tolist() == [0] * 32

    def sq_error(s):
        return np.square(np.clip(np.rint(w / s[:, None]), -127, 127) * s[:, None] - w).sum(1)

    deq = quant.dequantize(data, "int8", scales)
    np.testing.assert_allclose(np.square(deq - w).sum(1), sq_error(scales), rtol=1e-5)
    for factor in (1.0, 0.9, 0.75, 0.5):  # no scale of the grid does better
        assert (sq_error(scales) <= sq_error(top * np.float32(factor)) * (1 + 1e-6)).all(), factor
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
        quant.quantize(np.zeros((1, 32), np.float32), "q3_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        quant.quantize(np.zeros((1, 288), np.float32), "q4_k")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.zeros((1, 48), np.float32), "q4_0")


def test_planned_formats_follow_llama_cpp():
    """--quantize F quantizes what llama.cpp's quantizer does: linear weights, the token embedding and
    the head, the head (lm_head, or the tied embedding) of a model below 8 bits at q6_k; not norms or
    biases. K-quants fall back where rows are not a multiple of 256, as llama.cpp's do."""
    plan = quant.planned_format
    fallback = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
    for fmt in quant.FORMATS:
        below_8_bits = fmt not in ("int8", "q8_0")
        for cols in (64, 512):
            body = fmt if cols % quant.block_cols(fmt) == 0 else fallback[fmt]
            head = ("q6_k" if cols % 256 == 0 else "q8_0") if below_8_bits else fmt
            assert plan("layers.0.ffn.down.weight", (64, cols), fmt, tied_head=True) == body
            assert plan("embed.weight", (100, cols), fmt, tied_head=False) == body
            assert plan("lm_head.weight", (100, cols), fmt, tied_head=False) == head
            assert plan("embed.weight", (100, cols), fmt, tied_head=True) == head
            assert plan("embed.weight", (100, cols), fmt, tied_head=True, embeddings=False) is None
        assert plan("layers.0.attn_norm.weight", (64,), fmt, tied_head=True) is None
        assert plan("layers.0.attn.qkv.bias", (96,), fmt, tied_head=True) is None
        assert plan("pos_embed.weight", (100, 64), fmt, tied_head=True) is None
        assert plan("layers.0.ffn.down.weight", (64, 200), fmt, tied_head=True) is None


# ---------------------------------------------------------------------------------------------
# convert --quantize, pyxf.load(quantize=...)


def convert(*args, **kwargs):
    from pyxf.convert import convert

    return convert(*args, **kwargs)


def convert_quiet(*args, **kwargs):
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
    # hidden 96, intermediate 200: ffn.down's rows (200) are not a multiple of 32 and stay float;
    # K-quants need rows of 256 and fall back as llama.cpp's do (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0)
    _, float_dir = tiny_models("llama_mqa_d32")
    out = convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / fmt, quantize=fmt)
    config, tensors = read_dir(out)
    _, floats = read_dir(float_dir)
    small = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}.get(fmt, fmt)  # rows of 96: no K-quant blocks
    expected = {f"layers.{i}.{k}.weight": small for i in range(2) for k in ("attn.qkv", "attn.out", "ffn.gate_up")}
    expected["embed.weight"] = small  # untied: the embedding in the model's format, the head at 8 bits below 8
    expected["lm_head.weight"] = fmt if fmt in ("int8", "q8_0") else "q8_0"  # (q6_k, falling back on rows of 96)
    assert config["quantization"] == {"method": fmt, "tensors": expected}
    assert config["dtype"] == "float32"
    for name, stored in expected.items():
        want_dtype = "I8" if stored == "int8" else "U8"
        assert tensors.dtypes[name] == want_dtype
        rows, cols = floats[name].shape
        assert tensors[name].shape == (rows, quant.row_bytes(stored, cols))
        data, scales = quant.quantize(np.asarray(floats[name]), stored)
        np.testing.assert_array_equal(tensors[name], data.view(tensors[name].dtype))
        if stored == "int8":
            np.testing.assert_array_equal(tensors[name + "_scale"], scales)
        if stored != "int8":  # the stored blocks are the gguf package's, byte for byte
            np.testing.assert_array_equal(tensors[name], gguf.quants.quantize(np.asarray(floats[name]), QTYPES[stored]))
    for name in ("layers.0.ffn.down.weight", "layers.1.attn_norm.weight"):
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
    stored = list(at_load.config["quantization"]["tensors"].values())
    common = max(set(stored), key=stored.count)  # fmt, or the K-quants' fallback on rows of 96
    assert f" {common} {stored.count(common)} tensors " in repr(at_load) and "decode reads" in repr(at_load)
    logits = converted.logits(ids)
    np.testing.assert_array_equal(at_load.logits(ids), logits)  # the same arrays, the same arithmetic
    bound = {"int8": 0.08, "q8_0": 0.08, "q4_0": 0.5, "q4_1": 0.5, "q5_0": 0.35, "q5_1": 0.35,
             "q4_k": 0.35, "q5_k": 0.35, "q6_k": 0.08}[fmt]  # embeddings too; K-quants fall back here
    assert relative_error(logits, reference) < bound
    generated = pyxf.generate(converted, [ids[:5]], max_new_tokens=4, temperature=0)
    assert len(generated[0]) == 4


def test_quantized_embeddings_serve_as_tied_head(tiny_models, tmp_path):
    helpers.require_core()
    import pyxf

    hf, float_dir = tiny_models("qwen2_d128_tied")
    hf_dir = float_dir.parent / "qwen2_d128_tied-hf"
    ids = helpers.random_ids(640, 30, seed=4)
    reference = pyxf.load(float_dir).logits(ids)
    # hidden 256: the tied head of a 4-bit model at q6_k, as llama.cpp stores it
    for fmt, head in (("q8_0", "q8_0"), ("q4_0", "q6_k")):
        out = convert_quiet(hf_dir, tmp_path / fmt, quantize=fmt)
        config, tensors = read_dir(out)
        assert config["tie_word_embeddings"] and config["quantization"]["tensors"]["embed.weight"] == head
        assert config["quantization"]["tensors"]["layers.0.attn.qkv.weight"] == fmt
        assert "lm_head.weight" not in tensors and tensors.dtypes["embed.weight"] == "U8"
        logits = pyxf.load(out).logits(ids)
        assert relative_error(logits, reference) < (0.08 if fmt == "q8_0" else 0.4)
        np.testing.assert_array_equal(pyxf.load(float_dir, quantize=fmt).logits(ids), logits)
    float_embed = pyxf.load(float_dir, quantize="q8_0", quantize_embeddings=False)
    assert "embed.weight" not in float_embed.config["quantization"]["tensors"]
    config, tensors = read_dir(convert_quiet(hf_dir, tmp_path / "float-embed", quantize="q8_0",
                                             quantize_embeddings=False))
    assert "embed.weight" not in config["quantization"]["tensors"] and tensors.dtypes["embed.weight"] == "F32"


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
    assert tensors.dtypes["layers.0.ffn.down.weight"] == "F16" and tensors.dtypes["layers.0.attn.qkv.weight"] == "I8"
    assert tensors.dtypes["layers.0.attn.qkv.weight_scale"] == "F32"
    # float16 + int8 on random weights: 0.049 with max|w| int8 scales, 0.050 with least-squares ones
    assert relative_error(pyxf.load(out).logits(ids), pyxf.load(float_dir).logits(ids)) < 0.06


def test_gpt2_quantizes(tiny_models, tmp_path):
    helpers.require_core()
    import pyxf

    _, float_dir = tiny_models("gpt2_d32")
    ids = helpers.random_ids(400, 30, seed=6)
    model = pyxf.load(float_dir, quantize="q8_0")
    assert len(model.config["quantization"]["tensors"]) == 9  # qkv, out, up, down of 2 layers; the tied embedding
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
    wrong_shape = variant("shape", lambda c: formats(c).update({"lm_head.weight": "q4_0"}))  # q8_0 bytes stored
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
        assert main([str(hf_dir), str(tmp_path / "a"), "--quantize", "q4_1", "--quiet"]) == 0
        assert main([str(hf_dir), str(tmp_path / "b"), "--quantize", "q4_1", "--no-quantize-embeddings", "--quiet"]) == 0
    assert read_dir(tmp_path / "a")[0]["quantization"]["tensors"]["embed.weight"] == "q4_1"
    assert "embed.weight" not in read_dir(tmp_path / "b")[0]["quantization"]["tensors"]
    for bad in (["--quantize-embeddings"], ["--dequantize", "--quantize", "q8_0"]):
        with pytest.raises(SystemExit):
            main([str(hf_dir), str(tmp_path / "c"), *bad])


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


def test_gguf_blocks_are_kept_by_default(quantized_gguf, tmp_path):
    floats_dir = convert_quiet(quantized_gguf, tmp_path / "float", dequantize=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept_dir = convert(quantized_gguf, tmp_path / "kept", progress=False)
    assert not [w for w in caught if "stored as" in str(w.message)]  # every quantized tensor kept
    _, floats = read_dir(floats_dir)
    assert not read_dir(floats_dir)[0].get("quantization") and set(floats.dtypes.values()) == {"F32"}
    config, kept = read_dir(kept_dir)
    assert config["quantization"] == {
        "method": "gguf",
        "tensors": {
            "embed.weight": "q8_0",
            "layers.0.attn.qkv.weight": "q4_1",
            "layers.0.attn.out.weight": "q4_1",
            "layers.0.ffn.gate_up.weight": "q4_0",
            "layers.1.attn.qkv.weight": [["q4_1", 64], ["q8_0", 32], ["q4_1", 32]],  # q, k, v as stored
            "layers.1.attn.out.weight": "q4_1",
            "layers.1.ffn.gate_up.weight": "q4_0",
        },
    }
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(quantized_gguf).tensors}  # the reference reader
    np.testing.assert_array_equal(kept["embed.weight"], raw["token_embd.weight"])  # byte for byte
    np.testing.assert_array_equal(kept["layers.0.ffn.gate_up.weight"],
                                  np.concatenate([raw["blk.0.ffn_gate.weight"], raw["blk.0.ffn_up.weight"]]))
    # un-permuted block rows dequantize (gguf's reference) to exactly the float import's un-permuted rows
    for name, fmt in config["quantization"]["tensors"].items():
        np.testing.assert_array_equal(gguf_dequantize(kept[name], fmt, floats[name].shape), floats[name], err_msg=name)
    # F16: floats
    assert kept.dtypes["layers.0.ffn.down.weight"] == "F32"
    np.testing.assert_array_equal(kept["layers.0.ffn.down.weight"], floats["layers.0.ffn.down.weight"])


def gguf_dequantize(data, spec, shape):
    """gguf's reference dequantization of a stored tensor, segment by segment."""
    rows, cols = shape
    out, start = [], 0
    for fmt, n in quant.segments(spec, rows):
        size = n * quant.row_bytes(fmt, cols)
        part = np.asarray(data).reshape(-1)[start : start + size].reshape(n, -1)
        out.append(gguf.quants.dequantize(part, QTYPES[fmt]).reshape(n, cols))
        start += size
    return np.concatenate(out)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_gguf_quantize_requantizes_all_but_identical_blocks(quantized_gguf, tmp_path, fmt):
    """--quantize F on a GGUF file: every eligible tensor in F (the tied head at q8_0 for 4-bit F),
    from the dequantized values; tensors already stored in exactly that format are copied."""
    _, floats = read_dir(convert_quiet(quantized_gguf, tmp_path / "float", dequantize=True))
    config, tensors = read_dir(convert_quiet(quantized_gguf, tmp_path / fmt, quantize=fmt))
    formats = config["quantization"]["tensors"]
    assert config["quantization"]["method"] == fmt
    linear = [f"layers.{i}.{k}.weight" for i in range(2) for k in ("attn.qkv", "attn.out", "ffn.gate_up", "ffn.down")]
    assert formats == {"embed.weight": "q8_0", **dict.fromkeys(linear, fmt)}
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(quantized_gguf).tensors}
    np.testing.assert_array_equal(tensors["embed.weight"], raw["token_embd.weight"])
    for name in linear:
        np.testing.assert_array_equal(tensors[name], gguf.quants.quantize(floats[name], QTYPES[fmt]), err_msg=name)


def test_gguf_kept_model_runs_like_its_float_import(quantized_gguf, tmp_path):
    helpers.require_core()
    import pyxf

    floats = pyxf.load(convert_quiet(quantized_gguf, tmp_path / "float", dequantize=True))
    kept = pyxf.load(convert_quiet(quantized_gguf, tmp_path / "kept"))
    ids = helpers.random_ids(256, 24, seed=8)
    # the same weights; only the 8-bit rounding of activations in the quantized products differs
    assert relative_error(kept.logits(ids), floats.logits(ids)) < 0.03
    summary = kept.weight_summary()
    assert set(summary["formats"]) == {"q4_1", "q4_0", "q8_0", "float32"}
    # q8_0: the embedding (also the head) and layer 1's k rows (its q, v rows are q4_1)
    assert summary["formats"]["q8_0"] == {"tensors": 2, "bytes": 256 * 2 * 34 + 32 * 2 * 34}
    assert summary["decode_bytes"] == sum(e["bytes"] for e in summary["formats"].values())


@pytest.mark.parametrize("gemv", ["rows", "stream"])
def test_gguf_segmented_matrix_decodes_like_its_float_import(quantized_gguf, tmp_path, gemv):
    """Layer 1's qkv is three row ranges in two formats, run as one matrix: decode steps (the
    GEMV, on both AVX-512 decode kernels; other ISAs take their own) give the float import's
    logits up to the 8-bit rounding of the activations, with both KV cache types."""
    helpers.require_core()
    import pyxf
    from pyxf import _core

    floats = pyxf.load(convert_quiet(quantized_gguf, tmp_path / "float", dequantize=True))
    kept_dir = convert_quiet(quantized_gguf, tmp_path / "kept")
    ids = helpers.random_ids(256, 12, seed=9)
    expected = floats.logits(ids)
    before = _core.get_quant_gemv()
    try:
        _core.set_quant_gemv(gemv)
        for kv in ("float32", "float16"):
            session = pyxf.load(kept_dir, kv_cache_dtype=kv).session()
            rows = [session.feed(ids[:4])[-1]] + [session.feed([t])[0] for t in ids[4:]]
            assert relative_error(np.stack(rows), expected[3:]) < 0.03, kv
    finally:
        _core.set_quant_gemv(before)


def test_cli_gguf_notice_and_info(quantized_gguf, tmp_path, capsys):
    helpers.require_core()
    import subprocess
    import sys

    from pyxf.convert import main

    assert main([str(quantized_gguf), str(tmp_path / "kept"), "--quiet"]) == 0
    notice = [line for line in capsys.readouterr().err.splitlines() if "stored as float32" in line]
    assert notice == []  # layer 1's q, k, v (Q4_1, Q8_0, Q4_1) are kept, each part in its own format
    assert main([str(quantized_gguf), str(tmp_path / "float"), "--dequantize", "--quiet"]) == 0
    cli = [sys.executable, "-m", "pyxf", "info", "--model"]
    child = helpers.child_process_options()
    kept = json.loads(subprocess.run([*cli, str(tmp_path / "kept")], capture_output=True, check=True, text=True,
                                     **child).stdout)
    floats = json.loads(subprocess.run([*cli, str(tmp_path / "float")], capture_output=True, check=True,
                                       text=True, **child).stdout)
    # q8_0: the embedding and layer 1's k rows
    assert kept["model"]["formats"]["q8_0"]["tensors"] == 2 and list(floats["model"]["formats"]) == ["float32"]
    assert floats["model"]["decode_bytes"] > 2 * kept["model"]["decode_bytes"]  # the F16 down projections are float


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m"])
def test_k_quant_mixes_run_close_to_float(tiny_models, tmp_path, mix):
    # llama.cpp's mixes on a 2-layer model: layer 1 is a "more bits" layer (the last eighth), so its
    # attention v rows are q6_k, falling back to q8_0 on rows of 96; layer 0 is all q4_k / q5_k
    helpers.require_core()
    import pyxf

    _, float_dir = tiny_models("llama_mqa_d32")
    ids = helpers.random_ids(384, 40, seed=3)
    reference = pyxf.load(float_dir).logits(ids)
    converted = pyxf.load(convert_quiet(float_dir.parent / "llama_mqa_d32-hf", tmp_path / mix, quantize=mix))
    formats = converted.config["quantization"]["tensors"]
    base = {"q4_k_m": "q5_0", "q5_k_m": "q5_1"}[mix]  # q4_k / q5_k on rows of 96
    c = converted.config
    v_rows = c["num_kv_heads"] * c["head_dim"]
    qk_rows = (c["num_heads"] + c["num_kv_heads"]) * c["head_dim"]
    assert formats["layers.0.attn.qkv.weight"] == base
    assert formats["layers.1.attn.qkv.weight"] == [[base, qk_rows], ["q8_0", v_rows]]
    assert formats["embed.weight"] == base and formats["lm_head.weight"] == "q8_0"
    assert "layers.0.ffn.down.weight" not in formats  # 200 columns: not even 32-blocks
    at_load = pyxf.load(float_dir, quantize=mix)
    assert at_load.config["quantization"] == converted.config["quantization"]
    np.testing.assert_array_equal(at_load.logits(ids), converted.logits(ids))
    assert relative_error(converted.logits(ids), reference) < 0.3
    assert len(pyxf.generate(converted, [ids[:5]], max_new_tokens=4, temperature=0)[0]) == 4


def test_load_rejects_bad_segments(quantized_gguf, tmp_path):
    helpers.require_core()
    import shutil

    import pyxf

    out = convert_quiet(quantized_gguf, tmp_path / "kept")
    name = "layers.1.attn.qkv.weight"

    def variant(tag, spec):
        path = tmp_path / tag
        shutil.copytree(out, path)
        config = json.loads((path / "config.json").read_text())
        config["quantization"]["tensors"][name] = spec
        (path / "config.json").write_text(json.dumps(config))
        return path

    for tag, spec, message in [
        ("rows", [["q4_1", 64], ["q8_0", 32], ["q4_1", 16]], "cover 112 rows, not 128"),
        ("int8", [["q4_1", 64], ["int8", 64]], "bad segment"),
        ("fmt", [["q4_1", 64], ["q9_9", 64]], "unknown quantization format 'q9_9'"),
        ("shape", [["q4_1", 64], ["q4_1", 64]], f"tensor {name} has shape"),  # bytes of q8_0 rows stored
        ("ksize", [["q4_k", 128]], "q4_k needs rows of a multiple of 256"),
        ("pairs", [["q4_1"], ["q8_0", 32]], "format name or"),
    ]:
        with pytest.raises(ValueError, match=message):
            pyxf.load(variant(tag, spec))
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["tensors"]["embed.weight"] = [["q8_0", 128], ["q8_0", 128]]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="embed.weight must be stored in one format"):
        pyxf.load(out)
