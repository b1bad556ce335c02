"""Biases on attention scores by relative position (T5, MPNet), made at load from a checkpoint's
table by bucket: transformers' bucketing of relative positions, and the table by relative position
the core adds to the scores (AttentionShape.pos_bias)."""

import math

import numpy as np


def relative_position_buckets(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucket of each relative position (key - query), in float32 as transformers computes it."""
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (
        np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


def relative_bias_table(weight, bidirectional, num_buckets, max_distance):
    """[heads, 2 R + 1] bias by relative position -R .. R (R = max_distance), from T5's
    relative_attention_bias weight [num_buckets, heads]: beyond R the bucket no longer changes, so
    the kernel clamps the relative position to [-R, R]."""
    R = max_distance
    buckets = relative_position_buckets(np.arange(-R, R + 1), bidirectional, num_buckets, max_distance)
    return np.ascontiguousarray(np.asarray(weight, dtype=np.float32)[buckets].T)
