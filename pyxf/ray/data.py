"""Ray Data callables: pass the class to `Dataset.map_batches` and each actor loads the model once.

    import ray
    from pyxf.ray import Embedder

    ds = ray.data.from_items([{"text": t} for t in texts])
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": "models/all-minilm-l6-v2"},
                        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=2, batch_size=256)

Each actor runs pyxf with as many threads as the CPUs Ray reserved for it (map_batches' num_cpus,
1 by default), so actors sharing a node do not oversubscribe its cores. Weights are memory-mapped:
actors on one machine share their pages (`memory()` shows RSS and PSS). The model directory must be
readable on every node (a shared filesystem, or the same path on each); None: pyxf's default model,
fetched on the node on first use.

Batches are dicts of numpy arrays (Ray Data's default batch format) or pandas DataFrames; the
output is the input batch with the new columns added.
"""

import numpy as np

import pyxf
from pyxf.memory import process_memory
from pyxf.ray.resources import assigned_cpus


class _ModelActor:
    """Loads the model once, with the thread count of the CPUs Ray reserved for this actor."""

    def __init__(self, path, threads):
        self.threads = threads or assigned_cpus()
        self.model = pyxf.load(path, threads=self.threads)

    def memory(self):
        """This process's memory: rss, pss, and weights_rss / weights_pss of the model's files."""
        usage = process_memory(files_under=self.model.path)
        return dict(rss=usage["rss"], pss=usage["pss"], weights_rss=usage["files_rss"],
                    weights_pss=usage["files_pss"])


class Embedder(_ModelActor):
    """Sentence embeddings of an encoder model: the `column` column (texts) in, `output_column`
    (float32 [N, H], Model.encode's pooling and normalization) out. Other keyword arguments go to
    Model.encode (batch_size: texts per forward pass, default 32, apart from the rows per Ray Data
    batch; pooling, normalize, max_length, truncate)."""

    def __init__(self, model=None, *, column="text", output_column="embedding", threads=None, **encode_options):
        from pyxf import hub

        super().__init__(model if model is not None else hub.minilm_model_path(), threads)
        if not getattr(self.model, "is_encoder", False):
            raise ValueError(f"Embedder needs an encoder model; {self.model.path} is not one")
        self.column = column
        self.output_column = output_column
        self.encode_options = encode_options

    def __call__(self, batch):
        texts = _texts(batch, self.column)
        vectors = self.model.encode(texts, **self.encode_options) if texts else _empty(self.model)
        return _with_columns(batch, {self.output_column: vectors})


class Generator(_ModelActor):
    """Text generation with a decoder model on one pyxf.Engine per actor (continuous batching across
    the rows of a batch; the prefix cache keeps shared prompt starts between batches).

    In: a `prompt_column` of strings, or a `messages_column` of chat conversations (lists of
    {"role", "content"}). Out: `text`, `finish_reason` and the usage columns `prompt_tokens`,
    `completion_tokens`, `cached_tokens`. Sampling keyword arguments are Engine.submit's
    (max_new_tokens, temperature (default 0: greedy), top_p, top_k, seed, stop, ...); engine
    options go in `engine` (max_batch, kv_cache_mb, prefill_chunk, prefix_cache)."""

    OUTPUT_COLUMNS = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens")

    def __init__(self, model=None, *, prompt_column="prompt", messages_column="messages", threads=None, engine=None,
                 **sampling):
        from pyxf import hub

        super().__init__(model if model is not None else hub.default_model_path(), threads)
        self.prompt_column = prompt_column
        self.messages_column = messages_column
        # A batch is submitted whole: the queue must hold any batch size Ray Data hands over.
        self.engine = pyxf.Engine(self.model, **{"max_queue": 1 << 30, **(engine or {})})
        self.sampling = sampling

    def __call__(self, batch):
        requests = [self.engine.submit(**prompt, **self.sampling) for prompt in self._prompts(batch)]
        results = [request.result() for request in requests]
        columns = dict(
            text=[r.text for r in results],
            finish_reason=[r.finish_reason for r in results],
            prompt_tokens=[r.usage.prompt_tokens for r in results],
            completion_tokens=[r.usage.completion_tokens for r in results],
            cached_tokens=[r.usage.cached_tokens for r in results],
        )
        return _with_columns(batch, {name: np.array(values) for name, values in columns.items()})

    def _prompts(self, batch):
        if self.messages_column in _column_names(batch):
            return [{"messages": _conversation(m)} for m in batch[self.messages_column]]
        if self.prompt_column in _column_names(batch):
            return [{"prompt": str(p)} for p in batch[self.prompt_column]]
        raise ValueError(f"Generator needs a {self.prompt_column!r} or a {self.messages_column!r} column; "
                         f"the batch has {sorted(_column_names(batch))}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=0)


class Translator(_ModelActor):
    """Translation with an encoder-decoder model: the `column` column (source texts) in,
    `output_column` out. Keyword arguments are pyxf.translate's (beam_size (default 4),
    max_length, length_penalty, ...); with num_hypotheses > 1 each row gets a list of texts."""

    def __init__(self, model, *, column="text", output_column="translation", threads=None, **translate_options):
        super().__init__(model, threads)
        if not getattr(self.model, "is_encoder_decoder", False):
            raise ValueError(f"Translator needs an encoder-decoder model; {self.model.path} is not one")
        if translate_options.get("return_scores"):
            raise ValueError("Translator does not return scores (return_scores); use pyxf.translate for them")
        self.column = column
        self.output_column = output_column
        self.translate_options = translate_options

    def __call__(self, batch):
        texts = _texts(batch, self.column)
        translations = pyxf.translate(self.model, texts, **self.translate_options) if texts else []
        column = np.empty(len(translations), dtype=object)
        column[:] = translations  # element-wise: a row's hypotheses stay one list
        return _with_columns(batch, {self.output_column: column})


# ---------------------------------------------------------------------------------------------
# batches: dicts of numpy arrays or pandas DataFrames


def _column_names(batch):
    return set(batch.keys()) if isinstance(batch, dict) else set(batch.columns)


def _texts(batch, column):
    if column not in _column_names(batch):
        raise ValueError(f"the batch has no {column!r} column (it has {sorted(_column_names(batch))}); "
                         "name the text column with column=")
    return [str(t) for t in batch[column]]


def _conversation(messages):
    """A row's messages (a list of dicts, or Arrow's array of dicts) -> [{"role", "content"}, ...]."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def _empty(model):
    return np.zeros((0, model.config["hidden_size"]), dtype=np.float32)


def _with_columns(batch, columns):
    if isinstance(batch, dict):
        return {**batch, **columns}
    batch = batch.copy()
    for name, values in columns.items():
        batch[name] = list(values) if getattr(values, "ndim", 1) > 1 else values
    return batch
