#!/usr/bin/env python3
"""pyxf against llama.cpp on the same GGUF files, measured in pairs taken seconds apart.

    python tools/bench_paired.py [--formats q8_0,q4_0,q4_k_m] [--rounds 9] [--threads 2] [--output FILE.md]

On a machine whose memory bandwidth moves from minute to minute (other tenants of the host), two
engines timed minutes apart, as tools/bench.py does, carry that drift into their ratio. Here each
engine of a pair (pyxf-FMT and llama.cpp-FMT, tools/bench_peers.py's engines with tools/bench.py's
prompts) is loaded once in a worker process of its own, and the two take turns: each round times
batch-1 decode (generate(n) - generate(1), as tools/bench.py) and a 512-token prefill in one engine,
then in the other (which goes first alternates), so every round gives one ratio measured under the
same conditions. The read bandwidth is probed (tools/bench_quant.py's probe) before each round, so
each engine's decode is also a fraction of the ceiling of its own round (bandwidth / bytes of
weights a step reads). The report gives the median ratio over the rounds and its range. The idle worker
waits blocked on its input, and each turn starts a second after the other's, when the idle
engine's threads have stopped spinning, so it takes no CPU from the one being timed.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()


def worker(engine_name, spec_path):
    """Loads the engine, warms it up, then answers one line of JSON timings per command read."""
    import bench_peers

    spec = json.loads(Path(spec_path).read_text())
    engine = bench_peers.ENGINES[engine_name](spec)
    engine.load()
    prompt, n, prefill = spec["decode_prompt"], spec["decode_new_tokens"], spec["prefill_ids"]
    engine.generate([prompt], 8)
    engine.prefill(prefill)
    print("ready", flush=True)
    for command in sys.stdin:
        if command.strip() != "round":
            break
        t1, _ = bench_peers._timed(engine.generate, [prompt], 1)
        tn, out = bench_peers._timed(engine.generate, [prompt], n)
        bench_peers._check_lengths(out, 1, n, "decode")
        tp, _ = bench_peers._timed(engine.prefill, prefill)
        print(json.dumps({"decode": (n - 1) / (tn - t1), "prefill": len(prefill) / tp}), flush=True)


class Worker:
    def __init__(self, engine, spec_path, threads):
        env = dict(__import__("os").environ, OMP_NUM_THREADS=str(threads), PYXF_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, spec_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{engine} did not start")

    def round(self):
        time.sleep(1.0)  # the other engine's idle threads stop spinning and sleep
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def spec_for(threads):
    """tools/bench.py's decode and prefill workloads on the default model, and its GGUF files."""
    import bench
    import bench_quant
    from pyxf import hub

    args = bench.parse_args(["--workloads", "decode,prefill", "--threads", str(threads)])
    model_dir, config, gguf = bench.resolve_model(args)
    decode_prompt, _, prefill = bench.build_prompts(model_dir, config, args.sizes)
    quant = bench_quant.prepare(gguf, hub.cache_dir() / "bench" / "quant", threads, want_ct2=False)
    return {"model_dir": str(model_dir), "gguf": str(gguf), "threads": threads, "repeat": 1,
            "workloads": ["decode", "prefill"], "decode_prompt": decode_prompt,
            "decode_new_tokens": args.sizes["decode_new_tokens"], "batch_prompts": [[]], "batch_new_tokens": 0,
            "prefill_ids": prefill, "quant": quant}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="q8_0,q4_0,q4_k_m")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", help="write the Markdown table here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    import bench_quant
    from bench import machine_info

    spec = spec_for(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyxf-paired-") as tmp:
        spec_path = str(Path(tmp) / "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        for fmt in args.formats.split(","):
            pair = [Worker(f"pyxf-{fmt}", spec_path, args.threads), Worker(f"llama.cpp-{fmt}", spec_path, args.threads)]
            ratios = {"decode": [], "prefill": []}
            rates = {"decode": ([], []), "prefill": ([], [])}
            of_ceiling = ([], [])
            per_token = bench_quant.gguf_bytes_per_token(spec["quant"]["gguf"][fmt])
            try:
                for r in range(args.rounds):
                    order = (0, 1) if r % 2 == 0 else (1, 0)
                    ceiling = bench_quant.memory_bandwidth(args.threads) / per_token
                    got = {i: pair[i].round() for i in order}
                    for i in (0, 1):
                        of_ceiling[i].append(got[i]["decode"] / ceiling)
                    for w in ratios:
                        ratios[w].append(got[0][w] / got[1][w])
                        rates[w][0].append(got[0][w])
                        rates[w][1].append(got[1][w])
                    print(f"{fmt} round {r + 1}: decode {got[0]['decode']:.1f} / {got[1]['decode']:.1f}, "
                          f"prefill {got[0]['prefill']:.0f} / {got[1]['prefill']:.0f}", file=sys.stderr, flush=True)
            finally:
                for w in pair:
                    w.close()
            cells = []
            for w in ("decode", "prefill"):
                cells += [f"{statistics.median(rates[w][0]):,.1f} / {statistics.median(rates[w][1]):,.1f}",
                          f"**{statistics.median(ratios[w]):.2f}x** ({min(ratios[w]):.2f}-{max(ratios[w]):.2f})"]
                if w == "decode":
                    cells.append(f"{statistics.median(of_ceiling[0]):.0%} / {statistics.median(of_ceiling[1]):.0%}")
            rows.append(f"| {fmt.upper()} | " + " | ".join(cells) + " |")
    lines = [
        f"`python tools/bench_paired.py --rounds {args.rounds}` on {machine_info()['cpu_title']}, {args.threads} threads: "
        "the same GGUF files converted with no flags (pyxf) and in llama.cpp, the two engines taking turns, one "
        "ratio per round; tokens/s are medians over the rounds, ratios the median of the rounds' ratios (range); "
        "of ceiling: decode tokens/s over (read bandwidth probed before the round / weight bytes a step reads), "
        "median over the rounds.",
        "",
        "| file | decode tok/s pyxf / llama.cpp | decode ratio | decode of ceiling pyxf / llama.cpp | "
        "prefill 512 tok/s pyxf / llama.cpp | prefill ratio |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
