"""The pieces every architecture shares: the config fields of a transformer stack, its
dimensions, and the tensors of one block (attention, FFN, their norms). Imports only the schema."""

from .schema import EMBEDDING, Field, Tensor, linear, norm

NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post", "sandwich")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned", "none", "sinusoidal", "relative")
DTYPES = ("float32", "float16", "bfloat16")

# Fields of every pyxf config (docs/DESIGN.md, config.json). "size" fields are positive ints that
# the core holds in 32 bits; `default` None means the field is required.
STACK_FIELDS = (
    Field("vocab_size", "size", doc="V: the (target) vocabulary"),
    Field("hidden_size", "size", doc="H"),
    Field("num_layers", "size", doc="decoder (or encoder-only) depth"),
    Field("num_heads", "size", doc="Hq"),
    Field("num_kv_heads", "size", doc="Hkv: a divisor of num_heads (GQA, MQA)"),
    Field("head_dim", "size", doc="D"),
    Field("intermediate_size", "size", doc="I: the FFN width"),
    Field("max_position_embeddings", "size", doc="P"),
    Field("gated_ffn", "bool", doc="down(act(gate(x)) * up(x))"),
    Field("tie_word_embeddings", "bool", doc="the head is embed.weight"),
    Field("norm", "choice", choices=NORMS),
    Field("norm_position", "choice", choices=NORM_POSITIONS,
          doc="pre: x + f(norm(x)); post: norm(x + f(x)); sandwich: x + post_norm(f(norm(x)))"),
    Field("activation", "choice", choices=ACTIVATIONS),
    Field("position", "choice", choices=POSITIONS),
    Field("dtype", "choice", choices=DTYPES, doc="the float type of every tensor not quantized"),
    Field("norm_eps", "number", doc="non-negative"),
    Field("rope_theta", "positive", default=10000.0),
    Field("rope_scaling", "object", default=None, doc="HF's rope_scaling dict, verbatim"),
    Field("rope_interleaved", "bool", default=False, doc="pairs (2i, 2i+1) instead of rotate-half"),
    Field("partial_rotary_factor", "number", default=1.0, doc="in (0, 1]"),
    Field("bos_token_id", "ids", default=None),
    Field("eos_token_id", "ids", default=None),
    Field("pad_token_id", "ids", default=None),
    Field("tokenizer", "text", default=None, doc="a file name in the model directory"),
    Field("chat_template", "text", default=None),
    Field("add_bos_token", "bool", default=False),
)


# Scales a stack may apply (decoders and encoder-decoders).
SCALE_FIELDS = (
    Field("embed_scale", "positive", default=None, doc="token embeddings are multiplied by it"),
    Field("attention_scale", "positive", default=None, doc="score scale; null: 1/sqrt(head_dim)"),
)


def stack_dims(config):
    """The dimension names of one transformer stack (docs/DESIGN.md's tensor tables)."""
    H, D, I = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    Hq, Hkv = config["num_heads"], config["num_kv_heads"]
    return {
        "H": H, "V": config["vocab_size"], "D": D, "I": I, "Hq": Hq, "Hkv": Hkv,
        "P": config["max_position_embeddings"],
        "QKV": (Hq + 2 * Hkv) * D,  # fused q, k, v rows
        "Q": Hq * D,
        "KV": 2 * Hkv * D,  # fused k, v rows (cross-attention)
        "KVD": Hkv * D,  # the k (or v) rows
        "UP": 2 * I if config["gated_ffn"] else I,  # gate rows then up rows, when gated
    }


def _gated(config):
    return config["gated_ffn"]


def _qk_norm(config):
    return bool(config.get("qk_norm"))


def _sandwich(config):
    return config["norm_position"] == "sandwich"


def _not_gated(config):
    return not config["gated_ffn"]


# One block: self-attention and FFN with their norms; `cross` adds cross-attention between them.
def block(cross=False):
    tensors = [
        *norm("attn_norm"),
        *linear("attn.qkv", "QKV", "H", parts=(("q", "Q"), ("k", "KVD"), ("v", "KVD"))),
        *linear("attn.out", "H", "Q"),
        # Gemma 2/3 (norm_position sandwich): the attention's output is normed before the residual add.
        *norm("attn_post_norm", when=_sandwich),
        # Qwen3: an RMSNorm over each head's D of q and of k, before RoPE.
        Tensor("attn.q_norm.weight", ("D",), when=_qk_norm),
        Tensor("attn.k_norm.weight", ("D",), when=_qk_norm),
    ]
    if cross:
        tensors += [*norm("cross_norm"), *linear("cross_attn.q", "Q", "H"),
                    *linear("cross_attn.kv", "KV", "H", parts=(("k", "KVD"), ("v", "KVD"))),
                    *linear("cross_attn.out", "H", "Q")]
    tensors += [
        *norm("ffn_norm"),
        *linear("ffn.gate_up", "UP", "H", when=_gated, parts=(("gate", "I"), ("up", "I"))),
        *linear("ffn.up", "UP", "H", when=_not_gated),
        *linear("ffn.down", "H", "I"),
        *norm("ffn_post_norm", when=_sandwich),
    ]
    return tuple(tensors)


def token_embedding(name="embed.weight", rows="V", when=None):
    """A token embedding: rows are looked up (dequantized row by row when quantized)."""
    return Tensor(name, (rows, "H"), quantizable=EMBEDDING, when=when, lookup=True)


def pre_norm(config):
    """Whether blocks norm their input (pre and sandwich), so that the stack ends in a final norm."""
    return config["norm_position"] in ("pre", "sandwich")
