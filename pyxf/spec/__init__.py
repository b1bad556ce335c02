"""One declaration per model architecture (docs/DESIGN.md, "Model specs"): the config fields and
every tensor (name, shape from the config, required or optional, quantizable, who reads it). The
loader's validation (pyxf.spec.validate), the converter's shape checks, the quantizer and the
tests of the core's bindings all read these; nothing else lists tensors.

    from pyxf import spec
    spec.tensor_layout(config).enumerate(max_tensors)   # {name: (shape, required)} of model.safetensors
    spec.core_layout(config)                            # the tensors the C++ core binds
"""

from .decoder import DECODER
from .encoder import ENCODER
from .encoder_decoder import ENCODER_DECODER
from .schema import CORE, EMBEDDING, PYTHON, Architecture, Field, Tensor, TensorLayout

__all__ = [
    "ARCHITECTURES", "FAMILIES", "Architecture", "Field", "Tensor", "TensorLayout", "architecture", "core_layout",
    "quantizable_name", "tensor_layout", "CORE", "PYTHON", "EMBEDDING",
]

ARCHITECTURES = {a.name: a for a in (DECODER, ENCODER, ENCODER_DECODER)}
# config.json "family" -> its architecture
FAMILIES = {family: a for a in ARCHITECTURES.values() for family in a.families}


def architecture(config):
    """The Architecture of a config (config.json "architecture", default decoder)."""
    name = config.get("architecture", "decoder")
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def tensor_layout(config):
    """The TensorLayout of every tensor model.safetensors may hold for a (checked) config."""
    return architecture(config).layout(config)


def core_layout(config):
    """The TensorLayout of every tensor the core binds for a config: its stored tensors and the
    tables made at load, not the heads Python applies."""
    return architecture(config).layout(config, stored=None)


def _quantizable_names():
    """{fixed name: kind} and {(stack prefix, suffix): kind} of the tensors that may be quantized."""
    fixed, stacked = {}, {}
    for arch in ARCHITECTURES.values():
        fixed.update({t.name: t.quantizable for t in arch.tensors if t.quantizable})
        for stack in arch.stacks:
            stacked.update({(stack.prefix, t.name): t.quantizable for t in stack.tensors if t.quantizable})
    return fixed, stacked


_QUANTIZABLE_FIXED, _QUANTIZABLE_STACKED = _quantizable_names()


def quantizable_name(name):
    """Whether some architecture declares tensor `name` quantizable: True for linear weights,
    EMBEDDING for token embeddings, False otherwise (without a config: by name alone)."""
    if name in _QUANTIZABLE_FIXED:
        return _QUANTIZABLE_FIXED[name]
    for (prefix, suffix), kind in _QUANTIZABLE_STACKED.items():
        if name.startswith(prefix) and name.endswith("." + suffix):
            index = name[len(prefix):-len(suffix) - 1]
            if index.isdigit() and index == str(int(index)):
                return kind
    return False
