"""LoRA on mlx-lm's tuner: attach (seeded), disable (the free reference), fuse, save and load adapters."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_load_adapters

from dpoflow.runtime.io import atomic_path, write_json

# ---------------------------------------------------------------------------------------------------------
# LoRA (on mlx-lm's tuner)


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _seed_lora(model: nn.Module, seed: int) -> None:
    """Redraw every lora_a as mlx-lm does (uniform +-1/sqrt(in)), from keys derived from `seed` only,
    so attaching LoRA neither depends on nor disturbs MLX's global random state."""
    modules = sorted(lora_modules(model), key=lambda item: item[0])
    if not modules:
        return
    keys = mx.random.split(mx.random.key(seed), len(modules))
    for key, (_, module) in zip(keys, modules):
        bound = 1 / math.sqrt(module.lora_a.shape[0])
        module.lora_a = mx.random.uniform(-bound, bound, module.lora_a.shape, key=key)


def attach_lora(
    model: nn.Module,
    rank: int = 8,
    scale: float | None = None,
    alpha: float | None = None,
    dropout: float = 0.0,
    num_layers: int | None = None,
    keys: Sequence[str] | None = None,
    seed: int = 0,
) -> dict:
    """Freeze the base and wrap linear layers of the last `num_layers` blocks (all when None) in LoRA.

    The scale is either given directly (mlx-lm convention, default 20.0) or as `alpha` (PEFT convention,
    scale = alpha / rank). `keys` names layers inside a block (e.g. ["self_attn.q_proj"]); None means every
    linear layer, as mlx-lm does. Returns the adapter config that save_adapters writes.
    """
    if scale is not None and alpha is not None:
        raise ValueError("give either scale or alpha (scale = alpha / rank), not both")
    if alpha is not None:
        scale = alpha / rank
    lora_parameters = {"rank": rank, "scale": 20.0 if scale is None else scale, "dropout": dropout}
    if keys is not None:
        lora_parameters["keys"] = list(keys)
    num_layers = len(model.layers) if num_layers is None else num_layers
    training = model.training
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters)
    _seed_lora(model, seed)
    model.train(training)  # new LoRA dropout layers start in training mode; follow the model's mode
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model through the LoRA-wrapped one: every LoRA scale is 0 inside the block.

    This makes the frozen reference of DPO free (no second copy of the weights). Functions compiled
    with mx.compile capture the scale as a constant: call them outside/inside consistently.
    """
    modules = [m for _, m in lora_modules(model)]
    scales = [m.scale for m in modules]
    try:
        for m in modules:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(modules, scales):
            m.scale = s


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge each LoRA update into a plain Linear (as `mlx_lm fuse` does); the result is fully trainable."""
    fused = [(name, m.fuse()) for name, m in lora_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model.unfreeze()
    return model


def save_adapters(model: nn.Module, out_dir: Path, adapter_config: dict) -> Path:
    """adapters.safetensors (LoRA matrices only) + adapter_config.json, the layout mlx-lm reads."""
    weights = {
        name: w for name, w in tree_flatten(model.parameters()) if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    if not weights:
        raise ValueError("model has no LoRA parameters to save (call attach_lora first)")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        # sorted: byte-deterministic
        mx.save_safetensors(
            str(tmp / "adapters.safetensors"), dict(sorted(weights.items())), metadata={"format": "mlx"}
        )
        write_json(tmp / "adapter_config.json", adapter_config)
    return Path(out_dir)


def load_adapters(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Attach LoRA layers per adapter_config.json, load their weights, and leave only them trainable."""
    training = model.training
    _mlx_load_adapters(model, str(adapter_dir))
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    model.train(training)
    return model


def is_lora(module: nn.Module) -> bool:
    """A LoRA wrapper (mlx-lm's LoRALinear / LoRAEmbedding): it holds lora_a and lora_b."""
    return "lora_a" in module and "lora_b" in module


def has_lora(model: nn.Module) -> bool:
    return any(is_lora(m) for _, m in model.named_modules())


def base_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Flat parameters with LoRA stripped: the base weights under the adapters, named as in the plain model
    (`...q_proj.linear.weight` -> `...q_proj.weight`; lora_a / lora_b dropped)."""
    wrappers = {name for name, m in model.named_modules() if is_lora(m)}
    out = {}
    for key, value in tree_flatten(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        if owner in wrappers and leaf in ("lora_a", "lora_b"):
            continue
        inner_owner, _, inner = owner.rpartition(".")
        if inner_owner in wrappers and inner in ("linear", "embedding"):
            key = f"{inner_owner}.{leaf}"
        out[key] = value
    return out


def fused_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The model's weights with every LoRA update merged in, named as in the plain model (the model is unchanged)."""
    flat = base_parameters(model)
    for name, module in model.named_modules():
        if is_lora(module) and hasattr(module, "fuse"):
            fused = module.fuse()
            flat[f"{name}.weight"] = fused.weight
            if "bias" in fused:
                flat[f"{name}.bias"] = fused.bias
    return flat
