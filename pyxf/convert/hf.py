"""Reading Hugging Face checkpoints: a model directory, or a bare state_dict file plus a config.

Weights: `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` (+ index), or
`pytorch_model.bin` / `*.pt` / `*.pth`, the latter loaded only with
`torch.load(..., weights_only=True)` (never unpickling arbitrary objects).

The family (pyxf/convert/families/) gives the tensor table, the config mapping and the hooks:
settling the config from the tensors present, reading files beside the checkpoint, and writing the
tokenizer (pyxf/convert/tokenizer_files.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..tensorfile import bf16_to_float32, read_safetensors
from .families import family_for_hf_config, normalized_config
from .schema import Checkpoint, SourceTensor
from .tokenizer_files import read_json

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------
# weights


def _to_float32(array: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "BF16":
        return bf16_to_float32(array)
    return np.asarray(array, dtype=np.float32)


def _safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
    file = read_safetensors(path)
    return {
        name: SourceTensor(tuple(array.shape), lambda a=array, d=file.dtypes[name]: _to_float32(a, d),
                           (lambda a=array: np.asarray(a)) if file.dtypes[name] == "BF16" else None)
        for name, array in file.items()
    }


def _torch_state_dict(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); safetensors files do not") from None
    try:  # mmap keeps a big checkpoint out of memory; old (non-zip) files cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap_state_dict(state, path, torch)


def _unwrap_state_dict(state, path: Path, torch) -> dict:
    """Training checkpoints often nest the weights under "state_dict", "model" or "module"."""
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(state.get(key), dict):
                return _unwrap_state_dict(state[key], path, torch)
    raise ValueError(f"{path}: not a state_dict (a dict of tensor names to tensors)")


def _torch_to_float32(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return bf16_to_float32(_torch_bf16_bits(tensor))
    return tensor.to(torch.float32).numpy()


def _torch_bf16_bits(tensor) -> np.ndarray:
    import torch

    return tensor.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _torch_tensors(path: Path) -> dict[str, SourceTensor]:
    import torch

    state = _torch_state_dict(path)
    return {name: SourceTensor(tuple(t.shape), lambda t=t: _torch_to_float32(t),
                               (lambda t=t: _torch_bf16_bits(t)) if t.dtype == torch.bfloat16 else None)
            for name, t in state.items()}


def _load_weight_files(files: list[Path]) -> dict[str, SourceTensor]:
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        part = _safetensors_tensors(path) if path.suffix == ".safetensors" else _torch_tensors(path)
        duplicated = tensors.keys() & part.keys()
        if duplicated:
            raise ValueError(f"{path}: tensors also found in another shard: {sorted(duplicated)[:5]}")
        tensors.update(part)
    return tensors


def _shards_from_index(index_path: Path) -> list[Path]:
    weight_map = json.loads(index_path.read_text())["weight_map"]
    return [index_path.parent / name for name in dict.fromkeys(weight_map.values())]


def find_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF model directory, safetensors preferred."""
    for single, index, shard_glob in (
        ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
    ):
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            return _shards_from_index(model_dir / index)
        shards = sorted(model_dir.glob(shard_glob))
        if shards:
            return shards
    for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin"):
        found = sorted(model_dir.glob(pattern))
        if len(found) == 1:
            return found
    raise FileNotFoundError(
        f"{model_dir}: no weights found (looked for model.safetensors, sharded model-*-of-*.safetensors "
        f"with or without an index, pytorch_model.bin, or a single *.safetensors/*.pt/*.pth/*.bin)"
    )


def _strip_prefixes(tensors: dict[str, SourceTensor], prefixes: tuple[str, ...]) -> dict[str, SourceTensor]:
    """'model.layers.0...' -> 'layers.0...' so the tables fit both *ForCausalLM and bare models."""
    stripped = {}
    for name, tensor in tensors.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        stripped[name] = tensor
    return stripped


# ---------------------------------------------------------------------------------------------
# entry point


def open_hf(src, config=None) -> Checkpoint:
    """Open an HF model directory, or a weights file (state_dict) with `config` (a config.json
    path or dict; default: config.json beside the file)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    files_dir = src if src.is_dir() else src.parent
    if isinstance(config, dict):
        hf_config, config_source = config, "config"
    else:
        config_path = Path(config) if config is not None else files_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: config.json not found (needed to convert {src})")
        hf_config, config_source = read_json(config_path), config_path

    try:  # before touching the weights: unknown architectures fail fast
        family = family_for_hf_config(hf_config)
        normalized = normalized_config(hf_config)
    except ValueError as e:
        raise ValueError(f"{config_source}: {e}") from None
    weight_files = find_weight_files(src) if src.is_dir() else [src]
    tensors = _strip_prefixes(_load_weight_files(weight_files), family.hf.strip_prefixes)
    try:
        if family.finalize is not None:
            normalized = family.finalize(normalized, set(tensors))
        if family.read_files is not None:
            normalized.update(family.read_files(files_dir, normalized))
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    kind = "safetensors" if all(f.suffix == ".safetensors" for f in weight_files) else "torch"

    def write_tokenizer(out_dir):
        return family.write_tokenizer(files_dir, Path(out_dir), hf_config, normalized)

    return Checkpoint(
        config=normalized,
        table=family.hf_tables(normalized, set(tensors)) if family.hf_tables is not None else family.hf,
        tensors=tensors,
        write_tokenizer=write_tokenizer,
        source={"format": f"hf-{kind}", "path": src.name},
    )
