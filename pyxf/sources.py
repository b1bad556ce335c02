"""What `pyxf.load` and `pyxf convert` accept as a model: a local path, a GGUF file or a Hugging Face
hub id ("org/name"), resolved in that order (an existing path wins over a hub id of the same spelling).

Hub ids are resolved with `huggingface_hub` (its cache, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, tokens):
a branch, tag or commit becomes a snapshot directory of the checkpoint's files, named by its commit.
`pyxf.load` converts a checkpoint once and keeps the converted directory in pyxf's cache
(pyxf.hub.cache_dir()/converted/), keyed by what it was made from (docs/DESIGN.md, "Loading by name"):
    hub/<org>--<name>/<commit>-<digest>/   a hub checkpoint: repo id, resolved commit, conversion options
    gguf/<file stem>-<digest>/             a GGUF file: its size, mtime and a hash of its first MiB
The digest also covers pyxf's version and converted-format version, so a new pyxf converts anew.
"""

import hashlib
import json
import os
import re
from pathlib import Path

# "org/name" as the hub spells repo ids: letters, digits, '-', '_', '.'; no '--' or '..'; 96 at most.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_ID_MAX = 96

# The files of a checkpoint that the converter reads: configs (model, generation, tokenizer,
# sentence-transformers modules), weights, tokenizers (tokenizer.json, sentencepiece *.model and
# Marian's *.spm, vocab.txt / merges.txt). Torch weights are fetched only for repos without safetensors.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.spm", "*.txt"]
TORCH_WEIGHTS = ["pytorch_model*.bin", "model.pt"]

# The bytes of a GGUF file hashed into its cache key: its header, metadata and tensor index (or
# the first part of them), which name every tensor, shape, type and offset.
GGUF_HEADER_BYTES = 1 << 20


def is_hub_id(name):
    """Whether `name` (a str) is spelled as a Hugging Face model repo id, "org/name"."""
    return (isinstance(name, str) and len(name) <= _HUB_ID_MAX and _HUB_ID.fullmatch(name) is not None
            and "--" not in name and ".." not in name)


def model_directory(name, revision=None):
    """The converted model directory that pyxf.load reads for `name`: a directory as it is; a GGUF
    file or a hub id converted on first use into pyxf's cache. FileNotFoundError when `name` is
    neither an existing path nor a hub id that can be found; ValueError for a path or repo that holds
    no model pyxf reads."""
    path = _existing_path(name, revision)
    if path is not None:
        if path.is_dir():
            return path
        if not _is_gguf(path):
            raise ValueError(f"{path} is a file but not a GGUF file: pyxf.load takes a converted model directory, "
                             "a GGUF file or a Hugging Face hub id (org/name)")
        return _converted_gguf(path)
    snapshot, commit = hub_snapshot(name, revision)
    if _is_pyxf_model(snapshot):  # a repo of converted pyxf models: nothing to convert
        return snapshot
    return _converted_hub_checkpoint(name, commit)


def checkpoint_path(name, revision=None):
    """What pyxf.convert reads for `name`: (a local path, None) for an existing path, else (the hub
    snapshot directory of hub id `name` at `revision`, {"repo_id", "commit"})."""
    path = _existing_path(name, revision)
    if path is not None:
        return path, None
    snapshot, commit = hub_snapshot(name, revision)
    return snapshot, {"repo_id": name, "commit": commit}


def _existing_path(name, revision):
    """`name` as a local path if it exists, else None for a hub id; FileNotFoundError for neither."""
    if isinstance(name, (str, os.PathLike)):
        path = Path(name).expanduser()
        if path.exists():
            if revision is not None:
                raise ValueError(f"revision= is for Hugging Face hub ids; {str(name)!r} is a local path")
            return path
    if is_hub_id(name):
        return None
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"a model must be a path or a hub id (str), got {type(name).__name__}")
    raise FileNotFoundError(f"{str(name)!r} does not exist, and is not a Hugging Face hub id (org/name) either")


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def hub_snapshot(repo_id, revision=None):
    """(snapshot directory, commit) of hub repo `repo_id` at `revision` (branch, tag or commit;
    default "main"), downloaded by huggingface_hub if it is not in its cache and the hub may be
    asked. Checked to hold a checkpoint pyxf converts (or a converted pyxf model)."""
    snapshot = _download(repo_id, revision, CHECKPOINT_FILES)
    if not _is_pyxf_model(snapshot) and not any(snapshot.glob("*.safetensors")):
        snapshot = _download(repo_id, revision, CHECKPOINT_FILES + TORCH_WEIGHTS)
    _check_checkpoint(snapshot, f"{repo_id}@{snapshot.name}")
    return snapshot, snapshot.name


def _download(repo_id, revision, patterns):
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ImportError(f"loading {repo_id!r} by hub id needs huggingface_hub: pip install huggingface_hub") from None
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision is not None else "")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face hub") from None
    except errors.GatedRepoError:
        raise PermissionError(f"{repo_id!r} is a gated repo: accept its terms on the hub and log in "
                              "(`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id!r} is neither an existing path nor a model repo on the Hugging Face hub "
                                "(a private one needs `hf auth login` or HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        reason = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise FileNotFoundError(
            f"{where} is neither an existing path nor in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}), and {reason}"
        ) from None
    except (errors.HfHubHTTPError, getattr(errors, "IncompleteSnapshotError", errors.HfHubHTTPError)) as e:
        raise OSError(f"{where}: {e}") from None


def _check_checkpoint(snapshot, what):
    """ValueError unless `snapshot` holds config.json and weights pyxf converts (or a pyxf model)."""
    if _is_pyxf_model(snapshot):
        return
    weights = [p for pattern in ("*.safetensors", *TORCH_WEIGHTS) for p in snapshot.glob(pattern)]
    if (snapshot / "config.json").is_file() and weights:
        return
    held = sorted(p.name for p in snapshot.iterdir())
    hint = (" (GGUF files: pass the path of one, e.g. from huggingface_hub.hf_hub_download)"
            if any(name.endswith(".gguf") for name in held) else "")
    raise ValueError(
        f"{what} has no checkpoint pyxf converts (config.json with *.safetensors or pytorch_model.bin); "
        f"it holds: {', '.join(held[:12]) or 'nothing'}{hint}"
    )


def _is_pyxf_model(directory):
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("format") == "pyxf"
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# pyxf's cache of converted models


# Raised whenever a conversion with the same options writes something else (2: a BF16 or F16 GGUF
# file stays 16-bit by default), so that the cache never serves a directory made the old way.
CONVERSION_REVISION = 2


def _conversion_key(source, options):
    """The identity of a conversion: its source, its options and the pyxf that made it."""
    from pyxf import __version__
    from pyxf.config import FORMAT_VERSION

    return {"source": source, "options": options, "pyxf_version": __version__, "format_version": FORMAT_VERSION,
            "conversion_revision": CONVERSION_REVISION}


def _digest(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cached(subdir, prefix, src, key, options):
    """The converted directory for `key`, converting `src` into it on first use."""
    from pyxf.hub import cache_dir, convert_into_cache

    model_dir = cache_dir() / "converted" / subdir / f"{prefix}-{_digest(key)}"
    if not (model_dir / "config.json").is_file():
        convert_into_cache(src, model_dir, key=key, **options)
    return model_dir


def _converted_hub_checkpoint(repo_id, commit, **options):
    key = _conversion_key({"repo_id": repo_id, "commit": commit}, options)
    return _cached(f"hub/{repo_id.replace('/', '--')}", commit, repo_id, key, dict(options, revision=commit))


def gguf_identity(path):
    """What keys a GGUF file's conversion: its size, modification time (ns) and the SHA-256 of its first
    GGUF_HEADER_BYTES. A file rewritten in place changes its mtime; one renamed or moved keeps its key."""
    stat = path.stat()
    with open(path, "rb") as f:
        header = hashlib.sha256(f.read(GGUF_HEADER_BYTES)).hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header_sha256": header}


def _converted_gguf(path, **options):
    key = _conversion_key({"gguf": gguf_identity(path)}, options)
    return _cached("gguf", path.stem, path, key, options)


def _is_gguf(path):
    from pyxf.convert import is_gguf

    return is_gguf(path)
