"""Fuzz targets: each takes the bytes of one input and feeds them to a pyxf loader the way a file
from a stranger would arrive. A target returns normally when pyxf accepts the input or rejects it
with one of the exceptions its API promises for bad files (ValueError and its subclasses, such as
tensorfile.FormatError and json's errors; jinja2's TemplateError for templates); anything else
(another exception, a sanitizer report, a hang, a crash) is a finding.

    python tools/fuzz.py TARGET --time 3600      # coverage-guided (atheris), against the ASan build
    pytest tests/test_fuzz_regressions.py        # every seed and every past finding, as a test

Inputs are small: a model directory is packed as [u32 length][config.json][model.safetensors], the
tokenizer input picks a mode and is cut into strings with atheris' FuzzedDataProvider (a minimal
stand-in is used when atheris is not installed, so the regression tests run without it).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny_files

import numpy as np  # noqa: E402

import tiny_files  # noqa: E402

SEEDS = HERE / "seeds"
REGRESSIONS = HERE / "regressions"

_scratch = None


def scratch() -> Path:
    """A per-process directory for the files a target writes (on tmpfs when there is one)."""
    global _scratch
    if _scratch is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _scratch = Path(tempfile.mkdtemp(prefix="pyxf-fuzz-", dir=base))
    return _scratch


def _write(name: str, data: bytes) -> Path:
    path = scratch() / name
    path.write_bytes(data)
    return path


def _expected_errors():
    import jinja2

    return (ValueError, jinja2.exceptions.TemplateError)


# ---------------------------------------------------------------------------------------------
# safetensors: the reader alone, then every tensor read through


def safetensors_input(data: bytes) -> None:
    from pyxf.tensorfile import read_safetensors

    path = _write("fuzz.safetensors", data)
    try:
        tensors = read_safetensors(path)
    except ValueError:
        return
    for name, array in tensors.items():
        np.asarray(array).tobytes()  # every byte the header points at is readable
        assert tensors.dtypes[name]


# ---------------------------------------------------------------------------------------------
# model directory: config.json + model.safetensors (+ a fixed tokenizer), loaded and run


def pack_model_dir(config: bytes, weights: bytes) -> bytes:
    return struct.pack("<I", len(config)) + config + weights


def unpack_model_dir(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 4:
        return data, b""
    n = struct.unpack_from("<I", data)[0]
    return data[4 : 4 + n], data[4 + n :]


def model_dir_input(data: bytes) -> None:
    import pyxf

    config, weights = unpack_model_dir(data)
    directory = scratch() / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_bytes(config)
    (directory / "model.safetensors").write_bytes(weights)
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.exists():
        tokenizer.write_text(tiny_files.tokenizer_json())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = pyxf.load(directory)
    except (ValueError, FileNotFoundError):  # FileNotFoundError: config.json names a tokenizer it lacks
        return
    _run_briefly(model)


def _run_briefly(model) -> None:
    """A loaded model runs: one new token (decoders, encoder-decoders) or one embedding. Its
    argument checks may still refuse (a context of one position has no room for a new token)."""
    import pyxf

    try:
        if getattr(model, "is_encoder", False):
            if model.tokenizer is not None:
                model.encode(["hello"])
        elif getattr(model, "is_encoder_decoder", False):
            pyxf.generate(model, [0, 0], max_new_tokens=1)
        else:
            pyxf.generate(model, [[0, 0]], max_new_tokens=1)
    except ValueError:
        pass


# ---------------------------------------------------------------------------------------------
# GGUF importer: header, metadata, tensor infos, every tensor's blocks, the tokenizer


def gguf_input(data: bytes) -> None:
    from pyxf.convert.gguf_import import open_gguf

    path = _write("fuzz.gguf", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            checkpoint = open_gguf(path)
            for tensor in checkpoint.tensors.values():
                tensor.load()
                if tensor.load_raw is not None:
                    tensor.load_raw()
            out = scratch() / "gguf-tokenizer"
            out.mkdir(exist_ok=True)
            checkpoint.write_tokenizer(out)
        except ValueError:
            return


# ---------------------------------------------------------------------------------------------
# tokenizer and chat template


class _Provider:
    """The part of atheris.FuzzedDataProvider the targets use, for running inputs without atheris."""

    def __init__(self, data: bytes):
        self.data = data

    def _take(self, n):
        out, self.data = self.data[:n], self.data[n:]
        return out

    def ConsumeIntInRange(self, lo, hi):  # noqa: N802 -- atheris' names
        raw = int.from_bytes(self._take(4), "little")
        return lo + raw % (hi - lo + 1)

    def ConsumeUnicodeNoSurrogates(self, n):  # noqa: N802
        return self._take(n).decode("utf-8", "replace")

    def remaining_bytes(self):
        return len(self.data)


def provider(data: bytes):
    try:
        import atheris
    except ImportError:
        return _Provider(data)
    return atheris.FuzzedDataProvider(data)


_tokenizer = None


def _tiny_tokenizer():
    global _tokenizer
    if _tokenizer is None:
        from pyxf.tokenizer import Tokenizer

        path = scratch() / "tokenizer.json"
        path.write_text(tiny_files.tokenizer_json())
        _tokenizer = Tokenizer.from_file(path, tiny_files.pyxf_config())
    return _tokenizer


def tokenizer_input(data: bytes) -> None:
    """Mode 0: the bytes are a tokenizer.json. Otherwise a chat template, messages, a text and
    token ids, through apply_chat_template, encode, decode and the incremental detokenizer with
    stop strings (pyxf/text.py)."""
    from pyxf.text import TextTracker
    from pyxf.tokenizer import Tokenizer

    if data[:1] == b"\x00":
        try:
            tokenizer = Tokenizer.from_file(_write("fuzz-tokenizer.json", data[1:]), {})
            tokenizer.decode(tokenizer.encode("Hello, world! <|im_end|>"))
        except ValueError:
            return
        return
    fdp = provider(data[1:])
    tokenizer = _tiny_tokenizer()
    template = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    messages = [{"role": fdp.ConsumeUnicodeNoSurrogates(8), "content": fdp.ConsumeUnicodeNoSurrogates(40)}
                for _ in range(fdp.ConsumeIntInRange(0, 3))]
    stops = [fdp.ConsumeUnicodeNoSurrogates(4) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    text = fdp.ConsumeUnicodeNoSurrogates(200)
    chat = Tokenizer(tokenizer._backend, bos_token_id=0, eos_token_ids=[1], chat_template=template or None)
    try:
        rendered = chat.apply_chat_template(messages)
        assert isinstance(rendered, str)
    except _expected_errors():
        pass
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    tracker = TextTracker(tokenizer, [s for s in stops if s])
    for token in ids:
        tracker.push(token)
        shown = tracker.shown_text()
        assert tracker.final_text().startswith(shown), (shown, tracker.final_text())
    if not tracker.stopped:
        assert tracker.text == tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------
# converter: an HF checkpoint whose config.json is the input


_hf_dir = None


def convert_config_input(data: bytes) -> None:
    from pyxf.convert import convert

    global _hf_dir
    if _hf_dir is None:
        _hf_dir = tiny_files.write_hf_llama(scratch() / "hf")
    (_hf_dir / "config.json").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = convert(_hf_dir, scratch() / "converted", progress=False)
        except ValueError:
            return
        import pyxf

        try:
            model = pyxf.load(out)
        except ValueError:  # a config the converter accepts but the loader refuses: a finding
            raise AssertionError(f"converted model does not load: {sys.exc_info()[1]}") from None
    _run_briefly(model)


TARGETS = {
    "safetensors": safetensors_input,
    "model_dir": model_dir_input,
    "gguf": gguf_input,
    "tokenizer": tokenizer_input,
    "convert_config": convert_config_input,
}


# ---------------------------------------------------------------------------------------------
# seed corpora: small valid inputs of every kind (tools/fuzz.py --make-seeds writes them)


def make_seeds() -> dict[str, dict[str, bytes]]:
    """{target: {file name: bytes}}, a few KB each."""
    work = Path(tempfile.mkdtemp(prefix="pyxf-seeds-"))
    seeds: dict[str, dict[str, bytes]] = {name: {} for name in TARGETS}

    decoder = tiny_files.write_pyxf_model(work / "decoder")
    weights = (decoder / "model.safetensors").read_bytes()
    seeds["safetensors"]["decoder-f16.safetensors"] = weights
    seeds["safetensors"]["hf-llama.safetensors"] = (tiny_files.write_hf_llama(work / "hf") / "model.safetensors").read_bytes()
    seeds["safetensors"]["empty.safetensors"] = _safetensors_bytes(work, {})
    seeds["safetensors"]["dtypes.safetensors"] = _safetensors_bytes(work, {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i8": np.arange(-4, 4, dtype=np.int8),
        "u8": np.zeros((0, 3), np.uint8), "f64": np.ones(1), "i64": np.arange(2, dtype=np.int64)})

    seeds["model_dir"]["decoder-f16"] = pack_model_dir((decoder / "config.json").read_bytes(), weights)
    gpt2 = tiny_files.pyxf_config(family="gpt2", norm="layernorm", position="learned", gated_ffn=False,
                                  activation="gelu_tanh", tie_word_embeddings=False)
    seeds["model_dir"]["gpt2-f16"] = _model_dir_bytes(work / "gpt2", gpt2)
    quantized = tiny_files.pyxf_config(quantization={"method": "q8_0", "tensors": {"layers.0.ffn.down.weight": "q8_0"}},
                                       dtype="bfloat16")
    seeds["model_dir"]["q8_0-bf16"] = _model_dir_bytes(work / "q8", quantized)

    seeds["gguf"]["f16.gguf"] = tiny_files.write_gguf(work / "f.gguf").read_bytes()
    for kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        seeds["gguf"][f"{kind.lower()}.gguf"] = tiny_files.write_gguf(work / f"{kind}.gguf", quantized=kind).read_bytes()

    seeds["tokenizer"]["tokenizer.json"] = b"\x00" + tiny_files.tokenizer_json().encode()
    template = tiny_files.CHAT_TEMPLATE.encode()
    seeds["tokenizer"]["chat"] = (b"\x01" + struct.pack("<I", len(template)) + template + struct.pack("<I", 2)
                                  + b"user\x00\x00\x00\x00hello there, how are you?" + b"\x00" * 15
                                  + struct.pack("<I", 1) + b"ll\x00\x00" + "héllo wörld, the end! 日本".encode())

    seeds["convert_config"]["llama.json"] = json.dumps(tiny_files.hf_llama_config()).encode()
    seeds["convert_config"]["llama-rope-scaling.json"] = json.dumps(tiny_files.hf_llama_config(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})).encode()
    return seeds


def _safetensors_bytes(work: Path, tensors: dict) -> bytes:
    from pyxf.tensorfile import write_safetensors

    path = work / "t.safetensors"
    write_safetensors(path, tensors)
    return path.read_bytes()


def _model_dir_bytes(directory: Path, config: dict) -> bytes:
    """A model directory for `config` with random weights (quantized tensors as q8_0 blocks)."""
    from pyxf import quant
    from pyxf.tensorfile import float32_to_bf16, write_safetensors

    tensors = tiny_files.pyxf_tensors(config)
    dtypes = {}
    formats = (config.get("quantization") or {}).get("tensors", {})
    for name, array in list(tensors.items()):
        floats = array.astype(np.float32)
        if name in formats:
            tensors[name], _ = quant.quantize(floats, formats[name])
        elif config["dtype"] == "float32":
            tensors[name] = floats
        elif config["dtype"] == "bfloat16":
            tensors[name], dtypes[name] = float32_to_bf16(floats), "BF16"
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors, dtypes=dtypes)
    return pack_model_dir(json.dumps(config).encode(), (directory / "model.safetensors").read_bytes())
