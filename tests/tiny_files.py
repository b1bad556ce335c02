"""Small valid input files built without transformers or torch: a pyxf model directory, a Hugging
Face Llama checkpoint directory, a GGUF file and a byte-level BPE tokenizer. The resource-limit
tests edit them into hostile ones, and the fuzz seed corpora (tests/fuzz) are made from them, so
they are kept a few KB each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pyxf.tensorfile import write_safetensors

# A Llama of one layer: vocabulary 48 (the tokenizer's), hidden 16, 2 heads of 8 with one KV head,
# FFN 32 (so that ffn.down's rows are one quantization block); float16 keeps the weights near 6 KB.
TINY = dict(vocab_size=48, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
            intermediate_size=32, max_position_embeddings=64)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tokenizer_json(encoder: bool = False) -> str:
    """A byte-level BPE tokenizer.json of TINY["vocab_size"] tokens: the special tokens, 40 bytes
    and 4 merges; encoder: with a post-processor that wraps texts in <s> ... </s> (RoBERTa's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = list("abcdefghijklmnopqrstuvwxyz .,!?'") + ["Ġ", "Ċ", "0", "1", "2", "3", "T", "H"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    merges = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("he", "ll")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab = {token: i for token, i in vocab.items() if i < TINY["vocab_size"]}
    merges = [m for m in merges if m[0] + m[1] in vocab]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    if encoder:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    return tokenizer.to_str()


def pyxf_config(**overrides) -> dict:
    config = {
        "format": "pyxf", "format_version": 1, "family": "llama", "architecture": "decoder", **TINY,
        "norm": "rmsnorm", "norm_eps": 1e-5, "norm_position": "pre", "activation": "silu", "gated_ffn": True,
        "position": "rope", "rope_theta": 10000.0, "rope_scaling": None, "rope_interleaved": False,
        "partial_rotary_factor": 1.0, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": [1],
        "pad_token_id": None, "chat_template": CHAT_TEMPLATE, "tokenizer": "tokenizer.json",
        "add_bos_token": False, "dtype": "float16",
    }
    config.update(overrides)
    return config


def pyxf_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for every required tensor of a config (float16), biases of LayerNorms
    included."""
    from pyxf.spec import tensor_layout

    rng = np.random.default_rng(seed)
    layout = tensor_layout(config)
    tensors = {}
    for name, (shape, required) in layout.enumerate(max_tensors=10_000).items():
        if required:
            scale = 1.0 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
            tensors[name] = (scale * rng.standard_normal(shape) + (len(shape) == 1)).astype(np.float16)
    return tensors


def write_pyxf_model(out, seed: int = 0, **overrides) -> Path:
    """A loadable pyxf model directory (config.json, model.safetensors, tokenizer.json)."""
    return _write_model(out, pyxf_config(**overrides), seed, tokenizer_json())


def write_pyxf_encoder(out, seed: int = 0, **overrides) -> Path:
    """A loadable BERT-style encoder directory (post-norm, learned positions, mean pooling)."""
    config = pyxf_config(**{**dict(family="roberta", architecture="encoder", causal=False, norm="layernorm",
                         norm_position="post", activation="gelu", gated_ffn=False, position="learned",
                         position_offset=0, type_vocab_size=0, max_position_embeddings=128, max_length=128,
                         pooler=False, pooling={"mode": "mean", "normalize": True}, classifier=None,
                         tie_word_embeddings=False, chat_template=None), **overrides})
    return _write_model(out, config, seed, tokenizer_json(encoder=True))


def write_pyxf_seq2seq(out, seed: int = 0, **overrides) -> Path:
    """A loadable encoder-decoder directory (the original Transformer's layout, sinusoidal
    positions, shared embeddings, no tokenizer: token ids in and out)."""
    config = pyxf_config(**{**dict(family="transformer", architecture="encoder-decoder", num_encoder_layers=1,
                         norm="layernorm", norm_position="post", activation="relu", gated_ffn=False,
                         position="sinusoidal", sinusoidal_layout="interleaved", max_position_embeddings=1 << 18,
                         shared_embeddings=True, decoder_start_token_id=0, embed_scale=4.0, tokenizer=None,
                         chat_template=None), **overrides})
    return _write_model(out, config, seed, None)


def _write_model(out, config: dict, seed: int, tokenizer: str | None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", pyxf_tensors(config, seed))
    (out / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (out / "tokenizer.json").write_text(tokenizer)
    return out


def hf_llama_config(**overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": TINY["vocab_size"],
        "hidden_size": TINY["hidden_size"], "intermediate_size": TINY["intermediate_size"],
        "num_hidden_layers": TINY["num_layers"], "num_attention_heads": TINY["num_heads"],
        "num_key_value_heads": TINY["num_kv_heads"], "head_dim": TINY["head_dim"],
        "max_position_embeddings": TINY["max_position_embeddings"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 0,
        "eos_token_id": 1, "torch_dtype": "float16",
    }
    config.update(overrides)
    return config


def hf_llama_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """transformers' LlamaForCausalLM state dict names for TINY (float16)."""
    rng = np.random.default_rng(seed)
    H, V, D, I = TINY["hidden_size"], TINY["vocab_size"], TINY["head_dim"], TINY["intermediate_size"]
    Hq, Hkv = TINY["num_heads"], TINY["num_kv_heads"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(TINY["num_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (Hq * D, H), p + "self_attn.k_proj.weight": (Hkv * D, H),
            p + "self_attn.v_proj.weight": (Hkv * D, H), p + "self_attn.o_proj.weight": (H, Hq * D),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    return {name: (rng.standard_normal(shape) / 4).astype(np.float16) for name, shape in shapes.items()}


def write_hf_llama(out, seed: int = 0, **config_overrides) -> Path:
    """A Hugging Face Llama checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", hf_llama_tensors(seed), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_llama_config(**config_overrides)))
    (out / "tokenizer.json").write_text(tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


def write_gguf(path, seed: int = 0, quantized: str | None = None, metadata_edit=None) -> Path:
    """A llama GGUF file for TINY with a gpt2-style tokenizer; quantized ("Q8_0", "Q4_1", "Q4_K",
    ...): the weights whose rows are whole blocks of that type stored in it (ffn_down's rows of 32
    for the 32-wide types; none for the K-quants' 256)."""
    import gguf

    path = Path(path)
    tokenizer = json.loads(tokenizer_json())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY["num_layers"])
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(TINY["hidden_size"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(TINY["num_heads"])
    writer.add_head_count_kv(TINY["num_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(CHAT_TEMPLATE)
    if metadata_edit is not None:
        metadata_edit(writer)
    rng = np.random.default_rng(seed)
    H, V, D, I = TINY["hidden_size"], TINY["vocab_size"], TINY["head_dim"], TINY["intermediate_size"]
    Hq, Hkv = TINY["num_heads"], TINY["num_kv_heads"]
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
    for i in range(TINY["num_layers"]):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (H,), p + "ffn_norm.weight": (H,), p + "attn_q.weight": (Hq * D, H),
            p + "attn_k.weight": (Hkv * D, H), p + "attn_v.weight": (Hkv * D, H), p + "attn_output.weight": (H, Hq * D),
            p + "ffn_gate.weight": (I, H), p + "ffn_up.weight": (I, H), p + "ffn_down.weight": (H, I),
        })
    for name, shape in shapes.items():
        array = (rng.standard_normal(shape) / 4).astype(np.float32)
        kind = getattr(gguf.GGMLQuantizationType, quantized) if quantized else None
        if kind is not None and len(shape) == 2 and shape[1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
            raw = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float16) if len(shape) == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
