"""What every loaded model shares, and the argument checks its methods share: a leaf module (it
imports no other pyxf module), so decoders, encoders and encoder-decoders can use it without
importing one another."""

import math

import numpy as np


def as_token_array(ids, vocab_size, what="ids"):
    """A non-empty int32 array of token ids from a list/tuple/array, or a clear exception."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{what} must be one-dimensional, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    elif isinstance(ids, (list, tuple)):
        for token in ids:
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                raise TypeError(f"{what} must hold integer token ids, got {type(token).__name__} {token!r}")
    else:
        raise TypeError(f"{what} must be a list of token ids or a 1-D integer numpy array, got {type(ids).__name__}")
    if len(ids) == 0:
        raise ValueError(f"{what} is empty")
    try:
        array = np.asarray(ids, dtype=np.int64)
    except OverflowError:
        raise ValueError(f"a token id in {what} is outside the vocabulary [0, {vocab_size})") from None
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(array[bad][0])} in {what} is outside the vocabulary [0, {vocab_size})")
    return np.ascontiguousarray(array, dtype=np.int32)


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class MappedModel:
    """The core model behind a loaded model, reached through a check that the memory-mapped weight
    file it points into is still whole (SafetensorsFile.check_intact: a file truncated under a
    loaded model raises FileChangedError on the next call instead of killing the process)."""

    _core = None
    _weights_file = None

    @property
    def huge_page_bytes(self):
        """Bytes of the file's matrices on huge pages, copied or repacked for the kernels at load
        (pyxf.load's huge_pages; 0: every matrix is read from the memory-mapped file or from memory
        of the process's own)."""
        return self._core.huge_page_bytes

    @property
    def _core_model(self):
        if self._weights_file is not None:
            self._weights_file.check_intact()
        return self._core
