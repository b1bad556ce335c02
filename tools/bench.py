#!/usr/bin/env python3
"""Benchmarks pyxf beside its peers on this machine and writes BENCHMARKS.md (and a PNG plot).

    python tools/bench.py [--model-dir DIR] [--gguf FILE] [--threads 2] [--repeat 3]
                          [--workloads decode,prefill,batch8,memory,encode]
                          [--engines pyxf,torch,onnxruntime,ctranslate2] [--encoder HF_DIR]
                          [--output BENCHMARKS.md] [--json FILE] [--quick]

Every engine gets the same prompt token ids (encoded once, here, with the model's tokenizer), the same
weights (pyxf's float32 model converted from a GGUF file; the peers dequantize that same GGUF file),
the same thread count and greedy decoding of exactly the same number of new tokens. Each engine runs
in its own subprocess (tools/bench_peers.py): one for the timed workloads, one more for its peak
resident memory. Times are medians over --repeat runs.

Workloads (SmolLM2-135M-Instruct by default):
  decode   batch 1, N new tokens after a short prompt; tokens/s of the decode steps alone:
           (N - 1) / (t(generate N tokens) - t(generate 1 token)).
  prefill  one forward pass over a 512-token prompt computing the last position's logits; tokens/s.
  batch8   8 prompts of equal length, N new tokens each, one batched generate call; new tokens / s.
  memory   peak RSS of a fresh process that loads the model and runs the decode workload once.
  encode   sentence embeddings with an encoder (all-MiniLM-L6-v2 by default, from pyxf.hub): 512
           sentences of 40-120 words, batches of 32, at most 128 tokens, mean pooling (normalized);
           sentences/s and real (non-padding) tokens/s, tokenization included. Peers: PyTorch
           (sentence-transformers), ONNX Runtime (the HF model exported with torch.onnx.export and
           fused by onnxruntime's BERT optimizer, cached) and CTranslate2 (its TransformersConverter,
           cached; Encoder.forward_batch); those two run this workload only.
  translate  tools/bench_seq2seq.py: a Marian-sized random model, 64 sources, greedy and beam 4, target
           tokens/s of pyxf, transformers and CTranslate2; its table is added to the report.
  quality  tools/bench_quant.py: perplexity and top-1 agreement with float32 of the Q8_0, Q4_1, Q4_K_M,
           Q5_K_M and Q6_K files in pyxf and in llama.cpp, on 1,025 tokens of prose.
  serve    tools/bench_serve.py: `pyxf serve` beside llama-cpp-python's OpenAI server on the same Q8_0
           GGUF weights, 1/4/16/64 concurrent streaming chat clients (tokens/s, TTFT, inter-token
           latency, failures, RSS) and a shared-system-prompt test of the prefix cache; its section is
           added to the report (`python tools/bench_serve.py --update-report BENCHMARKS.md` re-runs
           it alone and replaces that section).

Quantized decoding (tools/bench_quant.py; the decoder workloads): pyxf int8 / q8_0 / q4_0 / q4_1 /
Q4_K_M (engines pyxf-int8, ...), llama.cpp through llama-cpp-python on F32 / Q8_0 / Q4_0 / Q4_1 /
Q4_K_M GGUF files of the same weights (llama.cpp-f32, ...) and CTranslate2's Generator in float32 and int8 (ct2-float32,
ct2-int8). The files are made once and cached. The report adds the memory-bandwidth roofline: the
read bandwidth of --threads threads (a numpy integer OR over a 1 GiB array; the median of probes taken
before each engine, as the machine's bandwidth moves during a run) divided by the weight bytes one
decode step reads gives each engine's ceiling in tokens/s, and its measured decode speed is reported
as a fraction of that ceiling.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()

import bench_peers  # noqa: E402
import bench_quant  # noqa: E402

WORKLOADS = ("decode", "prefill", "batch8", "memory", "encode", "translate", "quality", "serve")
DECODER_WORKLOADS = ("decode", "prefill", "batch8", "memory")
DEFAULT_ENGINES = ("pyxf", "torch", "onnxruntime", "ctranslate2", *bench_peers.REDUCED_ENCODERS,
                   *bench_quant.QUANT_ENGINE_NAMES)
ENCODE = {"sentences": 512, "min_words": 40, "max_words": 120, "batch": 32, "max_length": 128}
REFERENCE = "pyxf"
PEER_FOR_RATIO = "torch"

DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"
BATCH_PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The three most important things to know about the history of Rome are",
    "Here is a short Python function that checks whether a number is prime:",
    "Dear team, I am writing to let you know about the changes to our schedule",
    "The recipe for a simple tomato soup starts with the following ingredients:",
    "In the year 2150, the first city on Mars was finally ready for its people,",
    "A good way to learn a new language as an adult is to practice every day by",
    "The weather report for tomorrow says that the north of the country will see",
]
# Prefill text: varied English prose, repeated as needed up to the prompt length.
PREFILL_TEXT = (
    "The history of the lighthouse is a history of people trying to make the sea a little less dangerous. "
    "Long before electric lamps, sailors relied on fires burning at the tops of towers, and the most famous "
    "of them stood at Alexandria, where a great stone tower guided ships into the harbor for centuries. "
    "Keeping a light was hard work: the keeper had to carry fuel up narrow stairs, trim wicks, clean soot "
    "from the glass and stay awake through long winter nights. In the nineteenth century the Fresnel lens "
    "changed everything. By arranging rings of glass prisms around a single lamp, engineers could bend "
    "nearly all of its light into a narrow beam that was visible more than twenty miles away. Each "
    "lighthouse was given its own pattern of flashes, so that a navigator who counted the seconds between "
    "them could tell exactly which coast lay ahead. Fog remained a problem, and so horns, bells and sirens "
    "were added, each with its own rhythm as well. Today most lighthouses run automatically, and satellite "
    "navigation tells a ship where it is to within a few meters, yet many towers still shine every night. "
    "Some have become museums, some are homes, and a few can be rented by travelers who want to spend a "
    "quiet week listening to the waves. Gardeners know a different kind of patience. A vegetable garden "
    "begins months before the first harvest, with seeds started indoors while frost still covers the "
    "ground. Tomatoes need warmth and long days, beans grow quickly once the soil is warm, and potatoes are "
    "planted as pieces of last year's crop. Good soil matters more than anything else: compost made from "
    "kitchen scraps and fallen leaves feeds the worms and fungi that keep the earth loose and rich. "
)
QUICK = {"decode_new_tokens": 16, "batch_new_tokens": 16, "prefill_tokens": 64, "repeat": 1, "encode_sentences": 64,
         "translate_new_tokens": 8}
FULL = {"decode_new_tokens": 128, "batch_new_tokens": 128, "prefill_tokens": 512, "repeat": 3,
        "encode_sentences": ENCODE["sentences"], "translate_new_tokens": 32}
# tools/bench_seq2seq.py's engines (the reduced-precision ones share their names with the decoder and
# encoder engines of the same precision)
TRANSLATE_ENGINES = ("pyxf", "pyxf-bf16", "pyxf-int8", "torch", "ctranslate2", "ctranslate2-int8",
                     "ctranslate2-int8_float32")
WORKER_TIMEOUT_S = 1800


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", help="converted float32 pyxf model directory (default: the default model, "
                   "SmolLM2-135M-Instruct, dequantized to float32 on first use)")
    p.add_argument("--gguf", help="the GGUF file the model was converted from, for the peers (default: the "
                   "default model's GGUF in pyxf's cache, or config.json's source path)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, help=f"runs per workload; the median is reported (default {FULL['repeat']}, "
                   f"--quick: {QUICK['repeat']})")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated subset of {','.join(bench_peers.ENGINES)}")
    p.add_argument("--output", help="the Markdown report (default: BENCHMARKS.md at the repository root; with "
                   "--quick none, the table is printed only); the plot goes beside it as .png")
    p.add_argument("--json", help="also write the raw results as JSON to this file")
    p.add_argument("--encoder", help="Hugging Face / sentence-transformers directory of the encoder for the encode "
                   "workload (default: all-MiniLM-L6-v2, fetched by pyxf.hub)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['decode_new_tokens']} new tokens, "
                   f"{QUICK['prefill_tokens']}-token prefill, 1 run")
    args = p.parse_args(argv)

    args.workloads = _split(p, args.workloads, WORKLOADS, "workload")
    args.engines = _split(p, args.engines, bench_peers.ENGINES, "engine")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    sizes = QUICK if args.quick else FULL
    if args.repeat is None:
        args.repeat = sizes["repeat"]
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    args.sizes = sizes
    if args.output is None and not args.quick:
        args.output = str(REPO / "BENCHMARKS.md")
    return args


def _split(parser, text, known, what):
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in known]
    if unknown or not items:
        parser.error(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


def tilde(path):
    """A path for the report: the home directory written as ~, so no machine's paths get committed."""
    text = str(path)
    home = str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text


def report_args(argv):
    """The command line as the report shows it: --json (where the raw results went, not how they were
    measured) left out, paths under the home directory written with ~."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(tilde(a))
    return out


def resolve_model(args):
    from pyxf import hub
    from pyxf.config import read_config

    # The float32 engines' model: the default model's weights dequantized (pyxf convert --dequantize).
    model_dir = Path(args.model_dir).expanduser() if args.model_dir else hub.float32_model_path()
    config = read_config(model_dir)
    gguf = Path(args.gguf).expanduser() if args.gguf else None
    if gguf is None:
        source = config.get("source") or {}
        default_gguf = hub.cache_dir() / f"{hub.WHEEL_PROJECT}-{hub.WHEEL_VERSION}" / hub.GGUF_IN_WHEEL
        candidates = []
        if source.get("format") == "gguf" and source.get("path"):
            candidates += [Path(source["path"]).expanduser(), model_dir / source["path"]]
            if Path(source["path"]).name == default_gguf.name:
                candidates.append(default_gguf)
        gguf = next((c for c in candidates if c.is_file()), None)
    return model_dir, config, gguf


def build_prompts(model_dir, config, sizes):
    """Token ids of every prompt, encoded once with the model's tokenizer and shared by all engines."""
    from pyxf.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(model_dir, config)
    if tok is None:
        raise SystemExit(f"{model_dir} has no tokenizer; the benchmark prompts are text")
    decode_prompt = tok.encode(DECODE_PROMPT)
    batch = [tok.encode(text) for text in BATCH_PROMPTS]
    width = min(map(len, batch))  # equal lengths: no padding, the same work for every engine
    batch = [ids[:width] for ids in batch]
    text_ids = tok.encode(PREFILL_TEXT)
    prefill = (text_ids * (sizes["prefill_tokens"] // len(text_ids) + 1))[: sizes["prefill_tokens"]]
    return decode_prompt, batch, prefill


def build_encode_texts(count, seed=0):
    """`count` sentences of 40-120 words: windows of PREFILL_TEXT's prose at random offsets."""
    import random

    words = PREFILL_TEXT.split()
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n, start = rng.randint(ENCODE["min_words"], ENCODE["max_words"]), rng.randrange(len(words))
        texts.append(" ".join((words * 2)[start : start + n]))
    return texts


def resolve_encoder(args, workdir_cache):
    """(HF directory, pyxf model directory) of the encode workload's model, converted on first use."""
    from pyxf import hub

    if not args.encoder:
        return hub.minilm_source_path(), hub.minilm_model_path()
    source = Path(args.encoder).expanduser().resolve()
    converted = workdir_cache / f"{source.name}-pyxf"
    if not (converted / "config.json").is_file():
        from pyxf.convert import convert

        convert(source, converted, progress=False)
    return source, converted


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"git {rev}{' + local changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return None


def amd_core_name(family, model):
    """AMD's core generation from cpuid's family and model (virtual machines often report a bare
    "AMD EPYC" model name, which says nothing of it)."""
    if family == 26:
        return "Zen 5"
    if family == 25:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
    if family == 23:
        return "Zen 2" if model >= 0x30 else "Zen"
    return None


def machine_info():
    cpu, flags, fields = None, set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu is None:
                cpu = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key in ("vendor_id", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    core = None
    if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family", "").isdigit():
        core = amd_core_name(int(fields["cpu family"]), int(fields.get("model", "0")))
    try:
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:"))
        memory = f"{mem_kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        memory = None
    from pyxf.threads import physical_core_count

    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    cpu = cpu or platform.processor() or platform.machine()
    return {
        "cpu": cpu,
        "cpu_title": f"{cpu} ({core})" if core and core not in cpu else cpu,
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": physical_core_count(),
        "memory": memory,
        "simd_flags": simd,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def run_worker(engine, spec, workdir):
    spec_path = Path(workdir) / f"{engine}-{spec['phase']}-spec.json"
    result_path = Path(workdir) / f"{engine}-{spec['phase']}-result.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               PYXF_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(HERE / "bench_peers.py"), engine, str(spec_path), str(result_path)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "phase": spec["phase"], "status": "error", "detail": f"timed out after {WORKER_TIMEOUT_S} s"}
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        detail = f"worker exited with status {proc.returncode}: {tail[0]}"
        if proc.returncode == -11 and engine.startswith("llama.cpp"):
            detail += (" (a segfault: llama.cpp built with AMX kernels on a machine that does not grant AMX "
                       "crashes on quantized models; README, Benchmarks, shows how to build it without them)")
        return {"engine": engine, "phase": spec["phase"], "status": "error", "detail": detail,
                "stderr": proc.stderr[-4000:]}
    result = json.loads(result_path.read_text())
    result["wall_s"] = elapsed
    if result["status"] == "error":
        print(f"bench: {engine} ({spec['phase']}) failed: {result.get('traceback') or result['detail']}", file=sys.stderr)
    return result


def encode_spec(args):
    """The encode workload's part of the engines' spec: the encoder in its three forms (HF directory,
    pyxf conversion, the peers' cache), the sentences and their real token count."""
    from pyxf import hub
    from pyxf.config import read_config
    from pyxf.tokenizer import Tokenizer

    cache = hub.cache_dir() / "bench"
    hf_dir, pyxf_dir = resolve_encoder(args, cache)
    texts = build_encode_texts(args.sizes["encode_sentences"])
    tokenizer = Tokenizer.from_model_dir(pyxf_dir, read_config(pyxf_dir))
    real_tokens = sum(len(ids) for ids, _ in tokenizer.encode_for_encoder(texts, ENCODE["max_length"]))
    return dict(encode_hf_dir=str(hf_dir), encode_model_dir=str(pyxf_dir), encode_cache=str(cache), encode_texts=texts,
                encode_tokens=real_tokens, encode_batch=ENCODE["batch"], encode_max_length=ENCODE["max_length"])


def encode_agreement(engines, workdir):
    """engine -> the smallest cosine similarity between its embeddings and pyxf's (same texts)."""
    import numpy as np

    reference = Path(workdir) / f"{REFERENCE}.npy"
    if not reference.is_file():
        return {}
    ours = np.load(reference).astype(np.float64)
    agreement = {}
    for engine in engines:
        path = Path(workdir) / f"{engine}.npy"
        if engine == REFERENCE or not path.is_file():
            continue
        theirs = np.load(path).astype(np.float64)
        cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
        agreement[engine] = float(cosine.min())
    return agreement


def merge(phases):
    """One engine's record from its timed and memory runs."""
    merged = {"status": "ok", "results": {}, "versions": {}, "details": []}
    for r in phases:
        if r["status"] != "ok":
            merged["details"].append(f"{r['phase']}: {r.get('detail', '')}")
            if merged["status"] == "ok" or r["status"] == "not installed":
                merged["status"] = r["status"]
            continue
        merged["results"].update(r.get("results", {}))
        merged["versions"].update(r.get("versions", {}))
        merged.setdefault("weights", r.get("weights"))
        if r.get("tokens"):
            merged["tokens"] = r["tokens"]
        if r["phase"] == "timed":
            merged["load_s"] = r.get("load_s")
        if r.get("bytes_per_token"):
            merged["bytes_per_token"] = r["bytes_per_token"]
    if merged["results"] and merged["status"] != "ok":
        merged["status"] = "partial"
    return merged


# ---------------------------------------------------------------- report

def _fmt_rate(x):
    return "—" if x is None else f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def _mib(n):
    return f"{n / 2**20:,.0f} MiB"


ROWS = [
    # (workload, label, value getter, formatter, higher is better)
    ("decode", "decode, batch 1 (tokens/s)", lambda r: r["decode"]["tokens_per_s"], _fmt_rate, True),
    ("prefill", "prefill, {prefill} tokens (tokens/s)", lambda r: r["prefill"]["tokens_per_s"], _fmt_rate, True),
    ("batch8", "decode, batch 8 (new tokens/s)", lambda r: r["batch8"]["tokens_per_s"], _fmt_rate, True),
    ("memory", "peak RSS", lambda r: r["memory"]["peak_rss_bytes"], _mib, False),
    ("encode", "encode, {sentences} sentences (sentences/s)", lambda r: r["encode"]["sentences_per_s"], _fmt_rate, True),
    ("encode", "encode (real tokens/s)", lambda r: r["encode"]["tokens_per_s"], _fmt_rate, True),
]


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def status_text(record):
    return {"not installed": "not installed", "error": "error"}.get(record["status"], "—")


def results_table(engines, records, spec):
    engines = [e for e in engines if e not in bench_quant.QUANT_ENGINE_NAMES]  # their own table (report)
    labels = [bench_peers.ENGINES[e].label for e in engines]
    # pyxf / peer columns for the float peers; the quantized engines are compared in the roofline table
    peers = [e for e in engines if e != REFERENCE and REFERENCE in engines and e not in bench_quant.QUANT_ENGINE_NAMES
             and e not in bench_peers.REDUCED_ENCODERS]
    head = ["workload", *labels] + [f"pyxf / {bench_peers.ENGINES[p].label}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, label, get, fmt, _ in ROWS:
        if workload not in spec["workloads"]:
            continue
        label = label.format(prefill=len(spec["prefill_ids"]), sentences=len(spec.get("encode_texts", [])))
        values = {}
        cells = []
        for e in engines:
            record = records[e]
            try:
                values[e] = get(record["results"])
                cells.append(fmt(values[e]))
            except (KeyError, TypeError):
                values[e] = None
                cells.append("n/a" if workload not in bench_peers.ENGINES[e].workloads else status_text(record))
        for p in peers:
            ref, other = values.get(REFERENCE), values.get(p)
            cells.append(f"{ref / other:.2f}×" if ref and other else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "memory" in spec["workloads"]:
        cells = []
        for e in engines:
            w = records[e].get("weights")
            cells.append(f"{_mib(w['bytes'])} ({w['format']})" if w else status_text(records[e]))
        lines.append("| weight file | " + " | ".join(cells) + " |" + " |" * len(peers))
    ref_tokens = records.get(REFERENCE, {}).get("tokens", {})
    if ref_tokens.get("decode") and len(peers):
        cells = []
        for e in engines:
            other = records[e].get("tokens", {})
            if e == REFERENCE or not other.get("decode"):
                cells.append("—" if e == REFERENCE else status_text(records[e]))
                continue
            n = common_prefix(ref_tokens["decode"], other["decode"])
            agree = f"{n}/{len(ref_tokens['decode'])}"
            if ref_tokens.get("batch8") and other.get("batch8"):
                pairs = list(zip(ref_tokens["batch8"], other["batch8"]))
                agree += f"; batch 8: {sum(common_prefix(a, b) for a, b in pairs)}/{sum(len(a) for a, _ in pairs)}"
            cells.append(agree)
        lines.append("| greedy tokens equal to pyxf's (leading run) | " + " | ".join(cells) + " |" + " |" * len(peers))
    if "encode" in spec["workloads"] and any("encode_min_cosine" in records[e] for e in engines):
        cells = ["—" if e == REFERENCE else f"{records[e]['encode_min_cosine']:.6f}" if "encode_min_cosine" in records[e]
                 else status_text(records[e]) for e in engines]
        lines.append("| encode: lowest cosine similarity to pyxf's embeddings | " + " | ".join(cells) + " |"
                     + " |" * len(peers))
    return "\n".join(lines)


def details_table(engines, records, spec):
    lines = ["| engine | measurement | median | min | max |", "|---|---|---|---|---|"]
    for e in engines:
        r = records[e].get("results", {})
        label = bench_peers.ENGINES[e].label

        def row(what, s):
            lines.append(f"| {label} | {what} | {s['median_s']:.3f} s | {s['min_s']:.3f} s | {s['max_s']:.3f} s |")

        if "decode" in r:
            d = r["decode"]
            row(f"generate, batch 1, 1 new token ({d['prompt_tokens']}-token prompt)", d["generate_1"])
            row(f"generate, batch 1, {d['new_tokens']} new tokens", d["generate_n"])
        if "prefill" in r:
            row(f"forward, {r['prefill']['prompt_tokens']} tokens, last logits", r["prefill"])
        if "batch8" in r:
            row(f"generate, batch {r['batch8']['batch']}, {r['batch8']['new_tokens']} new tokens in all", r["batch8"])
        if "encode" in r:
            row(f"encode {r['encode']['sentences']} sentences ({r['encode']['tokens']} tokens), batches of "
                f"{r['encode']['batch']}", r["encode"])
            if r["encode"].get("cpu_s") is not None:
                lines.append(f"| {label} | encode: CPU time of all its threads | {r['encode']['cpu_s']:.3f} s | | |")
        if "memory" in r:
            m = r["memory"]
            after = _mib(m["rss_after_load_bytes"]) if m.get("rss_after_load_bytes") else "?"
            lines.append(f"| {label} | RSS after load / peak | {after} / {_mib(m['peak_rss_bytes'])} | | |")
        if records[e].get("load_s") is not None:
            lines.append(f"| {label} | model load (not a workload) | {records[e]['load_s']:.2f} s | | |")
    return "\n".join(lines)


def write_plot(path, engines, records, spec):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    engines = [e for e in engines if e not in bench_quant.QUANT_ENGINE_NAMES]
    rows = [row for row in ROWS if row[0] in spec["workloads"]]
    if not rows:  # nothing timed (quality alone)
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (workload, label, get, _, higher) in zip(axes[0], rows):
        names, values = [], []
        for e in engines:
            try:
                v = get(records[e]["results"])
            except (KeyError, TypeError):
                v = None
            names.append(bench_peers.ENGINES[e].label.replace(" (", "\n("))
            values.append(0 if v is None else (v / 2**20 if workload == "memory" else v))
        bars = ax.bar(range(len(names)), values, color=[colors[i % len(colors)] for i in range(len(names))])
        for bar, v in zip(bars, values):
            ax.annotate((f"{v:,.0f}" if v >= 100 else f"{v:.1f}") if v else "n/a", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        title = label.format(prefill=len(spec["prefill_ids"]), sentences=len(spec.get("encode_texts", [])))
        if workload == "memory":
            title = "peak RSS (MiB)"
        ax.set_title(title + ("\nhigher is better" if higher else "\nlower is better"), fontsize=9)
        ax.margins(y=0.15)
    models = (["SmolLM2-135M-Instruct"] if any(w in DECODER_WORKLOADS for w in spec["workloads"]) else []) + (
        [f"encode: {Path(spec['encode_hf_dir']).name}"] if "encode" in spec["workloads"] else [])
    fig.suptitle(f"{', '.join(models)}; float32, {spec['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def method_lines(spec):
    """The Method section's bullets for the workloads that ran."""
    lines = []
    if any(w in DECODER_WORKLOADS for w in spec["workloads"]):
        lines += [
            "- Prompts are encoded once with the model's tokenizer and the same token ids go to every engine. "
            "Decoding is greedy and every engine produces exactly the requested number of new tokens "
            "(pyxf with its EOS stop removed, transformers with `min_new_tokens`).",
            f"- **decode, batch 1**: a {len(spec['decode_prompt'])}-token prompt, {spec['decode_new_tokens']} new "
            f"tokens. tokens/s = ({spec['decode_new_tokens']} − 1) / (t(generate {spec['decode_new_tokens']} tokens) − "
            f"t(generate 1 token)): the decode steps alone, without the prompt's prefill and per-call setup.",
            f"- **prefill**: one forward pass over {len(spec['prefill_ids'])} tokens computing the last position's "
            f"logits (pyxf: a new `session(...).feed(ids, all_logits=False)`; transformers: "
            f"`model(ids, logits_to_keep=1)`), KV cache creation included.",
            f"- **decode, batch 8**: {len(spec['batch_prompts'])} different prompts cut to the same length "
            f"({len(spec['batch_prompts'][0])} tokens, so no padding), {spec['batch_new_tokens']} new tokens each, "
            f"one batched generate call; (8 × {spec['batch_new_tokens']}) / total time, prefill included.",
            "- **peak RSS**: the high-water mark of resident memory (`VmHWM`) of a separate process per engine that imports the engine, loads the model "
            "and runs the batch-1 decode once. pyxf memory-maps its float32 file (the pages it reads count as "
            "resident); transformers holds the dequantized float32 weights in its own memory.",
        ]
    if "encode" in spec["workloads"]:
        lines.append(
            f"- **encode**: {len(spec['encode_texts'])} sentences of {ENCODE['min_words']}-{ENCODE['max_words']} words "
            f"(English prose), {spec['encode_tokens']} real tokens after truncation to {spec['encode_max_length']}; "
            f"text in, mean-pooled normalized float32 embeddings out, tokenization included (every engine uses the "
            f"model's tokenizer.json through `tokenizers`, single-threaded). Every engine sorts by length and runs "
            f"batches of {spec['encode_batch']}: pyxf `Model.encode` (packed, no padding), sentence-transformers "
            f"`encode`, ONNX Runtime `InferenceSession.run` and CTranslate2 `Encoder.forward_batch` on padded "
            f"batches, pooled in numpy. sentences/s = {len(spec['encode_texts'])} / time; tokens/s counts real "
            f"tokens only. The embeddings are checked against pyxf's (lowest cosine similarity in the table)."
        )
    return lines


def report(args, spec, machine, records, started, loads, plot_name, quality=None):
    engines = args.engines
    pyxf_versions = records.get(REFERENCE, {}).get("versions", {})
    command = "python tools/bench.py" + ("" if len(sys.argv) < 2 else " " + shlex.join(report_args(sys.argv[1:])))
    versions = []
    for e in engines:
        r = records[e]
        label = bench_peers.ENGINES[e].label
        if r.get("versions"):
            v = r["versions"]
            keys = [k for k in v if k not in ("threads", "prefill_logits")]
            versions.append(f"- {label}: " + ", ".join(f"{k} {v[k]}" for k in keys if v[k] is not None)
                            + f"; {v.get('threads')} threads")
        else:
            versions.append(f"- {label}: {status_text(r)}" + (f" ({'; '.join(r['details'])})" if r["details"] else ""))
    problems = [f"- {bench_peers.ENGINES[e].label}: {'; '.join(records[e]['details'])}"
                for e in engines if records[e]["details"] and records[e]["status"] != "not installed"]

    lines = [
        f"# {machine['cpu_title']}",
        "",
        f"pyxf beside its peers on this CPU, written by `tools/bench.py` on {started:%Y-%m-%d %H:%M} UTC:",
        "",
        "```",
        command,
        "```",
        "",
        *([f"Model: SmolLM2-135M-Instruct (`{tilde(spec['model_dir'])}`), every engine of the first table computing "
           f"in float32 from the same weights (the Q4_1 GGUF dequantized: by pyxf's converter into its model file, "
           f"`--dequantize`, by the peers at load).", ""] if spec.get("model_dir") else []),
        *([f"Encoder (the encode workload): `{tilde(spec['encode_hf_dir'])}` in float32 in every engine (pyxf: "
           f"converted to `{tilde(spec['encode_model_dir'])}`).", ""] if "encode" in spec["workloads"] else []),
        f"Threads: {spec['threads']} for every engine. Median of {spec['repeat']} run(s) after a warm-up.",
        "",
        "## Results",
        "",
        results_table(engines, records, spec),
        "",
        "Ratios above 1 mean pyxf is faster (for peak RSS: pyxf uses more memory).",
        "",
    ]
    if plot_name:
        lines += [f"![benchmark plot]({plot_name})", ""]
    lines += bench_quant.report_section(engines, records, spec, {e: bench_peers.ENGINES[e].label for e in engines},
                                        common_prefix)
    lines += bench_quant.quality_section(quality)
    if problems:
        lines += ["Failures:", "", *problems, ""]
    lines += [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}; {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical "
        f"CPUs usable; {machine['memory']} memory",
        f"- SIMD: {', '.join(machine['simd_flags']) or 'none of AVX2/AVX-512 reported'}; ISA pyxf chose: "
        f"{pyxf_versions.get('isa', 'n/a')}",
        f"- {machine['os']}, Python {machine['python']}",
        f"- load average (1 min) before / after the run: {loads[0]:.2f} / {loads[1]:.2f}"
        + ("  (other work was running: numbers are noisier and lower than on an idle machine)"
           if max(loads) > 0.5 * machine["logical_cpus"] else ""),
        "",
        "Engines:",
        "",
        *versions,
        "",
        "## Method",
        "",
        *method_lines(spec),
        *bench_quant.method_lines(spec),
        "- Each engine runs in its own subprocess (`tools/bench_peers.py`), one engine at a time.",
        "",
        "## Timings",
        "",
        details_table(engines, records, spec),
        "",
        "ONNX Runtime runs the encode workload only; CTranslate2's and llama.cpp's decoders are the "
        "quantized section's engines.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    loads = [os.getloadavg()[0]]
    base = {
        "model_dir": None, "gguf": None, "threads": args.threads,
        "repeat": args.repeat, "workloads": args.workloads, "pyxf_revision": git_revision(),
        "decode_prompt": [], "decode_new_tokens": args.sizes["decode_new_tokens"],
        "batch_prompts": [[]], "batch_new_tokens": args.sizes["batch_new_tokens"], "prefill_ids": [],
    }
    if any(w in DECODER_WORKLOADS for w in args.workloads) or "quality" in args.workloads:
        model_dir, config, gguf = resolve_model(args)
        decode_prompt, batch, prefill = build_prompts(model_dir, config, args.sizes)
        base.update(model_dir=str(model_dir), gguf=str(gguf) if gguf else None, decode_prompt=decode_prompt,
                    batch_prompts=batch, prefill_ids=prefill)
    if "encode" in args.workloads:
        base.update(encode_spec(args))
    quant_engines = [e for e in args.engines if e in bench_quant.QUANT_ENGINE_NAMES]
    if (quant_engines or "quality" in args.workloads) and base["gguf"]:
        from pyxf import hub

        base["quant"] = bench_quant.prepare(base["gguf"], hub.cache_dir() / "bench" / "quant", args.threads,
                                            want_ct2=any(e.startswith("ct2-") for e in quant_engines))
    # The machine's read bandwidth moves during a run (other tenants of the host): probed before each
    # engine, and the roofline divides by the median of the probes.
    bandwidth = [] if any(w in DECODER_WORKLOADS for w in args.workloads) else None
    if bandwidth is not None:
        print("bench: measuring memory bandwidth", file=sys.stderr, flush=True)
        base["bandwidth"] = {"threads": args.threads, "one_thread_bytes_per_s": bench_quant.memory_bandwidth(1)}
    records = {}
    with tempfile.TemporaryDirectory(prefix="pyxf-bench-") as workdir:
        base["encode_output_dir"] = workdir
        for engine in args.engines:
            supported = bench_peers.ENGINES[engine].workloads
            timed = [w for w in args.workloads if w != "memory" and w in supported]
            phases = []
            if timed:
                if bandwidth is not None and any(w in DECODER_WORKLOADS for w in timed):
                    bandwidth.append(bench_quant.memory_bandwidth(args.threads))
                print(f"bench: {engine}: {', '.join(timed)}", file=sys.stderr, flush=True)
                phases.append(run_worker(engine, {**base, "workloads": timed, "phase": "timed"}, workdir))
            if ("memory" in args.workloads and "memory" in supported
                    and not (phases and phases[0]["status"] == "not installed")):
                print(f"bench: {engine}: memory", file=sys.stderr, flush=True)
                phases.append(run_worker(engine, {**base, "workloads": ["memory"], "phase": "memory"}, workdir))
            records[engine] = merge(phases)
        if bandwidth is not None:
            bandwidth.append(bench_quant.memory_bandwidth(args.threads))
            base["bandwidth"].update(bytes_per_s=statistics.median(bandwidth), samples=bandwidth)
        if "encode" in args.workloads:
            agreement = encode_agreement(args.engines, workdir)
            for engine, cosine in agreement.items():
                records[engine]["encode_min_cosine"] = cosine
    translation = run_translation(args) if "translate" in args.workloads else None
    serving = run_serving(args) if "serve" in args.workloads else None
    quality = None
    if "quality" in args.workloads and base.get("quant"):
        print("bench: quality of the quantized files (pyxf, llama.cpp)", file=sys.stderr, flush=True)
        quality = bench_quant.quality(base["quant"], args.threads)
    loads.append(os.getloadavg()[0])
    for engine in ("pyxf", "torch"):  # float32 engines reading the float32 weights
        if engine in records and base["model_dir"] and "decode" in records[engine]["results"]:
            records[engine].setdefault("bytes_per_token", bench_quant.pyxf_bytes_per_token(base["model_dir"]))

    machine = machine_info()
    spec = {**base, "workloads": args.workloads}
    table = results_table(args.engines, records, spec)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "spec": {k: v for k, v in base.items()},
                                               "records": records, "started": started.isoformat(),
                                               "loadavg": loads, "quality": quality}, indent=1))
    if args.output:
        output = Path(args.output)
        plot = output.with_name(f"{output.stem}-{slug(machine['cpu_title'])}.png")
        plot_name = plot.name if write_plot(plot, args.engines, records, spec) else None
        text = report(args, spec, machine, records, started, loads, plot_name, quality)
        for section in (translation, serving):
            if section:
                text = text.replace("## Machine\n", section + "\n## Machine\n", 1)
        output.write_text(merge_cpu_section(output.read_text() if output.is_file() else "", demote(text)))
        print(f"bench: wrote {output}" + (f" and {plot}" if plot_name else " (no matplotlib: no plot)"), file=sys.stderr)
    else:
        print(details_table(args.engines, records, spec))
        for section in (translation, serving):
            if section:
                print(section)
        print("\n".join(bench_quant.quality_section(quality)))
    return 0


def slug(text):
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def demote(markdown):
    """Every heading one level deeper: a machine's report becomes one section of BENCHMARKS.md."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines()) + "\n"


REPORT_HEAD = """# Benchmarks

pyxf beside its peers, one section per CPU kind it was measured on: `python tools/bench.py` writes (or
replaces) the section of the CPU it runs on and keeps the others. Speeds depend on the CPU far more than
on anything else, so compare pyxf with its peers within a section, not across sections.
"""


def merge_cpu_section(existing, section):
    """BENCHMARKS.md with `section` (a "## CPU" section) in place of the one of the same CPU, or
    appended; the other CPUs' sections are kept as they are."""
    title = section.splitlines()[0]
    parts, current = [], None
    for line in existing.splitlines(keepends=True):
        if line.startswith("## "):
            current = [line]
            parts.append(current)
        elif current is not None:
            current.append(line)
    sections = ["".join(p).rstrip("\n") + "\n" for p in parts]
    old = next((s for s in sections if s.splitlines()[0] == title), None)
    if old is not None:  # keep the subsections other tools wrote there (bench_serve's, ...)
        section = section.rstrip("\n") + "\n" + "".join("\n" + sub for sub in _foreign_subsections(old, section))
    replaced = [section if s.splitlines()[0] == title else s for s in sections]
    if section not in replaced:
        replaced.append(section)
    return REPORT_HEAD + "\n" + "\n".join(replaced)


# The subsections this report writes (any others in a CPU's section come from other tools).
OWN_SUBSECTIONS = ("### Results", "### Quantized decoding", "### Translation", "### Machine", "### Method",
                   "### Timings")


def _foreign_subsections(old, new):
    """The "### " subsections of `old` that other tools wrote and `new` does not have."""
    def split(text):
        subs, current = [], None
        for line in text.splitlines(keepends=True):
            if line.startswith("### "):
                current = [line]
                subs.append(current)
            elif current is not None:
                current.append(line)
        return {"".join(sub).splitlines()[0]: "".join(sub).rstrip("\n") + "\n" for sub in subs}

    ours = split(new)
    return [text for title, text in split(old).items() if title not in ours and not title.startswith(OWN_SUBSECTIONS)]


def run_translation(args):
    """The translation section (Markdown) from tools/bench_seq2seq.py, run with the same threads and
    repetitions; None when it fails (its error is printed)."""
    engines = [e for e in TRANSLATE_ENGINES if e in args.engines]
    if "pyxf" not in engines:
        return None
    print(f"bench: translate: {', '.join(engines)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pyxf-bench-s2s-") as tmp:
        out = Path(tmp) / "translate.md"
        command = [sys.executable, str(HERE / "bench_seq2seq.py"), "--threads", str(args.threads), "--repeat",
                   str(args.repeat), "--new-tokens", str(args.sizes["translate_new_tokens"]), "--engines",
                   ",".join(engines), "--output", str(out)]
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0 or not out.is_file():
            print(f"bench: translate failed: {proc.stderr[-3000:]}", file=sys.stderr)
            return None
        command[1] = "tools/bench_seq2seq.py"
        return out.read_text() + "\nCommand: `" + " ".join(shlex.quote(c) for c in ["python", *command[1:-2]]) + "`\n"


def run_serving(args):
    """The serving section (Markdown) from tools/bench_serve.py with the same threads (--quick: its
    quick run); None when it fails (its error is printed)."""
    print("bench: serve: pyxf serve, llama-cpp-python server", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pyxf-bench-serve-") as tmp:
        out = Path(tmp) / "serve.md"
        command = [sys.executable, str(HERE / "bench_serve.py"), "--threads", str(args.threads), "--output", str(out)]
        if args.quick:
            command.append("--quick")
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0 or not out.is_file():
            print(f"bench: serve failed: {proc.stderr[-3000:]}", file=sys.stderr)
            return None
        # One heading level up: the report is demoted as a whole into its CPU's section.
        return "\n".join(line[1:] if line.startswith("##") else line for line in out.read_text().splitlines()) + "\n"


if __name__ == "__main__":
    sys.exit(main())
