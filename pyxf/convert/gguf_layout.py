"""A bounded walk over a GGUF file's header before the gguf package parses it.

gguf's GGUFReader trusts the counts it reads: an array header claiming 2**63 elements past the end
of the file makes it loop (reads past the end return empty arrays and do not advance), a huge
dimension product wraps around in numpy's uint64, and so on. This walk reads the same layout with
every count checked against the bytes that remain, so a file that passes it can be parsed in time
and memory proportional to its size; one that does not gets a ValueError naming what is wrong.

Layout (GGUF v2/v3): magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count;
metadata entries (string key, uint32 type, value); tensor infos (string name, uint32 n_dims,
uint64 dims[n_dims], uint32 ggml type, uint64 offset); padding to `general.alignment` (32); the
data. Strings are a uint64 length and UTF-8 bytes. Either byte order (the version tells).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# GGUF value type -> struct code of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 8  # arrays of arrays; llama.cpp writes none
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


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

    def string(self, what: str) -> bytes:
        length = self.scalar("Q", f"{what} length")
        start = self.take(length, what)
        return bytes(self.data[start : start + length])

    def value(self, value_type: int, what: str, depth: int = 0):
        """Skips (or, for scalars and strings, returns) one metadata value of `value_type`."""
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
            self.take(count * struct.calcsize(_SCALARS[item_type]), f"{what} ({count} items)")
            return None
        smallest = 8 if item_type == _STRING else 12  # a string's length; an array's type and length
        if item_type not in (_STRING, _ARRAY) or count * smallest > self.remaining():
            if item_type not in (_STRING, _ARRAY):
                raise self.fail(f"{what} has unknown item type {item_type}")
            raise self.fail(f"{what} claims {count} items, more than the {self.remaining()} bytes left can hold")
        for _ in range(count):
            self.value(item_type, what, depth + 1)
        return None


def check_gguf_layout(path) -> None:
    """Raises ValueError unless every count, length, type and tensor extent in the GGUF file at
    `path` is consistent with the file's size."""
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError(f"{path}: not a valid GGUF file: it is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data, memoryview(data) as view:
            _walk(_Cursor(view, path), gguf, size)


def _walk(cur: _Cursor, gguf, size: int) -> None:
    try:
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
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            key = cur.string("metadata key")
            value_type = cur.scalar("I", f"type of {key!r}")
            value = cur.value(value_type, repr(key))
            if key == b"general.alignment":
                if value_type != 4 or value == 0 or value & (value - 1):
                    raise cur.fail(f"general.alignment must be a uint32 power of two, got {value!r}")
                alignment = value
        tensors = [_tensor_info(cur, gguf) for _ in range(tensor_count)]
        data_start = -(-cur.offset // alignment) * alignment
        for name, nbytes, offset in tensors:
            if data_start + offset + nbytes > size:
                raise cur.fail(f"tensor {name!r} ends at byte {data_start + offset + nbytes} of {size} (file truncated?)")
    except struct.error as e:  # not expected after the bounds checks; kept as a ValueError all the same
        raise cur.fail(str(e)) from None


def _tensor_info(cur: _Cursor, gguf) -> tuple[str, int, int]:
    raw_name = cur.string("tensor name")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"tensor name {raw_name[:40]!r} is not UTF-8") from None
    n_dims = cur.scalar("I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS})")
    dims = [cur.scalar("Q", f"dimensions of {name!r}") for _ in range(n_dims)]
    type_id = cur.scalar("I", f"type of {name!r}")
    offset = cur.scalar("Q", f"offset of {name!r}")
    try:
        ggml_type = gguf.GGMLQuantizationType(type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
    elements = 1
    for d in dims:
        elements *= d
    if dims[0] % block_size:
        raise cur.fail(f"tensor {name!r}: rows of {dims[0]} are not whole {ggml_type.name} blocks of {block_size}")
    nbytes = elements // block_size * type_size
    if nbytes > len(cur.data) or offset > len(cur.data):
        raise cur.fail(f"tensor {name!r} of shape {dims} ({nbytes} bytes at offset {offset}) exceeds the file")
    return name, nbytes, offset
