"""pyxf.Engine: many requests, one continuously batched decoder.

The core's engine runs the scheduler and the forward passes on its own thread (no GIL): requests
join and leave the running batch at token granularity, KV memory is one pool of 64-token pages
under `kv_cache_mb`, and full pages are kept in a prefix cache for later requests with the same
first tokens. This module checks arguments, turns token events into text (one dispatcher thread
for all requests) and hands them to each request's consumer, synchronous or asyncio.

    with pyxf.Engine(model) as engine:
        request = engine.submit("The capital of France is", max_new_tokens=16)
        for delta in request:
            print(delta.text, end="")
        print(request.result().usage)
"""

import asyncio
import atexit
import collections
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from pyxf.constraints import Constraint, grammar_for
from pyxf.sampling import check_int, check_lengths, prompt_tokens, sampling_options, stop_conditions
from pyxf.text import TextTracker, first_stop
from pyxf.tools import plan as plan_tools, read_reply
from pyxf.threads import core

_FINISH = {1: "stop", 2: "length", 3: "cancelled", 4: "error"}
_END = object()


class EngineFull(RuntimeError):
    """The engine's queue holds max_queue waiting requests already (a server answers 503)."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    token_id: int
    token: str            # the token's own text
    bytes: List[int]      # its UTF-8 bytes
    logprob: float        # log-probability under the model (before penalties and temperature)
    top: List[Tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob), best first


@dataclass
class Delta:
    text: str                               # new text since the previous delta ("" while held back)
    token_ids: List[int]
    logprobs: Optional[List[TokenLogprob]] = None


@dataclass
class Result:
    text: str                               # the new text, cut before a stop string (with tools: the reply's content)
    token_ids: List[int]                    # new tokens, stop token excluded
    finish_reason: str                      # "stop", "length", "cancelled" or "tool_calls"
    usage: Usage
    logprobs: Optional[List[TokenLogprob]] = None
    tool_calls: Optional[List[dict]] = None  # OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}


class Request:
    """One submitted request: iterate it (or `async for` over stream_async()) for deltas as they
    come; result() waits for the end."""

    def __init__(self, dispatcher, request_id, prompt_tokens, tokenizer, stop_strings, logprobs, text_deltas,
                 constraint=None, tool_plan=None, max_new_tokens=None, forced=()):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._dispatcher = dispatcher
        self._tokenizer = tokenizer
        self._stop_strings = stop_strings
        # Text is tracked token by token only when deltas carry it or stop strings need it.
        track = tokenizer is not None and (text_deltas or stop_strings)
        self._tracker = TextTracker(tokenizer, stop_strings) if track else None
        self._text_deltas = text_deltas and tokenizer is not None
        self._logprobs = [] if logprobs is not None else None
        self._token_ids = []
        self._shown = ""                  # text delivered in deltas so far
        self._stopped_by_text = False     # a stop string ended it: further tokens are dropped
        self._constraint = constraint     # pyxf.constraints.Constraint, or None
        self._forced = collections.deque(forced)  # tokens the constraint fixed, not yet back as events
        self._max_new_tokens = max_new_tokens
        self._complete = False            # the constraint is complete: the request ends here
        self._tool_plan = tool_plan       # pyxf.tools.ToolPlan: how to read tool calls from the reply
        self._items = queue.SimpleQueue()
        self._async = None                # (loop, asyncio.Queue) once stream_async() runs
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result = None
        self._error = None

    @property
    def done(self):
        return self._done.is_set()

    def cancel(self):
        """Ends the request within one engine step; its result has finish_reason "cancelled"."""
        self._dispatcher.cancel(self.id)

    def __iter__(self):
        while True:
            item = self._items.get()
            if item is _END:
                self._raise_error()
                return
            yield item

    async def stream_async(self):
        loop = asyncio.get_running_loop()
        items = asyncio.Queue()
        with self._lock:
            while True:
                try:
                    items.put_nowait(self._items.get_nowait())
                except queue.Empty:
                    break
            self._async = (loop, items)
        while True:
            item = await items.get()
            if item is _END:
                self._raise_error()
                return
            yield item

    def result(self, timeout=None):
        """The final Result; TimeoutError if it is not there within timeout seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished within {timeout} s")
        self._raise_error()
        return self._result

    async def result_async(self):
        """The final Result, awaited (consuming the deltas nobody has read)."""
        if not self._done.is_set():
            async for _ in self.stream_async():
                pass
        self._raise_error()
        return self._result

    def _raise_error(self):
        if self._error is not None:
            raise RuntimeError(f"request {self.id} failed: {self._error}")

    # Called on the dispatcher thread.
    def _on_token(self, token, logprob, top):
        if self._stopped_by_text or self._complete:
            return
        self._token_ids.append(token)
        if self._forced:
            # Fixed by the constraint, which has taken it already.
            self._forced.popleft()
        elif self._constraint is not None:
            # First, so the core has the next mask before the forward pass it overlaps ends.
            if self._constraint.advance(token):
                forced = self._take_forced()
                self._dispatcher.core.set_mask(self.id, len(self._token_ids), self._constraint.mask(), forced)
            else:
                self._complete = True
                self.cancel()
        text = ""
        if self._tracker is not None:
            self._tracker.push(token)
            if self._tracker.stopped:
                self._stopped_by_text = True
                self.cancel()
            if self._text_deltas:
                shown = self._tracker.shown_text()
                text, self._shown = shown[len(self._shown) :], shown
        logprobs = None
        if self._logprobs is not None:
            logprobs = [self._token_logprob(token, logprob, top)]
            self._logprobs.extend(logprobs)
        self._put(Delta(text, [token], logprobs))

    def _take_forced(self):
        """Jump-forward decoding: the tokens the constraint fixes next, taken (none with logprobs,
        which need every token's logits)."""
        if self._logprobs is not None or self._max_new_tokens is None:
            return []
        forced = self._constraint.take_forced(self._max_new_tokens - len(self._token_ids))
        self._forced.extend(forced)
        return forced

    def _on_finish(self, finish, prompt_tokens, cached_tokens, error):
        reason = "stop" if self._stopped_by_text or self._complete else _FINISH[finish]
        text = ""
        if self._tokenizer is not None:
            text = self._tokenizer.decode(self._token_ids)
            text = text[: first_stop(text, self._stop_strings)]
            # The decode of all tokens is the reference: deliver what the incremental text held back.
            if self._text_deltas and len(text) > len(self._shown) and text.startswith(self._shown):
                self._put(Delta(text[len(self._shown) :], [], [] if self._logprobs is not None else None))
        if reason == "error":
            self._error = error or "the engine failed"
        usage = Usage(prompt_tokens, len(self._token_ids), cached_tokens)
        tool_calls = None
        if self._tool_plan is not None:
            text, tool_calls = read_reply(text, self._tool_plan)
            if tool_calls and reason == "stop":
                reason = "tool_calls"
        self._result = Result(text, list(self._token_ids), reason, usage, self._logprobs, tool_calls)
        self._done.set()  # before the end marker: a consumer that saw the end finds the result
        self._put(_END)

    def _fail(self, error):
        self._error = error
        self._done.set()
        self._put(_END)

    def _put(self, item):
        with self._lock:
            if self._async is None:
                self._items.put(item)
            else:
                loop, items = self._async
                try:
                    loop.call_soon_threadsafe(items.put_nowait, item)
                except RuntimeError:  # the consumer's loop is closed: nobody is listening
                    pass

    def _token_logprob(self, token, logprob, top):
        piece = self._piece
        return TokenLogprob(token, piece(token), list(piece(token).encode("utf-8")), float(logprob),
                            [(int(t), piece(t), float(lp)) for t, lp in top])

    def _piece(self, token):
        return self._tokenizer.decode([token]) if self._tokenizer is not None else ""


class _Dispatcher:
    """Owns the core engine and its one polling thread: token events to their requests. Holds no
    reference to the Engine, so an Engine nobody keeps is collected (and closed)."""

    def __init__(self, core_engine):
        self.core = core_engine
        self.requests = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="pyxf-engine-events", daemon=True)
        self.thread.start()

    def submit(self, make_request, *args):
        with self.lock:  # registered before its first event can be looked up
            try:
                request_id = self.core.submit(*args)
            except core().QueueFull as e:
                raise EngineFull(str(e)) from None
            request = make_request(request_id)
            self.requests[request_id] = request
        return request

    def cancel(self, request_id):
        self.core.cancel(request_id)

    def close(self, timeout=None):
        self.core.close(False)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.core.close(True)
            self.thread.join()

    def _run(self):
        while True:
            events = self.core.poll(100)
            for request_id, token, logprob, top, finish, prompt_tokens, cached, error in events:
                with self.lock:
                    request = self.requests.get(request_id)
                    if finish:
                        self.requests.pop(request_id, None)
                if request is None:
                    continue
                try:
                    if token >= 0:
                        request._on_token(token, logprob, top)
                    if finish:
                        request._on_finish(finish, prompt_tokens, cached, error)
                except BaseException as e:  # a failing detokenizer fails its request, not the engine
                    self.cancel(request_id)
                    request._fail(f"{type(e).__name__}: {e}")
            if not events and self.core.drained:
                return


def is_draft_model_argument(speculative):
    """Whether `speculative` names a draft model (a loaded model) rather than a drafting method."""
    return speculative is not None and not isinstance(speculative, str)


def check_draft_model(model, draft_model):
    """A draft model must be a decoder whose token ids mean what the model's mean: the same
    vocabulary size and, where both have a tokenizer, the same token for every id."""
    if not hasattr(draft_model, "_core_model") or not hasattr(draft_model, "vocab_size"):
        raise ValueError(f"a draft model is a pyxf decoder (pyxf.load(...)), got {type(draft_model).__name__}")
    if getattr(draft_model, "is_encoder", False) or getattr(draft_model, "is_encoder_decoder", False):
        raise ValueError("the draft model must be a decoder (encoders and encoder-decoders cannot draft)")
    if draft_model.vocab_size != model.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft_model.vocab_size} tokens and the model's "
                         f"{model.vocab_size}: a draft model needs the model's tokenizer")
    mismatch = _first_different_token(model.tokenizer, draft_model.tokenizer)
    if mismatch is not None:
        raise ValueError(f"the draft model's tokenizer differs from the model's ({mismatch}): "
                         "a draft model needs the model's tokenizer")


# tokenizer -> the tokenizers found equal to it (a comparison reads every token: ~0.1 s for 49k).
_equal_tokenizers = weakref.WeakKeyDictionary()


def _first_different_token(a, b):
    """Where two tokenizers disagree (a description), or None; tokenizers missing on either side
    cannot be compared."""
    if a is None or b is None or a is b or b in _equal_tokenizers.get(a, ()):
        return None
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size} tokens against {b.vocab_size}"
    for token_id in range(a.vocab_size):
        if a.token_text(token_id) != b.token_text(token_id):
            return f"token {token_id} is {a.token_text(token_id)!r} against {b.token_text(token_id)!r}"
    _equal_tokenizers.setdefault(a, weakref.WeakSet()).add(b)
    return None


def _drafting(speculative, num_draft_tokens, draft_model):
    """(tokens drafted a step, whether the engine's draft model drafts them); (0, False) without
    speculative decoding. speculative None: the engine's draft model, when it has one; False: none."""
    if speculative is False:
        return 0, False
    if speculative is None:
        if draft_model is None:
            return 0, False
        speculative = draft_model
    if is_draft_model_argument(speculative):
        if speculative is not draft_model:
            raise ValueError("speculative=<model>: an engine drafts with the draft model it was built with; "
                             "pass it as pyxf.Engine(model, draft_model=...)")
    elif speculative != "prompt_lookup":
        raise ValueError(f'speculative must be "prompt_lookup", a draft model (pyxf.load(...)) or False, '
                         f'got {speculative!r}')
    check_int("num_draft_tokens", num_draft_tokens)
    if not 1 <= num_draft_tokens <= 32:
        raise ValueError(f"num_draft_tokens must be in [1, 32], got {num_draft_tokens}")
    return int(num_draft_tokens), speculative is draft_model


def kv_cache_mb(model, lengths, draft_model=None):
    """The kv_cache_mb that holds sequences of these lengths (tokens each) at once (with the draft
    model's keys and values, when there is one)."""
    page_tokens = core().kv_page_tokens
    pages = sum(-(-int(n) // page_tokens) for n in lengths)
    page_bytes = sum(core().Engine.page_bytes(m._core_model) for m in (model, draft_model) if m is not None)
    return pages * page_bytes / 2**20


# Engines still open when the interpreter exits are closed first, while threads can still be joined
# (at finalization the dispatcher thread can no longer run, and the core's thread would outlive it).
_open_engines = weakref.WeakSet()


@atexit.register
def _close_open_engines():
    for engine in list(_open_engines):
        engine.close(timeout=0)


class Engine:
    """A continuous-batching engine over one decoder model (see the module docstring).

    draft_model: a smaller decoder with the model's tokenizer for speculative decoding. Its keys and
    values share the KV budget (each page holds both models' positions). speculative and
    num_draft_tokens: how requests draft unless they ask otherwise (submit's speculative and
    num_draft_tokens): None, with the draft model when there is one (else not at all);
    "prompt_lookup"; False, not at all."""

    def __init__(self, model, *, max_batch=64, kv_cache_mb=1024, prefill_chunk=512, max_queue=1024,
                 prefix_cache=True, draft_model=None, speculative=None, num_draft_tokens=4):
        if getattr(model, "is_encoder", False) or getattr(model, "is_encoder_decoder", False):
            raise ValueError("pyxf.Engine serves decoder models; encoders have encode(), translation models translate()")
        if draft_model is not None:
            check_draft_model(model, draft_model)
        _drafting(speculative, num_draft_tokens, draft_model)  # the defaults fail here, not in submit
        for name, value, minimum in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                                     ("max_queue", max_queue, 0)):
            check_int(name, value)
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, (int, float)) or not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be a positive number, got {kv_cache_mb!r}")
        self.model = model
        self.draft_model = draft_model
        self.speculative, self.num_draft_tokens = speculative, num_draft_tokens
        core_engine = core().Engine(model._core_model, max_batch, float(kv_cache_mb), prefill_chunk, max_queue,
                                    model.context_length, bool(prefix_cache),
                                    draft_model._core_model if draft_model is not None else None)
        self.context_length = core_engine.context_length  # at most what the KV budget holds
        self._dispatcher = _Dispatcher(core_engine)
        self._closed = False
        _open_engines.add(self)

    def submit(self, prompt=None, *, messages=None, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
               repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=None,
               stop=None, stop_token_ids=None, logprobs=None, add_special_tokens=True, response_format=None,
               regex=None, choice=None, grammar=None, tools=None, tool_choice=None, speculative=None,
               num_draft_tokens=None):
        """Queues one request (see pyxf.generate for the options) and returns its Request.
        max_new_tokens None: up to the context length. logprobs k >= 0: each token's log-probability
        and its k most likely alternatives. Structured output (at most one): response_format
        (OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}),
        regex, choice (a list of strings), grammar (Lark or GBNF). tools and tool_choice (with
        messages): OpenAI function calling (pyxf.tools); the result's tool_calls hold the calls.
        speculative="prompt_lookup": each step drafts up to num_draft_tokens tokens from earlier in
        the sequence and verifies them in one forward pass (greedy output unchanged; sampled output
        from the same distribution); speculative=<the engine's draft_model>: the draft model drafts
        them; False: no drafting; None (and num_draft_tokens None): the engine's defaults. Requests
        with structured output do not draft. pyxf.EngineFull when max_queue requests are waiting."""
        return self._submit(prompt, messages, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            presence_penalty, frequency_penalty, logit_bias, seed, stop, stop_token_ids, logprobs,
                            add_special_tokens, response_format, regex, choice, grammar, tools, tool_choice,
                            speculative, num_draft_tokens, text_deltas=True)

    def _submit(self, prompt, messages, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                presence_penalty, frequency_penalty, logit_bias, seed, stop, stop_token_ids, logprobs,
                add_special_tokens, response_format=None, regex=None, choice=None, grammar=None, tools=None,
                tool_choice=None, speculative=None, num_draft_tokens=None, text_deltas=True):
        if self._closed:
            raise RuntimeError("the engine is closed")
        model = self.model
        model._core_model  # noqa: B018 -- FileChangedError if the weight file was truncated
        constraint_args = dict(response_format=response_format, regex=regex, choice=choice, grammar=grammar)
        tool_plan, template_tools = None, None
        if tools is not None:
            if messages is None:
                raise ValueError("tools need messages (they go to the chat template)")
            tool_plan = plan_tools(model.tokenizer, messages, tools, tool_choice)
            if tool_plan.constraint and any(v is not None for v in constraint_args.values()):
                raise ValueError("tool_choice constrains the reply; it cannot be combined with response_format, regex, choice or grammar")
            messages, template_tools = tool_plan.messages, tool_plan.template_tools
            constraint_args.update(tool_plan.constraint)
        elif tool_choice is not None:
            raise ValueError("tool_choice needs tools")
        prompts, _ = prompt_tokens(model, prompt, messages, add_special_tokens, template_tools)
        if len(prompts) != 1:
            raise ValueError("submit() takes one prompt; submit each prompt of a batch on its own")
        ids = prompts[0]
        if max_new_tokens is None:
            max_new_tokens = max(1, self.context_length - len(ids))
        options = sampling_options(model, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   presence_penalty, frequency_penalty, logit_bias, seed)
        stop_ids, stop_strings = stop_conditions(model, stop, stop_token_ids)
        if logprobs is not None:
            check_int("logprobs", logprobs)
            if not 0 <= logprobs <= 20:
                raise ValueError(f"logprobs must be in [0, 20] (alternatives per token), got {logprobs}")
        if stop_strings and model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        check_lengths([ids], options["max_new_tokens"], self.context_length)
        draft_tokens, use_draft_model = _drafting(
            self.speculative if speculative is None else speculative,
            self.num_draft_tokens if num_draft_tokens is None else num_draft_tokens, self.draft_model)
        grammar_source = grammar_for(**constraint_args)
        constraint = Constraint(model, grammar_source) if grammar_source is not None else None

        o = options
        # Jump-forward from the start: tokens the constraint fixes before the first one sampled.
        first_forced = []
        if constraint is not None and logprobs is None:
            first_forced = constraint.take_forced(o["max_new_tokens"])

        def make_request(request_id):
            return Request(self._dispatcher, request_id, len(ids), model.tokenizer, stop_strings, logprobs,
                           text_deltas, constraint, tool_plan, o["max_new_tokens"], first_forced)

        return self._dispatcher.submit(
            make_request, ids, o["max_new_tokens"], o["temperature"], o["top_k"], o["top_p"],
            o["repetition_penalty"], o["presence_penalty"], o["frequency_penalty"], o["logit_bias"], o["seed"],
            stop_ids, -1 if logprobs is None else logprobs, constraint.mask() if constraint is not None else None,
            draft_tokens, use_draft_model, first_forced,
        )

    def stats(self):
        """Counters: running, waiting, kv_blocks_total / used / cached, kv_block_tokens,
        prefix_cache_queried_tokens, prefix_cache_hit_tokens, prompt_tokens_total,
        generated_tokens_total, requests_finished_total, steps_total, draft_tokens_proposed_total,
        draft_tokens_accepted_total (speculative decoding), forced_tokens_total (tokens a constraint
        fixed, taken without sampling)."""
        return self._dispatcher.core.stats()

    def close(self, timeout=None):
        """Stops accepting requests, lets running ones finish (cancelling what is left after timeout
        seconds) and stops the engine's threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._dispatcher.close(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(timeout=0 if exc[0] is not None else None)

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close(timeout=0)
