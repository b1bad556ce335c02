#!/usr/bin/env python3
"""pyxf against its peers on the same weights, measured in pairs taken seconds apart.

    python tools/bench_paired.py [--formats q8_0,q4_0,q4_k_m] [--encode-pairs PYXF:PEER,...] [--rounds 9]
                                 [--threads 2] [--output FILE.md]

On a machine whose memory bandwidth moves from minute to minute (other tenants of the host), two
engines timed minutes apart, as tools/bench.py does, carry that drift into their ratio. Here each
engine of a pair (tools/bench_peers.py's engines with tools/bench.py's workloads) is loaded once in a
worker process of its own, and the two take turns (which goes first alternates), so every round
gives one ratio measured under the same conditions; the report gives the median ratio over the
rounds and its range. The idle worker waits blocked on its input, and each turn starts a second
after the other's, when the idle engine's threads have stopped spinning, so it takes no CPU from the
one being timed.

Decoder pairs (--formats): pyxf-FMT and llama.cpp-FMT on the same GGUF file; each round times
batch-1 decode (generate(n) - generate(1), as tools/bench.py) and a 512-token prefill. The read
bandwidth is probed (tools/bench_quant.py's probe) before each round, so each engine's decode is
also a fraction of the ceiling of its own round (bandwidth / bytes of weights a step reads).

Encoder pairs (--encode-pairs, e.g. pyxf-encode-int8:ctranslate2-int8): tools/bench.py's encode
workload (all-MiniLM-L6-v2, 512 sentences, text in, embeddings out) in sentences/s.
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
    """Loads the engine, warms it up, then answers one line of JSON timings per command read: decode
    and prefill tokens/s (a decoder), or encode sentences/s (an encoder)."""
    import bench_peers

    spec = json.loads(Path(spec_path).read_text())
    engine = bench_peers.ENGINES[engine_name](spec)
    engine.load()
    encoder = engine_name in spec["encoders"]
    if encoder:
        texts = spec["encode_texts"]
        engine.encode(texts)
    else:
        prompt, n, prefill = spec["decode_prompt"], spec["decode_new_tokens"], spec["prefill_ids"]
        engine.generate([prompt], 8)
        engine.prefill(prefill)
    print("ready", flush=True)
    for command in sys.stdin:
        if command.strip() != "round":
            break
        if encoder:
            t, _ = bench_peers._timed(engine.encode, texts)
            print(json.dumps({"encode": len(texts) / t}), flush=True)
            continue
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


def spec_for(threads, formats, encoders):
    """tools/bench.py's decode and prefill workloads on the default model and its GGUF files (when
    there are decoder pairs), and its encode workload (when there are encoder pairs)."""
    import bench
    import bench_quant
    from pyxf import hub

    workloads = (["decode", "prefill"] if formats else []) + (["encode"] if encoders else [])
    args = bench.parse_args(["--workloads", ",".join(workloads), "--threads", str(threads)])
    spec = {"threads": threads, "repeat": 1, "workloads": workloads, "encoders": encoders}
    if formats:
        model_dir, config, gguf = bench.resolve_model(args)
        decode_prompt, _, prefill = bench.build_prompts(model_dir, config, args.sizes)
        quant = bench_quant.prepare(gguf, hub.cache_dir() / "bench" / "quant", threads, want_ct2=False)
        spec.update(model_dir=str(model_dir), gguf=str(gguf), decode_prompt=decode_prompt,
                    decode_new_tokens=args.sizes["decode_new_tokens"], batch_prompts=[[]], batch_new_tokens=0,
                    prefill_ids=prefill, quant=quant)
    if encoders:
        spec.update(bench.encode_spec(args))
    return spec


def run_pair(names, spec_path, threads, rounds, per_token=None):
    """The two engines' rates per round (one dict per engine and round), taking turns; with
    per_token (weight bytes a decode step reads), also each engine's decode over its round's ceiling."""
    import bench_quant

    pair = [Worker(name, spec_path, threads) for name in names]
    got, of_ceiling = [[], []], [[], []]
    try:
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            ceiling = bench_quant.memory_bandwidth(threads) / per_token if per_token else None
            this = {i: pair[i].round() for i in order}
            for i in (0, 1):
                got[i].append(this[i])
                if ceiling:
                    of_ceiling[i].append(this[i]["decode"] / ceiling)
            print(f"{names[0]} / {names[1]} round {r + 1}: " +
                  ", ".join(f"{w} {this[0][w]:.1f} / {this[1][w]:.1f}" for w in this[0]), file=sys.stderr, flush=True)
    finally:
        for w in pair:
            w.close()
    return got, of_ceiling


def rate_cells(got, workload):
    """'a / b' medians and '**ratio** (range)' of the rounds' ratios."""
    a, b = ([g[workload] for g in got[i]] for i in (0, 1))
    ratios = [x / y for x, y in zip(a, b)]
    return [f"{statistics.median(a):,.1f} / {statistics.median(b):,.1f}",
            f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="q8_0,q4_0,q4_k_m", help="decoder pairs: pyxf-FMT against llama.cpp-FMT "
                   "('' for none)")
    p.add_argument("--encode-pairs", default="", help="encoder pairs PYXF:PEER, comma-separated, e.g. "
                   "pyxf-encode-int8:ctranslate2-int8,pyxf-encode-bf16:ctranslate2")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", help="write the Markdown tables here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    import bench_peers
    import bench_quant
    from bench import machine_info

    formats = [f for f in args.formats.split(",") if f]
    pairs = [tuple(pair.split(":")) for pair in args.encode_pairs.split(",") if pair]
    for pair in pairs:
        if len(pair) != 2 or any(name not in bench_peers.ENGINES for name in pair):
            p.error(f"--encode-pairs: {':'.join(pair)} is not two engines of {', '.join(bench_peers.ENGINES)}")
    spec = spec_for(args.threads, formats, sorted({name for pair in pairs for name in pair}))
    lines = [f"`python tools/bench_paired.py --rounds {args.rounds}` on {machine_info()['cpu_title']}, "
             f"{args.threads} threads: the two engines of a pair take turns, one ratio per round; rates are medians "
             "over the rounds, ratios the median of the rounds' ratios (range).", ""]
    with tempfile.TemporaryDirectory(prefix="pyxf-paired-") as tmp:
        spec_path = str(Path(tmp) / "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        if formats:
            lines += ["Decoders: the same GGUF file converted with no flags (pyxf) and in llama.cpp; of ceiling: decode "
                      "tokens/s over (read bandwidth probed before the round / weight bytes a step reads), median "
                      "over the rounds.", "",
                      "| file | decode tok/s pyxf / llama.cpp | decode ratio | decode of ceiling pyxf / llama.cpp | "
                      "prefill 512 tok/s pyxf / llama.cpp | prefill ratio |", "|---|---|---|---|---|---|"]
        for fmt in formats:
            per_token = bench_quant.gguf_bytes_per_token(spec["quant"]["gguf"][fmt])
            got, of_ceiling = run_pair((f"pyxf-{fmt}", f"llama.cpp-{fmt}"), spec_path, args.threads, args.rounds,
                                       per_token)
            ceiling = f"{statistics.median(of_ceiling[0]):.0%} / {statistics.median(of_ceiling[1]):.0%}"
            lines.append(f"| {fmt.upper()} | " + " | ".join(rate_cells(got, "decode") + [ceiling] +
                                                        rate_cells(got, "prefill")) + " |")
        if pairs:
            lines += ([""] if formats else []) + [
                f"Encoders: tools/bench.py's encode workload ({len(spec['encode_texts'])} sentences, text in, "
                "normalized embeddings out), sentences/s.", "",
                "| pair | sentences/s | ratio |", "|---|---|---|"]
        for pair in pairs:
            got, _ = run_pair(pair, spec_path, args.threads, args.rounds)
            lines.append(f"| {pair[0]} / {pair[1]} | " + " | ".join(rate_cells(got, "encode")) + " |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
