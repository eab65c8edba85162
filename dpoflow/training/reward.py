"""Stage 4's training: a Bradley-Terry reward model on preference pairs, split 80/20 BY PROMPT (`split_by_prompt`),
through the one training loop (dpoflow.training.trainer).

    loss = mean -log sigma(r_c - r_w - m) + center_coef * mean (r_c + r_w)^2      (TRL's RewardTrainer)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from dpoflow.core.batching import (
    EncodedPair,
    PairBatch,
    collate_pairs,
    encode_pair,
    split_pairs,
)
from dpoflow.core.losses import bradley_terry_loss, preference_stats
from dpoflow.eval.intervals import pair_accuracy_metrics
from dpoflow.eval.significance import CONFIDENCE
from dpoflow.modeling.reward_model import RewardModel
from dpoflow.runtime.params import RewardModelParams
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.trainer import BatchSchedule, TrainConfig, train

MAX_WARMUP_STEPS = 10  # warmup = min(10, steps // 10), then cosine decay (dpoflow.training.trainer.make_optimizer)


# ---------------------------------------------------------------------------------------------------------------
# Data: split by prompt, margins, batches


def prompt_key(prompt: Sequence[Mapping[str, str]]) -> str:
    """The prompt as text (roles and contents, in order): what the split hashes and compares."""
    return json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)


def split_by_prompt(pairs: Sequence[Mapping[str, Any]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) into `pairs`, split by PROMPT: all pairs of a prompt share a side.

    Each distinct prompt is ranked by sha256(f"{seed}\\n{prompt_key}"); the first round(val_fraction * n_prompts)
    prompts (at least 1, at most n_prompts - 1) go to validation. Deterministic for (prompts, seed).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    keys = [prompt_key(p["prompt"]) for p in pairs]
    distinct = sorted(set(keys), key=lambda k: (hashlib.sha256(f"{seed}\n{k}".encode()).hexdigest(), k))
    if len(distinct) < 2:
        raise ValueError(
            f"{len(pairs)} pairs have {len(distinct)} distinct prompt(s); a split by prompt needs "
            "at least 2 (more preference data is needed)"
        )
    n_val = min(max(int(round(val_fraction * len(distinct))), 1), len(distinct) - 1)
    val_keys = set(distinct[:n_val])
    train_idx = [i for i, k in enumerate(keys) if k not in val_keys]
    val_idx = [i for i, k in enumerate(keys) if k in val_keys]
    return train_idx, val_idx


def pair_margins(pairs: Sequence[Mapping[str, Any]], margin: float) -> np.ndarray | None:
    """Per-pair BT margin m_i = margin * (score_chosen - score_rejected), 0 where a score is unknown;
    None when margin == 0 (no margin term at all)."""
    if not margin:
        return None
    out = np.zeros(len(pairs), dtype=np.float32)
    for i, p in enumerate(pairs):
        sc, sr = p.get("score_chosen"), p.get("score_rejected")
        if sc is not None and sr is not None:
            out[i] = margin * (float(sc) - float(sr))
    return out


@dataclass
class RewardBatch:
    pairs: PairBatch
    margins: mx.array | None = None  # [B] or None


def make_batch(
    encoded: Sequence[EncodedPair], indices: Sequence[int], pad_id: int, margins: np.ndarray | None = None
) -> RewardBatch:
    batch = collate_pairs([encoded[i] for i in indices], pad_id)
    m = None if margins is None else mx.array(margins[np.asarray(indices, dtype=np.int64)])
    return RewardBatch(batch, m)


def reward_loss(rm: RewardModel, batch: RewardBatch, center_coef: float = 0.0) -> tuple[mx.array, dict[str, mx.array]]:
    """Bradley-Terry loss of one pair batch (one forward for chosen and rejected) and its metrics."""
    r_c, r_w = split_pairs(rm(batch.pairs), batch.pairs.n_pairs)
    loss = bradley_terry_loss(r_c, r_w, batch.margins, center_coef)
    diff = mx.stop_gradient(r_c - r_w)
    aux = {
        "accuracy": ((diff > 0).astype(mx.float32) + 0.5 * (diff == 0).astype(mx.float32)).mean(),
        "margin_mean": diff.mean(),
        "reward_mean": mx.stop_gradient((r_c + r_w) / 2).mean(),
    }
    return loss, aux


def pair_stats(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """accuracy (ties 0.5), mean margin r_c - r_w, and the plain BT loss mean -log sigma(r_c - r_w)."""
    if len(chosen) == 0:
        return {"accuracy": float("nan"), "margin_mean": float("nan"), "loss": float("nan")}
    stats = preference_stats(chosen, rejected)
    diff = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return {
        "accuracy": stats["accuracy"],
        "margin_mean": stats["margin_mean"],
        "loss": float(np.logaddexp(0.0, -diff).mean()),
    }


def find_contradictions(
    pairs: Sequence[Mapping[str, Any]],
    chosen: np.ndarray,
    rejected: np.ndarray,
    threshold: float,
    split_of: Sequence[str],
) -> list[dict]:
    """Pairs the reward model confidently contradicts: P(rejected > chosen) = sigma(r_w - r_c) >= threshold.

    Rows (most confident first): id, p_rejected_preferred, reward_chosen, reward_rejected, split, task, source,
    score_chosen, score_rejected. The pairs themselves are not changed.
    """
    diff = np.asarray(rejected, dtype=np.float64) - np.asarray(chosen, dtype=np.float64)
    p_flip = 1.0 / (1.0 + np.exp(-diff))
    rows = []
    for i in np.nonzero(p_flip >= threshold)[0]:
        p = pairs[i]
        rows.append(
            {
                "id": p.get("id"),
                "p_rejected_preferred": float(p_flip[i]),
                "reward_chosen": float(chosen[i]),
                "reward_rejected": float(rejected[i]),
                "split": split_of[i],
                "task": p.get("task"),
                "source": p.get("source"),
                "score_chosen": p.get("score_chosen"),
                "score_rejected": p.get("score_rejected"),
            }
        )
    rows.sort(key=lambda r: (-r["p_rejected_preferred"], str(r["id"])))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_reward_model(
    rm: RewardModel,
    pairs: Sequence[Mapping[str, Any]],
    params: RewardModelParams,
    *,
    batch_size: int,
    seed: int,
    eval_batch_size: int | None = None,
    logger: MetricLogger | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 25,
    fingerprint: str = "",
    max_grad_norm: float = 1.0,
    on_step: Callable[[int, dict], None] | None = None,
    confidence: float = CONFIDENCE,
) -> dict:
    """Train `rm` on the training split of `pairs` and evaluate it on both splits.

    steps = ceil(n_train / batch_size) * epochs (length-grouped batches, reshuffled each epoch); validation at the
    end of every epoch; `on_step` is passed to trainer.train (tests use it to simulate a killed run). Returns the
    stage's statistics plus "perf" (timings) and "contradictions" (rows for
    data/rm_contradictions.jsonl; empty when contradiction_filter is None). The validation accuracy comes with its
    Wilson interval over the validation pairs at `confidence` (ties count half; eval.intervals):
    val_accuracy_ci_low, val_accuracy_ci_high, val_accuracy_n.
    """
    learning_rate, epochs, val_fraction = params.learning_rate, params.epochs, params.val_fraction
    margin, center_coef, max_overfit_gap = params.margin, params.center_coef, params.max_overfit_gap
    contradiction_filter = params.contradiction_filter
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    t_start = time.perf_counter()
    encoded = [encode_pair(rm.tokenizer, pair, rm.max_seq_len) for pair in pairs]
    train_idx, val_idx = split_by_prompt(pairs, val_fraction, seed)
    margins = pair_margins(pairs, margin)
    eval_bs = eval_batch_size or 2 * batch_size
    schedule = BatchSchedule([encoded[i].max_length for i in train_idx], batch_size, seed)
    per_epoch = schedule.per_epoch
    assert per_epoch == math.ceil(len(train_idx) / batch_size)
    steps = per_epoch * epochs
    val_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def val_rewards() -> tuple[np.ndarray, np.ndarray]:
        return rm.score_encoded_pairs([encoded[i] for i in val_idx], eval_bs)

    def evaluate(step: int) -> dict[str, float]:
        c, w = val_rewards()
        val_cache.clear()
        val_cache[step] = (c, w)
        s = pair_stats(c, w)
        return {"val_accuracy": s["accuracy"], "val_margin_mean": s["margin_mean"], "val_loss": s["loss"]}

    def batch_at(step: int, micro: int) -> tuple[RewardBatch, float]:
        indices, keep = schedule.shard(step, micro)  # this rank's part of the global batch (all of it on one process)
        batch = make_batch(encoded, [train_idx[j] for j in indices], rm.pad_id, margins)
        return batch, keep * len(indices)  # the loss: a mean over pairs

    cfg = TrainConfig(
        steps=steps,
        learning_rate=learning_rate,
        warmup_steps=min(MAX_WARMUP_STEPS, steps // 10),
        max_grad_norm=max_grad_norm,
        eval_every=per_epoch,
        checkpoint_every=checkpoint_every,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        desc="reward_model",
    )
    result = train(
        rm,
        lambda model, batch: reward_loss(model, batch, center_coef),
        batch_at,
        cfg,
        evaluate=evaluate,
        logger=logger,
        tokens_in=lambda b: b.pairs.n_tokens,
        on_step=on_step,
    )

    t_eval = time.perf_counter()
    train_c, train_w = rm.score_encoded_pairs([encoded[i] for i in train_idx], eval_bs)
    val_c, val_w = val_cache[steps] if steps in val_cache else val_rewards()
    eval_seconds = time.perf_counter() - t_eval
    tr, va = pair_stats(train_c, train_w), pair_stats(val_c, val_w)

    chosen, rejected = np.zeros(len(pairs)), np.zeros(len(pairs))
    chosen[train_idx], rejected[train_idx] = train_c, train_w
    chosen[val_idx], rejected[val_idx] = val_c, val_w
    split_of = ["train"] * len(pairs)
    for i in val_idx:
        split_of[i] = "val"
    contradictions = (
        []
        if contradiction_filter is None
        else find_contradictions(pairs, chosen, rejected, contradiction_filter, split_of)
    )

    overfit_gap = tr["accuracy"] - va["accuracy"]
    tail = result.history[-10:]
    metrics = {
        # Gate keys (dpoflow.eval.gates: reward_model)
        "val_accuracy": va["accuracy"],
        **{
            k: v
            for k, v in pair_accuracy_metrics(val_c, val_w, confidence).items()
            if k in ("val_accuracy_ci_low", "val_accuracy_ci_high", "val_accuracy_n")
        },
        "overfit_gap": overfit_gap,
        # Detail
        "train_accuracy": tr["accuracy"],
        "val_margin_mean": va["margin_mean"],
        "train_margin_mean": tr["margin_mean"],
        "val_loss": va["loss"],
        "train_loss": tr["loss"],
        "train_batch_loss": float(np.mean([h["loss"] for h in tail])),
        "overfit": bool(overfit_gap > max_overfit_gap),
        "max_overfit_gap": max_overfit_gap,
        "n_pairs": len(pairs),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_train_prompts": len({prompt_key(pairs[i]["prompt"]) for i in train_idx}),
        "n_val_prompts": len({prompt_key(pairs[i]["prompt"]) for i in val_idx}),
        "n_truncated": int(sum(e.truncated for e in encoded)),
        "n_contradictions": len(contradictions),
        "n_contradictions_val": sum(r["split"] == "val" for r in contradictions),
        "contradiction_filter": contradiction_filter,
        "steps": steps,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
        "reward_mean": float(np.concatenate([chosen, rejected]).mean()) if len(pairs) else 0.0,
        "reward_std": float(np.concatenate([chosen, rejected]).std()) if len(pairs) else 0.0,
        "epoch_evals": [dict(e.items()) for e in result.evals],
    }
    history = result.history[1:] or result.history
    metrics["perf"] = {
        "tokens_per_sec": float(np.mean([h["tokens_per_sec"] for h in history])) if history else 0.0,
        "peak_memory_gb": max((h["peak_memory_gb"] for h in result.history), default=0.0),
        "train_seconds": result.seconds,
        "final_eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "resumed_from_step": result.resumed_from,
    }
    metrics["contradictions"] = contradictions
    return metrics
