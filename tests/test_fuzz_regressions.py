"""Every fuzz seed and every input a fuzzing run ever found a bug with (tests/fuzz/regressions/
TARGET/, one file each, named after what it found) through its target, without atheris: each
must now be accepted or refused with the exceptions the target allows (tests/fuzz/targets.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

NEEDS_CORE = {"model_dir", "convert_config"}
CASES = sorted(
    (target, path)
    for kind in ("seeds", "regressions")
    for target in targets.TARGETS
    for path in (FUZZ / kind / target).glob("*")
    if path.is_file()
)


@pytest.mark.parametrize("target, path", CASES, ids=[f"{p.parent.parent.name}/{t}/{p.name}" for t, p in CASES])
def test_input(target, path):
    if target in NEEDS_CORE and importlib.util.find_spec("pyxf._core") is None:
        pytest.skip("pyxf._core is not built")
    targets.TARGETS[target](path.read_bytes())


def test_every_target_has_seeds():
    assert {t for t, p in CASES if p.parent.parent.name == "seeds"} == set(targets.TARGETS)
