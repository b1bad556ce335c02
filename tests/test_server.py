"""`pyxf serve` as a real process, driven with the official `openai` client and httpx: chat and
completions (plain, streamed, n, logprobs), embeddings equal to Model.encode, 8 concurrent clients
each getting what pyxf.generate gives that request alone, cancellation of a client that leaves,
prefix-cache hits, the error bodies, the API key and /metrics."""

import asyncio
import base64
import json
import math

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

import pyxf  # noqa: E402
from pyxf import hub  # noqa: E402
from serving import API_KEY, Server  # noqa: E402

# The float32 default model: what a request gets must not depend on its batch, and the float32 kernels
# guarantee that bit for bit (the quantized default's batch-1 and batched kernels round differently).
CHAT = hub.FLOAT32_MODEL_NAME
EMBED = hub.MINILM_MODEL_NAME
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# About 220 tokens: three full 64-token blocks of prefix shared by the prefix-cache test's requests.
SYSTEM_PROMPT = (
    "You are a patient assistant for a small public library. You answer questions about opening hours, "
    "borrowing rules, the reading room, the children's corner, the local history archive and the monthly "
    "book club. Keep answers short and friendly, never invent rules, and when you do not know something, "
    "say so and suggest asking the front desk. Opening hours are nine to six on weekdays and ten to two "
    "on Saturdays; the library is closed on Sundays and public holidays. Members may borrow up to eight "
    "books for three weeks and renew them twice unless another member has reserved them. Overdue books "
    "cost ten cents a day, lost cards are replaced at the front desk for one dollar, and the reading room "
    "asks for quiet after five. The children's corner has story time on Wednesday mornings, the archive "
    "opens by appointment, and the book club meets on the first Thursday of every month at seven."
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The float32 default model and all-MiniLM-L6-v2, an API key, a 1 MiB body limit."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    models = [f"{CHAT}={hub.float32_model_path()}", f"{EMBED}={hub.minilm_model_path()}"]
    s = Server([*models, "--max-body-mb", "1"], api_key=API_KEY, log_path=log)
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def model():
    return pyxf.load(hub.float32_model_path())


@pytest.fixture(scope="module")
def encoder():
    return pyxf.load(hub.minilm_model_path())


def alone(model, messages, **sampling):
    """(new token ids, text) that pyxf.generate gives this chat request on its own."""
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = pyxf.generate(model, model.tokenizer.encode(text), **sampling)
    return ids, model.tokenizer.decode(ids)


def prompt_length(model, messages):
    return len(model.tokenizer.encode(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)))


# ---------------------------------------------------------------------------------------------
# chat and completions


def test_models_lists_both_models(client):
    assert sorted(m.id for m in client.models.list()) == sorted([CHAT, EMBED])
    assert client.models.retrieve(CHAT).id == CHAT


def test_chat_greedy_is_what_generate_gives(client, model):
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=16, temperature=0)
    ids, text = alone(model, QUESTION, max_new_tokens=16)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == ("length" if len(ids) == 16 else "stop")
    assert reply.object == "chat.completion" and reply.model == CHAT and reply.id.startswith("chatcmpl-")
    assert reply.usage.prompt_tokens == prompt_length(model, QUESTION)
    assert reply.usage.completion_tokens == len(ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(ids)


def test_chat_stream_gives_the_same_text_in_pieces(client, model):
    stream = client.chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids, text = alone(model, QUESTION, max_new_tokens=16)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in content if p]) > 1  # streamed, not sent at once
    assert "".join(content) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length" if len(ids) == 16 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_max_completion_tokens_and_stop(client, model):
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION, max_completion_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    _, text = alone(model, QUESTION, max_new_tokens=16)
    word = text.split()[1]  # a stop string inside the greedy answer: the text ends before it
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=16, temperature=0, stop=[word])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text[: text.index(word)]


def test_seeded_sampling_is_what_generate_gives(client, model):
    reply = client.chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, n=2
    )
    for k, choice in enumerate(reply.choices):
        _, text = alone(model, QUESTION, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234 + k)
        assert choice.index == k and choice.message.content == text
    assert reply.choices[0].message.content != reply.choices[1].message.content


def test_chat_stream_with_several_choices(client):
    kwargs = dict(model=CHAT, messages=QUESTION, max_tokens=12, temperature=0.9, seed=7, n=3)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage == whole.usage


def test_chat_logprobs(client, model):
    reply = client.chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert bytes(e.bytes).decode("utf-8") == e.token
    # The first token's logprob is the log-softmax of the model's logits after the prompt.
    text = model.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    logits = model.logits(model.tokenizer.encode(text))[-1].astype(np.float64)
    log_softmax = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
    assert entries[0].logprob == pytest.approx(log_softmax.max(), abs=1e-3)


def test_completions(client, model):
    prompt = "The capital of France is"
    expected = pyxf.generate(model, prompt, max_new_tokens=8)
    reply = client.completions.create(model=CHAT, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    # Several prompts with n=2: choice index = prompt * n + k.
    prompts = [prompt, "Once upon a time"]
    reply = client.completions.create(model=CHAT, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [expected, expected, *[pyxf.generate(model, prompts[1], max_new_tokens=8)] * 2]
    # Token ids in; echo puts the prompt in front.
    ids = model.tokenizer.encode(prompt)
    reply = client.completions.create(model=CHAT, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert reply.choices[0].text == model.tokenizer.decode(ids) + model.tokenizer.decode(pyxf.generate(model, ids, max_new_tokens=8))
    assert reply.usage.prompt_tokens == len(ids)


def test_completions_stream_and_logprobs(client, model):
    prompt = "The capital of France is"
    expected = pyxf.generate(model, prompt, max_new_tokens=8)
    chunks = list(client.completions.create(model=CHAT, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    reply = client.completions.create(model=CHAT, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == reply.usage.completion_tokens
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_structured_output_follows_the_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_tool_calls_plain_and_streamed(client):
    kwargs = dict(model=CHAT, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice="required",
                  max_tokens=48, temperature=0)
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # Streamed: the calls come in one delta before the finish, as the openai client assembles them.
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0
    assert deltas[0][0].function.name == call.function.name and deltas[0][0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The conversation goes on with the call and its result.
    followup = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(model=CHAT, messages=followup, tools=[WEATHER_TOOL], max_tokens=32,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_equal_model_encode(client, encoder):
    texts = ["The cat sits on the mat.", "A completely different sentence about tax law.", "short"]
    expected = encoder.encode(texts)
    as_floats = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model=EMBED, input=texts)  # the client asks for base64 by default
    for reply in (as_floats, as_base64):
        assert [d.index for d in reply.data] == [0, 1, 2]
        np.testing.assert_allclose(np.array([d.embedding for d in reply.data]), expected, rtol=0, atol=1e-6)
    tokens = [ids for ids, _ in encoder.tokenizer.encode_for_encoder(texts)]
    assert as_floats.usage.prompt_tokens == sum(map(len, tokens))
    # Token ids are the model's own vocabulary, the whole sequence ([CLS] ... [SEP] included).
    by_ids = client.embeddings.create(model=EMBED, input=tokens, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), expected, rtol=0, atol=1e-6)
    one = client.embeddings.create(model=EMBED, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, expected[0], rtol=0, atol=1e-6)


def test_embeddings_base64_is_float32_little_endian(server, encoder):
    body = {"model": EMBED, "input": "hello world", "encoding_format": "base64"}
    reply = httpx.post(f"{server.url}/v1/embeddings", json=body, headers=server.headers()).json()
    vector = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, encoder.encode("hello world"))


# ---------------------------------------------------------------------------------------------
# many clients at once, cancellation, prefix cache


def test_concurrent_clients_each_get_what_generate_gives_alone(server, model):
    topics = ["the sea", "Rome", "prime numbers", "tomato soup", "Mars", "learning French", "rain", "owls"]
    requests = [
        dict(messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
             max_tokens=12 + i, temperature=0 if i % 2 == 0 else 0.8, seed=None if i % 2 == 0 else 100 + i)
        for i, topic in enumerate(topics)
    ]

    async def run_all():
        client = server.async_openai()
        async def one(r):
            return await client.chat.completions.create(model=CHAT, **r)
        return await asyncio.gather(*(one(r) for r in requests))

    replies = asyncio.run(run_all())
    for r, reply in zip(requests, replies):
        sampling = dict(max_new_tokens=r["max_tokens"], temperature=r["temperature"])
        if r["seed"] is not None:
            sampling["seed"] = r["seed"]
        ids, text = alone(model, r["messages"], **sampling)
        assert reply.choices[0].message.content == text, r
        assert reply.usage.completion_tokens == len(ids)


def test_client_that_leaves_mid_stream_is_cancelled(server, model):
    before = server.stats(CHAT)
    never_stop = {str(t): -100 for t in model.eos_token_ids}  # the answer would otherwise end early
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Count from one to one thousand in words."}],
            "max_tokens": 2000, "temperature": 0, "stream": True, "logit_bias": never_stop}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers()) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert received
            assert server.stats(CHAT)["running"] == 1
    # Leaving closed the connection: the request leaves the batch and its blocks are free again.
    _assert_cancelled_and_freed(server, before)


def test_client_that_leaves_before_a_plain_answer_is_cancelled(server, model):
    never_stop = {str(t): -100 for t in model.eos_token_ids}
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Count from one to one thousand in words."}],
            "max_tokens": 2000, "temperature": 0, "logit_bias": never_stop}
    before = server.stats(CHAT)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        _post(server, "/v1/chat/completions", body, timeout=1.0)
    _assert_cancelled_and_freed(server, before)


def _assert_cancelled_and_freed(server, before):
    stats = _wait_for(lambda: server.stats(CHAT),
                      lambda s: s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0)
    assert stats["generated_tokens_total"] - before["generated_tokens_total"] < 1000  # cut well short of 2000


def _wait_for(get, done, timeout=30.0, every=0.05):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if done(value) or time.monotonic() > deadline:
            assert done(value), value
            return value
        time.sleep(every)


def test_prefix_cache_hits_give_identical_outputs(client, model):
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "When do you open on Saturday?"}]
    assert prompt_length(model, messages) >= 3 * 64
    cold = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=16, temperature=0)
    warm = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=16, temperature=0)
    assert warm.choices[0].message.content == cold.choices[0].message.content == alone(model, messages, max_new_tokens=16)[1]
    assert warm.usage.prompt_tokens_details.cached_tokens >= 2 * 64
    # Another question after the same system prompt reuses its blocks and still matches a cold run.
    other = [messages[0], {"role": "user", "content": "How many books can I borrow?"}]
    reply = client.chat.completions.create(model=CHAT, messages=other, max_tokens=16, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens >= 2 * 64
    assert reply.choices[0].message.content == alone(model, other, max_new_tokens=16)[1]


# ---------------------------------------------------------------------------------------------
# errors, API key, metrics


def _post(server, path, body=None, headers=None, **kwargs):
    headers = {**server.headers(), **(headers or {})}
    if body is not None:
        kwargs["json"] = body
    kwargs.setdefault("timeout", 60)
    return httpx.post(f"{server.url}{path}", headers=headers, **kwargs)


CHAT_BODY = {"model": CHAT, "messages": QUESTION, "max_tokens": 4}
BAD_REQUESTS = [
    # (path, body, status, code, param)
    ("/v1/chat/completions", {**CHAT_BODY, "model": "no-such-model"}, 404, "model_not_found", "model"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model_not_found", "model"),
    ("/v1/embeddings", {"model": "no-such-model", "input": "hi"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {**CHAT_BODY, "temperature": 3}, 400, "invalid_value", "temperature"),
    ("/v1/chat/completions", {**CHAT_BODY, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("/v1/chat/completions", {**CHAT_BODY, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", {**CHAT_BODY, "n": 0}, 400, "invalid_value", "n"),
    ("/v1/chat/completions", {"model": CHAT}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value",
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT_BODY, "stop": 7}, 400, "invalid_value", "stop"),
    ("/v1/chat/completions", {**CHAT_BODY, "logit_bias": {"abc": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/chat/completions", {**CHAT_BODY, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_BODY, "functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function"}]}, 400, "invalid_value", "tools"),
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "invalid_value",
     "tool_choice"),
    ("/v1/chat/completions", {**CHAT_BODY, "response_format": {"type": "xml"}}, 400, "invalid_value",
     "response_format"),
    ("/v1/chat/completions", {**CHAT_BODY, "max_tokens": 100000}, 400, "context_length_exceeded", "messages"),
    ("/v1/chat/completions", {**CHAT_BODY, "model": EMBED}, 400, "wrong_model_kind", "model"),
    ("/v1/completions", {"model": CHAT, "prompt": []}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": CHAT, "prompt": [1.5]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": CHAT, "prompt": [10**9]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": CHAT, "prompt": "hi", "suffix": "x"}, 400, "unsupported_parameter", "suffix"),
    ("/v1/embeddings", {"model": EMBED, "input": []}, 400, "invalid_value", "input"),
    ("/v1/embeddings", {"model": EMBED, "input": [[10**9]]}, 400, "invalid_value", "input"),
    ("/v1/embeddings", {"model": EMBED, "input": "hi", "encoding_format": "int8"}, 400, "invalid_value",
     "encoding_format"),
    ("/v1/embeddings", {"model": CHAT, "input": "hi"}, 400, "wrong_model_kind", "model"),
]


@pytest.mark.parametrize("path, body, status, code, param", BAD_REQUESTS)
def test_bad_requests_get_openai_error_bodies(server, path, body, status, code, param):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_bad_request_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=-1)


def test_malformed_and_oversized_bodies(server):
    response = _post(server, "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    big = {**CHAT_BODY, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    response = _post(server, "/v1/chat/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = (json.dumps(big).encode()[i : i + 65536] for i in range(0, len(json.dumps(big)), 65536))
    response = _post(server, "/v1/chat/completions", content=chunked, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    response = httpx.get(f"{server.url}/v1/no-such-route", headers=server.headers())
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
    # None of that disturbed the server.
    assert _post(server, "/v1/chat/completions", CHAT_BODY).status_code == 200


def test_api_key_is_required_on_the_api(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/v1/models", headers=server.headers()).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def parse_metrics(text):
    """{(name, frozenset(labels)): value} of Prometheus text."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",") if p]
        samples[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return samples


def test_metrics(server, client):
    client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=4, temperature=0)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
              "required": ["answer"], "additionalProperties": False}
    client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=30, temperature=0,
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "a", "schema": schema}})
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(response.text)
    model = frozenset({("model", CHAT)})
    for name in ("pyxf_requests_running", "pyxf_requests_waiting", "pyxf_kv_cache_blocks_used",
                 "pyxf_kv_cache_blocks_total", "pyxf_prefix_cache_hit_rate", "pyxf_generation_tokens_per_second",
                 "pyxf_generation_tokens_total", "pyxf_prompt_tokens_total"):
        assert (name, model) in samples, name
    assert samples["pyxf_kv_cache_blocks_total", model] > 0
    assert samples["pyxf_generation_tokens_total", model] >= 4
    assert samples["pyxf_forced_tokens_total", model] >= 3  # {"answer": " is fixed by the schema
    assert ("pyxf_draft_tokens_proposed_total", model) in samples
    chat = frozenset({("model", CHAT), ("endpoint", "chat")})
    assert samples["pyxf_request_duration_seconds_count", chat] >= 1
    assert samples["pyxf_request_duration_seconds_bucket", chat | {("le", "+Inf")}] >= 1
    assert samples["pyxf_time_to_first_token_seconds_count", model] >= 1
    ok = frozenset({("endpoint", "/v1/chat/completions"), ("status", "200")})
    assert samples["pyxf_http_requests_total", ok] >= 1
