"""Reading GGUF files (llama.cpp): metadata and tensor infos, with every count bounded by the file.

gguf's own GGUFReader trusts the counts it reads: an array header claiming 2**63 elements past the
end of the file makes it loop forever (reads past the end return empty arrays and do not advance),
a huge dimension product wraps around in numpy's uint64, and it spends milliseconds per small
file on numpy views. This reader checks every count, length, type and tensor extent against the
bytes that remain, so a file is parsed in time and memory proportional to its size, or refused
with a ValueError naming what is wrong; tensors are zero-copy views of a read-only memory map.
The gguf package is still used for its tables (types, block sizes) and to dequantize blocks.

Layout (GGUF v2/v3): magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count;
metadata entries (string key, uint32 type, value); tensor infos (string name, uint32 n_dims,
uint64 dims[n_dims] innermost first, uint32 ggml type, uint64 offset); padding to
`general.alignment` (32); the data. Strings are a uint64 length and UTF-8 bytes. Either byte
order (the version tells).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF value type -> struct code of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 8  # arrays of arrays; llama.cpp writes none
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# ggml types stored as plain numbers -> numpy type (the rest are blocks of bytes)
_PLAIN_TYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost (row length) first
    ggml_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # numbers [outer ... inner] for plain types, else uint8 blocks [outer ..., row bytes]


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict  # key -> int, float, bool, str, or a list of them
    tensors: list[GGUFTensorInfo]


class _Cursor:
    """Reads little- or big-endian values from a buffer, never past its end."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.offset, self.order = data, path, 0, "<"

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid GGUF file: {message} (at byte {self.offset})")

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, n: int, what: str) -> int:
        """Claims n bytes; returns where they start."""
        if n > self.remaining():
            raise self.fail(f"{what} needs {n} bytes, {self.remaining()} remain (file truncated?)")
        start = self.offset
        self.offset += n
        return start

    def scalar(self, code: str, what: str):
        size = struct.calcsize(code)
        return struct.unpack_from(self.order + code, self.data, self.take(size, what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("Q", f"{what} length")
        start = self.take(length, what)
        try:
            return str(self.data[start : start + length], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, value_type: int, what: str, depth: int = 0):
        """One metadata value of `value_type`."""
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type != _ARRAY:
            raise self.fail(f"{what} has unknown value type {value_type}")
        if depth >= _MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
        item_type = self.scalar("I", f"{what} item type")
        count = self.scalar("Q", f"{what} length")
        if item_type in _SCALARS:
            code = _SCALARS[item_type]
            start = self.take(count * struct.calcsize(code), f"{what} ({count} items)")
            return np.frombuffer(self.data, self.order + code, count, start).tolist()
        if item_type not in (_STRING, _ARRAY):
            raise self.fail(f"{what} has unknown item type {item_type}")
        smallest = 8 if item_type == _STRING else 12  # a string's length; an array's type and length
        if count * smallest > self.remaining():
            raise self.fail(f"{what} claims {count} items, more than the {self.remaining()} bytes left can hold")
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


def read_gguf(path) -> GGUFFile:
    """The metadata and tensors of the GGUF file at `path` (tensors map the file, read-only);
    ValueError unless every count, length, type and tensor extent fits the file."""
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError(f"{path}: not a valid GGUF file: it is empty")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapping, dtype=np.uint8)  # the tensors' base: keeps the mapping alive
    cursor = _Cursor(memoryview(data), path)
    try:
        metadata, infos, data_start = _header(cursor, gguf, size)
    except struct.error as e:  # not expected after the bounds checks; a ValueError all the same
        raise cursor.fail(str(e)) from None
    tensors = []
    for name, dims, ggml_type, offset, nbytes in infos:
        begin = data_start + offset
        if begin + nbytes > size:
            raise cursor.fail(f"tensor {name!r} ends at byte {begin + nbytes} of {size} (file truncated?)")
        tensors.append(GGUFTensorInfo(name, dims, ggml_type, _tensor_array(data[begin : begin + nbytes], dims,
                                                                            ggml_type, cursor.order, gguf)))
    return GGUFFile(path, metadata, tensors)


def _header(cur: _Cursor, gguf, size: int):
    start = cur.take(4, "magic")
    if bytes(cur.data[start : start + 4]) != b"GGUF":
        raise cur.fail("no GGUF magic")
    version = cur.scalar("I", "version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cur.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in _SUPPORTED_VERSIONS:
        raise cur.fail(f"version {version} is not supported ({', '.join(map(str, _SUPPORTED_VERSIONS))})")
    tensor_count = cur.scalar("Q", "tensor count")
    kv_count = cur.scalar("Q", "metadata count")
    # Each entry takes at least a key length and a type (12 bytes); each tensor info 28.
    if kv_count * 12 + tensor_count * 28 > cur.remaining():
        raise cur.fail(f"{kv_count} metadata entries and {tensor_count} tensors cannot fit in {size} bytes")
    metadata = {}
    for _ in range(kv_count):
        key = cur.string("metadata key")
        value_type = cur.scalar("I", f"type of {key!r}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(value_type, repr(key))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment must be a power of two, got {alignment!r}")
    infos, names = [], set()
    for _ in range(tensor_count):
        info = _tensor_info(cur, gguf)
        if info[0] in names:
            raise cur.fail(f"tensor {info[0]!r} appears twice")
        names.add(info[0])
        infos.append(info)
    data_start = -(-cur.offset // alignment) * alignment
    return metadata, infos, data_start


def _tensor_info(cur: _Cursor, gguf):
    name = cur.string("tensor name")
    n_dims = cur.scalar("I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS})")
    dims = tuple(cur.scalar("Q", f"dimensions of {name!r}") for _ in range(n_dims))
    type_id = cur.scalar("I", f"type of {name!r}")
    offset = cur.scalar("Q", f"offset of {name!r}")
    try:
        ggml_type = gguf.GGMLQuantizationType(type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
    if dims[0] % block_size:
        raise cur.fail(f"tensor {name!r}: rows of {dims[0]} are not whole {ggml_type.name} blocks of {block_size}")
    elements = 1
    for d in dims:  # Python ints: no wrap-around
        elements *= d
    nbytes = elements // block_size * type_size
    if nbytes > len(cur.data) or offset > len(cur.data):
        raise cur.fail(f"tensor {name!r} of shape {list(dims)} ({nbytes} bytes at offset {offset}) exceeds the file")
    return name, dims, ggml_type, offset, nbytes


def _tensor_array(raw: np.ndarray, dims, ggml_type, order: str, gguf) -> np.ndarray:
    shape = tuple(reversed(dims))  # numpy order: outermost first
    plain = _PLAIN_TYPES.get(ggml_type.name)
    if plain is not None:
        return raw.view(order + plain).reshape(shape)
    return raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, ggml_type))
