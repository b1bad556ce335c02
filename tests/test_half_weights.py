"""16-bit weights (float16, bfloat16) stay 16-bit in memory. float16 is widened in registers on every
ISA; bfloat16 is widened on generic / avx2 / avx512 and multiplied by vdpbf16ps on avx512_bf16 (and on
AMX tiles from 16 rows on avx512_amx), which rounds the activations to bfloat16 (fp32 sums), except
that avx512_bf16 set to widen (`_core.set_bf16_gemm`) runs 16 rows and more on FMAs, float
activations times the pair panels' bf16 widened in registers."""
import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helpers
from helpers import BF16_PRODUCT_ISAS, bf16_bits
from pyxf import _core


# avx512_bf16 both ways: vdpbf16ps, and FMAs on widened panels from 16 rows (set_bf16_gemm).
@pytest.fixture(params=helpers.bf16_gemm_variants(_core.info()["isas"]))
def isa(request):
    restore = helpers.set_kernels(request.param)
    yield request.param.partition("-")[0]
    restore()


def bf16_activations(isa, x):
    """The activations a bfloat16 GEMM multiplies on this ISA, as float64."""
    return (bf16_bits(x)[1] if helpers.bf16_rounds_activations(isa, len(x)) else x).astype(np.float64)


def assert_close(y, ref, rtol=1e-5):
    """fp32 sums of exact products: the error is a few ulp of the largest partial sum."""
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.abs(y - ref).max() <= rtol * max(1.0, np.abs(ref).max())


# dot products (M < 160) and the packed GEMM (M >= 160); odd K (a zero depth pads the last bf16
# pair), K past one 32-wide vdpbf16ps step and past one packed depth block, N past one panel. On
# panels avx512_amx takes AMX tiles from 16 rows: blocks of 32 rows partly past M (17, 48), depth
# blocks that end in a part of a 32-deep step (K = 577: 289 + 288; 1200: 3 x 400).
# (1, 577, 200) and (1, 1200, 130): decode's single row over several panels of 32 columns (taken two
# at a time on the bf16-product tables), an odd count and a partial last one, one and three depth blocks.
SHAPES = [(1, 7, 5), (3, 77, 33), (16, 100, 70), (17, 577, 70), (48, 1200, 33), (64, 576, 200), (1, 1537, 9),
          (1, 577, 200), (1, 1200, 130), (160, 7, 7), (161, 33, 577), (200, 577, 70), (300, 576, 100)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_half_linear_matches_float64(isa, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    w16 = w.astype(np.float16)
    y16 = _core.ops.linear(x, w16, bias)
    assert_close(y16, x.astype(np.float64) @ w16.astype(np.float64).T + bias)
    wb, wb_values = bf16_bits(w)
    yb = _core.ops.linear(x, wb, bias)
    assert_close(yb, bf16_activations(isa, x) @ wb_values.astype(np.float64).T + bias)


@pytest.mark.parametrize("m,k,inter", [(5, 64, 48), (160, 96, 64), (300, 577, 96)])
def test_bf16_linear_gated_matches_torch(isa, m, k, inter):
    """The gated FFN projection on bf16 weights (fused into the packed GEMM from 160 rows)."""
    rng = np.random.default_rng(m + k + inter)
    x = rng.standard_normal((m, k), dtype=np.float32)
    wb, wb_values = bf16_bits(rng.standard_normal((2 * inter, k), dtype=np.float32))
    gu = F.linear(torch.from_numpy(bf16_activations(isa, x)), torch.from_numpy(wb_values).double())
    ref = (F.silu(gu[:, :inter]) * gu[:, inter:]).numpy()
    assert_close(_core.ops.linear_gated(x, wb, "silu"), ref)


def packs_bf16_once(isa):
    """Whether this ISA's kernels pack bf16 matrices once (models do it at load): the bf16-product
    tables."""
    return isa in BF16_PRODUCT_ISAS


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16_panels_made_once_match_float64(isa, m, k, n):
    """bf16 weights packed once (as a model packs its projections at load): every row count runs on
    the panels, decode's single row included, with the same results as packing per call."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    wb, wb_values = bf16_bits(rng.standard_normal((n, k), dtype=np.float32))
    if not packs_bf16_once(isa):
        with pytest.raises(ValueError, match="per call only"):
            _core.ops.linear(x, wb, bias, panels=True)
        return
    y = _core.ops.linear(x, wb, bias, panels=True)
    assert_close(y, bf16_activations(isa, x) @ wb_values.astype(np.float64).T + bias)
    if m >= 160:  # the same panels as the per-call GEMM's, the same products in the same order
        np.testing.assert_array_equal(y, _core.ops.linear(x, wb, bias))


@pytest.mark.parametrize("m,k,inter", [(1, 64, 32), (1, 577, 256), (5, 577, 96), (40, 577, 96), (300, 577, 96)])
def test_bf16_gated_panels_made_once_match_torch(isa, m, k, inter):
    rng = np.random.default_rng(m + k + inter)
    x = rng.standard_normal((m, k), dtype=np.float32)
    wb, wb_values = bf16_bits(rng.standard_normal((2 * inter, k), dtype=np.float32))
    if not packs_bf16_once(isa):
        with pytest.raises(ValueError, match="per call only"):
            _core.ops.linear_gated(x, wb, "silu", panels=True)
        return
    gu = F.linear(torch.from_numpy(bf16_activations(isa, x)), torch.from_numpy(wb_values).double())
    ref = (F.silu(gu[:, :inter]) * gu[:, inter:]).numpy()
    y = _core.ops.linear_gated(x, wb, "silu", panels=True)
    assert_close(y, ref)
    if m >= 160:
        np.testing.assert_array_equal(y, _core.ops.linear_gated(x, wb, "silu"))


def test_bf16_gemm_tracks_torch_bfloat16(isa):
    """Against torch's own bfloat16 matmul (bf16 inputs, fp32 accumulation, bf16 result): pyxf keeps
    the fp32 result, so the gap is torch's final rounding, at most half a bf16 ulp (2^-9 relative)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 576), dtype=np.float32)
    wb, wb_values = bf16_bits(rng.standard_normal((96, 576), dtype=np.float32) * 0.05)
    xt = torch.from_numpy(bf16_activations(isa, x).astype(np.float32)).bfloat16()
    ref = (xt @ torch.from_numpy(wb_values).bfloat16().T).float().numpy()
    y = _core.ops.linear(x, wb, None)
    assert np.abs(y - ref).max() <= 2.0**-8 * np.abs(ref).max()


def test_avx512_bf16_listed_when_the_cpu_has_it():
    """The bf16 table is offered exactly where avx512 is and the CPU has AVX512_BF16 (Linux flags)."""
    isas = _core.info()["isas"]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is not None:
        assert ("avx512_bf16" in isas) == ("avx512" in isas and "avx512_bf16" in flags)


def amx_tile_state_granted():
    """Whether Linux gives this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM for
    XFEATURE_XTILEDATA; granting it again is harmless)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64


def test_avx512_amx_listed_where_the_os_grants_tiles():
    """The AMX table is offered exactly where avx512_bf16 is, the CPU has AMX-TILE and AMX-BF16, and
    the OS grants the tile state: a CPU that reports AMX to a kernel that withholds it stays on
    avx512_bf16."""
    isas = _core.info()["isas"]
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    expected = "avx512_bf16" in isas and {"amx_tile", "amx_bf16"} <= set(flags) and amx_tile_state_granted()
    assert ("avx512_amx" in isas) == expected


def test_half_weights_rejected_when_unsupported():
    with pytest.raises(TypeError):
        _core.ops.linear(np.ones((1, 4), np.float32), np.ones((2, 4), np.int32))


def test_bf16_gemm_choice():
    """The setting of how avx512_bf16 multiplies many rows: by CPU unless set (Intel widens, AMD
    takes vdpbf16ps); an unknown name is an error naming the choices."""
    import platform

    info = _core.info()
    assert info["bf16_gemm"] == _core.get_bf16_gemm() in ("dot", "widen", "auto")
    before = _core.get_bf16_gemm()
    try:
        _core.set_bf16_gemm("widen")
        assert _core.info()["bf16_gemm_widens"] is True
        _core.set_bf16_gemm("dot")
        assert _core.info()["bf16_gemm_widens"] is False
        _core.set_bf16_gemm("auto")
        vendor = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
        assert _core.info()["bf16_gemm_widens"] is ("AuthenticAMD" not in vendor)
        with pytest.raises(ValueError, match="unknown bf16 GEMM variant 'fast' \\(dot, widen, auto\\)"):
            _core.set_bf16_gemm("fast")
    finally:
        _core.set_bf16_gemm(before)

