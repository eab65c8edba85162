"""The whole `dvc repro` on the CI profile (tiny model), with real gates.

One project is built and reproduced once per session; each test then checks one property of the pipeline:
everything ran and every gate passed, a second repro does nothing, a threshold edit re-evaluates only its gate,
a Stage 1 param edit invalidates Stage 1 and what depends on it, a failing gate stops the run with its message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.pipeline_project import run, write_params

# The session's `pipeline` fixture (one repro, shared with the other e2e test files).
pytest_plugins = ["tests.fixtures_pipeline"]
pytestmark = pytest.mark.e2e


def stages_in(dvc_yaml: Path) -> list[str]:
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def ran(output: str) -> list[str]:
    """Names of the stages a `dvc repro` (or `--dry`) output says it runs."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def test_repro_runs_every_stage_and_every_gate_passes(pipeline):
    log = (pipeline / "repro.log").read_text()
    assert set(ran(log)) == set(stages_in(pipeline / "dvc.yaml"))
    gates = [s.removeprefix("gate_") for s in stages_in(pipeline / "dvc.yaml") if s.startswith("gate_")]
    assert gates, "the pipeline declares no gate"
    for gate in gates:
        result = json.loads((pipeline / "reports" / "gates" / f"{gate}.json").read_text())
        assert result["passed"], result
        assert (pipeline / "gates" / f"{gate}.passed").exists()
    sft = json.loads((pipeline / "reports" / "sft.json").read_text())
    assert set(sft["benchmarks"]) == {"dpoflow_task_gen", "dpoflow_task_mc"}
    assert sft["chip"] == "cpu" and sft["batch_size"] == 8


def test_second_repro_does_nothing(pipeline):
    proc = run(pipeline, "dvc", "repro")
    assert ran(proc.stdout) == [], proc.stdout


def test_threshold_edit_reevaluates_only_the_gate(pipeline):
    original = (pipeline / "params.yaml").read_text()
    try:
        write_params(pipeline, {"sft": {"max_val_loss": 7.5}})
        proc = run(pipeline, "dvc", "repro")
        # the params check reruns on any params edit; its verdict does not change, so it invalidates nothing
        assert ran(proc.stdout) == ["check_params", "gate_sft"], proc.stdout
    finally:
        (pipeline / "params.yaml").write_text(original)
        run(pipeline, "dvc", "repro")


def test_stage1_param_edit_invalidates_stage1_and_its_dependents(pipeline):
    original = (pipeline / "params.yaml").read_text()
    try:
        write_params(pipeline, {"sft": {"learning_rate": 1.0e-3}})
        executed = ran(run(pipeline, "dvc", "repro").stdout)
        downstream = stages_in(pipeline / "dvc.yaml")
        downstream = downstream[downstream.index("sft") :]
        # Stage 1 and every training stage after it; nothing before. A gate whose metrics came out unchanged
        # (the same pairs, say) is not rerun: DVC compares its inputs
        assert executed[:2] == ["check_params", "sft"] and set(executed) <= {"check_params", *downstream}, executed
        assert {"preference_data", "init", "reward_model", "dpo", "iterate", "evaluate"} <= set(executed), executed
    finally:
        (pipeline / "params.yaml").write_text(original)
        run(pipeline, "dvc", "repro")


def test_a_dpo_edit_reuses_the_sft_models_win_rate_responses(pipeline):
    """The SFT side of Stage 7's win rate is its own stage: a DPO experiment decodes only the final model."""
    original = (pipeline / "params.yaml").read_text()
    try:
        write_params(pipeline, {"dpo": {"learning_rate": 3.0e-4}})
        executed = ran(run(pipeline, "dvc", "repro").stdout)
        assert {"dpo", "evaluate"} <= set(executed) and "sft_responses" not in executed, executed
        write_params(pipeline, {"evaluate": {"win_rate_prompts": 6}})  # the SFT side's own input
        assert "sft_responses" in ran(run(pipeline, "dvc", "repro", "--dry").stdout)
    finally:
        (pipeline / "params.yaml").write_text(original)
        run(pipeline, "dvc", "repro")  # back to the shared project's state (from DVC's run-cache)


def test_stage7_refuses_sft_responses_made_for_other_prompts(pipeline):
    """Run by hand with other win-rate prompts than sft_responses decoded: one Error: line, before any work."""
    other = pipeline / "params_other_prompts.yaml"
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["evaluate"]["win_rate_prompts"] -= 2
    other.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = run(pipeline, "python", "stages/evaluate.py", "--params", other.name, check=False)
    finally:
        other.unlink()
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: data/sft_responses.jsonl: the baseline responses (greedy) are for other prompts: 2 of "
        f"{params['evaluate']['win_rate_prompts']} differ (rerun the sft_responses stage)"
    ], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert ran(run(pipeline, "dvc", "repro").stdout) == []  # nothing was touched


def test_failing_gate_stops_repro_with_the_prescribed_decision(pipeline):
    original = (pipeline / "params.yaml").read_text()
    try:
        write_params(pipeline, {"sft": {"min_val_accuracy": 1.0}})
        proc = run(pipeline, "dvc", "repro", check=False)
        assert proc.returncode != 0
        output = proc.stdout + proc.stderr
        assert "SFT held-out accuracy" in output and "sft.min_val_accuracy" in output and "FAILED" in output
        assert "train longer" in output
        assert not (pipeline / "gates" / "sft.passed").exists()
        assert json.loads((pipeline / "metrics" / "sft.json").read_text())["val_accuracy"] < 1.0
    finally:
        (pipeline / "params.yaml").write_text(original)
        run(pipeline, "dvc", "repro")
