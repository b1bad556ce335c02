"""The model specs (pyxf/spec) against the C++ core: for every family, the tensors the core binds
(names, shapes, required or optional; recorded by its WeightBinder) are exactly the core tensors
the spec lists; and the spec's layout drives the loader, the converter and the quantizer."""

import numpy as np
import pytest

import pyxf
from pyxf import quant, quant_mix, spec
from pyxf.convert import expected_shape

from tiny_files import write_pyxf_encoder, write_pyxf_model, write_pyxf_seq2seq

# One config per family and per variant that changes which tensors exist.
DECODERS = {
    "llama tied": dict(),
    "llama untied": dict(tie_word_embeddings=False),
    "llama mqa": dict(num_heads=4, num_kv_heads=1, head_dim=6),
    "llama qk_norm": dict(qk_norm=True),
    "phi3": dict(family="phi3", partial_rotary_factor=0.75),
    "llama experts": dict(num_experts=3, num_experts_per_tok=2, norm_topk_prob=True, qk_norm=True),
    "llama experts shared": dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=24,
                                 qk_norm=True, qk_norm_span="projection", tie_word_embeddings=False),
    # Gemma 2: sandwich norms (attn_post_norm, ffn_post_norm), soft caps, every 2nd layer global.
    "gemma2": dict(family="gemma", norm_position="sandwich", activation="gelu_tanh", num_layers=3,
                   embed_scale=4.0, attention_scale=0.25, attention_softcap=50.0, logit_softcap=30.0,
                   sliding_window=4, sliding_window_pattern=2),
    # Gemma 3: and per-head q/k norms, the local layers' own RoPE base.
    "gemma3": dict(family="gemma", norm_position="sandwich", activation="gelu_tanh", qk_norm=True,
                   sliding_window=4, sliding_window_pattern=6, rope_local_theta=10000.0, rope_theta=1e6),
    "gpt2": dict(family="gpt2", norm="layernorm", activation="gelu_tanh", gated_ffn=False, position="learned"),
}
ENCODERS = {
    "bert": dict(family="bert", type_vocab_size=2, pooler=True,
                 classifier={"kind": "bert", "num_labels": 3, "id2label": ["a", "b", "c"]}),
    "roberta": dict(family="roberta", position_offset=2, type_vocab_size=1,
                    classifier={"kind": "roberta", "num_labels": 2, "id2label": ["x", "y"]}),
    "distilbert": dict(family="distilbert", classifier={"kind": "distilbert", "num_labels": 2, "id2label": ["x", "y"]}),
    "mpnet": dict(family="mpnet", position_offset=2, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, classifier={"kind": "roberta", "num_labels": 2}),
    "modernbert": dict(family="modernbert", norm_position="pre", position="rope", gated_ffn=True, norm_bias=False,
                       first_attn_norm=False, rope_theta=160000.0, rope_local_theta=10000.0,
                       sliding_window=5, sliding_window_pattern=3, global_layer_phase=0,
                       classifier={"kind": "modernbert", "num_labels": 2, "pooling": "mean", "activation": "gelu"}),
    # A decoder used as an encoder (Qwen3-Embedding): causal, RoPE, q/k norms, last-token pooling.
    "qwen3 embedding": dict(family="llama", causal=True, norm="rmsnorm", norm_position="pre", activation="silu",
                            gated_ffn=True, position="rope", qk_norm=True, pooling={"mode": "lasttoken", "normalize": True},
                            prompts={"query": "Instruct: find\nQuery:"}),
}
SEQ2SEQ = {
    "transformer": dict(),
    "marian": dict(family="marian", shared_embeddings=False, source_vocab_size=40, sinusoidal_layout="concat",
                   tie_word_embeddings=True, max_position_embeddings=64),
    "t5": dict(family="t5", norm="rmsnorm", norm_position="pre", position="relative", gated_ffn=True,
               activation="gelu_tanh", relative_attention_num_buckets=8, relative_attention_max_distance=20,
               max_position_embeddings=64, tie_word_embeddings=False, num_encoder_layers=2),
    "bart": dict(family="bart", position="learned", position_offset=2, embed_norm=True, activation="gelu",
                 max_position_embeddings=66, num_encoder_layers=2),
    "mbart": dict(family="mbart", position="learned", position_offset=2, embed_norm=True, norm_position="pre",
                  activation="gelu", max_position_embeddings=66, tie_word_embeddings=False),
    "m2m100": dict(family="m2m100", sinusoidal_layout="fairseq", position_offset=2, norm_position="pre",
                   max_position_embeddings=66),
}
WRITERS = [(write_pyxf_model, DECODERS), (write_pyxf_encoder, ENCODERS), (write_pyxf_seq2seq, SEQ2SEQ)]
CASES = [(writer, name, overrides) for writer, cases in WRITERS for name, overrides in cases.items()]


def _spec_core_tensors(config):
    listed = spec.core_layout(config).enumerate(max_tensors=10_000)
    return {(name, tuple(shape), required) for name, (shape, required) in listed.items()}


@pytest.mark.parametrize("writer,name,overrides", CASES, ids=[c[1] for c in CASES])
def test_core_binds_what_the_spec_lists(tmp_path, writer, name, overrides):
    model = pyxf.load(writer(tmp_path / "m", **overrides))
    bound = {(n, tuple(shape), required) for n, shape, required in model._core_model.bound_tensors()}
    assert bound == _spec_core_tensors(model.config)


@pytest.mark.parametrize("writer,name,overrides", CASES, ids=[c[1] for c in CASES])
def test_the_weight_file_holds_the_spec_tensors(tmp_path, writer, name, overrides):
    """The stored layout is the core's tensors without the tables made at load, plus the heads
    Python applies: what tiny_files writes from it loads, and nothing else is accepted."""
    model = pyxf.load(writer(tmp_path / "m", **overrides))
    stored = spec.tensor_layout(model.config).enumerate(max_tensors=10_000)
    core = spec.core_layout(model.config).enumerate(max_tensors=10_000)
    made_at_load = set(core) - set(stored)
    python_only = {n for n, entry in stored.items() if entry.tensor.reader == spec.PYTHON}
    assert all(not core[n].tensor.stored for n in made_at_load)
    assert set(stored) == (set(core) - made_at_load) | python_only
    for n, (shape, _) in stored.items():
        assert expected_shape(n, model.config) == shape


@pytest.mark.parametrize("writer,name,overrides", CASES, ids=[c[1] for c in CASES])
def test_converter_tables_write_only_spec_tensors(tmp_path, writer, name, overrides):
    """Every pyxf tensor a family's source tables (HF and GGUF) can write is one the spec lists
    for that family's config."""
    from pyxf.convert.families import FAMILIES

    config = pyxf.load(writer(tmp_path / "m", **overrides)).config
    family = FAMILIES[config["family"]]
    gguf = family.gguf.values() if config.get("architecture", "decoder") == "decoder" else []  # GGUF holds decoders
    if family.gguf_tables:  # the tables of a GGUF file with this config (its experts)
        gguf = [family.gguf_tables(config, table) for table in gguf]
    hf = [family.hf_tables(config, names) for names in _hf_source_names(config)] if family.hf_tables else [family.hf]
    tables = [*hf, *gguf]
    # The tables of one family cover its variants (the qwen3 and gemma3 GGUF tables name q/k
    # norms, ModernBERT's table the norm biases of checkpoints that have them): a target
    # must be in the spec of this config or of its variant.
    layouts = [spec.tensor_layout(config)]
    variants = {"llama": {"qk_norm": True}, "gemma": {"qk_norm": True}, "modernbert": {"norm_bias": True}}
    if config["family"] in variants:
        layouts.append(spec.tensor_layout({**config, **variants[config["family"]]}))
    for table in tables:
        rules = [*table.global_rules, *table.layer_rules, *table.encoder_layer_rules]
        if table.lm_head is not None and not config["tie_word_embeddings"]:
            rules.append(table.lm_head)
        for rule in rules:
            target = rule.target.format(i=0)
            assert any(layout.lookup(target) is not None for layout in layouts), (config["family"], target)


def _hf_source_names(config):
    """Checkpoint tensor names that select each HF table of a config: a mixture of experts' per-expert
    tensors in Qwen-MoE's and in Mixtral's names, and transformers v5's expert stacks."""
    if not config.get("num_experts"):
        return [set()]
    experts = range(config["num_experts"])
    qwen = {f"layers.0.mlp.experts.{e}.{p}.weight" for e in experts for p in ("gate_proj", "up_proj", "down_proj")}
    mixtral = {f"layers.0.block_sparse_moe.experts.{e}.{p}.weight" for e in experts for p in ("w1", "w2", "w3")}
    return [qwen, mixtral | {"layers.0.block_sparse_moe.gate.weight"}, {"layers.0.mlp.experts.gate_up_proj"}]


def test_every_family_has_a_spec_and_a_case():
    assert set(spec.FAMILIES) == {o.get("family", "llama") for o in DECODERS.values()} | {
        o["family"] for o in ENCODERS.values()} | {o.get("family", "transformer") for o in SEQ2SEQ.values()}


def test_quantizable_tensors_come_from_the_spec(tmp_path):
    config = pyxf.load(write_pyxf_model(tmp_path / "m", tie_word_embeddings=False)).config
    layout = spec.tensor_layout(config).enumerate(max_tensors=10_000)
    marked = {n for n, entry in layout.items() if entry.tensor.quantizable}
    assert marked == {n for n, (shape, _) in layout.items() if quant.quantizable(n, (shape[0], 32), embeddings=True)}
    assert "lm_head.weight" in marked and "embed.weight" in marked and "layers.0.attn_norm.weight" not in marked
    # The mixes read the fused q, k, v rows from the spec: v rows (Hkv * D = 8) get q6_k in layer 0.
    qkv = layout["layers.0.attn.qkv.weight"]
    assert qkv.parts == (("q", 16), ("k", 8), ("v", 8))
    shape = (32, 256)
    assert quant_mix.tensor_spec("layers.0.attn.qkv.weight", shape, config, "q4_k_m", False) == [
        ["q4_k", 24], ["q6_k", 8]]


def test_core_refuses_a_tensor_of_the_wrong_shape(tmp_path):
    """The core's binder checks each view it takes (a caller of pyxf._core that skipped the loader)."""
    from pyxf.rope import rope_parameters
    from pyxf.threads import core

    model = pyxf.load(write_pyxf_model(tmp_path / "m"))
    config = dict(model.config)
    config["rope_inv_freq"], config["rope_attention_scaling"] = rope_parameters(config)
    weights = dict(model._weights)
    weights["layers.0.attn.out.weight"] = np.zeros((3, 3), np.float16)
    with pytest.raises(ValueError, match=r"tensor 'layers.0.attn.out.weight' has shape \[3, 3\], expected \[16, 16\]"):
        core().Model(config, weights)
    del weights["layers.0.attn.out.weight"]
    with pytest.raises(ValueError, match="missing tensor 'layers.0.attn.out.weight'"):
        core().Model(config, weights)
    weights = dict(model._weights)
    config["tensor_formats"] = {"layers.0.attn_norm.weight": "q8_0"}  # a vector is never quantized
    with pytest.raises(ValueError, match="tensor 'layers.0.attn_norm.weight' cannot be stored quantized"):
        core().Model(config, weights)
    config["tensor_formats"] = {"layers.0.ffn.down.weight": "q8_0"}  # float data declared as blocks
    with pytest.raises(ValueError, match="must be a C-contiguous 1-byte array of shape"):
        core().Model(config, weights)


def _pyxf_imports(path):
    """The pyxf modules a source file imports (absolute names; relative ones resolved)."""
    import ast

    package = ".".join(path.relative_to(PYXF_ROOT.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.update([module] if node.module else [])
            names.update(f"{module}.{a.name}" for a in node.names)  # `from pyxf import seq2seq`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "pyxf" or n.startswith("pyxf.")}


PYXF_ROOT = __import__("pathlib").Path(pyxf.__file__).parent


def test_import_structure_has_no_circles():
    """The schemas import nothing of pyxf, declarations only their schema (and the shared tokenizer
    writers), and decoder code never names the encoder-decoder module."""
    assert {"pyxf.spec", "pyxf.checks"} <= _pyxf_imports(PYXF_ROOT / "model.py")  # the walk sees imports
    assert _pyxf_imports(PYXF_ROOT / "spec" / "schema.py") == set()
    assert _pyxf_imports(PYXF_ROOT / "convert" / "schema.py") == set()
    for name in ("blocks", "decoder", "encoder", "encoder_decoder"):
        imported = {n.rsplit(".", 1)[0] if n.count(".") > 2 else n for n in _pyxf_imports(PYXF_ROOT / "spec" / f"{name}.py")}
        assert imported <= {"pyxf.spec.schema", "pyxf.spec.blocks"}
    for path in (PYXF_ROOT / "convert" / "families").glob("[!_]*.py"):
        assert {n.rsplit(".", 1)[0] if n.count(".") > 2 else n for n in _pyxf_imports(path)} <= {
            "pyxf.convert.schema", "pyxf.convert.tokenizer_files"}, path
    assert _pyxf_imports(PYXF_ROOT / "convert" / "tokenizer_files.py") == set()
    assert _pyxf_imports(PYXF_ROOT / "checks.py") == set()
    for name in ("model", "generation", "engine", "sampling"):
        assert "pyxf.seq2seq" not in _pyxf_imports(PYXF_ROOT / f"{name}.py"), name
    assert not {"pyxf.model", "pyxf.generation"} & _pyxf_imports(PYXF_ROOT / "seq2seq.py")
