"""The one training loop (SFT, reward model and DPO share it), in the style of mlx-lm's tuner.

    for step in range(start, steps):
        batch = batch_at(step)                          # deterministic in (seed, step): resume needs only `step`
        (loss, aux), grads = value_and_grad(model, batch)
        grads = clip(grads); optimizer.update(model, grads)
        report aux to the logger; every N steps: evaluate, checkpoint (atomic)

A checkpoint holds the trainable parameters, the optimizer state, the step and the metric history; the random
state is re-seeded from (seed, step) at every step, so a killed run resumes where it stopped and ends with the same
final metrics as an uninterrupted one. Non-finite loss or gradients stop training with `TrainingDiverged`; the last
good checkpoint stays on disk. An `evaluate` callback may raise `StopTraining` to end training early and cleanly.

Data parallel (docs/distributed.md): under `mlx.launch` each rank gets its shard of every global micro-batch
(`BatchSchedule.shard`) with a weight (the examples or tokens its loss averages over); gradients and metrics are
scaled by the rank's share of the global weight and summed over ranks, so a step equals the single-process step at
the same global batch. Only rank 0 logs, checkpoints and (in the stages) writes artifacts.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from dpoflow.core.batching import length_grouped_batches
from dpoflow.runtime import distributed, io
from dpoflow.runtime.errors import UserError
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.checkpoint import load_checkpoint, save_checkpoint

Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[mx.array, dict[str, mx.array]]]


class TrainingDiverged(UserError, RuntimeError):
    """Loss or gradients became NaN/Inf."""


class StopTraining(Exception):
    """Raised by an `evaluate` callback to end training after the current step (e.g. the DPO KL check).

    `metrics` (the evaluation that triggered the stop) are recorded like any evaluation; train() then returns
    normally with `TrainResult.stopped = reason`. No checkpoint is written for the stopping step.
    """

    def __init__(self, reason: str, metrics: dict[str, float] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.metrics = dict(metrics or {})


@dataclass
class TrainConfig:
    steps: int
    learning_rate: float
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    grad_accumulation: int = 1
    weight_decay: float = 0.0
    checkpoint_every: int = 0  # 0 = no checkpoints
    eval_every: int = 0  # 0 = evaluate only at the end
    seed: int = 0
    checkpoint_dir: Path | None = None
    fingerprint: str = ""  # anything that must match for a checkpoint to be resumed (params, data)
    desc: str = "train"


@dataclass
class TrainResult:
    steps: int  # optimizer steps done (== cfg.steps unless stopped)
    history: list[dict] = field(default_factory=list)  # one dict of floats per step
    evals: list[dict] = field(default_factory=list)  # one dict per evaluation (with "step")
    resumed_from: int = 0
    seconds: float = 0.0
    stopped: str | None = None  # StopTraining reason, None if all steps ran


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warmup then cosine decay to 10% of the peak rate."""
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    cosine = optim.cosine_decay(cfg.learning_rate, decay_steps, end=cfg.learning_rate * 0.1)
    if cfg.warmup_steps > 0:
        warmup = optim.linear_schedule(cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate, cfg.warmup_steps)
        schedule = optim.join_schedules([warmup, cosine], [cfg.warmup_steps])
    else:
        schedule = cosine
    return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


def step_seed(seed: int, step: int) -> int:
    """The random seed of optimizer step `step`: a resumed run needs no saved random state (mlx 0.32 cannot
    restore one anyway: `mx.random.state` is read-only)."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63)


def _log_step(logger: MetricLogger, metrics: dict, evals: list[dict]) -> None:
    row = {f"train/{key}": value for key, value in metrics.items() if key != "step"}
    for result in evals:
        row.update(
            {f"eval/{key}": value for key, value in result.items() if key != "step" and isinstance(value, (int, float))}
        )
    logger.log_step(row)


def _replay(logger: MetricLogger, history: list[dict], evals: list[dict]) -> None:
    for metrics in history:
        _log_step(logger, metrics, [e for e in evals if e["step"] == metrics["step"]])


def _with_weight(item: Any) -> tuple[Batch, float]:
    return item if isinstance(item, tuple) else (item, 1.0)


def _to_floats(aux: dict[str, mx.array]) -> dict[str, float]:
    return {k: float(v.item()) if isinstance(v, mx.array) else float(v) for k, v in aux.items()}


# --------------------------------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    loss_fn: LossFn,
    batch_at: Callable[[int, int], Any],
    cfg: TrainConfig,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    logger: MetricLogger | None = None,
    tokens_in: Callable[[Batch], int] = lambda b: 0,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters for cfg.steps optimizer steps.

    batch_at(step, micro) returns (batch, weight): this rank's part of micro-batch `micro` of optimizer step `step`
    (deterministic; all of it on one process) and the number of examples or tokens its loss is a mean over (0 for a
    stand-in, see BatchSchedule.shard); a plain batch means weight 1 (equal shares when data parallel).
    loss_fn(model, batch) returns (scalar loss, aux metrics: batch means).
    evaluate(step) returns metrics to log; it may raise to stop training early: StopTraining ends it cleanly (train
    returns), any other exception propagates.
    logger receives every step's metrics (training/callbacks.MetricLogger; rank 0 only). on_step(step, metrics) runs
    at the end of every completed step (after its
    checkpoint, if any); an exception raised there propagates (tests use it to simulate a killed run).
    """
    mx.random.seed(cfg.seed)
    optimizer = make_optimizer(cfg)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    start, history, evals = 0, [], []
    ckpt = cfg.checkpoint_dir
    main = distributed.is_main_process()
    if ckpt is not None and main:
        io.recover(ckpt)  # killed while replacing the checkpoint: the previous one is put back
    distributed.barrier()
    found = ckpt is not None and (ckpt / "state.json").exists()
    if found and io.read_json(ckpt / "state.json").get("fingerprint", "") == cfg.fingerprint:
        start, history, evals = load_checkpoint(ckpt, model, optimizer)
    distributed.check_same("the step to resume from", start)  # every rank must resume from the same checkpoint
    if found and start == 0 and main:  # params or data changed since the checkpoint: start over
        shutil.rmtree(ckpt)
    if logger is not None and main:
        _replay(logger, history, evals)  # a resumed run's curves start from step 1, not from the checkpoint
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    bar = tqdm(
        range(start, cfg.steps),
        desc=cfg.desc,
        initial=start,
        total=cfg.steps,
        unit="step",
        dynamic_ncols=True,
        disable=not main,
    )
    stopped: str | None = None
    for step in bar:
        step_start = time.perf_counter()
        mx.random.seed(step_seed(cfg.seed, step))
        grads_sum, aux_sum, n_tokens = None, {}, 0
        for micro in range(cfg.grad_accumulation):
            batch, weight = _with_weight(batch_at(step, micro))
            share = distributed.share(weight)  # this rank's part of the global micro-batch (1.0 on one process)
            (loss, aux), grads = value_and_grad(model, batch)
            n_tokens += tokens_in(batch) if weight else 0
            if share != 1.0:
                grads = tree_map(lambda g: g * share, grads)  # noqa: B023 (applied here, not later)
            grads_sum = (
                grads
                if grads_sum is None
                else tree_unflatten(
                    [(k, g + h) for (k, g), (_, h) in zip(tree_flatten(grads_sum), tree_flatten(grads))]
                )
            )
            aux = {"loss": loss, **aux}
            aux_sum = {k: aux_sum.get(k, 0) + share * v for k, v in aux.items()}
        grads = tree_unflatten([(k, g / cfg.grad_accumulation) for k, g in tree_flatten(grads_sum)])
        grads = distributed.sum_gradients(grads)  # the global batch's mean gradient, identical on every rank
        aux_sum = distributed.sum_values({**aux_sum, "tokens": n_tokens})
        n_tokens = int(aux_sum.pop("tokens"))
        if cfg.max_grad_norm:
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            grad_norm = optim.clip_grad_norm(grads, float("inf"))[1]
        metrics = _to_floats({k: v / cfg.grad_accumulation for k, v in aux_sum.items()})
        metrics["grad_norm"] = float(grad_norm.item())
        if not all(math.isfinite(v) for v in (metrics["loss"], metrics["grad_norm"])):
            raise TrainingDiverged(
                f"{cfg.desc}: non-finite {'loss' if not math.isfinite(metrics['loss']) else 'gradient norm'} at step "
                f"{step + 1}; last good checkpoint kept at {ckpt or '(none: checkpointing off)'}. "
                "Lower the learning rate or check the data for empty/over-long rows."
            )
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        seconds = time.perf_counter() - step_start
        metrics["learning_rate"] = float(optimizer.learning_rate.item())
        metrics["tokens_per_sec"] = n_tokens / seconds if n_tokens else 0.0
        metrics["step_seconds"] = seconds
        metrics["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        metrics["step"] = step + 1
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
        done = step + 1 == cfg.steps
        if evaluate is not None and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            try:
                evals.append({"step": step + 1, **evaluate(step + 1)})
            except StopTraining as stop:
                evals.append({"step": step + 1, **stop.metrics})
                stopped = stop.reason
            stopped = distributed.decision_of_main(stopped)  # all ranks stop together, as rank 0 decided
        if logger is not None and main:
            _log_step(logger, metrics, [e for e in evals if e["step"] == step + 1])
        if stopped is not None:
            break
        if ckpt is not None and main and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not done:
            save_checkpoint(ckpt, model, optimizer, step + 1, history, evals, cfg.fingerprint)
        if on_step is not None:
            on_step(step + 1, metrics)
    bar.close()
    return TrainResult(
        steps=history[-1]["step"] if history else start,
        history=history,
        evals=evals,
        resumed_from=start,
        seconds=time.perf_counter() - t0,
        stopped=stopped,
    )


def summarize(history: list[dict], keys: list[str], last: int = 10) -> dict[str, float]:
    """Mean of the last `last` steps of each key (a stable end-of-training figure)."""
    tail = history[-last:]
    return {k: sum(h[k] for h in tail) / len(tail) for k in keys if tail and k in tail[0]}


class BatchSchedule:
    """Which examples form micro-batch `micro` of optimizer step `step`: length-grouped, reshuffled each epoch.

    Deterministic in (seed, step), so a resumed run sees exactly the batches the killed run would have seen.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, grad_accumulation: int = 1):
        self.lengths, self.batch_size, self.seed, self.accum = list(lengths), batch_size, seed, grad_accumulation
        self._epochs: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)}
        return self._epochs[epoch]

    def __call__(self, step: int, micro: int = 0) -> list[int]:
        """The global micro-batch `micro` of optimizer step `step` (every rank computes the same)."""
        k = step * self.accum + micro
        return self._epoch(k // self.per_epoch)[k % self.per_epoch]

    def shard(self, step: int, micro: int = 0) -> tuple[list[int], float]:
        """(indices, keep): this rank's part of the global micro-batch, every size-th index from position rank
        (strided: the batch is sorted by length, so the shards get similar lengths), and keep = 1.0. A rank left
        with nothing (a global batch smaller than the number of ranks) gets the first index as a stand-in and
        keep = 0.0: it runs the same forward/backward and all-reduce, with weight 0 (batch_at returns keep * weight).
        """
        indices, rank, size = self(step, micro), distributed.rank(), distributed.size()
        mine = indices[rank::size]
        return (mine, 1.0) if mine else (indices[:1], 0.0)
