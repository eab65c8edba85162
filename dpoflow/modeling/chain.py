"""Policy chains: a trained policy as a sequence of snapshots applied to the SFT weights (Stage 6's rounds).

With LoRA and iterate.reference `initial`, one adapter set relative to SFT (it keeps training round after
round); with `previous`, the adapters of rounds 0..k, each fused before the next is attached; with full
fine-tuning, one full weight folder. `models/selected` holds the chain of the selected round + `selection.json`;
`load_selected` rebuilds it, `export_fused` writes it as a standalone mlx-lm folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from dpoflow.modeling import loading, lora
from dpoflow.modeling.policy import POLICY_CONFIG, Policy, load_policy
from dpoflow.runtime import io

SELECTION_FILE = "selection.json"
SELECTION_FORMAT = "dpoflow-selected-v1"


def finetune_of(snapshot: Path) -> str:
    return io.read_json(Path(snapshot) / POLICY_CONFIG)["fine_tune_type"]


def load_chain(
    sft_dir: Path, chain: Sequence[Path], dtype: str | None = "float32"
) -> tuple[nn.Module, Any, nn.Module | None, dict | None]:
    """Rebuild a round's policy from its chain of snapshots: (model, tokenizer, reference, adapter_config).

    LoRA: SFT weights, every snapshot but the last fused in turn, the last attached as trainable LoRA adapters;
    reference None (= the model with its adapters disabled, i.e. SFT + the fused snapshots). Full: the last
    snapshot's weights (dpoflow.modeling.policy.load_policy), reference = the SFT model."""
    chain = [Path(c) for c in chain]
    if not chain:
        raise ValueError("empty policy chain")
    if finetune_of(chain[-1]) == "full":
        policy = load_policy(Path(sft_dir), chain[-1], dtype=dtype)
        return policy.model, policy.tokenizer, policy.reference, None
    model, tokenizer = loading.load_model(sft_dir, dtype=dtype)
    model.freeze()
    for snapshot in chain[:-1]:
        lora.load_adapters(model, snapshot)
        lora.fuse_lora(model)
        model.freeze()
    lora.load_adapters(model, chain[-1])
    mx.eval(model.parameters())
    return model, tokenizer, None, io.read_json(chain[-1] / "adapter_config.json")


def export_fused(model: nn.Module, tokenizer: Any, sft_dir: Path, out_dir: Path) -> Path:
    """Write `model` (LoRA merged) as a standalone mlx-lm folder with SFT's config and tokenizer files."""
    plain, _ = loading.load_model(sft_dir, lazy=True)
    plain.update(tree_unflatten(list(lora.fused_parameters(model).items())))
    mx.eval(plain.parameters())
    return loading.save_model(plain, tokenizer, Path(out_dir), io.read_json(Path(sft_dir) / "config.json"))


def _frozen_copy(model: nn.Module, sft_dir: Path) -> nn.Module:
    """A frozen module holding `model`'s current arrays (MLX arrays are immutable: no copy is made)."""
    ref, _ = loading.load_model(sft_dir, lazy=True)
    ref.update(model.parameters())
    ref.freeze()
    mx.eval(ref.parameters())
    return ref


def round_policy(
    sft_dir: Path, chain: Sequence[Path], reference: str, round_index: int, seed: int, dtype: str | None = "float32"
) -> Policy:
    """The policy that round `round_index` trains, starting from the previous round's chain, and its reference.

    initial: the chain as is (LoRA continues; reference = SFT). previous: LoRA -> the whole chain fused, fresh
    LoRA adapters (same config, B = 0, seeded by seed + round) attached: reference = the adapters disabled = the
    previous policy; full -> reference = a frozen copy of the previous weights."""
    model, tokenizer, ref, adapter_config = load_chain(sft_dir, chain, dtype)
    if adapter_config is None:  # full fine-tuning
        if reference == "previous":
            ref = _frozen_copy(model, Path(sft_dir))
        return Policy(model, tokenizer, ref, "full", None)
    if reference == "previous":
        lora.fuse_lora(model)
        model.freeze()
        lp = adapter_config["lora_parameters"]
        adapter_config = lora.attach_lora(
            model,
            rank=lp["rank"],
            scale=lp["scale"],
            dropout=lp.get("dropout", 0.0),
            num_layers=adapter_config["num_layers"],
            keys=lp.get("keys"),
            seed=seed + round_index,
        )
        mx.eval(model.parameters())
    return Policy(model, tokenizer, None, "lora", adapter_config)


def save_snapshot(
    policy: Policy, out_dir: Path, sft_hash: str, round_index: int, reference: str, sft_dir: Path
) -> Path:
    """A round's snapshot: LoRA adapters (+ adapter_config.json) or full weights, plus policy_config.json."""
    out_dir = Path(out_dir)
    with io.atomic_path(out_dir) as tmp:  # weights and policy_config.json appear together, or not at all
        if policy.finetune == "lora":
            lora.save_adapters(policy.model, tmp, policy.adapter_config)
            weights = "adapters.safetensors"
        else:
            loading.save_model(policy.model, policy.tokenizer, tmp, io.read_json(Path(sft_dir) / "config.json"))
            weights = "model.safetensors"
        io.write_json(
            tmp / POLICY_CONFIG,
            {
                "fine_tune_type": policy.finetune,
                "reference_hash": sft_hash,
                "weights": weights,
                "round": round_index,
                # previous-reference LoRA adapters apply on top of the earlier rounds fused, not on SFT:
                # use load_selected
                "applies_to": "sft" if (policy.finetune == "full" or reference == "initial") else "chain",
            },
        )
    return out_dir


def chain_for(
    chains: Mapping[int, list[Path]], round_index: int, snapshot: Path, finetune: str, reference: str
) -> list[Path]:
    """The chain of round `round_index` given the previous round's and this round's snapshot."""
    if finetune == "lora" and reference == "previous":
        return list(chains[round_index - 1]) + [Path(snapshot)]
    return [Path(snapshot)]


def save_selected(out_dir: Path, chain: Sequence[Path], info: Mapping[str, Any]) -> Path:
    """The selected policy's folder: chain/00.. (the snapshots), selection.json; with a single LoRA snapshot its
    adapter files also at the top level, so `mlx_lm.generate --model <sft> --adapter-path <this folder>` works."""
    chain = [Path(c) for c in chain]
    with io.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        names = []
        for i, snapshot in enumerate(chain):
            name = f"chain/{i:02d}"
            shutil.copytree(snapshot, tmp / name)
            names.append(name)
        adapter_path = len(chain) == 1 and finetune_of(chain[0]) == "lora"
        if adapter_path:
            for f in ("adapters.safetensors", "adapter_config.json", POLICY_CONFIG):
                shutil.copyfile(chain[0] / f, tmp / f)
        io.write_json(
            tmp / SELECTION_FILE,
            {
                **dict(info),
                "format": SELECTION_FORMAT,
                "chain": names,
                "finetune": finetune_of(chain[-1]),
                "mlx_lm_adapter_path": adapter_path,
            },
        )
    return Path(out_dir)


def read_selection(selected_dir: Path) -> dict:
    path = Path(selected_dir) / SELECTION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run Stage 6 (dvc repro iterate)")
    selection = io.read_json(path)
    if selection.get("format") != SELECTION_FORMAT:
        raise ValueError(f"{path}: not a dpoflow selection (format {selection.get('format')!r})")
    return selection


def load_selected(
    sft_dir: Path, selected_dir: Path, dtype: str | None = "float32", fuse: bool = True
) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, selection) of models/selected on the SFT model. fuse=True gives a plain model (LoRA merged);
    fuse=False keeps the last snapshot's adapters attached."""
    selection = read_selection(selected_dir)
    sft_hash = loading.model_hash(Path(sft_dir))
    if selection.get("reference_hash") not in (None, sft_hash):
        raise ValueError(
            f"{selected_dir} was trained on an SFT model with hash {selection['reference_hash'][:12]}, "
            f"but {sft_dir} has hash {sft_hash[:12]}: rerun Stage 6 (dvc repro iterate)"
        )
    chain = [Path(selected_dir) / name for name in selection["chain"]]
    model, tokenizer, _, adapter_config = load_chain(sft_dir, chain, dtype)
    if fuse and adapter_config is not None:
        lora.fuse_lora(model)
    if fuse:
        model.freeze()
        mx.eval(model.parameters())
    return model, tokenizer, selection


def export_final(
    sft_dir: str | Path, selected_dir: str | Path, out_dir: str | Path, dtype: str | None = "float32"
) -> dict:
    """The selected policy with every adapter fused, as a standalone mlx-lm folder (config, weights, tokenizer +
    chat template) that `mlx_lm.generate --model <out_dir>` and lm-eval (mlx_lm.evaluate.MLXLM) load directly; plus
    export_info.json (selected round, its reference, the SFT hash). Returns export_info."""
    model, tokenizer, selection = load_selected(Path(sft_dir), Path(selected_dir), dtype=dtype, fuse=True)
    with io.atomic_path(out_dir) as tmp:  # the model and export_info.json appear together, or not at all
        loading.save_model(model, tokenizer, tmp, io.read_json(Path(sft_dir) / "config.json"))
        info = {
            "selected_round": selection.get("round"),
            "reference": selection.get("reference"),
            "iterate_reference": selection.get("iterate_reference"),
            "sft_hash": selection.get("reference_hash"),
            "finetune": selection.get("finetune"),
            "model_hash": loading.model_hash(tmp),
        }
        io.write_json(tmp / "export_info.json", info)
    return info
