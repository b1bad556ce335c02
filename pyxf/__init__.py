"""pyxf: fast CPU inference for transformer models.

    import pyxf
    model = pyxf.load("path/to/converted-model")   # or a GGUF file, a hub id "org/name"; pyxf.load(): the default model
    print(pyxf.generate(model, "The capital of France is", max_new_tokens=16))
"""

__version__ = "0.1.0"

from pyxf.engine import Delta, Engine, EngineFull, Request, Result, TokenLogprob, Usage
from pyxf.generation import generate
from pyxf.loading import load
from pyxf.model import Model, Session
from pyxf.seq2seq import Seq2SeqModel, translate
from pyxf.tokenizer import Tokenizer
from pyxf import hub  # noqa: F401 (pyxf.hub.default_gguf_path() and the other cached models, after `import pyxf`)
from pyxf import threads as _threads

__all__ = [
    "Delta", "Engine", "EngineFull", "Request", "Result", "TokenLogprob", "Usage",
    "Model", "Seq2SeqModel", "Session", "Tokenizer", "generate", "get_num_threads", "info", "load", "set_num_threads", "translate", "__version__",
]


def set_num_threads(n):
    """Sets the number of threads the core uses (process-wide)."""
    _threads.core().set_num_threads(_threads.check_num_threads(n))


def get_num_threads():
    return _threads.core().get_num_threads()


def info():
    """The core's build and CPU information (version, isa, isas, num_threads, compiler, build_flags)
    plus this package's version."""
    return {**_threads.core().info(), "pyxf_version": __version__}
