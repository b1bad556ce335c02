"""Speculative decoding by prompt lookup: greedy output identical to transformers' greedy (drafts
verified in one forward pass, the KV cache rolled back past rejected ones), and sampled output
distributed as without speculation (a chi-square test against the exact distribution computed from
transformers' logits)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import helpers

SPEC = "llama_gqa_d80_llama3_bias"


@pytest.fixture(scope="module")
def pair(tiny_models):
    helpers.require_core()
    import pyxf

    hf, model_dir = tiny_models(SPEC)
    return hf, pyxf.load(model_dir)


def repetitive_prompt(vocab, seed, length=120):
    """A prompt made of a few phrases repeated: the continuation tends to repeat them too, so
    prompt lookup has drafts to propose."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, vocab, size=rng.integers(3, 8)).tolist() for _ in range(4)]
    out = []
    while len(out) < length:
        out += phrases[rng.integers(0, len(phrases))]
    return out[:length]


def test_greedy_with_drafts_matches_transformers(pair):
    import pyxf

    hf, px = pair
    prompts = [repetitive_prompt(px.vocab_size, s) for s in range(4)]
    with pyxf.Engine(px, max_batch=4) as engine:
        requests = [engine.submit(p, max_new_tokens=40, speculative="prompt_lookup", num_draft_tokens=5)
                    for p in prompts]
        results = [r.result(timeout=120) for r in requests]
        stats = engine.stats()
    for p, r in zip(prompts, results):
        assert r.token_ids == helpers.strip_eos(helpers.hf_greedy(hf, p, 40), px.eos_token_ids)
    assert stats["draft_tokens_proposed_total"] > 0
    assert stats["draft_tokens_accepted_total"] > 0  # the rollback path and the confirm path both ran


def test_engine_defaults_and_a_request_that_opts_out(pair):
    """Engine(speculative="prompt_lookup", num_draft_tokens=k) drafts for every request that does
    not say otherwise (as `pyxf serve --prompt-lookup` does); speculative=False opts one out."""
    import pyxf

    hf, px = pair
    prompt = repetitive_prompt(px.vocab_size, 7)
    want = helpers.strip_eos(helpers.hf_greedy(hf, prompt, 40), px.eos_token_ids)
    with pyxf.Engine(px, speculative="prompt_lookup", num_draft_tokens=6) as engine:
        plain = engine.submit(prompt, max_new_tokens=40, speculative=False).result(timeout=120)
        after_plain = engine.stats()["draft_tokens_proposed_total"]
        drafted = engine.submit(prompt, max_new_tokens=40).result(timeout=120)
        after_drafted = engine.stats()["draft_tokens_proposed_total"]
    assert plain.token_ids == want and drafted.token_ids == want
    assert after_plain == 0 < after_drafted
    with pytest.raises(ValueError, match="speculative must be"):
        pyxf.Engine(px, speculative="draft")


def test_generate_with_speculation_equals_plain_greedy_on_smollm2():
    """An input-grounded prompt (rewrite a text): the case prompt lookup is for."""
    import pyxf
    from pyxf import hub

    model = pyxf.load(hub.default_model_path())
    text = ("The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs "
            "into the forest to find its family, who live near the river under the old oak tree.")
    messages = [{"role": "user", "content": f"Repeat this text exactly:\n{text}"}]
    plain = pyxf.generate(model, messages=messages, max_new_tokens=60, return_details=True)
    fast = pyxf.generate(model, messages=messages, max_new_tokens=60, speculative="prompt_lookup",
                         num_draft_tokens=6, return_details=True)
    assert fast.token_ids == plain.token_ids


def test_sampling_with_drafts_keeps_the_distribution(pair):
    """(first, second) new token under temperature 1 and top_k 3: 9 outcomes whose exact
    probabilities come from transformers' logits. Three tokens are generated, so the step after the
    first has one token to draft, and it always has one (every token occurs earlier in the prompt):
    the second token is always the verification of a draft."""
    import torch

    import pyxf

    hf, px = pair
    rng = np.random.default_rng(5)
    prompt = rng.permutation(np.arange(2, px.vocab_size)).tolist()  # every token once: always a draft

    def top3(logits):
        idx = np.argsort(-logits, kind="stable")[:3]
        p = torch.softmax(torch.tensor(logits[idx], dtype=torch.float64), 0).numpy()
        return dict(zip(idx.tolist(), p))

    first = top3(helpers.hf_logits(hf, prompt)[-1])
    expected = {}
    for t1, p1 in first.items():
        for t2, p2 in top3(helpers.hf_logits(hf, prompt + [t1])[-1]).items():
            expected[(t1, t2)] = p1 * p2

    n = 3000
    with pyxf.Engine(px, max_batch=64, max_queue=n) as engine:
        requests = [engine.submit(prompt, max_new_tokens=3, temperature=1.0, top_k=3, seed=s,
                                  speculative="prompt_lookup", num_draft_tokens=3) for s in range(n)]
        outcomes = [tuple(r.result(timeout=300).token_ids[:2]) for r in requests]
        stats = engine.stats()
    assert stats["draft_tokens_proposed_total"] >= n
    counts = {k: 0 for k in expected}
    for o in outcomes:
        assert o in counts, f"{o} is outside the top-3 x top-3 support"
        counts[o] += 1
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in expected.items())
    # 8 degrees of freedom: P(chi2 > 26.12) = 0.001 when the distribution is right.
    assert chi2 < 26.12, (chi2, counts, {k: round(n * p) for k, p in expected.items()})


def test_speculative_arguments_are_checked(pair):
    import pyxf

    hf, px = pair
    with pytest.raises(ValueError, match="prompt_lookup"):
        pyxf.generate(px, [3, 4, 5], speculative="draft")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        pyxf.generate(px, [3, 4, 5], speculative="prompt_lookup", num_draft_tokens=0)
