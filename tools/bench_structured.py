"""Structured output: constrained vs unconstrained decoding on SmolLM2 q8_0, and llama-cpp-python's
JSON-schema grammar on the same Q8_0 GGUF.

    python tools/bench_structured.py [--threads 2] [--repeat 3] [--output FILE]

pyxf runs on pyxf.Engine at batch 1 and batch 16: each request generates 128 tokens either freely
(the end-of-sequence token banned by logit_bias, so every request runs its 128 tokens) or under a
JSON schema that cannot be complete before 128 tokens (an array of at least 60 objects), so both
decode the same number of tokens. Under the schema pyxf takes the tokens the grammar fixes (keys,
punctuation) without sampling, several to a forward pass (jump-forward decoding); the table gives
their share. Mask time is the dispatcher's work per sampled token (feed the token to the matcher,
take the forced tokens after it, compute the next mask), replayed on the generated tokens.
llama-cpp-python runs the
same schema through its own grammar (LlamaGrammar.from_json_schema) at batch 1 with the same
threads. Every figure is the median of --repeat runs. Prints a Markdown section.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

NEW_TOKENS = 128
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 60, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                       "city": {"enum": ["Paris", "Berlin", "Rome", "Madrid"]}},
        "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
PROMPT = "List people with their name, age and city as JSON:"


def _log(message):
    print(f"bench_structured: {message}", file=sys.stderr, flush=True)


def pyxf_runs(model_dir, threads, batch, repeat):
    """{"free": tok/s, "json": tok/s, "forced": share of the constrained tokens taken without sampling,
    "mask_ms": [per-token mask times]} (medians over repeat)."""
    import pyxf
    from pyxf.constraints import Constraint, grammar_for

    pyxf.set_num_threads(threads)
    model = pyxf.load(model_dir)
    eos_ban = {t: -100.0 for t in model.eos_token_ids}
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
    rates = {"free": [], "json": []}
    tokens = None
    forced = generated_json = 0
    with pyxf.Engine(model, max_batch=batch) as engine:
        engine.submit(PROMPT, max_new_tokens=8).result()  # warm-up (and llguidance's tokenizer, below)
        engine.submit(PROMPT, max_new_tokens=8, response_format=fmt).result()
        for _ in range(repeat):
            for kind in ("free", "json"):
                extra = {"response_format": fmt} if kind == "json" else {"logit_bias": eos_ban}
                before = engine.stats()["forced_tokens_total"]
                start = time.perf_counter()
                requests = [engine.submit(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0.7, seed=i, **extra)
                            for i in range(batch)]
                results = [r.result() for r in requests]
                elapsed = time.perf_counter() - start
                generated = sum(r.usage.completion_tokens for r in results)
                rates[kind].append(generated / elapsed)
                if kind == "json":
                    forced += engine.stats()["forced_tokens_total"] - before
                    generated_json += generated
                    assert all(r.finish_reason == "length" for r in results), [r.finish_reason for r in results]
                    tokens = results[0].token_ids
    # The dispatcher's work per sampled token, replayed: advance the matcher, take the tokens it
    # forces next, compute the next mask.
    constraint = Constraint(model, grammar_for(response_format=fmt))
    pending = constraint.take_forced(NEW_TOKENS)
    constraint.mask()
    mask_ms = []
    for i, token in enumerate(tokens):
        if pending:
            pending.pop(0)
            continue
        start = time.perf_counter()
        constraint.advance(token)
        pending = constraint.take_forced(NEW_TOKENS - i - 1)
        constraint.mask()
        mask_ms.append((time.perf_counter() - start) * 1e3)
    return {"free": statistics.median(rates["free"]), "json": statistics.median(rates["json"]),
            "forced": forced / max(1, generated_json), "mask_ms": mask_ms}


def llama_cpp_runs(gguf_path, threads, repeat):
    """{"free": tok/s, "json": tok/s} for llama-cpp-python at batch 1, or None when not installed."""
    try:
        import llama_cpp
        from llama_cpp import Llama, LlamaGrammar
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    eos_ban = {llm.token_eos(): -100.0}
    rates = {"free": [], "json": []}
    llm.create_completion(PROMPT, max_tokens=8)
    for _ in range(repeat):
        for kind in ("free", "json"):
            extra = {"grammar": grammar} if kind == "json" else {"logit_bias": eos_ban}
            start = time.perf_counter()
            out = llm.create_completion(PROMPT, max_tokens=NEW_TOKENS, temperature=0.7, seed=1, **extra)
            elapsed = time.perf_counter() - start
            rates[kind].append(out["usage"]["completion_tokens"] / elapsed)
    del llama_cpp
    return {k: statistics.median(v) for k, v in rates.items()}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def report(pyxf_results, llama, cpu, threads, repeat):
    lines = [
        f"## Structured output (SmolLM2-135M-Instruct q8_0, {cpu}, {threads} threads)",
        "",
        "`python tools/bench_structured.py`: each request decodes 128 tokens, freely (EOS banned) or under a JSON "
        "schema that is not complete before 128 tokens; pyxf on `pyxf.Engine`, llama-cpp-python with "
        f"`LlamaGrammar.from_json_schema` on the same Q8_0 GGUF; median of {repeat} runs.",
        "",
        "| engine | batch | free tok/s | JSON-schema tok/s | constrained / free | forced (jump-forward) "
        "| mask ms/token p50 / p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, r in pyxf_results.items():
        lines.append(f"| pyxf | {batch} | {r['free']:.1f} | {r['json']:.1f} | {r['json'] / r['free']:.2f} | "
                     f"{100 * r['forced']:.0f}% | {percentile(r['mask_ms'], 50):.3f} / {percentile(r['mask_ms'], 99):.3f} |")
    if llama is not None:
        lines.append(f"| llama-cpp-python | 1 | {llama['free']:.1f} | {llama['json']:.1f} | "
                     f"{llama['json'] / llama['free']:.2f} | 0% | |")
        lines.append("")
        lines.append(f"pyxf constrained / llama-cpp-python constrained at batch 1: "
                     f"{pyxf_results[1]['json'] / llama['json']:.2f}x.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--output", help="write the Markdown section here (default: stdout)")
    args = p.parse_args(argv)

    import bench_quant
    from bench import machine_info
    from pyxf import hub

    files = bench_quant.prepare(hub.default_gguf_path(), hub.cache_dir() / "bench" / "quant", args.threads,
                                want_ct2=False)
    results = {}
    for batch in map(int, args.batches.split(",")):
        _log(f"pyxf batch {batch}")
        results[batch] = pyxf_runs(files["pyxf"]["q8_0"], args.threads, batch, args.repeat)
    _log("llama-cpp-python")
    llama = llama_cpp_runs(files["gguf"]["q8_0"], args.threads, args.repeat)
    machine = machine_info()
    text = report(results, llama, machine.get("cpu_title", machine["cpu"]), args.threads, args.repeat)
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
