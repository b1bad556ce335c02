"""pyxf.generate: prompts in, new text or tokens out. Sampling runs in the core; this module checks
arguments, encodes and decodes, and watches for stop strings."""

import math
import queue
import secrets
import threading

import numpy as np

from pyxf.model import as_token_array

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes of a character not yet complete


def generate(
    model,
    prompt=None,
    *,
    messages=None,
    max_new_tokens=128,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    seed=None,
    stop=None,
    stream=False,
    add_special_tokens=True,
    **seq2seq_options,
):
    """Continues one prompt or a batch of prompts; returns only the new part.

    prompt: str -> str; list[str] -> list[str]; list[int] -> list[int]; list[list[int]] -> list[list[int]].
    messages: [{"role": ..., "content": ...}, ...] rendered with the model's chat template -> str.
    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; seed None picks a random seed.
    stop: a str or a list of str / int. Ints are stop token ids (besides the model's EOS tokens);
    strings end a sequence once its new text contains them, and returned text is cut before them
    (token outputs keep the tokens up to the one completing the stop string).
    stream=True (one prompt): returns an iterator over pieces of the new text as they are produced.
    """
    if getattr(model, "is_encoder_decoder", False):
        # Encoder-decoder models: the prompt is the source (pyxf.seq2seq.generate has the options).
        from pyxf.seq2seq import generate as seq2seq_generate

        if messages is not None or stream:
            raise ValueError("messages and stream are not supported for encoder-decoder models")
        return seq2seq_generate(
            model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, add_special_tokens=add_special_tokens,
            **seq2seq_options,
        )
    if seq2seq_options:
        raise TypeError(
            f"generate() got unexpected keyword arguments {', '.join(sorted(seq2seq_options))} "
            "(beam search options are for encoder-decoder models)"
        )
    prompts, output = _prompt_tokens(model, prompt, messages, add_special_tokens)
    options = _sampling_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    stop_ids, stop_strings = _stop_conditions(model, stop)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False, got {stream!r}")
    if stream and len(prompts) > 1:
        raise ValueError("stream=True takes a single prompt, not a batch")
    if (stream or stop_strings) and model.tokenizer is None:
        raise ValueError("streaming text and stop strings need a tokenizer, and this model has none")
    _check_lengths(model, prompts, max_new_tokens)

    generation = _Generation(model, prompts, options, stop_ids, stop_strings)
    if stream:
        return _stream_text(generation)
    new_ids = generation.run()
    if output == "ids":
        return new_ids[0]
    if output == "batch_ids":
        return new_ids
    texts = [generation.text(ids) for ids in new_ids]
    return texts[0] if output == "text" else texts


def _prompt_tokens(model, prompt, messages, add_special_tokens):
    """Token lists for the core, and the form of output the caller expects back."""
    if messages is not None:
        if prompt is not None:
            raise ValueError("pass either a prompt or messages, not both")
        text = _tokenizer(model).apply_chat_template(messages, add_generation_prompt=True)
        return [_encode(model, text, add_special_tokens)], "text"
    if prompt is None:
        raise ValueError("a prompt (or messages) is required")
    if isinstance(prompt, str):
        return [_encode(model, prompt, add_special_tokens)], "text"
    if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
        prompt = list(prompt)
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise TypeError(f"prompt must be a str, a list of str, or token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError("prompt is empty")
    if all(isinstance(p, str) for p in prompt):
        return [_encode(model, p, add_special_tokens, f"prompt {i}") for i, p in enumerate(prompt)], "texts"
    if all(isinstance(p, (list, tuple, np.ndarray)) for p in prompt):
        return [as_token_array(p, model.vocab_size, f"prompt {i}").tolist() for i, p in enumerate(prompt)], "batch_ids"
    return [as_token_array(prompt, model.vocab_size, "prompt").tolist()], "ids"


def _tokenizer(model):
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer; pass token ids instead of text")
    return model.tokenizer


def _encode(model, text, add_special_tokens, what="prompt"):
    if not text:
        raise ValueError(f"{what} is empty")
    ids = _tokenizer(model).encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise ValueError(f"{what} encodes to no tokens")
    return as_token_array(ids, model.vocab_size, what).tolist()


def _sampling_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed):
    _check_int("max_new_tokens", max_new_tokens)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    _check_int("top_k", top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive (1 disables it), got {repetition_penalty}")
    if seed is None:
        seed = secrets.randbits(63)
    _check_int("seed", seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return dict(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), repetition_penalty=float(repetition_penalty), seed=int(seed),
    )


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _stop_conditions(model, stop):
    """(stop token ids including the model's EOS ids, stop strings)."""
    if stop is None:
        stop = []
    elif isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str, an int or a list of them, got {type(stop).__name__}")
    stop_ids, stop_strings = list(model.eos_token_ids), []
    for item in stop:
        if isinstance(item, str):
            if not item:
                raise ValueError("stop strings must not be empty")
            stop_strings.append(item)
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < model.vocab_size:
                raise ValueError(f"stop token id {item} is outside the vocabulary [0, {model.vocab_size})")
            stop_ids.append(int(item))
        else:
            raise TypeError(f"stop entries must be str or int, got {type(item).__name__} {item!r}")
    return list(dict.fromkeys(stop_ids)), stop_strings


def _check_lengths(model, prompts, max_new_tokens):
    for i, ids in enumerate(prompts):
        total = len(ids) + max_new_tokens
        if total > model.context_length:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ValueError(
                f"{which} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is {total} "
                f"tokens, more than the context length {model.context_length}"
            )


class _Generation:
    """One call of the core's batched generate, with text tracking when stop strings or a text
    callback need it."""

    def __init__(self, model, prompts, options, stop_ids, stop_strings):
        self.model = model
        self.prompts = prompts
        self.options = options
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings

    def run(self, on_text=None, cancelled=None):
        """New token ids per prompt. on_text(text) receives the new text shown so far (single prompt)."""
        trackers = None
        callback = None
        if self.stop_strings or on_text is not None:
            trackers = [_TextTracker(self.model.tokenizer, self.stop_strings) for _ in self.prompts]
            stop_ids = set(self.stop_ids)
            errors = []

            def callback(seq, token):
                try:
                    if token in stop_ids:
                        return True
                    tracker = trackers[seq]
                    tracker.push(token)
                    if on_text is not None:
                        on_text(tracker.shown_text())
                    return tracker.stopped or (cancelled is not None and cancelled.is_set())
                except BaseException as e:  # never let an exception unwind through the core
                    errors.append(e)
                    return True

        o = self.options
        # Each sequence's KV cache only needs to hold its prompt and the new tokens.
        context_length = max(map(len, self.prompts)) + o["max_new_tokens"]
        new_ids = self.model._core_model.generate(
            self.prompts, o["max_new_tokens"], o["temperature"], o["top_k"], o["top_p"],
            o["repetition_penalty"], o["seed"], self.stop_ids, context_length, callback,
        )
        if callback is not None and errors:
            raise errors[0]
        return [[int(t) for t in ids] for ids in new_ids]

    def text(self, ids):
        """Decoded new text, cut before the first stop string."""
        text = self.model.tokenizer.decode(ids)
        return text[:_first_stop(text, self.stop_strings)]


def _first_stop(text, stop_strings, start=0):
    """Index where the earliest stop string in text[start:] begins; len(text) if none does."""
    hits = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(hits, default=len(text))


class _TextTracker:
    """The decoded text of one growing sequence, updated per token. Like vLLM's incremental
    detokenizer, it re-decodes only the tokens since the last complete piece of text, and holds text
    back while it ends in an incomplete character (a trailing U+FFFD)."""

    def __init__(self, tokenizer, stop_strings):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids = []
        self.text = ""
        self.stop_at = None  # index in text where the first stop string begins
        self._prefix = 0  # ids[_prefix:_read]: tokens already in text, decoded again as context
        self._read = 0

    @property
    def stopped(self):
        return self.stop_at is not None

    def push(self, token):
        self.ids.append(token)
        decode = self.tokenizer.decode
        known = decode(self.ids[self._prefix : self._read])
        extended = decode(self.ids[self._prefix :])
        if len(extended) > len(known) and not extended.endswith(REPLACEMENT_CHAR):
            searched = len(self.text)
            self.text += extended[len(known) :]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop_strings and self.stop_at is None:
                # A new match must end in the new text, so it begins at most len(stop) - 1 before it.
                start = max(0, searched - max(map(len, self.stop_strings)) + 1)
                at = _first_stop(self.text, self.stop_strings, start)
                self.stop_at = at if at < len(self.text) else None

    def shown_text(self):
        """The text that is safe to show: before any stop string, and without a tail that could
        turn out to be the start of one."""
        if self.stop_at is not None:
            return self.text[: self.stop_at]
        return self.text[: len(self.text) - _partial_stop_length(self.text, self.stop_strings)]


def _partial_stop_length(text, stop_strings):
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    for length in range(min(len(text), max(map(len, stop_strings), default=1) - 1), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stop_strings):
            return length
    return 0


def _stream_text(generation):
    """Runs the generation on a worker thread (the core releases the GIL) and yields new text as
    the callback produces it. Closing the iterator early stops the generation."""
    pieces = queue.SimpleQueue()
    cancelled = threading.Event()
    done = object()

    def work():
        try:
            shown = ""

            def on_text(text):
                nonlocal shown
                if len(text) > len(shown):
                    pieces.put(text[len(shown) :])
                    shown = text

            new_ids = generation.run(on_text=on_text, cancelled=cancelled)
            # The final decode of all tokens is the reference; emit whatever the tracker held back.
            final = generation.text(new_ids[0])
            if final.startswith(shown) and len(final) > len(shown):
                pieces.put(final[len(shown) :])
            pieces.put(done)
        except BaseException as e:
            pieces.put(e)

    worker = threading.Thread(target=work, name="pyxf-generate", daemon=True)
    worker.start()
    try:
        while True:
            item = pieces.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        worker.join()
