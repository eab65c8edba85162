"""Resume checkpoints of the training loop: the trainable weights, the optimizer state, the step and the metric
history, written atomically (a killed write leaves the previous checkpoint)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from dpoflow.runtime import io


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: optim.Optimizer,
    step: int,
    history: list[dict],
    evals: list[dict],
    fingerprint: str = "",
) -> None:
    """Atomically write trainable weights, optimizer state, step and history to `path`."""
    with io.atomic_path(path) as tmp:
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(
            str(tmp / "optimizer.safetensors"), {k: v for k, v in opt_state.items() if isinstance(v, mx.array)}
        )
        io.write_json(
            tmp / "state.json", {"step": step, "history": history, "evals": evals, "fingerprint": fingerprint}
        )


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> tuple[int, list[dict], list[dict]]:
    state = io.read_json(path / "state.json")
    model.load_weights(list(mx.load(str(path / "trainable.safetensors")).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    return int(state["step"]), state["history"], state["evals"]
