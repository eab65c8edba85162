"""Faults: kill -9 mid-stage, a full disk while saving, a write killed mid-way, non-finite gradients.

- `dvc repro sft` on the CI profile is SIGKILLed (the whole process group: DVC and the stage) right after the
  trainer's checkpoint appears, at a seeded random delay; the next `dvc repro sft` resumes from the checkpoint and
  ends with a metrics/sft.json, model and loss curve identical to an uninterrupted run's, and no half-written
  artifact or temporary is ever left behind. (dvclive writes its curves itself, not atomically: a killed run can
  leave dvclive/<stage>/metrics.json truncated; the rerun rewrites the curves from the checkpoint's history.)
- ENOSPC while a model / metrics file is written: a clear error naming the target, the previous artifact intact,
  no temporary left behind.
- A process SIGKILLed in the middle of an atomic write: the old content survives; the next write cleans up.
- Non-finite gradients with a finite loss stop training (TrainingDiverged) and keep the last good checkpoint (the
  NaN-loss case is tests/test_dpo.py::test_nan_loss_stops_with_training_diverged_and_keeps_the_checkpoint).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map
from safetensors import safe_open

from dpoflow.modeling.loading import load_model, save_model
from dpoflow.runtime import io
from dpoflow.training.trainer import TrainConfig, TrainingDiverged, train
from tests.pipeline_project import kill_after_sft_checkpoint, make_project, run

ARTIFACT_DIRS = ("models", "metrics", "reports", "data", "checkpoints", "dvclive", "gates")
ATOMIC_DIRS = ("models", "metrics", "reports", "data", "checkpoints", "gates")  # written through dpoflow.runtime.io


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def leftovers(project: Path) -> list[str]:
    """Temporaries of atomic writes (`.<name>.XXXXXXXX.tmp`, `.<name>.old`) anywhere under the artifact folders."""
    return [
        str(p.relative_to(project))
        for d in ARTIFACT_DIRS
        if (project / d).exists()
        for p in (project / d).rglob(".*")
        if p.name.endswith((".tmp", ".old"))
    ]


def assert_artifacts_whole(project: Path, dirs: tuple[str, ...] = ARTIFACT_DIRS) -> None:
    """Every artifact on disk is complete: JSON parses, safetensors open, a model folder has all its files."""
    for d in dirs:
        for path in (project / d).rglob("*") if (project / d).exists() else []:
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(project).parts):
                continue
            if path.suffix == ".json":
                assert path.read_text().strip(), path
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    json.loads(line)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="np") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        f.get_tensor(key)
    for folder in (project / "models").iterdir() if (project / "models").exists() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}, folder


def loss_curve(project: Path) -> list[str]:
    """(step, loss) of every row of the dvclive training-loss curve (its timestamps differ run to run)."""
    rows = (project / "dvclive" / "sft" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    return [tuple(row.split("\t")[header.index(k)] for k in ("step", "loss")) for row in rows[1:]]


# ------------------------------------------------------------------------------------------------ kill -9 + repro
@pytest.mark.e2e
def test_sigkill_during_sft_then_repro_resumes_and_matches_an_uninterrupted_run(tmp_path):
    project = make_project(tmp_path / "project")
    state = project / "checkpoints" / "sft" / "state.json"
    # killed at a random-ish point after the first checkpoint
    kill_after_sft_checkpoint(project, "sft", after=random.Random(8).uniform(0.0, 0.2), timeout=600)
    assert_artifacts_whole(project, ATOMIC_DIRS)
    checkpoint_step = json.loads(state.read_text())["step"] if state.exists() else 0

    resumed = run(project, "dvc", "repro", "sft")
    assert "Running stage 'sft'" in resumed.stdout
    assert json.loads((project / "reports" / "perf" / "sft.json").read_text())["resumed_from_step"] == checkpoint_step
    assert not (project / "checkpoints" / "sft").exists()  # cleared once the artifacts are written
    assert_artifacts_whole(project)
    assert leftovers(project) == []
    interrupted = (project / "reports" / "sft.json").read_text()
    interrupted_model = tree_digest(project / "models" / "sft")
    interrupted_curve = loss_curve(project)

    run(project, "dvc", "repro", "--force", "--single-item", "sft")  # the uninterrupted reference, same project
    assert json.loads((project / "reports" / "perf" / "sft.json").read_text())["resumed_from_step"] == 0
    assert (project / "reports" / "sft.json").read_text() == interrupted
    assert tree_digest(project / "models" / "sft") == interrupted_model
    assert loss_curve(project) == interrupted_curve and len(interrupted_curve) == 60
    assert "up to date" in run(project, "dvc", "status", "sft").stdout


# ------------------------------------------------------------------------------------------------ full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_a_model_keeps_the_previous_one_and_no_temporary(tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    config = io.read_json(tiny_model_dir / "config.json")
    out = tmp_path / "models" / "sft"
    save_model(model, tokenizer, out, config)
    before = tree_digest(out)

    real_save = mx.save_safetensors

    def full_disk(path, arrays, *args, **kwargs):  # half a file reaches the disk, then the disk is full
        real_save(path, arrays, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        _enospc()

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    model.update(tree_map(lambda w: w + 1, model.parameters()))
    with pytest.raises(OSError) as err:
        save_model(model, tokenizer, out, config)
    assert err.value.errno == errno.ENOSPC
    assert any(f"while writing {out}" in note for note in err.value.__notes__)
    assert tree_digest(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft"]


def test_disk_full_while_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics" / "sft.json"
    io.write_json(path, {"val_loss": 1.0})
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(OSError, match="No space left") as err:
        io.write_json(path, {"val_loss": 2.0})
    assert any(f"while writing {path}" in note for note in err.value.__notes__)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"val_loss": 1.0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["sft.json"]


# ------------------------------------------------------------------------------------------------ killed writes
WRITER = """
import sys, time
from pathlib import Path
from dpoflow.runtime import io
target = Path(sys.argv[1])
with io.atomic_path(target) as tmp:
    tmp.mkdir()
    (tmp / "a.bin").write_bytes(b"new" * 1000)
    print("writing", flush=True)
    time.sleep(60)  # killed here
"""


@pytest.mark.parametrize("moved_aside", [False, True])
def test_write_killed_midway_leaves_the_old_version_and_the_next_write_cleans_up(tmp_path, moved_aside):
    target = tmp_path / "models" / "policy"
    with io.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(b"old")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    if moved_aside:  # killed between the two renames of a directory replacement: only `.policy.old` is left
        os.rename(target, target.with_name(".policy.old"))
    assert any(p.name.endswith(".tmp") for p in target.parent.iterdir())  # the killed writer's temporary
    io.recover(target)  # what the next write (or the trainer, for its checkpoint) does first
    assert (target / "a.bin").read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["policy"]


# ------------------------------------------------------------------------------------------------ non-finite grads
class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.ones((4,))


def test_non_finite_gradient_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    def loss_fn(model, poison):  # finite loss; at the poisoned step d/dw sqrt(0 * w) = inf * 0 = NaN
        loss = ((model.w - 2.0) ** 2).mean()
        return loss + (mx.sqrt(mx.abs(model.w * 0.0)).sum() if poison else 0.0), {}

    cfg = TrainConfig(steps=5, learning_rate=0.1, checkpoint_every=1, checkpoint_dir=tmp_path / "ckpt")
    model = _Linear()
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient norm at step 3.*last good checkpoint kept"):
        train(model, loss_fn, lambda step, micro: (step == 2, 1.0), cfg)
    state = io.read_json(tmp_path / "ckpt" / "state.json")
    assert state["step"] == 2 and all(math.isfinite(h["loss"]) for h in state["history"])
    weights = mx.load(str(tmp_path / "ckpt" / "trainable.safetensors"))["w"]
    assert bool(mx.all(mx.isfinite(weights)).item()) and bool(mx.all(mx.isfinite(model.w)).item())
