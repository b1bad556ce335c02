"""pyxf on a real two-node Ray cluster (tests/ray_cluster.py): Ray Data jobs whose outputs equal the
in-process ones (2,000 sentences embedded across 2 actors on 2 nodes, 64 greedy generations, chat
conversations, translations), weights shared between actors (PSS), a job that completes with every
row exactly once after an actor is killed, and Ray Serve with 2 replicas answering concurrent openai
clients, also while and after a replica is killed; `pyxf serve --ray` joining the cluster.

Slow (a cluster start, model loads in every actor): run with --run-slow (CI does)."""

import asyncio
import contextlib
import os
import signal
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Set before Ray is imported, which reads it once: this driver addresses the nodes on 127.0.0.1 as they
# do each other (see ray_cluster.local_cluster).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
pytest.importorskip("ray.data")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from ray import serve  # noqa: E402

import pyxf  # noqa: E402
from pyxf import hub  # noqa: E402
from pyxf.ray import Embedder, Generator, Translator, serve_app  # noqa: E402
from ray_cluster import DyingEmbedder, NodeTaggingEmbedder, local_cluster  # noqa: E402
from serving import API_KEY, Server, free_port  # noqa: E402

CHAT = hub.DEFAULT_MODEL_NAME
EMBED = hub.MINILM_MODEL_NAME
WORDS = ("the a one every small large red blue old new river city house garden music window night morning "
         "runs sleeps sings reads opens closes builds paints quietly slowly near under over beside with without "
         "friend teacher cat dog bird tree road book letter song").split()
EMBED_ATOL = 2e-5  # batches differ from the reference's: sums over other row counts may round differently


@contextlib.contextmanager
def time_limit(seconds):
    """TimeoutError in the test if the block runs longer than `seconds` (a hang fails, not blocks CI)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 16))) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=2) as cluster:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield cluster


@pytest.fixture(scope="module")
def encoder():
    return pyxf.load(hub.minilm_model_path())


@pytest.fixture(scope="module")
def chat_model():
    """SmolLM2 in float32: its linear layers switch kernels at 160 rows (quantized ones at 16), so a
    request's greedy tokens do not depend on how Ray batched it with others (docs/DESIGN.md)."""
    return pyxf.load(hub.float32_model_path())


def actors(n):
    """n actors, each loading the model once (Ray Data's actor pool)."""
    return ray.data.ActorPoolStrategy(size=n)


def rows_by_id(rows, n):
    rows = sorted(rows, key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(n)), "every row exactly once"
    return rows


# ---------------------------------------------------------------------------------------------
# Ray Data


def test_embed_job_across_two_nodes_equals_encode(cluster, encoder):
    texts = sentences(2000)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    with time_limit(600):
        rows = ds.map_batches(NodeTaggingEmbedder, fn_constructor_kwargs={"model": str(encoder.path)},
                              compute=actors(2), num_cpus=1, batch_size=200).take_all()
    rows = rows_by_id(rows, len(texts))
    assert len({r["node"] for r in rows}) == 2, "the two actors ran on the two nodes"
    got = np.stack([r["embedding"] for r in rows])
    assert got.dtype == np.float32 and got.shape == (2000, encoder.config["hidden_size"])
    np.testing.assert_allclose(got, encoder.encode(texts), rtol=0, atol=EMBED_ATOL)


def test_generation_job_equals_generate(cluster, chat_model):
    prompts = [f"Question {i}: what is {i % 9 + 1} plus {i % 7 + 2}? Answer:" for i in range(64)]
    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    with time_limit(600):
        rows = ds.map_batches(Generator, fn_constructor_kwargs={"model": str(chat_model.path), "max_new_tokens": 12},
                              compute=actors(2), num_cpus=1, batch_size=16).take_all()
    rows = rows_by_id(rows, len(prompts))
    expected = pyxf.generate(chat_model, prompts, max_new_tokens=12, return_details=True)
    assert [r["text"] for r in rows] == [e.text for e in expected]
    assert [r["finish_reason"] for r in rows] == [e.finish_reason for e in expected]
    assert [r["prompt_tokens"] for r in rows] == [e.usage.prompt_tokens for e in expected]
    assert [r["completion_tokens"] for r in rows] == [e.usage.completion_tokens for e in expected]


def test_chat_job_equals_generate(cluster, chat_model):
    questions = ["What is the capital of France?", "Name a colour.", "Say hi.", "What is 2 + 2?"]
    conversations = [[{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": q}]
                     for q in questions]
    ds = ray.data.from_items([{"id": i, "messages": m} for i, m in enumerate(conversations)])
    with time_limit(300):
        rows = ds.map_batches(Generator, fn_constructor_kwargs={"model": str(chat_model.path), "max_new_tokens": 10},
                              compute=actors(1), num_cpus=1, batch_size=2).take_all()
    rows = rows_by_id(rows, len(conversations))
    assert [r["text"] for r in rows] == [pyxf.generate(chat_model, messages=m, max_new_tokens=10) for m in conversations]


def test_translation_job_equals_translate(cluster, tmp_path_factory):
    from helpers import build_marian
    from pyxf.convert import convert

    root = tmp_path_factory.mktemp("ray-marian")
    build_marian(root / "hf")
    model = pyxf.load(convert(root / "hf", root / "pyxf", progress=False))
    texts = sentences(24, seed=1)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    options = dict(beam_size=2, max_length=16)
    with time_limit(300):
        rows = ds.map_batches(Translator, fn_constructor_kwargs={"model": str(model.path), **options},
                              compute=actors(2), num_cpus=1, batch_size=6).take_all()
    rows = rows_by_id(rows, len(texts))
    assert [r["translation"] for r in rows] == pyxf.translate(model, texts, **options)


def test_actors_share_the_memory_mapped_weights(cluster, encoder):
    """Two actors on the machine map the same weight file: each one's PSS counts about half of the
    pages its RSS counts (the test process maps the file too)."""
    actors = [ray.remote(Embedder).options(num_cpus=1).remote(str(encoder.path)) for _ in range(2)]
    batch = {"text": np.array(sentences(64, seed=2))}
    with time_limit(120):
        ray.get([a.__call__.remote(batch) for a in actors])
        usage = ray.get([a.memory.remote() for a in actors])
    for actor in actors:
        ray.kill(actor)
    for u in usage:
        print(f"actor: RSS {u['rss'] / 2**20:.0f} MiB, PSS {u['pss'] / 2**20:.0f} MiB; "
              f"weights RSS {u['weights_rss'] / 2**20:.1f} MiB, PSS {u['weights_pss'] / 2**20:.1f} MiB")
        assert u["weights_rss"] > 10 * 2**20
        assert u["weights_pss"] < 0.6 * u["weights_rss"]
        assert u["pss"] < u["rss"]


def test_job_with_a_killed_actor_processes_every_row_once(cluster, encoder, tmp_path):
    marker = tmp_path / "an-actor-died"
    texts = sentences(600, seed=3)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    with time_limit(600):
        rows = ds.map_batches(DyingEmbedder, fn_constructor_kwargs={"model": str(encoder.path), "marker": str(marker)},
                              compute=actors(2), num_cpus=1, batch_size=50).take_all()
    assert marker.exists(), "an actor was killed mid-job"
    rows = rows_by_id(rows, len(texts))
    np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), encoder.encode(texts), rtol=0,
                               atol=EMBED_ATOL)


# ---------------------------------------------------------------------------------------------
# Ray Serve


def chat_reference(model, questions, max_tokens):
    """What pyxf.generate gives each chat request (greedy)."""
    ids = [model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                      add_generation_prompt=True))
           for q in questions]
    return [model.tokenizer.decode(out) for out in pyxf.generate(model, ids, max_new_tokens=max_tokens)]


def replica_names():
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::pyxf#")]


def running_replicas():
    deployment = serve.status().applications["pyxf"].deployments["pyxf"]
    return deployment.replica_states.get("RUNNING", 0)


def async_client(url, max_retries=0):
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=max_retries, timeout=120)


async def ask(url, question, max_tokens, max_retries=0):
    reply = await async_client(url, max_retries).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


async def ask_streaming(url, question, max_tokens, first_token):
    stream = await async_client(url).chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True)
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            first_token.set()
    return text


def cut_short(outcome):
    """How a stream on a replica that dies ends: cut (the connection closes after the 200 and some
    events) or, if no event was sent yet, a 500 from Serve's proxy."""
    return isinstance(outcome, openai.APIConnectionError) or (
        isinstance(outcome, openai.InternalServerError) and outcome.status_code == 500)


class TestServe:
    @pytest.fixture(scope="class")
    def url(self, cluster, encoder, chat_model):
        port = free_port()
        with time_limit(300):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            models = [f"{CHAT}={chat_model.path}", f"{EMBED}={encoder.path}"]
            serve.run(serve_app(models, replicas=2, threads=1, api_key=API_KEY), name="pyxf", route_prefix="/")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()

    def test_two_replicas_answer_32_concurrent_clients(self, url, chat_model):
        questions = [f"Give me one word about the number {i}." for i in range(32)]

        async def all_at_once():
            return await asyncio.gather(*[ask(url, q, 12) for q in questions], return_exceptions=True)

        with time_limit(300):
            answers = asyncio.run(all_at_once())
        failures = [a for a in answers if isinstance(a, Exception)]
        assert not failures, failures[:3]
        assert answers == chat_reference(chat_model, questions, 12)
        assert running_replicas() == 2

    def test_same_routes_errors_and_streaming_as_the_server(self, url, encoder, chat_model):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        with time_limit(180):
            assert sorted(m.id for m in client.models.list()) == sorted([CHAT, EMBED])
            vectors = client.embeddings.create(model=EMBED, input=["first text", "second text"])
            np.testing.assert_allclose([d.embedding for d in vectors.data], encoder.encode(["first text", "second text"]),
                                       rtol=0, atol=1e-6)
            pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0, stream=True)
                if c.choices]
            assert "".join(pieces) == chat_reference(chat_model, ["Say hi"], 8)[0]
            with pytest.raises(openai.NotFoundError) as missing:
                client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
            assert missing.value.body["code"] == "model_not_found"
            unauthorized = httpx.post(f"{url}/v1/completions", json={"model": CHAT, "prompt": "x"}, timeout=30)
            assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
            assert "pyxf_requests_running" in httpx.get(f"{url}/metrics", timeout=30).text

    def test_a_killed_replica_fails_cleanly_and_is_replaced(self, url, chat_model):
        """In flight when a replica dies: streams complete or end cleanly (a connection error, or a 500
        before their first event), plain requests retried by the openai client (its default, 2 retries)
        all complete; nothing hangs. Then 32 new
        requests all succeed, and Serve starts a replacement replica."""
        questions = [f"Tell me a short story about a {w}." for w in WORDS[:16]]
        expected = chat_reference(chat_model, questions, 48)

        async def kill_during_requests():
            first_token = asyncio.Event()
            streams = [asyncio.create_task(ask_streaming(url, q, 48, first_token)) for q in questions[:8]]
            plain = [asyncio.create_task(ask(url, q, 48, max_retries=2)) for q in questions[8:]]
            await asyncio.wait_for(first_token.wait(), 120)
            ray.kill(ray.get_actor(replica_names()[0], namespace="serve"))
            return await asyncio.gather(*streams, return_exceptions=True), await asyncio.gather(*plain, return_exceptions=True)

        with time_limit(300):
            streamed, plain = asyncio.run(kill_during_requests())
        for text, want in zip(streamed, expected[:8]):
            assert text == want or cut_short(text), text
        assert any(cut_short(t) for t in streamed), "some streams were on the killed replica"
        assert plain == expected[8:]

        after = [f"Give me one word about the number {i}." for i in range(32)]

        async def all_at_once():
            return await asyncio.gather(*[ask(url, q, 12) for q in after], return_exceptions=True)

        with time_limit(300):
            answers = asyncio.run(all_at_once())
        assert [a for a in answers if isinstance(a, Exception)] == []
        assert answers == chat_reference(chat_model, after, 12)
        with time_limit(300):
            while running_replicas() < 2 or len(replica_names()) < 2:
                time.sleep(1)


def wait_for_log(path, text, timeout):
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{path.read_text()}"
        time.sleep(0.5)


def test_pyxf_serve_ray_joins_the_cluster(cluster, chat_model, tmp_path):
    """`pyxf serve --ray --replicas 2 --draft-model DIR --no-huge-pages` on the running cluster: the
    replicas load the draft model and draft with it, the greedy text is plain decoding's, and SIGTERM
    stops its app (exit 0)."""
    with time_limit(400):
        server = Server(["--ray", "--ray-address", cluster.address, "--replicas", "2", "--threads", "1",
                         "--draft-model", str(chat_model.path), "--no-huge-pages", f"{CHAT}={chat_model.path}"],
                        log_path=tmp_path / "serve.log")
        try:
            wait_for_log(tmp_path / "serve.log", "OpenAI-compatible API at", 300)
            client = server.openai(timeout=120)
            prompts = ["Say hi", "Name a colour", "Count to three", "Say bye"] * 2
            expected = chat_reference(chat_model, prompts, 8)
            for prompt, want in zip(prompts, expected):
                reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=8, temperature=0)
                assert reply.choices[0].message.content == want
            assert len(replica_names()) == 2
            # Serve runs a proxy on each node, both on the port (SO_REUSEPORT), and each prefers its
            # node's replica: the client's one connection reached one replica, while each /health
            # (a new connection) reaches either. The replica that served the requests drafted.
            proposed = [server.stats(CHAT)["draft_tokens_proposed_total"] for _ in range(64)]
            assert max(proposed) > 0, proposed
        finally:
            returncode = server.stop()
        assert returncode == 0, (tmp_path / "serve.log").read_text()
        assert "pyxf" not in serve.status().applications
