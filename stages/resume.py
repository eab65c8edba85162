"""Resume state (checkpoints/<stage>) tied to the DVC run it belongs to (issue 21).

A training stage resumes from checkpoints/<stage> only when the checkpoint's fingerprint matches the run's. The
fingerprint a stage passes ends with the run's DVC identity (`dvc-run=<key>`): the key DVC's run-cache gives this
run, a sha256 over the stage's command, the hashes of its dependencies and its params' values (dvc.lock without
the outputs). So a checkpoint is resumed only by a run DVC considers the same run (same code, data and params),
whatever the stage's own fingerprint leaves out; at the stage's next run with other inputs the trainer deletes it.

After a kill, DVC can complete the run without running the stage: restored from the run-cache, pulled, or reproduced
elsewhere and checked out. The checkpoint then stays on disk, stale (DVC has no hook for that). `sweep` deletes every
checkpoints/<stage> whose identity is the one dvc.lock now records for that stage (the run is complete, nothing to
resume); each training stage sweeps when it starts, so a stale checkpoint lasts at most until the next training run.

Outside a DVC project (a stage run by hand in a scratch folder) there is no identity: the stage's own fingerprint
alone decides, as before.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import yaml

from dpoflow.runtime import distributed

CHECKPOINTS = Path("checkpoints")
IDENTITY = re.compile(r"dvc-run=([0-9a-f]{64})")


def dvc_run_identity(stage: str) -> str:
    """The run-cache key of `stage` in the current workspace (what dvc.lock would record, outputs left out)."""
    from dvc.repo import Repo  # imported here: heavy, and only a training stage needs it
    from dvc.stage.cache import _get_stage_hash

    with Repo(os.getcwd()) as repo:
        (dvc_stage,) = repo.stage.collect(stage)
        dvc_stage.save_deps()  # the hashes DVC computed for this run (from its state database: no rehashing)
        return _get_stage_hash(dvc_stage)


def locked_identity(lock_entry: dict) -> str:
    """The run-cache key of a dvc.lock entry (the run DVC last completed for that stage)."""
    from dvc.stage.cache import _get_cache_hash

    return _get_cache_hash(dict(lock_entry), key=True)


def run_fingerprint(stage: str, fingerprint: str) -> str:
    """`fingerprint` + `|dvc-run=<this run's identity>`; sweeps stale checkpoints first (rank 0)."""
    if distributed.is_main_process():
        sweep(except_stage=stage)
    try:
        identity = dvc_run_identity(stage)
    except Exception as exc:  # not a DVC project, or the stage is not in dvc.yaml: the stage's fingerprint alone
        print(f"resume: no DVC run identity for {stage} ({type(exc).__name__}): own fingerprint only", file=sys.stderr)
        return fingerprint
    return f"{fingerprint}|dvc-run={identity}"


def checkpoint_identities(folder: Path) -> set[str]:
    """The DVC run identities recorded in a checkpoint folder's state files (the trainer's, Stage 6's rounds)."""
    found = set()
    for state in folder.rglob("*.json"):
        try:
            found.update(IDENTITY.findall(state.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return found


def sweep(except_stage: str | None = None, lock_path: Path = Path("dvc.lock")) -> list[str]:
    """Delete every checkpoints/<stage> (but `except_stage`'s) whose run dvc.lock records as complete. Returns the
    stages whose checkpoint was deleted. Safe inside `dvc repro`: it holds the repo lock, so no other stage of this
    workspace is running."""
    if not CHECKPOINTS.is_dir() or not lock_path.exists():
        return []
    try:
        locked = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    removed = []
    for folder in sorted(p for p in CHECKPOINTS.iterdir() if p.is_dir() and p.name != except_stage):
        if folder.name not in locked:
            continue
        if locked_identity(locked[folder.name]) in checkpoint_identities(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
            print(f"resume: removed {folder}: a stale checkpoint of a run DVC has completed since", file=sys.stderr)
    return removed
