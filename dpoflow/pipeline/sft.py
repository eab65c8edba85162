"""Stage 1: SFT preparation. Fine-tune the base model (LoRA or all weights) on the SFT rows, validate on the held-out
rows (loss, and greedy task accuracy when the data has a verifier), and fuse the result into a plain model; the
stage then records the baseline benchmarks later stages compare against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.nn as nn

from dpoflow.eval.intervals import proportion_metrics
from dpoflow.eval.measure import greedy_accuracy
from dpoflow.modeling import lora
from dpoflow.runtime.params import Params
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.sft import run_sft


def prepare(model: nn.Module, p: Params) -> None:
    """Make the base model trainable as sft.finetune says: LoRA adapters (seeded) or every weight."""
    if p.sft.finetune == "lora":
        lora.attach_lora(model, rank=p.sft.lora_rank, scale=p.sft.lora_scale, num_layers=p.sft.lora_layers, seed=p.seed)
    else:
        model.unfreeze()


def train(
    model: nn.Module,
    tokenizer: Any,
    p: Params,
    train_rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    val_items: Sequence[Mapping[str, Any]] = (),
    logger: MetricLogger | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
) -> dict:
    """Train, validate every sft.val_every steps, fuse LoRA into the weights; returns run_sft's metrics.
    `val_items`: task items behind `val_rows` for the greedy accuracy (empty: no verifier, loss only)."""

    def val_accuracy(step: int) -> float:
        return greedy_accuracy(model, tokenizer, list(val_items), p.data.system_prompt, desc=f"val@{step}")["accuracy"]

    result = run_sft(
        model,
        tokenizer,
        train_rows,
        val_rows,
        p.sft,
        batch_size=batch_size,
        seed=p.seed,
        val_accuracy=val_accuracy if val_items else None,
        logger=logger,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
    )
    lora.fuse_lora(model)
    if result.get("val_accuracy") is not None:  # its Wilson interval over the validation items
        n = len(val_items)
        result |= proportion_metrics("val_accuracy", round(result["val_accuracy"] * n), n, p.gates.confidence)
    return result
