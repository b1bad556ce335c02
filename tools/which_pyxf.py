"""Which pyxf the tools import: this source checkout when its extension has been built in place
(`bash tools/dev_build.sh`), else the installed package (`pip install .`, the README's way).

Putting the checkout first unconditionally would shadow an installed pyxf with a source tree that
has no compiled extension, and the benchmark would report pyxf as not installed.
"""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def checkout_is_built() -> bool:
    return any((REPO / "pyxf").glob("_core*.so")) or any((REPO / "pyxf").glob("_core*.pyd"))


def use_checkout_if_built() -> None:
    """Puts the checkout first on sys.path when its extension is built, or when no other pyxf is
    installed (so that errors name the missing extension); otherwise leaves the installed one."""
    if str(REPO) in sys.path:
        return
    if checkout_is_built() or importlib.util.find_spec("pyxf") is None:
        sys.path.insert(0, str(REPO))
