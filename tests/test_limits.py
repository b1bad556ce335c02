"""Resource limits: files whose headers claim huge layer counts, vocabularies, contexts or arrays are
rejected with a ValueError before pyxf does work or allocates memory in proportion to the claim.

Each case is a small valid file (tests/tiny_files.py) with one value edited, the way a hostile
upload would be; each must fail within a second or two, where before the fix several spent
minutes and gigabytes (a config.json with num_layers 2**31 made pyxf.load list 2**31 layers).
"""

import json
import shutil
import struct
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import pyxf
import tiny_files
from pyxf.convert import convert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@contextmanager
def quickly(seconds=2.0):
    """The block must finish within `seconds` (the claims below would take minutes otherwise)."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.1f} s"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_files.write_pyxf_model(tmp_path_factory.mktemp("tiny") / "model")


def edited_copy(base, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(base, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_base_model_loads_and_generates(base_dir):
    pytest.importorskip("pyxf._core")
    model = pyxf.load(base_dir)
    assert len(pyxf.generate(model, [[2, 3]], max_new_tokens=4)[0]) == 4


@pytest.mark.parametrize("changes, message", [
    ({"num_layers": 2**31}, "'num_layers' is 2147483648, more than pyxf supports"),
    ({"num_layers": 2**63}, "'num_layers' is 9223372036854775808, more than pyxf supports"),
    ({"num_layers": 2**31 - 1}, "describes 2147483647 layers layers.N, at least 12884901884 tensors, but "
                                "model.safetensors holds 8"),
    ({"num_layers": 20}, "describes 20 layers"),
    ({"num_layers": 5}, "lacks 24 expected tensor"),
    ({"vocab_size": 2**31 - 1}, r"embed.weight has shape \[48, 16\], expected \[2147483647, 16\]"),
    ({"hidden_size": 2**31 - 1}, "has shape"),
    ({"intermediate_size": 2**30}, r"2 \* intermediate_size is 2147483648"),
    ({"num_heads": 2**30, "num_kv_heads": 2**30}, r"\(num_heads \+ 2 num_kv_heads\) \* head_dim"),
    ({"max_position_embeddings": 2**40}, "'max_position_embeddings' is 1099511627776, more than pyxf supports"),
    ({"partial_rotary_factor": 1e12}, "'partial_rotary_factor' must be a number in"),
    ({"quantization": {"method": "q8_0", "tensors": {"layers.2147483000.attn.qkv.weight": "q8_0"}}},
     "layers.2147483000.attn.qkv.weight cannot be stored quantized"),
])
def test_huge_config_claims_fail_fast(base_dir, tmp_path, changes, message):
    copy = edited_copy(base_dir, tmp_path, **changes)
    with quickly(), pytest.raises(ValueError, match=message):
        pyxf.load(copy)


@pytest.mark.parametrize("changes, message", [
    ({"num_encoder_layers": 2**31 - 1, "position": "sinusoidal"}, "describes 2147483647 layers encoder.layers.N"),
    ({"num_encoder_layers": 2**31, "position": "sinusoidal"}, "'num_encoder_layers' is 2147483648"),
    ({"num_encoder_layers": 1, "position": "sinusoidal", "max_position_embeddings": 2**30},
     "a sinusoidal table of .* entries is made at load"),
    ({"num_encoder_layers": 1, "position": "relative", "relative_attention_num_buckets": 32,
      "relative_attention_max_distance": 2**40}, "'relative_attention_max_distance' is 1099511627776"),
])
def test_huge_seq2seq_claims_fail_fast(base_dir, tmp_path, changes, message):
    copy = edited_copy(base_dir, tmp_path, family="transformer", architecture="encoder-decoder",
                       decoder_start_token_id=0, **changes)
    with quickly(), pytest.raises(ValueError, match=message):
        pyxf.load(copy)


def test_huge_context_is_a_clear_memory_error(tmp_path):
    """A RoPE model may claim a context of 2**30 positions (nothing in the file bounds it); the KV
    cache a session would need is refused by the allocator before anything is touched."""
    pytest.importorskip("pyxf._core")
    model = pyxf.load(tiny_files.write_pyxf_model(tmp_path / "m", max_position_embeddings=2**30))
    with quickly(), pytest.raises(MemoryError, match=r"a KV cache of 1073741824 positions needs 64.0 GiB"):
        model.session()
    assert model.session(context_length=128).feed([1, 2]).shape == (2, tiny_files.TINY["vocab_size"])


# ---------------------------------------------------------------------------------------------
# the converter


def hf_copy(tmp_path, **config_changes):
    return tiny_files.write_hf_llama(tmp_path / "hf", **config_changes)


def test_converter_base_checkpoint_converts(tmp_path):
    out = convert(hf_copy(tmp_path), tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["num_layers"] == 1


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 2**31 - 1}, "describes 2147483647 layers, at least 19327352823 source tensors, but "
                                       "the checkpoint has 11"),
    ({"num_hidden_layers": 2**63}, "describes 9223372036854775808 layers"),
    ({"num_hidden_layers": -1}, "num_layers must be a non-negative integer"),
])
def test_converter_huge_layer_count_fails_fast(tmp_path, changes, message):
    with quickly(), pytest.raises(ValueError, match=message):
        convert(hf_copy(tmp_path, **changes), tmp_path / "out", progress=False)


def test_converter_huge_label_count_fails_fast(tmp_path):
    src = hf_copy(tmp_path)
    config = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": 48,
              "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
              "max_position_embeddings": 64, "num_labels": 2**40}
    (src / "config.json").write_text(json.dumps(config))
    with quickly(), pytest.raises(ValueError, match=r"num_labels must be an integer in \[1, 65536\]"):
        convert(src, tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# GGUF


def gguf_with(tmp_path, edit=None, **kwargs):
    return tiny_files.write_gguf(tmp_path / "model.gguf", metadata_edit=edit, **kwargs)


def patched(path, marker: bytes, offset: int, value: bytes) -> Path:
    """The file with `value` written `offset` bytes after the end of `marker`."""
    data = bytearray(path.read_bytes())
    at = data.index(marker) + len(marker) + offset
    data[at : at + len(value)] = value
    out = path.with_name("patched.gguf")
    out.write_bytes(bytes(data))
    return out


def test_gguf_base_file_converts(tmp_path):
    pytest.importorskip("gguf")
    out = convert(gguf_with(tmp_path, quantized="Q8_0"), tmp_path / "out", progress=False, keep_quantized=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["method"] == "gguf"


def test_gguf_array_claiming_2_63_bytes_fails_fast(tmp_path):
    """gguf's own reader loops forever on this one (reads past the end return nothing and do not
    advance); pyxf walks the header with every count checked first."""
    gguf = pytest.importorskip("gguf")
    path = gguf_with(tmp_path, lambda w: w.add_key_value("test.bytes", [1, 2, 3], gguf.GGUFValueType.ARRAY,
                                                         sub_type=gguf.GGUFValueType.UINT8))
    bad = patched(path, b"test.bytes", 8, struct.pack("<Q", 2**63))  # after the value type and the item type
    with quickly(), pytest.raises(ValueError, match=r"'test.bytes' \(9223372036854775808 items\) needs"):
        convert(bad, tmp_path / "out", progress=False)


@pytest.mark.parametrize("what, marker, offset, value, message", [
    ("kv count", b"GGUF", 12, struct.pack("<Q", 2**62), "metadata entries and .* tensors cannot fit"),
    ("tensor count", b"GGUF", 4, struct.pack("<Q", 2**40), "metadata entries and 1099511627776 tensors cannot fit"),
    ("string array", b"tokenizer.ggml.tokens", 8, struct.pack("<Q", 2**61), "claims 2305843009213693952 items"),
    ("key length", b"GGUF", 20, struct.pack("<Q", 2**50), "metadata key needs 1125899906842624 bytes"),
    ("dimension product", b"token_embd.weight", 4, struct.pack("<QQ", 2**40, 2**40),
     r"exceeds the file"),
    ("dimension count", b"token_embd.weight", 0, struct.pack("<I", 9), "has 9 dimensions"),
    ("tensor type", b"token_embd.weight", 20, struct.pack("<I", 999), "unknown type 999"),
    ("tensor offset", b"token_embd.weight", 24, struct.pack("<Q", 2**40), "exceeds the file"),
])
def test_gguf_lying_header_fails_fast(tmp_path, what, marker, offset, value, message):
    pytest.importorskip("gguf")
    bad = patched(gguf_with(tmp_path), marker, offset, value)
    with quickly(), pytest.raises(ValueError, match=message):
        convert(bad, tmp_path / "out", progress=False)


def test_gguf_truncated_file_fails(tmp_path):
    pytest.importorskip("gguf")
    path = gguf_with(tmp_path)
    data = path.read_bytes()
    for keep in (4, 20, len(data) // 3, len(data) - 1):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with quickly(), pytest.raises(ValueError, match="truncated|not a valid GGUF|not a readable GGUF"):
            convert(cut, tmp_path / "out", progress=False)


def test_gguf_huge_block_count_fails_fast(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = gguf_with(tmp_path)
    bad = patched(path, b"llama.block_count", 4, struct.pack("<I", 2**31 - 1))  # after the value type
    assert gguf.GGUFReader(bad).fields["llama.block_count"].contents() == 2**31 - 1
    with quickly(), pytest.raises(ValueError, match="describes 2147483647 layers"):
        convert(bad, tmp_path / "out", progress=False)


def test_merges_are_not_derived_for_megabyte_tokens():
    """Deriving BPE merges tries every split of a token (quadratic): a token of a million
    characters is left without merges, with a warning, instead of taking hours."""
    from pyxf.convert.tokenizer_gguf import derive_merges

    vocab = {"a": 0, "b": 1, "ab": 2, "a" * 1_000_000: 3}
    with quickly(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merges = derive_merges(vocab, {token: -float(i) for token, i in vocab.items()})
    assert merges == [("a", "b")]
    assert any("longer than 256 characters get no merges" in str(w.message) for w in caught)


def test_safetensors_header_claiming_huge_tensor_fails_fast(tmp_path):
    from pyxf.tensorfile import FormatError, read_safetensors, write_safetensors

    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": np.zeros((4, 4), np.float32)})
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    for shape, offsets, message in [
        ([2**40, 2**40], [0, 2**82], "data ends at byte 4835703278458516698824704 of a 64-byte data buffer"),
        # 2**64 elements: numpy's int64 product wraps to 0, which matched an empty span
        ([2**32, 2**32], [0, 0], "span 0 bytes but F32.* needs 73786976294838206464"),
    ]:
        header["x"]["shape"], header["x"]["data_offsets"] = shape, offsets
        raw = json.dumps(header).encode().ljust(header_len)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + header_len :]))
        with quickly(), pytest.raises(FormatError, match=message):
            read_safetensors(bad)
