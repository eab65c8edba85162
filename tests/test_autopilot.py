"""Rollback and retry as DVC experiments (dpoflow.pipeline.autopilot, `python -m dpoflow autopilot`), against a fake
DVC runner that behaves like `dvc exp run` in the workspace: -S edits params.yaml, the gates whose stages rerun write
their verdicts, the first failing gate stops the run (exit 1, no experiment kept), a passing run is kept by name."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import dpoflow.__main__ as main_mod
from dpoflow.pipeline.autopilot import (
    RULES,
    Change,
    apply_change,
    autopilot,
    prescription,
    rules_markdown,
    set_args,
)
from dpoflow.runtime.params import CHIPS, load_params

ROOT = Path(__file__).resolve().parent.parent
RERUN = ("dpo", "iterate", "evaluate")  # the gates of the stages a changed dpo/iterate/preference param reruns


def verdict(stage, failed=()):
    checks = [
        {"metric": m, "label": m, "param": f"{stage}.{m}", "op": ">=", "threshold": 1, "value": 0.5, "passed": False}
        for m in failed
    ]
    checks.append({"metric": "ok", "label": "ok", "param": f"{stage}.ok", "passed": True, "value": 1})
    return {"stage": stage, "passed": not failed, "warnings": [], "checks": checks}


class FakeDvc:
    """`judge(params) -> {gate: [failed metrics]}` decides each gate of a run (missing gate = passes)."""

    def __init__(self, root: Path, judge, gates="reports/gates", saved=()):
        self.root, self.judge, self.gates = root, judge, root / gates
        self.calls: list[list[str]] = []
        self.saved = list(saved)
        self.applied: list[str] = []
        self.failed: dict = {}
        self.params = {
            "batch_size": dict.fromkeys(CHIPS, 4),
            "dpo": {"learning_rate": 2.5e-5, "lr_backoff": 0.5, "beta": 0.3},
            "iterate": {"max_steps": 60},
            "preference": {"samples_per_prompt": 4},
        }
        self.write_params()

    def write_params(self):
        (self.root / "params.yaml").write_text(yaml.safe_dump(self.params), encoding="utf-8")

    def __call__(self, args):
        self.calls.append(list(args))
        if args[:2] == ["exp", "list"]:
            return 0, "".join(f"{n}\n" for n in self.saved)
        if args[:2] == ["exp", "apply"]:
            self.applied.append(args[2])
            return 0, ""
        if args[:2] == ["stage", "list"]:
            return 0, "".join(f"{s}\n" for s in ("sft", "gate_sft", *(f"gate_{g}" for g in RERUN)))
        if args[:2] == ["status", "--json"]:
            return 0, "WARNING: noise\n" + json.dumps({f"gate_{g}": [] for g in self.failed})
        if args[:2] == ["exp", "save"]:
            assert args[2] == "-n" and not {f"gate_{g}" for g in self.failed} & set(args[4:])
            self.saved.append(args[3])
            return 0, ""
        assert args[:3] == ["exp", "run", "-n"]
        name, sets = args[3], args[4:]
        for flag, setting in zip(sets[::2], sets[1::2]):
            assert flag == "-S"
            key, value = setting.split("=", 1)
            section, leaf = key.split(".")
            self.params[section][leaf] = json.loads(value)
        self.write_params()
        self.gates.mkdir(parents=True, exist_ok=True)
        failed = self.failed = {g: m for g, m in self.judge(self.params).items() if m}
        time.sleep(0.01)  # distinct mtimes
        for gate in RERUN:
            (self.gates / f"{gate}.json").write_text(json.dumps(verdict(gate, failed.get(gate, ()))))
            if failed.get(gate):
                return 1, f"ERROR: failed to reproduce 'gate_{gate}'"
        self.saved.append(name)
        return 0, f"Ran experiment(s): {name}"


def run(fake, budget, log=lambda message: None):
    return autopilot(
        budget,
        runner=fake,
        gates_dir=Path("reports/gates"),
        fallback_gates_dir=Path("metrics/gates"),
        deploy_path=Path("reports/deploy.json"),
        params_path=Path("params.yaml"),
        log=log,
    )


def test_retention_fails_then_the_prescribed_retry_passes_and_is_applied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the old layout (metrics/gates) with a stale failing verdict from an earlier run that no stage rewrites
    (tmp_path / "metrics/gates").mkdir(parents=True)
    (tmp_path / "metrics/gates/sft.json").write_text(json.dumps(verdict("sft", ["val_accuracy"])))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/deploy.json").write_text(
        json.dumps({"deploy": False, "rollback": {"prescription": "capability regression: roll back to round 0"}})
    )

    def judge(p):  # capability retention holds only with the smaller learning rate and fewer steps
        ok = p["dpo"]["learning_rate"] <= 1.25e-5 and p["iterate"]["max_steps"] <= 30
        return {} if ok else {"evaluate": ["retention"]}

    fake = FakeDvc(tmp_path, judge, gates="metrics/gates", saved=["autopilot-1", "beta-0.2"])
    result = run(fake, 3)
    assert result.status == "passed" and result.applied == "autopilot-3"
    assert fake.calls == [
        ["exp", "list", "--name-only"],
        ["exp", "run", "-n", "autopilot-2"],  # try 1: the workspace params
        ["stage", "list", "--name-only"],  # stopped by gate_evaluate: recorded from the stages that completed
        ["status", "--json"],
        ["exp", "save", "-n", "autopilot-2", "sft", "gate_sft"] + [f"gate_{g}" for g in RERUN if g != "evaluate"],
        ["exp", "run", "-n", "autopilot-3", "-S", "dpo.learning_rate=1.25e-05", "-S", "iterate.max_steps=30"],
        ["exp", "apply", "autopilot-3"],
    ]
    assert "autopilot-2" in fake.saved  # the failed try is an experiment too
    first, second = result.tries
    assert first.held["gate"] == "evaluate" and [c["metric"] for c in first.held["checks"]] == ["retention"]
    assert first.held["path"].endswith("metrics/gates/evaluate.json")  # the fallback folder, stale sft.json ignored
    assert first.next_changes == {"dpo.learning_rate": 1.25e-05, "iterate.max_steps": 30}
    assert second.passed and second.settings == first.next_changes and fake.applied == ["autopilot-3"]
    assert load_params("params.yaml").dpo.learning_rate == 1.25e-05  # the workspace holds the passing try
    json.dumps(result.to_dict())


def test_budget_exhausted_says_which_gate_held_and_where_to_look(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeDvc(tmp_path, lambda p: {"dpo": ["kl"]})
    logged = []
    result = run(fake, 3, log=logged.append)
    assert result.status == "budget" and result.applied is None and fake.applied == []
    runs = [c for c in fake.calls if c[:2] == ["exp", "run"]]
    assert [c[3] for c in runs] == ["autopilot-1", "autopilot-2", "autopilot-3"]
    assert [c[4:] for c in runs] == [[], ["-S", "dpo.beta=0.45"], ["-S", "dpo.beta=0.675"]]
    assert [t.held["gate"] for t in result.tries] == ["dpo"] * 3
    msg = result.message
    assert "budget of 3 tries spent; gate dpo still held" in msg and "reports/gates/dpo.json" in msg
    assert "docs/dpo-optimization.md" in msg and "dvc exp show" in msg and logged[-1] == f"autopilot: {msg}"
    assert "a next try would apply: -S dpo.beta=1.0125" in msg and not any("next: " in m for m in logged[-2:])


def test_stops_without_a_rule_without_a_verdict_and_when_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_rule = run(FakeDvc(tmp_path, lambda p: {"iterate": ["selected_heldout_gap"]}), 5)
    assert no_rule.status == "no_rule" and len(no_rule.tries) == 1
    assert "no automatic prescription for selected_heldout_gap" in no_rule.message
    assert "docs/iterative-training.md" in no_rule.message

    crash = FakeDvc(tmp_path, lambda p: {})
    crash_result = run(lambda args: (2, "boom") if args[:2] == ["exp", "run"] else crash(args), 5)
    assert crash_result.status == "error" and "without a failing gate verdict" in crash_result.message

    capped = FakeDvc(tmp_path, lambda p: {"evaluate": ["win_rate"]})
    capped.params["preference"]["samples_per_prompt"] = 24
    capped.write_params()
    result = run(capped, 5)
    assert [t.settings for t in result.tries] == [{}, {"preference.samples_per_prompt": 32}]
    assert result.status == "no_change" and "a limit is reached" in result.message


def test_rule_table_arithmetic_and_set_args():
    p = {"dpo": {"learning_rate": 2.5e-5, "lr_backoff": 0.5, "beta": 0.3}, "iterate": {"max_steps": 1}}
    assert apply_change(Change("iterate.max_steps", "/", 2, limit=1), p) == 1  # never below one step
    assert apply_change(Change("dpo.beta", "x", 1.5), p) == 0.45  # 0.44999999999999996 rounded to 6 digits
    assert apply_change(Change("k.n", "x", 1.5), {"k": {"n": 9}}) == 14  # integers round up
    assert apply_change(Change("k.n", "+", 2, limit=10), {"k": {"n": 9}}) == 10
    changes, unruled = prescription("evaluate", ["retention", "final_kl", "contaminated_pairs"], load_params_like())
    assert changes == {"dpo.learning_rate": 1.25e-05, "iterate.max_steps": 30, "dpo.beta": 0.45}
    assert unruled == ["contaminated_pairs"]
    expected = ["-S", "dpo.beta=0.45", "-S", "iterate.max_steps=30"]
    assert set_args({"dpo.beta": 0.45, "iterate.max_steps": 30}) == expected
    assert set_args({"dpo.beta": 0.45}, "other.yaml") == ["-S", "other.yaml:dpo.beta=0.45"]
    assert {("evaluate", "retention"), ("dpo", "kl"), ("evaluate", "win_rate")} <= set(RULES)


def load_params_like():
    return {"dpo": {"learning_rate": 2.5e-5, "lr_backoff": 0.5, "beta": 0.3}, "iterate": {"max_steps": 60}}


def test_the_docs_render_the_one_rule_table():
    table = rules_markdown()
    assert table.count("\n") == len(RULES) + 1
    for doc in ("SKILL.md", "docs/templates.md"):
        assert table in (ROOT / doc).read_text(encoding="utf-8"), f"{doc}: paste rules_markdown() again"


def test_cli_runs_the_autopilot_and_writes_every_try(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeDvc(tmp_path, lambda p: {} if p["dpo"]["beta"] > 0.4 else {"dpo": ["kl"]})
    monkeypatch.setattr(main_mod, "dvc_runner", lambda echo=None: fake)
    out = CliRunner().invoke(main_mod.cli, ["autopilot", "--budget", "2", "--json", "tries.json"])
    assert out.exit_code == 0, out.output
    assert "autopilot-2 passed every gate" in out.output
    record = json.loads((tmp_path / "tries.json").read_text())
    assert record["status"] == "passed" and [t["name"] for t in record["tries"]] == ["autopilot-1", "autopilot-2"]
    fake2 = FakeDvc(tmp_path, lambda p: {"dpo": ["kl"]})
    monkeypatch.setattr(main_mod, "dvc_runner", lambda echo=None: fake2)
    assert CliRunner().invoke(main_mod.cli, ["autopilot", "--budget", "1", "--prefix", "ap"]).exit_code == 1
    assert fake2.calls[1][:4] == ["exp", "run", "-n", "ap-1"]


@pytest.mark.parametrize("gate, metric", sorted(RULES))
def test_every_rule_changes_a_param_the_params_file_knows(gate, metric):
    p = load_params(ROOT / "params.yaml")
    changes, unruled = prescription(gate, [metric], p)
    assert changes and not unruled
    for key, value in changes.items():
        section, leaf = key.split(".")
        assert value != getattr(getattr(p, section), leaf)
