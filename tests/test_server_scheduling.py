"""`pyxf serve` under pressure, each test on its own server process: a KV budget too small for all
requests at once (they queue and all finish, with the outputs they get alone), a full queue (503
with Retry-After) and a graceful SIGTERM (running and queued requests finish, exit code 0)."""

import asyncio
import json
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("openai")
import httpx  # noqa: E402

import pyxf  # noqa: E402
from pyxf import hub  # noqa: E402
from serving import Server  # noqa: E402

CHAT = "chat"
BLOCK_TOKENS = 64


@pytest.fixture(scope="module")
def model():
    return pyxf.load(hub.float32_model_path())  # batch-invariant kernels: outputs equal to running alone


def kv_mb_for_blocks(model, blocks):
    """A --kv-cache-mb that holds `blocks` 64-token blocks of float32 keys and values."""
    c = model.config
    block_bytes = 2 * c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * 4 * BLOCK_TOKENS
    return (blocks + 0.5) * block_bytes / (1 << 20)


class Monitor(threading.Thread):
    """Samples the engine's running and waiting counts from /health until stopped."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.samples = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            stats = self.server.stats(CHAT)
            self.samples.append((stats["running"], stats["waiting"]))
            time.sleep(0.01)

    def stop(self):
        self.stopping.set()
        self.join()


def test_small_kv_budget_queues_requests_and_all_finish(model, tmp_path):
    server = Server([f"{CHAT}={hub.float32_model_path()}", "--kv-cache-mb", f"{kv_mb_for_blocks(model, 3):.3f}"],
                    log_path=tmp_path / "server.log")
    try:
        assert server.stats(CHAT)["kv_blocks_total"] == 3  # room for about 3 requests of < 64 tokens
        topics = ["the sea", "Rome", "prime numbers", "tomato soup", "Mars", "learning French", "rain", "owls"]
        requests = [[{"role": "user", "content": f"One sentence about {topic}."}] for topic in topics]

        async def run_all():
            client = server.async_openai()
            return await asyncio.gather(*(
                client.chat.completions.create(model=CHAT, messages=m, max_tokens=16, temperature=0) for m in requests
            ))

        monitor = Monitor(server)
        monitor.start()
        try:
            replies = asyncio.run(run_all())
        finally:
            monitor.stop()
        for messages, reply in zip(requests, replies):
            assert reply.choices[0].message.content == pyxf.generate(model, messages=messages, max_new_tokens=16)
        assert max(waiting for _, waiting in monitor.samples) > 0  # some had to wait for blocks
        assert max(running for running, _ in monitor.samples) <= 3
        assert server.stats(CHAT)["kv_blocks_used"] == 0
    finally:
        assert server.stop() == 0, server.log_text()


def test_float16_kv_cache_holds_twice_the_blocks(model, tmp_path):
    """--kv-cache-dtype float16 on a float32 model: the same --kv-cache-mb holds twice the 64-token
    blocks, the server says which cache it keeps, and its replies are what pyxf.generate gives with
    that cache."""
    budget = f"{kv_mb_for_blocks(model, 3):.3f}"
    server = Server([f"{CHAT}={hub.float32_model_path()}", "--kv-cache-mb", budget, "--kv-cache-dtype", "float16"],
                    log_path=tmp_path / "server.log")
    try:
        c = model.config
        half_block = 2 * c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * 2 * BLOCK_TOKENS
        assert server.stats(CHAT)["kv_blocks_total"] == int(float(budget) * (1 << 20) // half_block) >= 6
        assert "chat, completions, float16 KV cache" in server.log_text()
        half = pyxf.load(hub.float32_model_path(), kv_cache_dtype="float16")
        messages = [{"role": "user", "content": "One sentence about owls."}]
        reply = server.openai().chat.completions.create(model=CHAT, messages=messages, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content == pyxf.generate(half, messages=messages, max_new_tokens=16)
    finally:
        assert server.stop() == 0, server.log_text()


def _stream(server, body, events):
    """Reads a streamed completion to its end into `events` (the decoded JSON chunks, then "[DONE]")."""
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[len("data:"):].strip()
                events.append(data if data == "[DONE]" else json.loads(data))


def test_full_queue_answers_503_and_sigterm_lets_requests_finish(model, tmp_path):
    server = Server([f"{CHAT}={hub.float32_model_path()}", "--max-batch", "1", "--max-queue", "1"],
                    log_path=tmp_path / "server.log")
    never_stop = {str(t): -100 for t in model.eos_token_ids}
    prompt = "The history of the lighthouse"
    body = {"model": CHAT, "prompt": prompt, "max_tokens": 96, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": never_stop}
    streams = [[], []]
    threads = [threading.Thread(target=_stream, args=(server, body, events)) for events in streams]
    try:
        threads[0].start()
        _wait(lambda: server.stats(CHAT)["running"] == 1)
        threads[1].start()
        _wait(lambda: server.stats(CHAT)["waiting"] == 1)
        # One running (max_batch 1), one waiting (max_queue 1): a third is refused.
        response = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=60)
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "server_overloaded"

        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no longer accepting connections
            httpx.get(f"{server.url}/health", timeout=5)
        for thread in threads:
            thread.join(120)
        assert server.process.wait(60) == 0, server.log_text()
    finally:
        server.stop(signal.SIGKILL)

    expected = pyxf.generate(model, prompt, max_new_tokens=96, logit_bias={int(t): -100 for t in never_stop})
    for events in streams:  # both finished in full: the running one and the one still queued
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 96
        assert "".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"]) == expected


def test_no_model_serves_the_default_models(tmp_path):
    server = Server([], log_path=tmp_path / "server.log")
    try:
        client = server.openai()
        assert sorted(m.id for m in client.models.list()) == sorted([hub.DEFAULT_MODEL_NAME, hub.MINILM_MODEL_NAME])
        reply = client.chat.completions.create(model=hub.DEFAULT_MODEL_NAME, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hi"}])
        default = pyxf.load(hub.default_model_path())
        assert reply.choices[0].message.content == pyxf.generate(
            default, messages=[{"role": "user", "content": "Say hi"}], max_new_tokens=8)
        embedding = client.embeddings.create(model=hub.MINILM_MODEL_NAME, input="hi").data[0].embedding
        assert len(embedding) == 384
    finally:
        assert server.stop() == 0, server.log_text()


def _wait(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_draft_model_speculates_and_keeps_the_greedy_text(model, tmp_path):
    """`--draft-model`: the 4-bit copy of the model drafts for the float32 model; concurrent greedy
    requests (batched together) get exactly the text plain decoding gives."""
    server = Server([f"{CHAT}={hub.float32_model_path()}", "--draft-model", hub.default_model_path()],
                    log_path=tmp_path / "server.log")
    try:
        topics = ["the sea", "Rome", "owls"]
        requests = [[{"role": "user", "content": f"One sentence about {topic}."}] for topic in topics]

        async def run_all():
            client = server.async_openai()
            return await asyncio.gather(*(
                client.chat.completions.create(model=CHAT, messages=m, max_tokens=24, temperature=0) for m in requests
            ))

        replies = asyncio.run(run_all())
        stats = server.stats(CHAT)
    finally:
        server.stop()
    for messages, reply in zip(requests, replies):
        assert reply.choices[0].message.content == pyxf.generate(model, messages=messages, max_new_tokens=24)
    assert stats["draft_tokens_accepted_total"] > 0


def test_a_draft_model_that_cannot_draft_is_a_startup_error(tmp_path):
    with pytest.raises(RuntimeError, match="pyxf: error: the draft model must be a decoder"):
        Server([f"{CHAT}={hub.default_model_path()}", "--draft-model", hub.minilm_model_path()],
               log_path=tmp_path / "server.log")


def test_prompt_lookup_speculates_and_keeps_the_greedy_text(model, tmp_path):
    """`--prompt-lookup --num-draft-tokens 6`: requests that repeat their prompt draft from it; the
    greedy text is what plain decoding gives, and the server's metrics count the drafts."""
    server = Server([f"{CHAT}={hub.float32_model_path()}", "--prompt-lookup", "--num-draft-tokens", "6"],
                    log_path=tmp_path / "server.log")
    try:
        assert "drafting 6 tokens by prompt lookup" in server.log_text()
        passage = ("The harbour wakes before the town does. Fishing boats slip out past the breakwater, gulls "
                   "follow them, and the bakery on the quay lights its ovens.")
        messages = [{"role": "user", "content": f"Repeat this text exactly: {passage}"}]
        reply = server.openai().chat.completions.create(model=CHAT, messages=messages, max_tokens=40, temperature=0)
        stats = server.stats(CHAT)
    finally:
        assert server.stop() == 0, server.log_text()
    assert reply.choices[0].message.content == pyxf.generate(model, messages=messages, max_new_tokens=40)
    assert stats["draft_tokens_proposed_total"] > 0 and stats["draft_tokens_accepted_total"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--prompt-lookup", "--draft-model", "x"], "a draft model or by prompt lookup, not both"),
    (["--num-draft-tokens", "4"], "num_draft_tokens: only with a draft model or prompt lookup"),
    (["--prompt-lookup", "--num-draft-tokens", "0"], r"num_draft_tokens must be in \[1, 32\]"),
])
def test_drafting_flags_that_cannot_work_are_startup_errors(tmp_path, flags, message):
    with pytest.raises(RuntimeError, match=message):
        Server([f"{CHAT}={hub.default_model_path()}", *flags], log_path=tmp_path / "server.log")
