"""The FastAPI application: routes, API-key check, body-size limit, request counting, and the
engines' lifetime (closed when the server shuts down)."""

import asyncio
import contextlib
import hmac

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from sse_starlette.sse import AppStatus

import pyxf
from pyxf.server import completions, embeddings, errors, schemas
from pyxf.server.metrics import CONTENT_TYPE, Metrics

DEFAULT_MAX_BODY_BYTES = 16 << 20
METRICS_SAMPLE_S = 1.0  # how often the tokens/s gauge samples the engines
PROTECTED_PREFIX = "/v1/"  # the API key guards the OpenAI routes; /health and /metrics stay open


def create_app(registry, *, api_key=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES, shutdown_timeout=30.0):
    """The app serving `registry` (a ModelRegistry, closed when the app shuts down)."""
    # Streams end when their requests do, also during a graceful shutdown: sse-starlette must not
    # cut them at the first signal (uvicorn bounds the drain with its graceful-shutdown timeout).
    AppStatus.disable_automatic_graceful_drain()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        sampler = asyncio.create_task(_sample_engines(app.state.metrics, registry))
        try:
            yield
        finally:
            sampler.cancel()
            registry.close(timeout=shutdown_timeout)

    app = FastAPI(title="pyxf", version=pyxf.__version__, lifespan=lifespan)
    app.state.registry = registry
    app.state.metrics = Metrics()
    errors.install_handlers(app)
    app.include_router(completions.router)
    app.include_router(embeddings.router)
    _add_info_routes(app)
    # Outermost last: counting sees every answer, including the 401s and 413s of the checks.
    app.add_middleware(_BodyLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(_ApiKey, api_key=api_key)
    app.add_middleware(_CountRequests, metrics=app.state.metrics, routes=_route_paths(app))
    return app


def _add_info_routes(app):
    @app.get("/v1/models")
    async def list_models(request: Request):
        return schemas.ModelList(
            data=[schemas.ModelCard(id=s.name, created=s.created) for s in request.app.state.registry]
        )

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        served = {s.name: s for s in request.app.state.registry}.get(name)
        if served is None:
            raise errors.model_not_found(name, [s.name for s in request.app.state.registry])
        return schemas.ModelCard(id=served.name, created=served.created)

    @app.get("/health")
    async def health(request: Request):
        registry = request.app.state.registry
        return {
            "status": "ok",
            "models": [{"id": s.name, "kind": s.kind} for s in registry],
            "engines": {name: engine.stats() for name, engine in registry.engines()},
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        text = request.app.state.metrics.render(request.app.state.registry.engines())
        return PlainTextResponse(text, media_type=CONTENT_TYPE)


async def _sample_engines(metrics, registry):
    while True:
        metrics.sample_engines(registry.engines())
        await asyncio.sleep(METRICS_SAMPLE_S)


def _route_paths(app):
    return {route.path for route in app.routes if hasattr(route, "path")} | {
        route.path for router in (completions.router, embeddings.router) for route in router.routes
    }


# ---------------------------------------------------------------------------------------------
# ASGI middleware (plain ASGI: streamed responses pass through untouched)


async def _send_error(send, error):
    response = error.response()
    await response({"type": "http"}, None, send)


class _ApiKey:
    """401 on /v1/ routes unless the request carries `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await _send_error(send, errors.unauthorized())
        await self.app(scope, receive, send)


class _BodyLimit:
    """413 for a body over max_body_bytes: at once from Content-Length, or while reading a chunked
    body (which is then replayed to the app)."""

    def __init__(self, app, max_body_bytes):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await _send_error(send, errors.too_large(self.limit))
            return await self.app(scope, receive, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await _send_error(send, errors.too_large(self.limit))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _CountRequests:
    """pyxf_http_requests_total{endpoint, status}; unknown paths are counted as "other"."""

    def __init__(self, app, metrics, routes):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            status = status or 500  # answered by Starlette's outermost error handler
            raise
        finally:
            path = scope["path"]
            endpoint = path if path in self.routes else "other"
            # No status at all: the client left before an answer started (nginx's 499).
            self.metrics.count_http(endpoint, status if status is not None else 499)
