"""The models a server serves, by id: decoders (chat and completions, each on its own
continuous-batching pyxf.Engine) and encoders (embeddings)."""

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyxf
from pyxf.engine import Engine
from pyxf.config import read_config
from pyxf.server import errors

GENERATE = "generate"  # /v1/chat/completions and /v1/completions
EMBED = "embed"  # /v1/embeddings


@dataclass
class ServedModel:
    name: str
    kind: str  # GENERATE or EMBED
    model: object  # pyxf.Model
    engine: object = None  # pyxf.Engine, for GENERATE
    created: int = field(default_factory=lambda: int(time.time()))
    # Encoders run one batch at a time (the core's threads serve one call at once); callers wait here.
    lock: threading.Lock = field(default_factory=threading.Lock)


def parse_model_spec(spec):
    """'NAME=DIR' -> (NAME, DIR); a bare 'DIR' is named after its last path component."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name
    if not name or not path:
        raise ValueError(f"model spec {spec!r}: expected NAME=DIR")
    return name, path


def default_model_specs():
    """With no model given: the default chat model and all-MiniLM-L6-v2 for embeddings."""
    from pyxf import hub

    return [(hub.DEFAULT_MODEL_NAME, hub.default_model_path()), (hub.MINILM_MODEL_NAME, hub.minilm_model_path())]


class ModelRegistry:
    def __init__(self):
        self._models = {}

    @classmethod
    def load(cls, specs, *, engine_options=None, draft_model=None, **load_options):
        """Loads each (name, directory) with pyxf.load(directory, **load_options) (threads,
        kv_cache_dtype, huge_pages; an encoder keeps no KV cache, so kv_cache_dtype is for the
        decoders); decoders get an Engine(model, **engine_options), drafting with the decoder in the
        directory draft_model when it is given."""
        registry = cls()
        engine_options = dict(engine_options or {})
        if draft_model is not None:
            engine_options["draft_model"] = pyxf.load(draft_model, **load_options)
        try:
            for name, path in specs:
                registry.add(name, path, engine_options, **load_options)
        except BaseException:
            registry.close(timeout=0)
            raise
        return registry

    def add(self, name, path, engine_options, **load_options):
        if name in self._models:
            raise ValueError(f"two models are named {name!r}; give each its own NAME=DIR")
        architecture = read_config(path).get("architecture", "decoder")
        if architecture == "encoder-decoder":
            raise ValueError(f"{path}: encoder-decoder models cannot be served (only decoders and encoders)")
        if architecture == "encoder":  # no KV cache: the server-wide cache type is for the decoders
            served = ServedModel(name, EMBED, pyxf.load(path, **{**load_options, "kv_cache_dtype": None}))
        else:
            model = pyxf.load(path, **load_options)
            served = ServedModel(name, GENERATE, model, engine=Engine(model, **engine_options))
        self._models[name] = served
        return served

    def get(self, name, kind):
        """The served model `name` for an endpoint of `kind`; 404 when unknown, 400 when it is the
        wrong kind of model for the endpoint."""
        served = self._models.get(name)
        if served is None:
            raise errors.model_not_found(name, self._models)
        if served.kind != kind:
            use = "/v1/embeddings" if served.kind == EMBED else "/v1/chat/completions or /v1/completions"
            raise errors.invalid(f"The model {name!r} cannot be used here; use it with {use}", param="model",
                                 code="wrong_model_kind")
        return served

    def __iter__(self):
        return iter(self._models.values())

    def engines(self):
        return [(served.name, served.engine) for served in self if served.engine is not None]

    def close(self, timeout=None):
        """Closes every engine: running requests finish (cancelled after `timeout` seconds)."""
        for _, engine in self.engines():
            engine.close(timeout=timeout)
