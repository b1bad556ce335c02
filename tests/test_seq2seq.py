"""Encoder-decoder models: the reference torch.nn.Transformer model (random and trained on a toy
task), tiny random Marian and T5 models from transformers with sentencepiece vocabularies trained
here; logits parity, greedy/beam-search parity with transformers' generate, the attention kernel's
relative position bias under every ISA, and argument checking."""

import copy
import math
import shutil
import warnings

import numpy as np
import pytest

core = pytest.importorskip("pyxf._core", reason="pyxf._core is not built (bash tools/dev_build.sh)")
torch = pytest.importorskip("torch")

import pyxf  # noqa: E402
from helpers import build_marian, randomize, train_sentencepiece  # noqa: E402
from pyxf.relative_position import relative_position_buckets  # noqa: E402
from pyxf.seq2seq import sinusoidal_table  # noqa: E402

LOGITS_ATOL = 1e-4
ISAS = core.info()["isas"]


def max_abs_err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def convert_quietly(src, out, **options):
    from pyxf.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(src, out, progress=False, **options)


# ---------------------------------------------------------------------------------------------
# the attention kernel's relative position bias


@pytest.fixture(params=ISAS)
def isa(request):
    before = core.get_isa()
    core.set_isa(request.param)
    yield request.param
    core.set_isa(before)


def reference_attention(q, k, v, n_heads, n_kv_heads, causal, scale, bias):
    T, Tk = q.shape[0], k.shape[0]
    D = q.shape[1] // n_heads
    R = bias.shape[1] // 2
    past = Tk - T
    out = np.zeros((T, n_heads * D))
    rel = np.arange(Tk)[None, :] - (past + np.arange(T))[:, None]
    for h in range(n_heads):
        g = h // (n_heads // n_kv_heads)
        s = q[:, h * D:(h + 1) * D].astype(np.float64) @ k[:, g * D:(g + 1) * D].T.astype(np.float64) * scale
        s = s + bias[h][np.clip(rel, -R, R) + R]
        if causal:
            s = np.where(rel > 0, -np.inf, s)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h * D:(h + 1) * D] = p @ v[:, g * D:(g + 1) * D]
    return out


@pytest.mark.parametrize("t, tk, heads, kv_heads, head_dim, radius", [
    (1, 70, 4, 4, 16, 20),    # decode: one query, keys across the 64-key block edge
    (5, 5, 4, 2, 24, 3),      # GQA, keys beyond the radius
    (33, 100, 3, 1, 32, 8),   # MQA, queries after a past
    (70, 70, 2, 2, 8, 128),   # radius larger than the sequence
])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_relative_position_bias(isa, t, tk, heads, kv_heads, head_dim, radius, causal):
    rng = np.random.default_rng(t * 1000 + tk)
    q = rng.standard_normal((t, heads * head_dim)).astype(np.float32)
    k = rng.standard_normal((tk, kv_heads * head_dim)).astype(np.float32)
    v = rng.standard_normal((tk, kv_heads * head_dim)).astype(np.float32)
    bias = (2 * rng.standard_normal((heads, 2 * radius + 1))).astype(np.float32)
    got = core.ops.attention(q, k, v, heads, kv_heads, causal=causal, scale=0.3, pos_bias=bias)
    ref = reference_attention(q, k, v, heads, kv_heads, causal, 0.3, bias)
    assert max_abs_err(got, ref) <= 1e-5 * max(1.0, np.abs(ref).max())


def test_attention_bias_shape_is_checked():
    q = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="pos_bias"):
        core.ops.attention(q, q, q, 2, 2, causal=True, scale=1.0, pos_bias=np.zeros((2, 4), np.float32))


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-700, 700)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (32, 64), (16, 32)):
            expected = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance).numpy()
            assert (relative_position_buckets(rel.numpy(), bidirectional, buckets, distance) == expected).all()


def test_sinusoidal_layouts():
    table = sinusoidal_table(50, 8, "interleaved")
    pos, i = 7, 2
    assert table[pos, 2 * i] == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-7)
    assert table[pos, 2 * i + 1] == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-7)
    concat = sinusoidal_table(50, 8, "concat")
    assert concat[pos, i] == table[pos, 2 * i] and concat[pos, 4 + i] == table[pos, 2 * i + 1]


# ---------------------------------------------------------------------------------------------
# the reference torch.nn.Transformer model

REFERENCE_CONFIGS = {
    # post-LN, ReLU, separate embeddings, untied head, encoder and decoder depths differ
    "post_relu": dict(src_vocab_size=50, tgt_vocab_size=60, norm_first=False, activation="relu", tie_output=False,
                      share_embeddings=False, num_encoder_layers=2, num_decoder_layers=3),
    # pre-LN, GELU, shared embeddings and tied head
    "pre_gelu_tied": dict(src_vocab_size=50, tgt_vocab_size=50, norm_first=True, activation="gelu", tie_output=True,
                          share_embeddings=True, num_encoder_layers=3, num_decoder_layers=2),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE_CONFIGS))
def reference_pair(request, tmp_path_factory):
    from pyxf.torch_models import TransformerSeq2Seq

    torch.manual_seed(0)
    kwargs = REFERENCE_CONFIGS[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors with norm_first
        model = TransformerSeq2Seq(d_model=64, nhead=4, dim_feedforward=96, dropout=0.0, max_len=128, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(1.2 / math.sqrt(p.shape[1]) * torch.randn_like(p))
    root = tmp_path_factory.mktemp(f"reference-{request.param}")
    model.save_pretrained(root / "torch")
    return model, pyxf.load(convert_quietly(root / "torch", root / "pyxf"))


def test_reference_logits_match_torch(reference_pair):
    model, px = reference_pair
    rng = np.random.default_rng(0)
    for src_len, tgt_len in ((1, 1), (7, 5), (40, 33), (128, 90)):
        src = rng.integers(3, px.source_vocab_size, src_len).tolist()
        dec = [1] + rng.integers(3, px.vocab_size, tgt_len - 1).tolist()
        with torch.no_grad():
            ref = model(torch.tensor([src]), torch.tensor([dec]))[0].numpy()
        got = px.logits(src, dec)
        assert got.shape == (tgt_len, px.vocab_size) and got.dtype == np.float32
        assert max_abs_err(got, ref) <= LOGITS_ATOL


def test_reference_greedy_matches_torch(reference_pair):
    model, px = reference_pair
    rng = np.random.default_rng(1)
    sources = [rng.integers(3, px.source_vocab_size, n).tolist() + [2] for n in (3, 9, 20)]
    for src in sources:
        expected = model.greedy(torch.tensor([src]), 16)[0].tolist()
        if 2 in expected:
            expected = expected[: expected.index(2)]
        assert pyxf.generate(px, src, max_new_tokens=16) == expected
    # batched sources of different lengths give what each gives alone
    assert pyxf.generate(px, sources, max_new_tokens=16) == [pyxf.generate(px, s, max_new_tokens=16) for s in sources]
    beams = pyxf.translate(px, sources, beam_size=3, max_length=16)
    assert beams == [pyxf.translate(px, [s], beam_size=3, max_length=16)[0] for s in sources]


PAD, BOS, EOS = 0, 1, 2


def reversal_batch(n, generator):
    """Digit sequences (ids 3..12) of 2 to 5 digits, padded; targets: bos, the digits reversed, eos."""
    lengths = torch.randint(2, 6, (n,), generator=generator)
    L = int(lengths.max())
    src, tgt = torch.full((n, L + 1), PAD), torch.full((n, L + 2), PAD)
    for i, length in enumerate(lengths.tolist()):
        digits = torch.randint(3, 13, (length,), generator=generator)
        src[i, :length], src[i, length] = digits, EOS
        tgt[i, 0], tgt[i, 1:length + 1], tgt[i, length + 1] = BOS, digits.flip(0), EOS
    return src, tgt


def train_reversal_model():
    """A small torch.nn.Transformer trained to reverse digit strings (a few seconds)."""
    from pyxf.torch_models import TransformerSeq2Seq

    torch.manual_seed(0)
    model = TransformerSeq2Seq(13, 13, d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=96, dropout=0.0, max_len=64, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        src, tgt = reversal_batch(64, generator)
        logits = model(src, tgt[:, :-1], src_padding_mask=src == PAD)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_reversal(tmp_path_factory):
    model = train_reversal_model()
    root = tmp_path_factory.mktemp("reversal")
    model.save_pretrained(root / "torch")
    return model, pyxf.load(convert_quietly(root / "torch", root / "pyxf"))


def reversal_sources_and_torch_greedy(model):
    """100 sources (token lists), their wanted outputs and the torch model's greedy outputs."""
    src, tgt = reversal_batch(100, torch.Generator().manual_seed(123))
    sources = [row[: row.tolist().index(EOS) + 1].tolist() for row in src]
    wanted = [row[1:row.tolist().index(EOS)].tolist() for row in tgt]
    with torch.no_grad():
        torch_out = model.greedy(src, 8, src_padding_mask=src == PAD).tolist()
    return sources, wanted, [row[: row.index(EOS)] if EOS in row else row for row in torch_out]


def test_trained_reversal_solved_like_torch(trained_reversal):
    model, px = trained_reversal
    sources, wanted, torch_out = reversal_sources_and_torch_greedy(model)
    greedy = pyxf.generate(px, sources, max_new_tokens=8)
    beam = pyxf.translate(px, sources, beam_size=4, max_length=8)
    assert greedy == torch_out
    accuracy = {name: np.mean([o == w for o, w in zip(out, wanted)])
                for name, out in (("torch", torch_out), ("greedy", greedy), ("beam", beam))}
    assert accuracy["torch"] >= 0.5, accuracy  # the model learned the task
    assert accuracy["beam"] >= accuracy["greedy"] - 0.05, accuracy
    # logits parity on the trained model
    with torch.no_grad():
        ref = model(torch.tensor([sources[0]]), torch.tensor([[BOS] + wanted[0]]))[0].numpy()
    assert max_abs_err(px.logits(sources[0], [BOS] + wanted[0]), ref) <= LOGITS_ATOL


def torch_greedy_with_q8_0_weights(model):
    """torch's own greedy outputs for the 100 sources with every matrix of the model rounded through
    Q8_0 (gguf's quantizer): how far 8-bit weights alone move the float32 outputs of this model
    (trained here, on this CPU: its near ties differ from machine to machine)."""
    gguf = pytest.importorskip("gguf")
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                w = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8_0), q8_0).reshape(w.shape)))
    return reversal_sources_and_torch_greedy(rounded)[2]


@pytest.mark.parametrize("method", ["int8", "q8_0"])
def test_quantized_encoder_decoder_follows_torch(trained_reversal, method):
    """quantize= on an encoder-decoder (both stacks' linear weights and the embeddings): greedy
    outputs equal torch's float32 ones for nearly every source, within a few sources of what torch
    itself gives with Q8_0-rounded weights (pyxf also rounds the activations to 8 bits). Measured:
    Zen 5 int8 97/100, q8_0 96/100 (beam 4: 95, 92); Intel Xeon int8 97, q8_0 93 (beam 98, 95),
    torch with Q8_0 weights 97."""
    model, px = trained_reversal
    sources, _, torch_out = reversal_sources_and_torch_greedy(model)
    weights_only = np.mean([a == b for a, b in zip(torch_greedy_with_q8_0_weights(model), torch_out)])
    quantized = pyxf.load(px.path, quantize=method)
    formats = quantized.config["quantization"]["tensors"]
    assert formats["encoder.layers.0.ffn.up.weight"] == method and formats["layers.0.cross_attn.kv.weight"] == method
    same = np.mean([a == b for a, b in zip(pyxf.generate(quantized, sources, max_new_tokens=8), torch_out)])
    beam = np.mean([a == b for a, b in zip(pyxf.translate(quantized, sources, beam_size=4, max_length=8), torch_out)])
    print(f"\n{method}: greedy {same:.2f}, beam 4 {beam:.2f} equal to torch float32 greedy "
          f"(torch with Q8_0 weights: {weights_only:.2f})")
    assert same >= min(0.95, weights_only - 0.05) and beam >= min(0.9, weights_only - 0.08), (same, beam, weights_only)
    assert same >= 0.85
    # `pyxf convert --quantize` stores what quantize= makes at load
    converted = pyxf.load(convert_quietly(px.path.parent / "torch", px.path.parent / f"pyxf-{method}", quantize=method))
    assert converted.config["quantization"]["tensors"] == formats
    assert pyxf.generate(converted, sources, max_new_tokens=8) == pyxf.generate(quantized, sources, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------
# Marian and T5 from transformers, with sentencepiece models trained here

SOURCES = ["hello world how are you", "the quick brown fox", "das ist ein kleines haus am see und der hund", "we"]


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    model, tokenizer = build_marian(root / "hf")
    return model, tokenizer, pyxf.load(convert_quietly(root / "hf", root / "pyxf"))


@pytest.fixture(scope="module", params=["relu_tied", "gated_gelu"])
def t5(request, tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp(f"t5-{request.param}")
    sp_path = train_sentencepiece(root, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (root / "tok").mkdir()
    shutil.copyfile(sp_path, root / "tok" / "spiece.model")
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(root / "tok"), extra_ids=0)
    gated = request.param == "gated_gelu"
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=not gated,  # v1.1 style: no d_model^-0.5 head rescale
    )
    torch.manual_seed(1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    randomize(model, 1.0 if gated else 1.5, 1.0 if gated else 2.0)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return model, tokenizer, pyxf.load(convert_quietly(root / "hf", root / "pyxf"))


def check_logits(model, tokenizer, px, start):
    errors = []
    for text in SOURCES:
        src = tokenizer(text).input_ids
        assert px.tokenizer.encode(text) == src
        dec = [start] + list(range(3, 40))
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0].numpy()
        errors.append(max_abs_err(px.logits(src, dec), ref))
    assert max(errors) <= LOGITS_ATOL, errors


GENERATION_SETTINGS = [
    # beam_size, num_hypotheses, no_repeat_ngram_size, length_penalty, min_length, early_stopping, repetition_penalty
    (1, 1, 0, 1.0, 0, False, 1.0),
    (1, 1, 2, 1.0, 4, False, 1.0),
    (1, 1, 0, 1.0, 0, False, 1.2),
    (4, 1, 0, 1.0, 0, False, 1.0),
    (4, 1, 2, 1.0, 0, False, 1.0),
    (4, 3, 1, 1.0, 0, False, 1.0),
    (5, 2, 3, 0.6, 5, False, 1.0),
    (3, 3, 2, 2.0, 0, True, 1.0),
    (4, 2, 2, 1.0, 0, "never", 1.0),
    (4, 1, 0, 1.0, 3, False, 1.3),
]


def cut_at_eos(tokens, eos_ids):
    """Tokens before the first end token (transformers pads finished rows after it)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


def check_generation(model, tokenizer, px, max_new_tokens):
    """pyxf's outputs equal transformers' generate (text and ids, every hypothesis), with the same
    beam scores."""
    for beams, n, ngram, lp, min_len, early, rp in GENERATION_SETTINGS:
        encoded = tokenizer(SOURCES, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **encoded, num_beams=beams, num_return_sequences=n, max_new_tokens=max_new_tokens, do_sample=False,
                no_repeat_ngram_size=ngram, length_penalty=lp, min_new_tokens=min_len, early_stopping=early,
                repetition_penalty=rp, output_scores=True, return_dict_in_generate=True,
            )
        expected_ids = [cut_at_eos(row[1:], px.eos_token_ids) for row in out.sequences.tolist()]
        expected_text = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        kwargs = dict(beam_size=beams, num_hypotheses=n, max_length=max_new_tokens, no_repeat_ngram_size=ngram,
                      length_penalty=lp, min_length=min_len, early_stopping=early, repetition_penalty=rp)
        got = pyxf.translate(px, [tokenizer(s).input_ids for s in SOURCES], return_scores=True, **kwargs)
        flat = [h for hyps in got for h in (hyps if n > 1 else [hyps])]
        setting = (beams, n, ngram, lp, min_len, early, rp)
        assert [tokens for tokens, _ in flat] == expected_ids, setting
        if beams > 1:
            assert max_abs_err([score for _, score in flat], out.sequences_scores.numpy()) <= 1e-4, setting
        text = pyxf.translate(px, SOURCES, **kwargs)
        assert [t for hyps in text for t in (hyps if n > 1 else [hyps])] == expected_text, setting


def test_marian_logits(marian):
    model, tokenizer, px = marian
    assert px.config["family"] == "marian" and px.config["sinusoidal_layout"] == "concat"
    check_logits(model, tokenizer, px, model.config.decoder_start_token_id)


def test_marian_generation_matches_transformers(marian):
    check_generation(*marian, max_new_tokens=15)


def test_t5_logits(t5):
    model, tokenizer, px = t5
    assert px.config["family"] == "t5" and px.config["position"] == "relative"
    check_logits(model, tokenizer, px, 0)


def test_t5_generation_matches_transformers(t5):
    check_generation(*t5, max_new_tokens=30)


# ---------------------------------------------------------------------------------------------
# the API


def test_generate_forms_and_sampling(marian):
    _, tokenizer, px = marian
    text = pyxf.generate(px, SOURCES[0], max_new_tokens=10)
    assert isinstance(text, str)
    assert pyxf.generate(px, SOURCES[:2], max_new_tokens=10)[0] == text
    ids = pyxf.generate(px, tokenizer(SOURCES[0]).input_ids, max_new_tokens=10)
    assert all(isinstance(t, int) for t in ids) and px.tokenizer.decode(ids) == text
    assert px.generate(SOURCES[0], max_new_tokens=10) == text
    hyps = pyxf.translate(px, SOURCES[0], beam_size=3, num_hypotheses=3, max_length=10, return_scores=True)
    assert len(hyps) == 3 and hyps[0][1] >= hyps[1][1] >= hyps[2][1]
    sampled = [pyxf.generate(px, SOURCES[0], temperature=1.0, top_k=5, seed=7, max_new_tokens=10) for _ in range(2)]
    assert sampled[0] == sampled[1]
    batch = pyxf.generate(px, SOURCES, temperature=1.0, top_k=5, seed=7, max_new_tokens=10)
    assert batch[0] == sampled[0]  # the same seed gives the same text alone or in a batch


def test_bad_input(marian, reference_pair):
    _, _, px = marian
    with pytest.raises(ValueError, match="empty"):
        pyxf.translate(px, [""])
    with pytest.raises(ValueError, match="empty"):
        pyxf.translate(px, [[]])
    with pytest.raises(ValueError, match="beam_size"):
        pyxf.translate(px, SOURCES, beam_size=0)
    with pytest.raises(ValueError, match="num_hypotheses"):
        pyxf.translate(px, SOURCES, beam_size=2, num_hypotheses=3)
    with pytest.raises(ValueError, match="sample"):
        pyxf.translate(px, SOURCES, beam_size=2, temperature=0.5)
    with pytest.raises(ValueError, match="target positions"):
        pyxf.translate(px, SOURCES, max_length=10_000)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pyxf.translate(px, [[1, 2, 10_000]])
    long_text = " ".join(["hello world"] * 200)
    with pytest.raises(ValueError, match="source positions"):
        pyxf.translate(px, long_text)
    with pytest.raises(ValueError, match="source positions"):
        px.logits(list(range(3, 50)) * 5, [px.decoder_start_token_id])
    assert isinstance(pyxf.translate(px, long_text, truncate=True, max_length=5), str)
    ids = px.tokenizer.encode(long_text)
    assert pyxf.translate(px, long_text, truncate=True, max_length=5) == \
        px.tokenizer.decode(pyxf.translate(px, ids[:127] + ids[-1:], max_length=5))
    _, reference = reference_pair
    with pytest.raises(ValueError, match="no tokenizer"):
        pyxf.generate(reference, "text")
    with pytest.raises(ValueError, match="decoder_ids"):
        reference.logits([3, 4], [])


def test_decoder_only_generate_rejects_beam_options(tmp_path):
    from tiny_files import write_pyxf_model

    decoder = pyxf.load(write_pyxf_model(tmp_path / "decoder"))
    with pytest.raises(TypeError, match="beam_size"):
        pyxf.generate(decoder, [1, 2], beam_size=4)
    with pytest.raises(TypeError, match="needs a loaded pyxf model"):
        pyxf.generate(object(), [1, 2])
