"""Encoders (BERT, RoBERTa, DistilBERT, MPNet, ModernBERT; decoders used as encoders, Qwen3-Embedding):
batched sentence embeddings, token states, classification.

Texts are tokenized with the tokenizer's post-processor ([CLS] ... [SEP], token type ids), as
transformers does, sorted by length and run `batch_size` at a time through `_core.Model.encode`,
which packs the sequences of a batch without padding (the GIL is released meanwhile). Pooling,
normalization and the classification heads (a few small matrices) run in numpy.
"""

import math

import numpy as np

from pyxf.checks import as_token_array
from pyxf.tensorfile import bf16_to_float32

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
OUTPUTS = ("sentence", "tokens")
# The poolings whose result a prompt's tokens enter unless excluded (sentence-transformers masks them).
MASKED_POOLING = ("mean", "max", "mean_sqrt_len")


def encode(model, texts, batch_size=32, pooling=None, normalize=None, output="sentence", max_length=None,
           truncate=True, progress=False, prompt_name=None, prompt=None):
    """Embeddings of `texts` (a list of str, or one str). An item may also be a list of token ids of
    the model's vocabulary: the complete sequence, used as given (no [CLS]/[SEP] is added).

    output="sentence": float32 [N, H] (one str: [H]), each text's token states pooled with `pooling`
    ("mean" | "cls" | "max" | "mean_sqrt_len" | "lasttoken"; default: the model's sentence-transformers
    pooling, else "mean") and L2-normalized if `normalize` (default: the model's, else False).
    prompt_name: one of the model's sentence-transformers prompts (model.config["prompts"], e.g.
    "query"), or prompt: a text, put before every text as sentence-transformers does (default: the
    model's default_prompt_name, if any).
    output="tokens": a list of float32 [T_i, H], the last hidden state of every token of each text
    (special tokens included); pooling and normalize do not apply.
    max_length: tokens per text, special tokens included (default: the model's max_length, from
    sentence-transformers' max_seq_length or the tokenizer's model_max_length, at most the positions
    the model has). Longer texts are cut to it, or with truncate=False raise ValueError.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    config = model.config
    default_pooling = config.get("pooling") or {}
    if output == "tokens":
        if pooling is not None or normalize:
            raise ValueError('pooling and normalize apply to output="sentence" only')
    else:
        pooling = default_pooling.get("mode", "mean") if pooling is None else pooling
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        normalize = bool(default_pooling.get("normalize", False)) if normalize is None else normalize
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be True, False or None, got {normalize!r}")

    single = isinstance(texts, str)
    texts = [texts] if single else _check_texts(texts)
    prefix = _prompt_text(config, prompt_name, prompt)
    if prefix:
        if output == "sentence" and pooling in MASKED_POOLING and not default_pooling.get("include_prompt", True):
            raise ValueError("this model pools without its prompt's tokens (sentence-transformers' include_prompt="
                             "False), which pyxf does not support; encode without a prompt")
        texts = _with_prompt(texts, prefix)
    hidden_size = config["hidden_size"]
    if output == "tokens":
        result = _run(model, texts, batch_size, max_length, truncate, progress, _token_states)
        return result[0] if single else result

    def pool(hidden, offsets):
        return _pool(hidden, offsets, pooling)

    embeddings = _stack(_run(model, texts, batch_size, max_length, truncate, progress, pool), hidden_size)
    if normalize:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings /= np.maximum(norms, 1e-12)
    return embeddings[0] if single else embeddings


def _prompt_text(config, prompt_name, prompt):
    """The text to put before each text: `prompt`, the model's prompt named `prompt_name`, or its
    default prompt; "" for none."""
    if prompt is not None and prompt_name is not None:
        raise ValueError("pass prompt or prompt_name, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return prompt
    prompts = config.get("prompts") or {}
    name = config.get("default_prompt_name") if prompt_name is None else prompt_name
    if name is None:
        return ""
    if name not in prompts:
        known = ", ".join(map(repr, prompts)) or "none"
        raise ValueError(f"prompt_name {name!r} is not one of this model's prompts ({known})")
    return prompts[name]


def _with_prompt(texts, prefix):
    """The texts with the prompt before each, as sentence-transformers does (token ids and text pairs
    cannot take one)."""
    if not all(isinstance(text, str) for text in texts):
        raise ValueError("a prompt applies to texts (str), not to token ids or text pairs")
    return [prefix + text for text in texts]


def classify(model, texts, batch_size=32, max_length=None, truncate=True, progress=False, return_logits=False):
    """Sequence classification: float32 [N, num_labels] (one str or pair: [num_labels]) probabilities,
    softmax over the labels (sigmoid for multi-label models; raw scores for regression models, which
    one-label cross-encoders are), or the logits with return_logits=True. Label names: model.labels.

    An item is a text, a text pair (a tuple or list of two str: a (query, document) pair for a
    cross-encoder, tokenized as transformers tokenizes pairs: [CLS] a [SEP] b [SEP] with token types
    0 and 1; truncation cuts the longer of the two first) or token ids. A tuple (a, b) alone is one pair."""
    head = model.config.get("classifier")
    if not head:
        raise ValueError(
            "this model has no classification head (convert a *ForSequenceClassification checkpoint to get one)"
        )
    single = isinstance(texts, str) or (isinstance(texts, tuple) and _is_pair(texts))
    texts = [texts] if single else _check_texts(texts)
    weights = _head_weights(model)

    def pooled(hidden, offsets):  # the first token's state, or the mean (ModernBERT's classifier_pooling)
        return _pool(hidden, offsets, head.get("pooling", "cls"))

    states = _stack(_run(model, texts, batch_size, max_length, truncate, progress, pooled), model.config["hidden_size"])
    logits = _head_logits(states, head, weights, model.config["norm_eps"])
    if return_logits or head.get("problem_type") == "regression":
        scores = logits
    elif head.get("problem_type") == "multi_label_classification":
        scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    else:
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        scores = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return scores[0] if single else scores


def rank(model, query, documents, top_k=None, return_documents=False, batch_size=32, max_length=None,
         truncate=True, progress=False):
    """Ranks `documents` (a list of str) by their relevance to `query` (a str) with a cross-encoder (a
    sequence classifier with one label, e.g. a BERT or RoBERTa reranker), as sentence-transformers'
    CrossEncoder.rank does: a list of {"corpus_id": index in documents, "score": float} (and "text":
    the document with return_documents=True), highest score first, the first `top_k` (default all).
    Scores are the (query, document) pair logits through the model's score activation: sigmoid
    (CrossEncoder's default for one-label models) unless the checkpoint's sentence-transformers
    settings name Identity or Tanh (config classifier.score_activation)."""
    head = model.config.get("classifier")
    if not head or head.get("num_labels") != 1:
        labels = head.get("num_labels") if head else 0
        raise ValueError(f"rank() needs a cross-encoder: a classification head with one label (this model has {labels}); "
                         "use classify() with text pairs instead")
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if isinstance(documents, (str, bytes, dict)) or not hasattr(documents, "__iter__"):
        raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
    documents = list(documents)
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            raise TypeError(f"documents[{i}] must be a str, got {type(document).__name__}")
    if top_k is not None:
        top_k = _check_int(top_k, "top_k", 0, 1 << 62)
    logits = classify(model, [(query, d) for d in documents], batch_size=batch_size, max_length=max_length,
                      truncate=truncate, progress=progress, return_logits=True)[:, 0]
    scores = _activate(logits, head.get("score_activation", "sigmoid"))
    results = [{"corpus_id": i, "score": float(score)} for i, score in enumerate(scores)]
    if return_documents:
        for result in results:
            result["text"] = documents[result["corpus_id"]]
    results.sort(key=lambda result: result["score"], reverse=True)  # stable: ties keep document order
    return results[:top_k]


def _activate(logits, activation):
    if activation == "identity":
        return logits
    if activation == "tanh":
        return np.tanh(logits)
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


# ---------------------------------------------------------------------------------------------


def _is_pair(item):
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)


def _is_text(item):
    return isinstance(item, str) or _is_pair(item)


def _check_texts(texts):
    """A list of str, text pairs (two str) and token-id lists (each a list, tuple or 1-D integer array)."""
    if isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, (str, list, tuple, np.ndarray)):
            raise TypeError(f"texts[{i}] must be a str, a pair of str or a list of token ids, got {type(text).__name__}")
    return texts


def _tokenize(model, texts, max_length):
    """[(ids, type_ids)] per item: strings and string pairs through the tokenizer (special tokens
    added, cut to max_length if given), token-id lists as they are (cut to max_length if given)."""
    strings = [i for i, text in enumerate(texts) if _is_text(text)]
    encoded = [None] * len(texts)
    if strings:
        if model.tokenizer is None:
            raise ValueError(f"{model.path} has no tokenizer; pass token ids instead of text")
        for start in range(0, len(strings), TOKENIZE_CHUNK):  # in chunks: Ctrl-C is noticed between them
            chunk = strings[start : start + TOKENIZE_CHUNK]
            try:
                tokenized = model.tokenizer.encode_for_encoder([_as_input(texts[i]) for i in chunk], max_length)
            except Exception as e:  # the tokenizers library's own errors (e.g. max_length below its special tokens)
                if isinstance(e, (TypeError, ValueError)):
                    raise
                raise ValueError(f"tokenization failed: {e}") from None
            for i, pair in zip(chunk, tokenized):
                encoded[i] = pair
    for i, text in enumerate(texts):
        if encoded[i] is None:
            ids = as_token_array(text, model.config["vocab_size"], f"texts[{i}]").tolist()[:max_length]
            encoded[i] = (ids, [0] * len(ids))
    return encoded


def _as_input(text):
    """A text or a pair as the tokenizers library takes it (a pair as a tuple)."""
    return text if isinstance(text, str) else tuple(text)


def _check_int(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _max_sequence(config):
    return config["max_position_embeddings"] - config.get("position_offset", 0)


# Texts tokenized per call into the tokenizers library (which runs without checking for signals).
TOKENIZE_CHUNK = 256


def _run(model, texts, batch_size, max_length, truncate, progress, reduce):
    """reduce(hidden [rows, H], offsets) of every batch, scattered back to the input order: a list
    with one item per text."""
    config = model.config
    limit = _max_sequence(config)
    batch_size = _check_int(batch_size, "batch_size", 1, 1 << 30)
    max_length = config.get("max_length", limit) if max_length is None else max_length
    max_length = _check_int(max_length, "max_length", 1, limit)
    if not texts:
        return []

    encoded = _tokenize(model, texts, max_length if truncate else None)
    lengths = np.array([len(ids) for ids, _ in encoded])
    if not truncate and (lengths > max_length).any():
        i = int(np.argmax(lengths > max_length))
        raise ValueError(
            f"text {i} has {lengths[i]} tokens, more than max_length {max_length} (truncate=True cuts it)"
        )
    if (lengths == 0).any():
        i = int(np.argmax(lengths == 0))
        raise ValueError(f"text {i} gives no tokens (the tokenizer adds no special tokens)")
    if (lengths > max_length).any():  # a tokenizer that cannot truncate to so few tokens
        i = int(np.argmax(lengths > max_length))
        raise ValueError(f"text {i} cannot be truncated to max_length {max_length} (it has {lengths[i]} tokens)")

    use_types = config.get("type_vocab_size", 0) > 1
    order = np.argsort(-lengths, kind="stable")  # longest first: memory peaks early, not late
    results = [None] * len(texts)
    bar = _progress_bar(len(texts), progress)
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            ids = [np.asarray(encoded[i][0], dtype=np.int32) for i in chosen]
            types = [np.asarray(encoded[i][1], dtype=np.int32) for i in chosen] if use_types else None
            hidden, offsets = model._core_model.encode(ids, types)
            for i, item in zip(chosen, reduce(hidden, offsets)):
                results[i] = item
            if bar is not None:
                bar.update(len(chosen))
    finally:
        if bar is not None:
            bar.close()
    return results


def _progress_bar(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="encoding", unit="text")


def _stack(rows, hidden_size):
    if not rows:
        return np.zeros((0, hidden_size), dtype=np.float32)
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def _token_states(hidden, offsets):
    return [hidden[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _pool(hidden, offsets, mode):
    starts = np.asarray(offsets[:-1])
    lengths = np.diff(np.asarray(offsets)).astype(np.float32)[:, None]
    if mode == "cls":
        return hidden[starts]
    if mode == "lasttoken":  # sequences are packed without padding: each one's last row
        return hidden[np.asarray(offsets[1:]) - 1]
    if mode == "max":
        return np.maximum.reduceat(hidden, starts, axis=0)
    sums = np.add.reduceat(hidden, starts, axis=0)
    return sums / (lengths if mode == "mean" else np.sqrt(lengths))


# ---------------------------------------------------------------------------------------------
# classification heads (HF: BertForSequenceClassification, RobertaClassificationHead,
# DistilBertForSequenceClassification), on the first token's last hidden state


def _head_weights(model):
    cached = getattr(model, "_head_cache", None)
    if cached is None:
        dtype = model.config["dtype"]
        cached = {}
        for name, array in model._weights.items():
            if name.startswith(("pooler.", "classifier.")):
                cached[name] = bf16_to_float32(array) if dtype == "bfloat16" else np.asarray(array, dtype=np.float32)
        model._head_cache = cached
    return cached


def _dense(x, weights, name):
    y = x @ weights[f"{name}.weight"].T
    bias = weights.get(f"{name}.bias")
    return y + bias if bias is not None else y


def _activate_hidden(x, activation):
    """The activations of ModernBERT's classifier head, as transformers' ACT2FN computes them."""
    x = x.astype(np.float64)
    if activation == "gelu":
        return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)).astype(np.float64))
    if activation == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if activation == "relu":
        return np.maximum(x, 0)
    return x / (1.0 + np.exp(-x))  # silu


_erf = np.frompyfunc(math.erf, 1, 1)


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def _head_logits(cls, head, weights, eps):
    """The classification head on the pooled states `cls` (the first token's, or their mean)."""
    kind = head["kind"]
    if kind == "modernbert":
        hidden = _activate_hidden(_dense(cls, weights, "classifier.dense"), head.get("activation", "gelu"))
        hidden = _layer_norm(hidden, weights["classifier.norm.weight"], weights.get("classifier.norm.bias"), eps)
    elif kind == "bert":
        hidden = np.tanh(_dense(cls, weights, "pooler.dense"))
    elif kind == "roberta":
        hidden = np.tanh(_dense(cls, weights, "classifier.dense"))
    elif kind == "distilbert":
        hidden = np.maximum(_dense(cls, weights, "classifier.dense"), 0)
    else:
        raise ValueError(f"unknown classifier kind {kind!r}")
    return np.ascontiguousarray(_dense(hidden, weights, "classifier"), dtype=np.float32)
