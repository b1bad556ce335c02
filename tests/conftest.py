"""Shared pytest setup.

Which `pyxf` the tests import: the source tree when its extension has been built in place
(`bash tools/dev_build.sh` leaves pyxf/_core*.so there), or when no pyxf is installed at all;
otherwise the installed package (CI installs it with `pip install .[test]` and the source tree
then has no compiled extension). PYXF_IMPORT_ROOT, when set, comes first (tools/sanitize.sh points
it at a package directory holding a sanitized extension).
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The parity tests alternate between torch and pyxf in one process: two OpenMP runtimes whose idle
# threads spin-wait for work fight over the cores (on a 2-core machine that made pyxf 4-5x slower).
# Idle threads that sleep instead cost nothing here. Set before torch or pyxf._core is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _use_source_tree():
    import_root = os.environ.get("PYXF_IMPORT_ROOT")  # tools/sanitize.sh: a sanitized build's package
    if import_root:
        sys.path.insert(0, import_root)
        return
    built_in_place = any((REPO_ROOT / "pyxf").glob("_core*"))
    if built_in_place or importlib.util.find_spec("pyxf") is None:
        root = str(REPO_ROOT)
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)


_use_source_tree()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (multi-node Ray clusters; CI runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    """In CI (CI set), a missing extension is a failure: its tests would otherwise all skip."""
    if os.environ.get("CI") and importlib.util.find_spec("pyxf._core") is None:
        pytest.exit("CI: pyxf._core cannot be imported (is pyxf installed?); refusing to skip its tests", returncode=1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(spec) -> (hf_dir, pyxf_dir): a small random Hugging Face model built from a
    tests/helpers.py spec, saved with save_pretrained and converted with pyxf.convert, once per
    session and spec."""
    from helpers import TinyModelCache

    return TinyModelCache(tmp_path_factory.mktemp("tiny-models"))
