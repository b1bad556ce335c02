"""pyxf.Engine: continuous batching, paged KV cache, prefix cache, preemption, cancellation and the
per-request options, against transformers on tiny random checkpoints (greedy tokens, logits,
log-probabilities), and against the same request run alone where only independence can be asserted
(seeded sampling)."""

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers

SPEC = "llama_gqa_d80_llama3_bias"  # GQA, head_dim 80, biases: the KV layout's awkward case
NEW = 20


@pytest.fixture(scope="module")
def pair(tiny_models):
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models(SPEC)
    return hf, pyxf.load(model_dir)


@pytest.fixture(scope="module")
def reference(pair):
    """prompt (tuple) -> transformers' greedy continuation as pyxf returns it (EOS stripped)."""
    hf, px = pair
    cache = {}

    def greedy(prompt, max_new_tokens=NEW):
        key = (tuple(prompt), max_new_tokens)
        if key not in cache:
            cache[key] = helpers.strip_eos(helpers.hf_greedy(hf, list(prompt), max_new_tokens), px.eos_token_ids)
        return cache[key]

    return greedy


def prompts(px, lengths, seed=0):
    return [helpers.random_ids(px.vocab_size, n, seed + i) for i, n in enumerate(lengths)]


def page_mb(px, pages):
    import pyxf

    core = pyxf.threads.core()
    return pages * core.Engine.page_bytes(px._core_model) / 2**20


def wait_idle(engine, timeout=10.0):
    """The engine's stats once nothing runs or waits (the events of a finish come a moment before)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def test_requests_arriving_at_different_times_match_transformers(pair, reference):
    import pyxf

    hf, px = pair
    batch = prompts(px, [5, 150, 33, 64, 1, 97, 12])
    with pyxf.Engine(px, max_batch=4, prefill_chunk=48) as engine:
        first = [engine.submit(p, max_new_tokens=NEW) for p in batch[:3]]
        next(iter(first[0]))  # the first request is decoding when the rest arrive
        later = []
        for p in batch[3:]:
            later.append(engine.submit(p, max_new_tokens=NEW))
            time.sleep(0.005)
        results = [r.result(timeout=60) for r in first + later]
    for p, r in zip(batch, results):
        assert r.token_ids == reference(p)
        assert r.finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(r.token_ids)


def test_prefix_cache_hits_give_identical_outputs(pair, reference):
    import pyxf

    hf, px = pair
    shared = helpers.random_ids(px.vocab_size, 200, 11)
    a, b = shared + [5, 6, 7], shared + [9, 8]
    with pyxf.Engine(px) as engine:
        cold = engine.submit(a, max_new_tokens=NEW).result(timeout=60)
        warm = engine.submit(b, max_new_tokens=NEW).result(timeout=60)
        again = engine.submit(a, max_new_tokens=NEW).result(timeout=60)
        stats = engine.stats()
    assert cold.usage.cached_tokens == 0
    assert warm.usage.cached_tokens == 192  # three full 64-token pages of the shared prefix
    assert again.usage.cached_tokens == 192
    assert cold.token_ids == again.token_ids == reference(a)
    assert warm.token_ids == reference(b)
    assert stats["prefix_cache_hit_tokens"] == 384
    assert stats["prefix_cache_queried_tokens"] == 3 * 200 + 3 + 2 + 3


def test_prefix_cache_can_be_turned_off(pair, reference):
    import pyxf

    hf, px = pair
    p = helpers.random_ids(px.vocab_size, 130, 12)
    with pyxf.Engine(px, prefix_cache=False) as engine:
        results = [engine.submit(p, max_new_tokens=NEW).result(timeout=60) for _ in range(2)]
    assert [r.usage.cached_tokens for r in results] == [0, 0]
    assert results[1].token_ids == reference(p)


def test_a_small_kv_budget_queues_and_preempts_and_everything_finishes(pair, reference):
    import pyxf

    hf, px = pair
    batch = prompts(px, [40, 70, 10, 90, 55, 30, 65, 20], seed=100)
    # Five pages: at most two sequences of 40-90 prompt tokens + 60 new fit at once; decoding
    # sequences that cross a page boundary take pages from the newest ones.
    with pyxf.Engine(px, kv_cache_mb=page_mb(px, 5), max_batch=8, prefill_chunk=64) as engine:
        requests = [engine.submit(p, max_new_tokens=60) for p in batch]
        results = [r.result(timeout=120) for r in requests]
        stats = wait_idle(engine)
    for p, r in zip(batch, results):
        assert r.token_ids == reference(p, 60)
    assert stats["kv_blocks_total"] == 5
    assert stats["kv_blocks_used"] == 0


def test_a_request_larger_than_the_kv_budget_is_refused(pair):
    import pyxf

    hf, px = pair
    with pyxf.Engine(px, kv_cache_mb=page_mb(px, 2)) as engine:
        assert engine.context_length == 128
        with pytest.raises(ValueError, match="context length 128"):
            engine.submit(helpers.random_ids(px.vocab_size, 100, 1), max_new_tokens=40)


def test_seeded_sampling_does_not_depend_on_the_batch(pair):
    import pyxf

    hf, px = pair
    batch = prompts(px, [17, 60, 5, 120, 33], seed=200)
    options = dict(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1)
    with pyxf.Engine(px, max_batch=1) as alone:
        solo = [alone.submit(p, seed=1000 + i, **options).result(timeout=60).token_ids for i, p in enumerate(batch)]
    with pyxf.Engine(px, max_batch=8, prefill_chunk=32) as engine:
        requests = [engine.submit(p, seed=1000 + i, **options) for i, p in enumerate(batch)]
        together = [r.result(timeout=60).token_ids for r in requests]
    assert together == solo
    assert len({tuple(t) for t in together}) == len(batch)


def test_cancel_ends_a_request_and_frees_its_pages(pair):
    import pyxf

    hf, px = pair
    p = helpers.random_ids(px.vocab_size, 70, 3)
    with pyxf.Engine(px, max_batch=1) as engine:
        running = engine.submit(p, max_new_tokens=400)
        waiting = engine.submit(p, max_new_tokens=400)
        stream = iter(running)
        for _ in range(3):
            next(stream)
        running.cancel()
        waiting.cancel()
        r, w = running.result(timeout=30), waiting.result(timeout=30)
        stats = wait_idle(engine)
    assert r.finish_reason == w.finish_reason == "cancelled"
    assert 3 <= len(r.token_ids) < 400 and w.token_ids == []
    assert stats["kv_blocks_used"] == 0


def test_a_full_queue_is_refused_with_engine_full(pair):
    import pyxf

    hf, px = pair
    p = helpers.random_ids(px.vocab_size, 8, 4)
    with pyxf.Engine(px, max_batch=1, max_queue=1) as engine:
        running = engine.submit(p, max_new_tokens=500)
        next(iter(running))  # running: the queue is empty again
        queued = engine.submit(p, max_new_tokens=5)
        with pytest.raises(pyxf.EngineFull, match="queue is full"):
            engine.submit(p, max_new_tokens=5)
        running.cancel()
        assert queued.result(timeout=30).finish_reason in ("length", "stop")


def test_logprobs_match_torch(pair):
    import torch

    import pyxf

    hf, px = pair
    p = helpers.random_ids(px.vocab_size, 25, 5)
    with pyxf.Engine(px) as engine:
        r = engine.submit(p, max_new_tokens=8, logprobs=3).result(timeout=60)
    expected = torch.log_softmax(torch.from_numpy(helpers.hf_logits(hf, p + r.token_ids)), dim=-1).numpy()
    assert len(r.logprobs) == len(r.token_ids) == 8
    for i, (token, lp) in enumerate(zip(r.token_ids, r.logprobs)):
        row = expected[len(p) - 1 + i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(row[token], abs=1e-4)
        assert [t for t, _, _ in lp.top] == np.argsort(-row, kind="stable")[:3].tolist()
        assert [v for _, _, v in lp.top] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)


def test_logit_bias_and_openai_penalties_match_a_reference_on_transformers_logits(pair):
    import pyxf

    hf, px = pair
    p = helpers.random_ids(px.vocab_size, 12, 6)
    bias = {7: 3.0, 11: -100.0}
    presence, frequency = 0.8, 0.5
    with pyxf.Engine(px) as engine:
        got = engine.submit(p, max_new_tokens=12, logit_bias=bias, presence_penalty=presence,
                            frequency_penalty=frequency).result(timeout=60).token_ids
    # OpenAI's definition on transformers' logits: bias, then presence + frequency * count over
    # the generated tokens; greedy.
    expected = []
    for _ in range(12):
        logits = helpers.hf_logits(hf, p + expected)[-1].astype(np.float64)
        for t, b in bias.items():
            logits[t] += b
        for t in set(expected):
            logits[t] -= presence + frequency * expected.count(t)
        token = int(np.argmax(logits))
        if token in px.eos_token_ids:
            break
        expected.append(token)
    assert got == expected


def test_async_streams_deliver_the_same_tokens(pair, reference):
    import pyxf

    hf, px = pair
    batch = prompts(px, [9, 40, 75], seed=300)

    async def run(engine):
        async def one(p):
            request = engine.submit(p, max_new_tokens=NEW)
            ids = [t async for delta in request.stream_async() for t in delta.token_ids]
            result = await request.result_async()
            return ids, result

        return await asyncio.gather(*(one(p) for p in batch))

    with pyxf.Engine(px) as engine:
        outputs = asyncio.run(run(engine))
    for p, (ids, result) in zip(batch, outputs):
        assert ids == result.token_ids == reference(p)


def test_submit_checks_its_arguments(pair):
    import pyxf

    hf, px = pair
    with pyxf.Engine(px) as engine:
        with pytest.raises(ValueError, match="temperature"):
            engine.submit([3, 4], temperature=-1)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([3, px.vocab_size])
        with pytest.raises(ValueError, match="logit_bias token id"):
            engine.submit([3], logit_bias={px.vocab_size: 1.0})
        with pytest.raises(ValueError, match="logprobs"):
            engine.submit([3], logprobs=21)
        with pytest.raises(ValueError, match="has no tokenizer"):
            engine.submit("text")
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([3, 4])
    with pytest.raises(ValueError, match="max_batch"):
        pyxf.Engine(px, max_batch=0)


def test_generate_returns_details(pair, reference):
    import pyxf

    hf, px = pair
    batch = prompts(px, [10, 80], seed=400)
    results = pyxf.generate(px, batch, max_new_tokens=NEW, return_details=True)
    for p, r in zip(batch, results):
        assert isinstance(r, pyxf.Result)
        assert r.token_ids == reference(p)
        assert r.usage.prompt_tokens == len(p)
        assert r.finish_reason == ("length" if len(r.token_ids) == NEW else "stop")


def test_a_script_that_never_closes_its_engine_exits_cleanly(pair):
    """No close(), no `with`: the interpreter still exits with status 0 (the engine's threads are
    stopped before finalization)."""
    import subprocess
    import sys

    hf, px = pair
    script = (
        "import pyxf\n"
        f"m = pyxf.load({str(px.path)!r})\n"
        "e = pyxf.Engine(m)\n"
        "print(e.submit([3, 4, 5], max_new_tokens=4).result().finish_reason)\n"
    )
    import pyxf

    root = str(__import__("pathlib").Path(pyxf.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ("length", "stop")
