"""GPT-2 parity: tiny random GPT2LMHeadModel checkpoints saved with save_pretrained, converted with
pyxf.convert (Conv1D weights transposed, fused c_attn split into q/k/v order) and loaded with
pyxf.load, against transformers (float32, eager attention) on the same token ids.

The specs (tests/helpers.py GPT2_SPECS) cover head dims 24/32/80, one head and several, tanh GELU
(gelu_new), exact GELU and ReLU, an odd n_inner, a non-default LayerNorm epsilon, and tied and untied
heads. GPT-2 has learned positions, so the last position of the table is tested too.
"""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers
from helpers import GPT2_SPECS

SPECS = sorted(GPT2_SPECS)


pair = helpers.parity_pair(SPECS)
spec_seed = helpers.spec_seed


@pytest.mark.parametrize("length", [1, 7, 129])
def test_prefill_logits_match_transformers(pair, length):
    hf, px = pair
    helpers.check_prefill(hf, px, length, seed=length + spec_seed(pair))


def test_incremental_decode_matches_transformers(pair):
    hf, px = pair
    helpers.check_incremental_decode(hf, px, prompt_length=7, seed=spec_seed(pair))


def test_decode_up_to_the_last_learned_position(tiny_models):
    """A 224-token prompt and 32 decode steps end exactly at n_positions (256)."""
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models("gpt2_d32")
    px = pyxf.load(model_dir)
    assert px.config["max_position_embeddings"] == 256
    helpers.check_incremental_decode(hf, px, prompt_length=224, seed=5)


def test_kv_cache_equals_full_recomputation(pair):
    helpers.check_cache_equals_recompute(pair[1], seed=spec_seed(pair))


def test_greedy_matches_transformers_generate(pair):
    hf, px = pair
    for n in (1, 6, 20):
        helpers.check_greedy(hf, px, helpers.random_ids(px.vocab_size, n, seed=200 + n))


def test_stop_token_matches_transformers_eos(pair):
    hf, px = pair
    helpers.check_stop_token(hf, px, helpers.random_ids(px.vocab_size, 9, seed=19))


def test_batched_generate_equals_one_at_a_time(pair):
    hf, px = pair
    helpers.check_batched_generate(hf, px, seed=spec_seed(pair))


def test_converted_config_describes_the_model(pair):
    hf, px = pair
    c, h = px.config, hf.config
    assert (c["family"], c["norm"], c["position"], c["gated_ffn"]) == ("gpt2", "layernorm", "learned", False)
    assert (c["num_layers"], c["hidden_size"], c["num_heads"], c["num_kv_heads"]) == (
        h.n_layer, h.n_embd, h.n_head, h.n_head)
    assert c["head_dim"] * c["num_heads"] == h.n_embd
    assert c["intermediate_size"] == (h.n_inner or 4 * h.n_embd)
    assert c["max_position_embeddings"] == h.n_positions
    assert c["norm_eps"] == pytest.approx(h.layer_norm_epsilon)
    assert c["activation"] == {"gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[h.activation_function]
    assert c["tie_word_embeddings"] == h.tie_word_embeddings


def test_no_positions_beyond_the_learned_table(tiny_models):
    """Learned positions end at n_positions: asking for more is an error, not garbage."""
    helpers.require_core()
    import pyxf

    _, model_dir = tiny_models("gpt2_d32")
    with pytest.raises(ValueError):
        pyxf.load(model_dir, context_length=257)
    px = pyxf.load(model_dir)
    prompt = helpers.random_ids(px.vocab_size, 250, seed=1)
    with pytest.raises(ValueError):
        pyxf.generate(px, prompt, max_new_tokens=7)
    session = px.session()
    session.feed(prompt)
    with pytest.raises(ValueError):
        session.feed(helpers.random_ids(px.vocab_size, 7, seed=2))
    assert session.position == 250
    session.feed(helpers.random_ids(px.vocab_size, 6, seed=3))  # exactly to the end is fine
    assert session.position == 256
