"""The `pyxf` command: generate, chat, translate, embed, serve, convert, info.

Every model kind goes through the same entry points: `generate` continues a decoder's prompt or
translates an encoder-decoder's source (both through the model's generate()), `chat` keeps a
decoder's conversation or answers each line of an encoder-decoder, `translate` reads sources from
the arguments, a file or stdin, `embed` writes an encoder's embeddings as JSON lines.
An error is one line on stderr naming the problem (PYXF_DEBUG=1 shows the traceback instead)."""

import argparse
import json
import os
import sys

import pyxf
from pyxf.engine import kv_cache_mb
from pyxf.kv_cache import KV_CACHE_DTYPES


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        # The converter parses its own arguments (argparse cannot pass options like --dtype through).
        from pyxf.convert import main as convert_main

        return convert_main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"pyxf: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- a bug: still one line, unless debugging
        if os.environ.get("PYXF_DEBUG"):
            raise
        print(f"pyxf: error: {type(e).__name__}: {e} (PYXF_DEBUG=1 shows where)", file=sys.stderr)
        return 1


def _parser():
    parser = argparse.ArgumentParser(prog="pyxf", description="Fast CPU inference for transformer models.")
    parser.add_argument("--version", action="version", version=f"pyxf {pyxf.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    generate.add_argument("prompt")
    _add_model_options(generate)
    _add_sampling_options(generate)
    generate.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None,
        help="wrap the prompt in the model's chat template (default: if the model has one)",
    )
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="interactive chat keeping the conversation (exit with EOF or 'exit')")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", help="system message starting the conversation")
    chat.set_defaults(run=_chat)

    translate = commands.add_parser(
        "translate", help="translate texts with an encoder-decoder model (arguments, --input FILE or stdin lines)")
    translate.add_argument("texts", nargs="*", metavar="TEXT", help="texts to translate (default: lines of --input or stdin)")
    _add_input_options(translate)
    translate.add_argument("--beam-size", type=int, default=4, help="beam search width (default 4; 1: greedy)")
    translate.add_argument("--max-length", type=int, help="most target tokens (default 128)")
    translate.add_argument("--target-lang", help="target language of a multilingual model (fra_Latn, fr_XX, fr)")
    translate.add_argument("--source-lang", help="source language of a multilingual model (default: its tokenizer's)")
    translate.add_argument("--batch-size", type=int, default=16, help="sources translated together (default 16)")
    translate.add_argument("--json", action="store_true", help='JSON lines {"source": ..., "translation": ...}')
    translate.set_defaults(run=_translate)

    embed = commands.add_parser(
        "embed", help="sentence embeddings of an encoder as JSON lines (arguments, --input FILE or stdin lines)")
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: lines of --input or stdin)")
    _add_input_options(embed, default_model="all-MiniLM-L6-v2, downloaded on first use")
    embed.add_argument("--batch-size", type=int, default=32, help="texts encoded together (default 32)")
    embed.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                       help="do not L2-normalize (default: as the model's sentence-transformers config says)")
    prompt = embed.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-name", metavar="NAME",
                        help="put the model's sentence-transformers prompt NAME (e.g. query) before each text")
    prompt.add_argument("--prompt", metavar="TEXT", help="put TEXT before each text")
    embed.set_defaults(run=_embed)

    # Listed for --help only: main() hands `pyxf convert ...` to the converter before parsing.
    commands.add_parser(
        "convert", help="convert a checkpoint: pyxf convert SRC OUT [--dtype D] (see pyxf convert --help)"
    )

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat, completions, embeddings)",
        description="Serves models over the OpenAI API: decoders for /v1/chat/completions and /v1/completions, "
        "encoders for /v1/embeddings. With no MODEL: SmolLM2-135M-Instruct and all-MiniLM-L6-v2. "
        "Needs the serve extra: pip install 'pyxf[serve]'.",
    )
    serve.add_argument("models", nargs="*", metavar="NAME=DIR",
                       help="a converted model directory served under the model id NAME (DIR alone: its name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: PYXF_API_KEY)")
    serve.add_argument("--max-batch", type=int, help="most sequences in one engine step (default 64)")
    serve.add_argument("--kv-cache-mb", type=float, help="KV cache budget per model in MiB (default 1024)")
    serve.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                       help="element type of the decoders' KV caches (default: float32 for a float32 model, "
                       "float16 for a 16-bit or quantized one)")
    serve.add_argument("--prefill-chunk", type=int, help="most prompt tokens per engine step (default 512)")
    serve.add_argument("--max-queue", type=int, help="most waiting requests before answering 503 (default 1024)")
    serve.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                       help="do not reuse the KV blocks of earlier requests' shared prompt prefixes")
    serve.add_argument("--threads", type=int, help="number of threads (default: PYXF_NUM_THREADS or the physical cores)")
    serve.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                       help="read the decoders' matrices from their files' shared mappings instead of private copies "
                       "on huge pages: slower decoding, but processes (or Ray replicas) on one machine serving the "
                       "same files hold one copy")
    serve.add_argument("--draft-model", metavar="DIR",
                       help="speculative decoding: a smaller decoder with the served decoders' tokenizer drafts "
                            "tokens for every chat and completions request")
    serve.add_argument("--prompt-lookup", action="store_true",
                       help="speculative decoding without a draft model: drafts copied from earlier in each "
                            "request's prompt and output (n-gram lookup), for every chat and completions request")
    serve.add_argument("--num-draft-tokens", type=int,
                       help="tokens drafted a step with --draft-model or --prompt-lookup (default 4, at most 32)")
    serve.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds running requests get to finish after SIGTERM (default 30)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ray = serve.add_argument_group(
        "Ray Serve", "with --ray: replicas of the server behind Ray Serve's router (needs the ray extra: "
        "pip install 'pyxf[ray]'); --threads is then per replica (default 1), each replica reserving as many CPUs")
    ray.add_argument("--ray", action="store_true", help="serve on Ray: replicas across the cluster's nodes")
    ray.add_argument("--replicas", type=int, help="number of replicas (default 1); the most, with --min-replicas")
    ray.add_argument("--min-replicas", type=int,
                     help="autoscale between --min-replicas and --replicas on the ongoing requests per replica")
    ray.add_argument("--target-ongoing-requests", type=float,
                     help="autoscaling target of ongoing requests per replica (default 16)")
    ray.add_argument("--ray-address", help="the Ray cluster to join (default: $RAY_ADDRESS, else a local Ray started "
                     "for this server)")
    serve.set_defaults(run=_serve)

    info = commands.add_parser(
        "info", help="print build and CPU information as JSON (with --model: how its weights are stored)"
    )
    info.add_argument(
        "--model", metavar="DIR",
        help="also describe this converted model: tensors and bytes per format, weight bytes per decode step",
    )
    info.set_defaults(run=_info)
    return parser


def _add_model_options(parser):
    parser.add_argument(
        "--model", metavar="MODEL",
        help="converted model directory, GGUF file or Hugging Face hub id (org/name; converted once into the "
        "cache) (default: SmolLM2-135M-Instruct, downloaded on first use)",
    )
    parser.add_argument("--revision", help="with a hub id: the branch, tag or commit (default: main)")
    parser.add_argument(
        "--threads", type=int, help="number of threads (default: PYXF_NUM_THREADS or the physical cores)"
    )
    parser.add_argument("--context-length", type=int, help="longest sequence to allow (default: the model's)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                        help="element type of the KV cache (default: float32 for a float32 model, "
                        "float16 for a 16-bit or quantized one)")


def _add_input_options(parser, default_model=None):
    parser.add_argument("--model", metavar="DIR", required=default_model is None,
                        help="converted model directory" + (f" (default: {default_model})" if default_model else ""))
    parser.add_argument("--input", metavar="FILE", help="read one text per line from FILE ('-': stdin)")
    parser.add_argument("--threads", type=int, help="number of threads (default: PYXF_NUM_THREADS or the physical cores)")


def _texts(args):
    """The texts of the arguments, else the non-empty lines of --input or stdin."""
    if args.texts and args.input:
        raise ValueError("give texts as arguments or with --input, not both")
    if args.texts:
        return list(args.texts)
    if args.input and args.input != "-":
        with open(args.input, encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError("no texts: give them as arguments, with --input FILE, or on stdin")
    return texts


def _batches(items, size):
    if size <= 0:
        raise ValueError(f"--batch-size must be positive, got {size}")
    return (items[i:i + size] for i in range(0, len(items), size))


def _add_sampling_options(parser):
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 (default) disables it")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="default: random")


def _load(args):
    return pyxf.load(args.model, context_length=args.context_length, threads=args.threads, revision=args.revision,
                     kv_cache_dtype=args.kv_cache_dtype)


def _sampling(args):
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def _print_stream(pieces):
    text = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        text.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def _generate(args):
    model = _load(args)
    if model.tokenizer is None:
        raise ValueError(f"{model.path} has no tokenizer, so it cannot take a text prompt")
    template = model.tokenizer.chat_template
    if args.chat and not template:
        raise ValueError(f"{model.path} has no chat template; drop --chat")
    use_chat = bool(template) if args.chat is None else args.chat
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if use_chat else {"prompt": args.prompt}
    if args.stop:
        prompt["stop"] = args.stop
    _print_stream(pyxf.generate(model, **prompt, stream=True, **_sampling(args)))


def _translate(args):
    texts = _texts(args)
    model = pyxf.load(args.model, threads=args.threads)
    if not model.is_encoder_decoder:
        raise ValueError(f"{model.path} is a {model.config['family']} model; pyxf translate needs an encoder-decoder "
                         "model (Marian, T5, ...)")
    for batch in _batches(texts, args.batch_size):
        outputs = pyxf.translate(model, batch, beam_size=args.beam_size, max_length=args.max_length,
                                 target_lang=args.target_lang, source_lang=args.source_lang)
        for source, output in zip(batch, outputs):
            print(json.dumps({"source": source, "translation": output}, ensure_ascii=False) if args.json else output)
        sys.stdout.flush()


def _embed(args):
    texts = _texts(args)
    if args.model is None:
        from pyxf.hub import minilm_model_path

        args.model = minilm_model_path()
    model = pyxf.load(args.model, threads=args.threads)
    if not model.is_encoder:
        raise ValueError(f"{model.path} is a {model.config['family']} model; pyxf embed needs an encoder "
                         "(BERT, RoBERTa, DistilBERT, a sentence-transformers model such as Qwen3-Embedding)")
    for batch in _batches(texts, args.batch_size):
        vectors = model.encode(batch, normalize=args.normalize, prompt_name=args.prompt_name, prompt=args.prompt)
        for text, vector in zip(batch, vectors):
            print(json.dumps({"text": text, "embedding": [float(v) for v in vector]}, ensure_ascii=False))
        sys.stdout.flush()


def _chat(args):
    model = _load(args)
    if getattr(model, "is_encoder", False):
        raise ValueError(f"{model.path} is an encoder: it has no chat; use `pyxf embed`")
    if model.is_encoder_decoder and model.tokenizer is not None:
        return _chat_without_history(model, args)
    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise ValueError(f"{model.path} has no chat template; use `pyxf generate` instead")
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    # One engine for the conversation: each turn's prompt starts with the previous turns, whose KV
    # pages the prefix cache still holds, so a turn computes only what is new.
    # The current conversation and as much again of earlier turns' pages.
    engine = pyxf.Engine(model, max_batch=1, kv_cache_mb=kv_cache_mb(model, [model.context_length] * 2))
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "exit":
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        _drop_old_turns(model, history, args.max_new_tokens, engine.context_length)
        try:
            request = engine.submit(messages=history, **_sampling(args))
        except ValueError as e:  # e.g. a message too long for the context: report it, keep chatting
            print(f"pyxf: error: {e}", file=sys.stderr)
            history.pop()
            continue
        try:
            _print_stream(delta.text for delta in request)
        finally:
            request.cancel()  # Ctrl-C mid-answer: stop generating
        history.append({"role": "assistant", "content": request.result().text})
    engine.close()
    return 0


def _chat_without_history(model, args):
    """An encoder-decoder model in the chat loop: each line is a source and gets its output (a
    translation model keeps no conversation)."""
    if args.system:
        raise ValueError(f"{model.path} is an encoder-decoder model: it takes no system message")
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() == "exit":
            return 0
        if line.strip():
            _print_stream(pyxf.generate(model, line, stream=True, **_sampling(args)))


def _drop_old_turns(model, history, max_new_tokens, context_length):
    """Forgets the oldest exchanges (keeping a system message) until the prompt fits the context."""
    def prompt_length():
        return len(model.tokenizer.encode(model.tokenizer.apply_chat_template(history)))

    first = 1 if history[0]["role"] == "system" else 0
    while prompt_length() + max_new_tokens > context_length and len(history) - first > 1:
        del history[first]
        if history[first]["role"] == "assistant":
            del history[first]
        print("pyxf: (conversation too long; forgot the oldest exchange)", file=sys.stderr)


def _serve(args):
    try:
        from pyxf.server import serve
    except ImportError as e:
        raise ImportError(f"pyxf serve needs the serve extra ({e}); install it with: pip install 'pyxf[serve]'") from None
    options = dict(
        api_key=args.api_key, max_batch=args.max_batch, kv_cache_mb=args.kv_cache_mb,
        prefill_chunk=args.prefill_chunk, max_queue=args.max_queue, prefix_cache=args.prefix_cache,
        threads=args.threads, max_body_bytes=int(args.max_body_mb * (1 << 20)), shutdown_timeout=args.shutdown_timeout,
        draft_model=args.draft_model, prompt_lookup=args.prompt_lookup, num_draft_tokens=args.num_draft_tokens,
        kv_cache_dtype=args.kv_cache_dtype, huge_pages=args.huge_pages,
    )
    if args.ray:
        return _serve_on_ray(args, options)
    given = [flag for flag, value in (("--replicas", args.replicas), ("--min-replicas", args.min_replicas),
                                      ("--target-ongoing-requests", args.target_ongoing_requests),
                                      ("--ray-address", args.ray_address)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --ray")
    return serve(args.models, host=args.host, port=args.port, log_level=args.log_level, **options)


def _serve_on_ray(args, options):
    try:
        from pyxf.ray import serve_on_ray
    except ImportError as e:
        raise ImportError(f"pyxf serve --ray needs the ray extra ({e}); install it with: pip install 'pyxf[ray]'") from None
    autoscaling = None
    if args.min_replicas is not None or args.target_ongoing_requests is not None:
        autoscaling = {"min_replicas": args.min_replicas if args.min_replicas is not None else 1}
        if args.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = args.target_ongoing_requests
    options["threads"] = options["threads"] or 1
    return serve_on_ray(args.models, address=args.ray_address, host=args.host, port=args.port,
                        replicas=args.replicas or 1, autoscaling=autoscaling, **options)


def _info(args):
    info = pyxf.info()
    if args.model:
        from pyxf.model import describe_model

        info["model"] = describe_model(args.model)
    print(json.dumps(info, indent=2))
