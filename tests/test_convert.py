"""The converter: safetensors I/O, HF checkpoints (llama, qwen2, gpt2), GGUF import and tokenizers.

Tiny random HF models are built with transformers; the SmolLM2 GGUF tests fetch the real file through
pyxf.hub (cached under $PYXF_CACHE) and skip only when it cannot be downloaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from pyxf.convert import convert, main
from pyxf.tensorfile import FormatError, bf16_to_float32, float32_to_bf16, read_safetensors, write_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")



# ---------------------------------------------------------------------------------------------
# helpers


def load_converted(out: Path):
    return json.loads((out / "config.json").read_text()), read_safetensors(out / "model.safetensors")


def as_float32(tensors, name):
    array = tensors[name]
    return bf16_to_float32(array) if tensors.dtypes[name] == "BF16" else np.asarray(array, dtype=np.float32)


def hf_state(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def make_model(kind: str, tie: bool):
    torch.manual_seed(0)
    if kind == "llama":  # GQA with odd sizes: 5 heads of 8, 1 kv head
        config = transformers.LlamaConfig(
            hidden_size=40,
            num_attention_heads=5,
            num_key_value_heads=1,
            num_hidden_layers=2,
            intermediate_size=56,
            vocab_size=97,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
            rms_norm_eps=1e-5,
            rope_theta=5000.0,
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":  # q/k/v biases
        config = transformers.Qwen2Config(
            hidden_size=36,
            num_attention_heads=6,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=44,
            vocab_size=89,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
        )
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_embd=24, n_head=3, n_layer=2, vocab_size=67, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    # random biases (HF initializes them to zero, which would hide ordering mistakes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model.eval()


def rewrite_header(path: Path, mutate) -> None:
    """Apply mutate(header dict) to a safetensors file's header, keeping the data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


# ---------------------------------------------------------------------------------------------
# tensorfile


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": float32_to_bf16(rng.standard_normal((2, 3)).astype(np.float32)),
        "i64": np.arange(5, dtype=np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "u8": np.arange(3, dtype=np.uint8),
        "i8": np.array([-1, 2], dtype=np.int8),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, metadata={"k": "v"}, dtypes={"bf16": "BF16"})
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0

    back = read_safetensors(path)
    assert back.metadata == {"k": "v"}
    assert back.dtypes["bf16"] == "BF16" and back.dtypes["f16"] == "F16" and back.dtypes["i8"] == "I8"
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)
        assert back[name].ctypes.data % array.dtype.itemsize == 0, f"{name} misaligned"
    assert not back["f32"].flags.writeable  # read-only memory map

    safetensors_torch = pytest.importorskip("safetensors.torch")  # the reference reader agrees
    reference = safetensors_torch.load_file(str(path))
    assert reference["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(reference["bf16"].float().numpy(), bf16_to_float32(tensors["bf16"]))
    np.testing.assert_array_equal(reference["i32"].numpy(), tensors["i32"])


def test_bf16_conversion_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 1.00390625, 1.01171875, 3e38, np.inf, np.nan], dtype=np.float32)
    bits = float32_to_bf16(x)
    back = bf16_to_float32(bits)
    assert back[0] == 1.0 and back[1] == -2.5
    assert back[2] == 1.0  # halfway, rounds to even
    assert back[3] == 1.015625  # halfway, rounds up to even
    assert np.isinf(back[5]) and np.isnan(back[6])
    ref = torch.tensor(x[:5]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back[:5], ref)


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.safetensors"
    write_safetensors(path, {"alpha": np.ones((4, 4), np.float32), "beta": np.ones((8,), np.float32)})
    return path


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        ("truncate", r"'beta'.*truncated"),
        ("bad_json", "not valid JSON"),
        ("unknown_dtype", r"'alpha'.*unknown dtype"),
        ("negative_shape", r"'alpha'.*shape"),
        ("wrong_size", r"'alpha'.*span 64 bytes but F32\[4, 5\] needs 80"),
        ("overlap", r"tensor '(alpha|beta)': data overlaps tensor '(alpha|beta)'"),
        ("huge_header", "header length"),
    ],
)
def test_corrupt_safetensors_raise_format_error(small_file, corrupt, expected):
    if corrupt == "truncate":
        small_file.write_bytes(small_file.read_bytes()[:-4])
    elif corrupt == "bad_json":
        raw = bytearray(small_file.read_bytes())
        raw[8] = ord("#")
        small_file.write_bytes(bytes(raw))
    elif corrupt == "huge_header":
        raw = small_file.read_bytes()
        small_file.write_bytes((10**6).to_bytes(8, "little") + raw[8:])
    else:

        def mutate(header):
            a, b = header["alpha"], header["beta"]
            if corrupt == "unknown_dtype":
                a["dtype"] = "F7"
            elif corrupt == "negative_shape":
                a["shape"] = [-4, 4]
            elif corrupt == "wrong_size":
                a["shape"] = [4, 5]
            elif corrupt == "overlap":
                b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + 32]

        rewrite_header(small_file, mutate)
    with pytest.raises(FormatError, match=expected) as error:
        read_safetensors(small_file)
    assert str(small_file) in str(error.value)
    assert isinstance(error.value, ValueError)


# ---------------------------------------------------------------------------------------------
# HF checkpoints


def check_llama_like(out: Path, model, dtype="float32"):
    config, tensors = load_converted(out)
    hf = hf_state(model)
    c = model.config
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    assert config["format"] == "pyxf" and config["family"] == "llama" and config["dtype"] == dtype
    assert (
        config["num_kv_heads"] == c.num_key_value_heads and config["head_dim"] == c.hidden_size // c.num_attention_heads
    )
    assert config["tie_word_embeddings"] == c.tie_word_embeddings

    def same(name, expected):
        np.testing.assert_allclose(as_float32(tensors, name), expected, rtol=tol, atol=tol, err_msg=name)

    same("embed.weight", hf["model.embed_tokens.weight"])
    same("final_norm.weight", hf["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        same(f"layers.{i}.attn.qkv.weight", np.concatenate(qkv))
        if p + "self_attn.q_proj.bias" in hf:
            same(f"layers.{i}.attn.qkv.bias", np.concatenate([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
        same(f"layers.{i}.attn.out.weight", hf[p + "self_attn.o_proj.weight"])
        same(
            f"layers.{i}.ffn.gate_up.weight",
            np.concatenate([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]),
        )
        same(f"layers.{i}.ffn.down.weight", hf[p + "mlp.down_proj.weight"])
        same(f"layers.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        same(f"layers.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
    if c.tie_word_embeddings:
        assert "lm_head.weight" not in tensors
    else:
        same("lm_head.weight", hf["lm_head.weight"])
    return config, tensors


def test_llama_safetensors(tmp_path):
    model = make_model("llama", tie=False)
    model.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    config, tensors = check_llama_like(out, model)
    layer = {
        "attn_norm.weight",
        "attn.qkv.weight",
        "attn.out.weight",
        "ffn_norm.weight",
        "ffn.gate_up.weight",
        "ffn.down.weight",
    }
    expected = {"embed.weight", "final_norm.weight", "lm_head.weight"} | {
        f"layers.{i}.{n}" for i in range(2) for n in layer
    }
    assert set(tensors) == expected
    assert tensors["layers.0.attn.qkv.weight"].shape == ((5 + 2 * 1) * 8, 40)
    assert config["rope_theta"] == 5000.0 and config["rope_scaling"] is None
    assert config["norm"] == "rmsnorm" and config["activation"] == "silu" and config["gated_ffn"] is True
    assert config["source"] == {"format": "hf-safetensors", "path": "hf"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_llama_half_dtypes(tmp_path, dtype):
    model = make_model("llama", tie=True)
    model.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", dtype=dtype, progress=False)
    _, tensors = check_llama_like(out, model, dtype)
    assert set(tensors.dtypes.values()) == {"F16" if dtype == "float16" else "BF16"}


def test_llama_pytorch_bin_and_shards(tmp_path):
    model = make_model("llama", tie=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    check_llama_like(convert(tmp_path / "sharded", tmp_path / "out1", progress=False), model)

    bin_dir = tmp_path / "bin"
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    config, _ = check_llama_like(convert(bin_dir, tmp_path / "out2", progress=False), model)
    assert config["source"]["format"] == "hf-torch"


def test_bare_state_dict_with_config(tmp_path):
    model = make_model("llama", tie=False)
    model.config.save_pretrained(tmp_path / "cfg")
    weights = tmp_path / "weights" / "ckpt.pt"
    weights.parent.mkdir()
    torch.save({"state_dict": model.state_dict(), "step": 7}, weights)
    out = convert(weights, tmp_path / "out", progress=False, config=tmp_path / "cfg" / "config.json")
    check_llama_like(out, model)


def test_qwen2_qkv_bias_and_tied_head(tmp_path):
    model = make_model("qwen2", tie=True)
    model.save_pretrained(tmp_path / "hf")
    _, tensors = check_llama_like(convert(tmp_path / "hf", tmp_path / "out", progress=False), model)
    assert tensors["layers.1.attn.qkv.bias"].shape == ((6 + 2 * 2) * 6,)
    assert "layers.0.attn.out.bias" not in tensors


def test_gpt2_transposes_conv1d(tmp_path):
    model = make_model("gpt2", tie=True)
    model.save_pretrained(tmp_path / "hf")
    config, tensors = load_converted(convert(tmp_path / "hf", tmp_path / "out", progress=False))
    hf = hf_state(model)
    assert config["family"] == "gpt2" and config["norm"] == "layernorm" and config["position"] == "learned"
    assert config["activation"] == "gelu_tanh" and config["gated_ffn"] is False
    assert config["intermediate_size"] == 96 and config["max_position_embeddings"] == 32
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    np.testing.assert_array_equal(tensors["embed.weight"], hf["transformer.wte.weight"])
    np.testing.assert_array_equal(tensors["pos_embed.weight"], hf["transformer.wpe.weight"])
    np.testing.assert_array_equal(tensors["final_norm.bias"], hf["transformer.ln_f.bias"])
    for i in range(2):
        h = f"transformer.h.{i}."
        assert tensors[f"layers.{i}.attn.qkv.weight"].shape == (72, 24)
        np.testing.assert_array_equal(tensors[f"layers.{i}.attn.qkv.weight"], hf[h + "attn.c_attn.weight"].T)
        np.testing.assert_array_equal(tensors[f"layers.{i}.attn.qkv.bias"], hf[h + "attn.c_attn.bias"])
        np.testing.assert_array_equal(tensors[f"layers.{i}.attn.out.weight"], hf[h + "attn.c_proj.weight"].T)
        np.testing.assert_array_equal(tensors[f"layers.{i}.ffn.up.weight"], hf[h + "mlp.c_fc.weight"].T)
        np.testing.assert_array_equal(tensors[f"layers.{i}.ffn.down.weight"], hf[h + "mlp.c_proj.weight"].T)
        np.testing.assert_array_equal(tensors[f"layers.{i}.attn_norm.bias"], hf[h + "ln_1.bias"])
        np.testing.assert_array_equal(tensors[f"layers.{i}.ffn_norm.weight"], hf[h + "ln_2.weight"])
    # the converted layout computes what HF computes: check one attention projection
    x = np.random.default_rng(1).standard_normal((3, 24)).astype(np.float32)
    with torch.no_grad():
        ref = model.transformer.h[0].attn.c_attn(torch.from_numpy(x)).numpy()
    mine = x @ tensors["layers.0.attn.qkv.weight"].T + tensors["layers.0.attn.qkv.bias"]
    np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-5)


def test_unknown_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match=r"FooForCausalLM.*supported:.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_missing_tensors_are_all_listed(tmp_path):
    model = make_model("llama", tie=False)
    model.save_pretrained(tmp_path / "hf")
    weights = read_safetensors(tmp_path / "hf" / "model.safetensors")
    dropped = ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    kept = {k: np.array(v) for k, v in weights.items() if k not in dropped}
    del weights
    write_safetensors(tmp_path / "hf" / "model.safetensors", kept)
    with pytest.raises(
        ValueError, match=r"missing source tensors \(2\): layers\.1\.mlp\.up_proj\.weight, lm_head\.weight"
    ):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_missing_paths_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path / "empty", tmp_path / "out", progress=False)


def test_rope_parameters_v4_and_v5():
    from pyxf.convert.families import normalized_config

    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 128,
        "vocab_size": 10,
    }
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v4 = normalized_config({**base, "rope_theta": 500000.0, "rope_scaling": llama3, "eos_token_id": [1, 2]})
    v5 = normalized_config({**base, "rope_parameters": {**llama3, "rope_theta": 500000.0}, "eos_token_id": 2})
    for c in (v4, v5):
        assert c["rope_theta"] == 500000.0 and c["rope_scaling"] == llama3
        assert c["num_kv_heads"] == 4 and c["head_dim"] == 16
    assert v4["eos_token_id"] == [1, 2] and v5["eos_token_id"] == [2]
    plain = normalized_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain["rope_scaling"] is None and plain["rope_theta"] == 1e4
    with pytest.raises(ValueError, match="activation 'quick_gelu'"):
        normalized_config({**base, "hidden_act": "quick_gelu"})


def test_tokenizer_files_and_bos_handling(tmp_path):
    """tokenizer.json with a BOS-adding template: the BOS moves to config.json's add_bos_token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    model = make_model("llama", tie=False)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.encode("hello world").ids == [1, 3, 4]
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (hf_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))

    out = convert(hf_dir, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"] == "tokenizer.json" and config["add_bos_token"] is True
    assert config["chat_template"] == "{{ messages }}"
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == [2, 0]
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hello world").ids == [3, 4]

    # an explicit add_bos_token=false wins over the template
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    config = json.loads((convert(hf_dir, tmp_path / "out2", progress=False) / "config.json").read_text())
    assert config["add_bos_token"] is False and config["chat_template"] is None


def test_cli(tmp_path, capsys):
    model = make_model("gpt2", tie=True)
    model.save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "out"), "--dtype", "float16", "--quiet"]) == 0
    config, tensors = load_converted(tmp_path / "out")
    assert config["dtype"] == "float16" and tensors.dtypes["embed.weight"] == "F16"
    assert main([str(tmp_path / "missing"), str(tmp_path / "out3"), "--quiet"]) == 1
    assert "missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# GGUF: a tiny file written here (llama permutation, sentencepiece vocabulary) and SmolLM2


def permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: each head's two halves are interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def spm_vocabulary():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = [
        "▁",
        "e",
        "t",
        "h",
        "a",
        "c",
        "s",
        "o",
        "n",
        "r",
        "l",
        "1",
        "2",
        "▁t",
        "he",
        "▁the",
        "▁a",
        "at",
        "▁c",
        "▁cat",
        "on",
        "▁on",
        "er",
        "▁s",
        "ll",
        "el",
        "lo",
        "hel",
        "hello",
        "▁hello",
        "12",
        "▁1",
    ]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    tokens += pieces + ["<|user|>"]
    types += [1] * len(pieces) + [4]
    return tokens, scores + [0.0], types


def _tiny_gguf_writer(gguf, path, arch, vocabulary):
    """A GGUFWriter with the tiny test models' shape (2 layers, hidden 64, FFN 96, 4 heads, 2 KV heads,
    128 positions) and a sentencepiece vocabulary (tokens, scores, types; BOS 1, EOS 2)."""
    tokens, scores, types = vocabulary
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer llama GGUF written like llama.cpp does (permuted Q/K; Q8_0 and F16 tensors)."""
    gguf = pytest.importorskip("gguf")
    tokens, scores, types = spm_vocabulary()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=len(tokens),
        tie_word_embeddings=False,
    )
    hf = hf_state(transformers.LlamaForCausalLM(config))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = _tiny_gguf_writer(gguf, path, "llama", (tokens, scores, types))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(20000.0)
    w.add_rope_dimension_count(16)
    w.add_unk_token_id(0)
    w.add_chat_template("{{ bos_token }}")
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(hf["model.embed_tokens.weight"], q8), raw_dtype=q8)
    w.add_tensor("output.weight", hf["lm_head.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute_like_llama_cpp(hf[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute_like_llama_cpp(hf[p + "self_attn.k_proj.weight"], 2))
        w.add_tensor(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", hf[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", hf[p + "mlp.down_proj.weight"].astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf


def test_gguf_import_undoes_rope_permutation(tiny_gguf, tmp_path):
    path, hf = tiny_gguf
    config, tensors = load_converted(convert(path, tmp_path / "out", progress=False, dequantize=True))
    assert config["num_heads"] == 4 and config["num_kv_heads"] == 2 and config["head_dim"] == 16
    assert config["rope_theta"] == 20000.0 and config["tie_word_embeddings"] is False
    assert config["add_bos_token"] is True and config["bos_token_id"] == 1 and config["eos_token_id"] == [2]
    assert config["source"] == {"format": "gguf", "path": "tiny.gguf"}
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = np.concatenate([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        np.testing.assert_array_equal(tensors[f"layers.{i}.attn.qkv.weight"], qkv)
        down = hf[p + "mlp.down_proj.weight"].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(tensors[f"layers.{i}.ffn.down.weight"], down)
    np.testing.assert_allclose(tensors["embed.weight"], hf["model.embed_tokens.weight"], atol=0.02)  # Q8_0
    np.testing.assert_array_equal(tensors["lm_head.weight"], hf["lm_head.weight"])



@pytest.mark.parametrize("stored,dtype", [("F16", "float16"), ("BF16", "bfloat16"), ("Q8_0", "float32")])
def test_gguf_floats_keep_the_file_type_by_default(tmp_path, stored, dtype):
    """With no dtype, a F16 or BF16 GGUF file stays 16-bit (as llama.cpp runs it), and the float
    tensors of a quantized file (its norms, the matrices whose rows are not whole blocks) are float32."""
    import tiny_files
    from pyxf.tensorfile import read_safetensors

    path = tiny_files.write_gguf(tmp_path / "m.gguf", seed=2, quantized=None if stored == "F16" else stored)
    out = convert(path, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype
    dtypes = read_safetensors(out / "model.safetensors").dtypes
    floats = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    assert dtypes["layers.0.attn.qkv.weight"] in ({floats} if stored != "Q8_0" else {"F32", "U8"})
    assert dtypes["final_norm.weight"] == floats


TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    "  multiple   spaces  ",
    "line1\nline2\n\n\ttabbed\r\n",
    "Numbers 1234567 3.14159 1,000,000 -42",
    "Unicode: café naïve 日本語 🤗 Ελληνικά",
    "don't won't I'm we've",
    "",
    " ",
    "   leading",
    "trailing   \n",
    "a" * 40,
    "x<|endoftext|>y",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def assert_same_encoding(out: Path, gguf_path: Path, texts):
    from tokenizers import Tokenizer

    config = json.loads((out / "config.json").read_text())
    mine = Tokenizer.from_file(str(out / config["tokenizer"]))
    reference = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in texts:
        ids = mine.encode(text, add_special_tokens=False).ids
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        with_bos = [config["bos_token_id"]] * config["add_bos_token"] + ids
        assert with_bos == reference(text)["input_ids"], text
        assert mine.decode(ids, skip_special_tokens=False) == reference.decode(ids), text


def test_gguf_sentencepiece_tokenizer_matches_transformers(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = convert(path, tmp_path / "out", progress=False)
    assert_same_encoding(
        out,
        path,
        [
            "the cat",
            "hello there",
            " the  cat on",
            "hello<|user|>the</s>x<unk>",
            "café 🤗 12 1 12",
            "\n\nthe\tcat",
            "",
            " ",
            "<s>the",
        ],
    )


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file, fetched by pyxf.hub on first use (skipped only when it
    cannot be downloaded)."""
    from pyxf import hub

    try:
        return hub.default_gguf_path()
    except RuntimeError as e:
        if "could not download" in str(e):
            pytest.skip(f"SmolLM2 could not be downloaded (no network?): {e}")
        raise


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model", progress=False, dequantize=True)


def test_smollm2_config(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    expected = {
        "family": "llama",
        "num_layers": 30,
        "hidden_size": 576,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": [2],
        "add_bos_token": False,
        "tokenizer": "tokenizer.json",
    }
    assert {k: config[k] for k in expected} == expected
    assert "<|im_start|>" in config["chat_template"]


def test_smollm2_weights_match_transformers(smollm2, smollm2_gguf):
    _, tensors = load_converted(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    hf = hf_state(model)
    del model
    expected = {"embed.weight": hf["model.embed_tokens.weight"], "final_norm.weight": hf["model.norm.weight"]}
    for i in range(30):
        p = f"model.layers.{i}."
        expected[f"layers.{i}.attn.qkv.weight"] = np.concatenate([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        expected[f"layers.{i}.attn.out.weight"] = hf[p + "self_attn.o_proj.weight"]
        expected[f"layers.{i}.ffn.gate_up.weight"] = np.concatenate(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
        )
        expected[f"layers.{i}.ffn.down.weight"] = hf[p + "mlp.down_proj.weight"]
        expected[f"layers.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        expected[f"layers.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    assert set(tensors) == set(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(tensors[name], array, rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_gguf):
    assert_same_encoding(smollm2, smollm2_gguf, TEXTS)


def test_qwen3_gguf_runs_like_transformers(tmp_path):
    """A Qwen3 GGUF as llama.cpp lays it out (arch qwen3: no Q/K permutation, per-head
    blk.N.attn_q_norm / attn_k_norm, key_length for head_dim): converted, its logits equal
    transformers' Qwen3ForCausalLM on the same weights."""
    gguf = pytest.importorskip("gguf")
    import pyxf

    tokens, scores, types = spm_vocabulary()
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_hidden_layers=2,
        intermediate_size=96, vocab_size=len(tokens), tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=128,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a missing q/k norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    hf = hf_state(model)
    path = tmp_path / "qwen3.gguf"
    w = _tiny_gguf_writer(gguf, path, "qwen3", (tokens, scores, types))
    w.add_key_length(24)
    w.add_value_length(24)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(2):
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", hf[f"model.layers.{i}.{theirs}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    px = pyxf.load(convert(path, tmp_path / "out", progress=False))
    assert px.config["qk_norm"] is True and px.config["head_dim"] == 24
    ids = [1, 5, 9, 13, 40, 41, 7, 3, 22]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(px.logits(ids), expected, atol=1e-4, rtol=0)
