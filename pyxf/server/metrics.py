"""/metrics in Prometheus' text format (version 0.0.4): the engines' state (running and waiting
requests, KV blocks, prefix-cache hits, tokens/s) and the server's request counts and latencies."""

import bisect
import collections
import math
import threading
import time

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
THROUGHPUT_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative-bucket histogram of one label set."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self, name, labels):
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            le = "+Inf" if bound == math.inf else repr(bound)
            yield f"{name}_bucket", {**labels, "le": le}, cumulative
        yield f"{name}_sum", labels, self.sum
        yield f"{name}_count", labels, self.count


class Throughput:
    """Generated tokens per second over the last THROUGHPUT_WINDOW_S seconds, from samples of an
    engine's running total."""

    def __init__(self):
        self.samples = collections.deque()

    def update(self, total, now=None):
        now = time.monotonic() if now is None else now
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= THROUGHPUT_WINDOW_S:
            self.samples.popleft()

    def rate(self):
        if len(self.samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


# (metric name, engine.stats() key, type, help) of the engine gauges and counters exported as they are.
ENGINE_STATS = (
    ("pyxf_requests_running", "running", "gauge", "Requests in the running batch"),
    ("pyxf_requests_waiting", "waiting", "gauge", "Requests queued for admission"),
    ("pyxf_kv_cache_blocks_used", "kv_blocks_used", "gauge", "KV cache blocks held by running sequences"),
    ("pyxf_kv_cache_blocks_total", "kv_blocks_total", "gauge", "KV cache blocks in the pool"),
    ("pyxf_kv_cache_blocks_cached", "kv_blocks_cached", "gauge",
     "KV cache blocks held only by the prefix cache (reusable, evicted when needed)"),
    ("pyxf_prefix_cache_queried_tokens_total", "prefix_cache_queried_tokens", "counter",
     "Prompt tokens looked up in the prefix cache"),
    ("pyxf_prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens", "counter",
     "Prompt tokens served from the prefix cache"),
    ("pyxf_prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens processed"),
    ("pyxf_generation_tokens_total", "generated_tokens_total", "counter", "Tokens generated"),
    ("pyxf_engine_requests_finished_total", "requests_finished_total", "counter", "Requests the engine finished"),
    ("pyxf_engine_steps_total", "steps_total", "counter", "Engine steps (forward passes)"),
    ("pyxf_draft_tokens_proposed_total", "draft_tokens_proposed_total", "counter",
     "Speculative tokens drafted (prompt lookup or draft model)"),
    ("pyxf_draft_tokens_accepted_total", "draft_tokens_accepted_total", "counter",
     "Speculative tokens the target model confirmed"),
    ("pyxf_forced_tokens_total", "forced_tokens_total", "counter",
     "Tokens a structured-output constraint fixed, taken without sampling (jump-forward)"),
)


class Metrics:
    """The server's own counters and histograms (updated on the event loop and worker threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.http_requests = collections.Counter()  # (endpoint, status) -> n
        self.finished = collections.Counter()  # (model, finish_reason) -> n
        self.latency = collections.defaultdict(Histogram)  # (model, endpoint) -> seconds per request
        self.ttft = collections.defaultdict(Histogram)  # model -> seconds to the first token
        self.throughput = collections.defaultdict(Throughput)  # model -> generated tokens/s

    def count_http(self, endpoint, status):
        with self._lock:
            self.http_requests[endpoint, status] += 1

    def observe_request(self, model, endpoint, seconds, finish_reasons=()):
        with self._lock:
            self.latency[model, endpoint].observe(seconds)
            for reason in finish_reasons:
                self.finished[model, reason] += 1

    def observe_ttft(self, model, seconds):
        with self._lock:
            self.ttft[model].observe(seconds)

    def sample_engines(self, engines):
        """Records each engine's generated-token total for the tokens/s gauge (called every second)."""
        for name, engine in engines:
            total = engine.stats()["generated_tokens_total"]
            with self._lock:
                self.throughput[name].update(total)

    def render(self, engines):
        """The exposition text for `engines` [(model name, Engine)] and the server's own metrics."""
        families = []  # (name, type, help, [(labels, value)])
        stats = [(name, engine.stats()) for name, engine in engines]
        for metric, key, kind, help_text in ENGINE_STATS:
            samples = [({"model": name}, s[key]) for name, s in stats if key in s]
            if samples:
                families.append((metric, kind, help_text, samples))
        families.append(("pyxf_kv_cache_usage_ratio", "gauge", "Fraction of the KV cache blocks in use",
                         [({"model": name}, _ratio(s["kv_blocks_used"], s["kv_blocks_total"])) for name, s in stats]))
        families.append(("pyxf_prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / looked up",
                         [({"model": name}, _ratio(s["prefix_cache_hit_tokens"], s["prefix_cache_queried_tokens"]))
                          for name, s in stats]))
        with self._lock:
            families.append(("pyxf_generation_tokens_per_second", "gauge",
                             f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s",
                             [({"model": name}, self.throughput[name].rate()) for name, _ in engines]))
            families.append(("pyxf_http_requests_total", "counter", "HTTP requests by endpoint and status",
                             [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self.http_requests.items())]))
            families.append(("pyxf_requests_finished_total", "counter", "Choices finished, by finish reason",
                             [({"model": m, "finish_reason": r}, n) for (m, r), n in sorted(self.finished.items())]))
            lines = _format(families)
            lines += _format_histogram("pyxf_request_duration_seconds", "End-to-end request latency",
                                       {(m, e): h for (m, e), h in self.latency.items()}, ("model", "endpoint"))
            lines += _format_histogram("pyxf_time_to_first_token_seconds", "Time to the first generated token",
                                       {(m,): h for m, h in self.ttft.items()}, ("model",))
        return "\n".join(lines) + "\n"


def _ratio(a, b):
    return a / b if b else 0.0


def _format(families):
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [_sample(name, labels, value) for labels, value in samples]
    return lines


def _format_histogram(name, help_text, histograms, label_names):
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for key, histogram in sorted(histograms.items()):
        for sample_name, labels, value in histogram.samples(name, dict(zip(label_names, key))):
            lines.append(_sample(sample_name, labels, value))
    return lines


def _sample(name, labels, value):
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "+Inf" if value > 0 else ("-Inf" if value < 0 else "NaN")
    return repr(value) if isinstance(value, float) else str(value)
