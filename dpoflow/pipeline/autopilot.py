"""Rollback and retry as DVC experiments: run the pipeline, read which gate held, apply the workflow's prescription
as the next named experiment, up to a budget (`python -m dpoflow autopilot --budget N`, `make autopilot`).

    result = autopilot(3, runner=dvc_runner(), gates_dir=Path(...), fallback_gates_dir=Path(...),
                       deploy_path=Path(...), params_path=Path("params.yaml"))

Try 1 is `dvc exp run -n <prefix>-<n>` with the workspace's params (DVC restores every stage whose inputs did not
change from its cache: nothing is retrained that DVC can restore; the autopilot never forces a stage). After a try:

* every gate writes a verdict, `<gates dir>/<stage>.json` = {"stage", "passed", "checks": [{"metric", "param",
  "passed", "value", "threshold", "op", "label", "advice", "blocking"}]}; the gate that held is the earliest one in
  pipeline order (GATE_ORDER) whose verdict this try wrote (the file changed during the try) with passed false;
  `deploy.json` adds Stage 7's rollback target to the message;
* the try passed when `dvc exp run` exited 0 and no verdict it wrote failed: `dvc exp apply <name>`, done;
* otherwise RULES[(gate, metric)] of every failed blocking check gives the changes; the next try is
  `dvc exp run -n <prefix>-<n+1> -S key=value ...` with every change so far (each experiment's command line
  reproduces it from the baseline commit), values computed from the params the failed try ran with;
* it stops, saying which gate held and what a person should look at, when the budget is spent, a failed check has
  no rule, the rule changes nothing any more (a limit reached), or the run failed without a failing verdict.

DVC 3 keeps an experiment only when its run succeeded: a try stopped by a gate leaves its params, metrics and
verdicts in the workspace (read here), and `save_try` records it with `dvc exp save` of the stages that completed,
so `dvc exp show` lists every try with its metrics; `AutopilotResult.tries` holds them too.
Every DVC call goes through one `runner(args) -> (exit code, output)` (args after `dvc`): tests pass a fake.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpoflow.runtime.params import load_params

Runner = Callable[[Sequence[str]], tuple[int, str]]
GATE_ORDER = ("params", "sft", "preference_data", "init", "reward_model", "dpo", "iterate", "evaluate")
STAGE_DOCS = {
    "sft": "docs/sft-preparation.md",
    "preference_data": "docs/preference-data-generation.md",
    "init": "docs/model-initialization.md",
    "reward_model": "docs/preference-modeling.md",
    "dpo": "docs/dpo-optimization.md",
    "iterate": "docs/iterative-training.md",
    "evaluate": "docs/evaluation-monitoring.md",
}
OUTPUT_KEPT = 20_000  # characters of a DVC call's output kept in the result (the console shows all of it)


@dataclass(frozen=True)
class Change:
    """One -S change: key (a params.yaml key) = its value `op` `by`; op "x" multiplies, "+" adds, "/" divides
    (integer params stay integers, rounded up for "x" and "+", down for "/"); `by` is a number or a params key
    whose value is the operand; the result is kept within `limit` (a floor for "/", a ceiling otherwise)."""

    key: str
    op: str
    by: float | str
    limit: float | None = None

    def describe(self) -> str:
        text = {"x": f"{self.key} x {self.by}", "+": f"{self.key} + {self.by}", "/": f"{self.key} / {self.by}"}
        bound = "" if self.limit is None else f" ({'at least' if self.op == '/' else 'at most'} {self.limit:g})"
        return text[self.op] + bound


@dataclass(frozen=True)
class Rule:
    situation: str  # what the failed check means
    changes: tuple[Change, ...]  # applied together
    why: str  # why these changes


# The one table of prescriptions: (gate, failed metric) -> rule. docs/templates.md and SKILL.md render it
# (rules_markdown); a failed check that is not here stops the autopilot and is left to a person.
RULES: dict[tuple[str, str], Rule] = {
    ("evaluate", "retention"): Rule(
        "capability regression at Stage 7",
        (Change("dpo.learning_rate", "x", "dpo.lr_backoff"), Change("iterate.max_steps", "/", 2, limit=1)),
        "roll back and retry from Stage 5, more gradually (deploy.json's rollback prescription)",
    ),
    ("dpo", "kl"): Rule(
        "KL over dpo.max_kl after Stage 5's own learning-rate retries",
        (Change("dpo.beta", "x", 1.5),),
        "a larger beta holds the policy closer to the reference",
    ),
    ("evaluate", "final_kl"): Rule(
        "final KL over evaluate.max_kl",
        (Change("dpo.beta", "x", 1.5),),
        "a larger beta holds the policy closer to the reference",
    ),
    ("evaluate", "win_rate"): Rule(
        "alignment not improved (win-rate lower bound at or under evaluate.min_win_rate_lower)",
        (Change("preference.samples_per_prompt", "x", 1.5, limit=32),),
        "more samples per prompt: more prompts with a right/wrong pair, so more (and more varied) pairs",
    ),
}


def rules_markdown() -> str:
    """RULES as the markdown table the docs show."""
    lines = ["| gate | failed check | situation | next try (-S) | why |", "|---|---|---|---|---|"]
    for (gate, metric), rule in RULES.items():
        changes = "; ".join(f"`{c.describe()}`" for c in rule.changes)
        lines.append(f"| `{gate}` | `{metric}` | {rule.situation} | {changes} | {rule.why} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading what a try left


def param_value(params: Any, key: str) -> Any:
    value = params
    for part in key.split("."):
        value = value[part] if isinstance(value, Mapping) else getattr(value, part)
    return value


def apply_change(change: Change, params: Any) -> int | float:
    """The new value of change.key given the params a try ran with (runtime.params.Params or a nested dict)."""
    current = param_value(params, change.key)
    by = param_value(params, change.by) if isinstance(change.by, str) else change.by
    raw = {"x": current * by, "+": current + by, "/": current / by}[change.op]
    if isinstance(current, int) and not isinstance(current, bool):
        raw = math.floor(raw) if change.op == "/" else math.ceil(round(raw, 9))
    if change.limit is not None:
        raw = max(raw, change.limit) if change.op == "/" else min(raw, change.limit)
    return type(current)(raw) if isinstance(current, int) else float(f"{raw:.6g}")


def prescription(gate: str, failed_metrics: Sequence[str], params: Any) -> tuple[dict[str, Any], list[str]]:
    """({key: new value} from RULES for the failed checks of `gate`, in check order (the first rule to set a key
    wins), [metrics without a rule])."""
    changes: dict[str, Any] = {}
    unruled = []
    for metric in failed_metrics:
        rule = RULES.get((gate, metric))
        if rule is None:
            unruled.append(metric)
            continue
        for change in rule.changes:
            changes.setdefault(change.key, apply_change(change, params))
    return changes, unruled


def gates_dir_in_use(gates_dir: Path, fallback: Path | None) -> Path:
    """`gates_dir` when it holds a verdict, else `fallback` (the layout before the move), else `gates_dir`."""
    if not any(Path(gates_dir).glob("*.json")) and fallback is not None and any(Path(fallback).glob("*.json")):
        return Path(fallback)
    return Path(gates_dir)


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.stem: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(folder).glob("*.json"))}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def held_gate(folder: Path, before: Mapping[str, tuple[int, int]]) -> dict | None:
    """The verdict of the earliest gate (GATE_ORDER, then by name) that this try wrote and that failed, with its
    failed blocking checks: {"gate", "path", "checks": [...]}; None when no fresh verdict failed."""
    fresh = [stem for stem, stamp in _stamps(folder).items() if before.get(stem) != stamp]
    order = sorted(fresh, key=lambda s: (GATE_ORDER.index(s) if s in GATE_ORDER else len(GATE_ORDER), s))
    for stem in order:
        path = Path(folder) / f"{stem}.json"
        verdict = _read_json(path)
        if verdict is None or verdict.get("passed", True):
            continue
        checks = [c for c in verdict.get("checks") or [] if not c.get("passed") and c.get("blocking", True)]
        return {"gate": verdict.get("stage", stem), "path": str(path), "checks": checks}
    return None


def check_line(c: Mapping[str, Any]) -> str:
    value = c.get("value")
    shown = "missing" if value is None else f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
    rule = f"{c.get('op', '')} {c.get('threshold')}".strip()
    return f"{c.get('label') or c.get('metric')}: {shown} (needs {rule}, {c.get('param')}): {c.get('advice', '')}"


# ---------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Try:
    name: str
    settings: dict[str, Any]  # every -S of this try
    returncode: int
    passed: bool
    held: dict | None = None  # held_gate(...)
    next_changes: dict[str, Any] = field(default_factory=dict)


@dataclass
class AutopilotResult:
    status: str  # passed | budget | no_rule | no_change | error
    tries: list[Try]
    applied: str | None
    message: str

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "applied": self.applied,
            "message": self.message,
            "tries": [vars(t) for t in self.tries],
        }


def dvc_runner(cwd: str | Path | None = None, dvc: str = "dvc", echo: Callable[[str], None] | None = print) -> Runner:
    """The real runner: `dvc <args>` in `cwd`, its output echoed line by line and returned (the last OUTPUT_KEPT
    characters)."""

    def run(args: Sequence[str]) -> tuple[int, str]:
        if echo is not None:
            echo("$ " + " ".join([dvc, *args]))
        with subprocess.Popen(
            [dvc, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            kept: list[str] = []
            for line in proc.stdout or ():
                if echo is not None:
                    echo(line.rstrip("\n"))
                kept.append(line)
            rc = proc.wait()
        return rc, "".join(kept)[-OUTPUT_KEPT:]

    return run


def next_number(runner: Runner, prefix: str) -> int:
    """1 + the largest n of an existing experiment named <prefix>-<n> (`dvc exp list --name-only`)."""
    rc, out = runner(["exp", "list", "--name-only"])
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)$")
    found = [int(m.group(1)) for line in out.splitlines() if rc == 0 and (m := pattern.match(line.strip()))]
    return max(found, default=0) + 1


def save_try(runner: Runner, name: str) -> int:
    """Record a try a gate stopped as experiment `name` (DVC 3 keeps no experiment of a failed `exp run`): `dvc exp
    save` of the stages `dvc status` finds up to date, i.e. those that ran to completion. The gate that held and the
    stages after it stay as they were in dvc.lock, so on that experiment `dvc status` still says they must run; its
    metrics, params and the gate's verdict are the try's. Returns the exit code."""
    rc, out = runner(["stage", "list", "--name-only"])
    stages = out.split() if rc == 0 else []
    rc, out = runner(["status", "--json"])
    if rc != 0 or "{" not in out:
        return rc or 1
    changed = set(json.loads(out[out.index("{") : out.rindex("}") + 1]))
    done = [stage for stage in stages if stage not in changed]
    return runner(["exp", "save", "-n", name, *done])[0] if done else 1


def set_args(settings: Mapping[str, Any], params_file: str = "") -> list[str]:
    """-S arguments of `dvc exp run` ("<params_file>:" first unless it is DVC's default params.yaml)."""
    where = "" if params_file in ("", "params.yaml") else f"{params_file}:"
    return [arg for key, value in settings.items() for arg in ("-S", f"{where}{key}={json.dumps(value)}")]


def _look_at(held: Mapping[str, Any], deploy_path: Path | None) -> str:
    gate = held["gate"]
    files = [held["path"]] + ([str(deploy_path)] if gate == "evaluate" and deploy_path else [])
    return f"look at {', '.join(files)}, {STAGE_DOCS.get(gate, 'docs/quality-thresholds.md')} and `dvc exp show`"


def _rollback_note(deploy_path: Path | None) -> str:
    rb = (_read_json(deploy_path) or {}).get("rollback") if deploy_path else None
    return f" deploy.json: {rb['prescription'].rstrip('.')}." if rb and rb.get("prescription") else ""


def autopilot(
    budget: int,
    *,
    runner: Runner,
    gates_dir: Path,
    fallback_gates_dir: Path | None,
    deploy_path: Path | None,
    params_path: Path,
    prefix: str = "autopilot",
    read_params: Callable[[Path], Any] = load_params,
    log: Callable[[str], None] = print,
) -> AutopilotResult:
    """Up to `budget` tries (module docstring). Returns how it ended, every try, and the message it printed."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    first = next_number(runner, prefix)
    tries: list[Try] = []
    settings: dict[str, Any] = {}

    def end(status: str, message: str, applied: str | None = None) -> AutopilotResult:
        log(f"autopilot: {message}")
        return AutopilotResult(status, tries, applied, message)

    for n in range(budget):
        name = f"{prefix}-{first + n}"
        before = {Path(d): _stamps(Path(d)) for d in (gates_dir, fallback_gates_dir) if d is not None}
        log(f"autopilot: try {n + 1} of {budget}: {name}" + (f" with {settings}" if settings else ""))
        rc, _ = runner(["exp", "run", "-n", name, *set_args(settings, str(params_path))])
        folder = gates_dir_in_use(gates_dir, fallback_gates_dir)
        held = held_gate(folder, before.get(folder, {}))
        attempt = Try(name, dict(settings), rc, passed=rc == 0 and held is None, held=held)
        tries.append(attempt)
        if held is not None and rc != 0 and save_try(runner, name) != 0:
            log(f"autopilot: could not record {name} as an experiment (dvc exp save); its verdict is in {folder}")
        if attempt.passed:
            apply_rc, _ = runner(["exp", "apply", name])
            if apply_rc != 0:
                return end("error", f"{name} passed every gate but `dvc exp apply {name}` failed ({apply_rc})")
            return end("passed", f"{name} passed every gate; applied to the workspace (dvc exp apply {name})", name)
        if held is None:
            return end(
                "error",
                f"`dvc exp run` of {name} failed (exit {rc}) without a failing gate verdict in {folder}: a stage "
                "crashed or DVC refused; read its output above",
            )
        lines = "; ".join(check_line(c) for c in held["checks"]) or "no failed check listed"
        ran_with = read_params(params_path)  # the failed try's params: the workspace keeps them
        changes, unruled = prescription(held["gate"], [c.get("metric") for c in held["checks"]], ran_with)
        attempt.next_changes = changes
        if unruled or not changes:
            return end(
                "no_rule",
                f"gate {held['gate']} held ({lines}); no automatic prescription for "
                f"{', '.join(unruled) or 'it'}: {_look_at(held, deploy_path)}.{_rollback_note(deploy_path)}",
            )
        if all(param_value(ran_with, k) == v for k, v in changes.items()):
            return end(
                "no_change",
                f"gate {held['gate']} held ({lines}) and its prescription no longer changes anything "
                f"({changes}: a limit is reached): {_look_at(held, deploy_path)}",
            )
        settings = {**settings, **changes}
        if n + 1 < budget:
            log(f"autopilot: gate {held['gate']} held ({lines}); next: {' '.join(set_args(changes))}")
    last = tries[-1]
    held = last.held or {"gate": "?", "checks": [], "path": "?"}
    return end(
        "budget",
        f"budget of {budget} tries spent; gate {held['gate']} still held "
        f"({'; '.join(check_line(c) for c in held['checks'])}): {_look_at(held, deploy_path)}."
        f"{_rollback_note(deploy_path)} The prescription a next try would apply: "
        f"{' '.join(set_args(last.next_changes))}. The workspace holds the last try's params; the tries: "
        f"{', '.join(f'{t.name} {t.settings or {}}' for t in tries)}",
    )
