"""Speculative decoding by prompt lookup on input-grounded prompts: SmolLM2 q8_0 at batch 1, plain
greedy vs prompt-lookup drafts, beside llama-cpp-python's LlamaPromptLookupDecoding on the same Q8_0
GGUF with the same threads.

    python tools/bench_speculative.py [--threads 2] [--repeat 3] [--draft 6] [--output FILE]

Each prompt asks to rewrite, correct or repeat a ~300-token text (the output copies much of its
input, which is what prompt lookup exploits); 128 new tokens, greedy, median of --repeat runs of
the whole prompt set. Prints a Markdown section.
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


def pyxf_runs(model_dir, threads, repeat, draft):
    import pyxf

    pyxf.set_num_threads(threads)
    model = pyxf.load(model_dir)
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in TASKS]
    rates = {"plain": [], "lookup": []}
    accepted = proposed = 0
    with pyxf.Engine(model, max_batch=1) as engine:
        engine.submit(prompts[0], max_new_tokens=4).result()
        for _ in range(repeat):
            for kind in ("plain", "lookup"):
                extra = {"speculative": "prompt_lookup", "num_draft_tokens": draft} if kind == "lookup" else {}
                tokens, start = 0, time.perf_counter()
                for p in prompts:
                    tokens += engine.submit(p, max_new_tokens=NEW_TOKENS, **extra).result().usage.completion_tokens
                rates[kind].append(tokens / (time.perf_counter() - start))
        stats = engine.stats()
    return {"plain": statistics.median(rates["plain"]), "lookup": statistics.median(rates["lookup"]),
            "acceptance": stats["draft_tokens_accepted_total"] / max(1, stats["draft_tokens_proposed_total"]),
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


def report(px, llama, cpu, threads, repeat, draft):
    lines = [
        f"## Speculative decoding by prompt lookup (SmolLM2-135M-Instruct q8_0, {cpu}, {threads} threads)",
        "",
        f"`python tools/bench_speculative.py`: {len(TASKS)} input-grounded prompts ({min(px['prompt_tokens'])}-"
        f"{max(px['prompt_tokens'])} tokens: repeat, rewrite, correct a text), {NEW_TOKENS} new tokens each, greedy, "
        f"batch 1, up to {draft} drafted tokens a step; llama-cpp-python with `LlamaPromptLookupDecoding` "
        f"on the same Q8_0 GGUF; median of {repeat} runs.",
        "",
        "| engine | plain tok/s | prompt lookup tok/s | speed-up | draft acceptance |",
        "|---|---|---|---|---|",
        f"| pyxf | {px['plain']:.1f} | {px['lookup']:.1f} | {px['lookup'] / px['plain']:.2f}x | {px['acceptance']:.0%} |",
    ]
    if llama is not None:
        lines.append(f"| llama-cpp-python | {llama['plain']:.1f} | {llama['lookup']:.1f} | "
                     f"{llama['lookup'] / llama['plain']:.2f}x | |")
        lines += ["", f"pyxf with prompt lookup / llama-cpp-python with prompt lookup: {px['lookup'] / llama['lookup']:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--draft", type=int, default=6)
    p.add_argument("--output", help="write the Markdown section here (default: stdout)")
    args = p.parse_args(argv)

    import bench_quant
    from bench import machine_info
    from pyxf import hub

    files = bench_quant.prepare(hub.default_gguf_path(), hub.cache_dir() / "bench" / "quant", args.threads,
                                want_ct2=False)
    _log("pyxf")
    px = pyxf_runs(files["pyxf"]["q8_0"], args.threads, args.repeat, args.draft)
    _log("llama-cpp-python")
    llama = llama_cpp_runs(files["gguf"]["q8_0"], args.threads, args.repeat, args.draft)
    machine = machine_info()
    text = report(px, llama, machine.get("cpu_title", machine["cpu"]), args.threads, args.repeat, args.draft)
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
