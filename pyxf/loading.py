"""pyxf.load: a converted model directory -> the model object of its architecture."""

from pathlib import Path

from pyxf.config import read_config
from pyxf.kv_cache import check_kv_cache_dtype
from pyxf.model import load_model
from pyxf.seq2seq import load_seq2seq
from pyxf.threads import check_num_threads, core
from pyxf.weights import SAFETENSORS_DTYPES, check_huge_pages

DTYPES = tuple(SAFETENSORS_DTYPES)  # what dtype= may ask for

# config.json "architecture" -> (path, config, context_length, quantize, quantize_embeddings, dtype,
# kv_cache_dtype) -> model
LOADERS = {"decoder": load_model, "encoder": load_model, "encoder-decoder": load_seq2seq}


def load(path=None, context_length=None, threads=None, quantize=None, quantize_embeddings=True, revision=None,
         dtype=None, kv_cache_dtype=None, huge_pages=True):
    """Loads a model; with no path, the default model (downloaded on first use).

    path: a converted model directory; a GGUF file or a Hugging Face hub id ("org/name", at `revision`:
    a branch, tag or commit; default "main"), converted on first use into pyxf's cache and loaded from
    there afterwards (pyxf.sources).

    context_length: the longest sequence (prompt + generated tokens) the model will be asked to handle;
    default max_position_embeddings (a sliding window's length, or a LongRoPE model's pretraining
    context: a longer context_length gives it its long-context factors; docs/DESIGN.md). threads: sets the process-wide thread count (pyxf.set_num_threads).
    quantize: a format ("int8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k") or one
    of llama.cpp's mixes ("q4_k_m", "q5_k_m") quantizes a float model's weights in memory at load, the
    tensors `pyxf convert --quantize` would (pyxf.quant_mix; quantize_embeddings=False: embed.weight
    stays float). dtype: "bfloat16" | "float16" | "float32" stores the model's float tensors in that
    type in memory (cast at load; None: as the file has them). bfloat16 halves float32's bytes and,
    on CPUs with AVX512_BF16, multiplies on vdpbf16ps (`pyxf convert --dtype bfloat16` stores it so).
    kv_cache_dtype: "float32" | "float16", the element type of a decoder's KV caches; None: the
    weights' precision, float32 for a float32 model and float16 for a 16-bit or quantized one
    (pyxf.kv_cache). float16 halves the caches' memory and the bytes attention reads per token.
    huge_pages: True copies the file's matrices that every call reads whole (those not packed into
    panels) into memory on 2 MiB pages at load, where the kernel offers transparent huge pages
    (fewer TLB misses: SmolLM2 decode 6-24% faster, docs/DESIGN.md "Weights in memory"), and
    repacks a decoder's q8_0 / q4_0 / q4_1 / q5_0 / q4_k / q6_k matrices for the decode kernels
    (AVX-512: 12-30% faster decoding on an Intel Xeon); False reads them as stored from the
    memory-mapped file on 4 KiB pages, shared with other processes that map it.

    Every model it returns has generate() (decoders and encoder-decoders: text out) or encode()
    (encoders: embeddings out); see pyxf.Model and pyxf.Seq2SeqModel.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    check_kv_cache_dtype(kv_cache_dtype)
    check_huge_pages(huge_pages)
    if path is None:
        from pyxf.hub import default_model_path

        if revision is not None:
            raise ValueError("revision= needs a hub id (pyxf.load('org/name', revision=...))")
        path = default_model_path()
    else:
        from pyxf.sources import model_directory

        path = model_directory(path, revision)
    path = Path(path)
    config = read_config(path)
    if threads is not None:
        core().set_num_threads(check_num_threads(threads))
    loader = LOADERS[config.get("architecture", "decoder")]
    return loader(path, config, context_length=context_length, quantize=quantize,
                  quantize_embeddings=quantize_embeddings, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                  huge_pages=huge_pages)
