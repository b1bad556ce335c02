"""Resource limits: files whose headers claim huge layer counts, vocabularies, contexts or arrays are
rejected with a ValueError before pyxf does work or allocates memory in proportion to the claim.

Each case is a small valid file (tests/tiny_files.py) with one value edited, the way a hostile
upload would be; each must fail within a second or two, where before the fix several spent
minutes and gigabytes (a config.json with num_layers 2**31 made pyxf.load list 2**31 layers).
"""

import json
import os
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
from helpers import child_process_options
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
    cache a session would need is refused by the allocator before anything is touched (a float16
    cache: the tiny model's weights are float16)."""
    pytest.importorskip("pyxf._core")
    model = pyxf.load(tiny_files.write_pyxf_model(tmp_path / "m", max_position_embeddings=2**30))
    assert model.kv_cache_dtype == "float16"
    with quickly(), pytest.raises(MemoryError, match=r"a KV cache of 1073741824 positions needs 32.0 GiB"):
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
    out = convert(gguf_with(tmp_path, quantized="Q8_0"), tmp_path / "out", progress=False)  # blocks kept
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


# ---------------------------------------------------------------------------------------------
# files that change under a loaded model, full and read-only disks, Ctrl-C


def test_weight_file_truncated_under_a_loaded_model(tmp_path):
    """The weights are memory-mapped: touching pages of a truncated file would kill the process
    (SIGBUS). Every call first checks the file's size, so a truncation between calls is an
    exception and the interpreter lives on; a new file renamed over the old one is harmless."""
    pytest.importorskip("pyxf._core")
    from pyxf.tensorfile import FileChangedError

    model_dir = tiny_files.write_pyxf_model(tmp_path / "m")
    model = pyxf.load(model_dir)
    expected = pyxf.generate(model, [[2, 3, 4]], max_new_tokens=3)
    replacement = tmp_path / "new.safetensors"
    shutil.copy(model_dir / "model.safetensors", replacement)
    replacement.replace(model_dir / "model.safetensors")  # rename over it: the mapping keeps the old file
    assert pyxf.generate(model, [[2, 3, 4]], max_new_tokens=3) == expected

    model = pyxf.load(model_dir)
    session = model.session()
    os.truncate(model_dir / "model.safetensors", 100)
    for call in (lambda: pyxf.generate(model, [[2, 3, 4]], max_new_tokens=3), lambda: model.logits([1, 2]),
                 lambda: session.feed([1]), lambda: pyxf.Engine(model)):
        with pytest.raises(FileChangedError, match="was truncated to 100 bytes after it was loaded"):
            call()
    assert pyxf.generate(pyxf.load(tiny_files.write_pyxf_model(tmp_path / "again")), [[2, 3, 4]],
                         max_new_tokens=3) == expected


def _child_options():
    """A fresh interpreter that imports the pyxf under test and tests/tiny_files."""
    return child_process_options(Path(__file__).parent)


def _in_child(code, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          **_child_options())


def test_convert_onto_a_full_disk_leaves_no_partial_model(tmp_path):
    """A disk that fills up mid-write (here: a file size limit, which fails writes the same way)
    gives an OSError; the half-written weights are removed and no config.json marks the
    directory as a model."""
    src = tiny_files.write_hf_llama(tmp_path / "hf")
    out = tmp_path / "out"
    child = _in_child(f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # fail the write instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # bytes per file
from pyxf.convert import convert
try:
    convert({str(src)!r}, {str(out)!r}, progress=False)
except OSError as e:
    print("OSError", e.errno)
""")
    assert child.returncode == 0 and child.stdout.startswith("OSError"), child.stderr
    assert not (out / "config.json").exists() and not list(out.glob("model.safetensors*"))
    cli = _in_child(f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
from pyxf.cli import main
sys.exit(main(["convert", {str(src)!r}, {str(out)!r}, "--quiet"]))
""")
    assert cli.returncode == 1 and "pyxf convert: error: [Errno 27] File too large" in cli.stderr, cli.stderr


def test_convert_into_a_read_only_directory(tmp_path):
    src = tiny_files.write_hf_llama(tmp_path / "hf")
    if os.geteuid() == 0:  # root writes through permissions; /proc refuses everyone
        target = Path("/proc/pyxf-cannot-write-here")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "out"
    with pytest.raises(OSError):
        convert(src, target, progress=False)


LONG_RUNS = {
    "generate": """
model = pyxf.load(tiny_files.write_pyxf_model(root / "m", max_position_embeddings=1 << 20))
run = lambda: pyxf.generate(model, [[2, 3]], max_new_tokens=200_000)
after = lambda: pyxf.generate(model, [[2, 3]], max_new_tokens=2)
""",
    "stream": """
model = pyxf.load(tiny_files.write_pyxf_model(root / "m", max_position_embeddings=1 << 20))
run = lambda: "".join(pyxf.generate(model, "hello", max_new_tokens=200_000, stream=True))
after = lambda: pyxf.generate(model, [[2, 3]], max_new_tokens=2)
""",
    "encode": """
model = pyxf.load(tiny_files.write_pyxf_encoder(root / "e"))
run = lambda: model.encode(["hello world " * 10] * 200_000, batch_size=8)
after = lambda: model.encode(["hello"])
""",
    "translate": """
model = pyxf.load(tiny_files.write_pyxf_seq2seq(root / "s"))
run = lambda: pyxf.translate(model, [[5, 6, 7, 1]] * 4, beam_size=4, max_length=200_000)
after = lambda: pyxf.translate(model, [[5, 6, 7, 1]], beam_size=2, max_length=3)
""",
}


@pytest.mark.parametrize("what", sorted(LONG_RUNS))
def test_ctrl_c_stops_a_long_run_and_the_interpreter_lives(tmp_path, what):
    """SIGINT during a long generate / stream / encode / translate raises KeyboardInterrupt within a
    moment; the model is usable afterwards."""
    pytest.importorskip("pyxf._core")
    import signal
    import subprocess
    import sys

    # The child handles Ctrl-C as an interactive interpreter does, whatever it inherits: a test run
    # started in the background by a non-interactive shell (`pytest ... &`) ignores SIGINT and SIGQUIT
    # (POSIX), passes SIG_IGN on to its children, and Python then raises no KeyboardInterrupt.
    code = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import pyxf, tiny_files
root = Path({str(tmp_path)!r})
{LONG_RUNS[what]}
print("running", flush=True)
start = time.monotonic()
try:
    run()
    print("finished")
except KeyboardInterrupt:
    print("interrupted", flush=True)
after()
print("alive")
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, **_child_options())
    assert child.stdout.readline().strip() == "running", child.stderr.read()
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert out.split() == ["interrupted", "alive"], (out, err)
    assert time.monotonic() - sent < 30


# ---------------------------------------------------------------------------------------------
# what the fuzzers found (tests/fuzz/regressions holds the inputs themselves)


def test_tokenizer_must_be_a_file_of_the_model_directory(base_dir, tmp_path):
    for name in ("../../etc/passwd.json", "/etc/hosts.json", "sub/dir.json", ".."):
        copy = edited_copy(base_dir, tmp_path / name.replace("/", "_"), tokenizer=name)
        with pytest.raises(ValueError, match="'tokenizer' must be null or the name of a file in the model directory"):
            pyxf.load(copy)


def test_malformed_tokenizer_file_is_a_value_error(base_dir, tmp_path):
    copy = edited_copy(base_dir, tmp_path)
    (copy / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 12}}')
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer file"):
        pyxf.load(copy)


@pytest.mark.parametrize("template, message", [
    ("{{ messages[0]['content'] + 1 }}", "the model's chat template failed: TypeError"),
    ("{{ raise_exception('no system messages') }}", "no system messages"),
    ("{% for %}", "Expected an expression"),
])
def test_failing_chat_template_is_a_clear_error(template, message):
    import jinja2

    from pyxf.tokenizer import Tokenizer

    tokenizer = Tokenizer(None, chat_template=template)
    with pytest.raises((ValueError, jinja2.exceptions.TemplateError), match=message):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "llama3", "factor": 8.0}, "lacks 'low_freq_factor'"),
    ({"rope_type": "linear", "factor": "two"}, "is malformed"),
    ({"rope_type": "linear", "factor": 0.0}, "no finite rotation frequencies|is malformed"),
])
def test_malformed_rope_scaling_is_refused_by_the_converter_and_the_loader(base_dir, tmp_path, scaling, message):
    with pytest.raises(ValueError, match=message):
        convert(tiny_files.write_hf_llama(tmp_path / "hf", rope_scaling=scaling), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "config.json").exists()
    pytest.importorskip("pyxf._core")
    with pytest.raises(ValueError, match=message):
        pyxf.load(edited_copy(base_dir, tmp_path, rope_scaling=scaling))


@pytest.mark.parametrize("changes, message", [
    ({"norm_eps": "1e-5"}, "'norm_eps' must be a non-negative number"),
    ({"eos_token_id": "</s>"}, "'eos_token_id' must be null or non-negative token ids"),
    ({"bos_token_id": -1}, "'bos_token_id' must be null or non-negative token ids"),
    ({"rope_theta": [1]}, "'rope_theta' must be a positive number"),
    ({"chat_template": 7}, "'chat_template' must be null or a string"),
])
def test_config_values_of_the_wrong_kind(base_dir, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        pyxf.load(edited_copy(base_dir, tmp_path, **changes))
