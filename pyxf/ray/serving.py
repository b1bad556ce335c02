"""The OpenAI-compatible server as a Ray Serve deployment: `pyxf serve --ray` and serve_app().

Each replica is one `pyxf serve` app (pyxf.server.create_app: the same routes, errors, streaming,
API key and metrics) over its own ModelRegistry, with pyxf's threads set to the CPUs the replica
reserves. Serve's HTTP proxy routes each request to a replica (the one with the fewest ongoing
requests of two picked at random), restarts replicas that die, and with autoscaling adds or
removes replicas to keep the ongoing requests per replica near a target.
"""

import os
import signal
import sys
import time

import ray
from ray import serve

from pyxf.kv_cache import check_kv_cache_dtype
from pyxf.weights import check_huge_pages
from pyxf.server.app import DEFAULT_MAX_BODY_BYTES, create_app
from pyxf.server.registry import ModelRegistry
from pyxf.server.serve import (announce_url, engine_options, model_specs, resolve_api_key,
                               sleep_idle_threads)

APP_NAME = "pyxf"
DEFAULT_THREADS = 1  # Ray's default CPUs per actor
DEFAULT_MAX_BATCH = 64  # pyxf.Engine's
# Autoscaling keeps about this many ongoing requests per replica: a trade of throughput for time to
# first token. On 2 busy cores (BENCHMARKS.md, serving) pyxf serve gave 58 tokens/s at 4 streams, 133
# at 16 and 258 at 64, with TTFT p99 0.2 s, 2.2 s and 3.9 s. Serve's own default (2) would add a
# replica for every second stream and never batch.
DEFAULT_TARGET_ONGOING_REQUESTS = 16


@serve.ingress()
class Replica:
    """One replica: the models (loaded from `models` on the replica's node) and their engines."""

    def __init__(self, models, engine, app_options, draft_model, load_options):
        sleep_idle_threads()  # before pyxf's core loads (see pyxf.server.serve.sleep_idle_threads)
        self.registry = ModelRegistry.load(model_specs(models), engine_options=engine, draft_model=draft_model,
                                           **load_options)
        self.app_options = app_options

    def __serve_build_asgi_app__(self):
        return create_app(self.registry, **self.app_options)


def serve_app(models=(), *, replicas=1, autoscaling=None, threads=DEFAULT_THREADS, api_key=None, max_batch=None,
              kv_cache_mb=None, prefill_chunk=None, max_queue=None, prefix_cache=True,
              max_body_bytes=DEFAULT_MAX_BODY_BYTES, shutdown_timeout=30.0, max_ongoing_requests=None,
              ray_actor_options=None, draft_model=None, prompt_lookup=False, num_draft_tokens=None,
              kv_cache_dtype=None, huge_pages=True):
    """The Serve application of `models` (["NAME=DIR" or "DIR", ...], read on each replica's node;
    none: the default chat and embedding models), for serve.run() or a `serve run` / `serve deploy`
    import path.

    replicas: a fixed number of replicas; or autoscaling=True (between 1 and `replicas`) or a dict
    of Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests (default 16),
    upscale_delay_s, ...). threads: pyxf threads per replica, which also reserve as many CPUs.
    max_ongoing_requests: requests Serve sends a replica at once (default: the engine's max_batch;
    more wait in Serve's queue). draft_model: a directory read on each replica's node, as the
    models are. huge_pages=False: replicas on one node share the decoders' weights in the page cache
    instead of each holding its own copy (pyxf.load's huge_pages). The other options are `pyxf
    serve`'s."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    check_kv_cache_dtype(kv_cache_dtype)
    check_huge_pages(huge_pages)
    engine = engine_options(max_batch=max_batch, kv_cache_mb=kv_cache_mb, prefill_chunk=prefill_chunk,
                            max_queue=max_queue, prefix_cache=prefix_cache, draft_model=draft_model,
                            prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens)
    app_options = dict(api_key=resolve_api_key(api_key), max_body_bytes=max_body_bytes,
                       shutdown_timeout=shutdown_timeout)
    deployment = serve.deployment(Replica).options(
        name=APP_NAME,
        **_scaling(replicas, autoscaling),
        max_ongoing_requests=max_ongoing_requests or max_batch or DEFAULT_MAX_BATCH,
        ray_actor_options={"num_cpus": threads, **(ray_actor_options or {})},
        # Requests in flight get as long to finish when a replica is stopped as `pyxf serve` gives them.
        graceful_shutdown_timeout_s=shutdown_timeout,
    )
    load_options = dict(threads=threads, kv_cache_dtype=kv_cache_dtype, huge_pages=huge_pages)
    return deployment.bind(list(models), engine, app_options, draft_model, load_options)


def _scaling(replicas, autoscaling):
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    if not autoscaling:
        return dict(num_replicas=replicas)
    config = dict(min_replicas=1, max_replicas=replicas, target_ongoing_requests=DEFAULT_TARGET_ONGOING_REQUESTS)
    if isinstance(autoscaling, dict):
        config.update(autoscaling)
    if config["min_replicas"] > config["max_replicas"]:
        raise ValueError(f"min_replicas ({config['min_replicas']}) is above max_replicas ({config['max_replicas']})")
    return dict(autoscaling_config=config)


def build_app(args):
    """`serve run pyxf.ray:build_app models=NAME=DIR,... replicas=2` and `serve deploy` configs
    (import_path: pyxf.ray:build_app, args: {...}): serve_app() of these arguments; from the command
    line models is a comma-separated list, and numbers and true / false arrive as text."""
    args = dict(args)
    models = args.pop("models", ())
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    for name in ("replicas", "threads", "max_batch", "prefill_chunk", "max_queue", "max_ongoing_requests",
                 "num_draft_tokens"):
        if isinstance(args.get(name), str):
            args[name] = int(args[name])
    if isinstance(args.get("kv_cache_mb"), str):
        args["kv_cache_mb"] = float(args["kv_cache_mb"])
    for name in ("prefix_cache", "prompt_lookup", "huge_pages"):
        if isinstance(args.get(name), str):
            args[name] = _flag(name, args[name])
    return serve_app(models, **args)


def serve_on_ray(models=(), *, address=None, host="127.0.0.1", port=8000, **app_options):
    """`pyxf serve --ray`: deploys serve_app(models, **app_options) with Serve's HTTP proxy on
    host:port and waits for SIGTERM or Ctrl-C (also while the replicas start), then deletes the app.
    address: a Ray cluster to join (default: $RAY_ADDRESS, else a Ray started here for this server,
    stopped at the end). Returns 0."""
    app = serve_app(models, **app_options)  # bad arguments fail here, before Ray starts
    own_ray = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    previous = _raise_stop_on_signals()  # after ray.init, whose own handlers would end the process at once
    try:
        serve.start(http_options={"host": host, "port": port})
        cpus = ray.cluster_resources().get("CPU", 0)
        print(f"pyxf: starting the replicas on Ray ({cpus:g} CPUs in the cluster)", file=sys.stderr, flush=True)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        announce_url(host, port, resolve_api_key(app_options.get("api_key")))
        while True:
            time.sleep(3600)
    except _Stop:
        print("pyxf: stopping the replicas", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_serving(own_ray)
    return 0


def _stop_serving(own_ray):
    """Deletes the app (its replicas finish their requests first); a Ray started here stops too."""
    if own_ray:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop_on_signals():
    """SIGTERM and SIGINT raise _Stop in the main thread, whatever it waits for (also while the
    replicas start); returns the handlers they replace."""
    def stop(*_):
        raise _Stop()

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def _flag(name, text):
    """A boolean argument given as text on the command line: true / false (or 1 / 0, yes / no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"{name} must be true or false, got {text!r}")
    return value
