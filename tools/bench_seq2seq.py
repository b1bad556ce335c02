#!/usr/bin/env python3
"""Translation benchmark: a Marian-sized random MarianMTModel (6+6 layers, d_model 512, 8 heads, FFN
2048, vocabulary 32k), 64 source sentences of 20-40 tokens, greedy and beam 4, target tokens/s of
pyxf, transformers (PyTorch) and CTranslate2 on the same weights and thread count.

    python tools/bench_seq2seq.py [--threads 2] [--repeat 3] [--new-tokens 32] [--engines pyxf,torch,ctranslate2]
                                  [--output FILE.md] [--json FILE]

Reduced precision (not in the default set): pyxf-bf16 (`pyxf.load(dtype="bfloat16")`), pyxf-int8
(`quantize="int8"`), ctranslate2-int8 and ctranslate2-int8_float32 (CTranslate2's compute types on
its float32 conversion).

Every engine gets the same source token ids and decodes exactly --new-tokens target positions per
hypothesis (min length = max length, so the end token never cuts a hypothesis short and every engine
does the same work); the last position is the end token where the model forces one there (Marian's
forced_eos_token_id: transformers and pyxf, not CTranslate2), so tokens/s counts decoded positions.
Each engine runs in its own subprocess with --threads threads; the time is the
median of --repeat runs after one warm-up run of the whole batch. CTranslate2 gets the model through
its TransformersConverter (float32, cached) and runs Translator.translate_batch (inter_threads 1,
intra_threads = --threads). The model, its pyxf conversion and the CTranslate2 conversion are cached
under $PYXF_CACHE/bench (default ~/.cache/pyxf/bench).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()

ENGINES = ("pyxf", "torch", "ctranslate2")
# engine -> (worker, its option: pyxf.load keywords or CTranslate2's compute type)
VARIANTS = {"pyxf": ("pyxf", {}), "pyxf-bf16": ("pyxf", {"dtype": "bfloat16"}), "pyxf-int8": ("pyxf", {"quantize": "int8"}),
            "torch": ("torch", None), "ctranslate2": ("ctranslate2", "default"),
            "ctranslate2-int8": ("ctranslate2", "int8"), "ctranslate2-int8_float32": ("ctranslate2", "int8_float32")}
LABELS = {"pyxf": "pyxf", "pyxf-bf16": "pyxf bf16", "pyxf-int8": "pyxf int8", "torch": "transformers (PyTorch)",
          "ctranslate2": "CTranslate2", "ctranslate2-int8": "CTranslate2 int8",
          "ctranslate2-int8_float32": "CTranslate2 int8_float32"}
MODEL = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
             encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=32000)
SOURCES = {"count": 64, "min_tokens": 20, "max_tokens": 40}


def cache_dir():
    root = Path(os.environ.get("PYXF_CACHE", Path.home() / ".cache" / "pyxf")) / "bench" / "marian-random-32k"
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_model(root):
    """The random MarianMTModel with a MarianTokenizer whose vocab.json has 32k pieces (the
    sentencepiece model is a small one trained here: CTranslate2's converter needs a tokenizer)."""
    hf = root / "hf"
    if (hf / "model.safetensors").is_file():
        return hf
    import sentencepiece
    import torch
    import transformers

    hf.mkdir(parents=True, exist_ok=True)
    (root / "text.txt").write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50))
    sentencepiece.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "spm"),
                                             vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    V = MODEL["vocab_size"]
    vocab = {"</s>": 0, "<unk>": 1, **{f"tok{i}": i for i in range(2, V - 1)}, "<pad>": V - 1}
    (root / "vocab.json").write_text(json.dumps(vocab))
    with_warnings_off = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.MarianTokenizer(str(root / "spm.model"), str(root / "spm.model"), str(root / "vocab.json"))
    transformers.logging.set_verbosity(with_warnings_off)
    config = transformers.MarianConfig(**MODEL, decoder_vocab_size=V, max_position_embeddings=512, pad_token_id=V - 1,
                                       eos_token_id=0, decoder_start_token_id=V - 1, forced_eos_token_id=0,
                                       scale_embedding=True, activation_function="swish")
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    return hf


def make_sources(seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    V = MODEL["vocab_size"]
    return [rng.integers(2, V - 1, rng.integers(SOURCES["min_tokens"], SOURCES["max_tokens"] + 1)).tolist() + [0]
            for _ in range(SOURCES["count"])]


# ---------------------------------------------------------------------------------------------
# workers (one subprocess per engine): `run(sources, beam, n)` -> generated target tokens


def worker_pyxf(root, threads, options):
    import pyxf
    from pyxf.convert import convert

    out = root / "pyxf"
    if not (out / "config.json").is_file():
        convert(root / "hf", out, progress=False)
    model = pyxf.load(out, threads=threads, **options)

    def run(sources, beam, n):
        hyps = pyxf.translate(model, sources, beam_size=beam, max_length=n, min_length=n)
        return [len(h) for h in hyps]

    return run


def worker_torch(root, threads, _):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.MarianMTModel.from_pretrained(root / "hf").eval()
    pad = model.config.pad_token_id

    def run(sources, beam, n):
        longest = max(map(len, sources))
        ids = torch.tensor([s + [pad] * (longest - len(s)) for s in sources])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), num_beams=beam, do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n)
        return [int(n) for n in ((out[:, 1:] != pad) & (out[:, 1:] != 0)).sum(1)]

    return run


def worker_ctranslate2(root, threads, compute_type):
    import ctranslate2

    out = root / "ct2"
    if not (out / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(str(root / "hf")).convert(str(out), force=True)
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type=compute_type, inter_threads=1,
                                        intra_threads=threads)
    V = MODEL["vocab_size"]
    names = {0: "</s>", 1: "<unk>", V - 1: "<pad>"}

    def run(sources, beam, n):
        tokens = [[names.get(t, f"tok{t}") for t in s] for s in sources]
        results = translator.translate_batch(tokens, beam_size=beam, max_decoding_length=n, min_decoding_length=n,
                                             length_penalty=1.0)
        return [len(r.hypotheses[0]) for r in results]

    return run


def worker_main(engine, threads, repeat, new_tokens):
    root = cache_dir()
    worker, option = VARIANTS[engine]
    run = globals()[f"worker_{worker}"](root, threads, option)
    sources = make_sources()
    out = {}
    for name, beam in (("greedy", 1), ("beam4", 4)):
        run(sources, beam, new_tokens)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            lengths = run(sources, beam, new_tokens)
            times.append(time.perf_counter() - start)
            # new_tokens decoded positions per hypothesis: new_tokens content tokens, or one fewer
            # where the model forces its end token into the last place (Marian's forced_eos_token_id,
            # which transformers and pyxf honour and CTranslate2 does not).
            if any(n not in (new_tokens - 1, new_tokens) for n in lengths):
                raise SystemExit(f"{engine} {name}: hypothesis lengths {sorted(set(lengths))}, expected {new_tokens}")
        produced = new_tokens * len(sources)
        seconds = statistics.median(times)
        out[name] = {"seconds": seconds, "tokens": produced, "tokens_per_s": produced / seconds}
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# driver


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--output", help="write a markdown report here")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.threads, args.repeat, args.new_tokens)

    build_model(cache_dir())
    from bench import machine_info

    cpu = machine_info()["cpu_title"]
    results = {}
    for engine in args.engines.split(","):
        if engine not in VARIANTS:
            p.error(f"unknown engine {engine!r} ({', '.join(VARIANTS)})")
        cmd = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads), "--repeat",
               str(args.repeat), "--new-tokens", str(args.new_tokens)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYXF_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{engine} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            results[engine] = None
            continue
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(engine, results[engine], file=sys.stderr)

    lines = [
        "## Translation (encoder-decoder)",
        "",
        f"Random MarianMTModel (6+6 layers, d_model 512, 8 heads, FFN 2048, vocabulary 32k, float32), "
        f"{SOURCES['count']} sources of {SOURCES['min_tokens']}-{SOURCES['max_tokens']} tokens in one batch, "
        f"exactly {args.new_tokens} target tokens per hypothesis, {args.threads} threads, median of {args.repeat}; "
        f"{cpu}. Target tokens/s (decoded positions of the best hypotheses, the forced end token included / wall time).",
        "",
        "| decoding | " + " | ".join(LABELS[e] for e in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    rates = {name: {e: (r[name]["tokens_per_s"] if r else None) for e, r in results.items()}
             for name in ("greedy", "beam4")}
    for name, rate in rates.items():
        cells = [f"{v:.0f}" if v else "failed" for v in rate.values()]
        lines.append(f"| {'greedy' if name == 'greedy' else 'beam 4'} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for a in results if a.startswith("pyxf") for b in results if not b.startswith("pyxf")]
    if pairs:
        lines += ["", "| pair | greedy | beam 4 |", "|---|---:|---:|"]
        for a, b in pairs:
            cells = [f"{rates[n][a] / rates[n][b]:.2f}x" if rates[n][a] and rates[n][b] else "n/a"
                     for n in ("greedy", "beam4")]
            lines.append(f"| {LABELS[a]} / {LABELS[b]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
