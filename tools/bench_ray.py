#!/usr/bin/env python3
"""The Ray workload: what running pyxf on Ray costs and gives on one machine.

    python tools/bench_ray.py [--threads 2] [--sentences 2048] [--clients 1,16] [--new-tokens 128]
                              [--rounds 2] [--quick] [--output SECTION.md] [--update-report BENCHMARKS.md]
                              [--json FILE]

Ray Data: all-MiniLM-L6-v2 embeddings of --sentences sentences (bench.py's encode workload: prose of
40-120 words, at most 128 tokens) in this process with Model.encode (--threads threads), and as a
Ray Data job (from_items -> map_batches(pyxf.ray.Embedder) -> materialize) with 1 actor of
--threads CPUs and with --threads actors of 1 CPU; rounds alternate the three. The job's wall time
includes starting the actors and loading the model in each; the overhead per row is
(job time - in-process time) / rows. Then the RSS and PSS of each of 2 Embedder actors (of the
whole process, and of the memory-mapped weight file).

Ray Serve: `pyxf serve` (--threads threads) and pyxf.ray.serve_app on a local Ray with 1 replica of
--threads CPUs and with --threads replicas of 1 CPU, all serving SmolLM2-135M-Instruct Q8_0 (as
tools/bench_serve.py) under N streaming chat clients (bench_serve's prompts and client: greedy,
exactly --new-tokens tokens each). The plain server stays up during the Ray runs and the levels
alternate between it and the Ray app, so both see the same load. Then RSS and PSS per replica.
"""

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a source checkout
sys.path.insert(0, str(HERE))

# Idle OpenMP threads sleep in this process and in the Ray workers it starts (they inherit the
# environment), as in `pyxf serve`: on a shared machine spinning threads distort every number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench_serve  # noqa: E402
from bench import build_encode_texts, git_revision, machine_info  # noqa: E402

SECTION_TITLE = "### Ray"
ENCODE_BATCH = 32  # Model.encode's batches, as bench.py's encode workload
DATA_BATCH_ROWS = 256  # rows per Ray Data batch (one map_batches call)
OBJECT_STORE_BYTES = 256 * 1024**2
SERVE_KV_CACHE_MB = bench_serve.PYXF_KV_CACHE_MB
PROXY_TITLE = "ray::ProxyActor"  # the process title of Serve's HTTP proxy


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="cores for each configuration (default 2)")
    p.add_argument("--sentences", type=int, default=2048)
    p.add_argument("--clients", default="1,16", help="concurrent streaming clients per serve level")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each measurement (medians)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 256 sentences, 16 tokens, 1 round")
    p.add_argument("--output", help="write the report section (Markdown) to this file")
    p.add_argument("--update-report", metavar="BENCHMARKS.md", help=f"replace (or add) the '{SECTION_TITLE}' section")
    p.add_argument("--json", help="also write the raw results as JSON to this file")
    p.add_argument("--from-json", metavar="FILE", help="write the report of an earlier run's --json file, measure nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.sentences, args.new_tokens, args.rounds = 256, 16, 1
    args.clients = [int(c) for c in args.clients.split(",") if c]
    return args


def _log(message):
    print(f"bench-ray: {message}", file=sys.stderr, flush=True)


def start_ray(cpus):
    import ray

    ray.init(num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


# ---------------------------------------------------------------------------------------------
# Ray Data: embeddings


def encode_in_process(model, texts):
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=ENCODE_BATCH, max_length=128)
    return time.perf_counter() - start, vectors


def encode_job(model_dir, texts, actors, cpus_per_actor):
    import numpy as np
    import ray

    from pyxf.ray import Embedder

    start = time.perf_counter()
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    options = {"model": str(model_dir), "batch_size": ENCODE_BATCH, "max_length": 128}
    rows = ds.map_batches(Embedder, fn_constructor_kwargs=options, compute=ray.data.ActorPoolStrategy(size=actors),
                          num_cpus=cpus_per_actor, batch_size=DATA_BATCH_ROWS).take_all()
    wall = time.perf_counter() - start
    rows.sort(key=lambda r: r["id"])
    return wall, np.stack([r["embedding"] for r in rows])


def measure_embeddings(args, texts):
    import numpy as np

    import pyxf
    from pyxf import hub

    model_dir = hub.minilm_model_path()
    model = pyxf.load(model_dir, threads=args.threads)
    model.encode(texts[:64], batch_size=ENCODE_BATCH)  # warm-up
    configs = {"in-process": None, "ray-1": (1, args.threads), f"ray-{args.threads}": (args.threads, 1)}
    times = {name: [] for name in configs}
    reference = model.encode(texts, batch_size=ENCODE_BATCH, max_length=128)
    worst = 0.0
    for r in range(args.rounds):
        for name, config in configs.items():
            if config is None:
                wall, vectors = encode_in_process(model, texts)
            else:
                wall, vectors = encode_job(model_dir, texts, *config)
            worst = max(worst, float(np.abs(vectors - reference).max()))
            times[name].append(wall)
            _log(f"embed round {r + 1}: {name} {wall:.2f} s ({len(texts) / wall:.1f} sentences/s)")
    result = {"sentences": len(texts), "threads": args.threads, "max_abs_diff": worst, "configs": {}}
    base = statistics.median(times["in-process"])
    for name, config in configs.items():
        wall = statistics.median(times[name])
        result["configs"][name] = {
            "actors": config[0] if config else 0, "cpus_per_actor": config[1] if config else args.threads,
            "wall_s": wall, "times": times[name], "sentences_per_s": len(texts) / wall,
            "overhead_ms_per_row": (wall - base) / len(texts) * 1000,
        }
    result["actor_memory"] = embedder_memory(model_dir, texts[:256])
    return result


def embedder_memory(model_dir, texts):
    """RSS / PSS of 2 Embedder actors after each embedded the same texts."""
    import numpy as np
    import ray

    from pyxf.ray import Embedder

    actors = [ray.remote(Embedder).options(num_cpus=1).remote(str(model_dir)) for _ in range(2)]
    ray.get([a.__call__.remote({"text": np.array(texts)}) for a in actors])
    usage = ray.get([a.memory.remote() for a in actors])
    for actor in actors:
        ray.kill(actor)
    return usage


# ---------------------------------------------------------------------------------------------
# Ray Serve


class RayServeApp:
    """pyxf.ray.serve_app on the local Ray, reached like bench_serve.Server (url, model, rss())."""

    def __init__(self, model_dir, replicas, threads, port):
        from ray import serve

        from pyxf.ray import serve_app

        self.name = f"ray serve, {replicas} replica{'s' if replicas > 1 else ''} x {threads} CPU"
        self.url = f"http://127.0.0.1:{port}"
        self.model = "smollm2-q8_0"
        self.model_dir = model_dir
        start = time.perf_counter()
        serve.run(serve_app([f"{self.model}={model_dir}"], replicas=replicas, threads=threads,
                            kv_cache_mb=SERVE_KV_CACHE_MB), name="pyxf", route_prefix="/")
        self.startup_s = time.perf_counter() - start

    def rss(self):
        return sum(u["rss"] for u in self.replica_memory())

    def replica_memory(self):
        """RSS / PSS of each process that maps the model file, but this one and the plain server."""
        from pyxf.ray import process_memory

        return [process_memory(pid, files_under=self.model_dir) for pid in replica_pids(self.model_dir)]


def replica_pids(model_dir):
    """Ray worker processes that map a file under model_dir (the replicas)."""
    root = str(Path(model_dir).resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "cmdline").read_text().startswith("ray::") and root in (entry / "maps").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def process_cpu_seconds(prefix):
    """CPU seconds (user + system) used so far by the processes whose command line starts with `prefix`."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_text().startswith(prefix):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def measure_level(server, prompts, clients, args, never_stop):
    per_client = bench_serve.requests_per_client(clients)
    proxy_cpu = process_cpu_seconds(PROXY_TITLE)
    records, wall = asyncio.run(bench_serve.run_clients(
        server, bench_serve.level_prompts(prompts, clients, per_client), args.new_tokens, never_stop))
    result = bench_serve.summarize(records, wall)
    if isinstance(server, RayServeApp):  # what Serve's HTTP proxy spent per token it relayed
        result["proxy_cpu_ms_per_token"] = (process_cpu_seconds(PROXY_TITLE) - proxy_cpu) / max(1, result["tokens"]) * 1000
    _log(f"{server.name} N={clients}: {result['tokens_per_s']:.1f} tokens/s, TTFT p50 "
         f"{bench_serve._fmt_s(result['ttft_p50'])} p99 {bench_serve._fmt_s(result['ttft_p99'])}, "
         f"failed {result['failed']}")
    return result


def measure_serving(args, logdir):
    from ray import serve

    from pyxf.config import read_config
    from pyxf.tokenizer import Tokenizer

    files = bench_serve.prepare_weights(args.threads)
    model_dir = files[1]
    prompts = bench_serve.build_prompt_set(Tokenizer.from_model_dir(model_dir, read_config(model_dir)))
    eos = read_config(model_dir)["eos_token_id"]
    never_stop = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    port = bench_serve.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    configs = []
    with bench_serve.running_server("pyxf", files, args.threads, logdir) as plain:
        plain.name = "pyxf serve"
        for replicas, threads in [(1, args.threads), (args.threads, 1)]:
            app = RayServeApp(model_dir, replicas, threads, port)
            _log(f"{app.name}: ready in {app.startup_s:.1f} s")
            runs = {"plain": {c: [] for c in args.clients}, "ray": {c: [] for c in args.clients}}
            for r in range(args.rounds):
                for clients in args.clients:
                    for server in (plain, app) if r % 2 == 0 else (app, plain):
                        key = "plain" if server is plain else "ray"
                        runs[key][clients].append(measure_level(server, prompts, clients, args, never_stop))
            configs.append({"name": app.name, "replicas": replicas, "threads": threads, "startup_s": app.startup_s,
                            "levels": {key: {c: _median_level(level) for c, level in by_clients.items()}
                                       for key, by_clients in runs.items()},
                            "replica_memory": app.replica_memory()})
            serve.delete("pyxf")  # frees its CPUs for the next configuration's replicas
        plain_rss = plain.rss()
    serve.shutdown()
    return {"configs": configs, "plain_rss": plain_rss, "prompts": len(prompts), "new_tokens": args.new_tokens}


def _median_level(runs):
    """The run with the median output tokens/s, plus every run's tokens/s and the failures of all."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    middle = dict(ordered[len(ordered) // 2])
    middle["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    middle["failed_all"] = sum(r["failed"] for r in runs)
    return middle


# ---------------------------------------------------------------------------------------------
# report


def _mib(n):
    return f"{n / 2**20:,.0f}"


def report_section(run):
    embed, serving, loads, threads = run["embed"], run["serving"], run["loads"], run["threads"]
    lines = [SECTION_TITLE, ""]
    lines.append(f"`tools/bench_ray.py` on {run['started']} UTC ({run['revision']}), {run['machine']['cpu_title']}, "
                 f"{threads} cores per configuration, Ray {run['ray']}, {run['rounds']} alternating round(s):")
    lines += ["", "```", "python tools/bench_ray.py", "```", ""]
    lines.append(f"Ray Data: all-MiniLM-L6-v2, {embed['sentences']} sentences of 40-120 words (at most 128 tokens), "
                 f"`Model.encode` in this process against a Ray Data job of `pyxf.ray.Embedder` "
                 f"({DATA_BATCH_ROWS} rows per batch) on a local Ray; the job's time includes starting its actors "
                 f"and loading the model in each. Largest difference from the in-process embeddings: "
                 f"{embed['max_abs_diff']:.1e}.")
    lines += ["", "| configuration | sentences/s (median) | wall of each round | Ray overhead per row |",
              "|---|---:|---:|---:|"]
    for c in embed["configs"].values():
        label = (f"`Model.encode`, {c['cpus_per_actor']} threads" if c["actors"] == 0
                 else f"Ray Data, {c['actors']} actor{'s' if c['actors'] > 1 else ''} x {c['cpus_per_actor']} CPU")
        overhead = "—" if c["actors"] == 0 else f"{c['overhead_ms_per_row']:+.2f} ms"
        rounds = ", ".join(f"{t:.1f} s" for t in c["times"])
        lines.append(f"| {label} | {c['sentences_per_s']:.1f} | {rounds} | {overhead} |")
    lines += ["", ("Memory of 2 Embedder actors on the machine after each embedded the same 256 sentences "
                   "(the weight file is memory-mapped: its pages are shared, PSS splits them between the processes "
                   "that map them):"), "", "| actor | RSS | PSS | weights RSS | weights PSS |", "|---|---:|---:|---:|---:|"]
    for i, u in enumerate(embed["actor_memory"]):
        lines.append(f"| {i + 1} | {_mib(u['rss'])} MiB | {_mib(u['pss'])} MiB | {u['weights_rss'] / 2**20:.1f} MiB "
                     f"| {u['weights_pss'] / 2**20:.1f} MiB |")
    lines += ["", (f"Ray Serve: SmolLM2-135M-Instruct Q8_0, `pyxf serve` against `pyxf.ray.serve_app` (Serve's HTTP "
                   f"proxy in front of the replicas), N streaming chat clients with bench_serve.py's "
                   f"{serving['prompts']} prompts, greedy, exactly {serving['new_tokens']} new tokens each; levels "
                   "alternate between the plain server and the Ray app. Output tokens/s of each round; the latencies "
                   "and the proxy's CPU time (per token it relayed) are those of the round with the median (of two: "
                   "the higher) tokens/s."), "",
              "| server | N | requests per round | failed | output tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
              "| proxy CPU per token |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = bench_serve._fmt_s
    for config in serving["configs"]:
        for clients in config["levels"]["ray"]:
            for key, label in (("plain", f"`pyxf serve`, {threads} threads"), ("ray", config["name"])):
                r = config["levels"][key][clients]
                proxy = f"{r['proxy_cpu_ms_per_token']:.2f} ms" if "proxy_cpu_ms_per_token" in r else "—"
                rates = ", ".join(f"{t:.1f}" for t in r["all_tokens_per_s"])
                lines.append(f"| {label} | {clients} | {r['requests']} | {r['failed_all']} | {rates} | "
                             f"{fmt(r['ttft_p50'])} | {fmt(r['ttft_p99'])} | {fmt(r['itl_p50'])} | "
                             f"{fmt(r['itl_p99'])} | {proxy} |")
    lines += ["", "Memory per replica (each maps the Q8_0 weight file):", "",
              "| deployment | replica | RSS | PSS | weights RSS | weights PSS |", "|---|---:|---:|---:|---:|---:|"]
    for config in serving["configs"]:
        for i, u in enumerate(config["replica_memory"]):
            lines.append(f"| {config['name']} | {i + 1} | {_mib(u['rss'])} MiB | {_mib(u['pss'])} MiB | "
                         f"{u['files_rss'] / 2**20:.1f} MiB | {u['files_pss'] / 2**20:.1f} MiB |")
    lines.append(f"\n`pyxf serve` RSS at the end: {_mib(serving['plain_rss'])} MiB. Replicas were ready "
                 + ", ".join(f"in {c['startup_s']:.1f} s ({c['name']})" for c in serving['configs'])
                 + " after `serve.run` (model loads included).")
    lines.append(f"\nLoad average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f}"
                 + (" (other work was running on the machine: the numbers are noisier and lower than on an idle one)."
                    if max(loads) > 1.0 else "."))
    return "\n".join(lines) + "\n"


def _ray_version():
    import ray

    return ray.__version__


def measure(args):
    import ray

    machine = machine_info()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    loads = [os.getloadavg()[0]]
    texts = build_encode_texts(args.sentences)
    start_ray(args.threads)
    try:
        embed = measure_embeddings(args, texts)
        with tempfile.TemporaryDirectory() as logdir:
            serving = measure_serving(args, logdir)
    finally:
        ray.shutdown()
    loads.append(os.getloadavg()[0])
    return {"embed": embed, "serving": serving, "machine": machine, "started": started, "loads": loads,
            "revision": git_revision(), "ray": _ray_version(), "threads": args.threads, "rounds": args.rounds}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
    else:
        run = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(run, indent=1, default=str))
    machine = run["machine"]
    section = report_section(run)
    print(section)
    if args.output:
        Path(args.output).write_text(section)
    if args.update_report:
        bench_serve.update_report(Path(args.update_report), section, machine["cpu_title"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
