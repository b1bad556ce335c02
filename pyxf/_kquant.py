"""K-quant quantizers (q4_k, q5_k, q6_k) in numpy, after llama.cpp's reference quantizers
(ggml-quants.c, quantize_row_q{4,5,6}_K_ref: no importance matrix).

Each super-block of 256 weights is fitted sub-block by sub-block: q4_k / q5_k search, over a range
of candidate scales, the scale and min of each 32 weights that minimize the squared error weighted
by (rms of the sub-block + |w|); q6_k the symmetric scale of each 16 weights that maximizes the
x^2-weighted fit. The sub-block scales are then quantized (6-bit for q4_k / q5_k against the
super-block's fp16 d and dmin, int8 for q6_k) and the weights requantized with the scales as stored.
All arithmetic is float32 and rounding is to nearest even, as in llama.cpp; the bytes may still
differ from llama.cpp's in rare near-ties, the quality does not.

Blocks are [n, 256] float32 arrays in; [n, block bytes] uint8 arrays out (layouts: pyxf.quant).
"""

from __future__ import annotations

import numpy as np

_F32 = np.float32
_GROUP_EPS = _F32(1e-15)


def _fit_scale_min(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Rows of x [S, n] ~ scale * L + min, L in 0..nmax, scale >= 0, min <= 0: the candidate with the
    least w-weighted squared error (llama.cpp's make_qkx2_quants: each trial scale spans the range from
    the best min so far to the max). Returns (scale, -min, L)."""
    lo = np.minimum(x.min(1), _F32(0))
    hi = x.max(1)
    flat = hi == lo
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)

    def span(low):
        return np.where(hi > low, hi - low, _F32(1))

    iscale = _F32(nmax) / span(lo)
    levels = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(_F32)
    scale = _F32(1) / iscale
    best = (w * (scale[:, None] * levels + lo[:, None] - x) ** 2).sum(1)
    offset = lo.copy()
    for step in range(nstep + 1):
        trial_iscale = (_F32(rmin + rdelta * step) + _F32(nmax)) / span(offset)
        trial = np.clip(np.rint(trial_iscale[:, None] * (x - offset[:, None])), 0, nmax).astype(_F32)
        sum_l = (w * trial).sum(1)
        sum_l2 = (w * trial * trial).sum(1)
        sum_xl = (w * trial * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        valid = det > 0
        det = np.where(valid, det, _F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the min is clamped to 0 and the scale refitted alone
        this_min = np.where(positive, _F32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, _F32(1)), this_scale)
        err = (w * (this_scale[:, None] * trial + this_min[:, None] - x) ** 2).sum(1)
        better = valid & (err < best)
        levels = np.where(better[:, None], trial, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        offset = np.where(better, this_min, offset)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    levels = np.where(flat[:, None], _F32(0), levels)
    return scale, (-offset).astype(_F32), levels.astype(np.int32)


def _fit_symmetric(x, nmax: int):
    """Rows of x [S, n] ~ scale * L, L in -nmax..nmax-1: the x^2-weighted best of 19 candidate scales
    around -nmax / (the value of largest magnitude) (llama.cpp's make_qx_quants, rmse_type 1).
    Returns (scale, L + nmax)."""
    extreme = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], axis=1)[:, 0]
    empty = np.abs(extreme) < _GROUP_EPS
    extreme = np.where(empty, _F32(1), extreme)
    weight = x * x

    def trial(iscale):
        levels = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(_F32)
        return levels, (weight * x * levels).sum(1), (weight * levels * levels).sum(1)

    levels, sum_lx, sum_l2 = trial(_F32(-nmax) / extreme)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, _F32(1)), _F32(0))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, cand_lx, cand_l2 = trial(-(_F32(nmax) + _F32(0.1) * _F32(step)) / extreme)
        better = (cand_l2 > 0) & (cand_lx * cand_lx > best * cand_l2)
        levels = np.where(better[:, None], cand, levels)
        scale = np.where(better, cand_lx / np.where(cand_l2 > 0, cand_l2, _F32(1)), scale)
        best = np.where(better, scale * cand_lx, best)
    scale = np.where(empty, _F32(0), scale).astype(_F32)
    levels = np.where(empty[:, None], _F32(0), levels + nmax)
    return scale, levels.astype(np.int32)


def _fp16(v):
    return v.astype(np.float16)


def q45_k_blocks(blocks: np.ndarray, bits: int) -> np.ndarray:
    """[n, 256] float32 -> q4_k (bits 4, 144 bytes) or q5_k (bits 5, 176 bytes) blocks."""
    n = blocks.shape[0]
    nmax = (1 << bits) - 1
    x = blocks.astype(_F32, copy=False).reshape(n * 8, 32)
    rms = np.sqrt((x * x).mean(1))
    w = rms[:, None] + np.abs(x)
    if bits == 4:
        scale, mins, levels = _fit_scale_min(x, w, nmax, -1.0, 0.1, 20)
    else:
        scale, mins, levels = _fit_scale_min(x, w, nmax, -0.5, 0.1, 15)
    scale, mins = scale.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scale.max(1), mins.max(1)
    inv_scale = np.where(max_scale > 0, _F32(63) / np.where(max_scale > 0, max_scale, _F32(1)), _F32(0))
    inv_min = np.where(max_min > 0, _F32(63) / np.where(max_min > 0, max_min, _F32(1)), _F32(0))
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scale)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins)).astype(np.uint8)
    d, dmin = _fp16(max_scale / _F32(63)), _fp16(max_min / _F32(63))
    # requantize with the scales as stored (sub-blocks of scale 0 keep their fitted levels)
    sub_d = (d.astype(_F32)[:, None] * ls).reshape(-1)
    sub_m = (dmin.astype(_F32)[:, None] * lm).reshape(-1)
    live = sub_d != 0
    requant = np.clip(np.rint((x + sub_m[:, None]) / np.where(live, sub_d, _F32(1))[:, None]), 0, nmax)
    levels = np.where(live[:, None], requant.astype(np.int32), levels).astype(np.uint8).reshape(n, 4, 2, 32)

    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    qs = ((levels[:, :, 0] & 0x0F) | ((levels[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    parts = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales]
    if bits == 5:  # bit s of qh[l]: the fifth bit of weight l of sub-block s
        fifth = ((levels.reshape(n, 8, 32) >> 4) & 1).astype(np.uint8)
        qh = np.zeros((n, 32), np.uint8)
        for s in range(8):
            qh |= fifth[:, s] << s
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """[n, 256] float32 -> q6_k blocks (210 bytes)."""
    n = blocks.shape[0]
    x = blocks.astype(_F32, copy=False).reshape(n * 16, 16)
    scale, levels = _fit_symmetric(x, 32)
    scale = scale.reshape(n, 16)
    extreme = np.take_along_axis(scale, np.abs(scale).argmax(1)[:, None], axis=1)[:, 0]
    empty = np.abs(extreme) < _GROUP_EPS
    iscale = _F32(-128) / np.where(empty, _F32(1), extreme)
    d = _fp16(np.where(empty, _F32(0), _F32(1) / iscale))
    sc = np.minimum(127, np.rint(iscale[:, None] * scale)).astype(np.int8)
    sc[empty] = 0
    sub_d = (d.astype(_F32)[:, None] * sc).reshape(-1)
    live = sub_d != 0
    requant = np.clip(np.rint(x / np.where(live, sub_d, _F32(1))[:, None]), -32, 31) + 32
    levels = np.where(live[:, None], requant.astype(np.int32), levels).astype(np.uint8).reshape(n, 256)
    levels[empty] = 0

    halves = levels.reshape(n, 2, 4, 32)  # [half][p][l]: weight 128 h + 32 p + l
    ql = np.concatenate([(halves[:, :, 0] & 0x0F) | ((halves[:, :, 2] & 0x0F) << 4),
                         (halves[:, :, 1] & 0x0F) | ((halves[:, :, 3] & 0x0F) << 4)], axis=2).reshape(n, 128)
    top = halves >> 4
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
