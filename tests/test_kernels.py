"""The float kernels (`pyxf._core.ops`) under every ISA the CPU offers, against float64 numpy and
torch/transformers references, and each SIMD path against the portable (generic) one.

Shapes are chosen to hit every code path: the dot-product GEMM (M < 160) and the packed one (M >= 160)
with K and N that fill no vector, no register tile and no cache block evenly; attention with one
query against many keys (decode), query counts crossing the 64-key and query-block tiles, GQA, MQA and
MHA, head dims from 7 to 256; RoPE in both layouts with partial rotation.
"""

import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import helpers
from helpers import child_process_options

core = pytest.importorskip("pyxf._core", reason="pyxf._core is not built (bash tools/dev_build.sh)")
ops = core.ops
torch = pytest.importorskip("torch")
F = torch.nn.functional

ISAS = core.info()["isas"]
RTOL = 1e-5  # of the reference's largest magnitude


@pytest.fixture(params=ISAS)
def isa(request):
    before = core.get_isa()
    core.set_isa(request.param)
    yield request.param
    core.set_isa(before)


def on_generic(fn, *args, **kwargs):
    """fn(*args) with the portable kernels, restoring the active ISA afterwards."""
    before = core.get_isa()
    core.set_isa("generic")
    try:
        return fn(*args, **kwargs)
    finally:
        core.set_isa(before)


def assert_close(y, ref, rtol=RTOL, atol=0.0, what=""):
    y = np.asarray(y)
    ref = np.asarray(ref, dtype=np.float64)
    assert y.shape == ref.shape, f"{what}: shape {y.shape} != {ref.shape}"
    assert y.dtype == np.float32, f"{what}: dtype {y.dtype}"
    assert np.isfinite(y).all(), f"{what}: non-finite output"
    err = np.abs(y.astype(np.float64) - ref).max(initial=0.0)
    scale = np.abs(ref).max(initial=0.0)
    assert err <= rtol * scale + atol, f"{what}: max abs error {err:.3g} with reference scale {scale:.3g}"


def assert_matches_generic(isa, fn, *args, rtol=RTOL, **kwargs):
    """The active ISA's result against the generic kernels' result on the same inputs."""
    if isa == "generic":
        return
    y = fn(*args, **kwargs)
    ref = on_generic(fn, *args, **kwargs)
    assert_close(y, ref, rtol=rtol, what=f"{isa} vs generic")


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ISA selection


def test_isa_selection():
    info = core.info()
    assert "generic" in info["isas"]
    assert info["isa"] in info["isas"]
    before = core.get_isa()
    try:
        for name in info["isas"]:
            core.set_isa(name)
            assert core.get_isa() == name
        with pytest.raises(ValueError):
            core.set_isa("no-such-isa")
    finally:
        core.set_isa(before)
    assert core.get_isa() == before


# ---------------------------------------------------------------------------------------------
# linear: y = x w^T + b


LINEAR_SHAPES = [
    # small-M (dot product) path: M below 160
    (1, 7, 33), (1, 577, 1000), (3, 1000, 7), (7, 33, 577), (15, 577, 33), (64, 1000, 33), (159, 577, 577),
    # packed path: M at and past the threshold, past one row block, K past one depth block
    (160, 7, 7), (160, 577, 1000), (161, 33, 577), (300, 577, 577), (333, 300, 1000),
]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
def test_linear(isa, m, k, n, with_bias):
    rng = rng_for("linear", m, k, n)
    x, w = randn(rng, m, k), randn(rng, n, k)
    bias = randn(rng, n) if with_bias else None
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    if with_bias:
        ref += bias
    y = ops.linear(x, w, bias=bias)
    assert_close(y, ref, what=f"linear {m}x{k}x{n}")
    assert_matches_generic(isa, ops.linear, x, w, bias=bias)


GATED_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


@pytest.mark.parametrize("act", sorted(GATED_ACTIVATIONS))
@pytest.mark.parametrize("m,k,inter", [(5, 64, 48), (160, 96, 64), (300, 577, 96), (161, 40, 40)])
def test_linear_gated_matches_torch(isa, m, k, inter, act):
    """A gated FFN's up projection: act(x gate^T) * (x up^T) with w = [gate; up] (Llama: silu, T5:
    gelu_tanh); from 160 rows (and I a multiple of the tile width) the activation is fused into the
    packed GEMM."""
    rng = rng_for("linear-gated", m, k, inter)
    x, w = randn(rng, m, k), randn(rng, 2 * inter, k)
    gu = F.linear(torch.from_numpy(x).double(), torch.from_numpy(w).double())
    ref = GATED_ACTIVATIONS[act](gu[:, :inter]) * gu[:, inter:]
    y = ops.linear_gated(x, w, act)
    assert y.shape == (m, inter)
    assert_close(y, ref.numpy(), what=f"linear_gated {m}x{k}x{inter}")


def test_linear_agrees_with_torch(isa):
    rng = rng_for("linear-torch")
    x, w, b = randn(rng, 19, 577), randn(rng, 33, 577), randn(rng, 33)
    ref = F.linear(torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(b).double())
    assert_close(ops.linear(x, w, b), ref.numpy())


def test_linear_converts_x_but_not_w(isa):
    """x may be any layout and float dtype (it is converted); w must be C-contiguous."""
    rng = rng_for("linear-layout")
    x64 = rng.standard_normal((40, 20)).T  # float64, not C-contiguous
    w = randn(rng, 9, 40)
    assert_close(ops.linear(x64, w), x64 @ w.T.astype(np.float64), rtol=1e-5)
    with pytest.raises(ValueError):
        ops.linear(x64, np.asfortranarray(w))


@pytest.mark.parametrize("wdtype", ["float16", "bfloat16"])
# From 160 rows the packed GEMM: K = 577 is two depth blocks (the second odd), 1200 three (bf16) or
# five (float).
@pytest.mark.parametrize("m,k,n", [(1, 7, 33), (3, 577, 100), (15, 33, 577), (16, 100, 7), (129, 577, 65),
                                   (161, 577, 65), (170, 1200, 70)])
def test_linear_half_precision_weights(isa, wdtype, m, k, n):
    """float16 / bfloat16 weights (bfloat16 as uint16 bits) give the float32 product with the
    weights' exact values; on avx512_bf16 (vdpbf16ps) bfloat16 products also round x to bfloat16."""
    rng = rng_for("linear-half", wdtype, m, k, n)
    x, w32, bias = randn(rng, m, k), randn(rng, n, k), randn(rng, n)
    if wdtype == "float16":
        w = w32.astype(np.float16)
        exact = w.astype(np.float64)
    else:
        w, exact = helpers.bf16_bits(w32)
        exact = exact.astype(np.float64)
    rounds_x = wdtype == "bfloat16" and helpers.bf16_rounds_activations(isa, m)
    xs = helpers.bf16_bits(x)[1] if rounds_x else x
    ref = xs.astype(np.float64) @ exact.T + bias
    assert_close(ops.linear(x, w, bias), ref, what=f"linear with {wdtype} weights")
    if not rounds_x:
        assert_matches_generic(isa, ops.linear, x, w, bias)


# ---------------------------------------------------------------------------------------------
# norms, softmax, activations


NORM_SHAPES = [(1, 1), (1, 7), (5, 33), (3, 576), (64, 1000), (2, 4096)]


@pytest.mark.parametrize("rows,n", NORM_SHAPES)
def test_rmsnorm(isa, rows, n):
    rng = rng_for("rmsnorm", rows, n)
    x, w = randn(rng, rows, n, scale=3.0), randn(rng, n)
    for eps in (1e-5, 1e-6):
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * w
        assert_close(ops.rmsnorm(x, w, eps), ref, what=f"rmsnorm eps={eps}")
        assert_matches_generic(isa, ops.rmsnorm, x, w, eps)


@pytest.mark.parametrize("rows,n", NORM_SHAPES)
def test_layernorm(isa, rows, n):
    rng = rng_for("layernorm", rows, n)
    # A large common offset: the variance must not be computed as E[x^2] - E[x]^2.
    x = (randn(rng, rows, n) + 100.0).astype(np.float32)
    w, b = randn(rng, n), randn(rng, n)
    for eps in (1e-5, 1e-12):
        ref = F.layer_norm(torch.from_numpy(x).double(), (n,), torch.from_numpy(w).double(),
                           torch.from_numpy(b).double(), eps).numpy()
        # A row of one value normalizes to zero up to the rounding of x - mean, amplified by 1/sqrt(eps).
        atol = 1e-5 if n == 1 else 0.0
        assert_close(ops.layernorm(x, w, b, eps), ref, atol=atol, what=f"layernorm eps={eps}")
        assert_matches_generic(isa, ops.layernorm, x, w, b, eps)


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (4, 33), (2, 1000), (129, 129)])
def test_softmax(isa, rows, n):
    rng = rng_for("softmax", rows, n)
    x = randn(rng, rows, n, scale=10.0)
    x[0, 0] = 80.0  # large values must not overflow
    if n > 2:
        x[-1, 1] = -np.inf  # masked entries get probability 0
    ref = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    y = ops.softmax(x)
    assert_close(y, ref, what="softmax")
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    assert_matches_generic(isa, ops.softmax, x)


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (4, 33), (2, 1000), (3, 32000)])
def test_log_softmax_and_logsumexp(isa, rows, n):
    """Beam search's log-probabilities over a whole vocabulary, against torch in float64."""
    rng = rng_for("log_softmax", rows, n)
    x = randn(rng, rows, n, scale=10.0)
    x[0, 0] = 80.0
    if n > 2:
        x[-1, 1] = -np.inf  # a banned token stays at -inf
    xt = torch.from_numpy(x).double()
    ref = torch.log_softmax(xt, -1).numpy()
    y = ops.log_softmax(x)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(y), finite)
    # Absolute: log-probabilities near 0 carry the rounding of max + log(sum).
    np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ops.logsumexp(x), torch.logsumexp(xt, -1).numpy(), rtol=1e-6, atol=1e-5)
    all_banned = np.full((1, n), -np.inf, dtype=np.float32)
    assert np.all(ops.log_softmax(all_banned) == -np.inf)
    if isa != "generic":
        np.testing.assert_allclose(y, on_generic(ops.log_softmax, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 64, 65, 1000, 32000, 49152])
def test_argmax_is_the_first_largest(isa, n):
    """Greedy decoding's choice: torch.argmax's (the first of tied maxima), -inf entries included."""
    rng = rng_for("argmax", n, 0)
    x = randn(rng, 6, n, scale=5.0)
    x[1, :] = -np.inf
    x[1, n // 2] = -3.0  # one allowed token
    if n > 2:
        x[2, [n // 3, n - 1]] = 50.0  # tied maxima: the first wins
        x[3, n - 1] = 40.0  # the maximum in the tail past the last whole vector
    x[4, 0] = 90.0
    np.testing.assert_array_equal(ops.argmax(x), torch.argmax(torch.from_numpy(x), -1).numpy())

@pytest.mark.parametrize("n,k", [(1, 1), (5, 8), (100, 3), (1000, 8), (32000, 8)])
def test_top_k_is_a_stable_descending_sort_prefix(isa, n, k):
    """Beam search's best continuations of a beam: the k largest of row + beam score (float32 sums),
    ties to the lower token, as a stable descending sort of those sums gives them."""
    rng = rng_for("top_k", n, k)
    x = randn(rng, 4, n, scale=3.0)
    x[1, :] = np.round(x[1, :])  # many ties
    x[2, : n // 2] = -np.inf
    offset = np.float32(-7.25)
    scores, indices = ops.top_k(x, float(offset), k)
    for r in range(x.shape[0]):
        sums = x[r] + offset
        ref = np.argsort(-sums, kind="stable")[: min(k, n)]
        np.testing.assert_array_equal(indices[r, : len(ref)], ref)
        np.testing.assert_array_equal(scores[r, : len(ref)], sums[ref])
        assert np.all(indices[r, len(ref):] == -1)  # fewer than k entries: only n are written

TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def activation_inputs(rng, n):
    x = np.concatenate([np.linspace(-12, 12, 1001), rng.standard_normal(n) * 3, [0.0, -0.0, 1e-8, -1e-8, 30, -30]])
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", sorted(TORCH_ACTIVATIONS))
def test_activation(isa, kind):
    rng = rng_for("activation", kind)
    x = activation_inputs(rng, 533)
    ref = TORCH_ACTIVATIONS[kind](torch.from_numpy(x).double()).numpy()
    y = ops.activation(x, kind)
    # Elementwise: each value to ~1e-5 of itself, and to 1e-6 absolute near zero crossings.
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.argmax(err - 1e-5 * np.abs(ref))
    assert (err <= 1e-5 * np.abs(ref) + 1e-6).all(), f"{kind}({x[worst]}) = {y[worst]}, expected {ref[worst]}"
    # Any shape, any length (vector tails).
    for shape in [(1,), (7,), (3, 17), (2, 3, 33)]:
        xs = randn(rng, *shape, scale=4.0)
        ref = TORCH_ACTIVATIONS[kind](torch.from_numpy(xs).double()).numpy()
        assert_close(ops.activation(xs, kind), ref, what=f"{kind} {shape}")
    assert_matches_generic(isa, ops.activation, x, kind)


@pytest.mark.parametrize("cap", [30.0, 50.0, 0.5])
def test_softcap(isa, cap):
    """Gemma's logit soft-capping, cap * tanh(x / cap), against torch in float64: small values
    pass nearly unchanged, large ones approach +-cap; every tail length."""
    rng = rng_for("softcap", cap)
    for shape in [(1,), (15,), (3, 17), (2, 1000)]:
        x = randn(rng, *shape, scale=2.0 * cap)
        ref = (cap * torch.tanh(torch.from_numpy(x).double() / cap)).numpy()
        y = ops.softcap(x, cap)
        assert np.abs(y.astype(np.float64) - ref).max() <= 1e-6 * cap, shape
    assert_matches_generic(isa, ops.softcap, randn(rng, 3, 77, scale=cap), cap)
    with pytest.raises(ValueError, match="positive"):
        ops.softcap(np.ones(3, np.float32), 0.0)


@pytest.mark.parametrize("kind", sorted(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 33), (17, 100), (2, 1536)])
def test_gated_activation(isa, kind, rows, n):
    rng = rng_for("gated", kind, rows, n)
    gu = randn(rng, rows, 2 * n, scale=3.0)
    g = torch.from_numpy(gu[:, :n]).double()
    u = torch.from_numpy(gu[:, n:]).double()
    ref = (TORCH_ACTIVATIONS[kind](g) * u).numpy()
    assert_close(ops.gated_activation(gu, kind), ref, what=f"gated {kind}")
    assert_matches_generic(isa, ops.gated_activation, gu, kind)


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(rot_dim, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)).astype(np.float32)


def rope_reference(x, pos, inv_freq, head_dim, interleaved, scaling):
    """float64 rotation by the same float32 angles as torch (pos * inv_freq rounded to float32)."""
    t, width = x.shape
    half = len(inv_freq)
    angle = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # [T, half]
    cos, sin = np.cos(angle) * scaling, np.sin(angle) * scaling
    out = x.astype(np.float64).reshape(t, width // head_dim, head_dim).copy()
    if interleaved:
        a, b = out[..., 0 : 2 * half : 2].copy(), out[..., 1 : 2 * half : 2].copy()
        out[..., 0 : 2 * half : 2] = a * cos[:, None] - b * sin[:, None]
        out[..., 1 : 2 * half : 2] = b * cos[:, None] + a * sin[:, None]
    else:
        a, b = out[..., :half].copy(), out[..., half : 2 * half].copy()
        out[..., :half] = a * cos[:, None] - b * sin[:, None]
        out[..., half : 2 * half] = b * cos[:, None] + a * sin[:, None]
    return out.reshape(t, width)


ROPE_CASES = [
    # (tokens, heads, head_dim, rot_dim)
    (1, 1, 2, 2),
    (7, 3, 32, 32),
    (129, 9, 64, 64),
    (5, 2, 80, 80),
    (3, 4, 128, 128),
    (6, 2, 64, 32),   # partial rotation (e.g. partial_rotary_factor 0.5)
    (4, 3, 80, 20),
    (5, 2, 9, 8),     # odd head dim, the last element is passed through
]


@pytest.mark.parametrize("scaling", [1.0, 0.7])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("t,heads,head_dim,rot_dim", ROPE_CASES)
def test_rope(isa, t, heads, head_dim, rot_dim, interleaved, scaling):
    rng = rng_for("rope", t, heads, head_dim, rot_dim)
    x = randn(rng, t, heads * head_dim)
    pos = np.concatenate([[0], rng.integers(0, 4096, size=t - 1)]).astype(np.int32)
    inv_freq = rope_inv_freq(rot_dim)
    ref = rope_reference(x, pos, inv_freq, head_dim, interleaved, scaling)
    y = ops.rope(x, pos, inv_freq, head_dim, interleaved=interleaved, scaling=scaling)
    assert_close(y, ref, what="rope")
    np.testing.assert_array_equal(y.reshape(t, heads, head_dim)[..., rot_dim:],
                                  x.reshape(t, heads, head_dim)[..., rot_dim:])
    assert_matches_generic(isa, ops.rope, x, pos, inv_freq, head_dim, interleaved=interleaved, scaling=scaling)


def test_rope_matches_transformers_llama(isa):
    """Rotate-half RoPE as transformers' Llama applies it, cos/sin computed its way (float32)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = rng_for("rope-llama")
    t, heads, d = 37, 3, 64
    x = randn(rng, t, heads * d)
    pos = np.arange(100, 100 + t, dtype=np.int32)
    inv_freq = rope_inv_freq(d, theta=100000.0)
    freqs = torch.from_numpy(pos).float()[:, None] * torch.from_numpy(inv_freq)[None, :]
    emb = torch.cat([freqs, freqs], -1)
    q = torch.from_numpy(x).view(1, t, heads, d).transpose(1, 2)
    ref, _ = apply_rotary_pos_emb(q, q, emb.cos()[None], emb.sin()[None])
    ref = ref.transpose(1, 2).reshape(t, heads * d).numpy()
    assert_close(ops.rope(x, pos, inv_freq, d), ref, rtol=1e-5)


def test_rope_interleaved_matches_transformers_gptj(isa):
    """Pairwise (2i, 2i+1) RoPE as transformers' GPT-J applies it, on the first rot_dim dims."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    rng = rng_for("rope-gptj")
    t, heads, d, rot = 11, 4, 64, 32
    x = randn(rng, t, heads * d)
    pos = np.arange(t, dtype=np.int32) * 7
    inv_freq = rope_inv_freq(rot)
    freqs = torch.from_numpy(pos).float()[:, None] * torch.from_numpy(inv_freq)[None, :]
    sin, cos = freqs.sin()[None], freqs.cos()[None]  # GPT-J takes [batch, T, rot/2]
    xt = torch.from_numpy(x).view(1, t, heads, d)
    rotated = apply_rotary_pos_emb(xt[..., :rot], sin, cos)
    ref = torch.cat([rotated, xt[..., rot:]], -1).reshape(t, heads * d).numpy()
    assert_close(ops.rope(x, pos, inv_freq, d, interleaved=True), ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention


def attention_reference(q, k, v, n_heads, n_kv_heads, causal, scale, window=0, softcap=0.0):
    """float64: query i sits at position n_keys - n_new + i; head h reads kv head h // group; with a
    window, key j is visible to position p only if |p - j| < window; softcap as Gemma 2."""
    t, tk = q.shape[0], k.shape[0]
    d = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    q64 = q.astype(np.float64).reshape(t, n_heads, d)
    k64 = k.astype(np.float64).reshape(tk, n_kv_heads, d)
    v64 = v.astype(np.float64).reshape(tk, n_kv_heads, d)
    out = np.empty((t, n_heads, d))
    pos = (tk - t + np.arange(t))[:, None]
    keys = np.arange(tk)[None, :]
    visible = keys <= pos if causal else np.ones((t, tk), bool)
    if window:
        visible &= np.abs(pos - keys) < window
    for h in range(n_heads):
        g = h // group
        s = q64[:, h] @ k64[:, g].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v64[:, g]
    return out.reshape(t, n_heads * d)


ATTENTION_CASES = [
    # (queries, keys, heads, kv_heads, head_dim, causal)
    (1, 1, 4, 4, 64, True),
    (7, 7, 4, 2, 32, True),       # GQA prefill
    (129, 129, 8, 1, 64, True),   # MQA, queries and keys across several tiles
    (129, 129, 3, 3, 80, True),   # MHA
    (1, 300, 9, 3, 64, True),     # decode against many keys (SmolLM2's shape)
    (200, 200, 9, 3, 64, True),   # SmolLM2 prefill: keys transposed once for many query blocks
    (50, 150, 9, 3, 64, True),    # a long chunk after a cached past
    (1, 1000, 4, 1, 128, True),
    (1, 1500, 9, 3, 64, True),    # decode with more than 2^19 multiply-adds: keys split across threads
    (1, 65, 2, 2, 32, True),      # a small decode: on one thread
    (5, 200, 4, 4, 80, True),     # a chunk of new tokens after a cached past
    (64, 130, 2, 1, 128, True),
    (129, 129, 2, 2, 128, False),
    (3, 70, 6, 2, 80, False),     # non-causal with fewer queries than keys
    (10, 10, 3, 1, 17, True),     # odd head dims: vector tails
    (9, 20, 2, 2, 7, True),
    (65, 65, 4, 4, 33, False),
    (33, 100, 2, 1, 96, True),
    (4, 100, 2, 1, 256, True),
    (3, 10, 128, 1, 8, True),     # more heads per kv head than one work item holds
    (1, 40, 8, 8, 64, True),      # MHA decode: a work item and a tile take four kv heads
    (1, 1200, 6, 6, 40, True),    # the same with vector tails, keys split across threads
    (2, 50, 3, 3, 17, True),      # two rows per kv head: items of two kv heads, then one
    (2, 9, 64, 1, 16, False),
]


@pytest.mark.parametrize("paged", [False, True], ids=["rows", "paged"])
@pytest.mark.parametrize("t,tk,heads,kv_heads,head_dim,causal", ATTENTION_CASES)
def test_attention(isa, t, tk, heads, kv_heads, head_dim, causal, paged):
    """Keys as rows (encoders, cross-attention) and in a paged KV cache (transposed pages, out of
    order); decode shapes split their keys across threads and merge the partial softmaxes."""
    rng = rng_for("attention", t, tk, heads, kv_heads, head_dim, causal)
    q = randn(rng, t, heads * head_dim, scale=2.0)  # sharp enough that the softmax matters
    k = randn(rng, tk, kv_heads * head_dim)
    v = randn(rng, tk, kv_heads * head_dim)
    scale = head_dim**-0.5
    ref = attention_reference(q, k, v, heads, kv_heads, causal, scale)
    y = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, paged=paged)
    assert_close(y, ref, what="attention")
    assert_matches_generic(isa, ops.attention, q, k, v, heads, kv_heads, causal=causal, scale=scale, paged=paged)


WINDOW_CASES = [
    # (queries, keys, heads, kv_heads, head_dim, causal, window, softcap)
    (1, 700, 4, 1, 64, True, 512, 0.0),     # decode past a Gemma-style window: early blocks skipped
    (1, 300, 9, 3, 64, True, 100, 0.0),     # window edge inside a block
    (150, 150, 4, 2, 32, True, 40, 0.0),    # prefill: each row's window starts elsewhere
    (20, 200, 4, 4, 48, True, 64, 0.0),     # a chunk after a cached past
    (130, 130, 3, 3, 40, False, 33, 0.0),   # bidirectional local attention (ModernBERT)
    (70, 70, 8, 2, 64, True, 0, 5.0),       # soft-capping (Gemma 2)
    (1, 400, 8, 4, 80, True, 128, 2.0),     # both, decode
    (1, 3000, 4, 1, 64, True, 512, 0.0),    # the same, long enough to split its keys across threads
    (1, 2000, 8, 4, 80, True, 0, 2.0),
]


@pytest.mark.parametrize("paged", [False, True], ids=["rows", "paged"])
@pytest.mark.parametrize("t,tk,heads,kv_heads,head_dim,causal,window,softcap", WINDOW_CASES)
def test_attention_window_and_softcap(isa, t, tk, heads, kv_heads, head_dim, causal, window, softcap, paged):
    rng = rng_for("attention-window", t, tk, heads, kv_heads, head_dim, causal, window)
    q = randn(rng, t, heads * head_dim, scale=3.0)
    k, v = randn(rng, tk, kv_heads * head_dim), randn(rng, tk, kv_heads * head_dim)
    scale = head_dim**-0.5
    ref = attention_reference(q, k, v, heads, kv_heads, causal, scale, window, softcap)
    y = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, window=window, softcap=softcap,
                      paged=paged)
    assert_close(y, ref, what="attention")


def test_attention_large_scores(isa):
    """Scores in the hundreds: the online softmax must rescale, not overflow."""
    rng = rng_for("attention-large")
    t, tk, h, d = 20, 150, 2, 64
    q, k, v = randn(rng, t, h * d, scale=30.0), randn(rng, tk, h * d), randn(rng, tk, h * d)
    ref = attention_reference(q, k, v, h, h, True, 1.0)
    assert_close(ops.attention(q, k, v, h, h, causal=True, scale=1.0), ref, rtol=1e-4)


def test_attention_matches_torch_sdpa(isa):
    rng = rng_for("attention-sdpa")
    t, heads, kv_heads, d = 77, 6, 2, 64
    q, k, v = randn(rng, t, heads * d), randn(rng, t, kv_heads * d), randn(rng, t, kv_heads * d)

    def heads_first(a, n):
        return torch.from_numpy(a).double().view(t, n, d).transpose(0, 1)[None]

    kr = heads_first(k, kv_heads).repeat_interleave(heads // kv_heads, dim=1)
    vr = heads_first(v, kv_heads).repeat_interleave(heads // kv_heads, dim=1)
    for causal in (True, False):
        ref = F.scaled_dot_product_attention(heads_first(q, heads), kr, vr, is_causal=causal)
        ref = ref[0].transpose(0, 1).reshape(t, heads * d).numpy()
        assert_close(ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=d**-0.5), ref)


def test_attention_decode_equals_prefill_rows(isa):
    """Query i of a prefill equals a one-query call over keys 0..i (what a KV cache decode does)."""
    rng = rng_for("attention-decode")
    t, heads, kv_heads, d = 70, 4, 2, 64
    q, k, v = randn(rng, t, heads * d), randn(rng, t, kv_heads * d), randn(rng, t, kv_heads * d)
    full = ops.attention(q, k, v, heads, kv_heads, causal=True, scale=0.125)
    for i in (0, 1, 31, 63, 64, 65, 69):
        one = ops.attention(q[i : i + 1], k[: i + 1], v[: i + 1], heads, kv_heads, causal=True, scale=0.125)
        assert_close(one, full[i : i + 1], rtol=1e-6)


@pytest.mark.parametrize("paged", [False, True], ids=["rows", "paged"])
def test_attention_head_alone_is_bitwise_the_same(isa, paged):
    """A query head's output does not depend on the heads computed beside it (a decode step of a
    multi-head model puts four kv heads in one register tile, a head alone gets a tile of its own):
    batching and speculative verification rely on a row's result being the same bits."""
    rng = rng_for("attention-alone", paged)
    heads, d = 6, 64
    for t, tk in ((1, 37), (2, 90)):
        q, k, v = randn(rng, t, heads * d, scale=2.0), randn(rng, tk, heads * d), randn(rng, tk, heads * d)
        together = ops.attention(q, k, v, heads, heads, causal=True, scale=0.125, paged=paged)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            alone = ops.attention(np.ascontiguousarray(q[:, cols]), np.ascontiguousarray(k[:, cols]),
                                  np.ascontiguousarray(v[:, cols]), 1, 1, causal=True, scale=0.125, paged=paged)
            np.testing.assert_array_equal(together[:, cols], alone)


BF16_ATTENTION_CASES = [
    # (queries, keys, heads, kv_heads, head_dim, causal)
    (200, 200, 9, 3, 64, True),   # SmolLM2 prefill
    (129, 129, 3, 3, 80, True),   # head_dim not a multiple of 64: a 3-vector tail of values
    (64, 130, 2, 1, 128, True),   # a chunk after a cached past, two chunks of head dimensions
    (33, 33, 12, 12, 32, False),  # MiniLM encoding: an odd count of keys pairs with a zero value
    (70, 70, 8, 2, 64, True),
]


@pytest.mark.parametrize("paged", [False, True], ids=["rows", "paged"])
@pytest.mark.parametrize("t,tk,heads,kv_heads,head_dim,causal", BF16_ATTENTION_CASES)
def test_attention_bf16_products(isa, t, tk, heads, kv_heads, head_dim, causal, paged):
    """bf16_products (models computing in bfloat16): no less accurate than torch's bfloat16
    scaled_dot_product_attention on the same inputs; taken where the table has vdpbf16ps, and
    ignored (float, the same bits) by the other tables."""
    rng = rng_for("attention-bf16", t, tk, heads, kv_heads, head_dim, causal)
    q = randn(rng, t, heads * head_dim, scale=2.0)
    k, v = randn(rng, tk, kv_heads * head_dim), randn(rng, tk, kv_heads * head_dim)
    scale = head_dim**-0.5
    ref = attention_reference(q, k, v, heads, kv_heads, causal, scale)

    def heads_first(a, n):
        return torch.from_numpy(a).bfloat16().view(-1, n, head_dim).transpose(0, 1)[None]

    group = heads // kv_heads
    kr = heads_first(k, kv_heads).repeat_interleave(group, dim=1)
    vr = heads_first(v, kv_heads).repeat_interleave(group, dim=1)
    # torch's causal mask is top-left aligned: build the bottom-right one (queries are the last t)
    mask = torch.ones(t, tk, dtype=torch.bool)
    if causal:
        mask = torch.arange(tk)[None, :] <= (tk - t + torch.arange(t))[:, None]
    ref_bf16 = F.scaled_dot_product_attention(heads_first(q, heads), kr, vr, attn_mask=mask, scale=scale)
    torch_err = np.abs(ref_bf16[0].transpose(0, 1).reshape(t, -1).double().numpy() - ref).max()

    y = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, paged=paged, bf16_products=True)
    y32 = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, paged=paged)
    err = np.abs(y.astype(np.float64) - ref).max()
    assert np.isfinite(y).all()
    assert err <= 1.25 * torch_err, f"bf16 attention error {err:.3g}, torch bfloat16's {torch_err:.3g}"
    if helpers.bf16_attention_products(isa):
        assert not np.array_equal(y, y32), "bf16_products did not take the bf16 path"
    else:
        np.testing.assert_array_equal(y, y32)


@pytest.mark.parametrize("t,tk,heads,kv_heads,head_dim,causal", ATTENTION_CASES + BF16_ATTENTION_CASES)
def test_attention_half_cache(isa, t, tk, heads, kv_heads, head_dim, causal):
    """A float16 KV cache: the result is attention over the keys and values rounded to IEEE half as
    torch rounds them (float32 accuracy from there), and what a float cache holding those
    rounded values gives, with and without bf16 products; every ISA, every shape of the float
    cache's tests."""
    rng = rng_for("attention-half", t, tk, heads, kv_heads, head_dim, causal)
    q = randn(rng, t, heads * head_dim, scale=2.0)
    k, v = randn(rng, tk, kv_heads * head_dim), randn(rng, tk, kv_heads * head_dim)
    scale = head_dim**-0.5
    k16, v16 = (torch.from_numpy(a).half().float().numpy() for a in (k, v))
    ref = attention_reference(q, k16, v16, heads, kv_heads, causal, scale)
    y = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, paged=True, kv_dtype="float16")
    assert_close(y, ref, what="attention on a float16 cache")
    # The same sums as over a float cache (only where a call splits its keys across threads, which
    # counts the cache's bytes, may the order of the merges differ: float32 rounding)
    same = ops.attention(q, k16, v16, heads, kv_heads, causal=causal, scale=scale, paged=True)
    assert_close(y, same, rtol=1e-6, what="float16 cache vs float cache of the rounded values")
    y_bf16 = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, paged=True, kv_dtype="float16",
                           bf16_products=True)
    same_bf16 = ops.attention(q, k16, v16, heads, kv_heads, causal=causal, scale=scale, paged=True, bf16_products=True)
    assert_close(y_bf16, same_bf16, rtol=1e-6, what="the same with bf16 products")


@pytest.mark.parametrize("t,tk,heads,kv_heads,head_dim,causal,window,softcap", WINDOW_CASES[:4] + WINDOW_CASES[-2:])
def test_attention_half_cache_window_and_softcap(isa, t, tk, heads, kv_heads, head_dim, causal, window, softcap):
    rng = rng_for("attention-half-window", t, tk, heads, kv_heads, head_dim, causal, window)
    q = randn(rng, t, heads * head_dim, scale=3.0)
    k, v = randn(rng, tk, kv_heads * head_dim), randn(rng, tk, kv_heads * head_dim)
    scale = head_dim**-0.5
    k16, v16 = (torch.from_numpy(a).half().float().numpy() for a in (k, v))
    ref = attention_reference(q, k16, v16, heads, kv_heads, causal, scale, window, softcap)
    y = ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=scale, window=window, softcap=softcap,
                      paged=True, kv_dtype="float16")
    assert_close(y, ref, what="attention on a float16 cache")


def test_half_cache_rounds_as_torch(isa):
    """Each value stored in a float16 cache is torch's float16 of it, bit for bit: ties to even,
    subnormals, the largest finite half, overflow to infinity, NaN. Attention over one key returns
    that key's value exactly (its probability is 1)."""
    values = np.array([0.0, -0.0, 1.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-12, 65504.0, 65519.0,
                       65520.0, -1e6, np.inf, -np.inf, np.nan, 2.0**-14, 2.0**-15 * 1.5, 2.0**-24,
                       2.0**-25, 2.0**-25 * 1.0001, 3 * 2.0**-26, 1e-30, -7.3e-6, 0.1, -3.14159, 1234.567],
                      dtype=np.float32)
    d = 16
    values = np.resize(values, (len(values) + d - 1) // d * d).reshape(-1, d)
    q = np.zeros((1, d), np.float32)
    for row in values:
        v = row[None, :].copy()
        y = ops.attention(q, np.zeros_like(v), v, 1, 1, causal=True, scale=1.0, paged=True, kv_dtype="float16")
        expected = torch.from_numpy(v).half().float().numpy()
        np.testing.assert_array_equal(y, expected)


# ---------------------------------------------------------------------------------------------
# bad inputs: a ValueError, never a crash


f32 = np.float32


BAD_CALLS = {
    "linear: 1-D x": lambda: ops.linear(np.zeros(8, f32), np.zeros((4, 8), f32)),
    "linear: 3-D x": lambda: ops.linear(np.zeros((2, 3, 8), f32), np.zeros((4, 8), f32)),
    "linear: inner dims differ": lambda: ops.linear(np.zeros((2, 8), f32), np.zeros((4, 9), f32)),
    "linear: bias length": lambda: ops.linear(np.zeros((2, 8), f32), np.zeros((4, 8), f32), np.zeros(5, f32)),
    "linear: 2-D bias": lambda: ops.linear(np.zeros((2, 8), f32), np.zeros((4, 8), f32), np.zeros((1, 4), f32)),
    "linear: non-contiguous w": lambda: ops.linear(np.zeros((2, 8), f32), np.zeros((8, 4), f32).T),
    "rmsnorm: weight length": lambda: ops.rmsnorm(np.zeros((2, 8), f32), np.zeros(7, f32), 1e-5),
    "rmsnorm: 1-D x": lambda: ops.rmsnorm(np.zeros(8, f32), np.zeros(8, f32), 1e-5),
    "layernorm: bias length": lambda: ops.layernorm(np.zeros((2, 8), f32), np.zeros(8, f32), np.zeros(9, f32), 1e-5),
    "softmax: 1-D": lambda: ops.softmax(np.zeros(8, f32)),
    "activation: unknown kind": lambda: ops.activation(np.zeros(8, f32), "tanhh"),
    "gated: odd width": lambda: ops.gated_activation(np.zeros((2, 7), f32), "silu"),
    "gated: unknown kind": lambda: ops.gated_activation(np.zeros((2, 8), f32), "swiglu"),
    "rope: width not a multiple of head_dim": lambda: ops.rope(
        np.zeros((2, 10), f32), np.zeros(2, np.int32), np.ones(2, f32), 4),
    "rope: head_dim 0": lambda: ops.rope(np.zeros((2, 8), f32), np.zeros(2, np.int32), np.ones(2, f32), 0),
    "rope: positions count": lambda: ops.rope(np.zeros((2, 8), f32), np.zeros(3, np.int32), np.ones(2, f32), 8),
    "rope: inv_freq too long": lambda: ops.rope(np.zeros((2, 8), f32), np.zeros(2, np.int32), np.ones(5, f32), 8),
    "rope: empty inv_freq": lambda: ops.rope(np.zeros((2, 8), f32), np.zeros(2, np.int32), np.ones(0, f32), 8),
    "attention: heads not a multiple of kv heads": lambda: ops.attention(
        np.zeros((1, 24), f32), np.zeros((1, 16), f32), np.zeros((1, 16), f32), 3, 2, True, 1.0),
    "attention: zero heads": lambda: ops.attention(
        np.zeros((1, 8), f32), np.zeros((1, 8), f32), np.zeros((1, 8), f32), 0, 1, True, 1.0),
    "attention: negative heads": lambda: ops.attention(
        np.zeros((1, 8), f32), np.zeros((1, 8), f32), np.zeros((1, 8), f32), -1, 1, True, 1.0),
    "attention: q width": lambda: ops.attention(
        np.zeros((1, 9), f32), np.zeros((1, 8), f32), np.zeros((1, 8), f32), 2, 2, True, 1.0),
    "attention: k width": lambda: ops.attention(
        np.zeros((1, 16), f32), np.zeros((1, 12), f32), np.zeros((1, 12), f32), 2, 1, True, 1.0),
    "attention: v shape": lambda: ops.attention(
        np.zeros((1, 16), f32), np.zeros((3, 8), f32), np.zeros((2, 8), f32), 2, 1, True, 1.0),
    "attention: fewer keys than queries": lambda: ops.attention(
        np.zeros((4, 16), f32), np.zeros((3, 16), f32), np.zeros((3, 16), f32), 2, 2, True, 1.0),
    "attention: 1-D q": lambda: ops.attention(
        np.zeros(16, f32), np.zeros((3, 16), f32), np.zeros((3, 16), f32), 2, 2, True, 1.0),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_inputs_raise_value_error(name):
    with pytest.raises(ValueError):
        BAD_CALLS[name]()


def test_non_numeric_inputs_raise():
    with pytest.raises((TypeError, ValueError)):
        ops.linear([["a"]], np.zeros((1, 1), f32))
    with pytest.raises(TypeError):
        ops.activation(np.zeros(3, f32), 3)
    with pytest.raises(TypeError):  # weights are float32, float16 or bfloat16 bits, nothing else
        ops.linear(np.zeros((2, 8), f32), np.zeros((4, 8), np.int32))


def test_degenerate_shapes_do_not_crash():
    """Empty dimensions and very wide heads, run in a child process so that a crash shows up as a
    failure here instead of taking the test run down."""
    script = textwrap.dedent("""
        import numpy as np
        from pyxf._core import ops, info, set_isa
        f = np.float32
        for isa in info()["isas"]:
            set_isa(isa)
            assert ops.linear(np.zeros((0, 8), f), np.ones((4, 8), f)).shape == (0, 4)
            assert ops.linear(np.ones((3, 8), f), np.ones((0, 8), f)).shape == (3, 0)
            ops.linear(np.ones((20, 0), f), np.ones((4, 0), f))
            assert ops.rmsnorm(np.zeros((2, 0), f), np.zeros(0, f), 1e-5).shape == (2, 0)
            assert ops.softmax(np.zeros((2, 0), f)).shape == (2, 0)
            assert ops.softmax(np.zeros((0, 5), f)).shape == (0, 5)
            assert ops.gated_activation(np.zeros((2, 0), f), "silu").shape == (2, 0)
            assert ops.activation(np.zeros(0, f), "gelu").shape == (0,)
            q = np.zeros((0, 8), f)
            assert ops.attention(q, q, q, 1, 1, True, 1.0).shape == (0, 8)
            for d in (1024, 4096):  # wider than any tile
                rng = np.random.default_rng(d)
                q, k, v = (rng.standard_normal((2, d)).astype(f) for _ in range(3))
                y = ops.attention(q, k, v, 1, 1, True, 0.01)
                assert np.allclose(y[0], v[0], atol=1e-6)
                s = (q[1] @ k.T) * 0.01
                p = np.exp(s - s.max()); p /= p.sum()
                assert np.allclose(y[1], p @ v, atol=1e-4)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          **child_process_options())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
        f"exit status {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("m", [3, 20], ids=["small_m", "packed"])
def test_linear_with_empty_inner_dimension(isa, m):
    """K = 0: an empty sum, so y is the bias (or zeros), on both GEMM paths; or a ValueError."""
    bias = np.arange(4, dtype=f32)
    try:
        with_bias = ops.linear(np.ones((m, 0), f32), np.ones((4, 0), f32), bias)
        without = ops.linear(np.ones((m, 0), f32), np.ones((4, 0), f32))
    except ValueError:
        return
    np.testing.assert_array_equal(with_bias, np.broadcast_to(bias, (m, 4)))
    np.testing.assert_array_equal(without, np.zeros((m, 4)))
