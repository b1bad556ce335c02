"""The element type of a decoder's KV caches, chosen at load (pyxf.load(kv_cache_dtype=...)).

By default a cache keeps the precision of the weights: float32 for a float32 model, float16 (IEEE
half, as llama.cpp's default cache) for a model whose weights are 16-bit or quantized. Rounding keys
and values to 11 significant bits moves logits far less than 16-bit or quantized weights already
move them (SmolLM2: at most 0.026, against 0.35 for bf16 and 1.4 for Q8_0 weights), and halves the
cache's memory and the bytes attention reads per token."""

KV_CACHE_DTYPES = ("float32", "float16")


def default_kv_cache_dtype(config):
    """float32 for a float32 model, float16 for one stored (or cast at load) in 16 bits or quantized."""
    quantized = bool((config.get("quantization") or {}).get("tensors"))
    return "float32" if config.get("dtype", "float32") == "float32" and not quantized else "float16"


def check_kv_cache_dtype(kv_cache_dtype):
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} or None, got {kv_cache_dtype!r}")


def kv_cache_config(config, kv_cache_dtype):
    """The core config's entry for a model of this config: encoders keep no cache, so asking for a
    cache type there is an error rather than a setting that does nothing."""
    if config.get("architecture") == "encoder":
        if kv_cache_dtype is not None:
            raise ValueError("kv_cache_dtype applies to decoders: an encoder keeps no KV cache")
        return {}
    return {"kv_cache_dtype": kv_cache_dtype or default_kv_cache_dtype(config)}
