"""Tiny random Hugging Face models for parity tests: built from a spec, given weights large enough
that logits are far from zero and attention is not uniform, saved with save_pretrained and converted
with pyxf.convert. The conftest fixture `tiny_models` caches them per test session.
"""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

BOS, EOS = 0, 1

# Kernel tables whose bfloat16 products round the activations to bfloat16 (fp32 sums): vdpbf16ps,
# and AMX tiles for many rows. The other tables widen bf16 weights to float: exact products.
BF16_PRODUCT_ISAS = ("avx512_bf16", "avx512_amx")


def widening_isas(isas):
    return [isa for isa in isas if isa not in BF16_PRODUCT_ISAS]


def bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, and their float32 values."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32)


def bf16_rounds_activations(isa, rows):
    """Whether bfloat16 products of `rows` rows round the activations to bfloat16 on table `isa`
    as it is set now: avx512_amx always (vdpbf16ps, tiles); avx512_bf16 unless it widens many rows
    (`_core.set_bf16_gemm`: from 16 rows, FMAs on float activations); the other tables never."""
    from pyxf import _core

    if isa == "avx512_bf16":
        return not (_core.info()["bf16_gemm_widens"] and rows >= 16)
    return isa in BF16_PRODUCT_ISAS


def bf16_attention_products(isa):
    """Whether a bf16 model's attention takes its products in bfloat16 on table `isa` as set now."""
    from pyxf import _core

    return isa == "avx512_amx" or (isa == "avx512_bf16" and not _core.info()["bf16_gemm_widens"])


def bf16_gemm_variants(isas):
    """Kernel ids for tests of bf16 products: every ISA, avx512_bf16 once per GEMM variant."""
    return [v for isa in isas for v in ((f"{isa}-dot", f"{isa}-widen") if isa == "avx512_bf16" else (isa,))]


def set_kernels(kernel_id):
    """Sets the ISA and bf16 GEMM variant a kernel id names (bf16_gemm_variants); returns a function
    that restores the previous ones."""
    from pyxf import _core

    before, gemm_before = _core.get_isa(), _core.get_bf16_gemm()
    isa, _, gemm = kernel_id.partition("-")
    _core.set_isa(isa)
    _core.set_bf16_gemm(gemm or "auto")

    def restore():
        _core.set_isa(before)
        _core.set_bf16_gemm(gemm_before)

    return restore

# name -> (transformers class name, config class name, config kwargs). Every model has 2 layers and a
# small vocabulary; together the specs cover head dims 24/32/64/80/128, MQA, GQA and MHA, hidden sizes
# that are not a multiple of 16, head_dim * heads != hidden, RoPE scaling (linear, llama3) and theta,
# attention/MLP biases (Qwen2's qkv bias; Llama's attention_bias/mlp_bias), the non-SiLU gated
# activations, and tied and untied LM heads.
LLAMA_SPECS = {
    # MQA (1 KV head), head_dim 32, untied head, default RoPE.
    "llama_mqa_d32": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=384, hidden_size=96, intermediate_size=200, num_attention_heads=3, num_key_value_heads=1,
        head_dim=32, tie_word_embeddings=False,
    )),
    # MHA (kv heads == heads), head_dim 64, tied head, linear RoPE scaling.
    "llama_mha_d64_linear_tied": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=512, hidden_size=128, intermediate_size=160, num_attention_heads=2, num_key_value_heads=2,
        head_dim=64, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=10000.0,
    )),
    # GQA 4:2, head_dim 80 with hidden 72 (not a multiple of 16, and != heads * head_dim), odd
    # intermediate size, llama3 RoPE scaling, biases on every projection, tanh-GELU gate.
    "llama_gqa_d80_llama3_bias": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=300, hidden_size=72, intermediate_size=97, num_attention_heads=4, num_key_value_heads=2,
        head_dim=80, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        hidden_act="gelu_pytorch_tanh",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        rope_theta=500000.0,
    )),
    # head_dim 24 (not a multiple of any vector width), 3 heads, ReLU gate, hidden 72.
    "llama_d24_relu": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=1000, hidden_size=72, intermediate_size=136, num_attention_heads=3, num_key_value_heads=3,
        head_dim=24, tie_word_embeddings=False, hidden_act="relu",
    )),
    # Qwen2: q/k/v biases, head_dim 128, MQA, tied head, large theta.
    # Qwen3: per-head q/k RMSNorm before RoPE, head_dim 48 (not a multiple of 32) != hidden / heads, GQA.
    "qwen3_d48_qknorm": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=448, hidden_size=96, intermediate_size=144, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
    )),
    "qwen2_d128_tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=640, hidden_size=256, intermediate_size=320, num_attention_heads=2, num_key_value_heads=1,
        head_dim=128, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
    )),
}

# Mistral with a sliding window shorter than its 512 positions and than the test sequences.
WINDOW_SPECS = {
    "mistral_window16": ("MistralForCausalLM", "MistralConfig", dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=False, sliding_window=16,
    )),
    # Phi-3-mini-4k's window (2047 of 4096 positions) in small.
    "phi3_window16": ("Phi3ForCausalLM", "Phi3Config", dict(
        vocab_size=288, hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=4,
        tie_word_embeddings=False, sliding_window=16,
    )),
}

# Phi-3: qkv_proj and gate_up_proj stored fused; head_dim = hidden / heads. The LongRoPE specs switch
# factors at original_max_position_embeddings 128 (of 512 positions: attention factor
# sqrt(1 + ln 4 / ln 128)); their per-pair factors grow as Phi-3's do. Phi-4-mini's partial rotary
# (0.75 of a head of 40: 15 factors) with MQA; the other with the config's own attention_factor.
def _longrope(pairs, attention_factor=None):
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
               "long_factor": [1.0 + 0.6 * i for i in range(pairs)]}
    if attention_factor is not None:
        scaling["attention_factor"] = attention_factor
    return scaling


PHI3_SPECS = {
    # GQA 4:2, head_dim 24, untied head, no RoPE scaling (Phi-3-mini-4k, Phi-4).
    "phi3_d24_gqa": ("Phi3ForCausalLM", "Phi3Config", dict(
        vocab_size=352, hidden_size=96, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False,
    )),
    # Phi-4-mini's shape in small: partial rotary 0.75, LongRoPE, MQA, tied head.
    "phi3_longrope_partial_mqa": ("Phi3ForCausalLM", "Phi3Config", dict(
        vocab_size=320, hidden_size=80, intermediate_size=120, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=True, partial_rotary_factor=0.75, original_max_position_embeddings=128,
        rope_scaling=_longrope(15), rope_theta=250000.0,
    )),
    # Phi-3.5-mini's shape in small: full rotary, LongRoPE with an explicit attention factor, MHA.
    "phi3_longrope_d32_attention_factor": ("Phi3ForCausalLM", "Phi3Config", dict(
        vocab_size=300, hidden_size=128, intermediate_size=104, num_attention_heads=4, num_key_value_heads=4,
        tie_word_embeddings=False, original_max_position_embeddings=128, rope_scaling=_longrope(16, 1.3),
    )),
}

# Mixtures of experts (not in LLAMA_SPECS: their configs name the experts' width apart). Each has
# 4-8 experts, top-2, GQA or MQA, head dims that are not a multiple of 16, odd widths.
MOE_SPECS = {
    # Mixtral: 5 experts, top-2 renormalized, GQA 4:2, head_dim 24, untied head.
    "mixtral_e5": ("MixtralForCausalLM", "MixtralConfig", dict(
        vocab_size=352, hidden_size=72, intermediate_size=88, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, num_local_experts=5, num_experts_per_tok=2, tie_word_embeddings=False,
    )),
    # Qwen2-MoE: 6 experts, top-2 not renormalized, the shared expert and its sigmoid gate, qkv
    # biases, GQA 4:2 of head_dim 20, untied head.
    "qwen2moe_e6_shared": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        vocab_size=320, hidden_size=80, intermediate_size=120, moe_intermediate_size=40,
        shared_expert_intermediate_size=56, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False, use_sliding_window=False,
    )),
    # Qwen3-MoE: 8 experts, top-2 renormalized, per-head q/k norms, MQA with head_dim 40, tied head.
    "qwen3moe_e8_qknorm": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=1, head_dim=40, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        tie_word_embeddings=True, use_sliding_window=False,
    )),
    # OLMoE: 4 experts, top-2 not renormalized, q/k norms over the whole projections, GQA 4:2 of
    # head_dim 24, untied head.
    "olmoe_e4_projnorm": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        vocab_size=336, hidden_size=96, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False,
    )),
}

# Gemma 2 / 3 (pyxf family gemma): sliding windows (8, 12) shorter than the test sequences, so that
# the local layers' windows matter in prefill and decode; small soft caps (Gemma 2), so that tanh
# bends the scores and logits; query_pre_attn_scalar != head_dim; head dims 40 and 56.
GEMMA_SPECS = {
    # GQA 4:2, hidden 72, 3 layers (local, global, local), tied head, soft caps 4 and 6.
    "gemma2_gqa_d40_softcap": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        vocab_size=352, hidden_size=72, intermediate_size=120, num_attention_heads=4, num_key_value_heads=2,
        head_dim=40, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=32,
        attn_logit_softcapping=4.0, final_logit_softcapping=6.0, tie_word_embeddings=True,
    )),
    # MQA, 4 layers (local, local, global, local), untied head, q/k norms, the local layers' own
    # RoPE base and linear RoPE scaling on the global one.
    "gemma3_mqa_d56_untied": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        vocab_size=416, hidden_size=84, intermediate_size=136, num_attention_heads=3, num_key_value_heads=1,
        head_dim=56, num_hidden_layers=4, sliding_window=12, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        tie_word_embeddings=False,
    )),
}

GPT2_SPECS = {
    # head_dim 32, tanh GELU (gelu_new), tied head.
    "gpt2_d32": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=400, n_embd=64, n_head=2, n_positions=256, activation_function="gelu_new",
    )),
    # A single head of 80, exact GELU, odd n_inner, untied head.
    "gpt2_d80_gelu_untied": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=520, n_embd=80, n_head=1, n_inner=150, n_positions=256, activation_function="gelu",
        tie_word_embeddings=False,
    )),
    # hidden 72 in 3 heads of 24, ReLU, layer_norm_epsilon not the default.
    "gpt2_d24_relu": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=300, n_embd=72, n_head=3, n_positions=256, activation_function="relu",
        layer_norm_epsilon=1e-6,
    )),
}

SPECS = {**LLAMA_SPECS, **WINDOW_SPECS, **PHI3_SPECS, **MOE_SPECS, **GEMMA_SPECS, **GPT2_SPECS}


def _config(spec_name):
    import transformers

    _, config_class, kwargs = SPECS[spec_name]
    kwargs = dict(kwargs, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None)
    if config_class == "GPT2Config":
        kwargs.update(n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kwargs = dict(dict(num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-6), **kwargs)
    return getattr(transformers, config_class)(**kwargs)


def _init_weights(model, seed):
    """Weights with unit-scale activations: linear weights ~ N(0, (1.5 / sqrt(fan_in))^2), norm
    weights around 1, biases and embeddings of moderate size; logits come out a few units large.
    transformers' default (std 0.02) gives near-zero logits, where a parity check would prove
    little; much larger weights make float32 rounding alone exceed the 1e-4 bound."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # Gemma's norms scale by 1 + w: their weights are centred on 0, the others' on 1.
    norm_centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm_weight = name.endswith("weight") and ("norm" in name or ".ln_" in name)
                p.copy_((norm_centre + 0.2 * torch.randn(p.shape, generator=g)) if is_norm_weight
                        else 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                # Rows of norm ~2, so that a tied head gives logits of a few units.
                p.copy_(2.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g))
            else:
                # nn.Linear is [out, in]; GPT-2's Conv1D is [in, out].
                fan_in = p.shape[0] if "Conv1D" in type(_module(model, name)).__name__ else p.shape[1]
                p.copy_(1.5 / math.sqrt(fan_in) * torch.randn(p.shape, generator=g))


def _module(model, param_name):
    module = model
    for part in param_name.split(".")[:-1]:
        module = getattr(module, part)
    return module


def build_hf_model(spec_name, seed=0):
    """The random transformers model for a spec: float32, eager attention, eval mode."""
    import torch
    import transformers

    model_class = getattr(transformers, SPECS[spec_name][0])
    torch.manual_seed(seed)
    model = model_class._from_config(_config(spec_name), attn_implementation="eager").float().eval()
    _init_weights(model, seed)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model


class TinyModelCache:
    """Builds and saves each spec once, converts it once per dtype; keeps the transformers model
    in memory."""

    def __init__(self, root):
        self.root = Path(root)
        self._hf = {}
        self._converted = {}

    def __call__(self, spec_name, dtype="float32"):
        """(transformers model, pyxf model directory converted to `dtype`)."""
        if spec_name not in self._hf:
            self._save(spec_name, build_hf_model(spec_name, seed=sum(map(ord, spec_name))))
        return self._convert(spec_name, dtype)

    def draft(self, spec_name, dtype="float32"):
        """A draft model for speculative decoding with spec_name's model: its first layer alone, with
        its embeddings, final norm and LM head (a 1-layer model over the same vocabulary whose
        guesses agree with the 2-layer model's often, but not always). (transformers model, pyxf
        model directory)."""
        name = f"{spec_name}-draft"
        if name not in self._hf:
            target, _ = self(spec_name)
            self._save(name, first_layers(target, 1))
        return self._convert(name, dtype)

    def _save(self, name, model):
        hf_dir = self.root / f"{name}-hf"
        model.save_pretrained(hf_dir)
        self._hf[name] = (model, hf_dir)

    def _convert(self, spec_name, dtype):
        model, hf_dir = self._hf[spec_name]
        key = (spec_name, dtype)
        if key not in self._converted:
            from pyxf.convert import convert

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no tokenizer": these models have none
                out = convert(hf_dir, self.root / f"{spec_name}-pyxf-{dtype}", dtype=dtype, progress=False)
            self._converted[key] = Path(out)
        return model, self._converted[key]


def first_layers(model, num_layers):
    """A copy of a transformers decoder with only its first num_layers layers (the same weights)."""
    import copy

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if hasattr(config, "n_layer"):
        config.n_layer = num_layers
    shallow = type(model)._from_config(config, attn_implementation="eager").float().eval()
    missing, _ = shallow.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    return shallow


def random_ids(vocab_size, n, seed):
    """n token ids, avoiding BOS/EOS so that nothing stops early by accident."""
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab_size, size=n).tolist()


def hf_logits(model, ids):
    """transformers' logits for one sequence: float32 numpy [len(ids), vocab]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids, max_new_tokens, eos_token_id=None):
    """transformers' greedy continuation of one prompt (new tokens only; the EOS token, if one
    stops it, included), with no EOS unless one is given."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos_token_id,
            pad_token_id=0 if eos_token_id is None else np.ravel(eos_token_id)[0].item(),
            num_beams=1, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
        )
    return out[0, len(ids):].tolist()


def strip_eos(tokens, eos_ids):
    """Tokens up to (excluding) the first EOS: what pyxf returns for the same generation."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


def max_abs_err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def require_core():
    import importlib.util

    if importlib.util.find_spec("pyxf._core") is None:
        pytest.skip("pyxf._core is not built (bash tools/dev_build.sh)")


def parity_pair(specs):
    """A parity test module's `pair` fixture: (transformers model, pyxf model) for each spec name,
    each loaded once per module (`pair = helpers.parity_pair(SPECS)`)."""
    loaded = {}

    @pytest.fixture(params=sorted(specs))
    def pair(request, tiny_models):
        require_core()
        import pyxf

        name = request.param
        if name not in loaded:
            hf, model_dir = tiny_models(name)
            loaded[name] = (hf, pyxf.load(model_dir))
        return loaded[name]

    return pair


def spec_seed(pair):
    """A seed that differs between the specs of one module (their vocabulary sizes differ)."""
    return pair[1].vocab_size


# ---------------------------------------------------------------------------------------------
# Checks shared by the parity test files: each takes the transformers model and the loaded pyxf
# model of one spec.

LOGITS_ATOL = 1e-4
NEW_TOKENS = 32


def check_prefill(hf, px, length, seed):
    ids = random_ids(px.vocab_size, length, seed)
    ref = hf_logits(hf, ids)
    out = px.logits(ids)
    assert out.dtype == np.float32 and out.shape == (length, px.vocab_size)
    err = max_abs_err(out, ref)
    assert err <= LOGITS_ATOL, f"prefill of {length} tokens: max abs logit error {err:.3g}"
    # Feeding the prompt to a session, asking for the last row only, gives the same last row.
    last = px.session().feed(ids, all_logits=False)
    assert last.shape == (1, px.vocab_size)
    assert max_abs_err(last[0], ref[-1]) <= LOGITS_ATOL
    return err


def check_incremental_decode(hf, px, prompt_length, seed, steps=NEW_TOKENS):
    """pyxf's session fed one token at a time against transformers decoding with its own KV cache
    (past_key_values) on the same tokens, and against transformers on the whole sequence at once.
    The tokens are transformers' greedy choices, so both run the same sequence."""
    import torch

    prompt = random_ids(px.vocab_size, prompt_length, seed)
    session = px.session()
    got = [session.feed(prompt)[-1]]
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        past, expected = out.past_key_values, [out.logits[0, -1].numpy()]
        tokens = []
        for _ in range(steps):
            token = int(np.argmax(expected[-1]))
            tokens.append(token)
            got.append(session.feed([token])[0])
            out = hf(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            expected.append(out.logits[0, -1].numpy())
    assert session.position == prompt_length + steps
    errs = [max_abs_err(g, e) for g, e in zip(got, expected)]
    worst = int(np.argmax(errs))
    assert errs[worst] <= LOGITS_ATOL, f"decode step {worst}: max abs logit error {errs[worst]:.3g}"

    full = hf_logits(hf, prompt + tokens)[prompt_length - 1 :]
    err_full = max_abs_err(np.stack(got), full)
    assert err_full <= LOGITS_ATOL, f"decode vs transformers on the full sequence: {err_full:.3g}"
    return max(errs)


def check_cache_equals_recompute(px, seed):
    """Logits from a session fed in uneven chunks (1 token, a block, single tokens, a block) equal
    those of one forward pass over the whole sequence."""
    ids = random_ids(px.vocab_size, 80, seed)
    full = px.logits(ids)
    session = px.session()
    chunks, start = [1, 17, 1, 1, 1, 40, 1, 1, 16, 1], 0
    assert sum(chunks) == len(ids)
    rows = []
    for n in chunks:
        rows.append(session.feed(ids[start : start + n]))
        start += n
    incremental = np.concatenate(rows)
    err = max_abs_err(incremental, full)
    assert err <= 2e-5, f"incremental vs full recomputation: max abs error {err:.3g}"
    # After reset the session starts over.
    session.reset()
    assert session.position == 0
    assert max_abs_err(session.feed(ids[:5]), full[:5]) <= 2e-5


def check_greedy(hf, px, prompt, max_new_tokens=NEW_TOKENS):
    """pyxf's greedy continuation equals transformers' generate(do_sample=False); both stop at the
    model's EOS, which transformers returns and pyxf leaves out."""
    import pyxf

    expected = strip_eos(hf_greedy(hf, prompt, max_new_tokens, eos_token_id=EOS), {EOS})
    got = pyxf.generate(px, prompt, max_new_tokens=max_new_tokens)
    assert isinstance(got, list) and all(isinstance(t, int) for t in got)
    assert got == expected, f"prompt of {len(prompt)} tokens:\n pyxf         {got}\n transformers {expected}"
    return got


def check_stop_token(hf, px, prompt):
    """A stop token ends generation like transformers' eos_token_id does, and is not returned."""
    import pyxf

    free = hf_greedy(hf, prompt, NEW_TOKENS)  # no EOS at all
    # The first token whose first occurrence is at index >= 3 becomes the stop token.
    j = next((i for i in range(3, len(free)) if free[i] not in free[:i] and free[i] != EOS), None)
    if j is None:
        pytest.skip("greedy output repeats from the start; no fresh token to stop on")
    stop = free[j]
    assert hf_greedy(hf, prompt, NEW_TOKENS, eos_token_id=stop) == free[: j + 1]
    assert pyxf.generate(px, prompt, max_new_tokens=NEW_TOKENS, stop=[stop]) == free[:j]


def check_batched_generate(hf, px, seed):
    """A batch of prompts of different lengths gives what each prompt gives alone, and what
    transformers gives."""
    import pyxf

    prompts = [random_ids(px.vocab_size, n, seed + n) for n in (1, 5, 17, 40)]
    batched = pyxf.generate(px, prompts, max_new_tokens=NEW_TOKENS)
    singles = [pyxf.generate(px, [p], max_new_tokens=NEW_TOKENS)[0] for p in prompts]
    assert batched == singles
    for p, got in zip(prompts, batched):
        assert got == strip_eos(hf_greedy(hf, p, NEW_TOKENS, eos_token_id=EOS), {EOS})


def half_precision_reference(hf, dtype):
    """A copy of the transformers model whose weights are rounded to `dtype` and computed in
    float32: what a model converted to that dtype should compute."""
    import copy

    import torch

    model = copy.deepcopy(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    return model


# ---------------------------------------------------------------------------------------------
# Encoder-decoder models from transformers, with sentencepiece vocabularies trained on a few lines

SENTENCEPIECE_TEXT = [
    "the quick brown fox jumps over the lazy dog", "hello world how are you today",
    "machine translation with transformers is fun", "ich bin ein berliner und du bist mein freund",
    "das ist ein kleines haus am see", "we test beam search and greedy decoding",
]


def train_sentencepiece(directory, **special):
    import sentencepiece

    (directory / "text.txt").write_text("\n".join(SENTENCEPIECE_TEXT * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(directory / "text.txt"), model_prefix=str(directory / "spm"), vocab_size=60,
        hard_vocab_limit=False, model_type="unigram", minloglevel=2, **special,
    )
    return directory / "spm.model"


def randomize(model, linear_scale, embed_scale):
    """Weights that give logits of a few units (transformers' std 0.02 gives near-zero ones)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # Marian's fixed sinusoids
                continue
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            elif "embed" in name or "shared" in name:
                p.copy_(embed_scale / math.sqrt(p.shape[1]) * torch.randn_like(p))
            else:
                p.copy_(linear_scale / math.sqrt(p.shape[1]) * torch.randn_like(p))


def build_marian(hf_dir):
    """A tiny random MarianMTModel with its tokenizer, saved to `hf_dir`; (model, tokenizer)."""
    import json
    import shutil

    import sentencepiece
    import torch
    import transformers

    root = Path(hf_dir).parent / "marian-vocab"
    root.mkdir(parents=True, exist_ok=True)
    sp_path = train_sentencepiece(root, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    V = len(vocab)
    for name in ("source.spm", "target.spm"):
        shutil.copyfile(sp_path, root / name)
    (root / "vocab.json").write_text(json.dumps(vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses."
        tokenizer = transformers.MarianTokenizer(str(root / "source.spm"), str(root / "target.spm"), str(root / "vocab.json"))
    config = transformers.MarianConfig(
        vocab_size=V, decoder_vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1, forced_eos_token_id=0, scale_embedding=True,
        activation_function="swish", dropout=0.0,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    randomize(model, 1.5, 2.0)
    with torch.no_grad():
        model.final_logits_bias.copy_(0.1 * torch.randn_like(model.final_logits_bias))
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return model, tokenizer


def child_process_options(*more_paths):
    """`cwd` and `env` for a child interpreter that must import the pyxf under test: started in the
    directory that holds that pyxf (a child's current directory comes first on sys.path, so a child
    started in a source checkout would otherwise import the source tree, which has no compiled
    extension when pyxf is installed), with that directory and `more_paths` on PYTHONPATH. Not
    resolved: the sanitizer builds' package directory links the sources of the checkout."""
    import os

    import pyxf

    package_parent = str(Path(pyxf.__file__).absolute().parents[1])
    env = dict(os.environ)
    paths = [package_parent, *map(str, more_paths), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return {"cwd": package_parent, "env": env}
