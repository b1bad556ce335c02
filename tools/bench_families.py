#!/usr/bin/env python3
"""Model families beside their usual engines: Gemma 3 270M (the published Q4_K_M GGUF) in pyxf,
llama.cpp and transformers, all-mpnet-base-v2 in pyxf and sentence-transformers, and, for the families
without a real checkpoint here, random ones of a realistic size in pyxf and transformers.

    python tools/bench_families.py [--threads 2] [--repeat 3] [--output FILE.md]

Gemma: pyxf runs the GGUF converted with no flags (its Q4_K / Q6_K / Q5_0 / Q8_0 blocks kept),
llama.cpp (llama-cpp-python) the file itself, transformers the file dequantized to float32 at load
(the only way it reads GGUF). decode: 64 fixed tokens fed one at a time after a 16-token prompt
(each engine's per-token call: pyxf Session.feed, llama.cpp Llama.eval, transformers forward with
its cache), tokens/s; prefill: one 512-token forward pass. MPNet: 256 sentences of 4-120 words,
batches of 32, sentences/s. Each engine runs in its own subprocess with --threads threads; every
figure is the median of --repeat runs after a warm-up. The files come through pyxf.hub (pip).

Random checkpoints (float32, built with transformers once and cached, converted by pyxf): Qwen3,
Phi-3, Mixtral (8 experts, top 2) and Qwen2-MoE decoders of 8 layers, hidden 512 (decode and prefill
as above); BART, 6 + 6 layers, d_model 512 (greedy, 16 sources of 30 tokens, 32 new tokens each);
ModernBERT, 8 layers, hidden 512 (64 sequences of 128 tokens, one forward pass each batch of 16).
Their speed does not depend on the weights' values (routing does, a little, for the experts).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import which_pyxf  # noqa: E402

which_pyxf.use_checkout_if_built()

# random checkpoints: family -> (transformers class, config class, config)
_DECODER = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
RANDOM = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_DECODER, head_dim=64)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_DECODER, pad_token_id=0)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_DECODER, intermediate_size=768, num_local_experts=8,
                                                             num_experts_per_tok=2)),
    "qwen2moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(_DECODER, moe_intermediate_size=384, num_experts=8,
                                                                num_experts_per_tok=2, shared_expert_intermediate_size=768)),
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(
        vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=256)),
    "modernbert": ("ModernBertModel", "ModernBertConfig", dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        max_position_embeddings=1024, global_attn_every_n_layers=3, local_attention=128, pad_token_id=0)),
}
DECODERS = ("qwen3", "phi3", "mixtral", "qwen2moe")
SOURCES, SOURCE_TOKENS, NEW_TOKENS = 16, 30, 32
SEQUENCES, SEQUENCE_TOKENS, ENCODE_BATCH = 64, 128, 16

ENGINES = ("pyxf-gemma", "llama.cpp-gemma", "transformers-gemma", "pyxf-mpnet", "sentence-transformers-mpnet",
           *(f"{engine}-{family}" for family in RANDOM for engine in ("pyxf", "transformers")))
PROMPT, STEPS, PREFILL = 16, 64, 512
SENTENCES, BATCH = 256, 32


def inputs():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = lambda n: [2] + [int(t) for t in rng.integers(1000, 200000, n - 1)]  # noqa: E731  (2: Gemma's BOS)
    words = "the model reads a sentence about rivers cities music science and every other thing people write".split()
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(4, 120, SENTENCES)]
    return ids(PROMPT), [int(t) for t in rng.integers(1000, 200000, STEPS)], ids(PREFILL), texts


def random_checkpoint(family):
    """The random checkpoint's transformers directory (built once, seed 0) and its pyxf conversion."""
    import torch
    import transformers

    from pyxf import hub

    root = hub.cache_dir() / "bench" / "families" / family
    hf, converted = root / "hf", root / "pyxf"
    if not (hf / "config.json").is_file():
        model_class, config_class, config = RANDOM[family]
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
        model.save_pretrained(hf)
    if not (converted / "config.json").is_file():
        hub.convert_into_cache(hf, converted)
    return hf, converted


def measure_decoder(engine, model, prompt, steps, long, repeat):
    """decode (steps fed one at a time after the prompt) and prefill (one pass over `long`) tokens/s of
    a pyxf Model, a llama_cpp.Llama or a transformers causal LM."""
    if engine == "pyxf":
        def decode():
            session = model.session()
            session.feed(prompt, all_logits=False)
            return timed(lambda: [session.feed([t], all_logits=False) for t in steps])

        def prefill():
            return timed(lambda: model.session().feed(long, all_logits=False))
    elif engine == "llama.cpp":
        def decode():
            model.reset()
            model.eval(prompt)
            return timed(lambda: [model.eval([t]) for t in steps])

        def prefill():
            model.reset()
            return timed(lambda: model.eval(long))
    else:
        import torch

        def decode():
            with torch.inference_mode():
                past = model(torch.tensor([prompt]), use_cache=True).past_key_values

                def run():
                    nonlocal past
                    for t in steps:
                        past = model(torch.tensor([[t]]), past_key_values=past, use_cache=True).past_key_values

                return timed(run)

        def prefill():
            with torch.inference_mode():
                return timed(lambda: model(torch.tensor([long]), logits_to_keep=1))
    decode(), prefill()  # warm-up
    return {"decode_tokens_per_s": len(steps) / statistics.median(decode() for _ in range(repeat)),
            "prefill_tokens_per_s": len(long) / statistics.median(prefill() for _ in range(repeat))}


def random_family(engine, family, threads, repeat):
    """decode / prefill (decoders), translate (BART) or encode (ModernBERT) on the random checkpoint."""
    import numpy as np

    hf, converted = random_checkpoint(family)
    rng = np.random.default_rng(1)
    ids = lambda n: [int(t) for t in rng.integers(5, 32000, n)]  # noqa: E731
    if engine == "pyxf":
        import pyxf

        model = pyxf.load(converted, threads=threads, **({"context_length": 1024} if family in DECODERS else {}))
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        model = getattr(transformers, RANDOM[family][0]).from_pretrained(hf).eval()
    if family in DECODERS:
        return measure_decoder(engine, model, ids(PROMPT), ids(STEPS), ids(PREFILL), repeat)
    if family == "bart":
        sources = [ids(SOURCE_TOKENS) + [2] for _ in range(SOURCES)]
        produced = 0

        def translate():
            nonlocal produced
            if engine == "pyxf":
                out = pyxf.translate(model, sources, max_length=NEW_TOKENS, min_length=NEW_TOKENS)
                produced = sum(map(len, out))
            else:
                with torch.inference_mode():
                    out = model.generate(input_ids=torch.tensor(sources), num_beams=1, do_sample=False,
                                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                produced = int((out[:, 1:] != model.config.pad_token_id).sum())

        translate()
        seconds = statistics.median(timed(translate) for _ in range(repeat))
        return {"translate_tokens_per_s": produced / seconds}
    batches = [[ids(SEQUENCE_TOKENS) for _ in range(ENCODE_BATCH)] for _ in range(SEQUENCES // ENCODE_BATCH)]

    def encode():
        for batch in batches:
            if engine == "pyxf":
                model.encode(batch, batch_size=ENCODE_BATCH, output="tokens")
            else:
                with torch.inference_mode():
                    model(torch.tensor(batch))

    encode()
    return {"encode_tokens_per_s": SEQUENCES * SEQUENCE_TOKENS / statistics.median(timed(encode) for _ in range(repeat))}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(engine, threads, repeat):
    from pyxf import hub

    kind, _, family = engine.rpartition("-")
    if family in RANDOM:
        return random_family(kind, family, threads, repeat)

    prompt, steps, long, texts = inputs()
    if family == "gemma":
        gguf = hub.gemma3_gguf_path()
        if kind == "pyxf":
            import pyxf

            model_dir = hub.cache_dir() / "bench" / "gemma3-270m-q4_k_m"
            if not (model_dir / "config.json").is_file():
                hub.convert_into_cache(gguf, model_dir)
            model = pyxf.load(model_dir, threads=threads, context_length=1024)
        elif kind == "llama.cpp":
            import llama_cpp

            model = llama_cpp.Llama(str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                    verbose=False)
        else:
            import torch
            import transformers

            torch.set_num_threads(threads)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                      dtype=torch.float32).eval()
        return measure_decoder(kind, model, prompt, steps, long, repeat)

    source = hub.mpnet_source_path()
    if engine == "pyxf-mpnet":
        import pyxf

        model_dir = hub.cache_dir() / "bench" / "all-mpnet-base-v2"
        if not (model_dir / "config.json").is_file():
            hub.convert_into_cache(source, model_dir)
        model = pyxf.load(model_dir, threads=threads)
        encode = lambda: model.encode(texts, batch_size=BATCH)  # noqa: E731
    else:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        st = SentenceTransformer(str(source), device="cpu")
        encode = lambda: st.encode(texts, batch_size=BATCH)  # noqa: E731
    encode()  # warm-up
    return {"sentences_per_s": SENTENCES / statistics.median(timed(encode) for _ in range(repeat))}


def report(results, threads, repeat, cpu):
    def cell(engine, key):
        r = results.get(engine)
        return f"{r[key]:,.1f}" if r and key in r else "failed" if engine in results else "—"

    def ratio(a, b, key):
        ra, rb = results.get(a), results.get(b)
        return f"{ra[key] / rb[key]:.2f}x" if ra and rb and key in ra and key in rb else "—"

    lines = [
        f"### Model families ({cpu}, {threads} threads)",
        "",
        f"`python tools/bench_families.py --threads {threads} --repeat {repeat}`: Gemma 3 270M from its published "
        "Q4_K_M GGUF (pyxf: converted with no flags, the K-quant blocks kept; llama.cpp: the file; transformers: the "
        f"file dequantized to float32), decode = {STEPS} tokens fed one at a time after a {PROMPT}-token prompt, "
        f"prefill = one {PREFILL}-token pass; all-mpnet-base-v2 encoding {SENTENCES} sentences in batches of {BATCH}. "
        "Families without a real checkpoint here: random float32 checkpoints built with transformers (8-layer "
        "decoders of hidden 512; BART 6+6, d_model 512, greedy, 16 sources of 30 tokens, 32 new tokens; ModernBERT "
        f"8 layers, 64 sequences of 128 tokens in batches of 16), pyxf against transformers. Median of {repeat} runs.",
        "",
        "| model | workload | pyxf | llama.cpp | transformers / sentence-transformers | pyxf / llama.cpp | "
        "pyxf / transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload, key in (("decode (tokens/s)", "decode_tokens_per_s"), ("prefill 512 (tokens/s)", "prefill_tokens_per_s")):
        lines.append(f"| Gemma 3 270M Q4_K_M | {workload} | {cell('pyxf-gemma', key)} | {cell('llama.cpp-gemma', key)} | "
                     f"{cell('transformers-gemma', key)} | {ratio('pyxf-gemma', 'llama.cpp-gemma', key)} | "
                     f"{ratio('pyxf-gemma', 'transformers-gemma', key)} |")
    key = "sentences_per_s"
    lines.append(f"| all-mpnet-base-v2 | encode (sentences/s) | {cell('pyxf-mpnet', key)} | — | "
                 f"{cell('sentence-transformers-mpnet', key)} | — | {ratio('pyxf-mpnet', 'sentence-transformers-mpnet', key)} |")
    names = {"qwen3": "Qwen3", "phi3": "Phi-3", "mixtral": "Mixtral 8 experts", "qwen2moe": "Qwen2-MoE 8 experts",
             "bart": "BART 6+6", "modernbert": "ModernBERT"}
    workloads = {"decode_tokens_per_s": "decode (tokens/s)", "prefill_tokens_per_s": "prefill 512 (tokens/s)",
                 "translate_tokens_per_s": "greedy translation (target tokens/s)",
                 "encode_tokens_per_s": "encode (tokens/s)"}
    for family in RANDOM:
        ours, theirs = f"pyxf-{family}", f"transformers-{family}"
        for key, workload in workloads.items():
            if key in (results.get(ours) or {}) or key in (results.get(theirs) or {}):
                lines.append(f"| {names[family]} (random) | {workload} | {cell(ours, key)} | — | {cell(theirs, key)} | — | "
                             f"{ratio(ours, theirs, key)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--output", help="write the Markdown section here (default: print it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.repeat)))
        return 0
    results = {}
    for engine in args.engines.split(","):
        if engine not in ENGINES:
            p.error(f"unknown engine {engine!r} ({', '.join(ENGINES)})")
        print(f"bench_families: {engine}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads), "--repeat", str(args.repeat)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if proc.returncode != 0:
            print(f"{engine} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            results[engine] = None
            continue
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    from bench import machine_info

    machine = machine_info()
    text = report(results, args.threads, args.repeat, machine.get("cpu_title", platform.processor()))
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
