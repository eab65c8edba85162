"""Stage 1: supervised fine-tuning on the task's correct answers, prompt tokens masked from the loss.

The policy gets mlx-lm's LoRA layers (or all weights train, `sft.finetune: full`); the loss is the mean NLL of
completion tokens; held-out validation reports loss and task accuracy (greedy answers scored by the task's checker).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow import tasks
from dpoflow.batching import SeqBatch, collate_sequences, encode_completion, encode_prompt
from dpoflow.generation import generate
from dpoflow.logprobs import completion_logprobs
from dpoflow.trainer import BatchSchedule, TrainConfig, train


@dataclass
class SftExample:
    prompt_ids: list[int]
    completion_ids: list[int]


def encode_examples(tokenizer: Any, items: Sequence[dict], system_prompt: str, max_len: int) -> list[SftExample]:
    """Chat-formatted question -> correct answer + eos; prompts cut from the left to fit max_len."""
    out = []
    for item in items:
        prompt = encode_prompt(tokenizer, tasks.make_prompt(item["question"], system_prompt))
        completion = encode_completion(tokenizer, tasks.sft_target(item))[: max_len - 1]
        out.append(SftExample(prompt[-(max_len - len(completion)):], completion))
    return out


def collate(examples: Sequence[SftExample], pad_id: int) -> SeqBatch:
    return collate_sequences([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id)


def nll_loss(model: nn.Module, batch: SeqBatch) -> tuple[mx.array, dict[str, mx.array]]:
    """Mean negative log-likelihood per completion token."""
    sum_logps, n_tokens = completion_logprobs(model, batch)
    n = mx.maximum(n_tokens.sum(), 1)
    return -sum_logps.sum() / n, {}


def validation_loss(model: nn.Module, examples: Sequence[SftExample], pad_id: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        sum_logps, n_tokens = completion_logprobs(model, batch)
        total += -float(sum_logps.sum().item())
        count += int(n_tokens.sum().item())
    return total / max(count, 1)


def greedy_accuracy(model, tokenizer, items: Sequence[dict], system_prompt: str, max_tokens: int = 16,
                    batch_size: int = 64, desc: str = "accuracy") -> dict[str, float]:
    """Fraction of items whose greedy answer the task checker scores 1.0 (and the mean score)."""
    prompts = [tasks.make_prompt(item["question"], system_prompt) for item in items]
    gens = generate(model, tokenizer, prompts, n_samples=1, temperature=0.0, max_tokens=max_tokens,
                    batch_size=batch_size, desc=desc)
    scores = [tasks.score(item, texts[0]) for item, texts in zip(items, gens.texts)]
    return {"accuracy": float(np.mean([s >= 1.0 for s in scores])), "mean_score": float(np.mean(scores)),
            "tokens_per_sec": gens.tokens_per_sec}


def pad_id_of(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def run_sft(model: nn.Module, tokenizer: Any, train_items: Sequence[dict], val_items: Sequence[dict], *,
            system_prompt: str, steps: int, learning_rate: float, warmup_steps: int, max_seq_len: int,
            batch_size: int, val_every: int, seed: int, live: Any = None, checkpoint_dir=None,
            fingerprint: str = "") -> dict:
    """Train `model` (its trainable parameters) and return the final validation metrics and the training curve."""
    pad_id = pad_id_of(tokenizer)
    train_ex = encode_examples(tokenizer, train_items, system_prompt, max_seq_len)
    val_ex = encode_examples(tokenizer, val_items, system_prompt, max_seq_len)
    schedule = BatchSchedule([len(e.prompt_ids) + len(e.completion_ids) for e in train_ex], batch_size, seed)

    def evaluate(step: int) -> dict[str, float]:
        acc = greedy_accuracy(model, tokenizer, val_items, system_prompt, desc=f"val@{step}")
        return {"val_loss": validation_loss(model, val_ex, pad_id, batch_size * 2), "val_accuracy": acc["accuracy"]}

    def batch_at(step: int, micro: int) -> tuple[SeqBatch, float]:
        indices, keep = schedule.shard(step, micro)  # this rank's part of the global batch (all of it on one process)
        batch = collate([train_ex[i] for i in indices], pad_id)
        return batch, keep * float(batch.completion_lengths.sum())  # nll_loss is a mean over completion tokens

    cfg = TrainConfig(steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps, eval_every=val_every,
                      checkpoint_every=max(1, val_every), seed=seed, checkpoint_dir=checkpoint_dir,
                      fingerprint=fingerprint, desc="sft")
    result = train(model, nll_loss, batch_at, cfg, evaluate=evaluate, live=live, tokens_in=lambda b: b.n_tokens)
    final = result.evals[-1]
    tail = result.history[-10:]
    return {
        "val_loss": final["val_loss"],
        "val_accuracy": final["val_accuracy"],
        "train_loss": float(np.mean([h["loss"] for h in tail])),
        "steps": steps,
        "train_examples": len(train_ex),
        "val_examples": len(val_ex),
        # Timings vary run to run: they go to metrics/perf/, so metrics/sft.json is identical for the same seed.
        "perf": {
            "tokens_per_sec": float(np.mean([h["tokens_per_sec"] for h in result.history[1:]] or [0.0])),
            "peak_memory_gb": max(h["peak_memory_gb"] for h in result.history),
            "train_seconds": result.seconds,
            "resumed_from_step": result.resumed_from,
        },
    }
