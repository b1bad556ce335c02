#!/usr/bin/env python3
"""The engines tools/bench.py compares, and the worker that times one of them in its own process.

An engine is a small class with the same workload methods for every implementation:

    load()                      import the engine's packages and load the weights (ImportError: not installed)
    generate(prompts, n)        greedy decoding of exactly n new tokens for each prompt (a batch), new ids out
    prefill(ids)                one forward pass over ids that computes the logits of the last position only
    encode(texts)               sentence embeddings (the encoder model, mean pooling, normalized), float32 [N, H]
    versions()                  {package: version} and anything else worth printing (ISA, thread count)
    weights()                   (path of the weight file it reads, a few words on its format)

Adding a peer (CTranslate2, llama.cpp, ONNX Runtime, ...) is one more class registered in ENGINES; the
worker, the timing, the memory measurement and the report are shared.

The worker is run by tools/bench.py, one process per engine and phase, so that its peak resident
memory is its own:

    python tools/bench_peers.py ENGINE SPEC.json RESULT.json
"""

import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()


class Engine:
    name = ""  # the name on the command line (--engines)
    label = ""  # the column heading in the report
    workloads = ("decode", "prefill", "batch8", "memory", "encode")  # what it can run

    def wants(self, *workloads):
        return any(w in self.spec["workloads"] and w in self.workloads for w in workloads)

    def __init__(self, spec):
        self.spec = spec
        self.threads = spec["threads"]

    def load(self):
        raise NotImplementedError

    def generate(self, prompts, new_tokens):
        raise NotImplementedError

    def prefill(self, ids):
        raise NotImplementedError

    def encode(self, texts):
        raise NotImplementedError

    def versions(self):
        return {}

    def weights(self):
        raise NotImplementedError


def placement(model):
    """Where a loaded pyxf model's matrices are read from (pyxf.load's huge_pages)."""
    return "copied onto huge pages" if model.huge_page_bytes else "memory-mapped"


class PyxfEngine(Engine):
    name = "pyxf"
    label = "pyxf"
    placement = staticmethod(placement)

    def load(self):
        import pyxf

        self.pyxf = pyxf
        pyxf.set_num_threads(self.threads)
        if self.wants("decode", "prefill", "batch8", "memory"):
            self.model = pyxf.load(self.spec["model_dir"])
            # Every engine must produce exactly the requested number of tokens: no stop token at all.
            # generate() stops at the ids in model.eos_token_ids plus those passed in stop=.
            self.model.eos_token_ids = []
        if self.wants("encode"):
            self.encoder = pyxf.load(self.spec["encode_model_dir"])

    def encode(self, texts):
        # the model's own pooling (mean) and normalization, as sentence-transformers configures them
        return self.encoder.encode(texts, batch_size=self.spec["encode_batch"], max_length=self.spec["encode_max_length"])

    def generate(self, prompts, new_tokens):
        return self.pyxf.generate(self.model, prompts, max_new_tokens=new_tokens, temperature=0.0)

    def prefill(self, ids):
        # The session (its KV cache) is created inside the timed call, as torch's cache is.
        self.model.session(len(ids)).feed(ids, all_logits=False)

    def versions(self):
        info = self.pyxf.info()
        return {
            "pyxf": f"{self.pyxf.__version__} ({self.spec.get('pyxf_revision') or 'unknown revision'})",
            "isa": info.get("isa"),
            "compiler": info.get("compiler"),
            "threads": self.pyxf.get_num_threads(),
        }

    def weights(self):
        model = getattr(self, "model", None) or self.encoder
        return model.path / "model.safetensors", f"{model.config['dtype']} safetensors, {placement(model)}"


class TorchEngine(Engine):
    """PyTorch + transformers in float32, the weights dequantized from the same GGUF file that pyxf's
    converter read."""

    name = "torch"
    label = "PyTorch (transformers)"
    dtype = "float32"

    def load(self):
        import torch  # noqa: F401  (ImportError: not installed)
        import transformers
        from transformers import AutoModelForCausalLM

        self.torch, self.transformers = torch, transformers
        torch.set_num_threads(self.threads)
        if self.wants("encode"):
            from sentence_transformers import SentenceTransformer

            self.encoder = SentenceTransformer(self.spec["encode_hf_dir"], device="cpu")
            self.encoder.max_seq_length = self.spec["encode_max_length"]
            self.encoder_dir = Path(self.spec["encode_hf_dir"])
        if not self.wants("decode", "prefill", "batch8", "memory"):
            return
        gguf = self.spec.get("gguf")
        if not gguf or not Path(gguf).is_file():
            raise FileNotFoundError(
                f"the GGUF file the pyxf model was converted from was not found ({gguf!r}); pass --gguf"
            )
        gguf = Path(gguf)
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, **{dtype_key: getattr(torch, self.dtype)}
        ).eval()
        self.gguf = gguf
        config = self.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        self.pad_token_id = 0 if pad is None else int(pad)
        import inspect

        parameters = inspect.signature(self.model.forward).parameters
        self.keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in parameters), None)

    def generate(self, prompts, new_tokens):
        torch = self.torch
        width = max(map(len, prompts))
        # Left padding, as transformers wants for batched decoder-only generation.
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=self.pad_token_id,
            )
        return out[:, width:].tolist()

    def prefill(self, ids):
        torch = self.torch
        kwargs = {self.keep_arg: 1} if self.keep_arg else {}
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True, **kwargs)

    def versions(self):
        torch = self.torch
        try:
            capability = torch.backends.cpu.get_cpu_capability()
        except AttributeError:
            capability = None
        versions = {
            "torch": torch.__version__,
            "transformers": self.transformers.__version__,
            "isa": capability,
            "threads": torch.get_num_threads(),
        }
        if hasattr(self, "keep_arg"):  # the decoder was loaded
            versions["prefill_logits"] = "last position only" if self.keep_arg else "all positions (no logits_to_keep)"
        if hasattr(self, "encoder"):
            import sentence_transformers

            versions["sentence-transformers"] = sentence_transformers.__version__
        return versions

    def encode(self, texts):
        with self.torch.inference_mode():
            return self.encoder.encode(texts, batch_size=self.spec["encode_batch"], convert_to_numpy=True)

    def weights(self):
        if not hasattr(self, "gguf"):
            return self.encoder_dir / "model.safetensors", "float32 safetensors (sentence-transformers)"
        return self.gguf, f"GGUF Q4_1, dequantized to {self.dtype} at load"


class TorchBf16Engine(TorchEngine):
    """transformers with the same weights in bfloat16 (oneDNN's bf16 kernels where the CPU has them)."""

    name = "torch-bf16"
    label = "PyTorch bf16"
    dtype = "bfloat16"
    workloads = ("decode", "prefill", "batch8", "memory")

    def decode_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


class _TokenizedEncoder(Engine):
    """Encode-only peers that take token ids: texts are tokenized with the model's tokenizer.json
    (the `tokenizers` library, truncated to encode_max_length), sorted by length into batches of
    encode_batch, run, mean-pooled over the real tokens and normalized, as sentence-transformers does."""

    workloads = ("encode",)

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(self.spec["encode_hf_dir"]) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.spec["encode_max_length"])
        config = json.loads((Path(self.spec["encode_hf_dir"]) / "config.json").read_text())
        return config

    def encode(self, texts):
        import numpy as np

        encodings = self.tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        size = self.spec["encode_batch"]
        for start in range(0, len(order), size):
            chosen = order[start : start + size]
            batch = [encodings[i] for i in chosen]
            lengths = np.array([len(e.ids) for e in batch])
            hidden = self.run_batch(batch, lengths)  # [B, T, H], padded
            mask = (np.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
            pooled = (hidden * mask[:, :, None]).sum(1) / lengths[:, None]
            out[chosen] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out

    def cache_dir(self, kind):
        return Path(self.spec["encode_cache"]) / f"{Path(self.spec['encode_hf_dir']).name}-{kind}"


class OnnxRuntimeEngine(_TokenizedEncoder):
    """ONNX Runtime (CPU) on the HF model exported with torch.onnx.export and fused by onnxruntime's
    BERT optimizer (cached: the export happens at the first load), float32, padded batches."""

    name = "onnxruntime"
    label = "ONNX Runtime"

    def load(self):
        import onnxruntime  # noqa: F401  (ImportError: not installed)

        self.ort = onnxruntime
        config = self.load_tokenizer()
        self.hidden_size = config["hidden_size"]
        self.path = self._export(config)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _export(self, config):
        out = self.cache_dir("onnx")
        optimized, plain = out / "model.optimized.onnx", out / "model.onnx"
        if optimized.is_file():
            return optimized
        import torch
        from transformers import AutoModel

        out.mkdir(parents=True, exist_ok=True)
        model = AutoModel.from_pretrained(self.spec["encode_hf_dir"], attn_implementation="eager").eval()

        class LastHiddenState(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        # A padded example, so that the attention-mask path is what gets traced.
        ids = torch.full((2, 16), 1000, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        names = ["input_ids", "attention_mask", "token_type_ids"]
        with torch.no_grad():
            torch.onnx.export(
                LastHiddenState(model).eval(), (ids, mask, torch.zeros_like(ids)), str(plain), input_names=names,
                output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]},
            )
        try:  # onnxruntime's transformer fusions (attention, skip-LayerNorm, bias-GELU): its best CPU path
            from onnxruntime.transformers import optimizer

            fused = optimizer.optimize_model(str(plain), model_type="bert", num_heads=config["num_attention_heads"],
                                             hidden_size=config["hidden_size"])
            fused.save_model_to_file(str(optimized))
        except Exception as e:  # noqa: BLE001
            _log(self.name, f"graph fusion failed ({e}); using the plain export")
            return plain
        return optimized

    def run_batch(self, batch, lengths):
        import numpy as np

        width = int(lengths.max())
        feed = {name: np.zeros((len(batch), width), dtype=np.int64)
                for name in ("input_ids", "attention_mask", "token_type_ids")}
        for row, e in enumerate(batch):
            n = len(e.ids)
            feed["input_ids"][row, :n] = e.ids
            feed["attention_mask"][row, :n] = 1
            feed["token_type_ids"][row, :n] = e.type_ids
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]

    def versions(self):
        return {"onnxruntime": self.ort.__version__, "graph": self.path.name, "threads": self.threads}

    def weights(self):
        return self.path, "float32 ONNX, exported from the HF model"


class OnnxRuntimeInt8Engine(OnnxRuntimeEngine):
    """ONNX Runtime on the exported float32 graph quantized by its dynamic quantization (int8 weights,
    activations quantized per call): onnxruntime.quantization.quantize_dynamic, QInt8 weights."""

    name = "onnxruntime-int8"
    label = "ONNX Runtime int8"

    def _export(self, config):
        # The plain export is quantized (the fused graph's contrib operators defeat the quantizer's
        # shape inference); the session's graph optimizations then run on the quantized graph.
        plain = super()._export(config).with_name("model.onnx")
        quantized = plain.with_name("model.int8.onnx")
        if not quantized.is_file():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(plain), str(quantized), weight_type=QuantType.QInt8)
        return quantized

    def weights(self):
        return self.path, "int8 ONNX (dynamic quantization of the exported float32 graph)"


class PyxfReducedEncoder(PyxfEngine):
    """pyxf's encoder in bfloat16 or int8, made at load from the float32 model (pyxf.load options)."""

    workloads = ("encode",)
    options = {}

    def load(self):
        import pyxf

        self.pyxf = pyxf
        pyxf.set_num_threads(self.threads)
        self.encoder = pyxf.load(self.spec["encode_model_dir"], **self.options)

    def weights(self):
        return self.encoder.path / "model.safetensors", f"float32 safetensors, {self.options} at load"


class PyxfEncoderBf16(PyxfReducedEncoder):
    name = "pyxf-encode-bf16"
    label = "pyxf bf16"
    options = {"dtype": "bfloat16"}


class PyxfEncoderInt8(PyxfReducedEncoder):
    name = "pyxf-encode-int8"
    label = "pyxf int8"
    options = {"quantize": "int8"}


class CTranslate2Engine(_TokenizedEncoder):
    """CTranslate2's Encoder on the HF model converted by its TransformersConverter (cached), in
    float32 (and, as subclasses, its int8 / int8_float32 / bfloat16 compute types)."""

    name = "ctranslate2"
    label = "CTranslate2"
    compute = "float32"

    def load(self):
        import ctranslate2  # (ImportError: not installed)

        self.ct2 = ctranslate2
        self.hidden_size = self.load_tokenizer()["hidden_size"]
        out = self.cache_dir("ct2")
        if not (out / "model.bin").is_file():
            ctranslate2.converters.TransformersConverter(self.spec["encode_hf_dir"]).convert(str(out), force=True)
        self.path = out / "model.bin"
        self.encoder = ctranslate2.Encoder(str(out), device="cpu", compute_type=self.compute,
                                           intra_threads=self.threads, inter_threads=1)

    def run_batch(self, batch, lengths):
        import numpy as np

        output = self.encoder.forward_batch([e.ids for e in batch], token_type_ids=[e.type_ids for e in batch])
        return np.asarray(output.last_hidden_state)

    def versions(self):
        return {"ctranslate2": self.ct2.__version__, "compute_type": self.compute, "threads": self.threads}

    def weights(self):
        return self.path, f"float32 CTranslate2 model, converted from the HF model, computing in {self.compute}"


CT2_ENCODER_TYPES = ("int8", "int8_float32", "bfloat16")
CT2_ENCODERS = [type(f"CTranslate2Engine_{c}", (CTranslate2Engine,),
                     {"name": f"ctranslate2-{c}", "label": f"CTranslate2 {c}", "compute": c})
                for c in CT2_ENCODER_TYPES]


# Peers still to come (CTranslate2, llama.cpp, ONNX Runtime) register here.
ENGINES = {cls.name: cls for cls in (PyxfEngine, TorchEngine, TorchBf16Engine, OnnxRuntimeEngine,
                                     OnnxRuntimeInt8Engine, CTranslate2Engine,
                                     PyxfEncoderBf16, PyxfEncoderInt8, *CT2_ENCODERS)}
# Encode-only variants of pyxf and CTranslate2 in reduced precision (the encode workload's extra columns).
REDUCED_ENCODERS = (PyxfEncoderBf16.name, PyxfEncoderInt8.name, *(cls.name for cls in CT2_ENCODERS),
                    OnnxRuntimeInt8Engine.name)

# Quantized decoding: pyxf int8/q8_0/q4_0/q4_1, llama.cpp F32/Q8_0/Q4_0/Q4_1, CTranslate2 decoder
# float32/int8 (tools/bench_quant.py).
import bench_quant  # noqa: E402

ENGINES.update(bench_quant.engines(Engine, PyxfEngine))


def current_rss():
    """Resident set size of this process now, in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss():
    """Peak resident set size of this process so far, in bytes: VmHWM, the high-water mark of this
    process's own memory map. (ru_maxrss would not do on Linux: a child started by fork + exec
    inherits the parent's peak in it.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def _timed(call, *args):
    start = time.perf_counter()
    value = call(*args)
    return time.perf_counter() - start, value


def _check_lengths(outputs, count, new_tokens, what):
    lengths = [len(o) for o in outputs]
    if len(outputs) != count or any(n != new_tokens for n in lengths):
        raise RuntimeError(f"{what}: expected {count} sequence(s) of {new_tokens} new tokens, got lengths {lengths}")


def _summary(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def _log(engine, message):
    print(f"bench[{engine}]: {message}", file=sys.stderr, flush=True)


def run_timed(engine, spec):
    """The decode, prefill, batch8 and encode workloads, `repeat` times each (interleaved), after a warm-up."""
    workloads = [w for w in spec["workloads"] if w in ("decode", "prefill", "batch8", "encode") and w in engine.workloads]
    prompt, n = spec["decode_prompt"], spec["decode_new_tokens"]
    batch, batch_n = spec["batch_prompts"], spec["batch_new_tokens"]
    prefill_ids = spec["prefill_ids"]
    results, tokens = {}, {}

    _log(engine.name, "warm-up")
    if "decode" in workloads or "batch8" in workloads:
        engine.generate([prompt], min(8, n))
    if "batch8" in workloads:
        engine.generate(batch, min(4, batch_n))
    if "prefill" in workloads:
        engine.prefill(prefill_ids)
    if "encode" in workloads:
        engine.encode(spec["encode_texts"][: spec["encode_batch"]])

    times = {"decode_1": [], "decode_n": [], "prefill": [], "batch8": [], "encode": []}
    for rep in range(spec["repeat"]):
        _log(engine.name, f"run {rep + 1}/{spec['repeat']}")
        if "decode" in workloads:
            t1, out1 = _timed(engine.generate, [prompt], 1)
            _check_lengths(out1, 1, 1, "decode")
            tn, outn = _timed(engine.generate, [prompt], n)
            _check_lengths(outn, 1, n, "decode")
            times["decode_1"].append(t1)
            times["decode_n"].append(tn)
            tokens["decode"] = outn[0]
        if "prefill" in workloads:
            t, _ = _timed(engine.prefill, prefill_ids)
            times["prefill"].append(t)
        if "batch8" in workloads:
            t, out = _timed(engine.generate, batch, batch_n)
            _check_lengths(out, len(batch), batch_n, "batch8")
            times["batch8"].append(t)
            tokens["batch8"] = out
        if "encode" in workloads:
            cpu = time.process_time()
            t, embeddings = _timed(engine.encode, spec["encode_texts"])
            times["encode"].append(t)
            times.setdefault("encode_cpu", []).append(time.process_time() - cpu)

    if "decode" in workloads:
        t1 = statistics.median(times["decode_1"])
        tn = statistics.median(times["decode_n"])
        # generate(n) - generate(1) = the n - 1 decode steps, without the prompt's prefill and the
        # per-call setup both calls share.
        results["decode"] = {
            "tokens_per_s": (n - 1) / (tn - t1) if tn > t1 else None,
            "end_to_end_tokens_per_s": n / tn,
            "first_token_s": t1,
            "generate_1": _summary(times["decode_1"]),
            "generate_n": _summary(times["decode_n"]),
            "new_tokens": n,
            "prompt_tokens": len(prompt),
        }
    if "prefill" in workloads:
        s = _summary(times["prefill"])
        results["prefill"] = {**s, "tokens_per_s": len(prefill_ids) / s["median_s"], "prompt_tokens": len(prefill_ids)}
    if "batch8" in workloads:
        s = _summary(times["batch8"])
        total = len(batch) * batch_n
        results["batch8"] = {**s, "tokens_per_s": total / s["median_s"], "new_tokens": total, "batch": len(batch)}
    if "encode" in workloads:
        import numpy as np

        embeddings = np.asarray(embeddings, dtype=np.float32)
        count = len(spec["encode_texts"])
        if embeddings.ndim != 2 or embeddings.shape[0] != count:
            raise RuntimeError(f"encode: expected {count} embeddings, got shape {embeddings.shape}")
        # bench.py compares them with pyxf's (cosine similarity)
        np.save(Path(spec["encode_output_dir"]) / f"{engine.name}.npy", embeddings)
        s = _summary(times["encode"])
        results["encode"] = {
            **s, "sentences_per_s": count / s["median_s"], "tokens_per_s": spec["encode_tokens"] / s["median_s"],
            "sentences": count, "tokens": spec["encode_tokens"], "batch": spec["encode_batch"],
            # CPU seconds of the process (all its threads): steadier than wall time on a busy machine
            "cpu_s": statistics.median(times["encode_cpu"]),
        }
    return results, tokens


def run_memory(engine, spec):
    """Load, then one batch-1 decode of the decode workload; the process's peak RSS."""
    after_load = current_rss()
    out = engine.generate([spec["decode_prompt"]], spec["decode_new_tokens"])
    _check_lengths(out, 1, spec["decode_new_tokens"], "memory")
    return {"memory": {"peak_rss_bytes": peak_rss(), "rss_after_load_bytes": after_load}}


def worker(engine_name, spec_path, result_path):
    spec = json.loads(Path(spec_path).read_text())
    result = {"engine": engine_name, "phase": spec["phase"], "status": "ok"}
    engine = ENGINES[engine_name](spec)
    try:
        _log(engine_name, f"loading ({spec['phase']})")
        result["load_s"], _ = _timed(engine.load)
    except ImportError as e:
        result.update(status="not installed", detail=str(e))
    except Exception as e:
        result.update(status="error", detail=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    if result["status"] == "ok":
        try:
            result["versions"] = engine.versions()
            path, description = engine.weights()
            result["weights"] = {"file": Path(path).name, "bytes": Path(path).stat().st_size, "format": description}
            if hasattr(engine, "decode_bytes"):  # weight bytes one decode step reads (the roofline)
                result["bytes_per_token"] = engine.decode_bytes()
            if spec["phase"] == "memory":
                result["results"] = run_memory(engine, spec)
            else:
                result["results"], result["tokens"] = run_timed(engine, spec)
        except Exception as e:
            result.update(status="error", detail=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ENGINES:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(ENGINES)}}} SPEC.json RESULT.json (run by tools/bench.py)")
    sys.exit(worker(*sys.argv[1:]))
