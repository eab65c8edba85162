"""Resume checkpoints are tied to the DVC run they belong to (issue 21, stages/resume.py).

After `kill -9`, DVC can complete the killed run without running the stage (restored from the run-cache), which
leaves checkpoints/<stage> behind. Such a checkpoint must never be resumed by a run with other inputs (the stages'
own fingerprints leave inputs out: Stage 1's ignores data.system_prompt and the SFT data), and the next training
stage sweeps it away.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_project import ROOT, env_for, kill_after_sft_checkpoint, make_project, run, write_params

STAGES = str(ROOT / "stages")
SWEEP = f"import sys; sys.path.insert(0, {STAGES!r}); from resume import sweep; print(sweep())"
SWEEP_BUT_TRAIN = SWEEP.replace("sweep()", "sweep('train')")
IDENTITY = (
    f"import sys; sys.path.insert(0, {STAGES!r}); from resume import dvc_run_identity; "
    "open(sys.argv[1], 'w').write(dvc_run_identity(sys.argv[2]))"
)


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`run` with this checkout's dpoflow and stages/ importable (a scratch project has neither)."""
    proc = subprocess.run(
        list(args), cwd=project, env={**env_for(project), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _python(project: Path, code: str) -> str:
    return _run(project, sys.executable, "-c", code).stdout.strip()


def test_run_identity_is_the_run_cache_key_and_sweep_removes_only_completed_runs(tmp_path):
    """A scratch DVC project whose stage records `dvc_run_identity` from inside `dvc repro`: it equals the key
    DVC's run-cache files the run under and the key of its dvc.lock entry; `sweep` deletes a checkpoint carrying
    that identity, keeps one of another run, and leaves the running stage's own."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "data.txt").write_text("data\n")
    (project / "params.yaml").write_text("train: {lr: 0.1, steps: 3}\n")
    stage = {"cmd": f'{sys.executable} -c "{IDENTITY}" identity.txt train', "deps": ["data.txt"]}
    (project / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"train": {**stage, "params": ["train.lr"], "outs": ["identity.txt"]}}})
    )
    run(project, "git", "init", "-q")
    run(project, "dvc", "init", "-q")
    _run(project, "dvc", "repro")
    identity = (project / "identity.txt").read_text()
    assert len(identity) == 64 and (project / ".dvc" / "cache" / "runs" / identity[:2] / identity).is_dir()
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]
    code = f"import sys; sys.path.insert(0, {STAGES!r}); from resume import locked_identity as k; print(k({locked!r}))"
    assert _python(project, code) == identity

    def checkpoint(name: str, run_identity: str) -> Path:
        folder = project / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": 2, "fingerprint": f"(...)|dvc-run={run_identity}"}))
        return folder

    done = checkpoint("train", identity)
    assert _python(project, SWEEP) == "['train']" and not done.exists()  # the run is complete: stale
    other = checkpoint("train", "0" * 64)  # a killed run with other inputs: resumable if they come back
    assert _python(project, SWEEP) == "[]" and other.exists()
    shutil.rmtree(other)
    own = checkpoint("train", identity)
    assert _python(project, SWEEP_BUT_TRAIN) == "[]" and own.exists()  # the running stage's own: the trainer decides


@pytest.mark.e2e
def test_checkpoint_left_by_a_kill_then_restored_from_cache_is_swept_and_never_resumed_wrongly(tmp_path):
    project = make_project(tmp_path / "project")
    run(project, "dvc", "repro", "sft")  # the run-cache now holds this sft run
    ckpt = project / "checkpoints" / "sft"
    kill_after_sft_checkpoint(project, "-f", "-s", "sft")  # the same run again, killed after its first checkpoint
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] > 0 and "|dvc-run=" in state["fingerprint"]

    restored = run(project, "dvc", "repro", "sft").stdout  # DVC completes the run from its run-cache ...
    assert "Running stage 'sft'" not in restored and "is cached" in restored, restored
    assert ckpt.exists()  # ... and leaves the killed run's checkpoint behind: stale
    stale = tmp_path / "stale-sft"
    shutil.copytree(ckpt, stale)

    # what every training stage does when it starts: the checkpoint of a run dvc.lock records as done goes
    assert _python(project, SWEEP) == "['sft']" and not ckpt.exists()

    # were it still there (no training stage ran since), a run with other inputs must not resume it: the stage's
    # own fingerprint (sft params, seed, batch size, base model) does not see data.system_prompt, DVC's identity does
    shutil.copytree(stale, ckpt)
    write_params(project, {"data": {"system_prompt": "Answer with the number only."}})
    out = run(project, "dvc", "repro", "sft").stdout
    assert "Running stage 'sft'" in out
    perf = json.loads((project / "reports" / "perf" / "sft.json").read_text())
    assert perf["resumed_from_step"] == 0, f"resumed a stale checkpoint from step {perf['resumed_from_step']}"
    assert not ckpt.exists()
