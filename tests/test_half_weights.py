"""16-bit weights (float16, bfloat16) stay 16-bit in memory and are widened in registers."""
import numpy as np
import pytest

from pyxf import _core


@pytest.fixture(params=_core.info()["isas"])
def isa(request):
    before = _core.get_isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(before)


def bf16_bits(w):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns, and their float32 values."""
    bits = w.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (3, 77, 33), (16, 100, 70), (64, 576, 200)])
def test_half_linear_matches_float64(isa, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    w16 = w.astype(np.float16)
    wb, wb_values = bf16_bits(w)
    for stored, values in [(w16, w16.astype(np.float64)), (wb, wb_values.astype(np.float64))]:
        ref = x.astype(np.float64) @ values.T + bias
        y = _core.ops.linear(x, stored, bias)
        assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_half_weights_rejected_when_unsupported():
    with pytest.raises(TypeError):
        _core.ops.linear(np.ones((1, 4), np.float32), np.ones((2, 4), np.int32))
