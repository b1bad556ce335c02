"""pyxf.generate: prompts in, new text or tokens out. Every model that generates text has its own
generate() (one interface: prompt or batch in, text or ids out, stream=True for pieces of text);
pyxf.generate(model, ...) calls it. This module also holds the decoders' implementation, which runs
on pyxf.Engine (submit all, wait for all)."""

from pyxf.engine import Engine, check_draft_model, is_draft_model_argument, kv_cache_mb
from pyxf.sampling import check_lengths, prompt_tokens, sampling_options, stop_conditions


def generate(model, prompt=None, **options):
    """Continues one prompt or a batch of prompts with `model`'s own generate(); returns only the
    new part. Decoders: see decoder_generate (sampling, chat messages, streaming, structured output,
    tools); encoder-decoders: the prompt is the source (pyxf.seq2seq.generate: beam search options)."""
    method = getattr(model, "generate", None)
    if not callable(method):
        raise TypeError(f"generate() needs a loaded pyxf model, got {type(model).__name__}")
    return method(prompt, **options)


def decoder_generate(
    model,
    prompt=None,
    *,
    messages=None,
    max_new_tokens=128,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    logit_bias=None,
    seed=None,
    stop=None,
    stop_token_ids=None,
    logprobs=None,
    stream=False,
    return_details=False,
    add_special_tokens=True,
    response_format=None,
    regex=None,
    choice=None,
    grammar=None,
    tools=None,
    tool_choice=None,
    speculative=None,
    num_draft_tokens=4,
):
    """Continues one prompt or a batch of prompts; returns only the new part.

    prompt: str -> str; list[str] -> list[str]; list[int] -> list[int]; list[list[int]] -> list[list[int]].
    messages: [{"role": ..., "content": ...}, ...] rendered with the model's chat template -> str.
    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; seed None picks a random seed.
    stop: a str or a list of str / int. Ints are stop token ids (besides the model's EOS tokens, and
    besides stop_token_ids); strings end a sequence once its new text contains them, and returned text
    is cut before them (token outputs keep the tokens up to the one completing the stop string).
    stream=True (one prompt): returns an iterator over pieces of the new text as they are produced.
    return_details=True: pyxf.Result objects (text, token_ids, finish_reason, usage, logprobs) in
    place of text or ids; logprobs=k adds each token's log-probability and k alternatives.
    Structured output (at most one, for every prompt): response_format ({"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}), regex, choice (a list of
    strings), grammar (Lark or GBNF); a result cut short by max_new_tokens has finish_reason
    "length". tools and tool_choice (with messages): OpenAI function calling; the calls are in the
    Result's tool_calls (return_details=True). speculative="prompt_lookup" (num_draft_tokens per
    step): speculative decoding with drafts copied from earlier in the sequence; speculative=<a
    smaller pyxf decoder with the same tokenizer>: drafts from that draft model. Greedy output is
    unchanged, sampled output keeps its distribution.
    """
    if tools is not None:
        # The tools change what the template renders: the engine renders the messages itself.
        if messages is None or prompt is not None:
            raise ValueError("tools need messages (and no prompt)")
        prompts, output = [None], "text"
    else:
        prompts, output = prompt_tokens(model, prompt, messages, add_special_tokens)
    options = sampling_options(model, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                               presence_penalty, frequency_penalty, logit_bias, seed)
    _, stop_strings = stop_conditions(model, stop, stop_token_ids)
    for name, flag in (("stream", stream), ("return_details", return_details)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if stream and len(prompts) > 1:
        raise ValueError("stream=True takes a single prompt, not a batch")
    if (stream or stop_strings) and model.tokenizer is None:
        raise ValueError("streaming text and stop strings need a tokenizer, and this model has none")
    if tools is None:
        check_lengths(prompts, max_new_tokens, model.context_length)

    lengths = [model.context_length] if tools is not None else [len(p) + max_new_tokens for p in prompts]
    draft_model = speculative if is_draft_model_argument(speculative) else None
    if draft_model is not None:
        check_draft_model(model, draft_model)  # before its KV pages are sized
    engine = _engine_for(model, lengths, draft_model)
    submit = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=options["seed"], stop=stop,
        stop_token_ids=stop_token_ids, logprobs=logprobs, add_special_tokens=add_special_tokens,
        response_format=response_format, regex=regex, choice=choice, grammar=grammar,
        speculative=speculative, num_draft_tokens=num_draft_tokens,
    )
    if tools is not None:
        submit.update(tools=tools, tool_choice=tool_choice)
    if stream:
        return _stream_text(engine, prompts[0], messages, submit)
    try:
        # Every prompt gets the same seed, as the core's batched loop always did: a prompt's output
        # does not depend on the others.
        requests = [engine._submit(ids, None if ids is not None else messages, text_deltas=False, **submit)
                    for ids in prompts]
        results = [r.result() for r in requests]
    finally:
        engine.close(timeout=0)
    if return_details:
        return results[0] if output in ("text", "ids") else results
    if output == "ids":
        return results[0].token_ids
    if output == "batch_ids":
        return [r.token_ids for r in results]
    texts = [r.text for r in results]
    return texts[0] if output == "text" else texts


def _engine_for(model, lengths, draft_model=None):
    """An engine that runs sequences of these lengths (prompt and new tokens) all at once."""
    return Engine(model, max_batch=len(lengths), kv_cache_mb=kv_cache_mb(model, lengths, draft_model),
                  prefill_chunk=max(512, min(8192, sum(lengths))), max_queue=len(lengths), draft_model=draft_model)


def _stream_text(engine, ids, messages, submit):
    """New text as it is produced; closing the iterator early cancels the request."""
    try:
        request = engine._submit(ids, None if ids is not None else messages, text_deltas=True, **submit)
        for delta in request:
            if delta.text:
                yield delta.text
    finally:
        engine.close(timeout=0)
