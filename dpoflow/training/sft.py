"""Supervised fine-tuning (Stage 1): the mean NLL of completion tokens, prompt tokens masked from the loss.

Rows are canonical SFT examples, {"prompt": [messages], "completion": str}: the completion is the assistant turn
the model learns to write after the chat-formatted prompt (dpoflow.data.sources reads users' files into this form;
the embedded task's items become rows through dpoflow.data.tasks.sft_row). Held-out validation reports the loss
and, when the data has a verifier, the greedy task accuracy (`val_accuracy`, passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow.core.batching import (
    SeqBatch,
    collate_sequences,
    encode_completion,
    encode_prompt,
    pad_id,
)
from dpoflow.core.logprobs import completion_logprobs
from dpoflow.runtime.params import SftParams
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.trainer import BatchSchedule, TrainConfig, train


@dataclass
class SftExample:
    prompt_ids: list[int]
    completion_ids: list[int]


def encode_examples(tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_len: int) -> list[SftExample]:
    """Chat-formatted prompt -> completion + eos; completions cut to max_len - 1 tokens, prompts cut from the left
    to fit max_len. A row with no prompt messages trains on its whole text (its first token is the prompt)."""
    out = []
    for row in rows:
        completion = encode_completion(tokenizer, row["completion"])
        if row["prompt"]:
            prompt = encode_prompt(tokenizer, row["prompt"])
        else:  # plain text: the first token is the context of the rest
            prompt, completion = completion[:1], completion[1:] or completion[:1]
        completion = completion[: max_len - 1]
        out.append(SftExample(prompt[-(max_len - len(completion)) :], completion))
    return out


def collate(examples: Sequence[SftExample], pad: int) -> SeqBatch:
    return collate_sequences([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad)


def nll_loss(model: nn.Module, batch: SeqBatch) -> tuple[mx.array, dict[str, mx.array]]:
    """Mean negative log-likelihood per completion token."""
    sum_logps, n_tokens = completion_logprobs(model, batch)
    n = mx.maximum(n_tokens.sum(), 1)
    return -sum_logps.sum() / n, {}


def validation_loss(model: nn.Module, examples: Sequence[SftExample], pad: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad)
        sum_logps, n_tokens = completion_logprobs(model, batch)
        total += -float(sum_logps.sum().item())
        count += int(n_tokens.sum().item())
    return total / max(count, 1)


def run_sft(
    model: nn.Module,
    tokenizer: Any,
    train_rows: Sequence[Mapping[str, Any]],
    val_rows: Sequence[Mapping[str, Any]],
    params: SftParams,
    *,
    batch_size: int,
    seed: int,
    val_accuracy: Callable[[int], float] | None = None,
    logger: MetricLogger | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
) -> dict:
    """Train `model` (its trainable parameters) on `train_rows`; return the final validation metrics and timings.

    val_accuracy(step), when given, measures the greedy task accuracy at every validation (Stage 1's verifier)."""
    pad = pad_id(tokenizer)
    train_ex = encode_examples(tokenizer, train_rows, params.max_seq_len)
    val_ex = encode_examples(tokenizer, val_rows, params.max_seq_len)
    schedule = BatchSchedule([len(e.prompt_ids) + len(e.completion_ids) for e in train_ex], batch_size, seed)

    def evaluate(step: int) -> dict[str, float]:
        out = {} if val_accuracy is None else {"val_accuracy": val_accuracy(step)}
        return {"val_loss": validation_loss(model, val_ex, pad, batch_size * 2), **out}

    def batch_at(step: int, micro: int) -> tuple[SeqBatch, float]:
        indices, keep = schedule.shard(step, micro)  # this rank's part of the global batch (all of it on one process)
        batch = collate([train_ex[i] for i in indices], pad)
        return batch, keep * float(batch.completion_lengths.sum())  # nll_loss is a mean over completion tokens

    cfg = TrainConfig(
        steps=params.steps,
        learning_rate=params.learning_rate,
        warmup_steps=params.warmup_steps,
        eval_every=params.val_every,
        checkpoint_every=max(1, params.val_every),
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        desc="sft",
    )
    result = train(model, nll_loss, batch_at, cfg, evaluate=evaluate, logger=logger, tokens_in=lambda b: b.n_tokens)
    final = result.evals[-1]
    tail = result.history[-10:]
    return {
        "val_loss": final["val_loss"],
        **({"val_accuracy": final["val_accuracy"]} if "val_accuracy" in final else {}),
        "train_loss": float(np.mean([h["loss"] for h in tail])),
        "steps": params.steps,
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        # Timings vary run to run: they go to perf, so the quality metrics are identical for the same seed.
        "perf": {
            "tokens_per_sec": float(np.mean([h["tokens_per_sec"] for h in result.history[1:]] or [0.0])),
            "peak_memory_gb": max(h["peak_memory_gb"] for h in result.history),
            "train_seconds": result.seconds,
            "resumed_from_step": result.resumed_from,
        },
    }
