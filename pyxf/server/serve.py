"""`pyxf serve`: load the models, build the app, run uvicorn until SIGTERM or Ctrl-C.

Shutdown is graceful: the listening socket closes at once, requests in flight finish (for at most
shutdown_timeout seconds, then they are cancelled), the engines close, and the process exits 0.
"""

import os
import signal
import sys

import uvicorn

from pyxf.kv_cache import check_kv_cache_dtype
from pyxf.server.app import DEFAULT_MAX_BODY_BYTES, create_app
from pyxf.server.registry import EMBED, ModelRegistry, default_model_specs, parse_model_spec


def serve(models=(), *, host="127.0.0.1", port=8000, api_key=None, max_batch=None, kv_cache_mb=None,
          prefill_chunk=None, max_queue=None, prefix_cache=True, threads=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES,
          shutdown_timeout=30.0, log_level="info", draft_model=None, prompt_lookup=False, num_draft_tokens=None,
          kv_cache_dtype=None, huge_pages=True):
    """Serves `models` (["NAME=DIR" or "DIR", ...]; none: the default chat and embedding models).
    Engine options left None take pyxf.Engine's defaults. Speculative decoding for every request:
    draft_model (a directory: its decoder drafts) or prompt_lookup (drafts copied from earlier in
    the sequence), num_draft_tokens a step. kv_cache_dtype (the decoders' KV caches) and huge_pages
    are pyxf.load's: huge_pages=False leaves the decoders' matrices in their files' shared mappings
    (several server processes on one machine then hold one copy in the page cache).
    Returns 0 after a graceful shutdown."""
    options = engine_options(max_batch=max_batch, kv_cache_mb=kv_cache_mb, prefill_chunk=prefill_chunk,
                             max_queue=max_queue, prefix_cache=prefix_cache, draft_model=draft_model,
                             prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens)
    check_kv_cache_dtype(kv_cache_dtype)
    api_key = resolve_api_key(api_key)
    sleep_idle_threads()
    registry = ModelRegistry.load(model_specs(models), engine_options=options, draft_model=draft_model,
                                  threads=threads, kv_cache_dtype=kv_cache_dtype, huge_pages=huge_pages)
    app = create_app(registry, api_key=api_key, max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout)
    announce_models(registry)
    announce_url(host, port, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    try:
        with _quiet_after_shutdown():
            server.run()
    finally:
        registry.close(timeout=0)  # a no-op after the app's shutdown; needed if uvicorn failed to start
    return 0 if server.started else 1


def model_specs(models):
    """["NAME=DIR" or "DIR", ...] -> [(name, directory)]; none: the default chat and embedding models."""
    return [parse_model_spec(m) for m in models] if models else default_model_specs()


def engine_options(*, max_batch=None, kv_cache_mb=None, prefill_chunk=None, max_queue=None, prefix_cache=True,
                   draft_model=None, prompt_lookup=False, num_draft_tokens=None):
    """pyxf.Engine keyword arguments; those left None keep the engine's defaults. The draft model
    itself is loaded by the registry (ModelRegistry.load's draft_model); here it only excludes
    prompt_lookup."""
    if draft_model is not None and prompt_lookup:
        raise ValueError("speculative decoding drafts with a draft model or by prompt lookup, not both")
    if num_draft_tokens is not None and draft_model is None and not prompt_lookup:
        raise ValueError("num_draft_tokens: only with a draft model or prompt lookup")
    options = dict(max_batch=max_batch, kv_cache_mb=kv_cache_mb, prefill_chunk=prefill_chunk, max_queue=max_queue,
                   speculative="prompt_lookup" if prompt_lookup else None, num_draft_tokens=num_draft_tokens)
    return {**{name: value for name, value in options.items() if value is not None}, "prefix_cache": prefix_cache}


def resolve_api_key(api_key):
    return api_key or os.environ.get("PYXF_API_KEY") or None


# How a server's idle OpenMP threads wait, unless the user set either variable: they spin for
# GOMP_SPINCOUNT rounds of libgomp's wait loop (~25 us on an Intel Xeon), then sleep
# (OMP_WAIT_POLICY=PASSIVE).
IDLE_THREADS_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}


def idle_threads_env(environ):
    """The variables to add to `environ` for a server process: none where the user chose a wait
    policy or a spin count, else IDLE_THREADS_ENV."""
    return {} if any(name in environ for name in IDLE_THREADS_ENV) else dict(IDLE_THREADS_ENV)


def sleep_idle_threads():
    """Idle OpenMP threads spin briefly, then sleep (idle_threads_env). A server's engine shares the
    cores with its own event loop and detokenizer threads, and often with other processes: workers
    that spin for long (libgomp's default, milliseconds) take the CPU those need, and a worker that
    is not scheduled stalls every parallel region; on 2 busy cores that made streaming 8-10x slower
    than sleeping at once. Sleeping at once costs a wake-up (tens of microseconds) at every one of a
    decode step's ~150 parallel regions: on an idle machine a stream decoded 2.3x slower than with a
    short spin, which covers the gaps between the regions of a step and still sleeps between
    requests (docs/DESIGN.md, "Threads"). Takes effect only before the core is loaded (as `pyxf
    serve` does); later it changes nothing."""
    os.environ.update(idle_threads_env(os.environ))


def announce_models(registry):
    for served in registry:
        use = "embeddings" if served.kind == EMBED else f"chat, completions, {served.model.kv_cache_dtype} KV cache"
        engine = served.engine
        drafting = ""
        if engine is not None and engine.speculative == "prompt_lookup":
            drafting = f", drafting {engine.num_draft_tokens} tokens by prompt lookup"
        elif engine is not None and engine.draft_model is not None:
            drafting = f", drafting {engine.num_draft_tokens} tokens with {engine.draft_model.path}"
        print(f"pyxf: serving {served.name} ({use}{drafting}) from {served.model.path}", file=sys.stderr)


def announce_url(host, port, api_key):
    key = " (API key required)" if api_key else ""
    print(f"pyxf: OpenAI-compatible API at http://{host}:{port}/v1{key}", file=sys.stderr, flush=True)


class _quiet_after_shutdown:
    """uvicorn handles SIGTERM/SIGINT itself while it runs, then raises the signal again against the
    handlers it found; these no-op handlers make that re-raise end the process normally (exit 0)
    instead of by the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, lambda *_: None) for sig in self.SIGNALS}

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
