"""dpoflow.modeling.generation: shared prefill (one prompt forward for K samples, one forward for the common prefix) and
fixed decode slots give mlx-lm's batch-generation output, deterministically, on a tiny random model; the CPU's fast
exp (polynomial exp in SwiGLU, the decode attention and the temperature sampler) stays within float32 noise of it."""

from __future__ import annotations

import math
import subprocess
import sys
from contextlib import nullcontext

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import batch_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from dpoflow.core.batching import encode_prompt
from dpoflow.modeling import generation
from dpoflow.modeling.fast_ops import (
    _mlx_swiglu,
    fast_categorical_sampler,
    fast_exp_ops,
    inverse_cdf_sample,
    mlx_exp,
    mlx_exp_ops,
    mlx_logsumexp,
    poly_exp,
    sequence_uniforms,
    trainable_logsumexp,
    trainable_swiglu,
)
from dpoflow.modeling.generation import SharedPrefill, generate

SYSTEM = "Reply with only the final answer, no explanation."
QUESTIONS = [
    "Calculate 2 + 3.",
    "What is 7 times 8?",
    "Calculate 2 + 3.",
    "Sort 3, 1, 2.",
    "Spell cat backwards.",
    "How many legs do 3 spiders have?",
    "Calculate 40 - 17 + 5.",
    "What is 9?",
]


def prompts(system=SYSTEM):
    return [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from dpoflow.modeling.loading import load_model

    return load_model(tiny_model_dir)


def mlx_lm_greedy(model, tok, msgs, n_samples, max_tokens):
    """mlx-lm's own batch generation, every copy of every prompt a separate sequence (the reference)."""
    flat = [encode_prompt(tok, m) for m in msgs for _ in range(n_samples)]
    out = batch_generate(model, tok, flat, max_tokens=max_tokens, return_token_ids=True, sampler=make_sampler(0.0))
    eos = set(tok.eos_token_ids)
    ids = [[t for t in seq if t not in eos] for seq in out.token_ids]
    return [ids[i * n_samples : (i + 1) * n_samples] for i in range(len(msgs))]


# (batch, samples, max tokens): refills, buffer compaction (long runs at batch 1-2) and growth (100 > headroom)
@pytest.mark.parametrize("batch,n,max_tokens", [(8, 3, 12), (2, 3, 20), (3, 1, 100)])
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_greedy_output_equals_mlx_lm_batch_generation(tiny, system, batch, n, max_tokens):
    model, tok = tiny
    msgs = prompts(system)
    out = generate(
        model, tok, msgs, n_samples=n, temperature=0.0, max_tokens=max_tokens, seed=0, batch_size=batch, fast_exp=False
    )
    assert out.token_ids == mlx_lm_greedy(model, tok, msgs, n, max_tokens)
    assert out.generated_tokens == sum(len(s) for p in out.token_ids for s in p) > 0
    assert all(len(s) == max_tokens or f for p, fs in zip(out.token_ids, out.finished) for s, f in zip(p, fs))
    # the K copies of a prompt, the duplicated prompt and the shared system turn are prefilled once
    assert out.prompt_tokens < sum(len(encode_prompt(tok, m)) for m in msgs)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    kw = dict(n_samples=4, temperature=1.0, max_tokens=10, batch_size=6)  # batch < sequences: refills
    a = generate(model, tok, prompts(), seed=3, **kw)
    b = generate(model, tok, prompts(), seed=3, **kw)
    c = generate(model, tok, prompts(), seed=4, **kw)
    top_p = generate(model, tok, prompts(), seed=3, top_p=0.5, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids and a.token_ids != top_p.token_ids
    assert [len(s) for s in a.token_ids] == [4] * len(QUESTIONS)


def test_one_token_prompts_and_no_prompts(tiny):
    model, tok = tiny

    class OneToken:  # a chat template that renders every prompt as a single token
        def __getattr__(self, name):
            return getattr(tok, name)

        def apply_chat_template(self, messages, **kwargs):
            return [5 + len(messages[-1]["content"]) % 7]

    out = generate(model, OneToken(), prompts(), n_samples=2, max_tokens=5, batch_size=4)
    assert out.prompt_tokens == 0 and out.generated_tokens > 0
    assert generate(model, tok, [], n_samples=3).token_ids == []


def test_prefill_caches_equal_a_whole_prompt_forward(tiny):
    model, tok = tiny
    distinct = list(dict.fromkeys(tuple(encode_prompt(tok, p)) for p in prompts()))
    prefill = SharedPrefill(model, distinct)
    P = prefill.prefix_len
    assert P > 5  # the system turn is shared
    chunk = prefill.chunk(distinct)  # left-padded middles on the prefix's keys/values
    for fast in (False, True):
        with fast_exp_ops(model) if fast else nullcontext():
            fast_chunk = prefill.chunk(distinct)
        for j, ids in enumerate(distinct):
            ref = make_prompt_cache(model)
            model(mx.array([list(ids[:-1])]), cache=ref)
            n = len(ids) - 1
            for layer, want in enumerate(ref):
                for got, kind in ((chunk.keys, "keys"), (chunk.values, "values")):
                    if fast:
                        got = fast_chunk.keys if kind == "keys" else fast_chunk.values
                    prefix = (prefill.prefix_keys if kind == "keys" else prefill.prefix_values)[layer]
                    whole = mx.concatenate([prefix, got[layer][j : j + 1, :, chunk.width - (n - P) :, :]], axis=2)
                    assert mx.allclose(whole, getattr(want, kind)[..., :n, :], atol=1e-4 if fast else 1e-5).item()


def test_models_without_a_plain_kv_cache_use_mlx_lm_batching(tiny, monkeypatch):
    from dpoflow.modeling import generation

    model, tok = tiny
    monkeypatch.setattr(generation.SharedPrefill, "supported", staticmethod(lambda m: False))
    out = generation.generate(model, tok, prompts(), n_samples=2, temperature=0.0, max_tokens=8, batch_size=4)
    assert out.token_ids == mlx_lm_greedy(model, tok, prompts(), 2, 8)


def test_poly_exp_matches_exp():
    x = mx.linspace(-87, 87, 200_001)
    rel = mx.abs(poly_exp(x) - mx.exp(x)) / mx.exp(x)
    assert rel.max().item() < 2e-5
    # masked scores and deep underflow give exactly 0, never a subnormal (slow on x86), inf or nan
    assert poly_exp(mx.array([-1e30, -200.0, -88.0])).tolist() == [0.0, 0.0, 0.0]
    assert poly_exp(mx.array([-87.0])).item() == pytest.approx(math.exp(-87.0), rel=2e-5)
    deep = poly_exp(mx.linspace(-100, -80, 20_001))
    assert ((deep == 0) | (deep >= 2.0**-126)).all().item()
    assert poly_exp(mx.array([0.5], dtype=mx.bfloat16)).dtype == mx.bfloat16


def test_fast_exp_ops_stay_within_float32_noise_and_restore_the_model_module(tiny):
    import mlx_lm.models.llama as llama

    model, tok = tiny
    stock = (llama.swiglu, llama.scaled_dot_product_attention)
    ids = mx.array([encode_prompt(tok, m) for m in prompts()[:1]])

    def prefill_then_decode():
        cache = make_prompt_cache(model)
        first = model(ids, cache=cache)
        return first, model(mx.array([[7]]), cache=cache)  # the decode step takes the one-token attention path

    want = prefill_then_decode()
    with fast_exp_ops(model):
        assert llama.swiglu is not stock[0] and llama.scaled_dot_product_attention is not stock[1]
        got = prefill_then_decode()
    for g, w in zip(got, want):
        assert mx.abs(g - w).max().item() < 1e-3 * mx.abs(w).max().item()
    assert (llama.swiglu, llama.scaled_dot_product_attention) == stock
    with pytest.raises(RuntimeError), fast_exp_ops(model):
        raise RuntimeError("restored on errors too")
    assert (llama.swiglu, llama.scaled_dot_product_attention) == stock


def test_fast_sampler_draws_the_softmax_distribution():
    mx.random.seed(0)
    logits = mx.array([[2.0, 1.0, 0.0, -1.0, -30.0]] * 40_000)
    for temperature in (0.7, 1.3):
        drawn = np.array(fast_categorical_sampler(temperature)(logits))
        want = np.array(mx.softmax(logits[0] / temperature))
        freq = np.bincount(drawn, minlength=5) / len(drawn)
        assert np.abs(freq - want).max() < 0.01  # 40k draws: standard error <= 0.0025
        assert drawn.max() <= 4 and freq[4] == 0


def test_fast_exp_is_the_cpu_default_and_changes_only_float_noise(tiny):
    model, tok = tiny
    kw = dict(n_samples=2, max_tokens=10, batch_size=6)
    sampled = {
        f: generate(model, tok, prompts(), temperature=1.0, seed=5, fast_exp=f, **kw).token_ids
        for f in (None, True, False)
    }
    assert sampled[True] != sampled[False]
    assert sampled[None] == sampled[mx.default_device().type == mx.cpu]  # on by default on the CPU only
    greedy = [generate(model, tok, prompts(), temperature=0.0, fast_exp=f, **kw).token_ids for f in (True, False)]
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_decode_lanes_give_mlx_lm_greedy_output(tiny, monkeypatch, lanes):
    model, tok = tiny
    monkeypatch.setattr(generation, "LANES", lanes)  # rows split over lanes on their own streams
    out = generate(model, tok, prompts(), n_samples=3, temperature=0.0, max_tokens=12, batch_size=9, fast_exp=False)
    assert out.token_ids == mlx_lm_greedy(model, tok, prompts(), 3, 12)


def test_a_process_that_decoded_in_lanes_exits_cleanly(tiny_model_dir):
    """Each lane thread destroys its MLX stream before it ends: one left behind aborted the interpreter at exit
    ("terminate called without an active exception", rc 134) in about half of such runs."""
    code = (
        "from dpoflow.modeling import generation\n"
        "from dpoflow.modeling.loading import load_model\n"
        "generation.LANES = 2\n"
        f"model, tok = load_model({str(tiny_model_dir)!r})\n"
        "prompts = [[{'role': 'user', 'content': f'Is {i} odd?'}] for i in range(24)]\n"
        "generation.generate(model, tok, prompts, max_tokens=6, batch_size=24)\n"
    )
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-400:]


def test_samples_do_not_depend_on_batch_size_or_lanes(tiny, monkeypatch):
    """Per-sequence uniforms: the batch, the lanes and the scheduling order do not change a sequence's samples."""
    model, tok = tiny
    kw = dict(n_samples=3, temperature=1.0, max_tokens=10, seed=7)
    runs = []
    for lanes, batch in ((1, 5), (1, 24), (2, 10), (3, 24)):
        monkeypatch.setattr(generation, "LANES", lanes)
        runs.append(generate(model, tok, prompts(), batch_size=batch, **kw).token_ids)
    assert all(r == runs[0] for r in runs[1:])
    assert runs[0] != generate(model, tok, prompts(), batch_size=5, **{**kw, "seed": 8}).token_ids


def test_sequence_uniforms_are_uniform_and_keyed_by_seed_sequence_and_step():
    seqs, steps = np.repeat(np.arange(5000), 16), np.tile(np.arange(16), 5000)
    u = sequence_uniforms(3, seqs, steps)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert np.abs(np.histogram(u, bins=20, range=(0, 1))[0] / len(u) - 0.05).max() < 0.005
    assert np.array_equal(u, sequence_uniforms(3, seqs, steps))  # a pure function of (seed, sequence, step)
    assert np.array_equal(u[17:18], sequence_uniforms(3, [1], [1]))
    other = [
        sequence_uniforms(4, seqs, steps),
        sequence_uniforms(3, seqs + 1, steps),
        sequence_uniforms(3, seqs, steps + 1),
    ]
    assert all(np.mean(o == u) < 0.001 for o in other)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02


def test_inverse_cdf_sample_matches_a_plain_inverse_cdf():
    """The two-level search finds the same token as one cumulative sum over the whole vocabulary (V not a multiple
    of the block: padded)."""
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(64, 1000)).astype(np.float32) * 3)
    u = mx.array(rng.uniform(size=64).astype(np.float32))
    got = np.array(inverse_cdf_sample(logits, u, 0.8))
    w = np.array(poly_exp((logits - logits.max(-1, keepdims=True)) * (1 / 0.8)), dtype=np.float64)
    cdf = np.cumsum(w, axis=-1)
    want = (cdf <= np.array(u)[:, None] * cdf[:, -1:]).sum(-1)
    assert (got == want).mean() > 0.95 and np.abs(got - want).max() <= 1  # float32 block sums vs float64: ties
    assert got.max() < 1000 and got.min() >= 0


def ulps(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_mlx_exp_is_mx_exp_within_one_ulp():
    x = mx.linspace(-100, 100, 400_001)
    assert ulps(mlx_exp(x), mx.exp(x)).max() <= 1
    assert mlx_exp(mx.array([0.0, 88.5, -88.5, float("nan")])).tolist()[:3] == [1.0, math.inf, 0.0]
    assert math.isnan(mlx_exp(mx.array([float("nan")])).item())
    g, y = mx.random.normal((64, 300)) * 6, mx.random.normal((64, 300))
    from mlx_lm.models.activations import swiglu

    assert ulps(_mlx_swiglu(g, y), swiglu(g, y)).max() <= 8
    logits = mx.random.normal((16, 5000)) * 5
    assert ulps(mlx_logsumexp(logits), mx.logsumexp(logits, axis=-1)).max() <= 2


def test_mlx_exp_ops_give_the_stock_forward_within_float32_rounding(tiny):
    import mlx_lm.models.llama as llama

    model, tok = tiny
    stock = (llama.swiglu, llama.scaled_dot_product_attention)
    ids = mx.array([encode_prompt(tok, m)[:20] for m in prompts()[:2]])
    want = model(ids)
    with mlx_exp_ops(model):
        got = model(ids)
    assert (llama.swiglu, llama.scaled_dot_product_attention) == stock
    assert mx.abs(got - want).max().item() < 1e-5 * mx.abs(want).max().item()


def test_trainable_ops_have_the_stock_gradients():
    from mlx_lm.models.activations import swiglu

    g, x, w = mx.random.normal((8, 40)) * 4, mx.random.normal((8, 40)), mx.random.normal((8, 40))
    got = mx.grad(lambda a, b: (trainable_swiglu(a, b) * w).sum(), argnums=(0, 1))(g, x)
    want = mx.grad(lambda a, b: (swiglu(a, b) * w).sum(), argnums=(0, 1))(g, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    logits = mx.random.normal((6, 300)) * 5
    got = mx.grad(lambda z: (trainable_logsumexp(z) * mx.arange(6)).sum())(logits)
    want = mx.grad(lambda z: (mx.logsumexp(z, axis=-1) * mx.arange(6)).sum())(logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    assert ulps(trainable_logsumexp(logits), mx.logsumexp(logits, axis=-1)).max() <= 2
