"""POST /v1/chat/completions and POST /v1/completions: OpenAI requests in, pyxf.Engine requests out,
answered whole or streamed as server-sent events ("data: {chunk}" ... "data: [DONE]")."""

import time
import uuid

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from pyxf.server import errors, schemas
from pyxf.server.choices import Choices, finite_logprob, usage_counts
from pyxf.server.registry import GENERATE

router = APIRouter()

SSE_PING_S = 15  # keep-alive comments on idle streams (ignored by clients)


@router.post("/v1/chat/completions")
async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
    served = request.app.state.registry.get(body.model, GENERATE)
    _refuse_unsupported_chat(body)
    messages = _chat_messages(body, served)
    max_new_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.invalid("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = {**_sampling(body, max_new_tokens, logprobs), **_structure(body)}
    choices = Choices(served.engine, [{"messages": messages}], body.n, sampling, param="messages")
    call = _Call(request, served.name, "chat", body.model, "chatcmpl")
    if body.stream:
        return _event_stream(_chat_events(call, choices, body), choices)
    results = await choices.collect(request)
    call.finished(choices, results)
    prompt, completion, cached = usage_counts(results, body.n)
    return schemas.ChatCompletion(
        id=call.id, created=call.created, model=call.model,
        choices=[
            schemas.ChatChoice(
                index=i, message=schemas.AssistantMessage(content=r.text, tool_calls=_tool_calls(r.tool_calls)),
                logprobs=_chat_logprobs(r.logprobs) if logprobs is not None else None,
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ],
        usage=_usage(prompt, completion, cached),
    )


@router.post("/v1/completions")
async def completions(body: schemas.CompletionRequest, request: Request):
    served = request.app.state.registry.get(body.model, GENERATE)
    _refuse_unsupported_completion(body)
    prompts = _completion_prompts(body.prompt)
    echoes = [_echo_text(served, p) if body.echo else "" for p in prompts]
    choices = Choices(served.engine, prompts, body.n, _sampling(body, body.max_tokens, body.logprobs), param="prompt")
    call = _Call(request, served.name, "completions", body.model, "cmpl")
    if body.stream:
        return _event_stream(_completion_events(call, choices, body, echoes), choices)
    results = await choices.collect(request)
    call.finished(choices, results)
    prompt, completion, cached = usage_counts(results, body.n)
    texts = [echoes[i // body.n] + r.text for i, r in enumerate(results)]
    return schemas.Completion(
        id=call.id, created=call.created, model=call.model,
        choices=[
            schemas.CompletionChoice(
                index=i, text=text, finish_reason=r.finish_reason,
                logprobs=_completion_logprobs(r.logprobs, len(echoes[i // body.n]))[0]
                if body.logprobs is not None else None,
            )
            for i, (text, r) in enumerate(zip(texts, results))
        ],
        usage=_usage(prompt, completion, cached),
    )


def _event_stream(events, choices):
    """The SSE response; the choices are cancelled when it ends, also when the client went away
    before the first event (the events generator then never ran)."""
    return EventSourceResponse(events, ping=SSE_PING_S, background=BackgroundTask(choices.cancel))


class _Call:
    """One request's identity (id, created, model) and its metrics."""

    def __init__(self, request, model_name, endpoint, model, id_prefix):
        self.metrics = request.app.state.metrics
        self.model_name = model_name
        self.endpoint = endpoint
        self.model = model
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def finished(self, choices, results):
        """Records the request's latency, time to first token and finish reasons (a choice without a
        result was cut short by its client leaving: "cancelled")."""
        ttft = choices.time_to_first_token()
        if ttft is not None:
            self.metrics.observe_ttft(self.model_name, ttft)
        self.metrics.observe_request(self.model_name, self.endpoint, time.monotonic() - choices.started,
                                     [r.finish_reason if r is not None else "cancelled" for r in results])


# ---------------------------------------------------------------------------------------------
# request -> engine


def _sampling(body, max_new_tokens, logprobs):
    """Engine.submit's sampling arguments (OpenAI semantics throughout; top_k and the repetition
    penalty are not OpenAI parameters and stay off)."""
    return dict(
        max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        logit_bias=body.logit_bias, seed=body.seed, stop=body.stop or None, logprobs=logprobs,
    )


def _refuse_unsupported_chat(body):
    if body.functions:
        raise errors.unsupported("functions (deprecated) is not supported; use tools", param="functions")


def _structure(body):
    """Engine.submit's structured-output and tool arguments of a chat request."""
    return dict(response_format=body.response_format, tools=body.tools, tool_choice=body.tool_choice)


def _buffers_reply(body):
    """With tools the reply is read whole (calls or content) before any of it is sent."""
    return bool(body.tools) and body.tool_choice != "none"


def _chat_messages(body, served):
    tokenizer = served.model.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise errors.invalid(f"The model {body.model!r} has no chat template; use /v1/completions", param="model")
    messages = []
    for i, message in enumerate(body.messages):
        try:
            content = message.text()
        except ValueError as e:
            raise errors.invalid(str(e), param=f"messages.{i}.content") from None
        role = "system" if message.role == "developer" else message.role
        extra = {k: v for k, v in (("name", message.name), ("tool_calls", message.tool_calls),
                                   ("tool_call_id", message.tool_call_id)) if v is not None}
        messages.append({"role": role, "content": content, **extra})
    return messages


def _refuse_unsupported_completion(body):
    if body.suffix:
        raise errors.unsupported("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise errors.unsupported("best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None:
        raise errors.unsupported("echo with logprobs (the prompt's logprobs) is not supported", param="echo")


def _completion_prompts(prompt):
    """OpenAI's prompt forms -> Engine.submit prompt arguments: a string, a list of strings, a list
    of token ids, or a list of token-id lists."""
    def fail():
        return errors.invalid("prompt must be a string, a list of strings, a list of token ids or a list of "
                              "token-id lists", param="prompt")

    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise fail()
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    if all(_is_token_id(t) for t in prompt):
        return [{"prompt": prompt}]
    if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
        return [{"prompt": p} for p in prompt]
    raise fail()


def _is_token_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _echo_text(served, prompt):
    text = prompt["prompt"]
    if isinstance(text, str):
        return text
    if served.model.tokenizer is None:
        raise errors.invalid("echo of token ids needs a model with a tokenizer", param="echo")
    return served.model.tokenizer.decode(text)


# ---------------------------------------------------------------------------------------------
# engine -> response


def _usage(prompt, completion, cached):
    return schemas.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=cached),
    )


def _tool_calls(calls, streamed=False):
    """The result's calls (OpenAI's shape already) as response models; None without calls."""
    if not calls:
        return None
    if streamed:
        return [schemas.ToolCallDelta(index=k, **call) for k, call in enumerate(calls)]
    return [schemas.ToolCall(**call) for call in calls]


def _chat_logprobs(token_logprobs):
    if token_logprobs is None:
        return None
    return schemas.ChoiceLogprobs(content=[
        schemas.TokenLogprob(
            token=t.token, bytes=list(t.bytes), logprob=finite_logprob(t.logprob),
            top_logprobs=[
                schemas.TopLogprob(token=text, bytes=list(text.encode("utf-8")), logprob=finite_logprob(lp))
                for _, text, lp in t.top
            ],
        )
        for t in token_logprobs
    ])


def _completion_logprobs(token_logprobs, offset):
    """(the legacy completions logprobs of these tokens, the text offset after them)."""
    if token_logprobs is None:
        return None, offset
    tokens, values, tops, offsets = [], [], [], []
    for t in token_logprobs:
        tokens.append(t.token)
        values.append(finite_logprob(t.logprob))
        tops.append({text: finite_logprob(lp) for _, text, lp in t.top})
        offsets.append(offset)
        offset += len(t.token)
    return schemas.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets), offset


async def _chat_events(call, choices, body):
    """Chunks: each choice's role, its text deltas, its finish; then the usage chunk if asked."""
    def chunk(choice_list, usage=None):
        return schemas.ChatCompletionChunk(
            id=call.id, created=call.created, model=call.model, choices=choice_list, usage=usage
        ).model_dump_json()

    results = [None] * len(choices.requests)
    buffered = _buffers_reply(body)
    try:
        for i in range(len(choices.requests)):
            yield chunk([schemas.ChatChunkChoice(index=i, delta=schemas.ChatDelta(role="assistant", content=""))])
        async for i, item in choices.stream():
            if hasattr(item, "finish_reason"):
                results[i] = item
                if buffered and (item.text or item.tool_calls):
                    reply = schemas.ChatDelta(content=item.text or None, tool_calls=_tool_calls(item.tool_calls, True))
                    yield chunk([schemas.ChatChunkChoice(index=i, delta=reply)])
                yield chunk([schemas.ChatChunkChoice(index=i, delta=schemas.ChatDelta(), finish_reason=item.finish_reason)])
            elif not buffered and (item.text or item.logprobs):
                logprobs = _chat_logprobs(item.logprobs) if body.logprobs else None
                yield chunk([schemas.ChatChunkChoice(index=i, delta=schemas.ChatDelta(content=item.text), logprobs=logprobs)])
        if body.include_usage:
            yield chunk([], _usage(*usage_counts(results, body.n)))
        yield "[DONE]"
    finally:
        call.finished(choices, results)


async def _completion_events(call, choices, body, echoes):
    def chunk(choice_list, usage=None):
        return schemas.Completion(
            id=call.id, created=call.created, model=call.model, choices=choice_list, usage=usage
        ).model_dump_json()

    results = [None] * len(choices.requests)
    offsets = [len(echoes[i // body.n]) for i in range(len(choices.requests))]
    try:
        for i in range(len(choices.requests)):
            if echoes[i // body.n]:
                yield chunk([schemas.CompletionChoice(index=i, text=echoes[i // body.n])])
        async for i, item in choices.stream():
            if hasattr(item, "finish_reason"):
                results[i] = item
                yield chunk([schemas.CompletionChoice(index=i, text="", finish_reason=item.finish_reason)])
            elif item.text or item.logprobs:
                logprobs = None
                if body.logprobs is not None:
                    logprobs, offsets[i] = _completion_logprobs(item.logprobs, offsets[i])
                yield chunk([schemas.CompletionChoice(index=i, text=item.text, logprobs=logprobs)])
        if body.include_usage:
            yield chunk([], _usage(*usage_counts(results, body.n)))
        yield "[DONE]"
    finally:
        call.finished(choices, results)
