"""Intervals for the numbers a gate reads from a sample, as flat metric keys a stage merges into its metrics file.

Every helper returns {name: estimate, f"{name}_ci_low", f"{name}_ci_high", f"{name}_n"} (plus a few named extras),
two-sided at `confidence` (the stage passes evaluate.confidence), deterministic for the same inputs and seed:

    proportion_metrics("val_accuracy", successes=39, n=50)          # Wilson: greedy accuracy, reward accuracy
    pair_accuracy_metrics(chosen_rewards, rejected_rewards)          # Wilson, ties count half
    heldout_gap_metrics(margins, seed=0)                             # bootstrap over pairs of mean tanh(m / 2)
    kl_metrics(kl_per_sequence, tokens_per_sequence, prompt_of_sequence, seed=0)   # bootstrap over prompts

A gate reads the end that protects it: the lower end for a ">=" threshold (accuracy, held-out gap, win rate,
retention), the upper end for a "<=" one (KL). Which end gates is the stage's choice; these only measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpoflow.eval.significance import CONFIDENCE
from dpoflow.eval.statistics import (
    SAMPLES,
    bootstrap_mean_interval,
    bootstrap_ratio_interval,
    wilson_interval,
)


def proportion_metrics(name: str, successes: float, n: int, confidence: float = CONFIDENCE) -> dict:
    """{name: successes / n, name_ci_low, name_ci_high (Wilson), name_n}; estimate and bounds None when n = 0.
    `successes` may count ties as half."""
    if n == 0:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None, f"{name}_n": 0}
    low, high = wilson_interval(successes, n, confidence)
    return {name: float(successes) / n, f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": int(n)}


def pair_accuracy_metrics(
    chosen: Sequence[float], rejected: Sequence[float], confidence: float = CONFIDENCE, name: str = "val_accuracy"
) -> dict:
    """Pairwise accuracy of scores (a reward model's r(chosen) vs r(rejected), or implicit rewards): a pair counts 1
    when chosen > rejected, 1/2 on an exact tie (as losses.preference_stats), with its Wilson interval over the n
    pairs; also name_ties. The estimate equals preference_stats(...)["accuracy"]."""
    c = np.asarray(chosen, dtype=np.float64).reshape(-1)
    r = np.asarray(rejected, dtype=np.float64).reshape(-1)
    if c.shape != r.shape:
        raise ValueError(f"chosen and rejected must have the same length, got {c.size} and {r.size}")
    wins, ties = int(np.count_nonzero(c > r)), int(np.count_nonzero(c == r))
    return {**proportion_metrics(name, wins + 0.5 * ties, c.size, confidence), f"{name}_ties": ties}


def mean_metrics(
    name: str, values: Sequence[float], confidence: float = CONFIDENCE, samples: int = SAMPLES, seed: int = 0
) -> dict:
    """{name: mean, name_ci_low, name_ci_high (percentile bootstrap over the items), name_n}; None without items."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None, f"{name}_n": 0}
    low, high = bootstrap_mean_interval(arr, confidence, samples, seed)
    return {name: float(arr.mean()), f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": int(arr.size)}


def heldout_gap_metrics(
    margins: Sequence[float],
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = 0,
    name: str = "heldout_gap",
) -> dict:
    """Held-out preference gap mean_i tanh(m_i / 2) (= 2 sigma(m_i) - 1, m_i the beta-scaled implicit reward
    margin of pair i) with a percentile bootstrap over pairs: core.losses.heldout_preference_gap's value."""
    terms = np.tanh(np.asarray(margins, dtype=np.float64).reshape(-1) / 2.0)
    return mean_metrics(name, terms, confidence, samples, seed)


def kl_metrics(
    kl_per_sequence: Sequence[float],
    tokens_per_sequence: Sequence[int],
    prompt_of_sequence: Sequence[int],
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = 0,
    name: str = "kl",
) -> dict:
    """Mean per-token KL (sum of every sequence's KL / all completion tokens: core.kl's kl_mean_per_token) with a
    percentile bootstrap over PROMPTS: a prompt's sampled sequences are summed (KL and tokens) and resampled
    together, since they share the prompt and are not independent. name_n = prompts, name_sequences = sequences."""
    kl = np.asarray(kl_per_sequence, dtype=np.float64).reshape(-1)
    tokens = np.asarray(tokens_per_sequence, dtype=np.float64).reshape(-1)
    prompt = np.asarray(prompt_of_sequence).reshape(-1)
    if not kl.size == tokens.size == prompt.size:
        raise ValueError(
            f"need one KL, token count and prompt per sequence, got {kl.size}, {tokens.size}, {prompt.size}"
        )
    if kl.size == 0 or tokens.sum() <= 0:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None, f"{name}_n": 0, f"{name}_sequences": 0}
    prompts, index = np.unique(prompt, return_inverse=True)
    kl_sum = np.bincount(index, weights=kl, minlength=len(prompts))
    tok_sum = np.bincount(index, weights=tokens, minlength=len(prompts))
    low, high = bootstrap_ratio_interval(kl_sum, tok_sum, confidence, samples, seed)
    return {
        name: float(kl.sum() / tokens.sum()),
        f"{name}_ci_low": low,
        f"{name}_ci_high": high,
        f"{name}_n": int(len(prompts)),
        f"{name}_sequences": int(kl.size),
    }
