"""RoPE frequencies from a pyxf config, following Hugging Face `transformers.modeling_rope_utils`.

The core only needs `inv_freq` (one float per rotated pair) and a scale applied to cos/sin, so every
scaling scheme is reduced to those two numbers here, once, at load time.
"""

import math

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type(config):
    scaling = config.get("rope_scaling") or {}
    # Older HF configs spell it "type"; transformers v5 adds rope_type="default" explicitly.
    return scaling.get("rope_type", scaling.get("type", "default"))


# The core rotates at most this many dimensions per head.
MAX_ROTARY_DIM = 1024


def longrope_original_context(config):
    """The pretraining context of a LongRoPE model (its short factors hold up to it, the long ones
    beyond), or None when the model does not use LongRoPE."""
    if rope_type(config) != "longrope":
        return None
    original = config["rope_scaling"].get("original_max_position_embeddings")
    if original is None:
        return config["max_position_embeddings"]
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ValueError(f"rope_scaling's original_max_position_embeddings must be a positive integer, got {original!r}")
    return original


def rope_parameters(config, context_length=None):
    """Returns (inv_freq float32 [rotary_dim // 2], attention_scaling float) for `config`, for
    sequences of up to `context_length` positions (None: the model's pretraining context), which
    only LongRoPE reads: its long factors serve a context beyond original_max_position_embeddings.
    ValueError when rope_scaling lacks a field its type needs or holds one of the wrong kind."""
    scaling = config.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    kind = rope_type(config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    try:
        inv_freq, attention_scaling = _rope_parameters(config, scaling, kind, context_length)
    except KeyError as e:
        raise ValueError(f"rope_scaling of type {kind} lacks {e.args[0]!r}: {scaling!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"rope_scaling {scaling!r} (rope_theta {config.get('rope_theta')!r}) is malformed: "
                         f"{type(e).__name__}: {e}") from None
    if inv_freq.size == 0 or not np.isfinite(inv_freq).all() or not math.isfinite(attention_scaling):
        raise ValueError(f"rope_scaling {scaling!r} and rope_theta {config.get('rope_theta')!r} give no finite "
                         "rotation frequencies")
    return inv_freq, attention_scaling


def rope_tables(config, context_length=None):
    """What the core reads for RoPE: every layer's frequencies and scale (for `context_length`, as
    rope_parameters), and the local layers' own frequencies when they have a base of their own
    (ModernBERT's and Gemma 3's rope_local_theta, unscaled)."""
    inv_freq, scaling = rope_parameters(config, context_length)
    tables = {"rope_inv_freq": inv_freq, "rope_attention_scaling": scaling}
    if config.get("rope_local_theta") is not None:
        local = {**config, "rope_theta": config["rope_local_theta"], "rope_scaling": None}
        tables["rope_local_inv_freq"], _ = rope_parameters(local)
    return tables


def _rope_parameters(config, scaling, kind, context_length):
    base = float(config.get("rope_theta") or scaling.get("rope_theta") or 10000.0)
    partial = config.get("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0)) or 1.0
    dim = int(config["head_dim"] * partial)
    if not 0 < dim <= MAX_ROTARY_DIM:
        raise ValueError(f"{dim} rotary dimensions per head; pyxf supports 1 to {MAX_ROTARY_DIM}")
    max_positions = config["max_position_embeddings"]
    original_max_positions = scaling.get("original_max_position_embeddings") or max_positions

    # float32 like transformers (exponent and reciprocal in float32, the power rounded from float64):
    # an ulp of difference here grows into a visible angle error over thousands of positions.
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    powers = (base ** exponents.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / powers
    attention_scaling = 1.0

    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "dynamic":
        # NTK scaling only changes the base for sequences longer than max_position_embeddings; at load
        # (seq_len <= max) HF's formula reduces to the default frequencies.
        pass
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling, original_max_positions)
    elif kind == "yarn":
        inv_freq, attention_scaling = _yarn(inv_freq, base, dim, scaling, max_positions, original_max_positions)
    elif kind == "longrope":
        long_context = context_length is not None and context_length > original_max_positions
        inv_freq, attention_scaling = _longrope(powers, scaling, max_positions, original_max_positions, long_context)
    return np.ascontiguousarray(inv_freq, dtype=np.float32), float(attention_scaling)


def _llama3_inv_freq(inv_freq, scaling, original_max_positions):
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor

    # Written as torch evaluates it (`scalar / tensor` is reciprocal(tensor) * scalar, in float32).
    f32 = np.float32
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended smoothly.
    scaled = np.where(wavelen > f32(low_freq_wavelen), inv_freq / f32(factor), inv_freq)
    smooth = ((f32(1) / wavelen) * f32(original_max_positions) - f32(low_freq_factor)) / f32(
        high_freq_factor - low_freq_factor
    )
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    is_medium = (wavelen >= f32(high_freq_wavelen)) & (wavelen <= f32(low_freq_wavelen))
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(inv_freq, base, dim, scaling, max_positions, original_max_positions):
    factor = scaling.get("factor")
    if factor is None:
        factor = max_positions / original_max_positions

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_scaling = scaling.get("attention_factor")
    if attention_scaling is None:
        m, m_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_scaling = mscale(factor, m) / mscale(factor, m_all_dim) if m and m_all_dim else mscale(factor)

    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return dim * math.log(original_max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1.0 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, attention_scaling


def _longrope(powers, scaling, max_positions, original_max_positions, long_context):
    """LongRoPE (Phi-3): each frequency divided by its own factor, the short factors for sequences
    within original_max_position_embeddings, the long ones beyond; cos and sin scaled by the
    attention factor either way. transformers picks the factors per forward pass by the longest
    position in it; pyxf's tables are fixed at load, so the context the model is loaded for picks
    them (as llama.cpp's n_ctx does): docs/DESIGN.md, "LongRoPE"."""
    factor = scaling.get("factor")
    if factor is None:
        factor = max_positions / original_max_positions
    attention_scaling = scaling.get("attention_factor")
    if attention_scaling is None:
        attention_scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max_positions))
    factors = {}
    for key in ("short_factor", "long_factor"):  # both checked, whichever this context uses
        factors[key] = np.asarray(scaling[key], dtype=np.float32)
        if factors[key].shape != powers.shape:
            raise ValueError(f"{key} must list {powers.size} numbers (one per rotated pair), got {factors[key].size}")
    chosen = factors["long_factor" if long_context else "short_factor"]
    # As transformers: 1 / (factor * base ** (2i / dim)), in float32.
    return np.float32(1.0) / (chosen * powers), attention_scaling
