"""The trainable policy and its frozen reference (Stage 3), saved and loaded as a policy folder.

Reference = the Stage 1 SFT model (`models/sft`), frozen. Policy:
  * `lora` (default): LoRA adapters on the reference's own weights. The reference is the same module with the
    adapters switched off (`lora.lora_disabled`): one model in memory. LoRA B starts at zero, so the policy
    starts exactly at the reference (initial KL 0, not merely small).
  * `full`: a second module whose parameters start as the reference's arrays (MLX arrays are immutable, so no
    copy is made until the first optimizer update replaces them) and are all trainable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from dpoflow.modeling import loading, lora
from dpoflow.runtime import io
from dpoflow.runtime.errors import UserError

POLICY_CONFIG = "policy_config.json"


class StalePolicy(UserError, ValueError):
    """A saved policy was initialized from a different reference model than the one given."""


@dataclass
class Policy:
    model: nn.Module  # the trainable policy
    tokenizer: Any
    reference: nn.Module | None  # None: the reference is `model` with its LoRA adapters disabled
    finetune: str  # "lora" | "full"
    adapter_config: dict | None  # LoRA only: what save_adapters writes
    reference_dir: Path | None = None  # the folder the reference was loaded from (Stage 3's SFT model)
    reference_hash: str | None = None

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The frozen reference as a model: the separate one (full), or the policy with adapters off (LoRA).
        Build AND evaluate reference computations inside the block."""
        if self.reference is not None:
            yield self.reference
        else:
            with lora.lora_disabled(self.model) as ref:
                yield ref


class _ParameterView:
    """Just enough of an nn.Module (`.parameters()`) for loading.verify_same_architecture."""

    def __init__(self, flat: Mapping[str, mx.array]):
        self._flat = dict(flat)

    def parameters(self) -> dict:
        return tree_unflatten(list(self._flat.items()))


def _model_config(model: nn.Module, raw: dict | None = None) -> dict:
    """The model's architecture config with defaults filled in, from its ModelArgs (or `raw` parsed by the same
    ModelArgs class, so a config.json that omits a default compares equal to a loaded model)."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        return dict(raw or {})
    return dataclasses.asdict(type(args).from_dict(raw) if raw is not None else args)


def _folder_parameters(model_dir: Path, like: nn.Module, dtype: str | None) -> dict[str, mx.array]:
    """A model folder's weights (lazily: only names, shapes and dtypes are used), sanitized as mlx-lm loads them
    and cast to `dtype` when one is given."""
    weights: dict[str, mx.array] = {}
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        weights.update(mx.load(str(path)))
    if hasattr(like, "sanitize"):
        weights = like.sanitize(weights)
    if dtype is not None:
        target = getattr(mx, dtype)
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    return weights


def verify_architecture(policy: nn.Module, reference: nn.Module | str | Path, dtype: str | None = None) -> None:
    """Raise loading.ArchitectureMismatch naming the first difference between the policy and the reference:
    config keys (loading.ARCHITECTURE_KEYS), then parameter names, shapes and dtypes of the base weights (LoRA
    adapters stripped on both sides). `reference` is a model, or a model folder (its config.json and weight
    files; `dtype` = the dtype it was loaded with, if cast)."""
    if isinstance(reference, nn.Module):
        ref_config, ref_params = _model_config(reference), lora.base_parameters(reference)
    else:
        folder = Path(reference)
        ref_config = _model_config(policy, io.read_json(folder / "config.json"))
        ref_params = _folder_parameters(folder, policy, dtype)
    loading.verify_same_config(ref_config, _model_config(policy))
    loading.verify_same_architecture(_ParameterView(ref_params), _ParameterView(lora.base_parameters(policy)))


def _clone_of(reference: nn.Module, reference_dir: Path) -> nn.Module:
    """A second module of the same architecture whose parameters ARE the reference's arrays (no copy until an
    optimizer update replaces them). Built lazily: its own weights are never read from disk."""
    clone, _ = loading.load_model(reference_dir, lazy=True)
    clone.update(reference.parameters())
    clone.unfreeze()
    return clone


def build_policy(
    reference_dir: Path,
    finetune: str = "lora",
    *,
    lora_rank: int = 8,
    lora_scale: float = 20.0,
    lora_layers: int | None = None,
    seed: int = 0,
    dtype: str | None = "float32",
) -> Policy:
    """Load the reference from `reference_dir` and make a fresh policy at exactly the reference (Stage 3).

    Verifies the architectures (config, parameter names, shapes, dtypes) and raises ArchitectureMismatch with the
    first difference."""
    if finetune not in ("lora", "full"):
        raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    reference_dir = Path(reference_dir)
    model, tokenizer = loading.load_model(reference_dir, dtype=dtype)
    model.freeze()
    if finetune == "lora":
        adapter_config = lora.attach_lora(model, rank=lora_rank, scale=lora_scale, num_layers=lora_layers, seed=seed)
        mx.eval(model.parameters())
        policy = Policy(
            model, tokenizer, None, "lora", adapter_config, reference_dir, loading.model_hash(reference_dir)
        )
        verify_architecture(model, reference_dir, dtype)
    else:
        clone = _clone_of(model, reference_dir)
        policy = Policy(clone, tokenizer, model, "full", None, reference_dir, loading.model_hash(reference_dir))
        verify_architecture(clone, model)
    return policy


def save_policy(policy: Policy, out_dir: Path, weights: bool = True) -> Path:
    """Write a policy folder, atomically: `policy_config.json` (fine-tune type, the reference's hash) plus
    LoRA: adapters.safetensors + adapter_config.json (mlx-lm's layout);
    full: the full model folder when `weights`, else nothing more (the policy IS the reference: Stage 3).
    """
    out_dir = Path(out_dir)
    meta = {"fine_tune_type": policy.finetune, "reference_hash": policy.reference_hash}
    with io.atomic_path(out_dir) as tmp:  # weights and policy_config.json appear together, or not at all
        if policy.finetune == "lora":
            lora.save_adapters(policy.model, tmp, policy.adapter_config)
            io.write_json(tmp / POLICY_CONFIG, {**meta, "weights": "adapters.safetensors"})
        elif weights:
            loading.save_model(policy.model, policy.tokenizer, tmp, io.read_json(policy.reference_dir / "config.json"))
            io.write_json(tmp / POLICY_CONFIG, {**meta, "weights": "model.safetensors"})
        else:
            tmp.mkdir()
            io.write_json(tmp / POLICY_CONFIG, {**meta, "weights": "reference"})
    return out_dir


def load_policy(reference_dir: Path, policy_dir: Path, dtype: str | None = "float32") -> Policy:
    """Load the reference and a policy written by save_policy (Stage 3's init, or a trained one).

    Raises StalePolicy if the policy was made from another reference, ArchitectureMismatch if they differ."""
    reference_dir, policy_dir = Path(reference_dir), Path(policy_dir)
    meta = io.read_json(policy_dir / POLICY_CONFIG)
    ref_hash = loading.model_hash(reference_dir)
    if meta["reference_hash"] != ref_hash:
        raise StalePolicy(
            f"{policy_dir} was initialized from a reference with hash {meta['reference_hash'][:12]}, "
            f"but {reference_dir} has hash {ref_hash[:12]}: rerun Stage 3 (dvc repro init)"
        )
    model, tokenizer = loading.load_model(reference_dir, dtype=dtype)
    model.freeze()
    if meta["fine_tune_type"] == "lora":
        lora.load_adapters(model, policy_dir)
        mx.eval(model.parameters())
        adapter_config = io.read_json(policy_dir / "adapter_config.json")
        policy = Policy(model, tokenizer, None, "lora", adapter_config, reference_dir, ref_hash)
        verify_architecture(model, reference_dir, dtype)
        return policy
    clone = _clone_of(model, reference_dir)
    if meta["weights"] != "reference":
        clone.load_weights(str(policy_dir / meta["weights"]))
        if dtype is not None:
            clone.set_dtype(getattr(mx, dtype))
        mx.eval(clone.parameters())
    clone.unfreeze()
    verify_architecture(clone, model)
    return Policy(clone, tokenizer, model, "full", None, reference_dir, ref_hash)


def reset_policy(policy: nn.Module, snapshot: list[tuple[str, mx.array]]) -> None:
    """Put back trainable parameters taken with `tree_flatten(policy.trainable_parameters())` (free: MLX arrays
    are immutable, so the snapshot holds the original arrays, not copies)."""
    policy.update(tree_unflatten(list(snapshot)))
    mx.eval(policy.parameters())


def trainable_parameter_count(model: nn.Module) -> int:
    return int(sum(v.size for _, v in tree_flatten(model.trainable_parameters())))
