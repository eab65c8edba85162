"""dpoflow.generation: shared prefill (one prompt forward for K samples, one forward for the common prefix) gives
the same outputs as mlx-lm's plain path, deterministically, on a tiny random model."""
from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from dpoflow.batching import encode_prompt
from dpoflow.generation import SharedPrefill, generate

SYSTEM = "Reply with only the final answer, no explanation."
QUESTIONS = ["Calculate 2 + 3.", "What is 7 times 8?", "Calculate 2 + 3.", "Sort 3, 1, 2.", "Spell cat backwards.",
             "How many legs do 3 spiders have?", "Calculate 40 - 17 + 5.", "What is 9?"]


def prompts(system=SYSTEM):
    return [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from dpoflow.models import load_model

    return load_model(tiny_model_dir)


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_greedy_output_equals_the_unshared_path(tiny, system):
    model, tok = tiny
    kw = dict(n_samples=3, temperature=0.0, max_tokens=12, seed=0, batch_size=8)
    shared = generate(model, tok, prompts(system), share_prefill=True, **kw)
    plain = generate(model, tok, prompts(system), share_prefill=False, **kw)
    assert shared.token_ids == plain.token_ids
    assert shared.finished == plain.finished
    assert shared.generated_tokens == plain.generated_tokens > 0
    # the K copies of a prompt, and the duplicated prompt, are prefilled once
    assert shared.prompt_tokens < plain.prompt_tokens / 2


def test_sampling_is_seeded(tiny):
    """Same seed, same samples. (They are not those of the unshared path: there a sequence joins the decode batch
    one generator step later, after its own prompt step, so it draws from another point of the random stream.)"""
    model, tok = tiny
    kw = dict(n_samples=4, temperature=1.0, max_tokens=10, batch_size=6)  # batch < sequences: refills
    a = generate(model, tok, prompts(), seed=3, **kw)
    b = generate(model, tok, prompts(), seed=3, **kw)
    c = generate(model, tok, prompts(), seed=4, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert [len(s) for s in a.token_ids] == [4] * len(QUESTIONS)


def test_prefill_caches_equal_a_whole_prompt_forward(tiny):
    model, tok = tiny
    encoded = [encode_prompt(tok, p) for p in prompts()]
    distinct = list(dict.fromkeys(tuple(p) for p in encoded))
    prefill = SharedPrefill(model, distinct, batch=3)
    assert prefill.prefix_len > 5  # the system turn is shared
    for ids, cache in zip(distinct, prefill.caches(distinct)):
        ref = make_prompt_cache(model)
        model(mx.array([list(ids[:-1])]), cache=ref)
        for got, want in zip(cache, ref):
            k, v = got.state[:2]
            rk, rv = want.keys[..., :want.offset, :], want.values[..., :want.offset, :]
            assert got.offset == want.offset == len(ids) - 1
            assert mx.allclose(k, rk, atol=1e-5).item() and mx.allclose(v, rv, atol=1e-5).item()
