"""Stage 3: the frozen reference, the trainable policy, the one KL measurement, and cached reference log-probs.

Reference = the Stage 1 SFT model (`models/sft`), frozen. Policy:
  * `lora` (default): LoRA adapters on the reference's own weights. The reference is the same module with the
    adapters switched off (`models.lora_disabled`): one model in memory. LoRA B starts at zero, so the policy
    starts exactly at the reference (initial KL 0, not merely small).
  * `full`: a second module whose parameters start as the reference's arrays (MLX arrays are immutable, so no
    copy is made until the first optimizer update replaces them) and are all trainable.

KL (the one definition, dpoflow.kl): exact mean per-token KL(policy || reference) over the full vocabulary, at
every position of completions SAMPLED FROM THE POLICY (temperature 1.0) on held-out prompts; the same prompts,
seed and sample count every time, so numbers from Stages 3, 5, 6 and 7 are comparable (`measure_kl`).

Reference log-probs of every chosen and rejected completion are computed once here and cached in
`data/ref_logps.safetensors` (keys `<split>/chosen`, `<split>/rejected`, in row order), so Stage 5 trains without
running the reference. The cache's metadata holds a hash of the pair ids, the truncation length and the reference
model's hash: a cache that no longer matches its pairs or model is refused (`StaleRefLogps`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from dpoflow import io, models, tasks
from dpoflow.batching import SeqBatch, collate_pairs, collate_sequences, encode_pair, encode_prompt, split_pairs
from dpoflow.generation import generate
from dpoflow.kl import policy_reference_kl
from dpoflow.logprobs import completion_logprobs, full_logits_at

POLICY_CONFIG = "policy_config.json"
REF_LOGPS_FORMAT = "dpoflow-ref-logps-v1"
KL_TEMPERATURE = 1.0


class StaleRefLogps(ValueError):
    """The reference log-prob cache does not belong to these pairs / this reference model / this max_len."""


class StalePolicy(ValueError):
    """A saved policy was initialized from a different reference model than the one given."""


# ---------------------------------------------------------------------------------------------------------
# Policy and reference


@dataclass
class Policy:
    model: nn.Module                 # the trainable policy
    tokenizer: Any
    reference: Optional[nn.Module]   # None: the reference is `model` with its LoRA adapters disabled
    finetune: str                    # "lora" | "full"
    adapter_config: Optional[dict]   # LoRA only: what save_adapters writes
    reference_dir: Path
    reference_hash: str

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The frozen reference as a model: the separate one (full), or the policy with adapters off (LoRA).
        Build AND evaluate reference computations inside the block."""
        if self.reference is not None:
            yield self.reference
        else:
            with models.lora_disabled(self.model) as ref:
                yield ref


def _is_lora_wrapper(module: nn.Module) -> bool:
    return "lora_a" in module and "lora_b" in module


def base_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Flat parameters with LoRA stripped: the base weights under the adapters, named as in the plain model
    (`...q_proj.linear.weight` -> `...q_proj.weight`; lora_a / lora_b dropped)."""
    wrappers = {name for name, m in model.named_modules() if _is_lora_wrapper(m)}
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


class _ParameterView:
    """Just enough of an nn.Module (`.parameters()`) for models.verify_same_architecture."""

    def __init__(self, flat: Mapping[str, mx.array]):
        self._flat = dict(flat)

    def parameters(self) -> dict:
        return tree_unflatten(list(self._flat.items()))


def _model_config(model: nn.Module, raw: Optional[dict] = None) -> dict:
    """The model's architecture config with defaults filled in, from its ModelArgs (or `raw` parsed by the same
    ModelArgs class, so a config.json that omits a default compares equal to a loaded model)."""
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        return dict(raw or {})
    return dataclasses.asdict(type(args).from_dict(raw) if raw is not None else args)


def _folder_parameters(model_dir: Path, like: nn.Module, dtype: Optional[str]) -> dict[str, mx.array]:
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


def verify_architecture(policy: nn.Module, reference: Union[nn.Module, str, Path],
                        dtype: Optional[str] = None) -> None:
    """Raise models.ArchitectureMismatch naming the first difference between the policy and the reference:
    config keys (models.ARCHITECTURE_KEYS), then parameter names, shapes and dtypes of the base weights (LoRA
    adapters stripped on both sides). `reference` is a model, or a model folder (its config.json and weight
    files; `dtype` = the dtype it was loaded with, if cast)."""
    if isinstance(reference, nn.Module):
        ref_config, ref_params = _model_config(reference), base_parameters(reference)
    else:
        folder = Path(reference)
        ref_config = _model_config(policy, io.read_json(folder / "config.json"))
        ref_params = _folder_parameters(folder, policy, dtype)
    models.verify_same_config(ref_config, _model_config(policy))
    models.verify_same_architecture(_ParameterView(ref_params), _ParameterView(base_parameters(policy)))


def _clone_of(reference: nn.Module, reference_dir: Path) -> nn.Module:
    """A second module of the same architecture whose parameters ARE the reference's arrays (no copy until an
    optimizer update replaces them). Built lazily: its own weights are never read from disk."""
    clone, _ = models.load_model(reference_dir, lazy=True)
    clone.update(reference.parameters())
    clone.unfreeze()
    return clone


def build_policy(reference_dir: Path, finetune: str = "lora", *, lora_rank: int = 8, lora_scale: float = 20.0,
                 lora_layers: Optional[int] = None, seed: int = 0, dtype: Optional[str] = "float32") -> Policy:
    """Load the reference from `reference_dir` and make a fresh policy at exactly the reference (Stage 3).

    Verifies the architectures (config, parameter names, shapes, dtypes) and raises ArchitectureMismatch with the
    first difference."""
    if finetune not in ("lora", "full"):
        raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
    reference_dir = Path(reference_dir)
    model, tokenizer = models.load_model(reference_dir, dtype=dtype)
    model.freeze()
    if finetune == "lora":
        adapter_config = models.attach_lora(model, rank=lora_rank, scale=lora_scale, num_layers=lora_layers,
                                            seed=seed)
        mx.eval(model.parameters())
        policy = Policy(model, tokenizer, None, "lora", adapter_config, reference_dir, models.model_hash(reference_dir))
        verify_architecture(model, reference_dir, dtype)
    else:
        clone = _clone_of(model, reference_dir)
        policy = Policy(clone, tokenizer, model, "full", None, reference_dir, models.model_hash(reference_dir))
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
            models.save_adapters(policy.model, tmp, policy.adapter_config)
            io.write_json(tmp / POLICY_CONFIG, {**meta, "weights": "adapters.safetensors"})
        elif weights:
            models.save_model(policy.model, policy.tokenizer, tmp, io.read_json(policy.reference_dir / "config.json"))
            io.write_json(tmp / POLICY_CONFIG, {**meta, "weights": "model.safetensors"})
        else:
            tmp.mkdir()
            io.write_json(tmp / POLICY_CONFIG, {**meta, "weights": "reference"})
    return out_dir


def load_policy(reference_dir: Path, policy_dir: Path, dtype: Optional[str] = "float32") -> Policy:
    """Load the reference and a policy written by save_policy (Stage 3's init, or a trained one).

    Raises StalePolicy if the policy was made from another reference, ArchitectureMismatch if they differ."""
    reference_dir, policy_dir = Path(reference_dir), Path(policy_dir)
    meta = io.read_json(policy_dir / POLICY_CONFIG)
    ref_hash = models.model_hash(reference_dir)
    if meta["reference_hash"] != ref_hash:
        raise StalePolicy(f"{policy_dir} was initialized from a reference with hash {meta['reference_hash'][:12]}, "
                          f"but {reference_dir} has hash {ref_hash[:12]}: rerun Stage 3 (dvc repro init)")
    model, tokenizer = models.load_model(reference_dir, dtype=dtype)
    model.freeze()
    if meta["fine_tune_type"] == "lora":
        models.load_adapters(model, policy_dir)
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


# ---------------------------------------------------------------------------------------------------------
# KL on policy samples


def kl_prompt_messages(items: Sequence[Mapping[str, Any]], n: int, system_prompt: Optional[str]) -> list[list[dict]]:
    """The KL prompts: chat messages of the first `n` held-out task items (`init.kl_prompts`)."""
    if len(items) < n:
        raise ValueError(f"need {n} held-out items for the KL prompts (init.kl_prompts), got {len(items)}")
    return [tasks.item_prompt(item, system_prompt) for item in items[:n]]


def pad_id_of(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def sample_completions(policy: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, str]]], seed: int,
                       n_samples: int, max_tokens: int, batch_size: int = 64) -> SeqBatch:
    """Sample `n_samples` completions per prompt from the policy at temperature 1.0 (seeded) as a SeqBatch whose
    loss_mask marks every sampled position (the eos too when the sample stopped there).

    Sampling reseeds MLX's global random state, and mlx 0.32 cannot restore a saved one; afterwards the global
    state is reseeded from what it was before, so the caller's random stream stays a function of its own history.
    """
    before = np.asarray(mx.random.state[0]).astype(np.uint64)
    try:
        gens = generate(policy, tokenizer, [list(p) for p in prompts], n_samples=n_samples,
                        temperature=KL_TEMPERATURE, max_tokens=max_tokens, seed=seed, batch_size=batch_size,
                        desc="kl samples")
    finally:
        mx.random.seed(int((before[0] << np.uint64(32)) | before[1]) % (2**63))
    eos = int(tokenizer.eos_token_id)
    prompt_rows, completion_rows = [], []
    for messages, samples, finished in zip(prompts, gens.token_ids, gens.finished):
        prompt_ids = encode_prompt(tokenizer, messages)
        for ids, done in zip(samples, finished):
            completion = list(ids) + ([eos] if done else [])
            if completion:
                prompt_rows.append(prompt_ids)
                completion_rows.append(completion)
    if not completion_rows:
        raise ValueError("the policy produced no completion tokens for the KL prompts")
    return collate_sequences(prompt_rows, completion_rows, pad_id_of(tokenizer))


def measure_kl(policy: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, str]]],
               reference: Optional[nn.Module], seed: int, n_samples: int, max_tokens: int,
               batch_size: int = 64) -> dict[str, float]:
    """KL(policy || reference), the one definition (module docstring), on policy samples of `prompts`.

    `reference` is the reference model, or None meaning "the policy's own LoRA adapters disabled".
    Returns {"kl": mean per-token KL, "kl_seq": mean per-sequence KL, "k3": Schulman's k3 estimate,
    "n_tokens": completion tokens measured}.
    """
    if reference is None and not any(_is_lora_wrapper(m) for _, m in policy.named_modules()):
        raise ValueError("reference=None means 'the policy with its LoRA adapters disabled', "
                         "but the policy has no LoRA adapters: pass the reference model")
    batch = sample_completions(policy, tokenizer, prompts, seed, n_samples, max_tokens, batch_size)

    def adapters_off_logits(sub: SeqBatch) -> mx.array:
        with models.lora_disabled(policy):
            logits = full_logits_at(policy, sub)
            mx.eval(logits)
        return logits

    out = policy_reference_kl(policy, reference if reference is not None else adapters_off_logits, batch)
    return {"kl": out["kl_mean_per_token"], "kl_seq": out["kl_seq_mean"], "k3": out["k3"],
            "n_tokens": out["n_tokens"]}


# ---------------------------------------------------------------------------------------------------------
# Reference log-prob cache


def pairs_fingerprint(pairs: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the pair ids in row order: changes when any pair, or the order, changes."""
    return hashlib.sha256("\n".join(str(p["id"]) for p in pairs).encode("utf-8")).hexdigest()


def compute_ref_logps(reference: nn.Module, tokenizer: Any, pairs: Sequence[Mapping[str, Any]], max_len: int,
                      batch_size: int, desc: str = "ref logps") -> dict[str, np.ndarray]:
    """Summed log-probs of each pair's chosen and rejected completion under `reference` (one forward for both),
    length-grouped batches, in row order: {"chosen": [N] float32, "rejected": [N] float32}.

    Tokenized exactly as Stage 5 tokenizes (batching.encode_pair with the same max_len)."""
    n = len(pairs)
    chosen = np.zeros(n, dtype=np.float32)
    rejected = np.zeros(n, dtype=np.float32)
    if n == 0:
        return {"chosen": chosen, "rejected": rejected}
    encoded = [encode_pair(tokenizer, pair, max_len) for pair in pairs]
    order = np.argsort([-e.max_length for e in encoded], kind="stable")
    pad = pad_id_of(tokenizer)
    with tqdm(total=n, desc=desc, unit="pair", dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = collate_pairs([encoded[i] for i in idx], pad)
            sums, _ = completion_logprobs(reference, batch)
            c, r = split_pairs(sums, len(idx))
            mx.eval(c, r)
            chosen[idx], rejected[idx] = np.asarray(c), np.asarray(r)
            bar.update(len(idx))
    return {"chosen": chosen, "rejected": rejected}


def write_ref_logps(path: Path, logps: Mapping[str, Mapping[str, np.ndarray]],
                    pairs: Mapping[str, Sequence[Mapping[str, Any]]], max_len: int, reference_hash: str) -> Path:
    """Write {split: {"chosen", "rejected"}} as `<split>/chosen`, `<split>/rejected` + staleness metadata."""
    from safetensors.numpy import save_file

    arrays, meta = {}, {"format": REF_LOGPS_FORMAT, "max_len": str(max_len), "reference_hash": reference_hash}
    for split, values in logps.items():
        if not len(values["chosen"]) == len(values["rejected"]) == len(pairs[split]):
            raise ValueError(f"ref logps for {split!r}: lengths differ from the {len(pairs[split])} pairs")
        arrays[f"{split}/chosen"] = np.ascontiguousarray(values["chosen"], dtype=np.float32)
        arrays[f"{split}/rejected"] = np.ascontiguousarray(values["rejected"], dtype=np.float32)
        meta[f"{split}/ids_sha256"] = pairs_fingerprint(pairs[split])
        meta[f"{split}/n_pairs"] = str(len(pairs[split]))
    with io.atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    return Path(path)


def read_ref_logps(path: Path, pairs: Mapping[str, Sequence[Mapping[str, Any]]], *, max_len: Optional[int] = None,
                   reference_hash: Optional[str] = None) -> dict[str, dict[str, np.ndarray]]:
    """Read the cache for the given splits, refusing it (StaleRefLogps) if any split's pair ids, the max_len or
    the reference hash differ from what it was computed for."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if meta.get("format") != REF_LOGPS_FORMAT:
            raise StaleRefLogps(f"{path}: not a dpoflow reference log-prob cache (format {meta.get('format')!r})")
        rerun = "rerun Stage 3 (dvc repro init)"
        if max_len is not None and meta.get("max_len") != str(max_len):
            raise StaleRefLogps(f"{path}: computed with max_len {meta.get('max_len')}, now {max_len}: {rerun}")
        if reference_hash is not None and meta.get("reference_hash") != reference_hash:
            raise StaleRefLogps(f"{path}: computed with another reference model "
                                f"({str(meta.get('reference_hash'))[:12]} != {reference_hash[:12]}): {rerun}")
        out = {}
        for split, rows in pairs.items():
            if f"{split}/chosen" not in keys:
                raise StaleRefLogps(f"{path}: no reference log-probs for split {split!r}: {rerun}")
            if meta.get(f"{split}/ids_sha256") != pairs_fingerprint(rows):
                raise StaleRefLogps(f"{path}: the {split!r} pairs changed since the cache was computed "
                                    f"({meta.get(f'{split}/n_pairs')} cached pairs, {len(rows)} now, "
                                    f"different ids or order): {rerun}")
            out[split] = {"chosen": f.get_tensor(f"{split}/chosen"), "rejected": f.get_tensor(f"{split}/rejected")}
    return out


def build_ref_logps(path: Path, policy: Policy, pairs: Mapping[str, Sequence[Mapping[str, Any]]], max_len: int,
                    batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Compute every split's reference log-probs (with the policy's reference) and write the cache."""
    with policy.as_reference() as reference:
        logps = {split: compute_ref_logps(reference, policy.tokenizer, rows, max_len, batch_size,
                                          desc=f"ref logps {split}") for split, rows in pairs.items()}
    write_ref_logps(path, logps, pairs, max_len, policy.reference_hash)
    return logps


def trainable_parameter_count(model: nn.Module) -> int:
    return int(sum(v.size for _, v in tree_flatten(model.trainable_parameters())))


__all__ = [
    "Policy", "StalePolicy", "StaleRefLogps", "base_parameters", "build_policy", "build_ref_logps",
    "compute_ref_logps", "kl_prompt_messages", "load_policy", "measure_kl", "pad_id_of", "pairs_fingerprint",
    "read_ref_logps", "reset_policy", "sample_completions", "save_policy", "trainable_parameter_count",
    "verify_architecture", "write_ref_logps",
]
