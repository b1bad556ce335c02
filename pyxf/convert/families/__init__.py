"""The converter's family registry: every family declaration (one module each, importing only
pyxf/convert/schema.py and the shared tokenizer writers) by name, and the lookups by Hugging Face
config and GGUF architecture. Adding a family adds its module here (docs/DESIGN.md, "Adding a
family")."""

from __future__ import annotations

from ..schema import Family, TensorTable
from . import bert, gemma, gpt2, llama, phi3, seq2seq

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (llama.FAMILY, phi3.FAMILY, gemma.FAMILY, gpt2.FAMILY, bert.BERT, bert.ROBERTA, bert.DISTILBERT,
              bert.MPNET, bert.MODERNBERT, seq2seq.TRANSFORMER, seq2seq.MARIAN, seq2seq.T5, seq2seq.BART,
              seq2seq.MBART, seq2seq.M2M100)
}


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.hf_architectures)


def family_for_hf_config(hf: dict) -> Family:
    """The family for an HF config.json dict, by "architectures" (or "model_type")."""
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"'architectures' must be a list of class names, got {str(architectures)[:80]}")
    if not isinstance(hf.get("model_type", ""), (str, type(None))):
        raise ValueError(f"'model_type' must be a string, got {str(hf['model_type'])[:80]}")
    for family in FAMILIES.values():
        if any(a in family.hf_architectures for a in architectures):
            return family
    if not architectures:
        for family in FAMILIES.values():
            if hf.get("model_type") in family.hf_model_types:
                return family
    named = architectures or [hf.get("model_type")]
    raise ValueError(
        f"unsupported architecture {', '.join(map(str, named))}; supported: {', '.join(supported_architectures())}"
    )


def family_for_gguf(arch: str) -> tuple[Family, TensorTable]:
    for family in FAMILIES.values():
        if arch in family.gguf:
            return family, family.gguf[arch]
    supported = sorted(a for f in FAMILIES.values() for a in f.gguf)
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported)}")


def normalized_config(hf: dict) -> dict:
    """pyxf's config.json content (without dtype/source/tokenizer details) from an HF config dict."""
    family = family_for_hf_config(hf)
    try:
        config = family.hf_config(hf)
    except KeyError as e:
        raise ValueError(f"config lacks {e.args[0]!r}, needed for a {family.name} model") from None
    except (TypeError, ArithmeticError, AttributeError, IndexError) as e:  # a value of the wrong kind
        raise ValueError(f"config has a value pyxf cannot use for a {family.name} model: "
                         f"{type(e).__name__}: {e}") from None
    return {"format": "pyxf", "format_version": 1, **config}
