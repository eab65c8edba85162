"""Data-parallel training over MLX's distributed layer (`mx.distributed`): the process group and its few operations.

Launch N processes with `mlx.launch` (docs/distributed.md); every rank runs the same stage script. The trainer
gives each rank its shard of every global batch (`trainer.BatchSchedule.shard`), sums the rank-weighted gradients
and metrics across ranks (`share`, `sum_gradients`, `sum_values`) so the step equals the single-process step at the
same global batch, and only rank 0 writes artifacts (`is_main_process`; `dpoflow.runtime.io` refuses writes elsewhere).

One process (not launched, or `distributed.backend: none`) is the group-less case: every function here is then a
no-op without any communication, so single-process results are bit-for-bit what they were without this module.
"""

from __future__ import annotations

import os
from typing import Any

import click

from dpoflow.runtime.params import BACKENDS

_state: dict[str, Any] = {"initialized": False, "group": None}


class DistributedError(click.ClickException, RuntimeError):
    """The distributed setup cannot work (backend unavailable, not launched, ranks disagree); a stage script prints
    `Error: <message>` and exits 1."""


def init(backend: str = "auto") -> None:
    """Join the process group once, before training. `auto`: whatever `mlx.launch` set up (one process if not
    launched); `ring`/`mpi`/`jaccl`/`nccl`: that backend, and launching is required; `none`: one process."""
    import mlx.core as mx

    if backend not in BACKENDS:
        raise DistributedError(
            f"distributed.backend: {backend!r} is not allowed; allowed values: {', '.join(BACKENDS)}"
        )
    group = None
    if backend == "auto":
        group = mx.distributed.init(strict=False, backend="any")
    elif backend != "none":
        if not mx.distributed.is_available(backend):
            available = [b for b in BACKENDS[1:-1] if mx.distributed.is_available(b)]
            raise DistributedError(
                f"distributed.backend {backend!r} is not available in this MLX build "
                f"(available: {', '.join(available) or 'none'}); use auto or none"
            )
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as err:
            raise DistributedError(
                f"distributed.backend {backend!r}: cannot join the process group ({err}). Start the stage with "
                f"`mlx.launch --backend {backend} -n N [--hostfile hosts.json] --python .venv/bin/python "
                "stages/<stage>.py` (docs/distributed.md), or set distributed.backend: auto"
            ) from None
    _state.update(initialized=True, group=group if group is not None and group.size() > 1 else None)


def group() -> Any | None:
    """The data-parallel group, or None for one process (joins with backend `auto` on first use)."""
    if not _state["initialized"]:
        init("auto")
    return _state["group"]


def rank() -> int:
    g = group()
    return 0 if g is None else g.rank()


def size() -> int:
    g = group()
    return 1 if g is None else g.size()


def is_main_process() -> bool:
    """Rank 0: the only process that writes artifacts, checkpoints, metrics and curves."""
    return rank() == 0


def current_rank() -> int:
    """This process's rank without joining a group (for `dpoflow.runtime.io`'s write guard): the group's once joined,
    before that the one `mlx.launch` exported (MLX_RANK), else 0."""
    if _state["initialized"]:
        return rank()
    return int(os.environ.get("MLX_RANK", "0") or 0)


def share(weight: float) -> float:
    """This rank's fraction of a global micro-batch: weight / sum of all ranks' weights (examples or tokens the
    loss averages over). Summing share * (per-rank mean) over ranks gives the mean over the global batch."""
    g = group()
    if g is None:
        return 1.0
    import mlx.core as mx

    total = mx.distributed.all_sum(mx.array(float(weight), dtype=mx.float32), group=g).item()
    if total <= 0:
        raise DistributedError("a global batch with zero weight (no examples or no completion tokens)")
    return float(weight) / total


def sum_gradients(grads: Any) -> Any:
    """Sum a gradient tree over the ranks (each already scaled by its `share`): bucketed all-reduce."""
    g = group()
    if g is None:
        return grads
    import mlx.nn as nn
    from mlx.utils import tree_map

    n = g.size()  # average_gradients divides by the group size: scale up first (exact for powers of two)
    return nn.average_gradients(tree_map(lambda x: x * n, grads), group=g)


def sum_values(values: dict[str, Any]) -> dict[str, Any]:
    """Sum scalar metrics (arrays or floats) over the ranks in one all-reduce; same keys on every rank."""
    g = group()
    if g is None or not values:
        return values
    import mlx.core as mx

    keys = sorted(values)
    summed = mx.distributed.all_sum(
        mx.stack([mx.array(values[k], dtype=mx.float32).reshape(()) for k in keys]), group=g
    )
    return dict(zip(keys, summed))


def check_same(what: str, value: int) -> None:
    """Raise on every rank unless all ranks hold the same integer `value` (also a barrier)."""
    g = group()
    if g is None:
        return
    import mlx.core as mx

    x = mx.array([value], dtype=mx.int32)
    lo, hi = mx.distributed.all_min(x, group=g).item(), mx.distributed.all_max(x, group=g).item()
    if lo != hi:
        raise DistributedError(
            f"rank {g.rank()}: {what} is {value} here, but ranges over {lo}..{hi} across the ranks. Resuming needs "
            "the checkpoint directory on storage that every rank sees (or delete it to start over)"
        )


def barrier() -> None:
    check_same("barrier", 0)


def decision_of_main(reason: str | None) -> str | None:
    """Rank 0's stop decision, on every rank (they must stop at the same step or the next all-reduce hangs)."""
    g = group()
    if g is None:
        return reason
    import mlx.core as mx

    stop = mx.distributed.all_sum(mx.array(1 if (reason is not None and g.rank() == 0) else 0), group=g).item()
    if not stop:
        return None
    return reason if reason is not None else "stopped by rank 0"


def alone(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) as a single process, also on rank 0 of a launched group: for code that joins the global
    group by itself (mlx-lm's lm-eval adapter shards its requests over all ranks and would wait for ranks that have
    moved on). Under a group, fn (a picklable module-level function) runs in a fresh interpreter started without
    the launcher's environment; on one process it is just called."""
    if size() == 1:
        return fn(*args, **kwargs)
    import multiprocessing

    launcher_env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("MLX_", "OMPI_", "PMI", "NCCL_"))}
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args, kwargs)
    finally:
        os.environ.update(launcher_env)
