"""Encoders (BERT, RoBERTa, DistilBERT, MPNet, ModernBERT): conversion, last hidden states, pooling
and sequence classification against transformers, and the encode()/classify() API.

Tiny random models are built with transformers (eager attention) beside tokenizers made on the spot
(WordPiece for BERT/DistilBERT, byte-level BPE for RoBERTa), saved with save_pretrained and converted
with pyxf.convert. Tests that run a model skip when the core extension is not built.
"""

import importlib.util
import json
import math
import warnings

import numpy as np
import pytest

HAS_CORE = importlib.util.find_spec("pyxf._core") is not None
needs_core = pytest.mark.skipif(not HAS_CORE, reason="pyxf._core is not built (bash tools/dev_build.sh)")

TOLERANCE = 1e-4  # max abs error of the last hidden state (values of order 1-5)
MAX_TOKENS = 130

WORDS = (
    "the a of to and in is was for on with as by at from that this it be are or an which one all were "
    "model token sentence vector search query answer river mountain city music paper science table window "
    "running jumped quickly blue green Ünïcödé naïve café 東京 42 3.14 hello world, embeddings! why?"
).split()

# name -> (transformers class, config class, config kwargs, tokenizer kind)
SPECS = {
    # head_dim 24 (3 heads of hidden 72), two token types, exact GELU.
    "bert": ("BertModel", "BertConfig", dict(
        hidden_size=72, num_attention_heads=3, intermediate_size=100, type_vocab_size=2,
        max_position_embeddings=160,
    ), "wordpiece"),
    # 2 heads of 32, one token type, positions offset by pad_token_id + 1 = 2, tanh GELU.
    "roberta": ("RobertaModel", "RobertaConfig", dict(
        hidden_size=64, num_attention_heads=2, intermediate_size=120, type_vocab_size=1,
        max_position_embeddings=162, pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_act="gelu_new",
        layer_norm_eps=1e-5,
    ), "bpe"),
    # 4 heads of 16, no token types, ReLU FFN.
    "distilbert": ("DistilBertModel", "DistilBertConfig", dict(
        dim=64, n_heads=4, hidden_dim=90, max_position_embeddings=160, activation="relu",
    ), "wordpiece"),
    # 3 heads of 20, positions offset by 2, relative position buckets (sequences of up to 130
    # tokens reach the last bucket, at distance 128).
    "mpnet": ("MPNetModel", "MPNetConfig", dict(
        hidden_size=60, num_attention_heads=3, intermediate_size=88, max_position_embeddings=162,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
    ), "bpe"),
    # Pre-norm with RoPE, 4 heads of 18, GeGLU, LayerNorms without biases, layer 0 without an
    # attention norm; layers 0 and 3 global, the others local with a window of 2 * 11 + 1 keys
    # (shorter than most test sequences) and a RoPE base of their own.
    "modernbert": ("ModernBertModel", "ModernBertConfig", dict(
        hidden_size=72, num_attention_heads=4, intermediate_size=50, num_hidden_layers=5,
        global_attn_every_n_layers=3, local_attention=22, global_rope_theta=5000.0, local_rope_theta=300.0,
        max_position_embeddings=160, pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0,
        sep_token_id=2, norm_eps=1e-5, embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0,
    ), "bpe"),
    # ModernBERT with every bias (norms, attention, MLP) and an odd window (local_attention 9: 4 on either side).
    "modernbert_bias": ("ModernBertModel", "ModernBertConfig", dict(
        hidden_size=48, num_attention_heads=3, intermediate_size=40, num_hidden_layers=3,
        global_attn_every_n_layers=2, local_attention=9, norm_bias=True, attention_bias=True, mlp_bias=True,
        max_position_embeddings=160, pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0,
        sep_token_id=2, hidden_activation="gelu_pytorch_tanh",
    ), "bpe"),
    # Classifiers: BERT (pooler + linear), RoBERTa (dense + tanh + out_proj), DistilBERT
    # (pre_classifier + ReLU + classifier, multi-label).
    "bert_cls": ("BertForSequenceClassification", "BertConfig", dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=96, type_vocab_size=2,
        max_position_embeddings=160, id2label={0: "negative", 1: "neutral", 2: "positive"},
    ), "wordpiece"),
    "roberta_cls": ("RobertaForSequenceClassification", "RobertaConfig", dict(
        hidden_size=64, num_attention_heads=4, intermediate_size=96, type_vocab_size=1,
        max_position_embeddings=162, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2,
    ), "bpe"),
    "mpnet_cls": ("MPNetForSequenceClassification", "MPNetConfig", dict(
        hidden_size=60, num_attention_heads=5, intermediate_size=70, max_position_embeddings=162,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=3,
    ), "bpe"),
    # ModernBERT's head: mean pooling, dense, GELU, a norm without bias, the classifier.
    "modernbert_cls": ("ModernBertForSequenceClassification", "ModernBertConfig", dict(
        hidden_size=40, num_attention_heads=2, intermediate_size=36, num_hidden_layers=3,
        global_attn_every_n_layers=2, local_attention=16, max_position_embeddings=160, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2, num_labels=3, classifier_pooling="mean",
    ), "bpe"),
    "distilbert_cls": ("DistilBertForSequenceClassification", "DistilBertConfig", dict(
        dim=48, n_heads=2, hidden_dim=80, max_position_embeddings=160, num_labels=4,
        problem_type="multi_label_classification",
    ), "wordpiece"),
    # Cross-encoders (rerankers): one label; BERT with two token types (query 0, document 1), head dim 20.
    "bert_rerank": ("BertForSequenceClassification", "BertConfig", dict(
        hidden_size=60, num_attention_heads=3, intermediate_size=90, type_vocab_size=2,
        max_position_embeddings=160, num_labels=1,
    ), "wordpiece"),
    "roberta_rerank": ("RobertaForSequenceClassification", "RobertaConfig", dict(
        hidden_size=64, num_attention_heads=2, intermediate_size=96, type_vocab_size=1,
        max_position_embeddings=162, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=1,
    ), "bpe"),
}


# ---------------------------------------------------------------------------------------------
# tiny models


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set("".join(WORDS).lower()) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?"))
    pieces = specials + chars + ["##" + c for c in chars] + sorted({w.lower().strip(",.!?") for w in WORDS})
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer.decoder = decoders.WordPiece()
    # BERT's tokenizer gives token type ids (a pair's second text is type 1), as BertTokenizerFast does.
    return tokenizer, dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                           mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def _init_weights(model, seed):
    """Unit-scale activations (transformers' std 0.02 makes every state nearly the same):
    linear weights ~ N(0, (1.5 / sqrt(fan_in))^2), norm weights around 1, biases and embeddings moderate."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm = name.endswith("weight") and ("norm" in name.lower())
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if is_norm else 0.1 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.5 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g))


def build_hf(name, out):
    """A tiny random model of SPECS[name] with its tokenizer, saved into `out`; returns (model, tokenizer)."""
    import torch
    import transformers

    model_class, config_class, kwargs, kind = SPECS[name]
    tokenizer, special = _wordpiece_tokenizer() if kind == "wordpiece" else _bpe_tokenizer()
    layers = {"n_layers": 2} if config_class == "DistilBertConfig" else {"num_hidden_layers": 2}
    dropout = ({"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0} if config_class == "DistilBertConfig"
               else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    config = getattr(transformers, config_class)(
        vocab_size=tokenizer.get_vocab_size(), attn_implementation="eager", **{**layers, **dropout, **kwargs},
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    _init_weights(model, seed=sum(map(ord, name)))
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **special)
    hf_tokenizer.save_pretrained(out)
    return model, hf_tokenizer


class Tiny:
    def __init__(self, name, tmp_path_factory):
        self.name = name
        self.hf_dir = tmp_path_factory.mktemp(f"hf-{name}")
        self.hf, self.tokenizer = build_hf(name, self.hf_dir)
        self.dir = tmp_path_factory.mktemp(f"pyxf-{name}") / "model"
        from pyxf.convert import convert

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every source tensor is used
            convert(self.hf_dir, self.dir, progress=False)
        self._model = None

    @property
    def model(self):
        import pyxf

        if self._model is None:
            self._model = pyxf.load(self.dir)
        return self._model

    def hf_hidden(self, texts, max_length=None):
        """transformers' last hidden states of `texts` as one padded batch: unpadded [T_i, H] each."""
        import torch

        kwargs = dict(truncation=True, max_length=max_length) if max_length else {}
        batch = self.tokenizer(texts, padding=True, return_tensors="pt", **kwargs)
        if self.name.startswith(("distilbert", "mpnet", "modernbert")):  # models without token types
            batch.pop("token_type_ids", None)
        base = getattr(self.hf, self.hf.base_model_prefix, self.hf)
        with torch.no_grad():
            hidden = base(**batch).last_hidden_state.numpy()
        mask = batch["attention_mask"].numpy().astype(bool)
        return [hidden[i][mask[i]] for i in range(len(texts))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Tiny(name, tmp_path_factory)
        return cache[name]

    return get


def texts_of_lengths(tokenizer, lengths, seed):
    """One text per target length (in tokens, special tokens included), built word by word."""
    rng = np.random.default_rng(seed)
    texts = []
    for target in lengths:
        words, failures = [], 0
        while failures < 20:
            candidate = words + [WORDS[rng.integers(len(WORDS))]]
            if len(tokenizer(" ".join(candidate))["input_ids"]) <= target:
                words = candidate
            else:
                failures += 1
        texts.append(" ".join(words))
    return texts


def max_abs_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------------------------------------
# conversion


def test_encoder_configs(tiny):
    bert = json.loads((tiny("bert").dir / "config.json").read_text())
    assert bert["architecture"] == "encoder" and bert["causal"] is False
    assert bert["norm_position"] == "post" and bert["position"] == "learned"
    assert bert["type_vocab_size"] == 2 and bert["position_offset"] == 0 and bert["pooler"] is True
    assert bert["classifier"] is None and bert["pooling"] is None and bert["max_length"] == 128
    roberta = json.loads((tiny("roberta").dir / "config.json").read_text())
    assert roberta["position_offset"] == 2 and roberta["type_vocab_size"] == 1
    assert roberta["activation"] == "gelu_tanh" and roberta["norm_eps"] == 1e-5
    distil = json.loads((tiny("distilbert").dir / "config.json").read_text())
    assert distil["type_vocab_size"] == 0 and distil["pooler"] is False and distil["activation"] == "relu"
    cls = json.loads((tiny("bert_cls").dir / "config.json").read_text())
    assert cls["classifier"] == {"kind": "bert", "num_labels": 3, "id2label": ["negative", "neutral", "positive"],
                                 "problem_type": "single_label_classification"}
    assert json.loads((tiny("distilbert_cls").dir / "config.json").read_text())["classifier"]["problem_type"] == (
        "multi_label_classification")

    mpnet = json.loads((tiny("mpnet").dir / "config.json").read_text())
    assert mpnet["family"] == "mpnet" and mpnet["position_offset"] == 2 and mpnet["type_vocab_size"] == 0
    assert mpnet["relative_attention_num_buckets"] == 32 and mpnet["relative_attention_max_distance"] == 128
    modern = json.loads((tiny("modernbert").dir / "config.json").read_text())
    assert modern["norm_position"] == "pre" and modern["position"] == "rope" and modern["gated_ffn"] is True
    assert modern["norm_bias"] is False and modern["first_attn_norm"] is False
    assert modern["rope_theta"] == 5000.0 and modern["rope_local_theta"] == 300.0
    assert (modern["sliding_window"], modern["sliding_window_pattern"], modern["global_layer_phase"]) == (12, 3, 0)
    head = json.loads((tiny("modernbert_cls").dir / "config.json").read_text())["classifier"]
    assert (head["kind"], head["pooling"], head["activation"], head["num_labels"]) == ("modernbert", "mean", "gelu", 3)

    from pyxf.tensorfile import read_safetensors

    names = set(read_safetensors(tiny("modernbert").dir / "model.safetensors"))
    assert "layers.0.attn_norm.weight" not in names and "layers.1.attn_norm.weight" in names
    assert not any(n.endswith(".bias") for n in names) and "rel_bias.weight" in read_safetensors(
        tiny("mpnet").dir / "model.safetensors")
    names = set(read_safetensors(tiny("roberta_cls").dir / "model.safetensors"))
    assert {"classifier.dense.weight", "classifier.weight", "token_type_embed.weight", "embed_norm.bias"} <= names
    assert "layers.1.attn.qkv.weight" in names and not any("lm_head" in n for n in names)


def test_sentence_transformers_pooling_config(tiny, tmp_path):
    import shutil

    from pyxf.convert import convert

    src = tmp_path / "st"
    shutil.copytree(tiny("bert").hf_dir, src)
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 72, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
    }))
    (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    config = json.loads((convert(src, tmp_path / "out", progress=False) / "config.json").read_text())
    assert config["pooling"] == {"mode": "cls", "normalize": True} and config["max_length"] == 64

    (src / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.warns(UserWarning, match="not supported"):
        config = json.loads((convert(src, tmp_path / "out2", progress=False) / "config.json").read_text())
    assert config["pooling"] is None


def test_masked_lm_converts_and_missing_head_fails(tiny, tmp_path):
    import transformers

    from pyxf.convert import convert

    config = transformers.BertConfig.from_pretrained(tiny("bert").hf_dir)
    config.architectures = ["BertForMaskedLM"]
    mlm = transformers.BertForMaskedLM(config)
    mlm.save_pretrained(tmp_path / "mlm")
    tiny("bert").tokenizer.save_pretrained(tmp_path / "mlm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert(tmp_path / "mlm", tmp_path / "mlm-out", progress=False)
    assert json.loads((out / "config.json").read_text())["pooler"] is False

    # A classifier config whose checkpoint lacks the head fails at conversion, naming it.
    hf_config = json.loads((tiny("bert").hf_dir / "config.json").read_text())
    hf_config["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "headless").mkdir()
    import shutil

    shutil.copy(tiny("bert").hf_dir / "model.safetensors", tmp_path / "headless")
    (tmp_path / "headless" / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match="classifier.weight"):
        convert(tmp_path / "headless", tmp_path / "headless-out", progress=False)


@needs_core
@pytest.mark.parametrize("name, mlm_class", [("mpnet", "MPNetForMaskedLM"), ("modernbert", "ModernBertForMaskedLM")])
def test_masked_lm_checkpoints_run_their_encoder(tiny, tmp_path, name, mlm_class):
    """A masked-LM checkpoint converts without its LM head (every other tensor used) and runs as
    transformers' encoder inside it."""
    import transformers

    from pyxf.convert import convert
    import pyxf

    t = tiny(name)
    config = type(t.hf.config).from_pretrained(t.hf_dir)
    config.architectures = [mlm_class]
    mlm = getattr(transformers, mlm_class)(config).eval()
    _init_weights(mlm, seed=5)
    mlm.save_pretrained(tmp_path / "mlm")
    t.tokenizer.save_pretrained(tmp_path / "mlm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert(tmp_path / "mlm", tmp_path / "out", progress=False)
    model = pyxf.load(out)
    texts = texts_of_lengths(t.tokenizer, [3, 60, 25], seed=9)
    base = Tiny.__new__(Tiny)
    base.name, base.hf, base.tokenizer = name, mlm, t.tokenizer
    for mine, ref in zip(model.encode(texts, output="tokens"), base.hf_hidden(texts)):
        assert mine.shape == ref.shape and max_abs_err(mine, ref) <= TOLERANCE


def test_unsupported_mpnet_and_modernbert_configs_are_refused():
    from pyxf.convert.families import normalized_config

    mpnet = dict(architectures=["MPNetModel"], vocab_size=50, hidden_size=16, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=20)
    assert normalized_config(mpnet)["relative_attention_num_buckets"] == 32
    with pytest.raises(ValueError, match="uses 32 buckets"):
        normalized_config({**mpnet, "relative_attention_num_buckets": 64})

    modern = dict(architectures=["ModernBertModel"], vocab_size=50, hidden_size=16, num_hidden_layers=4,
                  num_attention_heads=2, intermediate_size=20, local_attention=8)
    config = normalized_config(modern)
    assert (config["sliding_window_pattern"], config["sliding_window"]) == (3, 5)
    assert (config["rope_theta"], config["rope_local_theta"]) == (160000.0, 10000.0)  # transformers' defaults
    every_2 = ["full_attention", "sliding_attention"] * 2
    assert normalized_config({**modern, "layer_types": every_2})["sliding_window_pattern"] == 2
    with pytest.raises(ValueError, match="not global every n-th layer"):
        normalized_config({**modern, "layer_types": ["sliding_attention", "full_attention"] * 2})
    with pytest.raises(ValueError, match="RoPE scaling"):
        normalized_config({**modern, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}})


# ---------------------------------------------------------------------------------------------
# hidden states


@needs_core
@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "mpnet", "modernbert", "modernbert_bias"])
@pytest.mark.parametrize("batch_size", [1, 3, 33])
def test_last_hidden_state_matches_transformers(tiny, name, batch_size):
    t = tiny(name)
    lengths = [2, MAX_TOKENS, 3] + np.random.default_rng(1).integers(2, MAX_TOKENS + 1, size=67).tolist()
    texts = texts_of_lengths(t.tokenizer, lengths, seed=2)
    got_lengths = [len(ids) for ids in t.tokenizer(texts)["input_ids"]]
    assert min(got_lengths) == 2 and max(got_lengths) == MAX_TOKENS

    states = t.model.encode(texts, batch_size=batch_size, output="tokens", max_length=MAX_TOKENS)
    assert len(states) == len(texts)
    err = 0.0
    for start in range(0, len(texts), batch_size):  # transformers: padded batches in input order
        chunk = texts[start : start + batch_size]
        for mine, ref in zip(states[start : start + batch_size], t.hf_hidden(chunk)):
            assert mine.shape == ref.shape and mine.dtype == np.float32
            err = max(err, max_abs_err(mine, ref))
    assert err <= TOLERANCE, f"{name}, batch {batch_size}: max abs err {err:.2e}"


@needs_core
@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_token_ids_and_types_through_the_core(tiny, name):
    """Lengths 1..130 with mixed token types, straight into _core.Model.encode."""
    import torch

    t = tiny(name)
    config = t.model.config
    rng = np.random.default_rng(3)
    lengths = [1, 130, 2, 64, 7, 1, 33, 100]
    low = 5  # no special tokens and, for RoBERTa, no pad id (it changes transformers' position ids)
    ids = [rng.integers(low, config["vocab_size"], n).astype(np.int32) for n in lengths]
    types = [rng.integers(0, config["type_vocab_size"], n).astype(np.int32) for n in lengths]
    hidden, offsets = t.model._core_model.encode(ids, types)
    assert offsets == np.concatenate([[0], np.cumsum(lengths)]).tolist()

    pad = t.hf.config.pad_token_id
    input_ids = torch.full((len(ids), max(lengths)), pad, dtype=torch.long)
    token_types = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids)
    for i, (a, b) in enumerate(zip(ids, types)):
        input_ids[i, : len(a)] = torch.from_numpy(a.astype(np.int64))
        token_types[i, : len(a)] = torch.from_numpy(b.astype(np.int64))
        mask[i, : len(a)] = 1
    with torch.no_grad():
        ref = t.hf(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask).last_hidden_state.numpy()
    err = max(max_abs_err(hidden[offsets[i] : offsets[i + 1]], ref[i, :n]) for i, n in enumerate(lengths))
    assert err <= TOLERANCE


@needs_core
@pytest.mark.parametrize("name", ["bert", "roberta", "mpnet", "modernbert"])
def test_token_id_inputs_match_transformers(tiny, name):
    """encode() also takes token-id lists: the whole sequence as given (special tokens included by
    the caller), beside texts in one call, cut to max_length."""
    t = tiny(name)
    texts = texts_of_lengths(t.tokenizer, [5, 40, 12], seed=7)
    ids = t.tokenizer(texts)["input_ids"]
    got = t.model.encode([ids[0], texts[1], np.asarray(ids[2])], output="tokens")
    for mine, ref in zip(got, t.hf_hidden(texts)):
        assert mine.shape == ref.shape and max_abs_err(mine, ref) <= TOLERANCE
    sentences = t.model.encode(ids)
    assert max_abs_err(sentences, t.model.encode(texts)) <= TOLERANCE
    (cut,) = t.model.encode([ids[1]], output="tokens", max_length=8)
    assert cut.shape[0] == 8
    with pytest.raises(ValueError, match=r"token id .* in texts\[0\] is outside the vocabulary"):
        t.model.encode([[t.model.config["vocab_size"]]])
    with pytest.raises(ValueError, match=r"texts\[0\] is empty"):
        t.model.encode([[]])


@needs_core
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len"])
def test_sentence_pooling(tiny, pooling):
    t = tiny("bert")
    texts = texts_of_lengths(t.tokenizer, [5, 40, 2, 90, 17], seed=4)
    refs = t.hf_hidden(texts)
    expected = {
        "mean": [r.mean(0) for r in refs], "cls": [r[0] for r in refs], "max": [r.max(0) for r in refs],
        "mean_sqrt_len": [r.sum(0) / np.sqrt(len(r)) for r in refs],
    }[pooling]
    got = t.model.encode(texts, pooling=pooling, batch_size=2)
    assert got.shape == (5, 72) and got.dtype == np.float32
    assert max_abs_err(got, expected) <= TOLERANCE
    normalized = t.model.encode(texts, pooling=pooling, normalize=True)
    assert max_abs_err(normalized, np.array(expected) / np.linalg.norm(expected, axis=1, keepdims=True)) <= 1e-5
    assert max_abs_err(t.model.encode(texts[1], pooling=pooling), expected[1]) <= TOLERANCE  # one str -> [H]


@needs_core
def test_truncation_and_bad_input(tiny):
    t = tiny("roberta")
    m = t.model
    long_text = texts_of_lengths(t.tokenizer, [MAX_TOKENS], seed=5)[0]
    # Truncation as transformers' truncation=True, max_length=N (special tokens kept at the ends).
    for max_length in (3, 20):
        got = m.encode([long_text, "short"], output="tokens", max_length=max_length)
        for mine, ref in zip(got, t.hf_hidden([long_text, "short"], max_length=max_length)):
            assert mine.shape == ref.shape and max_abs_err(mine, ref) <= TOLERANCE
    with pytest.raises(ValueError, match=r"text 1 has 130 tokens, more than max_length 20"):
        m.encode(["short", long_text], max_length=20, truncate=False)
    with pytest.raises(ValueError, match="max_length"):
        m.encode(["x"], max_length=10_000)

    empty = m.encode([], pooling="cls")
    assert empty.shape == (0, 64) and empty.dtype == np.float32
    assert m.encode([], output="tokens") == []
    # An empty text is its special tokens: <s></s>.
    (state,) = m.encode([""], output="tokens")
    assert state.shape == (2, 64) and max_abs_err(state, t.hf_hidden([""])[0]) <= TOLERANCE
    with pytest.raises(TypeError, match=r"texts\[2\] must be a str, a pair of str or a list of token ids, got int"):
        m.encode(["a", "b", 3])
    with pytest.raises(TypeError, match="texts must be"):
        m.encode(12)
    with pytest.raises(ValueError, match="pooling"):
        m.encode(["a"], pooling="median")
    with pytest.raises(ValueError, match="output"):
        m.encode(["a"], output="words")
    with pytest.raises(ValueError, match="batch_size"):
        m.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="no classification head"):
        m.classify(["a"])
    with pytest.raises(ValueError, match="decoder"):
        m.logits([1, 2, 3])


@needs_core
def test_input_order_and_progress(tiny, capsys):
    t = tiny("distilbert")
    texts = texts_of_lengths(t.tokenizer, [50, 3, 20, 3, 80, 9, 2], seed=6)
    one_by_one = np.stack([t.model.encode(x) for x in texts])
    batched = t.model.encode(texts, batch_size=3, progress=True)
    assert max_abs_err(batched, one_by_one) <= 1e-5
    assert "encoding" in capsys.readouterr().err


@needs_core
def test_half_precision_encoder(tiny, tmp_path):
    import pyxf
    from pyxf.convert import convert

    t = tiny("bert")
    texts = texts_of_lengths(t.tokenizer, [10, 60, 4], seed=7)
    reference = t.model.encode(texts)
    for dtype in ("float16", "bfloat16"):
        m = pyxf.load(convert(t.hf_dir, tmp_path / dtype, dtype=dtype, progress=False))
        got = m.encode(texts)
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        assert cos.min() > 0.999, (dtype, cos)


# ---------------------------------------------------------------------------------------------
# classification


@needs_core
@pytest.mark.parametrize("name", ["bert_cls", "roberta_cls", "distilbert_cls", "mpnet_cls", "modernbert_cls"])
def test_sequence_classification_matches_transformers(tiny, name):
    import torch

    t = tiny(name)
    texts = texts_of_lengths(t.tokenizer, [2, 30, 128, 7, 64, 12, 90], seed=8)
    batch = t.tokenizer(texts, padding=True, return_tensors="pt")
    if name.startswith(("distilbert", "mpnet", "modernbert")):
        batch.pop("token_type_ids", None)
    with torch.no_grad():
        logits = t.hf(**batch).logits.numpy()
    got = t.model.classify(texts, batch_size=3, return_logits=True)
    assert got.shape == logits.shape and got.dtype == np.float32
    assert max_abs_err(got, logits) <= TOLERANCE

    probs = t.model.classify(texts)
    if t.hf.config.problem_type == "multi_label_classification":
        expected = torch.sigmoid(torch.from_numpy(logits)).numpy()
    else:
        expected = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        assert np.allclose(probs.sum(1), 1, atol=1e-6)
    assert max_abs_err(probs, expected) <= 1e-5
    assert t.model.labels == [t.hf.config.id2label[i] for i in range(t.hf.config.num_labels)]
    assert t.model.classify(texts[2]).shape == (t.hf.config.num_labels,)
    assert t.model.classify([]).shape == (0, t.hf.config.num_labels)


# ---------------------------------------------------------------------------------------------
# cross-encoders: text pairs and rank(), against sentence-transformers' CrossEncoder


IDENTITY = "torch.nn.modules.linear.Identity"


@needs_core
@pytest.mark.parametrize("name, activation", [("bert_rerank", None), ("roberta_rerank", None),
                                              ("bert_rerank", "config.json"), ("roberta_rerank", "CrossEncoder"),
                                              ("bert_rerank", "legacy-tanh")])
def test_rank_matches_cross_encoder(name, activation, tmp_path):
    """A tiny reranker saved with save_pretrained and converted with `pyxf convert`: rank() gives
    CrossEncoder.rank's order and scores, classify() on pairs its logits. Scores go through sigmoid
    (CrossEncoder's default for one label) unless the checkpoint names another activation: in
    config.json's "sentence_transformers" or older "sbert_ce_default_activation_function", or in the
    files CrossEncoder.save_pretrained writes. One document is longer
    than the 128 tokens the tokenizer allows, so the pair is truncated (the longer text first)."""
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import CrossEncoder

    import pyxf
    from pyxf.cli import main

    hf_dir, out = tmp_path / "hf", tmp_path / "pyxf"
    _, tokenizer = build_hf(name, hf_dir)
    if activation == "config.json":
        config = json.loads((hf_dir / "config.json").read_text())
        config["sentence_transformers"] = {"activation_fn": IDENTITY}
        (hf_dir / "config.json").write_text(json.dumps(config))
    elif activation == "legacy-tanh":  # before sentence-transformers 4
        config = json.loads((hf_dir / "config.json").read_text())
        config["sbert_ce_default_activation_function"] = "torch.nn.modules.activation.Tanh"
        (hf_dir / "config.json").write_text(json.dumps(config))
    elif activation == "CrossEncoder":
        saved = tmp_path / "saved"
        CrossEncoder(str(hf_dir), device="cpu", activation_fn=torch.nn.Identity()).save_pretrained(str(saved))
        hf_dir = saved
    assert main(["convert", str(hf_dir), str(out), "--quiet"]) == 0
    assert model_score_activation(out) == {None: None, "legacy-tanh": "tanh"}.get(activation, "identity")
    model = pyxf.load(out)
    reference = CrossEncoder(str(hf_dir), device="cpu")
    assert reference.max_seq_length == model.config["max_length"] == 128

    query = texts_of_lengths(tokenizer, [9], seed=10)[0]
    documents = texts_of_lengths(tokenizer, [5, 40, 200, 3, 17, 60, 90, 25], seed=11)
    expected = reference.rank(query, documents, return_documents=True)
    got = model.rank(query, documents, return_documents=True)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in expected]
    assert all(set(r) == {"corpus_id", "score", "text"} and isinstance(r["score"], float) for r in got)
    assert max_abs_err([r["score"] for r in got], [r["score"] for r in expected]) <= TOLERANCE
    assert [r["text"] for r in got] == [documents[r["corpus_id"]] for r in expected]
    scores = sorted((r["score"] for r in got), reverse=True)
    assert min(a - b for a, b in zip(scores, scores[1:])) > 2 * TOLERANCE  # an order the tolerance cannot flip
    assert model.rank(query, documents, top_k=3) == [{"corpus_id": r["corpus_id"], "score": r["score"]} for r in got[:3]]

    pairs = [(query, d) for d in documents]
    logits = reference.predict(pairs, activation_fn=torch.nn.Identity())
    assert max_abs_err(model.classify(pairs, batch_size=3, return_logits=True)[:, 0], logits) <= TOLERANCE
    assert max_abs_err(model.classify([list(pairs[1])]), [logits[1:2]]) <= TOLERANCE  # a list of two str: a pair too
    assert model.classify(pairs[0]).shape == (1,)  # one tuple: one pair


def model_score_activation(model_dir):
    return json.loads((model_dir / "config.json").read_text())["classifier"].get("score_activation")


@needs_core
def test_rank_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="one label"):
        tiny("bert_cls").model.rank("query", ["document"])
    model = tiny("bert_rerank").model
    assert model.rank("query", []) == []
    with pytest.raises(TypeError, match="query must be a str"):
        model.rank(["query"], ["document"])
    with pytest.raises(TypeError, match="documents must be a list of str"):
        model.rank("query", "document")
    with pytest.raises(TypeError, match=r"documents\[1\] must be a str"):
        model.rank("query", ["document", 3])
    with pytest.raises(ValueError, match="top_k"):
        model.rank("query", ["document"], top_k=-1)
