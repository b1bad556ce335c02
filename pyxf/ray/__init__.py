"""pyxf on Ray (needs the ray extra: pip install "pyxf[ray]").

Ray Serve: the OpenAI-compatible server as replicas behind Serve's router (`pyxf serve --ray`):

    from ray import serve
    from pyxf.ray import serve_app
    serve.run(serve_app(["chat=models/smollm2"], replicas=2))

Ray Data: callable classes for Dataset.map_batches that load the model once per actor:

    pool = ray.data.ActorPoolStrategy(size=2)   # 2 actors
    ds.map_batches(Embedder, fn_constructor_kwargs={"model": "models/all-minilm-l6-v2"}, compute=pool)
    ds.map_batches(Generator, fn_constructor_kwargs={"model": "models/smollm2", "max_new_tokens": 64}, compute=pool)
    ds.map_batches(Translator, fn_constructor_kwargs={"model": "models/opus-mt-en-de"}, compute=pool)
"""

try:
    import ray  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"pyxf.ray needs Ray ({e}); install it with: pip install 'pyxf[ray]'") from None

from pyxf.ray.data import Embedder, Generator, Translator
from pyxf.memory import process_memory
from pyxf.ray.resources import assigned_cpus
from pyxf.ray.serving import build_app, serve_app, serve_on_ray

__all__ = ["Embedder", "Generator", "Translator", "assigned_cpus", "build_app", "process_memory", "serve_app",
           "serve_on_ray"]
