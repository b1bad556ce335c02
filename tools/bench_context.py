#!/usr/bin/env python3
"""Batch-1 decode speed against context length: pyxf and llama.cpp (llama-cpp-python) on the same
SmolLM2-135M GGUF files, 2 threads.

    python tools/bench_context.py [--formats q8_0,q4_0,q4_k_m] [--contexts 16,256,512,1024,2048]
                                  [--threads 2] [--repeat 3] [--output FILE.md]

For each context length n: a session (pyxf) or llama.cpp context holds n prompt tokens, then 64 more
tokens are fed one at a time; tokens/s of those 64 steps, median of --repeat runs. Each engine runs
in its own subprocess. The GGUF files are tools/bench_quant.py's (llama.cpp's own quantizer on the
default model's weights); pyxf converts them with no flags (their blocks kept).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()

STEPS = 64


def worker(engine, fmt, contexts, threads, repeat):
    import numpy as np

    import bench_quant
    from pyxf import hub

    files = bench_quant.prepare(hub.default_gguf_path(), hub.cache_dir() / "bench" / "quant", threads, want_ct2=False)
    rng = np.random.default_rng(0)
    prompts = {n: [int(t) for t in rng.integers(100, 40000, n)] for n in contexts}
    steps = [int(t) for t in rng.integers(100, 40000, STEPS)]
    capacity = max(contexts) + STEPS + 8
    if engine == "pyxf":
        import pyxf

        model = pyxf.load(files["pyxf"][fmt], threads=threads, context_length=capacity)

        def run(prompt):
            session = model.session()
            session.feed(prompt, all_logits=False)
            start = time.perf_counter()
            for t in steps:
                session.feed([t], all_logits=False)
            return time.perf_counter() - start
    else:
        import llama_cpp

        llm = llama_cpp.Llama(files["gguf"][fmt], n_ctx=capacity, n_threads=threads, n_threads_batch=threads,
                              n_batch=512, verbose=False)

        def run(prompt):
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for t in steps:
                llm.eval([t])
            return time.perf_counter() - start
    run(prompts[contexts[0]])  # warm-up
    return {n: STEPS / statistics.median(run(prompts[n]) for _ in range(repeat)) for n in contexts}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="q8_0,q4_0,q4_k_m")
    p.add_argument("--contexts", default="16,256,512,1024,2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--output")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker:
        engine, fmt = args.worker
        print(json.dumps(worker(engine, fmt, contexts, args.threads, args.repeat)))
        return 0
    results = {}
    for fmt in args.formats.split(","):
        for engine in ("pyxf", "llama.cpp"):
            print(f"bench_context: {engine} {fmt}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--worker", engine, fmt, "--contexts", args.contexts,
                                   "--threads", str(args.threads), "--repeat", str(args.repeat)],
                                  capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if proc.returncode != 0:
                print(f"{engine} {fmt} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[engine, fmt] = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    from bench import machine_info

    cpu = machine_info().get("cpu_title", "")
    lines = [
        f"### Decode against context length ({cpu}, {args.threads} threads)",
        "",
        f"`python tools/bench_context.py --repeat {args.repeat}`: SmolLM2-135M, the same GGUF files in both engines; "
        f"tokens/s of {STEPS} tokens fed one at a time after a prompt of n tokens, median of {args.repeat} runs.",
        "",
        "| file | engine | " + " | ".join(f"n = {n}" for n in contexts) + " |",
        "|---|---|" + "---:|" * len(contexts),
    ]
    for fmt in args.formats.split(","):
        for engine in ("pyxf", "llama.cpp"):
            r = results.get((engine, fmt))
            if r:
                lines.append(f"| {fmt.upper()} | {engine} | " + " | ".join(f"{r[n]:.1f}" for n in contexts) + " |")
        a, b = results.get(("pyxf", fmt)), results.get(("llama.cpp", fmt))
        if a and b:
            lines.append(f"| {fmt.upper()} | pyxf / llama.cpp | " + " | ".join(f"{a[n] / b[n]:.2f}x" for n in contexts) + " |")
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
