"""Measuring a policy: the one KL, the held-out preference gap, greedy task accuracy.

Every stage that measures a policy (Stage 3's initial KL, Stage 5's KL checks, Stage 6's rounds, Stage 7) uses
these with one `Probe` (the same held-out prompts, seed and sample count, the same held-out pairs and their cached
reference log-probs), so the numbers compare across stages.

KL (the one definition, dpoflow.core.kl): exact mean per-token KL(policy || reference) over the full vocabulary, at
every position of completions SAMPLED FROM THE POLICY (temperature 1.0) on the held-out prompts (`measure_kl`).
Held-out gap: mean_i (2 sigma(m_i) - 1) over held-out pairs, m_i the beta-scaled implicit reward margin against
the cached reference log-probs (core.losses.heldout_preference_gap).

Intervals (dpoflow.eval.intervals), when a `confidence` is passed: greedy accuracy always carries its Wilson interval
(accuracy_ci_low / accuracy_ci_high / accuracy_n); measure_kl, heldout_metrics and measure_policy add
<name>_ci_low / <name>_ci_high / <name>_n for the KL (bootstrap over prompts: a prompt's samples together), the
held-out gap (bootstrap over pairs) and the held-out accuracy (Wilson), seeded by the probe's seed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow.core.batching import (
    ChosenRejected,
    EncodedPair,
    SeqBatch,
    collate_pairs,
    collate_sequences,
    encode_pair,
    encode_prompt,
    pad_id,
    split_pairs,
)
from dpoflow.core.kl import policy_reference_kl
from dpoflow.core.logprobs import completion_logprobs, full_logits_at
from dpoflow.core.losses import (
    heldout_preference_gap,
    length_normalized,
    preference_stats,
)
from dpoflow.data import tasks
from dpoflow.data.prompts import is_task_item, prompt_of, verify
from dpoflow.eval.intervals import heldout_gap_metrics, kl_metrics, pair_accuracy_metrics, proportion_metrics
from dpoflow.eval.significance import CONFIDENCE
from dpoflow.eval.statistics import SAMPLES
from dpoflow.modeling import lora
from dpoflow.modeling.generation import DECODE_BATCH, generate
from dpoflow.modeling.reference import forward_supported, pair_forward
from dpoflow.runtime.params import Params

KL_TEMPERATURE = 1.0
ACCURACY_MAX_TOKENS = 16


def kl_prompt_messages(items: Sequence[Mapping[str, Any]], n: int, system_prompt: str | None) -> list[list[dict]]:
    """The KL prompts: chat messages of the first `n` held-out task items (`init.kl_prompts`)."""
    if len(items) < n:
        raise ValueError(f"need {n} held-out items for the KL prompts (init.kl_prompts), got {len(items)}")
    return [prompt_of(item, system_prompt) for item in items[:n]]


def sample_completions(
    policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    seed: int,
    n_samples: int,
    max_tokens: int,
    batch_size: int = DECODE_BATCH,
) -> SeqBatch:
    """Sample `n_samples` completions per prompt from the policy at temperature 1.0 (seeded) as a SeqBatch whose
    loss_mask marks every sampled position (the eos too when the sample stopped there).

    Sampling reseeds MLX's global random state, and mlx 0.32 cannot restore a saved one; afterwards the global
    state is reseeded from what it was before, so the caller's random stream stays a function of its own history.
    """
    return _sample_rows(policy, tokenizer, prompts, seed, n_samples, max_tokens, batch_size)[0]


def _sample_rows(
    policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    seed: int,
    n_samples: int,
    max_tokens: int,
    batch_size: int,
) -> tuple[SeqBatch, list[int]]:
    """sample_completions' batch and, per row, the index of its prompt (empty completions are dropped)."""
    before = np.asarray(mx.random.state[0]).astype(np.uint64)
    try:
        gens = generate(
            policy,
            tokenizer,
            [list(p) for p in prompts],
            n_samples=n_samples,
            temperature=KL_TEMPERATURE,
            max_tokens=max_tokens,
            seed=seed,
            batch_size=batch_size,
            desc="kl samples",
        )
    finally:
        mx.random.seed(int((before[0] << np.uint64(32)) | before[1]) % (2**63))
    eos = int(tokenizer.eos_token_id)
    prompt_rows, completion_rows, prompt_of_row = [], [], []
    for index, (messages, samples, finished) in enumerate(zip(prompts, gens.token_ids, gens.finished)):
        prompt_ids = encode_prompt(tokenizer, messages)
        for ids, done in zip(samples, finished):
            completion = list(ids) + ([eos] if done else [])
            if completion:
                prompt_rows.append(prompt_ids)
                completion_rows.append(completion)
                prompt_of_row.append(index)
    if not completion_rows:
        raise ValueError("the policy produced no completion tokens for the KL prompts")
    return collate_sequences(prompt_rows, completion_rows, pad_id(tokenizer)), prompt_of_row


def measure_kl(
    policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    reference: nn.Module | None,
    seed: int,
    n_samples: int,
    max_tokens: int,
    batch_size: int = DECODE_BATCH,
    *,
    confidence: float | None = None,
    bootstrap_samples: int = SAMPLES,
) -> dict:
    """KL(policy || reference), the one definition (module docstring), on policy samples of `prompts`.

    `reference` is the reference model, or None meaning "the policy's own LoRA adapters disabled".
    Returns {"kl": mean per-token KL, "kl_seq": mean per-sequence KL, "k3": Schulman's k3 estimate,
    "n_tokens": completion tokens measured}. With a `confidence`, also "kl_ci_low", "kl_ci_high" (percentile
    bootstrap over prompts, `bootstrap_samples` resamples seeded by `seed`: intervals.kl_metrics), "kl_n" (prompts),
    "kl_sequences", and the lists "kl_per_sequence", "tokens_per_sequence", "prompt_of_sequence" (one entry per
    sampled sequence, prompt = index into `prompts`).
    """
    if reference is None and not lora.has_lora(policy):
        raise ValueError(
            "reference=None means 'the policy with its LoRA adapters disabled', "
            "but the policy has no LoRA adapters: pass the reference model"
        )
    batch, prompt_of_row = _sample_rows(policy, tokenizer, prompts, seed, n_samples, max_tokens, batch_size)

    def adapters_off_logits(sub: SeqBatch) -> mx.array:
        with lora.lora_disabled(policy):
            logits = full_logits_at(policy, sub)
            mx.eval(logits)
        return logits

    ref = reference if reference is not None else adapters_off_logits
    out = policy_reference_kl(policy, ref, batch, per_sequence=confidence is not None)
    kl = {"kl": out["kl_mean_per_token"], "kl_seq": out["kl_seq_mean"], "k3": out["k3"], "n_tokens": out["n_tokens"]}
    if confidence is None:
        return kl
    seqs, tokens = out["kl_per_sequence"], out["tokens_per_sequence"]
    bounds = kl_metrics(seqs, tokens, prompt_of_row, confidence, bootstrap_samples, seed)
    return {
        **kl,
        **{k: v for k, v in bounds.items() if k != "kl"},
        "kl_per_sequence": seqs,
        "tokens_per_sequence": tokens,
        "prompt_of_sequence": prompt_of_row,
    }


def implicit_rewards(
    model: nn.Module,
    encoded: Sequence[EncodedPair],
    ref_logps: ChosenRejected,
    beta: float,
    length_normalize: bool,
    pad: int,
    batch_size: int,
) -> ChosenRejected:
    """Implicit rewards beta * (log pi - log ref) [N] float64 of the policy against the cached reference, for the
    chosen and the rejected responses, as in the training loss (length-normalized when it is). Llama-type models:
    one forward-only pass over all pairs (modeling.reference.forward_completions: same numbers within float32
    rounding); others: `batch_size` pairs per forward."""
    n = len(encoded)
    chosen, rejected = np.zeros(n), np.zeros(n)
    if n and forward_supported(model):
        out = pair_forward(model, encoded)
        batches = [
            (np.arange(n), split_pairs(mx.array(out.logps), n), split_pairs(mx.array(out.n_tokens, mx.float32), n))
        ]
    else:
        order = np.argsort([-e.max_length for e in encoded], kind="stable")
        batches = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            sums, n_tokens = completion_logprobs(model, collate_pairs([encoded[i] for i in idx], pad))
            batches.append((idx, split_pairs(mx.stop_gradient(sums), len(idx)), split_pairs(n_tokens, len(idx))))
    for idx, policy, counts in batches:
        reference = ChosenRejected(
            mx.array(np.asarray(ref_logps.chosen, dtype=np.float32)[idx]),
            mx.array(np.asarray(ref_logps.rejected, dtype=np.float32)[idx]),
        )
        if length_normalize:
            policy, reference = length_normalized(policy, counts), length_normalized(reference, counts)
        c, r = beta * (policy.chosen - reference.chosen), beta * (policy.rejected - reference.rejected)
        mx.eval(c, r)
        chosen[idx], rejected[idx] = np.asarray(c, dtype=np.float64), np.asarray(r, dtype=np.float64)
    return ChosenRejected(chosen, rejected)


def heldout_metrics(
    model: nn.Module,
    encoded: Sequence[EncodedPair],
    ref_logps: ChosenRejected,
    beta: float,
    length_normalize: bool,
    pad: int,
    batch_size: int,
    *,
    confidence: float | None = None,
    bootstrap_samples: int = SAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out preference gap mean_i (2 sigma(m_i) - 1), accuracy (ties count 1/2) and mean margin m_i.

    With a `confidence`: heldout_gap_ci_low / _ci_high / _n (percentile bootstrap over pairs of tanh(m_i / 2),
    `bootstrap_samples` resamples seeded by `seed`) and heldout_accuracy_ci_low / _ci_high / _n (Wilson)."""
    chosen, rejected = implicit_rewards(model, encoded, ref_logps, beta, length_normalize, pad, batch_size)
    stats = preference_stats(chosen, rejected)
    out = {
        "heldout_gap": heldout_preference_gap(chosen - rejected),
        "heldout_accuracy": stats["accuracy"],
        "heldout_margin": stats["margin_mean"],
    }
    if confidence is None:
        return out
    gap = heldout_gap_metrics(chosen - rejected, confidence, bootstrap_samples, seed)
    acc = pair_accuracy_metrics(chosen, rejected, confidence, name="heldout_accuracy")
    extra = {k: v for k, v in {**gap, **acc}.items() if k not in out and k != "heldout_accuracy_ties"}
    return {**out, **extra}


def greedy_accuracy(
    model,
    tokenizer,
    items: Sequence[dict],
    system_prompt: str,
    max_tokens: int = 16,
    batch_size: int = DECODE_BATCH,
    desc: str = "accuracy",
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """Fraction of items whose greedy answer the task checker scores 1.0 (and the mean score), with its Wilson
    interval at `confidence`: accuracy_ci_low, accuracy_ci_high, accuracy_n (= n, the items scored) and correct."""
    prompts = [  # an embedded item is asked as Stage 1 validates (numeric instruction); a user's row as it is
        tasks.make_prompt(item["question"], system_prompt) if is_task_item(item) else prompt_of(item, system_prompt)
        for item in items
    ]
    gens = generate(
        model, tokenizer, prompts, n_samples=1, temperature=0.0, max_tokens=max_tokens, batch_size=batch_size, desc=desc
    )
    scores = [verify(item, texts[0]) for item, texts in zip(items, gens.texts)]
    correct = sum(s >= 1.0 for s in scores)
    return {
        "accuracy": float(np.mean([s >= 1.0 for s in scores])),
        "mean_score": float(np.mean(scores)),
        "tokens_per_sec": gens.tokens_per_sec,
        "n": len(scores),
        "correct": int(correct),
        **{
            k: v for k, v in proportion_metrics("accuracy", correct, len(scores), confidence).items() if k != "accuracy"
        },
    }


@dataclass(frozen=True)
class Probe:
    """What every measurement of a policy uses, the same at every stage so that the numbers compare."""

    kl_prompts: Sequence[Sequence[Mapping[str, str]]]  # held-out prompts (init.kl_prompts of them)
    kl_samples: int
    kl_max_tokens: int
    seed: int
    heldout: Sequence[EncodedPair]  # held-out pairs, tokenized as in training
    heldout_ref_logps: ChosenRejected  # their cached reference log-probs (Stage 3)
    beta: float
    length_normalize: bool
    batch_size: int  # pairs per held-out forward
    accuracy_items: Sequence[Mapping[str, Any]] = ()  # task items for greedy accuracy (verifier data only)
    system_prompt: str | None = None
    confidence: float | None = None  # intervals of every measurement (gates.confidence); None = points only


def measure_policy(
    model: nn.Module,
    tokenizer: Any,
    probe: Probe,
    reference: nn.Module | None,
    *,
    accuracy: bool = False,
    label: str = "policy",
    confidence: float | None = None,
    bootstrap_samples: int = SAMPLES,
) -> tuple[dict, dict]:
    """(metrics, timings) of a policy against `reference` (None = the policy with its LoRA adapters disabled):
    kl, kl_seq, k3, kl_n_tokens; heldout_gap, heldout_accuracy, heldout_margin (None without held-out pairs); and
    with `accuracy`, task_accuracy on probe.accuracy_items (None without items).

    With a `confidence` (evaluate.confidence), also the intervals, seeded by probe.seed: kl_ci_low, kl_ci_high, kl_n
    (prompts); heldout_gap_ci_low, heldout_gap_ci_high, heldout_gap_n and heldout_accuracy_ci_low,
    heldout_accuracy_ci_high, heldout_accuracy_n (pairs); with `accuracy`, task_accuracy_ci_low,
    task_accuracy_ci_high, task_accuracy_n (items). The point values are the same with or without it. Default: the
    probe's confidence."""
    confidence = probe.confidence if confidence is None else confidence
    t0 = time.perf_counter()
    kl = measure_kl(
        model,
        tokenizer,
        probe.kl_prompts,
        reference,
        probe.seed,
        probe.kl_samples,
        probe.kl_max_tokens,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
    )
    t1 = time.perf_counter()
    if probe.heldout:
        held = heldout_metrics(
            model,
            probe.heldout,
            probe.heldout_ref_logps,
            probe.beta,
            probe.length_normalize,
            pad_id(tokenizer),
            probe.batch_size,
            confidence=confidence,
            bootstrap_samples=bootstrap_samples,
            seed=probe.seed,
        )
    else:
        held = {"heldout_gap": None, "heldout_accuracy": None, "heldout_margin": None}
        if confidence is not None:
            held |= {f"{m}_{k}": None for m in ("heldout_gap", "heldout_accuracy") for k in ("ci_low", "ci_high")}
            held |= {"heldout_gap_n": 0, "heldout_accuracy_n": 0}
    t2 = time.perf_counter()
    metrics = {"kl": kl["kl"], "kl_seq": kl["kl_seq"], "k3": kl["k3"], "kl_n_tokens": kl["n_tokens"], **held}
    if confidence is not None:
        metrics |= {k: kl[k] for k in ("kl_ci_low", "kl_ci_high", "kl_n")}
    timings = {"kl_seconds": t1 - t0, "heldout_seconds": t2 - t1}
    if accuracy:
        acc = (
            greedy_accuracy(
                model,
                tokenizer,
                list(probe.accuracy_items),
                probe.system_prompt,
                max_tokens=ACCURACY_MAX_TOKENS,
                desc=f"accuracy {label}",
                confidence=CONFIDENCE if confidence is None else confidence,
            )
            if probe.accuracy_items
            else {"accuracy": None, "accuracy_ci_low": None, "accuracy_ci_high": None, "accuracy_n": 0}
        )
        metrics["task_accuracy"] = acc["accuracy"]
        if confidence is not None:
            metrics |= {f"task_{k}": acc[k] for k in ("accuracy_ci_low", "accuracy_ci_high", "accuracy_n")}
        timings["accuracy_seconds"] = time.perf_counter() - t2
    return metrics, timings


def make_probe(
    p: Params,
    tokenizer: Any,
    kl_prompts: Sequence[Sequence[Mapping[str, str]]],
    heldout_pairs: Sequence[Mapping[str, Any]],
    heldout_ref_logps: ChosenRejected,
    batch_size: int,
    accuracy_items: Sequence[Mapping[str, Any]] = (),
) -> Probe:
    """The probe every stage measures with: init.kl_* settings, the held-out pairs tokenized as in training
    (preference.max_seq_len), the DPO beta, 2 x the training batch per held-out forward."""
    return Probe(
        kl_prompts=kl_prompts,
        kl_samples=p.init.kl_samples,
        kl_max_tokens=p.init.kl_max_tokens,
        seed=p.seed,
        heldout=[encode_pair(tokenizer, row, p.preference.max_seq_len) for row in heldout_pairs],
        heldout_ref_logps=heldout_ref_logps,
        beta=p.dpo.beta,
        length_normalize=p.dpo.length_normalize,
        batch_size=2 * batch_size,
        accuracy_items=accuracy_items,
        system_prompt=p.data.system_prompt or None,
        confidence=p.gates.confidence,
    )
