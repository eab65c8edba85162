"""Stage 5: DPO. Train the Stage 3 policy on the preference pairs against the cached reference log-probs; every
dpo.kl_every steps the held-out KL and preference gap are measured (eval.measure), and a KL over dpo.kl_target lowers
the learning rate and retries from the Stage 3 policy (training.dpo)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.core.batching import ChosenRejected
from dpoflow.eval.measure import make_probe, measure_policy
from dpoflow.modeling.policy import Policy
from dpoflow.runtime.params import Params
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.dpo import DpoResult, train_dpo


def train(
    p: Params,
    policy: Policy,
    pairs: Sequence[Mapping[str, Any]],
    ref_logps: ChosenRejected,
    heldout_pairs: Sequence[Mapping[str, Any]],
    heldout_ref_logps: ChosenRejected,
    kl_prompts: Sequence[list[dict]],
    *,
    batch_size: int,
    logger: MetricLogger | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
) -> DpoResult:
    if not heldout_pairs:
        raise ValueError("heldout_pairs: no pairs (the KL check measures the held-out preference gap)")
    probe = make_probe(p, policy.tokenizer, kl_prompts, heldout_pairs, heldout_ref_logps, batch_size)
    result = train_dpo(
        policy.model,
        policy.tokenizer,
        pairs,
        ref_logps,
        p.dpo,
        batch_size=batch_size,
        seed=p.seed,
        max_len=p.preference.max_seq_len,
        logger=logger,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        measure=lambda step: measure_policy(policy.model, policy.tokenizer, probe, policy.reference)[0],
    )
    result.metrics["n_heldout_pairs"] = len(heldout_pairs)
    return result
