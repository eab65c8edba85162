"""Intervals wherever a gate reads a sample (issue 22): greedy accuracy and reward-model accuracy (Wilson, ties
half), the KL's bootstrap over prompts, the held-out gap's bootstrap over pairs, the win rate's sign test. The pure
helpers run on simulated data; the measurements on the tiny model (fast)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dpoflow.core.batching import encode_pair
from dpoflow.core.batching import pad_id as pad_id_of
from dpoflow.core.losses import heldout_preference_gap, preference_stats
from dpoflow.data import tasks
from dpoflow.data.pairs import make_pair
from dpoflow.eval.intervals import (
    heldout_gap_metrics,
    kl_metrics,
    mean_metrics,
    pair_accuracy_metrics,
    proportion_metrics,
)
from dpoflow.eval.measure import Probe, greedy_accuracy, heldout_metrics, measure_kl, measure_policy
from dpoflow.eval.statistics import bootstrap_ratio_interval, wilson_interval
from dpoflow.eval.win_rate import win_rate
from dpoflow.modeling.loading import load_model
from dpoflow.modeling.policy import build_policy
from dpoflow.modeling.reference import compute_ref_logps

SYSTEM = "Reply with only the final answer."
PROMPTS = [tasks.make_prompt(f"What is {a} + {2 * a}?", SYSTEM) for a in range(6)]
HELDOUT = [make_pair(tasks.make_prompt(f"What is {a} + 1?", SYSTEM), str(a + 1), str(a + 2)) for a in range(10)]


# ------------------------------------------------------------------------------------------------ pure helpers


def test_proportion_and_pair_accuracy_metrics():
    out = proportion_metrics("val_accuracy", 39, 50, 0.95)
    assert out["val_accuracy"] == 0.78 and out["val_accuracy_n"] == 50
    assert (out["val_accuracy_ci_low"], out["val_accuracy_ci_high"]) == wilson_interval(39, 50, 0.95)
    assert proportion_metrics("a", 0, 0)["a"] is None
    chosen = np.array([1.0, 2.0, 0.5, 0.3, 4.0])
    rejected = np.array([0.0, 2.0, 0.7, 0.1, 1.0])  # 3 wins, 1 tie, 1 loss
    acc = pair_accuracy_metrics(chosen, rejected, 0.9)
    assert acc["val_accuracy"] == pytest.approx(preference_stats(chosen, rejected)["accuracy"]) == 0.7
    assert acc["val_accuracy_ties"] == 1 and acc["val_accuracy_n"] == 5
    assert (acc["val_accuracy_ci_low"], acc["val_accuracy_ci_high"]) == wilson_interval(3.5, 5, 0.9)
    with pytest.raises(ValueError):
        pair_accuracy_metrics([1.0], [1.0, 2.0])


def test_heldout_gap_metrics_bootstrap_over_pairs():
    margins = np.random.default_rng(0).normal(0.8, 1.5, 300)
    out = heldout_gap_metrics(margins, 0.95, 1000, seed=4)
    assert out["heldout_gap"] == pytest.approx(heldout_preference_gap(margins), abs=1e-12)
    assert out["heldout_gap_ci_low"] < out["heldout_gap"] < out["heldout_gap_ci_high"] and out["heldout_gap_n"] == 300
    assert heldout_gap_metrics(margins, 0.95, 1000, seed=4) == out  # seeded
    assert heldout_gap_metrics(margins, 0.8, 1000, seed=4)["heldout_gap_ci_low"] > out["heldout_gap_ci_low"]
    assert mean_metrics("x", [])["x"] is None


def test_kl_bootstrap_resamples_prompts_and_covers_the_truth():
    """Simulated prompts whose samples share a prompt effect: the interval of the per-token mean over prompts (a
    prompt's samples together) covers the truth at about the nominal rate, while treating samples as independent
    would be too narrow."""
    truth, hits, widths = 0.05, 0, []
    for seed in range(150):
        rng = np.random.default_rng(60_000 + seed)
        prompt_kl = rng.gamma(2.0, truth / 2.0, 32)  # per-token KL of each prompt, mean 0.05
        prompt = np.repeat(np.arange(32), 4)  # 4 samples per prompt
        tokens = rng.integers(5, 25, prompt.size)
        per_token = prompt_kl[prompt] * rng.uniform(0.9, 1.1, prompt.size)
        out = kl_metrics(per_token * tokens, tokens, prompt, 0.95, 400, seed)
        hits += out["kl_ci_low"] <= truth <= out["kl_ci_high"]
        widths.append(out["kl_ci_high"] - out["kl_ci_low"])
        assert out["kl_n"] == 32 and out["kl_sequences"] == 128
        assert out["kl"] == pytest.approx((per_token * tokens).sum() / tokens.sum())
        if seed == 0:  # sequences as if independent: a narrower, wrong interval
            naive = bootstrap_ratio_interval(per_token * tokens, tokens, 0.95, 400, seed)
            assert naive[1] - naive[0] < 0.8 * widths[0]
    assert 0.88 <= hits / 150 <= 0.99


def test_win_rate_carries_the_exact_sign_test():
    out = win_rate([1.0] * 9 + [0.0] + [0.5] * 5, 500, seed=1)
    assert out["sign_test_p"] == 0.021484375 and out["p_greater"] == 11 / 1024  # ties dropped: 9 vs 1
    assert win_rate([], 500)["sign_test_p"] == 1.0
    assert win_rate([0.5] * 4, 500)["p_greater"] == 1.0


# ------------------------------------------------------------------------------------------------ measurements


@pytest.fixture(scope="module")
def moved_policy(tiny_model_dir):
    """A LoRA policy whose adapters moved it off the reference (non-zero KL and margins)."""
    policy = build_policy(tiny_model_dir, "lora", lora_rank=4, lora_layers=2, seed=0)
    with policy.as_reference() as reference:
        ref = compute_ref_logps(reference, policy.tokenizer, HELDOUT, 64, 16)
    for i, (_, module) in enumerate(m for m in policy.model.named_modules() if "lora_b" in m[1]):
        module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=mx.random.key(1 + i))
    mx.eval(policy.model.parameters())
    return policy, ref


def test_measure_kl_with_confidence_returns_per_sequence_kl_and_a_prompt_interval(moved_policy):
    policy, _ = moved_policy
    plain = measure_kl(policy.model, policy.tokenizer, PROMPTS, None, seed=3, n_samples=2, max_tokens=8)
    out = measure_kl(policy.model, policy.tokenizer, PROMPTS, None, 3, 2, 8, confidence=0.95, bootstrap_samples=500)
    assert {k: out[k] for k in plain} == plain  # same point values
    seqs, tokens = np.array(out["kl_per_sequence"]), np.array(out["tokens_per_sequence"])
    assert out["kl"] == pytest.approx(seqs.sum() / tokens.sum(), rel=1e-12) and tokens.sum() == out["n_tokens"]
    assert out["kl_seq"] == pytest.approx(seqs.mean(), rel=1e-12)
    assert set(out["prompt_of_sequence"]) <= set(range(len(PROMPTS))) and out["kl_n"] <= len(PROMPTS)
    assert 0 <= out["kl_ci_low"] <= out["kl"] <= out["kl_ci_high"]
    again = measure_kl(policy.model, policy.tokenizer, PROMPTS, None, 3, 2, 8, confidence=0.95, bootstrap_samples=500)
    assert again == out  # seeded end to end


def test_heldout_metrics_and_measure_policy_with_confidence(moved_policy):
    policy, ref = moved_policy
    pad = pad_id_of(policy.tokenizer)
    encoded = [encode_pair(policy.tokenizer, row, 64) for row in HELDOUT]
    plain = heldout_metrics(policy.model, encoded, ref, 0.1, False, pad, 8)
    out = heldout_metrics(policy.model, encoded, ref, 0.1, False, pad, 8, confidence=0.95, seed=2)
    assert {k: out[k] for k in plain} == plain
    assert out["heldout_gap_ci_low"] <= out["heldout_gap"] <= out["heldout_gap_ci_high"]
    assert out["heldout_gap_n"] == out["heldout_accuracy_n"] == len(HELDOUT)
    assert out["heldout_accuracy_ci_low"] <= out["heldout_accuracy"] <= out["heldout_accuracy_ci_high"]
    probe = Probe(PROMPTS, 1, 8, 3, encoded, ref, 0.1, False, 8)
    metrics, _ = measure_policy(policy.model, policy.tokenizer, probe, None, confidence=0.9, bootstrap_samples=300)
    base, _ = measure_policy(policy.model, policy.tokenizer, probe, None)
    assert {k: metrics[k] for k in base} == base  # the intervals add keys, change nothing
    for key in ("kl", "heldout_gap", "heldout_accuracy"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    assert metrics["kl_n"] == len(PROMPTS) and metrics["heldout_gap_n"] == len(HELDOUT)


def test_greedy_accuracy_reports_n_and_a_wilson_interval(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    items = tasks.build_splits(sizes={"heldout": 6}, seed=0)["heldout"]
    out = greedy_accuracy(model, tokenizer, items, SYSTEM, max_tokens=4, confidence=0.9)
    assert out["n"] == out["accuracy_n"] == 6 and out["accuracy"] == out["correct"] / 6
    assert (out["accuracy_ci_low"], out["accuracy_ci_high"]) == wilson_interval(out["correct"], 6, 0.9)
