"""Loading by name: Hugging Face hub ids and GGUF files, converted once into pyxf's cache.

A Hugging Face hub cache is laid out here as huggingface_hub lays it out (models--org--name/ with
refs/<branch or tag> holding a commit, snapshots/<commit>/<file> links into blobs/<etag>), filled with
tiny random checkpoints saved by transformers and with all-MiniLM-L6-v2 (pyxf.hub's copy), and pyxf
is run on it in child processes with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it (huggingface_hub
reads both when imported): the real resolution path, snapshot_download from the cache, no network
and no mocks. Outputs are compared with transformers / sentence-transformers on the same snapshot.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    build_hf_model,
    child_process_options,
    half_precision_reference,
    hf_logits,
    max_abs_err,
    random_ids,
)

HAS_CORE = importlib.util.find_spec("pyxf._core") is not None
needs_core = pytest.mark.skipif(not HAS_CORE, reason="pyxf._core is not built (bash tools/dev_build.sh)")

TOLERANCE = 1e-4
REPO = "pyxf-test/tiny-llama"
SPEC = "llama_gqa_d80_llama3_bias"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


# ---------------------------------------------------------------------------------------------
# a hub cache laid out as huggingface_hub does


def _commit(label):
    return hashlib.sha1(label.encode()).hexdigest()


def _etag(path, content):
    """The blob name huggingface_hub uses: the SHA-256 of an LFS file, the git blob SHA-1 of others."""
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def add_snapshot(cache, repo_id, commit, source_dir, refs=()):
    """Puts every file under `source_dir` into the cache as snapshot `commit` of `repo_id`, with the
    given refs (branches or tags) pointing at it."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in Path(source_dir).rglob("*") if p.is_file()):
        relative = file.relative_to(source_dir).as_posix()
        content = file.read_bytes()
        blob = repo / "blobs" / _etag(relative, content)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return repo / "snapshots" / commit


def run_pyxf(script, hub_cache, pyxf_cache, *args, check=True):
    """Runs `script` (Python, argv after it) in a child interpreter, offline on the given caches."""
    options = child_process_options()
    options["env"].update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), PYXF_CACHE=str(pyxf_cache))
    options["env"].pop("HF_HOME", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            check=False, capture_output=True, text=True, timeout=600, **options)
    if check:
        assert result.returncode == 0, result.stderr
    return result


LOGITS = """
    import sys, json, numpy as np, pyxf
    name, revision, ids, out = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3]), sys.argv[4]
    model = pyxf.load(name, revision=revision)
    np.save(out, model.logits(ids))
    print(model.path)
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with REPO at two commits: "v1" (a tag) and "main" (a branch, a later commit) hold
    differently seeded weights; also a repo without weights. Returns (cache, {ref: (commit, model)})."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub-cache"
    commits = {}
    for ref, seed in (("v1", 1), ("main", 2)):
        model = build_hf_model(SPEC, seed=seed)
        model.save_pretrained(root / ref)
        commit = _commit(ref)
        add_snapshot(cache, REPO, commit, root / ref, refs=[ref])
        commits[ref] = (commit, model)
    empty = root / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (empty / "README.md").write_text("weights elsewhere\n")
    add_snapshot(cache, "pyxf-test/no-weights", _commit("no-weights"), empty, refs=["main"])
    return cache, commits


def test_cache_layout_is_huggingface_hubs(hub):
    """huggingface_hub's own cache scanner reads the laid-out cache: repos, revisions and refs."""
    from huggingface_hub import scan_cache_dir

    cache, commits = hub
    info = scan_cache_dir(cache)
    assert not info.warnings
    repo = next(r for r in info.repos if r.repo_id == REPO)
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {
        commits["v1"][0]: {"v1"}, commits["main"][0]: {"main"}}


@needs_core
def test_load_by_hub_id_converts_once_per_commit(hub, tmp_path):
    cache, commits = hub
    pyxf_cache = tmp_path / "pyxf-cache"
    ids = random_ids(300, 11, seed=3)

    def load(revision, label):
        out = tmp_path / f"{label}.npy"
        result = run_pyxf(LOGITS, cache, pyxf_cache, REPO, revision or "", json.dumps(ids), out)
        return np.load(out), Path(result.stdout.strip()), "converting" in result.stderr

    def expected(ref):
        return hf_logits(commits[ref][1], ids)

    main, main_dir, converted = load(None, "main")
    assert converted and max_abs_err(main, expected("main")) <= TOLERANCE
    tag, tag_dir, converted = load("v1", "v1")
    assert converted and max_abs_err(tag, expected("v1")) <= TOLERANCE
    assert max_abs_err(main, tag) > 1.0  # two different snapshots, told apart

    # The same commit by its hash, and the branch again: loaded from pyxf's cache, not converted anew.
    weights = (tag_dir / "model.safetensors").stat()
    by_hash, hash_dir, converted = load(commits["v1"][0], "hash")
    assert not converted and hash_dir == tag_dir and np.array_equal(by_hash, tag)
    assert (tag_dir / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns
    again, again_dir, converted = load("main", "again")
    assert not converted and again_dir == main_dir and np.array_equal(again, main)

    # One directory per (repo, commit), keyed as cache-key.json says; no staging leftovers.
    entries = sorted(p.name for p in main_dir.parent.iterdir())
    assert entries == sorted([main_dir.name, tag_dir.name])
    assert main_dir.name.startswith(commits["main"][0]) and tag_dir.name.startswith(commits["v1"][0])
    key = json.loads((tag_dir / "cache-key.json").read_text())
    assert key["source"] == {"repo_id": REPO, "commit": commits["v1"][0]}
    config = json.loads((tag_dir / "config.json").read_text())
    assert config["source"] == {"format": "hf-safetensors", "repo_id": REPO, "commit": commits["v1"][0]}


@needs_core
def test_concurrent_loads_share_one_conversion(hub, tmp_path):
    """Two processes loading the same new hub id at once: both get a complete model, and the cache
    ends with one directory."""
    cache, commits = hub
    pyxf_cache = tmp_path / "pyxf-cache"
    ids = random_ids(300, 7, seed=4)
    options = child_process_options()
    options["env"].update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYXF_CACHE=str(pyxf_cache))
    children = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOGITS), REPO, "", json.dumps(ids), tmp_path / f"{i}.npy"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
        for i in range(2)
    ]
    outputs = [child.communicate(timeout=600) for child in children]
    assert all(child.returncode == 0 for child in children), outputs
    expected = hf_logits(commits["main"][1], ids)
    for i in range(2):
        assert max_abs_err(np.load(tmp_path / f"{i}.npy"), expected) <= TOLERANCE
    assert outputs[0][0] == outputs[1][0]  # the same directory
    repo_dir = Path(outputs[0][0].strip()).parent
    assert [p.name for p in repo_dir.iterdir()] == [Path(outputs[0][0].strip()).name]


ERRORS = """
    import sys, json, pyxf
    for name, revision in json.loads(sys.argv[1]):
        try:
            pyxf.load(name, revision=revision)
            print(json.dumps(["loaded", name]))
        except Exception as e:
            print(json.dumps([type(e).__name__, str(e)]))
"""


@needs_core
def test_clear_errors(hub, tmp_path):
    cache, _ = hub
    cases = [("pyxf-test/unknown", None), (REPO, "v9"), ("pyxf-test/no-weights", None),
             ("not a model", None), ("./missing/dir", None)]
    result = run_pyxf(ERRORS, cache, tmp_path / "pyxf-cache", json.dumps(cases))
    errors = [json.loads(line) for line in result.stdout.splitlines()]
    assert errors[0][0] == "FileNotFoundError" and "'pyxf-test/unknown'" in errors[0][1]
    assert "HF_HUB_OFFLINE" in errors[0][1] and "Hugging Face cache" in errors[0][1]
    assert errors[1][0] == "FileNotFoundError" and "'v9'" in errors[1][1]
    assert errors[2][0] == "ValueError" and "no checkpoint" in errors[2][1] and "README.md" in errors[2][1]
    for kind, message in errors[3:]:
        assert kind == "FileNotFoundError" and "does not exist, and is not a Hugging Face hub id" in message

    # The CLI: one line, exit status 1.
    result = run_pyxf("import sys, pyxf.cli; sys.exit(pyxf.cli.main(sys.argv[1:]))", cache, tmp_path / "pyxf-cache",
                      "convert", "pyxf-test/unknown", tmp_path / "out", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "pyxf-test/unknown" in result.stderr
    assert not (tmp_path / "out").exists()


def test_revision_needs_a_hub_id(tmp_path):
    import pyxf

    with pytest.raises(ValueError, match="revision= is for Hugging Face hub ids"):
        pyxf.load(tmp_path, revision="main")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a GGUF file"):
        pyxf.load(tmp_path / "weights.bin")


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 by its hub id, and `pyxf convert org/name OUT`

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["A man is eating food.", "The new movie is awesome", "Das ist ein Satz.", "pyxf " * 60]

EMBED = """
    import sys, json, numpy as np, pyxf
    model = pyxf.load(sys.argv[1])
    np.save(sys.argv[3], model.encode(json.loads(sys.argv[2])))
"""


@needs_core
def test_minilm_by_hub_id_and_convert_cli(tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    import pyxf.hub

    cache = tmp_path / "hub-cache"
    commit = _commit("minilm")
    snapshot = add_snapshot(cache, MINILM, commit, pyxf.hub.minilm_source_path(), refs=["main"])
    expected = SentenceTransformer(str(snapshot), device="cpu").encode(TEXTS)

    run_pyxf(EMBED, cache, tmp_path / "pyxf-cache", MINILM, json.dumps(TEXTS), tmp_path / "loaded.npy")
    assert max_abs_err(np.load(tmp_path / "loaded.npy"), expected) <= TOLERANCE

    out = tmp_path / "minilm"
    result = run_pyxf("import sys, pyxf.cli; sys.exit(pyxf.cli.main(sys.argv[1:]))", cache, tmp_path / "pyxf-cache",
                      "convert", MINILM, out, "--revision", "main", "--quiet")
    assert result.stdout.strip() == f"wrote {out}"
    assert json.loads((out / "config.json").read_text())["source"]["commit"] == commit
    run_pyxf(EMBED, cache, tmp_path / "pyxf-cache", out, json.dumps(TEXTS), tmp_path / "converted.npy")
    assert max_abs_err(np.load(tmp_path / "converted.npy"), expected) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# GGUF files


@needs_core
def test_gguf_file_converts_once_into_the_cache(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tiny_files
    import torch

    gguf = tiny_files.write_gguf(tmp_path / "tiny.gguf", seed=5)
    ids = [5, 9, 30, 2, 17, 40, 3]
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")
        # An F16 file stays float16 (its F32 norms too), computed in float32.
        reference = half_precision_reference(reference, "float16")
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    pyxf_cache = tmp_path / "pyxf-cache"

    def load(label):
        result = run_pyxf(LOGITS, tmp_path / "hub-cache", pyxf_cache, gguf, "", json.dumps(ids), tmp_path / label)
        return np.load(tmp_path / label), Path(result.stdout.strip()), "converting" in result.stderr

    first, first_dir, converted = load("first.npy")
    assert converted and max_abs_err(first, expected) <= TOLERANCE
    assert first_dir.parent == pyxf_cache / "converted" / "gguf" and first_dir.name.startswith("tiny-")
    second, second_dir, converted = load("second.npy")
    assert not converted and second_dir == first_dir and np.array_equal(first, second)

    # Rewritten with other weights (a new mtime and header hash): a new conversion.
    tiny_files.write_gguf(gguf, seed=6)
    third, third_dir, converted = load("third.npy")
    assert converted and third_dir != first_dir and max_abs_err(third, first) > 1e-3


# ---------------------------------------------------------------------------------------------
# the README's reranking example, as written


def readme_block(containing):
    """The README's python code block that contains `containing`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    (block,) = [b for b in blocks if containing in b]
    return block


@needs_core
def test_readme_reranking_example_runs(tmp_path):
    """The example loads cross-encoder/ms-marco-MiniLM-L6-v2 by its hub id. Its weights cannot be
    fetched here, so the hub cache holds a tiny random BERT reranker under that id (with the
    ms-marco checkpoints' Identity activation): the example's code runs as written, offline,
    against it, and prints what CrossEncoder.rank gives on the same snapshot."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import CrossEncoder
    from test_encoders import build_hf

    repo_id = "cross-encoder/ms-marco-MiniLM-L6-v2"
    source = tmp_path / "reranker"
    build_hf("bert_rerank", source)
    config = json.loads((source / "config.json").read_text())
    config["sbert_ce_default_activation_function"] = "torch.nn.modules.linear.Identity"
    (source / "config.json").write_text(json.dumps(config))
    snapshot = add_snapshot(tmp_path / "hub-cache", repo_id, _commit("reranker"), source, refs=["main"])

    example = readme_block(".rank(")
    assert f'pyxf.load("{repo_id}")' in example
    # Run as written; then the example's own query and documents are printed for the reference.
    script = example + "\nimport json\nprint(json.dumps([query, documents]))\n"
    *lines, inputs = run_pyxf(script, tmp_path / "hub-cache", tmp_path / "pyxf-cache").stdout.splitlines()
    query, documents = json.loads(inputs)
    reference = CrossEncoder(str(snapshot), device="cpu")
    hits = reference.rank(query, documents, top_k=2, return_documents=True)
    assert lines[:2] == [f'{h["corpus_id"]} {round(h["score"], 3)} {h["text"]}' for h in hits]
    printed = "".join(lines[2:])  # classify's [2, 1] logits, as numpy prints them
    logits = [float(x) for x in re.findall(r"-?\d+\.\d*(?:e[-+]\d+)?", printed)]
    assert printed.startswith("[[") and printed.endswith("]]")
    assert max_abs_err(logits, reference.predict([(query, documents[0]), (query, documents[2])])) < 1e-6
