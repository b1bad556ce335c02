"""The pieces every architecture shares: the config fields of a transformer stack, its
dimensions, and the tensors of one block (attention, FFN, their norms). Imports only the schema."""

from .schema import EMBEDDING, PYTHON, Field, Tensor, linear, norm

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


# Local attention (Mistral, Gemma 2/3, ModernBERT): a query at position p sees the keys j with
# |p - j| < W (causal stacks: p - W < j <= p), in every layer or only in the local ones.
LOCAL_FIELDS = (
    Field("sliding_window", "size", default=None, doc="W: local layers see keys within it; null: none"),
    Field("sliding_window_pattern", "size", default=None,
          doc="N: only some layers are local, layer i global when i % N == global_layer_phase; null: all"),
    Field("global_layer_phase", "count", default=None, doc="in [0, N); null: N - 1 (Gemma; ModernBERT: 0)"),
    Field("rope_local_theta", "positive", default=None,
          doc="the local layers' RoPE base, unscaled (Gemma 3, ModernBERT); null: rope_theta as every layer"),
)


def check_local(config, fail):
    """The local-attention fields describe local layers only together with a window."""
    for field in ("sliding_window_pattern", "global_layer_phase", "rope_local_theta"):
        if config.get(field) is not None and config.get("sliding_window") is None:
            fail(f"{field!r} describes local layers, but 'sliding_window' is null")
    if config.get("rope_local_theta") is not None and config["position"] != "rope":
        fail("'rope_local_theta' needs rope positions")
    phase = config.get("global_layer_phase")
    if phase is not None and not phase < (config.get("sliding_window_pattern") or 0):
        fail(f"'global_layer_phase' must be below sliding_window_pattern, got {phase!r}")


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
        **_moe_dims(config, H, D, I, Hq, Hkv),
    }


def _moe_dims(config, H, D, I, Hq, Hkv):
    """Mixture-of-experts FFNs and q/k norms over whole projections (decoder fields; absent
    elsewhere). Experts are stacked along the rows: expert e's [gate; up] rows are e*2I .. (e+1)*2I
    of EUP, its down rows e*H .. (e+1)*H of EH."""
    E, shared = config.get("num_experts") or 0, config.get("shared_expert_intermediate_size") or 0
    projection = config.get("qk_norm_span") == "projection"
    return {
        "E": E, "EUP": E * 2 * I, "EH": E * H,
        "IS": shared, "SUP": 2 * shared,  # the shared expert (Qwen2-MoE)
        "QN": Hq * D if projection else D, "KN": Hkv * D if projection else D,  # q/k norm widths
    }


def _gated(config):
    return config["gated_ffn"]


def _qk_norm(config):
    return bool(config.get("qk_norm"))


def _sandwich(config):
    return config["norm_position"] == "sandwich"


def _not_gated(config):
    return not config["gated_ffn"]


def _moe(config):
    return bool(config.get("num_experts"))


def _dense_gated(config):
    return config["gated_ffn"] and not _moe(config)


def _dense_not_gated(config):
    return not config["gated_ffn"] and not _moe(config)


def _shared_expert(config):
    return _moe(config) and bool(config.get("shared_expert_intermediate_size"))
def _attn_norm_required(config):
    # Without first_attn_norm (ModernBERT), layer 0 has none; the core requires it in the others.
    return config.get("first_attn_norm", True) is not False


# One block: self-attention and FFN with their norms; `cross` adds cross-attention between them.
def block(cross=False):
    tensors = [
        *norm("attn_norm", required=_attn_norm_required),
        *linear("attn.qkv", "QKV", "H", parts=(("q", "Q"), ("k", "KVD"), ("v", "KVD"))),
        *linear("attn.out", "H", "Q"),
        # Gemma 2/3 (norm_position sandwich): the attention's output is normed before the residual add.
        *norm("attn_post_norm", when=_sandwich),
        # Qwen3: an RMSNorm over each head's D of q and of k, before RoPE; OLMoE: over the whole
        # q and k projections (qk_norm_span "projection").
        Tensor("attn.q_norm.weight", ("QN",), when=_qk_norm),
        Tensor("attn.k_norm.weight", ("KN",), when=_qk_norm),
    ]
    if cross:
        tensors += [*norm("cross_norm"), *linear("cross_attn.q", "Q", "H"),
                    *linear("cross_attn.kv", "KV", "H", parts=(("k", "KVD"), ("v", "KVD"))),
                    *linear("cross_attn.out", "H", "Q")]
    tensors += [
        *norm("ffn_norm"),
        *linear("ffn.gate_up", "UP", "H", when=_dense_gated, parts=(("gate", "I"), ("up", "I"))),
        *linear("ffn.up", "UP", "H", when=_dense_not_gated),
        *linear("ffn.down", "H", "I", when=lambda config: not _moe(config)),
        *moe_ffn(),
        *norm("ffn_post_norm", when=_sandwich),
    ]
    return tuple(tensors)


def moe_ffn():
    """A mixture-of-experts FFN (num_experts > 0) in place of the dense one: the router, every
    expert's gated FFN stacked along the rows (expert e: gate rows, then up rows), and the optional
    shared expert with its sigmoid gate (Qwen2-MoE). The router and the shared gate stay float, as
    llama.cpp keeps them: they choose and weigh the experts."""
    return (
        Tensor("ffn.router.weight", ("E", "H"), when=_moe),
        Tensor("ffn.experts.gate_up.weight", ("EUP", "H"), when=_moe, quantizable=True, routed=True),
        Tensor("ffn.experts.down.weight", ("EH", "I"), when=_moe, quantizable=True, routed=True),
        Tensor("ffn.shared.gate_up.weight", ("SUP", "H"), when=_shared_expert, quantizable=True,
               parts=(("gate", "IS"), ("up", "IS"))),
        Tensor("ffn.shared.down.weight", ("H", "IS"), when=_shared_expert, quantizable=True),
        Tensor("ffn.shared_gate.weight", (1, "H"), when=_shared_expert),
    )


def token_embedding(name="embed.weight", rows="V", when=None):
    """A token embedding: rows are looked up (dequantized row by row when quantized)."""
    return Tensor(name, (rows, "H"), quantizable=EMBEDDING, when=when, lookup=True)


def pre_norm(config):
    """Whether blocks norm their input (pre and sandwich), so that the stack ends in a final norm."""
    return config["norm_position"] in ("pre", "sandwich")


# A bias on attention scores by relative position (T5, MPNet): the checkpoint's table by bucket
# `rel_bias.weight` [buckets, heads] (read by Python) becomes, at load, a table by relative position
# -R .. R (R = relative_attention_max_distance: beyond it the bucket no longer changes), which the
# core adds to the scores. The table is bounded since it is made from config values alone.
MAX_RELATIVE_DISTANCE = 2**16

RELATIVE_FIELDS = (
    Field("relative_attention_num_buckets", "size", default=None),
    Field("relative_attention_max_distance", "size", default=None),
)


def relative_dims(config):
    return {"NB": config.get("relative_attention_num_buckets") or 0,
            "R2": 2 * (config.get("relative_attention_max_distance") or 0) + 1}


def relative_bias(prefix, when):
    """The bucket table and the table by distance made from it at load."""
    return (
        Tensor(f"{prefix}rel_bias.weight", ("NB", "Hq"), when=when, reader=PYTHON),
        Tensor(f"{prefix}rel_pos_table", ("Hq", "R2"), when=when, stored=False),
    )


def check_relative(config, fail):
    """The bucket count and distance of a relative position bias."""
    buckets = config.get("relative_attention_num_buckets")
    distance = config.get("relative_attention_max_distance")
    for field, value in (("relative_attention_num_buckets", buckets), ("relative_attention_max_distance", distance)):
        if value is None:
            fail(f"{field!r} must be a positive integer, got None")
    if distance > MAX_RELATIVE_DISTANCE:
        fail(f"'relative_attention_max_distance' is {distance}, more than pyxf supports ({MAX_RELATIVE_DISTANCE})")
    if buckets < 4 or distance < buckets // 2:
        fail("relative_attention_num_buckets must be >= 4 and max_distance >= num_buckets / 2")
