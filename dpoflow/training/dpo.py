"""DPO training with the KL rule (stop, lower the learning rate, retry from the initial policy): Stage 5 and every
Stage 6 round.

One training step (through dpoflow.training.trainer.train, the one loop):

    batch      = length-grouped pairs; chosen rows 0..B-1 and rejected rows B..2B-1 of ONE [2B, T] batch
    policy     = ChosenRejected(pi_c, pi_w): policy log-probs summed over completion tokens
                 (core.logprobs.completion_logprobs: the LM head runs only at completion positions)
    reference  = ChosenRejected(ref_c, ref_w): the Stage 3 cache, indexed by pair position (no reference forward)
    loss       = mean_i dpo_loss(policy, reference; beta, loss_type, label_smoothing)
                 [+ sft_weight * sft_loss(pi_c)]   [length_normalize: every log-prob divided by its token count]

Every `dpo.kl_every` steps and at the end, `measure(step)` (passed in: the held-out KL and preference gap of
dpoflow.eval.measure) runs. KL > dpo.kl_target stops the attempt (trainer.StopTraining); the policy is put back to
its initial state and trained again with learning_rate * lr_backoff, up to dpo.max_retries times. Each attempt is
recorded. Checkpoints (trainer) make a killed run resume where it stopped, including in a retry.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dpoflow.core.batching import (
    ChosenRejected,
    EncodedPair,
    PairBatch,
    collate_pairs,
    encode_pair,
    pad_id,
    split_pairs,
)
from dpoflow.core.logprobs import completion_logprobs
from dpoflow.core.losses import dpo_loss, length_normalized, sft_loss
from dpoflow.modeling.policy import reset_policy
from dpoflow.runtime import distributed, io
from dpoflow.runtime.params import DpoParams
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.trainer import (
    BatchSchedule,
    StopTraining,
    TrainConfig,
    summarize,
    train,
)

log = logging.getLogger(__name__)

# Per-step metrics (besides the trainer's grad_norm, learning_rate, tokens_per_sec, step_seconds, peak_memory_gb).
STEP_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
# Deterministic end-of-training figures (mean of the last 10 steps) for the metrics; timings go to perf.
TRAIN_STAT_KEYS = ("loss",) + STEP_KEYS + ("grad_norm",)
DISPLACEMENT_FRACTION = 0.1  # likelihood displacement: first vs last 10% of the steps
ATTEMPTS_FILE = "attempts.json"
# What an attempt's KL check records (the measurement may return more).
CHECK_KEYS = ("kl", "kl_seq", "k3", "heldout_gap", "heldout_accuracy", "heldout_margin")
INTERVAL_KEYS = tuple(f"{m}_{b}" for m in ("kl", "heldout_gap", "heldout_accuracy") for b in ("ci_low", "ci_high", "n"))

# The dpo.* params a DPO pass reads (Stage 5 and every Stage 6 round; dvc.yaml lists exactly these). lora_* and
# finetune belong to Stage 3 (the policy it initializes); max_kl and min_heldout_gap to the gates.
STAGE_KEYS = (
    "loss_type",
    "label_smoothing",
    "length_normalize",
    "sft_weight",
    "beta",
    "learning_rate",
    "grad_accumulation",
    "warmup_steps",
    "max_grad_norm",
    "max_steps",
    "checkpoint_every",
    "kl_every",
    "kl_target",
    "lr_backoff",
    "max_retries",
)

Measure = Callable[[int], Mapping[str, Any]]


@dataclass
class DpoBatch:
    pairs: PairBatch
    reference: ChosenRejected  # [B] cached reference log-prob sums of chosen and rejected

    @property
    def n_tokens(self) -> int:
        return self.pairs.n_tokens


@dataclass
class DpoResult:
    metrics: dict  # deterministic for the same inputs and seed
    perf: dict  # timings, throughput, memory
    attempts: list[dict]  # every attempt: learning rate, steps done, KL, reason
    history: list[dict]  # per-step metrics of the final attempt
    kl_target_met: bool
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# The loss


def make_loss_fn(params: DpoParams) -> Callable[[nn.Module, DpoBatch], tuple[mx.array, dict[str, mx.array]]]:
    """loss_fn(model, DpoBatch) -> (loss, aux) for trainer.train; aux holds the per-step metrics (STEP_KEYS)."""

    def loss_fn(model: nn.Module, batch: DpoBatch) -> tuple[mx.array, dict[str, mx.array]]:
        n_pairs = batch.pairs.n_pairs
        sums, n_tokens = completion_logprobs(model, batch.pairs)  # one forward: chosen AND rejected
        policy, reference = split_pairs(sums, n_pairs), batch.reference
        counts = split_pairs(n_tokens, n_pairs)
        if params.length_normalize:
            policy_in, reference = length_normalized(policy, counts), length_normalized(reference, counts)
        else:
            policy_in = policy
        out = dpo_loss(
            policy_in, reference, beta=params.beta, loss_type=params.loss_type, label_smoothing=params.label_smoothing
        )
        loss = out.losses.mean()
        margins = out.rewards.chosen - out.rewards.rejected
        aux = {
            "rewards/chosen": out.rewards.chosen.mean(),
            "rewards/rejected": out.rewards.rejected.mean(),
            "rewards/margins": margins.mean(),
            # per-pair fraction; an exact tie counts 1/2 (losses.preference_stats)
            "rewards/accuracies": ((margins > 0).astype(mx.float32) + 0.5 * (margins == 0).astype(mx.float32)).mean(),
            "logps/chosen": mx.stop_gradient(policy.chosen).mean(),
            "logps/rejected": mx.stop_gradient(policy.rejected).mean(),
        }
        if params.sft_weight > 0:
            nll = sft_loss(policy.chosen, counts.chosen)
            aux["dpo_loss"] = mx.stop_gradient(loss)
            aux["sft_loss"] = mx.stop_gradient(nll)
            loss = loss + params.sft_weight * nll
        return loss, aux

    return loss_fn


def make_batch(encoded: Sequence[EncodedPair], indices: Sequence[int], ref_logps: ChosenRejected, pad: int) -> DpoBatch:
    idx = np.asarray(indices, dtype=np.int64)
    return DpoBatch(
        collate_pairs([encoded[i] for i in idx], pad),
        ChosenRejected(
            mx.array(np.asarray(ref_logps.chosen, dtype=np.float32)[idx]),
            mx.array(np.asarray(ref_logps.rejected, dtype=np.float32)[idx]),
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# Diagnostics


def likelihood_displacement(
    history: Sequence[Mapping[str, float]], key: str = "logps/chosen", fraction: float = DISPLACEMENT_FRACTION
) -> dict[str, Any]:
    """Did the chosen log-probs fall? Mean of `key` over the last `fraction` of the steps vs the first."""
    values = [h[key] for h in history if key in h]
    if not values:
        return {"likelihood_displacement": False, "likelihood_displacement_drop": 0.0}
    k = max(1, int(round(len(values) * fraction)))
    first, last = float(np.mean(values[:k])), float(np.mean(values[-k:]))
    return {
        "likelihood_displacement": bool(last < first),
        "likelihood_displacement_drop": first - last,
        "logps_chosen_first": first,
        "logps_chosen_last": last,
    }


# ---------------------------------------------------------------------------------------------------------
# Attempts (retries) and their resume state


class _Attempts:
    """Failed attempts, persisted next to the trainer checkpoints so that a killed run resumes in the right
    attempt with the same attempt records (only attempts followed by another one are written: a killed final
    attempt resumes from its own checkpoint)."""

    def __init__(self, checkpoint_dir: Path | None, fingerprint: str):
        self.dir, self.fingerprint, self.failed = checkpoint_dir, fingerprint, []
        path = self._path()
        stale = False
        if path is not None and path.exists():
            state = io.read_json(path)
            if state.get("fingerprint") == fingerprint:
                self.failed = state["failed"]
            else:  # params or data changed: nothing to resume
                stale = True
        distributed.barrier()  # every rank has read the state before rank 0 deletes it
        if stale and distributed.is_main_process():
            shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self) -> Path | None:
        return None if self.dir is None else Path(self.dir) / ATTEMPTS_FILE

    def attempt_dir(self, number: int) -> Path | None:
        return None if self.dir is None else Path(self.dir) / f"attempt_{number}"

    def record_failure(self, attempt: dict) -> None:
        self.failed.append(attempt)
        if self.dir is not None and distributed.is_main_process():
            io.write_json(self._path(), {"fingerprint": self.fingerprint, "failed": self.failed})
            shutil.rmtree(self.attempt_dir(attempt["attempt"]), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Training


def train_dpo(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    ref_logps: ChosenRejected,
    params: DpoParams,
    *,
    batch_size: int,
    seed: int,
    max_len: int,
    measure: Measure,
    logger: MetricLogger | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    on_step: Callable[[int, dict], None] | None = None,
) -> DpoResult:
    """Train `model`'s trainable parameters (LoRA adapters, or all weights) with DPO; see the module docstring.

    pairs: canonical rows; ref_logps: their cached reference log-probs in the same row order (Stage 3), computed
    with truncation length `max_len`. measure(step) returns at least {"kl", "heldout_gap"} (the KL check).
    The model is left in the state of the final attempt (the one the metrics describe). TrainingDiverged
    (NaN/Inf) propagates; checkpoints stay.
    """
    p = params
    if not pairs:
        raise ValueError("pairs: no pairs")
    if not len(ref_logps.chosen) == len(ref_logps.rejected) == len(pairs):
        raise ValueError(f"pairs: {len(pairs)} pairs but {len(ref_logps.chosen)} cached reference log-probs")
    pad = pad_id(tokenizer)
    encoded = [encode_pair(tokenizer, row, max_len) for row in pairs]
    schedule = BatchSchedule([e.max_length for e in encoded], batch_size, seed, p.grad_accumulation)
    loss_fn = make_loss_fn(p)
    timers = {"eval_seconds": 0.0}

    def batch_at(step: int, micro: int) -> tuple[DpoBatch, float]:
        indices, keep = schedule.shard(step, micro)  # this rank's part of the global batch (all of it on one process)
        return make_batch(encoded, indices, ref_logps, pad), keep * len(indices)  # the loss: a mean over pairs

    def kl_check(step: int) -> dict[str, float]:
        start = time.perf_counter()
        measured = measure(step)
        timers["eval_seconds"] += time.perf_counter() - start
        out = {k: measured[k] for k in CHECK_KEYS + INTERVAL_KEYS if k in measured}
        if not out["kl"] <= p.kl_target:  # NaN counts as over
            raise StopTraining(f"KL {out['kl']:.4g} > dpo.kl_target {p.kl_target:g} at step {step}", out)
        return out

    initial = tree_flatten(model.trainable_parameters())  # the initial policy (immutable arrays: no copy)
    state = _Attempts(checkpoint_dir, fingerprint)
    n_attempts = p.max_retries + 1
    attempts: list[dict] = list(state.failed)
    seconds, result, learning_rate = 0.0, None, p.learning_rate
    first = len(state.failed)  # attempts that failed before a kill: resume after them
    for index in range(first, n_attempts):
        number = index + 1
        learning_rate = p.learning_rate * p.lr_backoff**index
        if index > first and logger is not None:  # a retry in this process: keep the failed attempt's curves aside
            logger.restart(f"failed_attempts/attempt_{index}")
        reset_policy(model, initial)
        cfg = TrainConfig(
            steps=p.max_steps,
            learning_rate=learning_rate,
            warmup_steps=p.warmup_steps,
            max_grad_norm=p.max_grad_norm,
            grad_accumulation=p.grad_accumulation,
            checkpoint_every=p.checkpoint_every,
            eval_every=p.kl_every,
            seed=seed,
            checkpoint_dir=state.attempt_dir(number),
            fingerprint=f"{fingerprint}|attempt={number}|lr={learning_rate!r}",
            desc=f"dpo {number}/{n_attempts} lr {learning_rate:.2g}",
        )
        result = train(
            model,
            loss_fn,
            batch_at,
            cfg,
            evaluate=kl_check,
            logger=logger,
            tokens_in=lambda b: b.n_tokens,
            on_step=on_step,
        )
        seconds += result.seconds
        last = result.evals[-1]
        attempt = {
            "attempt": number,
            "learning_rate": learning_rate,
            "steps": result.steps,
            "kl": last["kl"],
            "kl_step": last["step"],
            "heldout_gap": last["heldout_gap"],
            "kl_target_met": result.stopped is None,
            "reason": result.stopped or "completed",
        }
        attempts.append(attempt)
        if result.stopped is None:
            break
        log.warning("dpo attempt %d/%d (lr %.3g) stopped: %s", number, n_attempts, learning_rate, result.stopped)
        if number < n_attempts:
            state.record_failure(attempt)

    assert result is not None
    final = result.evals[-1]
    met = result.stopped is None
    history = result.history
    displacement = likelihood_displacement(history)
    warnings = []
    if not met:
        warnings.append(
            f"no attempt met dpo.kl_target {p.kl_target:g} ({n_attempts} attempts, last lr "
            f"{learning_rate:.3g}): the gate will fail; lower dpo.learning_rate or raise dpo.beta"
        )
    if displacement["likelihood_displacement"]:
        warnings.append(
            f"likelihood displacement: mean chosen log-prob fell by {displacement['likelihood_displacement_drop']:.4g} "
            f"({displacement['logps_chosen_first']:.4g} -> {displacement['logps_chosen_last']:.4g}, first vs last "
            f"{DISPLACEMENT_FRACTION:.0%} of steps); DPO lowers the likelihood of BOTH responses. If chosen answers "
            "degrade, add an NLL term on chosen with dpo.sft_weight (e.g. 0.1-1.0)"
        )
    for message in warnings:
        log.warning(message)

    metrics = {
        "kl": final["kl"],
        "kl_seq": final["kl_seq"],
        "k3": final["k3"],
        "heldout_gap": final["heldout_gap"],
        "heldout_accuracy": final["heldout_accuracy"],
        "heldout_margin": final["heldout_margin"],
        **{k: final[k] for k in INTERVAL_KEYS if k in final},  # with the probe's confidence (gates.confidence)
        "kl_target": p.kl_target,
        "kl_target_met": met,
        "kl_step": final["step"],
        "learning_rate": learning_rate,
        "steps": result.steps,
        "n_attempts": len(attempts),
        "attempts": attempts,
        "train": summarize(history, list(TRAIN_STAT_KEYS)),
        "kl_checks": [dict(e) for e in result.evals],
        **displacement,
        "n_train_pairs": len(pairs),
        "n_truncated_pairs": sum(e.truncated for e in encoded),
        "loss_type": p.loss_type,
        "beta": p.beta,
    }
    timed = history[1:] or history  # the first step includes one-time setup
    step_seconds = float(np.mean([h["step_seconds"] for h in timed]))
    perf = {
        "tokens_per_sec": float(np.mean([h["tokens_per_sec"] for h in timed])),
        "pairs_per_sec": batch_size * p.grad_accumulation / step_seconds if step_seconds else 0.0,
        "step_seconds": step_seconds,
        "peak_memory_gb": max(h["peak_memory_gb"] for h in history),
        "train_seconds": seconds,
        "eval_seconds": timers["eval_seconds"],
        "resumed_from_step": result.resumed_from,
    }
    return DpoResult(
        metrics=io.json_safe(metrics),
        perf=perf,
        attempts=attempts,
        history=history,
        kl_target_met=met,
        warnings=warnings,
    )
