"""Quantized decoding in tools/bench.py: pyxf's int8/q8_0/q4_0/q4_1/K-quant models, llama.cpp
(llama-cpp-python) on GGUF files of the same weights, CTranslate2's generator in float32 and int8, the
memory bandwidth roofline, and the quality of the quantized files (perplexity, top-1 agreement with
float32) in pyxf and in llama.cpp.

Every engine starts from the same numbers: SmolLM2-135M-Instruct's Q4_1 GGUF, dequantized.

    F32 GGUF      the dequantized tensors written with the `gguf` package (metadata and tokenizer
                  copied from the original file)
    Q8_0 / Q4_0   llama.cpp's own quantizer (llama_cpp.llama_model_quantize) on the F32 file: layer
                  weights in that format, the tied embedding/head in Q8_0 (its rows, 576, are not a
                  multiple of 256, so llama.cpp keeps it at 8 bits); without llama-cpp-python the
                  same files are written with pyxf.quant, bit-exact with llama.cpp's reference
                  quantizers
    Q4_1          the original file
    Q4_K_M, Q5_K_M, Q6_K  llama.cpp's quantizer on the F32 file (SmolLM2's rows of 576 are not a
                  multiple of 256: those tensors get llama.cpp's fallbacks Q5_0 / Q5_1 / Q8_0)
    pyxf q8_0/q4_0/q4_1/q4_k_m/q5_k_m/q6_k   those GGUF files converted with no flags
                  (`pyxf convert X.gguf OUT`): the same blocks
    pyxf int8     --quantize int8 (per-row int8, the tied embedding/head included; no GGUF equivalent)
    CTranslate2   the HF model (transformers from the GGUF), TransformersConverter to float32 and int8

Everything is made once and cached under <pyxf cache>/bench/quant. `engines(Engine, PyxfEngine)`
builds the engine classes (tools/bench_peers.py registers them; taking the bases as arguments keeps
the two modules free of import cycles).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()  # the pyxf tools/bench.py uses

PYXF_FORMATS = ("int8", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k", "bf16")
GGUF_FORMATS = ("f32", "q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k", "bf16")
# made by llama.cpp's quantizer only (no pyxf.quant fallback)
LLAMA_ONLY = ("q4_k_m", "q5_k_m", "q6_k", "bf16")
QUALITY_FORMATS = ("q8_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k", "bf16")  # bf16: pyxf computes on vdpbf16ps
CT2_TYPES = ("float32", "int8")


def _log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# files


def _copy_metadata(reader, writer, file_type):
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_file_type(file_type)


def write_gguf(src, dst, fmt):
    """`src` re-written with every 2-D weight in `fmt` (f32: dequantized), the embedding in Q8_0 for
    the 4-bit formats (as llama.cpp's quantizer does for this model), 1-D tensors in F32."""
    import gguf
    import numpy as np

    from pyxf import quant

    reader = gguf.GGUFReader(Path(src))  # gguf's reader: the field types are copied as they are
    arch = reader.fields["general.architecture"].contents()
    types = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    partial = Path(str(dst) + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    _copy_metadata(reader, writer, file_types[fmt])
    for t in reader.tensors:
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape([int(d) for d in reversed(t.shape)])
        target = fmt if array.ndim == 2 else "f32"
        if target != "f32" and t.name in ("token_embd.weight", "output.weight") and fmt != "q8_0":
            target = "q8_0"
        if target == "f32":
            writer.add_tensor(t.name, array)
        else:
            writer.add_tensor(t.name, quant.quantize(array, target)[0], raw_dtype=types[target])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(dst)


def llama_quantize(src, dst, fmt, threads):
    """llama.cpp's quantizer (llama-cpp-python) from the F32 file; False when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return False
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
                    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
                    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}[fmt]
    partial = Path(str(dst) + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {fmt} failed")
    partial.rename(dst)
    return True


def tensor_types(path):
    """{GGML type name: tensor count} of a GGUF file."""
    from collections import Counter

    from pyxf.convert.gguf_file import read_gguf

    return dict(Counter(t.ggml_type.name for t in read_gguf(path).tensors))


def prepare(gguf_path, cache, threads, want_ct2=True):
    """Makes (or finds) every file the quantized engines need; returns the spec entry bench.py passes
    to the workers: {"gguf": {fmt: path}, "pyxf": {fmt: dir}, "ct2": {type: dir}, "notes": [...]}."""
    from pyxf.convert import convert

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    files = {"gguf": {"q4_1": str(gguf_path)}, "pyxf": {}, "ct2": {}, "notes": []}
    f32 = cache / "smollm2-f32.gguf"
    if not f32.is_file():
        _log("writing the F32 GGUF file")
        write_gguf(gguf_path, f32, "f32")
    files["gguf"]["f32"] = str(f32)
    for fmt in ("q8_0", "q4_0", *LLAMA_ONLY):
        path = cache / f"smollm2-{fmt}.gguf"
        if not path.is_file():
            _log(f"making the {fmt} GGUF file")
            if not llama_quantize(f32, path, fmt, threads):
                if fmt in LLAMA_ONLY:
                    files["notes"].append(f"{fmt.upper()}: llama-cpp-python is not installed to make the file")
                    continue
                write_gguf(gguf_path, path, fmt)
        files["gguf"][fmt] = str(path)
    files["gguf_types"] = {fmt: tensor_types(p) for fmt, p in files["gguf"].items()}

    for fmt in PYXF_FORMATS:
        out = cache / f"pyxf-{fmt}"
        if fmt not in ("int8", "bf16") and fmt not in files["gguf"]:
            continue
        if not (out / "config.json").is_file():
            _log(f"converting pyxf {fmt}")
            if fmt == "int8":
                convert(gguf_path, out, quantize="int8", progress=False)
            elif fmt == "bf16":  # the F32 file's numbers rounded to bfloat16, as llama.cpp's BF16 file
                convert(gguf_path, out, dequantize=True, dtype="bfloat16", progress=False)
            else:
                convert(files["gguf"][fmt], out, progress=False)  # no flags: the GGUF's blocks kept
        files["pyxf"][fmt] = str(out)

    if want_ct2:
        try:
            files["ct2"] = _prepare_ct2(gguf_path, cache)
        except ImportError as e:
            files["notes"].append(f"CTranslate2 decoder: not installed ({e})")
        except Exception as e:  # noqa: BLE001  (reported, the rest of the benchmark goes on)
            files["notes"].append(f"CTranslate2 decoder: conversion failed ({type(e).__name__}: {e})")
    return files


def _prepare_ct2(gguf_path, cache):
    import ctranslate2

    hf_dir = cache / "hf-from-gguf"
    if not (hf_dir / "config.json").is_file():
        _log("writing the HF model from the GGUF file (transformers)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_path = Path(gguf_path)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained: the same weights in a plain model
        config = loaded.config
        config.quantization_config = None
        if hasattr(config, "__dict__"):
            config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    out = {}
    for compute in CT2_TYPES:
        ct2_dir = cache / f"ct2-{compute}"
        if not (ct2_dir / "model.bin").is_file():
            _log(f"converting CTranslate2 {compute}")
            converter = ctranslate2.converters.TransformersConverter(str(hf_dir))
            converter.convert(str(ct2_dir), quantization=compute, force=True)
        out[compute] = str(ct2_dir)
    return out


# ---------------------------------------------------------------------------------------------
# the roofline


def memory_bandwidth(threads, size_bytes=1 << 30, repeat=5):
    """Read bandwidth in bytes/s: `threads` threads each OR-reducing its share of a `size_bytes` array
    of 64-bit integers with numpy (which releases the GIL); the median of `repeat` passes after a
    warm-up (a median, as the engines' speeds are). An integer OR costs less than a load per element,
    so the pass is bound by memory, not arithmetic; a float32 sum (numpy's pairwise summation) is
    not: on Zen 5 with two cores it read 15 GB/s per thread against 27 for the OR, and 25 against 45
    GB/s with two threads."""
    import numpy as np

    data = np.ones(size_bytes // 8, dtype=np.uint64)
    parts = np.array_split(data, threads)

    def one_pass():
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start

    one_pass()
    return data.nbytes / statistics.median(one_pass() for _ in range(repeat))


def pyxf_bytes_per_token(model_dir):
    """Bytes of weights one decode step reads from a pyxf model directory: every tensor, except that a
    separate (untied-head) embedding contributes one row."""
    from pyxf.tensorfile import read_safetensors

    config = json.loads((Path(model_dir) / "config.json").read_text())
    tensors = read_safetensors(Path(model_dir) / "model.safetensors")
    total = sum(a.nbytes for a in tensors.values())
    if not config["tie_word_embeddings"] and "embed.weight" in tensors:
        embed = tensors["embed.weight"]
        total -= embed.nbytes - embed.nbytes // embed.shape[0]
    return total


def gguf_bytes_per_token(path):
    from pyxf.convert.gguf_file import read_gguf

    tensors = {t.name: t.data.nbytes for t in read_gguf(path).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"]  # one row, really
    return total


def ct2_bytes_per_token(model_dir):
    """CTranslate2 keeps its weights in model.bin (the vocabulary is apart): its size."""
    return (Path(model_dir) / "model.bin").stat().st_size


# ---------------------------------------------------------------------------------------------
# quality


QUALITY_WINDOW = 1024  # tokens per evaluated window, each from a fresh context
QUALITY_REFERENCE_WINDOWS = 8  # windows of the Python language reference after the prose passage


def quality_windows(tokenizer):
    """Token id windows the quality is measured on: the 1,025 tokens of English prose of
    tests/test_quant_quality.py, then QUALITY_REFERENCE_WINDOWS windows of 1,024 tokens of the Python
    language reference that ships with Python (pydoc_data.topics, topics in name order): ~9,200
    tokens in all, so that differences of half a percent in perplexity stand above the noise of one
    short text."""
    import importlib.util

    import pydoc_data.topics

    spec = importlib.util.spec_from_file_location("quality_text", REPO / "tests" / "test_quant_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "tests"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "tests"))
    windows = [tokenizer.encode(module.TEXT)[: module.N_TOKENS]]
    reference = tokenizer.encode("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)))
    for w in range(QUALITY_REFERENCE_WINDOWS):
        window = reference[w * QUALITY_WINDOW : (w + 1) * QUALITY_WINDOW]
        if len(window) == QUALITY_WINDOW:
            windows.append(window)
    return windows


def _pyxf_runner(model_dir, chunk=256):
    """Logits [n, V] of a window of ids, each window from a fresh session."""
    import numpy as np

    import pyxf

    model = pyxf.load(model_dir)

    def run(ids):
        session = model.session(len(ids))
        return np.concatenate([session.feed(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])

    return run


def _llama_runner(path, threads):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=QUALITY_WINDOW + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)

    def run(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return run


def _log_probs(logits):
    """log_softmax of the logits that predict a next token (all rows but the last), float64."""
    import numpy as np

    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _evaluate(run, windows, top1_of=None, kl_of=None):
    """Over the windows: {"nll": summed negative log-likelihood, "n": predicted positions, "top1":
    the argmax per position, "agree": positions whose argmax is top1_of's, "kl": summed KL(kl_of
    || this) per position}; kl_of: per window, the reference's log-probabilities (float32)."""
    import numpy as np

    out = {"nll": 0.0, "n": 0, "top1": [], "agree": 0, "kl": 0.0, "log_probs": []}
    for w, ids in enumerate(windows):
        lp = _log_probs(run(ids))
        out["nll"] -= float(lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum())
        out["n"] += len(ids) - 1
        top1 = lp.argmax(axis=1)
        out["top1"].append(top1)
        if top1_of is not None:
            out["agree"] += int((top1 == top1_of["top1"][w]).sum())
        if kl_of is not None:
            ref = kl_of[w].astype(np.float64)
            out["kl"] += float((np.exp(ref) * (ref - lp)).sum())
        out["log_probs"].append(lp.astype(np.float32))
    return out


def quality(files, threads):
    """Perplexity of the quality windows, top-1 agreement with the engine's own F32 run, and the
    mean KL divergence from the engine's run of the same file dequantized to F32 (the error the
    engine's quantized arithmetic adds to the file's rounded weights; llama.cpp's own measure of a
    quantization), for pyxf and llama.cpp on each GGUF file of QUALITY_FORMATS (pyxf: the file
    converted, its blocks kept). Returns {"positions": n, "tokens": n, "windows": n, "reference":
    {engine: F32 perplexity}, "rows": [{"format", "types", engine: {...}}]}."""
    import math

    import pyxf

    cache = Path(files["pyxf"]["q8_0"]).parent
    f32_dir = _kept_dir(cache, "f32", files["gguf"]["f32"])
    windows = quality_windows(pyxf.load(f32_dir).tokenizer)
    runners = {"pyxf": lambda fmt, path: _pyxf_runner(_kept_dir(cache, fmt, path))}
    try:
        import llama_cpp  # noqa: F401

        runners["llama.cpp"] = lambda fmt, path: _llama_runner(path, threads)
    except ImportError:
        pass
    reference = {}
    for engine, runner in runners.items():
        reference[engine] = _evaluate(runner("f32", files["gguf"]["f32"]), windows)
        reference[engine].pop("log_probs")
    rows = []
    for fmt in QUALITY_FORMATS:
        if fmt not in files["gguf"]:
            continue
        dequantized = cache / f"smollm2-{fmt}-dequantized.gguf"
        if not dequantized.is_file():
            write_gguf(files["gguf"][fmt], dequantized, "f32")
        row = {"format": fmt, "types": files.get("gguf_types", {}).get(fmt, {})}
        for engine, runner in runners.items():
            _log(f"quality: {fmt} in {engine}")
            floats = _evaluate(runner(f"{fmt}-dequantized", dequantized), windows)["log_probs"]
            r = _evaluate(runner(fmt, files["gguf"][fmt]), windows, top1_of=reference[engine], kl_of=floats)
            ref = reference[engine]
            ppl = math.exp(r["nll"] / r["n"])
            row[engine] = {"perplexity": ppl, "increase": ppl / math.exp(ref["nll"] / ref["n"]) - 1,
                           "agreement": r["agree"] / r["n"], "kl": r["kl"] / r["n"]}
            del floats, r
        rows.append(row)
    n = next(iter(reference.values()))["n"]
    return {"positions": n, "tokens": sum(len(w) for w in windows), "windows": len(windows),
            "reference": {e: math.exp(r["nll"] / r["n"]) for e, r in reference.items()}, "rows": rows}


def _kept_dir(cache, fmt, path):
    """The GGUF file converted for pyxf with its blocks kept (f32: plain floats), cached."""
    from pyxf.convert import convert

    out = cache / f"pyxf-{fmt}"
    if not (out / "config.json").is_file():
        convert(path, out, progress=False)  # no flags: the GGUF's blocks kept (F32: floats)
    return out


def quality_section(result):
    """The report's table for quality()."""
    if not result or not result.get("rows"):
        return []
    ref = result["reference"]
    lines = [
        "## Quality of the quantized files",
        "",
        f"The same GGUF files in pyxf (converted with no flags: every tensor as stored) and in llama.cpp, over "
        f"{result['tokens']:,} tokens in {result['windows']} windows of up to {QUALITY_WINDOW:,} (each from a fresh "
        "context): tests/test_quant_quality.py's English prose, then the Python language reference "
        "(pydoc_data.topics). Perplexity; top-1 agreement with the engine's own float32 run of the F32 file; KL: "
        "mean KL divergence per position from the engine's own run of the same file dequantized to F32 (what the "
        "engine's quantized arithmetic adds to the file's rounded weights), over "
        f"{result['positions']:,} predicted positions. Float32 perplexity: "
        + ", ".join(f"{e} {p:.3f}" for e, p in ref.items()) + ".",
        "",
        "| file | tensor types | pyxf perplexity | pyxf top-1 | pyxf KL | llama.cpp perplexity | llama.cpp top-1 | llama.cpp KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = []
        for engine in ("pyxf", "llama.cpp"):
            r = row.get(engine)
            cells += ([f"{r['perplexity']:.3f} ({r['increase']:+.2%})", f"{r['agreement']:.1%}", f"{r['kl']:.5f}"]
                      if r else ["—", "—", "—"])
        types = ", ".join(f"{n} {k}" for k, n in sorted(row["types"].items()) if k != "F32")
        lines.append(f"| {row['format'].upper()} | {types} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# engines


def engines(Engine, PyxfEngine):
    """The engine classes, built on tools/bench_peers.py's bases."""

    class PyxfQuantized(PyxfEngine):
        fmt = ""
        workloads = ("decode", "prefill", "batch8", "memory")

        def load(self):
            self.spec = dict(self.spec, model_dir=self.spec["quant"]["pyxf"][self.fmt])
            super().load()

        def weights(self):
            from pyxf import quant

            q = self.model.config.get("quantization")
            if not q:
                return self.model.path / "model.safetensors", f"{self.model.config['dtype']} safetensors, {self.placement(self.model)}"
            kinds = sorted({fmt for spec in q["tensors"].values() for fmt in quant.formats_of(spec)})
            return self.model.path / "model.safetensors", f"{'/'.join(kinds)} safetensors ({q['method']}), {self.placement(self.model)}"

        def decode_bytes(self):
            return pyxf_bytes_per_token(self.spec["model_dir"])

    class LlamaCpp(Engine):
        fmt = ""
        workloads = ("decode", "prefill", "batch8", "memory")

        def load(self):
            import llama_cpp  # (ImportError: not installed)

            self.llama_cpp = llama_cpp
            self.path = Path(self.spec["quant"]["gguf"][self.fmt])
            n_ctx = max(len(self.spec["prefill_ids"]),
                        len(self.spec["decode_prompt"]) + self.spec["decode_new_tokens"],
                        max(map(len, self.spec["batch_prompts"])) + self.spec["batch_new_tokens"]) + 8
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_threads=self.threads, n_threads_batch=self.threads,
                                       n_ctx=n_ctx, n_batch=512, logits_all=False, verbose=False)

        def _greedy(self, prompt, new_tokens):
            import numpy as np

            llm = self.llm
            llm.reset()  # no reuse of a previous call's KV cache
            llm.eval(prompt)
            out = []
            for i in range(new_tokens):
                # with logits_all=False, Llama keeps no scores: the context's logits of the last token
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
                token = int(np.argmax(logits))
                out.append(token)
                if i + 1 < new_tokens:
                    llm.eval([token])
            return out

        def generate(self, prompts, new_tokens):
            # llama-cpp-python's Llama runs one sequence: a batch is decoded one prompt after another.
            return [self._greedy(p, new_tokens) for p in prompts]

        def prefill(self, ids):
            self.llm.reset()
            self.llm.eval(ids)

        def versions(self):
            return {"llama-cpp-python": self.llama_cpp.__version__, "batch8": "sequential", "threads": self.threads}

        def weights(self):
            kinds = self.spec["quant"].get("gguf_types", {}).get(self.fmt, {})
            return self.path, "GGUF " + ", ".join(f"{n}×{k}" for k, n in sorted(kinds.items()))

        def decode_bytes(self):
            return gguf_bytes_per_token(self.path)

    class CT2Generator(Engine):
        compute = ""
        workloads = ("decode", "prefill", "batch8", "memory")

        def load(self):
            import ctranslate2  # (ImportError: not installed)

            self.ct2 = ctranslate2
            path = self.spec["quant"].get("ct2", {}).get(self.compute)
            if not path:
                raise ImportError("no converted CTranslate2 model: " + "; ".join(self.spec["quant"].get("notes", [])))
            self.path = Path(path)
            self.generator = ctranslate2.Generator(str(self.path), device="cpu", compute_type=self.compute,
                                                   intra_threads=self.threads, inter_threads=1)
            self.vocab = json.loads((self.path / "vocabulary.json").read_text())

        def _tokens(self, ids):
            return [self.vocab[i] for i in ids]

        def generate(self, prompts, new_tokens):
            results = self.generator.generate_batch(
                [self._tokens(p) for p in prompts], max_length=new_tokens, min_length=new_tokens,
                sampling_topk=1, beam_size=1, include_prompt_in_result=False, end_token=[],
            )
            return [r.sequences_ids[0] for r in results]

        def prefill(self, ids):
            # generate one token: the prompt's forward pass plus one sampling step
            self.generator.generate_batch([self._tokens(ids)], max_length=1, sampling_topk=1, beam_size=1,
                                          include_prompt_in_result=False)

        def versions(self):
            return {"ctranslate2": self.ct2.__version__, "compute_type": self.compute, "threads": self.threads}

        def weights(self):
            return self.path / "model.bin", f"CTranslate2 {self.compute}, converted from the HF model"

        def decode_bytes(self):
            return ct2_bytes_per_token(self.path)

    made = []
    for fmt in PYXF_FORMATS:
        made.append(type(f"Pyxf_{fmt}", (PyxfQuantized,), {"name": f"pyxf-{fmt}", "label": f"pyxf {fmt}", "fmt": fmt}))
    for fmt in GGUF_FORMATS:
        made.append(type(f"LlamaCpp_{fmt}", (LlamaCpp,),
                         {"name": f"llama.cpp-{fmt}", "label": f"llama.cpp {fmt.upper()}", "fmt": fmt}))
    for compute in CT2_TYPES:
        made.append(type(f"CT2_{compute}", (CT2Generator,),
                         {"name": f"ct2-{compute}", "label": f"CTranslate2 {compute}", "compute": compute}))
    return {cls.name: cls for cls in made}


QUANT_ENGINE_NAMES = tuple(
    [f"pyxf-{f}" for f in PYXF_FORMATS] + [f"llama.cpp-{f}" for f in GGUF_FORMATS] + [f"ct2-{c}" for c in CT2_TYPES]
    + ["torch-bf16"]  # tools/bench_peers.py's TorchBf16Engine: the bf16 rows' other peer
)


# ---------------------------------------------------------------------------------------------
# report


def _gb(n):
    return f"{n / 1e9:.1f} GB/s"


def report_section(engines, records, spec, labels, common_prefix):
    """The report's quantized-decoding section: every decoder engine's speeds against the roofline."""
    decoders = [e for e in engines if e == "pyxf" or e == "torch" or e in QUANT_ENGINE_NAMES]
    if not decoders or "decode" not in spec["workloads"]:
        return []
    bandwidth = (spec.get("bandwidth") or {}).get("bytes_per_s")
    reference = records.get("pyxf", {}).get("tokens", {}).get("decode")
    lines = [
        "## Quantized decoding and the memory-bandwidth roofline",
        "",
        (f"Read bandwidth measured here: {_gb(bandwidth)} with {spec['bandwidth']['threads']} threads, the median of "
         f"{len(spec['bandwidth']['samples'])} probes spread over the run, one before each engine "
         f"({_gb(min(spec['bandwidth']['samples']))} - {_gb(max(spec['bandwidth']['samples']))}; "
         f"{_gb(spec['bandwidth']['one_thread_bytes_per_s'])} with one thread). A decode step reads every weight once, "
         "so an engine cannot decode faster than bandwidth / (weight bytes per token): the *ceiling* column. "
         "*of ceiling* is the measured batch-1 decode speed as a fraction of it (the KV cache, small at these "
         "lengths, is left out of the bytes)." if bandwidth else "Memory bandwidth was not measured."),
        "",
        "| engine | weights | bytes / token | ceiling (tokens/s) | decode, batch 1 (tokens/s) | of ceiling | "
        "prefill (tokens/s) | batch 8 (new tokens/s) | greedy tokens equal to pyxf float32's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def get(record, *keys):
        value = record.get("results", {})
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return value

    def rate(x):
        return "—" if x is None else f"{x:,.1f}"

    for e in decoders:
        r = records.get(e, {})
        if r.get("status") in ("not installed", "error") and not r.get("results"):
            lines.append(f"| {labels[e]} | {r.get('status')}: {'; '.join(r.get('details', []))[:120]} |" + " |" * 7)
            continue
        per_token = r.get("bytes_per_token")
        decode = get(r, "decode", "tokens_per_s")
        ceiling = bandwidth / per_token if bandwidth and per_token else None
        tokens = r.get("tokens", {}).get("decode")
        agree = "—" if e == "pyxf" or not (reference and tokens) else f"{common_prefix(reference, tokens)}/{len(reference)}"
        weights = (r.get("weights") or {}).get("format", "")
        lines.append(
            f"| {labels[e]} | {weights} | {per_token / 2**20:,.1f} MiB | {rate(ceiling)} | {rate(decode)} | "
            f"{f'{decode / ceiling:.0%}' if decode and ceiling else '—'} | {rate(get(r, 'prefill', 'tokens_per_s'))} | "
            f"{rate(get(r, 'batch8', 'tokens_per_s'))} | {agree} |"
            if per_token else
            f"| {labels[e]} | {weights} | — | — | {rate(decode)} | — | {rate(get(r, 'prefill', 'tokens_per_s'))} | "
            f"{rate(get(r, 'batch8', 'tokens_per_s'))} | {agree} |"
        )
    pairs = [(f"pyxf-{f}", f"llama.cpp-{f}") for f in ("q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k", "bf16")] + [
        ("pyxf", "llama.cpp-f32"), ("pyxf-int8", "ct2-int8"), ("pyxf", "ct2-float32"), ("pyxf-bf16", "torch-bf16"),
        ("pyxf-bf16", "pyxf")]
    ratios = []
    for ours, theirs in pairs:
        cells = []
        for workload in ("decode", "prefill", "batch8"):
            a, b = get(records.get(ours, {}), workload, "tokens_per_s"), get(records.get(theirs, {}), workload, "tokens_per_s")
            cells.append(f"{a / b:.2f}×" if a and b else "—")
        if any(c != "—" for c in cells):
            ratios.append(f"| {labels.get(ours, ours)} / {labels.get(theirs, theirs)} | " + " | ".join(cells) + " |")
    if ratios:
        lines += ["", "Same weights, pyxf against the peer (above 1: pyxf is faster):", "",
                  "| pair | decode, batch 1 | prefill | batch 8 |", "|---|---|---|---|", *ratios]
    lines.append("")
    return lines


def method_lines(spec):
    if not spec.get("quant"):
        return []
    q = spec["quant"]
    types = q.get("gguf_types", {})
    described = "; ".join(f"{fmt.upper()}: " + ", ".join(f"{n} {k}" for k, n in sorted(t.items()))
                          for fmt, t in types.items())
    return [
        "- **quantized engines** (tools/bench_quant.py): the weights are SmolLM2's Q4_1 GGUF dequantized; the F32 "
        "GGUF is those tensors written with the `gguf` package, Q8_0 and Q4_0 are llama.cpp's own quantizer "
        "(`llama_model_quantize`) applied to it, Q4_1 is the original file. Tensor types: " + described + ". "
        "pyxf q8_0 / q4_0 / q4_1 are those GGUF files converted with no flags (`pyxf convert X.gguf OUT`: the very "
        "same blocks); pyxf int8 is `--quantize int8` (per-row scales). CTranslate2 runs the HF model "
        "(written by transformers from the GGUF) converted by `TransformersConverter` with quantization float32 "
        "and int8, through `Generator.generate_batch` (greedy, min_length = max_length = the new tokens).",
        "- llama.cpp: llama-cpp-python's `Llama(n_threads, n_threads_batch, n_batch=512, logits_all=False)`, "
        "greedy by argmax over the last logits, `reset()` before each sequence so that no KV cache is reused; "
        "its batch-8 workload decodes the 8 prompts one after another (the high-level API runs one sequence).",
        "- bytes / token: the weight bytes one decode step reads — the whole file's tensors (the embedding is the "
        "tied head, read in full), pyxf's model.safetensors tensors, CTranslate2's model.bin.",
    ]
