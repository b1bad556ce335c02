"""Speculative decoding on input-grounded prompts: SmolLM2 q8_0 at batch 1, plain greedy vs
prompt-lookup drafts vs a draft model, beside llama-cpp-python's LlamaPromptLookupDecoding on the
same Q8_0 GGUF with the same threads.

    python tools/bench_speculative.py [--threads 2] [--repeat 3] [--draft 6] [--model-draft 4] [--output FILE]

Each prompt asks to rewrite, correct or repeat a ~300-token text (the output copies much of its
input, which is what prompt lookup exploits); 128 new tokens, greedy, median of --repeat runs of
the whole prompt set. The draft model is the same SmolLM2 quantized to q4_0: there is no smaller
model with SmolLM2's tokenizer, so this is self-speculation with a cheaper copy (it agrees with the
q8_0 model on most tokens, but costs more than half of a q8_0 step per drafted token). Prints a
Markdown section.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

NEW_TOKENS = 128
TEXT = (
    "The village of Saint-Martin lies at the foot of a long green valley, where the river turns twice before it "
    "reaches the sea. Every morning the baker opens his shop at six, and the smell of fresh bread drifts along "
    "the main street to the old stone bridge. Children walk to the small school near the church, and their "
    "teacher, Madame Roux, greets each of them by name at the gate. In the afternoon the market square fills "
    "with farmers selling cheese, apples, honey and wine from the hills around the village. Tourists come in "
    "summer to swim in the river and to climb the path to the ruined castle, from which one can see the whole "
    "valley and, on clear days, the blue line of the sea. In winter the village is quiet: snow covers the roofs, "
    "the river runs fast and cold, and the people gather in the café by the fire to play cards and talk about "
    "the weather, the harvest and the news from the city. The mayor, who has held the office for twenty years, "
    "says that nothing much ever changes in Saint-Martin, and that this is exactly why people love it."
)
TASKS = [
    f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    f"Rewrite the following text in the past tense, keeping everything else the same:\n\n{TEXT}",
    f"Correct any mistakes in the following text and return the full corrected text:\n\n{TEXT}",
]


def _log(message):
    print(f"bench_speculative: {message}", file=sys.stderr, flush=True)


def pyxf_runs(model_dir, draft_dir, threads, repeat, draft, model_draft):
    import pyxf

    pyxf.set_num_threads(threads)
    model = pyxf.load(model_dir)
    draft_model = pyxf.load(draft_dir)
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in TASKS]
    # An engine with a draft model runs it for every request: plain and prompt lookup run without.
    kinds = {"plain": ({}, None), "lookup": ({"speculative": "prompt_lookup", "num_draft_tokens": draft}, None),
             "draft": ({"speculative": draft_model, "num_draft_tokens": model_draft}, draft_model)}
    rates = {kind: [] for kind in kinds}
    stats = {}
    engines = {kind: pyxf.Engine(model, max_batch=1, draft_model=d) for kind, (_, d) in kinds.items()}
    try:
        for kind, engine in engines.items():
            engine.submit(prompts[0], max_new_tokens=4, **kinds[kind][0]).result()
        for _ in range(repeat):
            for kind, (extra, _) in kinds.items():
                tokens, start = 0, time.perf_counter()
                for p in prompts:
                    tokens += engines[kind].submit(p, max_new_tokens=NEW_TOKENS, **extra).result().usage.completion_tokens
                rates[kind].append(tokens / (time.perf_counter() - start))
        stats = {kind: engine.stats() for kind, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()

    def acceptance(s):
        return s["draft_tokens_accepted_total"] / max(1, s["draft_tokens_proposed_total"])

    return {**{kind: statistics.median(r) for kind, r in rates.items()},
            "acceptance": acceptance(stats["lookup"]), "draft_acceptance": acceptance(stats["draft"]),
            "prompt_tokens": [len(model.tokenizer.encode(p)) for p in prompts]}


def llama_cpp_runs(gguf_path, threads, repeat, draft):
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return None
    rates = {}
    for kind in ("plain", "lookup"):
        extra = {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=draft)} if kind == "lookup" else {}
        llm = Llama(model_path=str(gguf_path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                    **extra)
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4)
        runs = []
        for _ in range(repeat):
            tokens, start = 0, time.perf_counter()
            for task in TASKS:
                out = llm.create_chat_completion([{"role": "user", "content": task}], max_tokens=NEW_TOKENS,
                                                 temperature=0.0)
                tokens += out["usage"]["completion_tokens"]
            runs.append(tokens / (time.perf_counter() - start))
        rates[kind] = statistics.median(runs)
        del llm
    return rates


def report(px, llama, cpu, threads, repeat, draft, model_draft):
    lines = [
        f"## Speculative decoding (SmolLM2-135M-Instruct q8_0, {cpu}, {threads} threads)",
        "",
        f"`python tools/bench_speculative.py`: {len(TASKS)} input-grounded prompts ({min(px['prompt_tokens'])}-"
        f"{max(px['prompt_tokens'])} tokens: repeat, rewrite, correct a text), {NEW_TOKENS} new tokens each, greedy, "
        f"batch 1, up to {draft} drafted tokens a step; llama-cpp-python with `LlamaPromptLookupDecoding` "
        f"on the same Q8_0 GGUF; median of {repeat} runs. Draft model: the same SmolLM2 in q4_0 "
        f"(self-speculation with a cheaper copy: no smaller model shares SmolLM2's tokenizer), up to "
        f"{model_draft} drafted tokens a step.",
        "",
        "| engine | drafting | tok/s | speed-up over plain | draft acceptance |",
        "|---|---|---|---|---|",
        f"| pyxf | none | {px['plain']:.1f} | 1.00x | |",
        f"| pyxf | prompt lookup | {px['lookup']:.1f} | {px['lookup'] / px['plain']:.2f}x | {px['acceptance']:.0%} |",
        f"| pyxf | draft model (q4_0 copy) | {px['draft']:.1f} | {px['draft'] / px['plain']:.2f}x | "
        f"{px['draft_acceptance']:.0%} |",
    ]
    if llama is not None:
        lines += [f"| llama-cpp-python | none | {llama['plain']:.1f} | 1.00x | |",
                  f"| llama-cpp-python | `LlamaPromptLookupDecoding` | {llama['lookup']:.1f} | "
                  f"{llama['lookup'] / llama['plain']:.2f}x | |"]
        lines += ["", f"pyxf with prompt lookup / llama-cpp-python with prompt lookup: {px['lookup'] / llama['lookup']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--draft", type=int, default=6, help="prompt lookup: tokens drafted a step at most")
    p.add_argument("--model-draft", type=int, default=4, help="draft model: tokens drafted a step at most")
    p.add_argument("--output", help="write the Markdown section here (default: stdout)")
    args = p.parse_args(argv)

    import bench_quant
    from bench import machine_info
    from pyxf import hub

    files = bench_quant.prepare(hub.default_gguf_path(), hub.cache_dir() / "bench" / "quant", args.threads,
                                want_ct2=False)
    _log("pyxf")
    px = pyxf_runs(files["pyxf"]["q8_0"], files["pyxf"]["q4_0"], args.threads, args.repeat, args.draft,
                   args.model_draft)
    _log("llama-cpp-python")
    llama = llama_cpp_runs(files["gguf"]["q8_0"], args.threads, args.repeat, args.draft)
    machine = machine_info()
    text = report(px, llama, machine.get("cpu_title", machine["cpu"]), args.threads, args.repeat, args.draft,
                  args.model_draft)
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
