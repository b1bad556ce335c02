"""Weights in memory (docs/DESIGN.md, "Weights in memory"). pyxf.load copies a file's matrices that
every call reads whole onto transparent huge pages (huge_pages=True, the default) or reads them from
the file's mapping (huge_pages=False). The copy must change no number: both ways compute the same
logits bit for bit, for matrices in one format, in several (a Q4_K_M file's fused qkv), stacked
(experts), a tied head that is also the embedding table, and an encoder-decoder's shared embeddings.
By default a decoder's quantized matrices are also repacked for the AVX-512 decode kernels
(strips), which sum the same integer products in another order than the kernels reading the rows
(Gemma 3 amplifies such rounding into logits several units apart, as it does between a prompt fed
at once and token by token): files with such matrices are compared on the AVX2 table, which repacks
nothing. (The default way is the one every other test compares with transformers.)"""

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pytest

import helpers
import kquant_files
import pyxf
from pyxf.memory import process_memory

STRIP_FORMATS = ("int8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")

PROMPT = list(range(3, 3 + 48))  # 48 rows: the many-rows GEMMs; then single-token steps: the GEMVs


def both_ways(path, **options):
    return pyxf.load(path, **options), pyxf.load(path, huge_pages=False, **options)


def decoder_logits(model, vocab_size):
    ids = [i % vocab_size for i in PROMPT]
    session = model.session(len(ids) + 4)
    steps = [session.feed(ids, all_logits=True)]
    for token in (5, 7, 11, 13):
        steps.append(session.feed([token % vocab_size], all_logits=True))
    return np.concatenate(steps)


@contextlib.contextmanager
def without_decode_strips(path):
    """The AVX2 table while a file whose matrices the AVX-512 tables would repack into strips is
    loaded and run (where this CPU has both)."""
    import json

    formats = str((json.loads((Path(path) / "config.json").read_text()).get("quantization") or {}).get("tensors", {}))
    from pyxf import _core as core
    before = core.get_isa()
    switch = before.startswith("avx512") and "avx2" in core.info()["isas"] and any(f in formats for f in STRIP_FORMATS)
    if switch:
        core.set_isa("avx2")
    try:
        yield
    finally:
        core.set_isa(before)


def assert_same_decoder(path, **options):
    with without_decode_strips(path):
        copied, mapped = both_ways(path, **options)
        vocab = copied.config["vocab_size"]
        a, b = decoder_logits(copied, vocab), decoder_logits(mapped, vocab)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def fetched(what, name):
    """pyxf.hub's `name` model directory (fetched on first use); the test is skipped without it."""
    helpers.require_core()
    from pyxf import hub

    try:
        return getattr(hub, name)()
    except RuntimeError as e:
        pytest.skip(f"{what} could not be fetched: {e}")


def test_smollm2_default_file():
    """Q4_1 layers and the tied Q8_0 embedding / head, as the GGUF stores them."""
    assert_same_decoder(fetched("SmolLM2", "default_model_path"))


def test_gemma3_q4_k_m_segments():
    """Gemma 3 270M Q4_K_M as published: matrices whose rows are in two formats (Q4_K and Q6_K)."""
    helpers.require_core()
    assert_same_decoder(pyxf.load(kquant_files.gemma_gguf()).path)


@pytest.mark.parametrize("spec", ["mixtral_e5", "qwen3moe_e8_qknorm"])
def test_stacked_experts(tiny_models, spec):
    """float32 experts: views of one stacked matrix's rows; untied and tied heads."""
    _, pyxf_dir = tiny_models(spec)
    assert_same_decoder(pyxf_dir)


def test_quantized_file_with_experts(tiny_models, tmp_path):
    """A q8_0 file (pyxf convert --quantize): quantized stacked experts and embedding."""
    from pyxf.convert import convert

    model, _ = tiny_models("qwen3moe_e8_qknorm")
    model.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer": the tiny model has none
        out = convert(tmp_path / "hf", tmp_path / "q8_0", quantize="q8_0", progress=False)
    config = pyxf.load(out).config
    assert "q8_0" in str(config["quantization"]["tensors"])
    assert_same_decoder(out)


def test_encoder_decoder_shared_embeddings(tmp_path):
    """A Marian model: the encoder looks rows up in the table that the decoder's tied head reads
    whole."""
    from pyxf.convert import convert

    helpers.build_marian(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "pyxf", progress=False)
    copied, mapped = both_ways(out)
    assert copied.config.get("shared_embeddings", True)
    source = [5, 9, 17, 33, 2]
    decoder = [copied.config["decoder_start_token_id"], 7, 12, 19]
    a, b = copied.logits(source, decoder), mapped.logits(source, decoder)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def anon_huge_bytes():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def huge_page_modes():
    """The kernel's transparent huge page setting; the test is skipped where it offers none."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        modes = f.read()
    if "[always]" not in modes and "[madvise]" not in modes:
        pytest.skip(f"this kernel offers no transparent huge pages ({modes.strip()})")
    return modes


def test_matrices_land_on_huge_pages():
    """Where the kernel offers transparent huge pages, loading SmolLM2's file (~90 MB of matrices)
    puts most of them on 2 MiB pages; with huge_pages=False none."""
    modes = huge_page_modes()
    path = fetched("SmolLM2", "default_model_path")
    before = anon_huge_bytes()
    mapped = pyxf.load(path, huge_pages=False)
    after_mapped = anon_huge_bytes()
    copied = pyxf.load(path)
    after_copied = anon_huge_bytes()
    if "[madvise]" in modes:
        assert after_mapped - before < 8 << 20
    assert mapped.huge_page_bytes == 0
    # every matrix but the 30 layers' norms: the Q4_1 layers and the tied Q8_0 embedding / head
    assert copied.huge_page_bytes >= 90 << 20
    assert after_copied - after_mapped >= 48 << 20, (before, after_mapped, after_copied)
    # converted at load: the new arrays are this process's memory already, no second copy
    assert pyxf.load(path, dtype="bfloat16").huge_page_bytes == 0
    del mapped, copied


def test_encoders_keep_the_mapping():
    """An encoder (batches of rows) reads its matrices from the file, which processes share."""
    assert pyxf.load(fetched("all-MiniLM-L6-v2", "minilm_model_path")).huge_page_bytes == 0


def test_huge_pages_must_be_a_bool(tiny_models):
    _, pyxf_dir = tiny_models("mixtral_e5")
    with pytest.raises(TypeError, match="huge_pages must be True or False"):
        pyxf.load(pyxf_dir, huge_pages="no")


def test_serve_without_huge_pages_shares_the_file():
    """`pyxf serve --no-huge-pages`: the decoder's matrices stay in its file's mapping (page cache,
    shared by every process that maps the file) instead of a private copy; answers are the same (both
    servers on the AVX2 table where the CPU has AVX-512: the default way's strips would sum in another
    order than the rows, and greedy decoding may then part at a near tie)."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
    pytest.importorskip("openai")
    from serving import Server

    huge_page_modes()
    path = fetched("SmolLM2", "default_model_path")
    question = [{"role": "user", "content": "Name three colours."}]
    answers, memory = {}, {}
    from pyxf import _core as core
    isa = {"PYXF_ISA": "avx2"} if core.get_isa().startswith("avx512") and "avx2" in core.info()["isas"] else {}
    for flags in ((), ("--no-huge-pages",)):
        server = Server([f"smollm2={path}", "--threads", "1", *flags], env=isa)
        try:
            reply = server.openai().chat.completions.create(model="smollm2", messages=question, max_tokens=12,
                                                            temperature=0)
            answers[flags] = reply.choices[0].message.content
            usage = process_memory(server.process.pid, files_under=path)  # the model file's mapping apart
            memory[flags] = usage["anonymous"], usage["files_rss"]
        finally:
            assert server.stop() == 0
    (copy_anon, copy_mapped), (shared_anon, shared_mapped) = memory[()], memory[("--no-huge-pages",)]
    assert answers[()] and answers[()] == answers[("--no-huge-pages",)]
    # the ~90 MB of matrices: resident through the file's mapping, not as this process's own memory
    assert shared_mapped >= 80 << 20, memory
    assert copy_anon - shared_anon >= 60 << 20, memory
    assert copy_mapped < 16 << 20, memory
