"""Checks of what a caller asks a decoder to generate: prompts, sampling options, stop conditions.
Shared by pyxf.generate and pyxf.Engine; everything here raises ValueError / TypeError naming the
argument."""

import math
import secrets

import numpy as np

from pyxf.checks import as_token_array


def prompt_tokens(model, prompt, messages, add_special_tokens, tools=None):
    """Token lists for the core, and the form of output the caller expects back: "text" (one
    str), "texts", "ids" (one list of ids) or "batch_ids". tools (OpenAI's function list) go to
    the chat template with the messages, as transformers passes them."""
    if messages is not None:
        if prompt is not None:
            raise ValueError("pass either a prompt or messages, not both")
        extra = {"tools": tools} if tools else {}
        text = _tokenizer(model).apply_chat_template(messages, add_generation_prompt=True, **extra)
        return [_encode(model, text, add_special_tokens)], "text"
    if tools:
        raise ValueError("tools need messages (they go to the chat template)")
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


def sampling_options(model, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                     presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=None):
    """The checked options as the core takes them (seed None: a random one)."""
    check_int("max_new_tokens", max_new_tokens)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    check_int("top_k", top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        check_number(name, value)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive (1 disables it), got {repetition_penalty}")
    if seed is None:
        seed = secrets.randbits(63)
    check_int("seed", seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return dict(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        repetition_penalty=float(repetition_penalty), presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty), logit_bias=_logit_bias(model, logit_bias), seed=int(seed),
    )


def _logit_bias(model, logit_bias):
    """[(token, bias)] from a {token: bias} mapping (token ids as ints or decimal strings, as JSON has them)."""
    if logit_bias is None:
        return []
    if not isinstance(logit_bias, dict):
        raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
    out = []
    for key, bias in logit_bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token < model.vocab_size:
            raise ValueError(f"logit_bias token id {token} is outside the vocabulary [0, {model.vocab_size})")
        check_number(f"logit_bias[{key!r}]", bias)
        out.append((token, float(bias)))
    return out


def check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def stop_conditions(model, stop, stop_token_ids=None):
    """(stop token ids including the model's EOS ids, stop strings)."""
    if stop is None:
        stop = []
    elif isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str, an int or a list of them, got {type(stop).__name__}")
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, (list, tuple)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in stop_token_ids
        ):
            raise TypeError("stop_token_ids must be a list of token ids")
        stop = list(stop) + list(stop_token_ids)
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


def check_lengths(prompts, max_new_tokens, context_length):
    for i, ids in enumerate(prompts):
        total = len(ids) + max_new_tokens
        if total > context_length:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ValueError(
                f"{which} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is {total} "
                f"tokens, more than the context length {context_length}"
            )
