#!/usr/bin/env python3
"""The serve workload: `pyxf serve` beside llama-cpp-python's OpenAI server, under concurrent
streaming chat clients on loopback.

    python tools/bench_serve.py [--threads 2] [--concurrency 1,4,16,64] [--new-tokens 128]
                                [--servers pyxf,llama.cpp] [--soak SECONDS] [--quick]
                                [--output SECTION.md] [--update-report BENCHMARKS.md] [--json FILE]

Both servers load the same weights: SmolLM2-135M-Instruct in GGUF Q8_0 (made once from the default
model's GGUF by tools/bench_quant.py's helpers; pyxf serves it converted with --keep-quantized, so
the Q8_0 blocks are the same bytes) and run with the same thread count. Every client sends greedy
streaming chat requests with logit_bias -100 on the end-of-text tokens, so each answer is exactly
--new-tokens long on both servers. The prompts are a fixed set of 64 chat requests of 20-400 prompt
tokens (windows of one English text); client c of N sends prompts c, c + N, ... .

Measured per server and concurrency N: output tokens/s (all completion tokens / wall time of the
level), time to first token (TTFT) and inter-token latency (ITL, the gaps between content chunks)
p50/p99 over all requests, failed requests (an HTTP error, a broken stream, or no finish_reason),
and the server process's RSS before and after the level. Also measured: pyxf.generate of the
same 16 requests in one offline batch (the reference the server's 16-client throughput is held to);
a shared ~500-token system prompt across 16 clients with pyxf's prefix cache on and off (and on
llama-cpp-python, whose server reuses the previous request's prefix); and with --soak SECONDS,
64 clients for that long against pyxf (failed or lost requests, RSS growth after a warm-up).
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a source checkout
sys.path.insert(0, str(HERE))

import bench_quant  # noqa: E402
from bench import PREFILL_TEXT, REPORT_HEAD, git_revision, machine_info, tilde  # noqa: E402

SERVERS = ("pyxf", "llama.cpp")
CONCURRENCY = (1, 4, 16, 64)
PROMPTS = 64
PROMPT_TOKENS = (20, 400)  # the range of the prompt set's chat prompts, template included
SHARED_PREFIX_TOKENS = 500
SHARED_PREFIX_CLIENTS = 16
OFFLINE_REQUESTS = 16
PYXF_KV_CACHE_MB = 2048  # room for 64 requests of up to ~530 tokens without queueing
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 1800
SOAK_CLIENTS = 64
SOAK_WARMUP_S = 60
SOAK_SAMPLE_S = 10
SECTION_TITLE = "### Serving"  # inside BENCHMARKS.md's section of this machine's CPU ("## <CPU>")
SOAK_TITLE = "#### Serving soak"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                   help='comma-separated client counts ("" with --soak: the soak alone)')
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--no-prefix-test", dest="prefix_test", action="store_false",
                   help="skip the shared-system-prompt test")
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                   help=f"also run {SOAK_CLIENTS} clients against pyxf for this long (the issue's soak: 600)")
    p.add_argument("--kv-cache-mb", type=float, default=PYXF_KV_CACHE_MB,
                   help=f"pyxf serve's KV cache budget (default {PYXF_KV_CACHE_MB})")
    p.add_argument("--quick", action="store_true", help="a smoke run: 16 new tokens, concurrency 1 and 4")
    p.add_argument("--output", help="write the report section (Markdown) to this file")
    p.add_argument("--update-report", metavar="BENCHMARKS.md",
                   help=f"replace (or add) the '{SECTION_TITLE}' section of this report")
    p.add_argument("--json", help="also write the raw results as JSON to this file")
    args = p.parse_args(argv)
    args.concurrency = [int(n) for n in args.concurrency.split(",") if n]
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers {', '.join(sorted(unknown))}; known: {', '.join(SERVERS)}")
    if args.quick:
        args.new_tokens = 16
        args.concurrency = [1, 4]
    return args


def _log(message):
    print(f"bench-serve: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# weights and prompts


def prepare_weights(threads):
    """(Q8_0 GGUF file, the pyxf model converted from it keeping the Q8_0 blocks), made once in the
    cache directory tools/bench_quant.py uses."""
    from pyxf import hub
    from pyxf.convert import convert

    cache = hub.cache_dir() / "bench" / "quant"
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / "smollm2-q8_0.gguf"
    if not gguf.is_file():
        f32 = cache / "smollm2-f32.gguf"
        if not f32.is_file():
            _log("writing the F32 GGUF file")
            bench_quant.write_gguf(hub.default_gguf_path(), f32, "f32")
        _log("making the Q8_0 GGUF file")
        if not bench_quant.llama_quantize(f32, gguf, "q8_0", threads):
            bench_quant.write_gguf(hub.default_gguf_path(), gguf, "q8_0")
    model_dir = cache / "pyxf-q8_0"
    if not (model_dir / "config.json").is_file():
        _log("converting the Q8_0 GGUF file for pyxf")
        convert(gguf, model_dir, progress=False)  # the Q8_0 blocks kept
    return gguf, model_dir


def build_prompt_set(tokenizer, count=PROMPTS, low=PROMPT_TOKENS[0], high=PROMPT_TOKENS[1]):
    """`count` chat requests whose rendered prompts grow evenly from about `low` to `high` tokens,
    in an interleaved order so that every group of consecutive requests mixes short and long ones."""
    words = PREFILL_TEXT.split()
    by_length = []
    for i in range(count):
        target = low + (high - low) * i // (count - 1)
        start = (37 * i) % len(words)
        text_words = (words * 4)[start:]
        messages = _fit(tokenizer, lambda n: [{"role": "user", "content": "Continue this text: "
                                                + " ".join(text_words[:n])}], target)
        by_length.append(messages)
    order = sorted(range(count), key=lambda i: ((i * 29) % count))  # a fixed shuffle (29 is prime to 64)
    return [by_length[i] for i in order]


def _fit(tokenizer, make, target):
    """make(n words) for the largest n whose rendered prompt has at most `target` tokens (at least 1 word)."""
    low, high = 1, 2000  # prompt length grows with n: binary search for the last n that fits
    while low < high:
        mid = (low + high + 1) // 2
        if prompt_tokens(tokenizer, make(mid)) <= target:
            low = mid
        else:
            high = mid - 1
    return make(low)


def prompt_tokens(tokenizer, messages):
    return len(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))


def shared_prefix_requests(tokenizer, clients=SHARED_PREFIX_CLIENTS, prefix_tokens=SHARED_PREFIX_TOKENS):
    """`clients` chat requests with one system prompt of about `prefix_tokens` tokens and distinct
    short questions."""
    words = PREFILL_TEXT.split()
    system = _fit(tokenizer, lambda n: [{"role": "system", "content": "Answer questions about this text. "
                                         + " ".join((words * 4)[:n])}], prefix_tokens)[0]
    topics = ["lighthouses", "fog", "keepers", "lenses", "gardens", "tomatoes", "soil", "beans", "potatoes",
              "compost", "ships", "sailors", "museums", "travelers", "winter", "Alexandria"]
    return [[system, {"role": "user", "content": f"What does the text say about {topics[i % len(topics)]}?"}]
            for i in range(clients)]


# ---------------------------------------------------------------------------------------------
# servers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free loopback port, stopped with SIGTERM on exit."""

    def __init__(self, name, command, port, log):
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        _log(f"starting {name}: {shlex.join(command)}")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.model = self._wait_ready()

    def _wait_ready(self):
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} (log: {self.log.name})")
            try:
                response = httpx.get(f"{self.url}/v1/models", timeout=5)
                if response.status_code == 200:
                    return response.json()["data"][0]["id"]
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start within {STARTUP_TIMEOUT_S} s (log: {self.log.name})")

    def rss(self):
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def running_server(name, files, threads, logdir, prefix_cache=True, kv_cache_mb=PYXF_KV_CACHE_MB):
    gguf, model_dir = files
    port = free_port()
    if name == "pyxf":
        command = [sys.executable, "-m", "pyxf", "serve", f"smollm2-q8_0={model_dir}", "--port", str(port),
                   "--threads", str(threads), "--kv-cache-mb", str(kv_cache_mb), "--log-level", "warning"]
        if not prefix_cache:
            command.append("--no-prefix-cache")
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                   "--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--n_ctx", "4096", "--interrupt_requests", "False", "--verbose", "False"]
    label = name if prefix_cache else f"{name}-no-prefix-cache"
    with open(Path(logdir) / f"{label}.log", "w") as log:
        server = Server(label, command, port, log)
        try:
            yield server
        finally:
            code = server.stop()
            if code not in (0, None):
                _log(f"{label} exited with {code} (log: {log.name})")


# ---------------------------------------------------------------------------------------------
# clients


async def stream_chat(client, server, messages, new_tokens, never_stop):
    """One streaming chat request: {"ok", "tokens", "ttft", "itl" [gaps], "start", "end", "error"}."""
    body = {"model": server.model, "messages": messages, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": never_stop}
    record = {"ok": False, "tokens": 0, "ttft": None, "itl": [], "start": time.monotonic(), "end": None, "error": None}
    chunks, last, finish, usage = 0, None, None, None
    try:
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    if (choice.get("delta") or {}).get("content"):
                        now = time.monotonic()
                        if last is None:
                            record["ttft"] = now - record["start"]
                        else:
                            record["itl"].append(now - last)
                        last = now
                        chunks += 1
    except Exception as e:  # noqa: BLE001  (a failed request is counted, the run goes on)
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    record["end"] = time.monotonic()
    record["tokens"] = usage["completion_tokens"] if usage else chunks
    record["ok"] = finish is not None and record["ttft"] is not None
    if not record["ok"]:
        record["error"] = "the stream ended without a finish_reason"
    return record


def _http_client(connections):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=60),
                             limits=httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections + 4))


async def run_clients(server, prompt_lists, new_tokens, never_stop):
    """Client c sends prompt_lists[c] one after another; all clients at once. (records, wall seconds)."""
    async with _http_client(len(prompt_lists)) as client:
        async def one_client(prompts):
            return [await stream_chat(client, server, m, new_tokens, never_stop) for m in prompts]

        start = time.monotonic()
        per_client = await asyncio.gather(*(one_client(p) for p in prompt_lists))
        wall = time.monotonic() - start
    return [r for records in per_client for r in records], wall


def level_prompts(prompts, clients, requests_per_client):
    """Client c of `clients` gets prompts c, c + clients, ... (requests_per_client of them)."""
    return [[prompts[(c + k * clients) % len(prompts)] for k in range(requests_per_client)] for c in range(clients)]


def requests_per_client(clients):
    """Enough requests that a level lasts more than one request's time at low concurrency."""
    return max(1, 8 // clients)


def summarize(records, wall):
    ok = [r for r in records if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    itl = [gap for r in ok for gap in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(records), "failed": len(records) - len(ok), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
    }


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def soak(server, prompts, new_tokens, never_stop, seconds, clients=SOAK_CLIENTS):
    """`clients` clients sending requests back to back for `seconds`; RSS sampled along the way."""
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    samples = []

    async def sample_rss():
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - start, server.rss()))
            await asyncio.sleep(SOAK_SAMPLE_S)

    async with _http_client(clients) as client:
        async def one_client(c):
            records, k = [], 0
            while time.monotonic() < deadline:
                records.append(await stream_chat(client, server, prompts[(c + k * clients) % len(prompts)],
                                                 new_tokens, never_stop))
                k += 1
            return records

        sampler = asyncio.create_task(sample_rss())
        per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.monotonic() - start
        sampler.cancel()
    samples.append((wall, server.rss()))
    records = [r for rs in per_client for r in rs]
    after_warmup = next((rss for t, rss in samples if t >= SOAK_WARMUP_S), samples[0][1])
    return {**summarize(records, wall), "seconds": seconds, "clients": clients, "rss_after_warmup": after_warmup,
            "rss_end": samples[-1][1], "rss_max": max(rss for _, rss in samples),
            "rss_growth": (samples[-1][1] - after_warmup) / after_warmup,
            "rss_samples": [(round(t, 1), rss) for t, rss in samples]}


# ---------------------------------------------------------------------------------------------
# the runs


def measure_level(server, prompts, n, args, never_stop):
    rss_before = server.rss()
    records, wall = asyncio.run(run_clients(server, level_prompts(prompts, n, requests_per_client(n)),
                                            args.new_tokens, never_stop))
    r = {**summarize(records, wall), "rss_before": rss_before, "rss_after": server.rss()}
    _log(f"{server.name} N={n}: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {_fmt_s(r['ttft_p50'])}, "
         f"ITL p50 {_fmt_s(r['itl_p50'])}, failed {r['failed']}")
    return r


def measure_shared_prefix(server, requests, args, never_stop):
    """16 clients at once after one request has seen the shared system prompt (a warm server)."""
    asyncio.run(run_clients(server, [requests[:1]], 8, never_stop))
    records, wall = asyncio.run(run_clients(server, [[m] for m in requests], args.new_tokens, never_stop))
    result = summarize(records, wall)
    _log(f"{server.name} shared prefix: TTFT p50 {_fmt_s(result['ttft_p50'])}, {result['tokens_per_s']:.1f} tokens/s")
    return result


OFFLINE_SCRIPT = """
import json, sys, time
import pyxf
spec = json.loads(sys.stdin.read())
model = pyxf.load(spec["model_dir"], threads=spec["threads"])
ids = [model.tokenizer.encode(model.tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in spec["prompts"]]
bias = {int(t): float(b) for t, b in spec["never_stop"].items()}
pyxf.generate(model, ids[:2], max_new_tokens=4, logit_bias=bias)  # warm-up
start = time.perf_counter()
out = pyxf.generate(model, ids, max_new_tokens=spec["new_tokens"], logit_bias=bias)
wall = time.perf_counter() - start
print(json.dumps({"requests": len(ids), "tokens": sum(map(len, out)), "wall_s": wall}))
"""


def offline_batch(model_dir, prompts, new_tokens, threads, never_stop):
    """tokens/s of pyxf.generate over the same chat requests in one batch, in a fresh process with
    the OpenMP wait policy `pyxf serve` uses (so that only the serving differs), after the servers
    have stopped."""
    spec = {"model_dir": str(model_dir), "prompts": prompts, "new_tokens": new_tokens, "threads": threads,
            "never_stop": never_stop}
    from pyxf.server.serve import idle_threads_env

    env = {**os.environ, **idle_threads_env(os.environ), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], input=json.dumps(spec), capture_output=True,
                          text=True, env=env, timeout=REQUEST_TIMEOUT_S, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "tokens_per_s": result["tokens"] / result["wall_s"]}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM ends the run like Ctrl-C: the servers it started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import pyxf
    from pyxf.config import read_config
    from pyxf.tokenizer import Tokenizer

    started = datetime.datetime.now(datetime.timezone.utc)
    loads = [os.getloadavg()[0]]
    files = prepare_weights(args.threads)
    tokenizer = Tokenizer.from_model_dir(files[1], read_config(files[1]))
    eos = read_config(files[1])["eos_token_id"]
    never_stop = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    prompts = build_prompt_set(tokenizer)
    shared = shared_prefix_requests(tokenizer)
    spec = {
        "threads": args.threads, "new_tokens": args.new_tokens, "concurrency": args.concurrency,
        "gguf": tilde(files[0]), "model_dir": tilde(files[1]), "pyxf_revision": git_revision(),
        "prompt_tokens": [prompt_tokens(tokenizer, m) for m in prompts],
        "shared_prefix_tokens": prompt_tokens(tokenizer, shared[0][:1]),
        "pyxf_kv_cache_mb": args.kv_cache_mb, "llama_cpp_version": _llama_cpp_version(), "pyxf_version": pyxf.__version__,
    }
    results = {"levels": {name: {} for name in args.servers}, "shared_prefix": {}, "offline": None, "soak": None}
    with tempfile.TemporaryDirectory(prefix="pyxf-bench-serve-") as logdir, contextlib.ExitStack() as stack:
        # All servers up at once, and each measurement taken on one right after the other: load from
        # other work on the machine then falls on both alike. An idle server costs nothing.
        servers = {name: stack.enter_context(running_server(name, files, args.threads, logdir,
                                                             kv_cache_mb=args.kv_cache_mb))
                   for name in args.servers}
        if "pyxf" in args.servers and args.prefix_test:
            servers["pyxf-no-prefix-cache"] = stack.enter_context(
                running_server("pyxf", files, args.threads, logdir, prefix_cache=False, kv_cache_mb=args.kv_cache_mb))
        for server in servers.values():
            asyncio.run(run_clients(server, [prompts[:1]], 8, never_stop))  # warm-up
        for n in args.concurrency:
            for name in args.servers:
                results["levels"][name][n] = measure_level(servers[name], prompts, n, args, never_stop)
        if args.prefix_test:
            for name, server in servers.items():
                results["shared_prefix"][name] = measure_shared_prefix(server, shared, args, never_stop)
        if "pyxf" in args.servers and args.soak > 0:
            _log(f"soak: {SOAK_CLIENTS} clients for {args.soak:g} s")
            results["soak"] = asyncio.run(soak(servers["pyxf"], prompts, args.new_tokens, never_stop, args.soak))
    if "pyxf" in args.servers and OFFLINE_REQUESTS in args.concurrency:  # the 16-client level's reference
        _log(f"offline: pyxf.generate of {OFFLINE_REQUESTS} requests in one batch")
        offline_prompts = [m for client in level_prompts(prompts, OFFLINE_REQUESTS, 1) for m in client]
        results["offline"] = offline_batch(files[1], offline_prompts, args.new_tokens, args.threads, never_stop)
    loads.append(os.getloadavg()[0])

    machine = machine_info()
    sections = []
    if args.concurrency or results["shared_prefix"]:
        sections.append(report_section(args, spec, results, machine, started, loads))
    if results["soak"]:
        sections.append(soak_section(spec, results["soak"], machine, started, loads))
    print("\n".join(sections))
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results, "loadavg": loads}, indent=1))
    if args.output:
        Path(args.output).write_text("\n".join(sections))
    for section in sections if args.update_report else ():
        update_report(Path(args.update_report), section, machine["cpu_title"])
        _log(f"updated {args.update_report}")
    return 0


def _llama_cpp_version():
    try:
        import llama_cpp

        return llama_cpp.__version__
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# the report


def _fmt_s(seconds):
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(n):
    return f"{n / 2**20:.0f}"


LABELS = {"pyxf": "pyxf serve", "llama.cpp": "llama-cpp-python server",
          "pyxf-no-prefix-cache": "pyxf serve --no-prefix-cache"}


def report_section(args, spec, results, machine, started, loads):
    command = shlex.join(["python", "tools/bench_serve.py", *measurement_args(sys.argv[1:])])
    lp = spec["prompt_tokens"]
    lines = [
        SECTION_TITLE,
        "",
        f"`tools/bench_serve.py` on {started:%Y-%m-%d %H:%M} UTC ({spec['pyxf_revision']}), {machine['cpu']}, "
        f"{spec['threads']} threads per server:",
        "",
        "```",
        command,
        "```",
        "",
        f"SmolLM2-135M-Instruct, the same GGUF Q8_0 weights in both servers (pyxf: converted with "
        f"`--keep-quantized`, `--kv-cache-mb {spec['pyxf_kv_cache_mb']}`; llama-cpp-python {spec['llama_cpp_version']}: "
        f"`python -m llama_cpp.server --model smollm2-q8_0.gguf --n_threads {spec['threads']} --n_threads_batch "
        f"{spec['threads']} --n_ctx 4096 --interrupt_requests False`, so that a new request waits instead of cutting the running one short). N concurrent streaming chat clients (httpx, asyncio) over a fixed set of "
        f"{len(lp)} prompts of {min(lp)}-{max(lp)} tokens (mean {statistics.mean(lp):.0f}), greedy, exactly "
        f"{spec['new_tokens']} new tokens each (end-of-text banned with logit_bias). Client c of N sends prompts c, "
        f"c + N, ... ({', '.join(f'N={n}: {requests_per_client(n)}' for n in spec['concurrency'])} per client). "
        "TTFT: time to the first content chunk; ITL: gaps between content chunks.",
        "",
        "| server | N | requests | failed | output tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | RSS before -> after (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, levels in results["levels"].items():
        for n, r in levels.items():
            lines.append(
                f"| {LABELS[name]} | {n} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} | "
                f"{_fmt_s(r['ttft_p50'])} | {_fmt_s(r['ttft_p99'])} | {_fmt_s(r['itl_p50'])} | {_fmt_s(r['itl_p99'])} | "
                f"{_mib(r['rss_before'])} -> {_mib(r['rss_after'])} |"
            )
    lines.append("")
    lines += _targets(results)
    shared = results["shared_prefix"]
    if shared:
        lines += [
            f"Shared system prompt: {SHARED_PREFIX_CLIENTS} clients at once, one system prompt of "
            f"{spec['shared_prefix_tokens']} tokens and distinct short questions, after one earlier request with "
            f"that system prompt (a warm server):",
            "",
            "| server | TTFT p50 | TTFT p99 | output tokens/s | failed |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in shared.items():
            lines.append(f"| {LABELS[name]} | {_fmt_s(r['ttft_p50'])} | {_fmt_s(r['ttft_p99'])} | "
                         f"{r['tokens_per_s']:.1f} | {r['failed']} |")
        lines.append("")
        if "pyxf" in shared and "pyxf-no-prefix-cache" in shared and shared["pyxf"]["ttft_p50"]:
            ratio = shared["pyxf-no-prefix-cache"]["ttft_p50"] / shared["pyxf"]["ttft_p50"]
            lines += [f"Prefix cache: TTFT p50 {ratio:.1f}x lower with it than without (target: >= 5x).", ""]
    errors = [f"- {LABELS[name]} N={n}: {'; '.join(r['errors'])}" for name, levels in results["levels"].items()
              for n, r in levels.items() if r["errors"]]
    if errors:
        lines += ["Errors:", "", *errors, ""]
    lines += _load_lines(loads, machine)[1:]
    return "\n".join(lines)


def soak_section(spec, soak, machine, started, loads):
    s = soak
    return "\n".join([
        SOAK_TITLE,
        "",
        f"`tools/bench_serve.py --soak {s['seconds']:g}` on {started:%Y-%m-%d %H:%M} UTC ({spec['pyxf_revision']}), "
        f"{machine['cpu']}: {s['clients']} streaming chat clients against pyxf serve (the setup above, "
        f"`--kv-cache-mb {spec['pyxf_kv_cache_mb']:g}`, {spec['new_tokens']} new tokens per request), each sending "
        f"its next request as soon as one ends.",
        "",
        f"- {s['requests']} requests, {s['failed']} failed or lost; {s['tokens_per_s']:.1f} output tokens/s; "
        f"TTFT p50 {_fmt_s(s['ttft_p50'])}, p99 {_fmt_s(s['ttft_p99'])}; ITL p50 {_fmt_s(s['itl_p50'])}, "
        f"p99 {_fmt_s(s['itl_p99'])}.",
        f"- RSS {_mib(s['rss_after_warmup'])} MiB after {SOAK_WARMUP_S} s of warm-up, {_mib(s['rss_end'])} MiB at the "
        f"end: {s['rss_growth'] * 100:+.1f}% (target <= 5%); peak {_mib(s['rss_max'])} MiB.",
        *_load_lines(loads, machine),
    ])


def _load_lines(loads, machine):
    busy = max(loads) > 0.5 * machine["logical_cpus"]
    return ["", f"Load average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f}"
            + (" (other work was running on the machine: the numbers are noisier and lower than on an idle one)."
               if busy else "."), ""]


def measurement_args(argv):
    """The command line without the options that say where results went (--json, --output,
    --update-report), as the report shows it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--json", "--output", "--update-report"):
            skip = True
        elif not a.startswith(("--json=", "--output=", "--update-report=")):
            out.append(a)
    return out


def _targets(results):
    """The issue's 16-client targets, where both sides were measured."""
    levels = results["levels"]
    mine = levels.get("pyxf", {}).get(16)
    if not mine:
        return []
    lines = []
    peer = levels.get("llama.cpp", {}).get(16)
    if peer and peer["tokens_per_s"]:
        lines.append(f"- 16 clients: pyxf serve {mine['tokens_per_s']:.1f} output tokens/s = "
                     f"{mine['tokens_per_s'] / peer['tokens_per_s']:.1f}x llama-cpp-python's server (target >= 4x).")
    offline = results["offline"]
    if offline:
        lines.append(f"- 16 clients: {mine['tokens_per_s'] / offline['tokens_per_s'] * 100:.0f}% of pyxf.generate of "
                     f"the same {offline['requests']} requests in one offline batch ({offline['tokens_per_s']:.1f} "
                     f"tokens/s; a fresh process, same threads and OpenMP wait policy as the server) (target >= 80%).")
    lines.append(f"- 16 clients: TTFT p99 {_fmt_s(mine['ttft_p99'])} (target <= 3 s).")
    return [*lines, ""]


def update_report(path, section, cpu_title):
    """Puts `section` into BENCHMARKS.md's section of this CPU ("## <cpu_title>", made if missing):
    in place of the text under its heading (up to the next heading); else the soak subsection at the
    end of the serving subsection, and the serving subsection before that CPU's "### Machine"."""
    lines = path.read_text().splitlines() if path.is_file() else REPORT_HEAD.splitlines()
    cpu_heading = f"## {cpu_title}"
    if cpu_heading not in lines:
        lines += ["", cpu_heading, ""]
    cpu_start = lines.index(cpu_heading)
    cpu_end = next((i for i in range(cpu_start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))

    def find(title):
        return next((i for i in range(cpu_start, cpu_end) if lines[i] == title), None)

    def section_end(start, level):
        """The next heading of `level` or higher (fewer #) after start, within the CPU's section."""
        return next((i for i in range(start + 1, cpu_end)
                     if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), cpu_end)

    title = section.splitlines()[0]
    if find(title) is not None:  # its own text only: a later subsection (the soak's) stays
        start = find(title)
        end = section_end(start, 6)
    elif title != SECTION_TITLE and find(SECTION_TITLE) is not None:
        start = end = section_end(find(SECTION_TITLE), 3)
    else:
        machine = find("### Machine")
        start = end = machine if machine is not None else cpu_end
    lines[start:end] = section.rstrip("\n").splitlines() + [""]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


if __name__ == "__main__":
    sys.exit(main())
