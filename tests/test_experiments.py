"""DVC experiments on the CI profile: `dvc exp run -S`, a queued sweep run by one queue worker, and the gate metrics
of every experiment side by side in `dvc exp show --json`.

Experiments change the workspace, git refs and the run queue, so they run in a `git clone` of the session's
reproduced pipeline (own cache, the pipeline's objects hardlinked in), never in the shared project. The swept param
belongs to the latest training stage that exists: `dpo.beta` once the dpo stage is in dvc.yaml, else
`sft.learning_rate`.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("tests.fixtures_pipeline")
from tests.fixtures_pipeline import clone_project, ran, sh, stages_in  # noqa: E402

pytest_plugins = ["tests.fixtures_pipeline"]
pytestmark = pytest.mark.e2e

# (stage, param, values: one `exp run -S`, then two queued). First whose stage exists wins.
CANDIDATES = [
    ("dpo", "dpo.beta", ("0.2", "0.4", "0.5")),
    ("sft", "sft.learning_rate", ("2.0e-3", "1.0e-3", "5.0e-3")),
]
QUEUE_TIMEOUT_S = 900
WORKER_INFO = Path(".dvc/tmp/exps/celery/dvc-exp-worker-1.json")


def sweep_param(project: Path) -> tuple[str, str, tuple[str, ...]]:
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage, key, values in CANDIDATES:
        tracked = [p for p in stages.get(stage, {}).get("params", []) if isinstance(p, str)]
        if any(key == p or key.startswith(p + ".") for p in tracked):
            return stage, key, values
    pytest.fail(f"no stage tracks any of {[c[1] for c in CANDIDATES]}")


def lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def exp_rows(project: Path) -> list[dict]:
    """Baseline + experiments from `dvc exp show --json`: name, params, metrics (file -> data)."""
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json").stdout)
    rows = []
    for entry in shown:
        if entry["rev"] == "workspace":
            continue
        revs = [entry] + [rev for exp in entry.get("experiments") or [] for rev in exp["revs"]]
        for rev in revs:
            data = rev.get("data") or {}
            rows.append(
                {
                    "name": rev.get("name") or rev["rev"][:7],
                    "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
                    "metrics": {f: (m or {}).get("data", {}) for f, m in (data.get("metrics") or {}).items()},
                }
            )
    return rows


def gate_columns(project: Path) -> list[tuple[str, str, str]]:
    """(label, metrics file, key) of every metric a gate checks (the checks recorded in reports/gates/<stage>.json;
    the values come from the stage's own metrics file, as `dvc exp show` prints them)."""
    columns = []
    for stage in stages_in(project / "dvc.yaml"):
        if not stage.startswith("gate_"):
            continue
        gated = stage.removeprefix("gate_")
        checks = json.loads((project / "reports" / "gates" / f"{gated}.json").read_text())["checks"]
        columns += [(f"{gated}.{c['metric']}", f"metrics/{gated}.json", c["metric"]) for c in checks]
    return columns


def readme_exp_show() -> list[str]:
    """The README's `dvc exp show` command (the one with --keep), as argv."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x.strip() for x in readme.splitlines() if x.strip().startswith("dvc exp show") and "--keep" in x)
    return shlex.split(line.split("#")[0])


def wait_for_queue(project: Path, names: list[str]) -> dict[str, str]:
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        lines = sh(project, "dvc", "queue", "status").stdout.splitlines()
        status = {parts[1]: parts[-1] for parts in map(str.split, lines) if len(parts) >= 3 and parts[1] in names}
        if len(status) == len(names) and not {"Queued", "Running"} & set(status.values()):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"queue not done after {QUEUE_TIMEOUT_S} s:\n" + "\n".join(lines))
        time.sleep(3)


def stop_queue_worker(project: Path) -> None:
    """Stop the worker `dvc queue start` spawned (it would idle 60 s otherwise) and wait for it to exit."""
    info = project / WORKER_INFO
    if not info.exists():
        return
    pid = json.loads(info.read_text()).get("pid")
    sh(project, "dvc", "queue", "stop", check=False)
    deadline = time.monotonic() + 60
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def exp_project(pipeline, tmp_path_factory):
    project = clone_project(pipeline, tmp_path_factory.mktemp("experiments") / "project")
    # Queued and --temp experiments run inside .dvc/tmp/exps/<run>/: the repo's relative core.site_cache_dir
    # would resolve there and fail ("unable to open database file"). Per checkout, an absolute one (not in git).
    sh(project, "dvc", "config", "--local", "core.site_cache_dir", str(project / ".dvc" / "site_cache"))
    yield project
    stop_queue_worker(project)


def test_exp_run_set_param_reruns_only_its_stage_and_after(exp_project):
    stage, key, values = sweep_param(exp_project)
    proc = sh(exp_project, "dvc", "exp", "run", "-n", "set-param", "-S", f"{key}={values[0]}")
    executed = ran(proc.stdout)
    order = stages_in(exp_project / "dvc.yaml")
    # check_params reads the whole params file, so it always reruns; its verdict (gates/params.passed) is
    # unchanged, so nothing downstream of it reruns on its account
    assert executed[:1] == ["check_params"], proc.stdout
    executed = executed[1:]
    assert executed and executed[0] == stage, proc.stdout
    assert set(executed) <= set(order[order.index(stage) :]), executed
    # `-S` leaves the value in the workspace params.yaml, and the run is recorded as an experiment.
    assert lookup(yaml.safe_load((exp_project / "params.yaml").read_text()), key) == float(values[0])
    row = next(r for r in exp_rows(exp_project) if r["name"] == "set-param")
    assert lookup(row["params"], key) == float(values[0])


def test_queued_sweep_runs_and_exp_show_lists_gate_metrics_side_by_side(exp_project):
    _, key, values = sweep_param(exp_project)
    names = [f"sweep-{i}" for i in range(1, len(values))]
    for name, value in zip(names, values[1:]):
        sh(exp_project, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"{key}={value}")
    t0 = time.perf_counter()
    sh(exp_project, "dvc", "queue", "start", "-j", "1")  # 2 cores: one worker, one experiment at a time
    status = wait_for_queue(exp_project, names)
    seconds = time.perf_counter() - t0
    failed = {
        n: sh(exp_project, "dvc", "queue", "logs", n, check=False).stdout[-3000:]
        for n, s in status.items()
        if s != "Success"
    }
    assert not failed, failed

    rows = {r["name"]: r for r in exp_rows(exp_project)}
    for name, value in zip(names, values[1:]):
        assert lookup(rows[name]["params"], key) == float(value), rows[name]["params"]
    columns = gate_columns(exp_project)
    assert columns, "the pipeline declares no gate"
    table = []
    for name, row in rows.items():
        cells = {label: lookup(row["metrics"].get(f, {}), k) for label, f, k in columns}
        missing = [c for c, v in cells.items() if v is None]
        assert not missing, f"{name}: gate metrics missing from `dvc exp show --json`: {missing}"
        table.append((name, lookup(row["params"], key), cells))
    assert {n for n, _, _ in table} >= set(names)

    # The README's table: every experiment, one metric of every gate by name, within 120 columns.
    shown = sh(exp_project, *readme_exp_show(), env={"COLUMNS": "120"}).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120 and "…" not in shown, shown
    assert all(name in shown for name in names), shown
    header = next(x for x in lines if "Experiment" in x).split()
    gated = {label.split(".")[0] for label, _, _ in columns}
    named = {label.split(".")[0] for label, _, key in columns if key in header}
    assert named == gated, f"gates without a column: {sorted(gated - named)}\n{shown}"
    print(f"\nqueued sweep of {len(names)} experiments: {seconds:.1f} s with 1 worker")
    for name, value, cells in table:
        print(
            f"  {name:>12}  {key}={value}  "
            + "  ".join(
                f"{c}={v:.4g}" if isinstance(v, float) and not isinstance(v, bool) else f"{c}={v}"
                for c, v in cells.items()
            )
        )


def test_autopilot_retries_a_failed_retention_gate_as_dvc_experiments(exp_project):
    """A retention threshold no model meets: try 1 (the workspace params) is stopped by gate_evaluate; try 2 runs
    with the prescribed smaller dpo.learning_rate and halved iterate.max_steps (Stages 5-7 rerun, nothing before);
    the budget of 2 ends it, naming the gate. Both tries are experiments in `dvc exp show`."""
    params = exp_project / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    lr, backoff, steps = raw["dpo"]["learning_rate"], raw["dpo"]["lr_backoff"], raw["iterate"]["max_steps"]
    try:
        params.write_text(original.replace("min_retention: 0.0", "min_retention: 1000.0", 1))
        assert "min_retention: 1000.0" in params.read_text()
        proc = sh(
            exp_project,
            "python",
            "-m",
            "dpoflow",
            "autopilot",
            "--budget",
            "2",
            "--json",
            "autopilot.json",
            check=False,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-4000:]
        result = json.loads((exp_project / "autopilot.json").read_text())
        assert result["status"] == "budget" and "gate evaluate still held" in result["message"], result["message"]
        first, second = result["tries"]
        assert first["held"]["gate"] == "evaluate" and [c["metric"] for c in first["held"]["checks"]] == ["retention"]
        assert second["settings"] == {"dpo.learning_rate": pytest.approx(lr * backoff), "iterate.max_steps": steps // 2}
        reran = ran(out.split(f"$ dvc exp run -n {second['name']}")[1])
        assert "dpo" in reran and not {"sft", "preference_data", "init", "reward_model"} & set(reran), reran
        shown = sh(exp_project, *readme_exp_show(), env={"COLUMNS": "120"}).stdout
        assert first["name"] in shown and second["name"] in shown, shown
        rows = {r["name"]: r for r in exp_rows(exp_project)}
        assert lookup(rows[second["name"]]["params"], "dpo.learning_rate") == pytest.approx(lr * backoff)
        print("\n" + out[-3000:] + "\n" + shown)
    finally:
        params.write_text(original)
        sh(exp_project, "git", "checkout", "--", ".", check=False)
        sh(exp_project, "dvc", "checkout", "--force", check=False)
        (exp_project / "autopilot.json").unlink(missing_ok=True)
