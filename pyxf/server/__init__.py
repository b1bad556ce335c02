"""pyxf's OpenAI-compatible HTTP server (`pyxf serve`; needs the `serve` extra: pip install "pyxf[serve]").

    from pyxf.server import create_app, serve
"""

from pyxf.server.app import create_app
from pyxf.server.serve import serve

__all__ = ["create_app", "serve"]
