"""Batch-size tuner: time the DPO training step (Stage 5's own: trainer.train + dpo.make_loss_fn on cached
reference log-probs) at candidate batch sizes on this chip and pick the one to put under it in params.yaml.

    python -m dpoflow tune-batch [--model models/sft] [--candidates 1,2,4,8,16,32]

For each batch size B (pairs per step): a few steps on synthetic pairs of the given prompt/completion lengths,
best step time (the machine may be shared), pairs/s and peak memory. Larger batches are tried while memory stays
under `memory_fraction` of the machine's RAM; the choice is the smallest B whose throughput is within `tolerance`
of the best one (a smaller batch means more optimizer steps per epoch for the same speed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from dpoflow.core.batching import ChosenRejected, EncodedPair, pad_id
from dpoflow.modeling.policy import build_policy
from dpoflow.training.dpo import make_batch, make_loss_fn
from dpoflow.training.trainer import TrainConfig, train

DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32)


@dataclass
class Trial:
    batch_size: int
    step_seconds: float  # best of the timed steps
    pairs_per_sec: float
    tokens_per_sec: float
    peak_memory_gb: float


def total_memory_gb() -> float:
    """This machine's RAM (MLX's unified memory size where it reports one)."""

    size = mx.device_info().get("memory_size")
    if size:
        return float(size) / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def synthetic_pairs(vocab_size: int, n: int, prompt_len: int, completion_len: int, eos: int, seed: int = 0):

    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, vocab_size, size=k).tolist()  # noqa: E731
    return [
        EncodedPair(ids(prompt_len), ids(completion_len - 1) + [eos], ids(completion_len - 1) + [eos]) for _ in range(n)
    ]


def time_batch_size(policy, batch_size: int, prompt_len: int, completion_len: int, steps: int, dpo_params) -> Trial:
    """Best step time of `steps` Stage 5 steps (after one warm-up step) at `batch_size` pairs."""

    tok = policy.tokenizer
    encoded = synthetic_pairs(
        policy.model.args.vocab_size, batch_size, prompt_len, completion_len, int(tok.eos_token_id), seed=batch_size
    )
    ref = ChosenRejected(np.full(batch_size, -20.0, np.float32), np.full(batch_size, -20.0, np.float32))
    batch = make_batch(encoded, range(batch_size), ref, pad_id(tok))
    cfg = TrainConfig(
        steps=steps + 1,
        learning_rate=dpo_params.learning_rate,
        max_grad_norm=dpo_params.max_grad_norm,
        seed=0,
        desc=f"tune-batch {batch_size}",
    )
    snapshot = dict(_trainable(policy.model))
    mx.reset_peak_memory()
    result = train(
        policy.model, make_loss_fn(dpo_params), lambda step, micro: batch, cfg, tokens_in=lambda b: b.n_tokens
    )
    policy.model.update(_unflatten(snapshot))  # leave the policy as it was
    best = min(h["step_seconds"] for h in result.history[1:])
    return Trial(
        batch_size, best, batch_size / best, batch.n_tokens / best, max(h["peak_memory_gb"] for h in result.history)
    )


def _trainable(model):

    return tree_flatten(model.trainable_parameters())


def _unflatten(items):

    return tree_unflatten(list(items.items()))


def choose(trials: Sequence[Trial], tolerance: float = 0.05) -> Trial:
    """The smallest batch size within `tolerance` of the best pairs/s."""
    best = max(t.pairs_per_sec for t in trials)
    return min((t for t in trials if t.pairs_per_sec >= (1 - tolerance) * best), key=lambda t: t.batch_size)


def tune_batch(
    model_dir: Path,
    dpo_params,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    prompt_len: int = 48,
    completion_len: int = 24,
    steps: int = 2,
    memory_fraction: float = 0.6,
    memory_gb: float | None = None,
    log=print,
) -> tuple[list[Trial], Trial]:
    """Time each candidate (ascending) until one would not fit; return (trials, chosen)."""

    policy = build_policy(
        Path(model_dir),
        dpo_params.finetune,
        lora_rank=dpo_params.lora_rank,
        lora_scale=dpo_params.lora_scale,
        lora_layers=dpo_params.lora_layers,
        seed=0,
    )
    budget = memory_fraction * (memory_gb if memory_gb is not None else total_memory_gb())
    trials: list[Trial] = []
    for b in sorted({int(c) for c in candidates}):
        if trials and trials[-1].peak_memory_gb * b / trials[-1].batch_size > budget:
            log(f"batch {b}: skipped, projected peak memory over {budget:.1f} GB")
            break
        trial = time_batch_size(policy, b, prompt_len, completion_len, steps, dpo_params)
        log(
            f"batch {b:>3}: {trial.step_seconds:7.2f} s/step  {trial.pairs_per_sec:7.2f} pairs/s  "
            f"{trial.tokens_per_sec:8.0f} tok/s  peak {trial.peak_memory_gb:.2f} GB"
        )
        if trial.peak_memory_gb > budget:
            log(f"batch {b}: over the memory budget ({budget:.1f} GB): not eligible")
            break
        trials.append(trial)
    if not trials:
        raise RuntimeError(f"no candidate batch size fits in {budget:.1f} GB")
    return trials, choose(trials)
