"""The engine side of one chat or completions request: its choices (n per prompt) submitted to the
model's Engine, their deltas merged into one stream, cancelled together when the client leaves."""

import asyncio
import math
import re
import time

from pyxf.engine import EngineFull
from pyxf.server import errors

# A logprob JSON cannot carry (-inf: a token the sampler could not pick) is sent as this.
LOWEST_LOGPROB = -9999.0


class Choices:
    """Submits every (prompt, choice) pair; choice k of prompt p has index p * n + k, and seed
    seed + k, so that each choice is what the same request with n=1 and that seed gives."""

    def __init__(self, engine, prompts, n, sampling, param="prompt"):
        self.requests = []
        self.started = time.monotonic()
        self.first_token_at = None
        sampling = dict(sampling)
        seed = sampling.pop("seed", None)
        try:
            for prompt in prompts:
                for k in range(n):
                    choice_seed = None if seed is None else (seed + k) % 2**63
                    self.requests.append(engine.submit(**prompt, **sampling, seed=choice_seed))
        except Exception as e:
            self.cancel()
            raise _api_error(e, param) from None

    def cancel(self):
        for request in self.requests:
            if not request.done:
                request.cancel()

    async def stream(self):
        """(index, Delta) as each choice produces text, then (index, Result) when it ends; all
        choices' items interleaved as they come. Closing this iterator cancels what still runs."""
        items = asyncio.Queue()
        tasks = [asyncio.create_task(self._forward(i, r, items)) for i, r in enumerate(self.requests)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item, final = await items.get()
                if isinstance(item, BaseException):
                    raise item
                if not final and item.token_ids and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                remaining -= final
                yield index, item
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()

    @staticmethod
    async def _forward(index, request, items):
        try:
            async for delta in request.stream_async():
                items.put_nowait((index, delta, False))
            items.put_nowait((index, await request.result_async(), True))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced by stream()
            items.put_nowait((index, e, True))

    async def collect(self, http_request):
        """The final results, in choice order. A client that disconnects meanwhile cancels them."""
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, self))
        try:
            results = [None] * len(self.requests)
            async for index, item in self.stream():
                if hasattr(item, "finish_reason"):
                    results[index] = item
            return results
        finally:
            watcher.cancel()

    def time_to_first_token(self):
        return None if self.first_token_at is None else self.first_token_at - self.started


async def _cancel_on_disconnect(http_request, choices):
    """Waits for the client to go away (the body is read already, so the next ASGI message is the
    disconnect) and cancels the choices."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            choices.cancel()
            return


# Engine.submit's argument names -> the request fields they come from, in the order an error
# message is searched for them (tool_choice before tools).
ENGINE_PARAMS = (
    ("response_format", "response_format"), ("tool_choice", "tool_choice"), ("tools", "tools"), ("tool", "tools"),
    ("function", "tools"),
    ("logit_bias", "logit_bias"), ("max_new_tokens", "max_tokens"), ("temperature", "temperature"),
    ("top_p", "top_p"), ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
    ("seed", "seed"), ("logprobs", "logprobs"), ("stop", "stop"),
)


def _api_error(e, param):
    """What a failed submit answers: 503 when the engine is full or closed, 400 for a bad argument
    (param: the field the engine's message names, else `param`, the prompt or messages)."""
    if isinstance(e, EngineFull):
        return errors.overloaded(f"The server is busy ({e}); retry later")
    if isinstance(e, (ValueError, TypeError)):
        message = str(e)
        if "context length" in message:
            return errors.invalid(message, param=param, code="context_length_exceeded")
        named = next((field for name, field in ENGINE_PARAMS if re.search(rf"\b{name}\b", message)), param)
        return errors.invalid(message, param=named)
    if isinstance(e, RuntimeError):  # the engine is closed: the server is shutting down
        return errors.overloaded(f"The server is not accepting requests ({e})")
    return e


def usage_counts(results, n):
    """(prompt tokens, completion tokens, cached prompt tokens): each prompt counted once, not n times."""
    firsts = results[::n]
    prompt = sum(r.usage.prompt_tokens for r in firsts)
    cached = sum(r.usage.cached_tokens for r in firsts)
    completion = sum(r.usage.completion_tokens for r in results)
    return prompt, completion, cached


def finite_logprob(value):
    return value if math.isfinite(value) else LOWEST_LOGPROB
