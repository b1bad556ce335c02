"""Thread safety (README "Threads"): one model shared by many Python threads, sessions one per
thread, one pyxf.Engine shared by all, and pyxf.set_num_threads changing while work runs.

Eight threads start together (a barrier) and run generate, a shared engine, sessions, encode and
translate on shared models; every output must be identical to the same call run alone, one after
another, and those sequential outputs are anchored to the reference libraries (transformers,
sentence-transformers, the torch Transformer). tools/sanitize.sh runs this file under TSan too.
"""

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers

import pyxf

THREADS = 8
NEW = 12
SPEC = "llama_mqa_d32"
# Under ThreadSanitizer (tools/sanitize.sh thread) the outputs are compared between threads and
# sequential runs only: the reference libraries (torch) run 20x slower there, and their agreement
# is checked by the normal and the ASan runs of this file.
ANCHORED = "thread" not in pyxf.info()["sanitize"]


def run_together(fn, items, timeout=600):
    """fn(item) for every item, each in its own thread, all released at once; results in order.
    Any exception in a thread fails the test."""
    barrier = threading.Barrier(len(items))
    results, errors = [None] * len(items), []

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def decoder(tiny_models):
    helpers.require_core()
    hf, model_dir = tiny_models(SPEC)
    return hf, pyxf.load(model_dir)


@pytest.fixture(scope="module")
def prompts(decoder):
    _, px = decoder
    return [helpers.random_ids(px.vocab_size, n, seed) for seed, n in enumerate((3, 9, 17, 30, 64, 5, 41, 100))]


@pytest.fixture(scope="module")
def sequential(decoder, prompts):
    """Each prompt alone: greedy (checked against transformers) and seeded sampling."""
    hf, px = decoder
    greedy = [pyxf.generate(px, [p], max_new_tokens=NEW)[0] for p in prompts]
    for p, got in zip(prompts, greedy if ANCHORED else ()):
        assert got == helpers.strip_eos(helpers.hf_greedy(hf, p, NEW), px.eos_token_ids)
    sampled = [pyxf.generate(px, [p], max_new_tokens=NEW, temperature=0.8, top_k=20, seed=i)[0]
               for i, p in enumerate(prompts)]
    return greedy, sampled


def test_generate_from_8_threads_matches_sequential(decoder, prompts, sequential):
    _, px = decoder
    greedy, sampled = sequential
    assert run_together(lambda p: pyxf.generate(px, [p], max_new_tokens=NEW)[0], prompts) == greedy
    seeded = list(enumerate(prompts))
    assert run_together(lambda item: pyxf.generate(px, [item[1]], max_new_tokens=NEW, temperature=0.8, top_k=20,
                                                   seed=item[0])[0], seeded) == sampled


def test_one_engine_shared_by_8_threads(decoder, prompts, sequential):
    """Threads submit to and stream from one engine; cancelling one's request mid-way leaves the
    others' outputs unchanged."""
    _, px = decoder
    greedy, sampled = sequential
    with pyxf.Engine(px, max_batch=16) as engine:
        def ask(i):
            tokens = []
            for delta in engine.submit(prompts[i], max_new_tokens=NEW):
                tokens += delta.token_ids
            seeded = engine.submit(prompts[i], max_new_tokens=NEW, temperature=0.8, top_k=20, seed=i).result()
            doomed = engine.submit(prompts[i], max_new_tokens=NEW)
            doomed.cancel()
            assert doomed.result().finish_reason in ("cancelled", "length")
            return tokens, seeded.token_ids

        results = run_together(ask, list(range(THREADS)))
    assert [r[0] for r in results] == greedy
    assert [r[1] for r in results] == sampled


def test_sessions_one_per_thread(decoder, prompts):
    hf, px = decoder

    def feed(prompt):
        session = px.session()
        first = session.feed(prompt[:-1])
        last = session.feed(prompt[-1:])
        return np.concatenate([first, last])

    alone = [feed(p) for p in prompts]
    for p, logits in zip(prompts[:3], alone if ANCHORED else ()):
        assert helpers.max_abs_err(logits, helpers.hf_logits(hf, p)) < 1e-3
    together = run_together(feed, prompts)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    helpers.require_core()
    pytest.importorskip("sentence_transformers")
    from pyxf import hub

    try:
        return pyxf.load(hub.minilm_model_path())
    except Exception as e:  # noqa: BLE001 -- no network: skipped, as in test_minilm.py
        pytest.skip(f"all-MiniLM-L6-v2 is not available: {e}")


TEXTS = ["The cat sat on the mat.", "A man is eating food.", "Interest rates were raised by the central bank.",
         "東京は日本の首都です。", "", "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
         "The quick brown fox jumps over the lazy dog. " * 8, "emoji 🙂🚀 and symbols"]


def test_encode_from_8_threads(minilm):
    from sentence_transformers import SentenceTransformer

    from pyxf import hub

    alone = [minilm.encode([t, TEXTS[0]]) for t in TEXTS]
    if ANCHORED:
        reference = SentenceTransformer(str(hub.minilm_source_path()), device="cpu").encode(TEXTS)
        np.testing.assert_allclose(np.stack([a[0] for a in alone]), reference, atol=1e-4)
    together = run_together(lambda t: minilm.encode([t, TEXTS[0]]), TEXTS)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    helpers.require_core()
    import math
    import warnings

    from pyxf.convert import convert
    from pyxf.torch_models import TransformerSeq2Seq

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerSeq2Seq(src_vocab_size=50, tgt_vocab_size=60, d_model=64, nhead=4, num_encoder_layers=2,
                                   num_decoder_layers=2, dim_feedforward=96, dropout=0.0, max_len=128).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_((0.3 if "embed" in name else 1.2 / math.sqrt(p.shape[1])) * torch.randn_like(p))
    root = tmp_path_factory.mktemp("threads-seq2seq")
    model.save_pretrained(root / "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, pyxf.load(convert(root / "torch", root / "pyxf", progress=False))


def test_translate_from_8_threads(seq2seq):
    model, px = seq2seq
    rng = np.random.default_rng(3)
    sources = [rng.integers(3, 50, n).tolist() + [2] for n in (2, 5, 9, 14, 20, 27, 33, 40)]
    greedy = [pyxf.generate(px, s, max_new_tokens=12) for s in sources]
    for s, got in zip(sources[:3], greedy if ANCHORED else ()):
        expected = model.greedy(torch.tensor([s]), 12)[0].tolist()
        assert got == (expected[: expected.index(2)] if 2 in expected else expected)
    beams = [pyxf.translate(px, [s], beam_size=3, max_length=12, num_hypotheses=2, return_scores=True)[0]
             for s in sources]
    assert run_together(lambda s: pyxf.generate(px, s, max_new_tokens=12), sources) == greedy
    together = run_together(lambda s: pyxf.translate(px, [s], beam_size=3, max_length=12, num_hypotheses=2,
                                                       return_scores=True)[0], sources)
    assert together == beams


def test_everything_at_once_while_the_thread_count_changes(decoder, prompts, sequential, seq2seq):
    """Generate, a shared engine, sessions and translation run in eight threads while a ninth sets
    the process-wide thread count back and forth; nothing races and every output is unchanged
    (each step's partition of the work changes, the floats of a row do not)."""
    _, px = decoder
    _, s2s = seq2seq
    greedy, _ = sequential
    source = [5, 9, 13, 2]
    translation = pyxf.translate(s2s, [source], beam_size=2, max_length=10)[0]
    logits = px.session().feed(prompts[2])
    before = pyxf.info()["num_threads"]
    stop = threading.Event()

    def flip():
        n = 0
        while not stop.is_set():
            pyxf.set_num_threads(1 + n % 3)
            n += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with pyxf.Engine(px) as engine:
            jobs = [
                lambda: pyxf.generate(px, [prompts[0]], max_new_tokens=NEW)[0] == greedy[0],
                lambda: pyxf.generate(px, [prompts[4]], max_new_tokens=NEW)[0] == greedy[4],
                lambda: engine.submit(prompts[1], max_new_tokens=NEW).result().token_ids == greedy[1],
                lambda: engine.submit(prompts[7], max_new_tokens=NEW).result().token_ids == greedy[7],
                lambda: np.array_equal(px.session().feed(prompts[2]), logits),
                lambda: pyxf.translate(s2s, [source], beam_size=2, max_length=10)[0] == translation,
                lambda: pyxf.generate(px, [prompts[3], prompts[5]], max_new_tokens=NEW) == [greedy[3], greedy[5]],
                lambda: engine.submit(prompts[6], max_new_tokens=NEW).result().token_ids == greedy[6],
            ]
            assert run_together(lambda job: job(), jobs) == [True] * len(jobs)
    finally:
        stop.set()
        flipper.join()
        pyxf.set_num_threads(before)
    assert pyxf.info()["num_threads"] == before


def test_work_started_from_a_new_thread_follows_set_num_threads():
    """OpenMP keeps thread counts per calling thread; the core makes each call adopt pyxf's
    process-wide count, so a thread that never called set_num_threads runs teams of that size
    rather than OpenMP's default (one per CPU)."""
    before = pyxf.info()["num_threads"]

    def team_in_new_thread(n):
        pyxf.set_num_threads(n)
        sizes = []
        thread = threading.Thread(target=lambda: sizes.append(pyxf._core.ops.team_size()))
        thread.start()
        thread.join()
        return sizes[0]

    try:
        assert [team_in_new_thread(1), team_in_new_thread(3)] == [1, 3]
    finally:
        pyxf.set_num_threads(before)


def test_calls_from_python_leave_no_worker_threads_behind(decoder):
    """A call from a Python thread ends its OpenMP workers when it returns: workers left behind by
    Python threads would outnumber the CPUs beside the engine's team, and libgomp then puts every
    team to sleep at each barrier (decoding at half speed after one prefill from Python)."""
    import os

    _, px = decoder
    prompt = helpers.random_ids(px.vocab_size, 200, 0)
    before = pyxf.info()["num_threads"]
    try:
        pyxf.set_num_threads(3)
        threads_before = set(os.listdir("/proc/self/task"))
        px.session().feed(prompt, all_logits=False)  # the packed GEMM's parallel regions
        assert set(os.listdir("/proc/self/task")) - threads_before == set()
    finally:
        pyxf.set_num_threads(before)


def test_one_session_fed_from_two_threads_never_overflows(decoder):
    """A session is meant for one thread; fed from several at once, the feeds run one after the
    other and the one that no longer fits is refused (before, both passed the length check and
    then wrote past the cache)."""
    _, px = decoder
    session = px.session(context_length=64)
    chunks = [helpers.random_ids(px.vocab_size, 40, seed) for seed in range(THREADS)]
    outcomes = run_together(lambda ids: _feed_or_error(session, ids), chunks)
    assert outcomes.count("fed") == 1 and outcomes.count("refused") == THREADS - 1
    assert session.position == 40


def _feed_or_error(session, ids):
    try:
        session._session.feed(np.asarray(ids, dtype=np.int32), False)  # the core's own check, not Python's
        return "fed"
    except ValueError as e:
        assert "exceeds the context length" in str(e)
        return "refused"
