"""Same params + same seed => byte-identical quality metrics; another seed => different ones.

Convention (docs/architecture.md): the numbers a person compares go to metrics/<stage>.json (flat: numbers only),
their detail to reports/<stage>.json and the gate verdicts to reports/gates/<stage>.json; all must be deterministic.
Timings, throughput and memory go to reports/perf/, which is excluded here by design. Two extra runs on top of the
session's pipeline:
  - a fresh checkout of the session pipeline's commit (same code, params, seed; no cache, no outputs), the full
    `dvc repro`: every metrics file must match the session pipeline's committed ones byte for byte (a mismatch
    names the stage and the keys that differ);
  - the same with seed 1, reproduced up to the SFT stage (enough to show the seed reaches the model and
    the data; keeps the test time down): the model-bearing metrics must differ.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.fixtures_pipeline")
from tests.fixtures_pipeline import clone_project, ran, sh, stages_in  # noqa: E402
from tests.pipeline_project import write_params  # noqa: E402

pytest_plugins = ["tests.fixtures_pipeline"]
pytestmark = pytest.mark.e2e

TIMING_KEY = re.compile(
    r"(^|_)(time|times|seconds|secs|sec|duration|elapsed|wall|throughput|tok_s|tokens_per_s(ec)?"
    r"|per_sec|peak_memory\w*|memory_gb|timestamp)($|_)"
)


RESULT_FOLDERS = ("metrics", "reports/gates")  # in git; reports/<stage>.json (DVC-cached) is in test_determinism


def quality_metrics(files: dict[str, bytes]) -> dict[str, bytes]:
    return {path: data for path, data in files.items() if not path.startswith("reports/perf/")}


def workspace_metrics(project: Path) -> dict[str, bytes]:
    return quality_metrics(
        {
            str(p.relative_to(project)): p.read_bytes()
            for folder in RESULT_FOLDERS
            for p in sorted((project / folder).rglob("*.json"))
        }
    )


def committed_metrics(project: Path) -> dict[str, bytes]:
    names = sh(project, "git", "ls-tree", "-r", "--name-only", "HEAD", *RESULT_FOLDERS).stdout.split()
    return quality_metrics(
        {
            n: subprocess.run(["git", "show", f"HEAD:{n}"], cwd=project, check=True, capture_output=True).stdout
            for n in names
            if n.endswith(".json")
        }
    )


def flat(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def describe_differences(a: dict[str, bytes], b: dict[str, bytes]) -> str:
    lines = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) == b.get(path):
            continue
        if path not in a or path not in b:
            lines.append(f"{path}: only in {'the first' if path in a else 'the second'} run")
            continue
        fa, fb = flat(json.loads(a[path])), flat(json.loads(b[path]))
        keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        lines.append(
            f"{path} (stage {Path(path).stem}): " + ", ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys[:8])
        )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def reference(pipeline) -> dict[str, bytes]:
    """The session pipeline's metrics as committed right after its repro (later tests edit and restore params)."""
    metrics = committed_metrics(pipeline)
    assert metrics, "the session pipeline wrote no metrics"
    return metrics


def test_metrics_files_are_flat_numbers(reference):
    """What `dvc metrics show` / `diff` / `exp show` print: a few flat numbers per stage, no prose, lists or nesting
    (those live in reports/<stage>.json)."""
    owner: dict[str, str] = {}
    for path, data in reference.items():
        if path.startswith("metrics/"):
            values = json.loads(data)
            bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
            assert not bad and len(values) <= 12, f"{path}: {len(values)} keys; not flat numbers: {bad}"
            for key in values:  # unique names: `dvc exp show` prints them without the file
                assert key not in owner, f"metric {key!r} in both {owner[key]} and {path}"
                owner[key] = path


def test_timings_stay_out_of_quality_metrics(reference):
    """No timing/throughput/memory key outside reports/perf/<stage>.json."""
    offenders = {
        path: [k for k in flat(json.loads(data)) if TIMING_KEY.search(k.rsplit(".", 1)[-1])]
        for path, data in reference.items()
    }
    offenders = {path: keys for path, keys in offenders.items() if keys}
    assert not offenders, f"timing-like keys outside reports/perf/: {offenders}"


def fresh_checkout(pipeline: Path, dst: Path, overrides: dict | None = None) -> Path:
    """The session pipeline's committed sources and params (the same code even if the repo changes meanwhile),
    with no outputs, no cache, no run-cache, and none of the committed metrics/gates/plots: everything reruns."""
    project = clone_project(pipeline, dst, with_outputs=False)
    for generated in ("metrics", "reports", "gates", "dvclive"):
        shutil.rmtree(project / generated, ignore_errors=True)
    if overrides:
        write_params(project, overrides)
    return project


def test_same_seed_gives_identical_metrics(pipeline, reference, tmp_path):
    project = fresh_checkout(pipeline, tmp_path / "same-seed")
    stages = stages_in(project / "dvc.yaml")
    assert set(ran(sh(project, "dvc", "repro").stdout)) == set(stages)  # nothing restored from a cache
    again = workspace_metrics(project)
    assert set(again) == set(reference), describe_differences(reference, again)
    assert again == reference, (
        "same params and seed, different quality metrics (a nondeterministic stage, or a "
        f"timing outside reports/perf/):\n{describe_differences(reference, again)}\n"
        f"stages: {stages}"
    )


def test_different_seed_gives_different_metrics(pipeline, reference, tmp_path):
    project = fresh_checkout(pipeline, tmp_path / "seed-1", overrides={"seed": 1})
    target = ["sft"] if "sft" in stages_in(project / "dvc.yaml") else []
    sh(project, "dvc", "repro", *target)
    other = workspace_metrics(project)
    common = sorted(set(other) & set(reference))
    assert common, f"no metrics file in common: {sorted(other)} vs {sorted(reference)}"
    differ = [p for p in common if other[p] != reference[p]]
    model_bearing = [p for p in common if "val_loss" in flat(json.loads(reference[p]))]  # the SFT model's losses
    assert model_bearing and set(model_bearing) <= set(differ), (
        f"seed 0 and seed 1 gave the same {sorted(set(model_bearing) - set(differ))}"
    )
    print(f"\nseed 1 vs seed 0: differ {differ}; identical {sorted(set(common) - set(differ))}")
