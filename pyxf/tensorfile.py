"""Reading and writing safetensors files without the `safetensors` package.

Layout: an 8-byte little-endian header length N, N bytes of JSON, then the data buffer. The JSON
maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
start of the data buffer) and may hold "__metadata__": {str: str}.

bfloat16: numpy has no bfloat16, so bf16 tensors are uint16 arrays holding the raw bits. Reading
returns them as uint16 and records "BF16" in `SafetensorsFile.dtypes`; writing takes a `dtypes`
override ({"name": "BF16"}) for uint16 arrays (an `ml_dtypes.bfloat16` array also works as is).
`float32_to_bf16` / `bf16_to_float32` convert.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "DTYPES",
    "FileChangedError",
    "FormatError",
    "SafetensorsFile",
    "SafetensorsWriter",
    "bf16_to_float32",
    "float32_to_bf16",
    "read_safetensors",
    "write_safetensors",
]

# safetensors dtype name -> numpy dtype of the stored bits (little-endian).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_NUMPY_TO_NAME = {
    np.dtype("f8"): "F64",
    np.dtype("f4"): "F32",
    np.dtype("f2"): "F16",
    np.dtype("i8"): "I64",
    np.dtype("i4"): "I32",
    np.dtype("i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("u2"): "U16",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}

# Bigger than any sane header; guards against reading gigabytes of garbage as JSON.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Data starts on this boundary so every tensor is aligned to its element size (see the writer).
_DATA_ALIGNMENT = 64


class FormatError(ValueError):
    """A safetensors file is malformed; the message names the file and, where known, the tensor."""


class FileChangedError(OSError):
    """A memory-mapped file was truncated after it was read: its arrays must not be touched."""


class SafetensorsFile(dict):
    """name -> read-only array (memory-mapped), plus `dtypes` (name -> "F32", "BF16", ...),
    `metadata` (the "__metadata__" dict) and `path`."""

    def __init__(self, path: Path, arrays: dict, dtypes: dict, metadata: dict, mapping=None, size: int = 0):
        super().__init__(arrays)
        self.path = path
        self.dtypes = dtypes
        self.metadata = metadata
        self._mapping = mapping  # the mmap the arrays view (None when the file holds no data)
        self._size = size

    def check_intact(self) -> None:
        """FileChangedError if the file was truncated since it was mapped. Its arrays would then
        point at pages the kernel can no longer back: touching one kills the process with SIGBUS,
        which no library can catch safely, so callers check before work (one fstat). A file
        replaced by renaming a new one over it is safe: the mapping keeps the old one."""
        if self._mapping is None:
            return
        size = self._mapping.size()  # fstat of the mapped file itself, not of the path
        if size < self._size:
            raise FileChangedError(
                f"{self.path} was truncated to {size} bytes after it was loaded ({self._size}); its tensors are "
                "gone: load the model again (replace model files by renaming a new file over them, never "
                "by writing into them)"
            )


# ---------------------------------------------------------------------------------------------
# bfloat16 helpers


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    is_nan = np.isnan(x)
    if is_nan.any():
        rounded[is_nan] = 0x7FC0
    return rounded


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# reading


def _fail(path, message: str, tensor: str | None = None) -> FormatError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return FormatError(where + message)


def _read_header(path: Path, file_size: int) -> tuple[dict, int]:
    """The parsed JSON header and the offset where the data buffer starts."""
    if file_size < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > _MAX_HEADER_BYTES:
            raise _fail(path, f"header length {header_len} is implausibly large")
        if 8 + header_len > file_size:
            raise _fail(path, f"header length {header_len} exceeds the file size {file_size} (truncated?)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header, 8 + header_len


def _check_metadata(path: Path, header: dict) -> dict:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    return metadata


def _check_entry(path: Path, name: str, entry, data_size: int) -> tuple[str, tuple, int, int]:
    """Validate one header entry; returns (dtype name, shape, begin, end)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, "entry must be an object with dtype, shape and data_offsets", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end", name)
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: numpy's int64 product wraps
    if end - begin != expected:
        raise _fail(path, f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}", name)
    if end > data_size:
        raise _fail(path, f"data ends at byte {end} of a {data_size}-byte data buffer (file truncated?)", name)
    return dtype, tuple(shape), begin, end


def _check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    previous_end, previous_name = 0, None
    for begin, end, name in sorted(spans):
        if begin < previous_end:
            raise _fail(path, f"data overlaps tensor {previous_name!r}", name)
        if end > begin:
            previous_end, previous_name = end, name


def read_safetensors(path) -> SafetensorsFile:
    """Memory-map a safetensors file read-only and return its tensors without copying.

    Raises FormatError (a ValueError) naming the file and tensor if the file is malformed.
    """
    path = Path(path)
    file_size = os.path.getsize(path)
    header, data_start = _read_header(path, file_size)
    metadata = _check_metadata(path, header)
    data_size = file_size - data_start

    entries = {name: _check_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(path, [(b, e, name) for name, (_, _, b, e) in entries.items()])

    # mmap refuses empty files, so only map when there is data. Read-only: the arrays are too.
    mapping = buffer = None
    if file_size > data_start:
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = np.frombuffer(mapping, dtype=np.uint8)
    arrays, dtypes = {}, {}
    for name, (dtype, shape, begin, end) in entries.items():
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=DTYPES[dtype])
        else:
            raw = buffer[data_start + begin : data_start + end]
            arrays[name] = raw.view(DTYPES[dtype]).reshape(shape)
        dtypes[name] = dtype
    return SafetensorsFile(path, arrays, dtypes, metadata, mapping, file_size)


# ---------------------------------------------------------------------------------------------
# writing


def _dtype_name(array: np.ndarray, override: str | None) -> str:
    if override is not None:
        if override not in DTYPES:
            raise ValueError(f"unknown safetensors dtype {override!r}")
        if DTYPES[override].itemsize != array.dtype.itemsize:
            raise ValueError(f"dtype {override} does not match an array of {array.dtype}")
        return override
    if array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return "BF16"
    name = _NUMPY_TO_NAME.get(array.dtype.newbyteorder("="))
    if name is None:
        raise ValueError(f"cannot store numpy dtype {array.dtype} in safetensors")
    return name


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time.

    `specs` is [(name, dtype name, shape)]. The header is written first; `write(name, array)` then
    stores each tensor (in any order) directly at its offset, so only one tensor is in memory.
    Tensors are laid out by decreasing element size after a 64-byte aligned data start, so each
    is aligned to its element size without holes (the format forbids gaps between tensors).
    """

    def __init__(self, path, specs: Iterable[tuple[str, str, tuple]], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        specs = list(specs)
        names = [name for name, _, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names")
        layout = sorted(specs, key=lambda s: -DTYPES[s[1]].itemsize)  # stable: keeps caller order otherwise
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._specs, offset = {}, 0
        for name, dtype, shape in layout:
            shape = tuple(int(d) for d in shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._specs[name] = (dtype, shape, offset)
            offset += nbytes
        self._data_size = offset
        self._pending = set(self._specs)

        header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        padding = (-(8 + len(header_bytes))) % _DATA_ALIGNMENT
        header_bytes += b" " * padding
        self._data_start = 8 + len(header_bytes)
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed by close() / __exit__
        self._file.write(len(header_bytes).to_bytes(8, "little"))
        self._file.write(header_bytes)
        self._file.truncate(self._data_start + self._data_size)

    def write(self, name: str, array: np.ndarray, dtype: str | None = None) -> None:
        if name not in self._specs:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the header")
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        want_dtype, want_shape, offset = self._specs[name]
        array = np.asarray(array)
        got_dtype = _dtype_name(array, dtype)
        if got_dtype == "U16" and want_dtype == "BF16":  # raw bf16 bits, declared BF16 in the specs
            got_dtype = "BF16"
        if got_dtype != want_dtype or tuple(array.shape) != want_shape:
            raise ValueError(
                f"{self.path}: tensor {name!r}: got {got_dtype}{list(array.shape)}, "
                f"header says {want_dtype}{list(want_shape)}"
            )
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            data = data.byteswap().view(data.dtype.newbyteorder("<"))
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._pending.discard(name)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: tensors never written: {sorted(self._pending)}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def write_safetensors(
    path,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` to `path`. `dtypes` overrides the stored dtype name per tensor; use it to
    mark uint16 arrays holding bfloat16 bits as "BF16"."""
    dtypes = dict(dtypes or {})
    specs = []
    for name, array in tensors.items():
        array = np.asarray(array)
        specs.append((name, _dtype_name(array, dtypes.get(name)), array.shape))
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, array in tensors.items():
            writer.write(name, array, dtypes.get(name))
