"""Stage 5: DPO on the preference pairs, with the KL rule (stop, lower the learning rate, retry from Stage 3).

One training step (through dpoflow.trainer.train, the one loop):

    batch      = length-grouped pairs; chosen rows 0..B-1 and rejected rows B..2B-1 of ONE [2B, T] batch
    pi_c, pi_w = policy log-probs summed over completion tokens (logprobs.completion_logprobs: the LM head runs
                 only at completion positions)
    ref_c, ref_w = the Stage 3 cache (data/ref_logps.safetensors), indexed by pair position: no reference forward
    loss       = mean_i dpo_loss(pi_c, pi_w, ref_c, ref_w; beta, loss_type, label_smoothing)
                 [+ sft_weight * sft_loss(pi_c)]   [length_normalize: every log-prob divided by its token count]

Every `dpo.kl_every` steps and at the end, the held-out KL (policy.measure_kl, the one definition) and the held-out
preference gap / accuracy are measured. KL > dpo.kl_target stops the attempt (trainer.StopTraining); the policy is
put back to its Stage 3 state and trained again with learning_rate * lr_backoff, up to dpo.max_retries times.
Each attempt is recorded. Checkpoints (trainer) make a killed run resume where it stopped, including in a retry.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dpoflow import distributed, io
from dpoflow.batching import EncodedPair, PairBatch, collate_pairs, encode_pair, split_pairs
from dpoflow.logprobs import completion_logprobs
from dpoflow.losses import dpo_loss, heldout_preference_gap, normalize_by_length, preference_stats, sft_loss
from dpoflow.policy import measure_kl, pad_id_of, reset_policy
from dpoflow.trainer import BatchSchedule, StopTraining, TrainConfig, summarize, train

log = logging.getLogger(__name__)

# Per-step metrics (besides the trainer's grad_norm, learning_rate, tokens_per_sec, step_seconds, peak_memory_gb).
STEP_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
# Deterministic end-of-training figures (mean of the last 10 steps) for metrics/dpo.json; timings go to perf.
TRAIN_STAT_KEYS = ("loss",) + STEP_KEYS + ("grad_norm",)
DISPLACEMENT_FRACTION = 0.1  # likelihood displacement: first vs last 10% of the steps
ATTEMPTS_FILE = "attempts.json"


# The dpo.* params a DPO pass reads (Stage 5 and every Stage 6 round; dvc.yaml lists exactly these). lora_* and
# finetune belong to Stage 3 (the policy it initializes); max_kl and min_heldout_gap to the gates.
STAGE_KEYS = ("loss_type", "label_smoothing", "length_normalize", "sft_weight", "beta", "learning_rate",
              "grad_accumulation", "warmup_steps", "max_grad_norm", "max_steps", "checkpoint_every", "kl_every",
              "kl_target", "lr_backoff", "max_retries")

@dataclass
class DpoBatch:
    pairs: PairBatch
    ref_chosen: mx.array     # [B] cached reference log-prob sums
    ref_rejected: mx.array   # [B]

    @property
    def n_tokens(self) -> int:
        return self.pairs.n_tokens


@dataclass
class DpoResult:
    metrics: dict                      # deterministic for the same inputs and seed: metrics/dpo.json
    perf: dict                         # timings, throughput, memory: metrics/perf/dpo.json
    attempts: list[dict]               # every attempt: learning rate, steps done, KL, reason
    history: list[dict]                # per-step metrics of the final attempt
    kl_target_met: bool
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# The loss


def _logratio_inputs(pc: mx.array, pr: mx.array, rc: mx.array, rr: mx.array, nc: mx.array, nr: mx.array,
                     length_normalize: bool) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    if not length_normalize:
        return pc, pr, rc, rr
    return (normalize_by_length(pc, nc), normalize_by_length(pr, nr),
            normalize_by_length(rc, nc), normalize_by_length(rr, nr))


def make_loss_fn(dpo_params: Any) -> Callable[[nn.Module, DpoBatch], tuple[mx.array, dict[str, mx.array]]]:
    """loss_fn(model, DpoBatch) -> (loss, aux) for trainer.train; aux holds the per-step metrics (STEP_KEYS)."""
    beta, loss_type = dpo_params.beta, dpo_params.loss_type
    smoothing, sft_weight, length_normalize = dpo_params.label_smoothing, dpo_params.sft_weight, dpo_params.length_normalize

    def loss_fn(model: nn.Module, batch: DpoBatch) -> tuple[mx.array, dict[str, mx.array]]:
        n_pairs = batch.pairs.n_pairs
        sums, n_tokens = completion_logprobs(model, batch.pairs)  # one forward: chosen AND rejected
        pc, pr = split_pairs(sums, n_pairs)
        nc, nr = split_pairs(n_tokens, n_pairs)
        inputs = _logratio_inputs(pc, pr, batch.ref_chosen, batch.ref_rejected, nc, nr, length_normalize)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=beta, loss_type=loss_type,
                                                            label_smoothing=smoothing)
        loss = losses.mean()
        margins = chosen_rewards - rejected_rewards
        aux = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            # per-pair fraction; an exact tie counts 1/2 (losses.preference_stats)
            "rewards/accuracies": ((margins > 0).astype(mx.float32) + 0.5 * (margins == 0).astype(mx.float32)).mean(),
            "logps/chosen": mx.stop_gradient(pc).mean(),
            "logps/rejected": mx.stop_gradient(pr).mean(),
        }
        if sft_weight > 0:
            nll = sft_loss(pc, nc)
            aux["dpo_loss"] = mx.stop_gradient(loss)
            aux["sft_loss"] = mx.stop_gradient(nll)
            loss = loss + sft_weight * nll
        return loss, aux

    return loss_fn


def make_batch(encoded: Sequence[EncodedPair], indices: Sequence[int], ref_logps: Mapping[str, np.ndarray],
               pad_id: int) -> DpoBatch:
    idx = np.asarray(indices, dtype=np.int64)
    return DpoBatch(collate_pairs([encoded[i] for i in idx], pad_id),
                    mx.array(np.asarray(ref_logps["chosen"], dtype=np.float32)[idx]),
                    mx.array(np.asarray(ref_logps["rejected"], dtype=np.float32)[idx]))


# ---------------------------------------------------------------------------------------------------------
# Held-out preference metrics


def implicit_rewards(model: nn.Module, encoded: Sequence[EncodedPair], ref_logps: Mapping[str, np.ndarray],
                     beta: float, length_normalize: bool, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen_rewards, rejected_rewards) [N] float64 of the policy against the cached reference: beta * log-ratio,
    as in the training loss (length-normalized when it is)."""
    n = len(encoded)
    chosen, rejected = np.zeros(n), np.zeros(n)
    order = np.argsort([-e.max_length for e in encoded], kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = make_batch(encoded, idx, ref_logps, pad_id)
        sums, n_tokens = completion_logprobs(model, batch.pairs)
        pc, pr = split_pairs(mx.stop_gradient(sums), len(idx))
        nc, nr = split_pairs(n_tokens, len(idx))
        pc, pr, rc, rr = _logratio_inputs(pc, pr, batch.ref_chosen, batch.ref_rejected, nc, nr, length_normalize)
        c, r = beta * (pc - rc), beta * (pr - rr)
        mx.eval(c, r)
        chosen[idx], rejected[idx] = np.asarray(c, dtype=np.float64), np.asarray(r, dtype=np.float64)
    return chosen, rejected


def heldout_metrics(model: nn.Module, encoded: Sequence[EncodedPair], ref_logps: Mapping[str, np.ndarray],
                    beta: float, length_normalize: bool, pad_id: int, batch_size: int) -> dict[str, float]:
    """Held-out preference gap mean_i (2 sigma(m_i) - 1), accuracy (ties count 1/2) and mean margin m_i."""
    chosen, rejected = implicit_rewards(model, encoded, ref_logps, beta, length_normalize, pad_id, batch_size)
    stats = preference_stats(chosen, rejected)
    return {"heldout_gap": heldout_preference_gap(chosen - rejected), "heldout_accuracy": stats["accuracy"],
            "heldout_margin": stats["margin_mean"]}


# ---------------------------------------------------------------------------------------------------------
# Diagnostics


def likelihood_displacement(history: Sequence[Mapping[str, float]], key: str = "logps/chosen",
                            fraction: float = DISPLACEMENT_FRACTION) -> dict[str, Any]:
    """Did the chosen log-probs fall? Mean of `key` over the last `fraction` of the steps vs the first."""
    values = [h[key] for h in history if key in h]
    if not values:
        return {"likelihood_displacement": False, "likelihood_displacement_drop": 0.0}
    k = max(1, int(round(len(values) * fraction)))
    first, last = float(np.mean(values[:k])), float(np.mean(values[-k:]))
    return {"likelihood_displacement": bool(last < first), "likelihood_displacement_drop": first - last,
            "logps_chosen_first": first, "logps_chosen_last": last}


def _finite_or_none(value: Any) -> Any:
    """NaN/Inf -> None (JSON has no NaN; a gate reads a missing value as failed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# Attempts (retries) and their resume state


class _Attempts:
    """Failed attempts, persisted next to the trainer checkpoints so that a killed run resumes in the right
    attempt with the same attempt records (only attempts followed by another one are written: a killed final
    attempt resumes from its own checkpoint)."""

    def __init__(self, checkpoint_dir: Optional[Path], fingerprint: str):
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

    def _path(self) -> Optional[Path]:
        return None if self.dir is None else Path(self.dir) / ATTEMPTS_FILE

    def attempt_dir(self, number: int) -> Optional[Path]:
        return None if self.dir is None else Path(self.dir) / f"attempt_{number}"

    def record_failure(self, attempt: dict) -> None:
        self.failed.append(attempt)
        if self.dir is not None and distributed.is_main_process():
            io.write_json(self._path(), {"fingerprint": self.fingerprint, "failed": self.failed})
            shutil.rmtree(self.attempt_dir(attempt["attempt"]), ignore_errors=True)


def _archive_curves(live: Any, attempt_number: int) -> None:
    """Move a failed attempt's dvclive curves aside (<live dir>/failed_attempts/attempt_N) and restart at step 0,
    so dvclive/<stage>/plots shows the attempt that produced the model."""
    if live is None:
        return
    source = Path(live.plots_dir) / "metrics"
    if source.exists():
        target = Path(live.dir) / "failed_attempts" / f"attempt_{attempt_number}"
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
    live.step = 0


# ---------------------------------------------------------------------------------------------------------
# Training


def train_dpo(
    policy: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    ref_logps: Mapping[str, np.ndarray],
    heldout_pairs: Sequence[Mapping[str, Any]],
    heldout_ref_logps: Mapping[str, np.ndarray],
    kl_prompts: Sequence[Sequence[Mapping[str, str]]],
    dpo_params: Any,
    batch_size: int,
    seed: int,
    live: Any,
    checkpoint_dir: Optional[Path],
    reference: Optional[nn.Module] = None,
    fingerprint: str = "",
    *,
    max_len: int = 128,
    kl_samples: int = 1,
    kl_max_tokens: int = 24,
    on_step: Optional[Callable[[int, dict], None]] = None,
) -> DpoResult:
    """Train `policy` (its trainable parameters: LoRA adapters, or all weights) with DPO; see the module docstring.

    pairs / heldout_pairs: canonical rows; ref_logps / heldout_ref_logps: {"chosen": [N], "rejected": [N]} from the
    Stage 3 cache in the same row order. kl_prompts: the held-out KL prompts (chat messages). dpo_params: a
    params.DpoParams. reference: the reference model, or None = the policy with its LoRA adapters disabled.
    max_len must be the truncation length the cache was computed with. The policy is left in the state of the
    final attempt (the one the metrics describe). TrainingDiverged (NaN/Inf) propagates; checkpoints stay.
    """
    p = dpo_params
    for name, rows, cache in (("pairs", pairs, ref_logps), ("heldout_pairs", heldout_pairs, heldout_ref_logps)):
        if not rows:
            raise ValueError(f"{name}: no pairs")
        if not len(cache["chosen"]) == len(cache["rejected"]) == len(rows):
            raise ValueError(f"{name}: {len(rows)} pairs but {len(cache['chosen'])} cached reference log-probs")
    if reference is None and not any("lora_a" in m for _, m in policy.named_modules()):
        raise ValueError("reference=None means the policy's LoRA adapters disabled, but the policy has no LoRA "
                         "adapters: pass the reference model (dpo.finetune: full)")

    pad_id = pad_id_of(tokenizer)
    encoded = [encode_pair(tokenizer, row, max_len) for row in pairs]
    heldout_encoded = [encode_pair(tokenizer, row, max_len) for row in heldout_pairs]
    schedule = BatchSchedule([e.max_length for e in encoded], batch_size, seed, p.grad_accumulation)
    loss_fn = make_loss_fn(p)
    eval_batch = 2 * batch_size  # forward only
    timers = {"eval_seconds": 0.0}

    def batch_at(step: int, micro: int) -> tuple[DpoBatch, float]:
        indices, keep = schedule.shard(step, micro)  # this rank's part of the global batch (all of it on one process)
        return make_batch(encoded, indices, ref_logps, pad_id), keep * len(indices)  # the loss: a mean over pairs

    def evaluate(step: int) -> dict[str, float]:
        start = time.perf_counter()
        kl = measure_kl(policy, tokenizer, kl_prompts, reference, seed, kl_samples, kl_max_tokens)
        held = heldout_metrics(policy, heldout_encoded, heldout_ref_logps, p.beta, p.length_normalize, pad_id,
                               eval_batch)
        timers["eval_seconds"] += time.perf_counter() - start
        out = {"kl": kl["kl"], "kl_seq": kl["kl_seq"], "k3": kl["k3"], **held}
        if not kl["kl"] <= p.kl_target:  # NaN counts as over
            raise StopTraining(f"KL {kl['kl']:.4g} > dpo.kl_target {p.kl_target:g} at step {step}", out)
        return out

    initial = tree_flatten(policy.trainable_parameters())  # the Stage 3 policy (immutable arrays: no copy)
    state = _Attempts(checkpoint_dir, fingerprint)
    n_attempts = p.max_retries + 1
    attempts: list[dict] = list(state.failed)
    seconds, result, learning_rate = 0.0, None, p.learning_rate
    first = len(state.failed)  # attempts that failed before a kill: resume after them
    for index in range(first, n_attempts):
        number = index + 1
        learning_rate = p.learning_rate * p.lr_backoff ** index
        if index > first:  # a retry in this process: keep the failed attempt's curves aside
            _archive_curves(live, index)
        reset_policy(policy, initial)
        cfg = TrainConfig(
            steps=p.max_steps, learning_rate=learning_rate, warmup_steps=p.warmup_steps,
            max_grad_norm=p.max_grad_norm, grad_accumulation=p.grad_accumulation,
            checkpoint_every=p.checkpoint_every, eval_every=p.kl_every, seed=seed,
            checkpoint_dir=state.attempt_dir(number), fingerprint=f"{fingerprint}|attempt={number}|lr={learning_rate!r}",
            desc=f"dpo {number}/{n_attempts} lr {learning_rate:.2g}")
        result = train(policy, loss_fn, batch_at, cfg, evaluate=evaluate, live=live,
                       tokens_in=lambda b: b.n_tokens, on_step=on_step)
        seconds += result.seconds
        last = result.evals[-1]
        attempt = {"attempt": number, "learning_rate": learning_rate, "steps": result.steps, "kl": last["kl"],
                   "kl_step": last["step"], "heldout_gap": last["heldout_gap"],
                   "kl_target_met": result.stopped is None, "reason": result.stopped or "completed"}
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
        warnings.append(f"no attempt met dpo.kl_target {p.kl_target:g} ({n_attempts} attempts, last lr "
                        f"{learning_rate:.3g}): the gate will fail; lower dpo.learning_rate or raise dpo.beta")
    if displacement["likelihood_displacement"]:
        warnings.append(
            f"likelihood displacement: mean chosen log-prob fell by {displacement['likelihood_displacement_drop']:.4g} "
            f"({displacement['logps_chosen_first']:.4g} -> {displacement['logps_chosen_last']:.4g}, first vs last "
            f"{DISPLACEMENT_FRACTION:.0%} of steps); DPO lowers the likelihood of BOTH responses. If chosen answers "
            "degrade, add an NLL term on chosen with dpo.sft_weight (e.g. 0.1-1.0)")
    for message in warnings:
        log.warning(message)

    metrics = {
        "kl": final["kl"], "kl_seq": final["kl_seq"], "k3": final["k3"],
        "heldout_gap": final["heldout_gap"], "heldout_accuracy": final["heldout_accuracy"],
        "heldout_margin": final["heldout_margin"],
        "kl_target": p.kl_target, "kl_target_met": met, "kl_step": final["step"],
        "learning_rate": learning_rate, "steps": result.steps, "n_attempts": len(attempts), "attempts": attempts,
        "train": summarize(history, list(TRAIN_STAT_KEYS)),
        "kl_checks": [dict(e) for e in result.evals],
        **displacement,
        "n_train_pairs": len(pairs), "n_heldout_pairs": len(heldout_pairs),
        "n_truncated_pairs": sum(e.truncated for e in encoded),
        "loss_type": p.loss_type, "beta": p.beta,
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
    return DpoResult(metrics=_finite_or_none(metrics), perf=perf, attempts=attempts, history=history, kl_target_met=met,
                     warnings=warnings)
