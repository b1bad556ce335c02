"""Every model kind through every entry point: `pyxf generate`, `pyxf chat`, `pyxf translate`,
`pyxf embed`, pyxf.generate and streaming, for a decoder, an encoder-decoder (a tiny random Marian
from transformers, compared with transformers' generate) and an encoder (all-MiniLM-L6-v2,
compared with sentence-transformers); a CLI error is one line, never a traceback."""

import io
import json
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyxf._core", reason="pyxf._core is not built (bash tools/dev_build.sh)")

import pyxf  # noqa: E402
from helpers import build_marian  # noqa: E402
from pyxf.cli import main  # noqa: E402
from tiny_files import write_pyxf_encoder, write_pyxf_model  # noqa: E402

SOURCES = ["hello world how are you", "the quick brown fox", "we"]


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    from pyxf.convert import convert

    root = tmp_path_factory.mktemp("marian")
    model, tokenizer = build_marian(root / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(root / "hf", root / "pyxf", progress=False)
    return model, tokenizer, out


def hf_translate(model, tokenizer, texts, beams, max_new_tokens):
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, num_beams=beams, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, match):
    assert code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pyxf: error: ") and match in err, err


# ---------------------------------------------------------------------------------------------
# encoder-decoder models


def test_generate_command_translates_like_transformers_greedy(marian, capsys):
    model, tokenizer, path = marian
    code, out, err = run(capsys, "generate", "--model", str(path), SOURCES[0], "--max-new-tokens", "20")
    assert code == 0, err
    assert out == hf_translate(model, tokenizer, [SOURCES[0]], beams=1, max_new_tokens=20)[0] + "\n"


def test_python_generate_and_stream_on_an_encoder_decoder(marian):
    model, tokenizer, path = marian
    px = pyxf.load(path)
    expected = hf_translate(model, tokenizer, SOURCES, beams=1, max_new_tokens=20)
    assert pyxf.generate(px, SOURCES, max_new_tokens=20) == expected
    pieces = list(pyxf.generate(px, SOURCES[1], max_new_tokens=20, stream=True))
    assert "".join(pieces) == expected[1]
    # Options both kinds accept at their defaults pass; decoder-only features are named.
    assert pyxf.generate(px, SOURCES[1], max_new_tokens=20, logprobs=None, return_details=False) == expected[1]
    result = pyxf.generate(px, SOURCES[1], max_new_tokens=20, return_details=True)
    assert isinstance(result, pyxf.Result) and result.text == expected[1]
    assert px.tokenizer.decode(result.token_ids) == expected[1]
    assert result.usage.prompt_tokens == len(tokenizer(SOURCES[1]).input_ids)
    assert result.usage.completion_tokens == len(result.token_ids)
    assert result.finish_reason == ("length" if len(result.token_ids) >= 19 else "stop")  # 20 with the end token
    cut = pyxf.generate(px, SOURCES[1], max_new_tokens=3, return_details=True)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2  # Marian forces the end token 3rd
    with pytest.raises(ValueError, match="messages .*not supported for encoder-decoder models"):
        pyxf.generate(px, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="logprobs, regex: not supported"):
        pyxf.generate(px, SOURCES[0], logprobs=2, regex="a+")


def test_translate_command_reads_stdin_and_writes_json_lines(marian, capsys, monkeypatch):
    model, tokenizer, path = marian
    expected = hf_translate(model, tokenizer, SOURCES, beams=4, max_new_tokens=16)
    code, out, err = run(capsys, "translate", "--model", str(path), "--max-length", "16", "--json", "--batch-size", "2",
                         stdin="\n".join(SOURCES) + "\n\n", monkeypatch=monkeypatch)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [{"source": s, "translation": t} for s, t in zip(SOURCES, expected)]


def test_translate_command_reads_a_file_and_arguments(marian, capsys, tmp_path):
    model, tokenizer, path = marian
    expected = hf_translate(model, tokenizer, SOURCES[:2], beams=2, max_new_tokens=12)
    (tmp_path / "in.txt").write_text("\n".join(SOURCES[:2]) + "\n")
    code, out, _ = run(capsys, "translate", "--model", str(path), "--input", str(tmp_path / "in.txt"),
                       "--beam-size", "2", "--max-length", "12")
    assert code == 0 and out.splitlines() == expected
    code, out, _ = run(capsys, "translate", "--model", str(path), *SOURCES[:2], "--beam-size", "2", "--max-length", "12")
    assert code == 0 and out.splitlines() == expected


def test_chat_command_on_an_encoder_decoder_answers_each_line(marian, capsys, monkeypatch):
    model, tokenizer, path = marian
    code, out, err = run(capsys, "chat", "--model", str(path), "--max-new-tokens", "20",
                         stdin="\n".join(SOURCES[:2]) + "\nexit\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.splitlines() == hf_translate(model, tokenizer, SOURCES[:2], beams=1, max_new_tokens=20)


def test_commands_a_model_kind_lacks_fail_in_one_line(marian, capsys, tmp_path):
    _, _, path = marian
    assert_one_line_error(*run(capsys, "chat", "--model", str(path), "--system", "be brief")[::2],
                          "takes no system message")
    assert_one_line_error(*run(capsys, "generate", "--model", str(path), "x", "--chat")[::2], "has no chat template")
    assert_one_line_error(*run(capsys, "embed", "--model", str(path), "x")[::2], "pyxf embed needs an encoder")
    decoder = write_pyxf_model(tmp_path / "decoder")
    assert_one_line_error(*run(capsys, "translate", "--model", str(decoder), "x")[::2],
                          "pyxf translate needs an encoder-decoder model")
    encoder = write_pyxf_encoder(tmp_path / "encoder")
    assert_one_line_error(*run(capsys, "generate", "--model", str(encoder), "x")[::2], "needs a decoder model")
    assert_one_line_error(*run(capsys, "chat", "--model", str(encoder))[::2], "use `pyxf embed`")
    assert_one_line_error(*run(capsys, "translate", "--model", str(path), "--input", str(tmp_path / "none.txt"))[::2],
                          "none.txt")


# ---------------------------------------------------------------------------------------------
# encoders


def test_embed_command_matches_sentence_transformers(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    from pyxf import hub

    try:
        source = hub.minilm_source_path()
        model_dir = hub.minilm_model_path()
    except RuntimeError as e:
        pytest.skip(f"all-MiniLM-L6-v2 could not be fetched: {e}")
    texts = ["The cat sits on the mat.", "Ein Hund läuft im Park.", "pyxf embeds text"]
    code, out, err = run(capsys, "embed", "--model", str(model_dir), stdin="\n".join(texts), monkeypatch=monkeypatch)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines] == texts
    got = np.array([line["embedding"] for line in lines])
    expected = st.SentenceTransformer(str(source), device="cpu").encode(texts, convert_to_numpy=True)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
