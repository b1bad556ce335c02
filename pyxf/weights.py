"""model.safetensors checked against the model spec (pyxf.spec): names, shapes, dtypes, and the
quantized tensors config.json declares."""

import numpy as np

from pyxf import quant, quant_mix
from pyxf.spec import tensor_layout
from pyxf.tensorfile import bf16_to_float32, float32_to_bf16

# How each config dtype is stored in safetensors. numpy has no bfloat16: such tensors are read as
# uint16 bit patterns, and the core widens half types at load.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def quantized_layout(config):
    """{name: (shape, safetensors dtype)} of the quantized tensors config.json declares, with the
    per-row scales of int8 ones (NAME_scale)."""
    formats = (config.get("quantization") or {}).get("tensors") or {}
    expected = tensor_layout(config)
    layout = {}
    for name, stored_as in formats.items():
        shape = expected.lookup(name)[0]
        layout[name] = (quant.stored_shape(stored_as, shape), quant.stored_dtype(stored_as))
        if stored_as == "int8":
            layout[quant.scale_name(name)] = ((shape[0],), "F32")
    return layout


def has_tied_head(config):
    """Whether embed.weight is also the output projection (a decoder with tied embeddings)."""
    return config.get("architecture", "decoder") == "decoder" and bool(config.get("tie_word_embeddings"))


def expected_tensors(config, max_tensors):
    """{name: (shape, required)} for every tensor a model with `config` may have (DESIGN.md);
    ValueError when that is more than the `max_tensors` the weight file holds."""
    return tensor_layout(config).enumerate(max_tensors)


def check_weights(config, tensors):
    """Checks names, shapes, dtypes and layout of `tensors` (from read_safetensors) against the
    config; returns the arrays for the core (no copies)."""
    expected = expected_tensors(config, max_tensors=len(tensors))
    quantized = quantized_layout(config)
    expected.update({name: (shape, True) for name, (shape, _) in quantized.items()})
    missing = [name for name, (_, required) in expected.items() if required and name not in tensors]
    unknown = [name for name in tensors if name not in expected]
    if missing:
        raise ValueError(f"model.safetensors lacks {len(missing)} expected tensor(s): {_some(missing)}")
    if unknown:
        raise ValueError(f"model.safetensors has {len(unknown)} tensor(s) unknown for this config: {_some(unknown)}")

    wanted_dtype = SAFETENSORS_DTYPES[config["dtype"]]
    for name, array in tensors.items():
        shape = expected[name][0]
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name} has shape {list(array.shape)}, expected {list(shape)}")
        if name in quantized:
            if tensors.dtypes[name] != quantized[name][1]:
                raise ValueError(
                    f"tensor {name} is stored as {tensors.dtypes[name]}, expected {quantized[name][1]} "
                    "(config.json lists it as quantized)"
                )
        elif tensors.dtypes[name] != wanted_dtype:
            raise ValueError(
                f"tensor {name} is stored as {tensors.dtypes[name]}, expected {wanted_dtype} "
                f"(config.json says dtype {config['dtype']})"
            )
        if not array.flags.c_contiguous:
            raise ValueError(f"tensor {name} is not C-contiguous")
    return dict(tensors)


def _some(names, limit=8):
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def cast_weights(config, weights, dtype):
    """The model's float tensors in `dtype` (float32 | float16 | bfloat16), made in memory; quantized
    tensors and their scales stay as they are. Returns the config (its "dtype" updated) and the new
    {name: array}."""
    if dtype == config["dtype"]:
        return config, weights
    quantized = quantized_layout(config)
    cast = {}
    for name, array in weights.items():
        if name in quantized:
            cast[name] = array
            continue
        floats = bf16_to_float32(array) if config["dtype"] == "bfloat16" else np.asarray(array, dtype=np.float32)
        if dtype == "bfloat16":
            cast[name] = float32_to_bf16(floats)
        elif dtype == "float16":
            with np.errstate(over="ignore"):
                cast[name] = floats.astype(np.float16)
            if not np.isfinite(cast[name]).all() and np.isfinite(floats).all():
                raise ValueError(f"tensor {name} has values beyond float16's range; use dtype='bfloat16'")
        else:
            cast[name] = np.ascontiguousarray(floats)
    return {**config, "dtype": dtype}, cast


def quantize_weights(config, weights, method, embeddings=True):
    """Quantizes a float model's weights in memory, the tensors `pyxf convert --quantize` would, in
    the formats `method` (a format or a mix) gives them (pyxf.quant_mix.tensor_spec); returns the
    config with its "quantization" entry and the new {name: array} (the float arrays of the
    quantized tensors are no longer referenced)."""
    quant_mix.check_method(method)
    if config.get("quantization"):
        raise ValueError(
            f"this model is already quantized ({config['quantization'].get('method')}); "
            "quantize= applies to models stored as floats"
        )
    weights, formats, tied = dict(weights), {}, has_tied_head(config)
    for name, array in list(weights.items()):
        fmt = quant_mix.tensor_spec(name, array.shape, config, method, tied, embeddings)
        if fmt is None:
            continue
        floats = bf16_to_float32(array) if config["dtype"] == "bfloat16" else array
        data, scales = quant.quantize_as(floats, fmt)
        weights[name] = data
        if scales is not None:
            weights[quant.scale_name(name)] = scales
        formats[name] = fmt
    config = dict(config)
    config["quantization"] = {"method": method, "tensors": formats}
    return config, weights


def core_config_of(config, huge_pages=False, share_file_pages=False):
    """The config the core reads: config.json's, with each quantized tensor's format, and
    "huge_pages": copy the matrices every call reads whole onto transparent huge pages at load
    (docs/DESIGN.md, "Weights in memory"; pyxf.load's huge_pages); "share_file_pages": a decoder's
    quantized matrices stay as stored, not repacked for the decode kernels, so that processes
    mapping the file share its pages (pyxf.load(huge_pages=False))."""
    core_config = dict(config)
    formats = (config.get("quantization") or {}).get("tensors")
    if formats:
        core_config["tensor_formats"] = dict(formats)
    core_config["huge_pages"] = bool(huge_pages)
    core_config["share_file_pages"] = bool(share_file_pages)
    return core_config


def check_huge_pages(huge_pages):
    if not isinstance(huge_pages, bool):
        raise TypeError(f"huge_pages must be True or False, got {huge_pages!r}")


def copies_onto_huge_pages(huge_pages, config, quantize, dtype):
    """Whether the core copies the file's matrices onto huge pages: asked for, a model that decodes
    token by token (an encoder runs batches of rows, whose GEMMs do not wait on page walks, and
    processes serving one encoder keep sharing its file's pages), and the matrices are the mapped
    file's. Matrices converted at load (quantize=, a dtype other than the file's) are already this
    process's memory: a copy would double it, so they stay where numpy made them."""
    return (bool(huge_pages) and config.get("architecture") != "encoder" and quantize is None
            and dtype in (None, config["dtype"]))
