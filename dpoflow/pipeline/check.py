"""The parameter check that runs before any stage (stages/check_params.py, the first stage of dvc.yaml, which every
stage depends on): the whole params file read as DVC reads it, every key present and known, every value allowed,
the cross-field rules of runtime.params, and what can only be checked against the machine: the task and benchmark
names, the tiny model's shape, the input files and the user's judge function. One `ParamsError` names the key."""

from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from dpoflow.data import tasks
from dpoflow.data.benchmark_tasks import LOCAL_TASKS
from dpoflow.data.judges import JudgeError, PythonJudge
from dpoflow.eval.benchmarks import non_local_tasks
from dpoflow.eval.gates import gate_checks
from dpoflow.modeling.tiny import make_tiny_model
from dpoflow.runtime.params import (
    INPUT_PARAMS,
    PYTHON_JUDGE,
    Params,
    ParamsError,
    input_folder,
    is_hub_name,
    load_params,
    param_value,
    read_params_file,
)

# Values that are mappings of the user's own keys, not sections (their keys are checked where they are used).
FREE_MAPPINGS = ("data.sizes", "data.tasks", "model.tiny", "batch_size")


def missing_keys(cls: type, raw: Any, prefix: str = "") -> list[str]:
    """The dotted keys of `cls` (a params section) that `raw` does not give."""
    if not isinstance(raw, dict):
        return []
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in raw:
            out.append(key)
        elif is_dataclass(hints[f.name]) and key not in FREE_MAPPINGS:
            out += missing_keys(hints[f.name], raw[f.name], key + ".")
    return out


def stock_tasks() -> set[str]:
    """Every task name lm-eval's own task index knows (read from the installed package: no network)."""
    from lm_eval.tasks import TaskManager  # lm-eval takes seconds to import: only when a stock name must be checked

    return set(TaskManager().all_tasks)


def check_benchmarks(p: Params) -> None:
    unknown = non_local_tasks(p.benchmarks.tasks, input_folder(p, "benchmarks"))
    if unknown and (missing := [t for t in unknown if t not in stock_tasks()]):
        raise ParamsError(
            f"params.yaml: benchmarks.tasks: {missing[0]!r} is not a local task ({', '.join(LOCAL_TASKS)}), a task "
            f"defined in {input_folder(p, 'benchmarks')}/*.yaml, or an lm-eval task"
        )


GATED_STAGES = ("sft", "preference_data", "init", "reward_model", "dpo", "iterate", "evaluate")


def check_gates(p: Params) -> None:
    """gates.bound names checks a gate makes (their metric names), and limits per task name listed tasks."""
    checked = {c.metric for stage in GATED_STAGES for c in gate_checks(stage, p)}
    unknown = [name for name in p.gates.bound if name not in checked]
    if unknown:
        raise ParamsError(
            f"params.yaml: gates.bound: {unknown[0]!r} is not a gated metric; allowed: {', '.join(sorted(checked))}"
        )
    limit = p.benchmarks.limit
    known = set(p.benchmarks.tasks) | set(LOCAL_TASKS)  # a local task's limit may stay while it is not run
    stray = [t for t in limit if t not in known] if isinstance(limit, dict) else []
    if stray:
        raise ParamsError(f"params.yaml: benchmarks.limit.{stray[0]}: not in benchmarks.tasks")


def check_embedded_tasks(p: Params) -> None:
    if p.data.source != "embedded" or not p.data.tasks:
        return
    try:
        tasks.validate_spec(p.data.tasks)
    except ValueError as err:
        raise ParamsError(f"params.yaml: data.tasks: {str(err).removeprefix('task spec: ')}") from None


def check_tiny(p: Params) -> None:
    allowed = set(inspect.signature(make_tiny_model).parameters) - {"out_dir", "seed"}
    for key, value in p.model.tiny.items():
        if key not in allowed:
            raise ParamsError(f"params.yaml: model.tiny.{key}: unknown key; allowed keys: {', '.join(sorted(allowed))}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParamsError(f"params.yaml: model.tiny.{key}: {value!r} is not allowed; expected an integer >= 1")


def check_inputs(p: Params) -> None:
    """Every local input the params name exists (hub and datasets names are fetched by the stage that reads them)."""
    for key, _ in INPUT_PARAMS:
        value = param_value(p, key)
        if value is not None and (key == "judges.template" or not is_hub_name(value)) and not Path(value).exists():
            raise ParamsError(f"params.yaml: {key}: {value} does not exist")
    base = p.model.base
    if base != "tiny" and not base.startswith("package:") and not is_hub_name(base) and not Path(base).exists():
        raise ParamsError(f"params.yaml: model.base: {base} does not exist")


def check_split_sizes(p: Params) -> None:
    """The splits the params ask for can be made, so that prepare_data and Stage 3 do not stop on them later: with
    data.source files heldout + rounds of data.prompts leave some for Stage 2; with the embedded task the held-out
    split (data.sizes.heldout) has the init.kl_prompts KL prompts. (With data.source files the held-out count is
    known only after reading the files: prepare_data checks it.)"""
    f = p.data.fractions
    total = round(f.heldout + f.rounds, 9)  # 0.1 + 0.9 is not exactly 1 in binary
    if p.data.source == "files" and total >= 1:
        raise ParamsError(
            f"params.yaml: data.fractions: heldout + rounds = {f.heldout} + {f.rounds} = {total:g} leaves no "
            "prompts for Stage 2; keep data.fractions.heldout + data.fractions.rounds below 1"
        )
    heldout = p.data.sizes.get("heldout", 0)
    if p.data.source == "embedded" and p.init.kl_prompts > heldout:
        raise ParamsError(
            f"params.yaml: init.kl_prompts: {p.init.kl_prompts} is more than the {heldout} held-out prompts of "
            "data.sizes.heldout (Stage 3 measures KL on them); lower init.kl_prompts or raise data.sizes.heldout"
        )


def check_judges(p: Params) -> None:
    for stage in ("preference", "iterate", "evaluate"):
        spec = p.stage_judge(stage)
        if PYTHON_JUDGE.match(spec):
            try:
                PythonJudge(spec, input_folder(p, "judge"))
            except JudgeError as err:
                raise ParamsError(f"params.yaml: {stage}.judge: {err}") from None


def check_params(path: str | Path) -> Params:
    """Every check above, on the params file at `path`; returns the params."""
    raw = read_params_file(path)
    missing = missing_keys(Params, raw)
    if missing:
        raise ParamsError(f"{path}: {missing[0]}: missing; every key is set in {path} (the one place of defaults)")
    p = load_params(path)
    try:
        check_tiny(p)
        check_embedded_tasks(p)
        check_split_sizes(p)
        check_inputs(p)
        check_judges(p)
        check_benchmarks(p)
        check_gates(p)
    except ParamsError as err:  # the checks name params.yaml, as load_params does: say which file (--params)
        message = str(err)
        if message.startswith("params.yaml:"):
            raise ParamsError(f"{path}{message.removeprefix('params.yaml')}") from None
        raise
    return p
