"""Planning a conversion: which source tensors make which pyxf tensor (a family's `TensorTable`
expanded over the layers), their shapes without loading anything, and building them (the named
transforms applied, the parts concatenated)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .schema import Planned, Rule, Source, TensorTable

# ---------------------------------------------------------------------------------------------
# transforms: (array, normalized config) -> array, with a matching shape function


def _undo_gguf_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows of each head interleaved for its pairwise RoPE: HF row
    h*D + s*D/2 + j (s = half, j < D/2) sits at GGUF row h*D + 2*j + s. Put rows back."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Transform:
    apply: Callable[[np.ndarray, dict], np.ndarray]
    shape: Callable[[tuple, dict], tuple]
    # Whether it only moves values (so that it applies to bfloat16 bits as well); False: arithmetic
    # on float32 values.
    moves_only: bool = True


TRANSFORMS: dict[str, Transform] = {
    # GPT-2's Conv1D stores weights [in, out]; pyxf wants nn.Linear's [out, in].
    "transpose": Transform(lambda a, cfg: a.T, lambda s, cfg: tuple(reversed(s))),
    "unpermute_q": Transform(lambda a, cfg: _undo_gguf_rope_permutation(a, cfg["num_heads"]), lambda s, cfg: s),
    "unpermute_k": Transform(lambda a, cfg: _undo_gguf_rope_permutation(a, cfg["num_kv_heads"]), lambda s, cfg: s),
    # torch's nn.MultiheadAttention in_proj (q, k, v rows): cross-attention takes q apart from k, v.
    "rows_q": Transform(lambda a, cfg: a[: a.shape[0] // 3], lambda s, cfg: (s[0] // 3, *s[1:])),
    "rows_kv": Transform(lambda a, cfg: a[a.shape[0] // 3 :], lambda s, cfg: (s[0] - s[0] // 3, *s[1:])),
    # Marian's final_logits_bias [1, V] -> [V]
    "flatten": Transform(lambda a, cfg: a.reshape(-1), lambda s, cfg: (int(np.prod(s)),)),
    # a vector as a matrix of one row (llama.cpp may store Qwen2-MoE's shared expert gate [H])
    "one_row": Transform(lambda a, cfg: a.reshape(1, -1), lambda s, cfg: (1, int(np.prod(s)))),
    # Gemma's RMSNorm scales by (1 + w): folded into the stored weight, in float32 as transformers
    # computes it (exact for a float32 output).
    "plus_one": Transform(lambda a, cfg: a + np.float32(1.0), lambda s, cfg: s, moves_only=False),
}


def moves_only(p: Planned) -> bool:
    """Whether building `p` only moves its sources' values (no arithmetic on them)."""
    return all(s.transform is None or TRANSFORMS[s.transform].moves_only for s in p.sources)



def _expand(r: Rule, i: int | None) -> Planned:
    fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
    return Planned(fmt(r.target), tuple(Source(fmt(s.name), s.transform) for s in r.sources), r.optional,
                   r.experts)


def _required_sources(rules: tuple[Rule, ...]) -> int:
    return len({s.name for r in rules if not r.optional for s in r.sources})


def _check_layer_counts(table: TensorTable, layers, encoder_layers, available: int) -> None:
    """The layer counts a config claims, against the tensors the checkpoint has, before any work
    proportional to them (a config.json claiming 2**31 layers must not make us list them). Up to
    twice the tensors present are accepted here, so that a checkpoint missing some gets a message
    naming them."""
    for what, count in (("num_layers", layers), ("num_encoder_layers", encoder_layers)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {count!r}")
    needed = layers * _required_sources(table.layer_rules) + encoder_layers * _required_sources(
        table.encoder_layer_rules
    )
    if needed > 2 * available + 64:  # up to twice as many are listed: missing ones are then named
        raise ValueError(
            f"the config describes {layers} layers" + (f" and {encoder_layers} encoder layers" if encoder_layers else "")
            + f", at least {needed} source tensors, but the checkpoint has {available}"
        )


def plan_tensors(table: TensorTable, source_names, config: dict) -> tuple[list[Planned], list[str]]:
    """The pyxf tensors to build, in output order, and the source names nobody uses.

    `source_names` are the names after prefix stripping. Raises ValueError listing every missing
    required source tensor (an optional rule whose sources are all absent is skipped).
    """
    available = set(source_names)
    encoder_layers = config.get("num_encoder_layers", 0) if table.encoder_layer_rules else 0
    _check_layer_counts(table, config["num_layers"], encoder_layers, len(available))
    rules = [_expand(r, None) for r in table.global_rules]
    for i in range(encoder_layers):
        rules += [_expand(r, i) for r in table.encoder_layer_rules]
    for i in range(config["num_layers"]):
        rules += [_expand(r, i) for r in table.layer_rules]
    if table.lm_head is not None and not config["tie_word_embeddings"]:
        rules.append(_expand(table.lm_head, None))

    planned, missing = [], []
    for r in rules:
        absent = [s.name for s in r.sources if s.name not in available]
        if not absent:
            planned.append(r)
        elif not r.optional or len(absent) < len(r.sources):
            missing += absent
    if missing:
        raise ValueError(f"missing source tensors ({len(missing)}): {', '.join(missing)}")

    used = {s.name for r in planned for s in r.sources}
    if config["tie_word_embeddings"] and table.lm_head is not None:
        used |= {s.name for s in table.lm_head.sources}  # a saved copy of the tied head
    unused = [n for n in source_names if n not in used and not any(n.endswith(suf) for suf in table.ignore_suffixes)]
    return planned, unused


def planned_shape(p: Planned, shapes: dict[str, tuple], config: dict) -> tuple:
    """Shape of the built tensor from its sources' shapes, without loading anything."""
    parts = []
    for s in p.sources:
        shape = tuple(shapes[s.name])
        parts.append(TRANSFORMS[s.transform].shape(shape, config) if s.transform else shape)
    if p.experts:
        return _expert_stack_shape(p, parts)
    if len(parts) == 1:
        return parts[0]
    if any(len(sh) != len(parts[0]) or sh[1:] != parts[0][1:] for sh in parts):
        raise ValueError(f"cannot concatenate {[s.name for s in p.sources]} with shapes {parts} into {p.target}")
    return (sum(sh[0] for sh in parts), *parts[0][1:])


def _expert_stack_shape(p: Planned, parts: list[tuple]) -> tuple:
    """[E * rows, cols] of expert stacks [E, rows_k, cols] joined expert by expert."""
    if any(len(sh) != 3 or sh[0] != parts[0][0] or sh[2] != parts[0][2] for sh in parts):
        raise ValueError(f"cannot join the expert stacks {[s.name for s in p.sources]} with shapes {parts} "
                         f"into {p.target} (each [experts, rows, columns], the same experts and columns)")
    return (parts[0][0] * sum(sh[1] for sh in parts), parts[0][2])


def build_tensor(p: Planned, load: Callable[[str], np.ndarray], config: dict) -> np.ndarray:
    """Load, transform and concatenate the sources of one pyxf tensor (float32; or whatever `load`
    gives: bfloat16 bits, GGUF block rows)."""
    parts = []
    for s in p.sources:
        array = load(s.name)
        parts.append(TRANSFORMS[s.transform].apply(array, config) if s.transform else array)
    if p.experts:  # [E, rows_k, cols] each: expert e's rows of every source, then e + 1's
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return joined.reshape(-1, joined.shape[2])
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
