"""A throwaway copy of the project on the CI profile, for tests that run `dvc` for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "tests" / "profiles" / "ci.yaml"
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml")
PROJECT_DIRS = ("stages", "dpoflow", "inputs", "examples")


def deep_merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, overrides), sort_keys=False))


def env_for(project: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(project),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@localhost",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@localhost",
    }


def run(project: Path, *args: str, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args), cwd=project, env=env_for(project), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def make_project(dst: Path, overrides: dict | None = None, params: Path | None = None, profile: bool = True) -> Path:
    """Copy the pipeline into `dst` as a fresh git + DVC repo on the CI profile (plus `overrides`); `params` is
    another params file to start from (e.g. examples/chat/params.yaml)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy(ROOT / name, dst / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if params is not None:
        shutil.copy(params, dst / "params.yaml")
    base = yaml.safe_load(PROFILE.read_text()) if profile else {}
    write_params(dst, deep_merge(base, overrides or {}))
    (dst / ".gitignore").write_text("__pycache__/\n/checkpoints/\n")
    run(dst, "git", "init", "-q")
    run(dst, "dvc", "init", "-q")
    run(dst, "dvc", "config", "core.analytics", "false")
    run(dst, "dvc", "config", "--local", "core.site_cache_dir", str(dst / ".dvc" / "site_cache"))
    (dst / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n/site_cache\n")
    run(dst, "git", "add", "-A")
    run(dst, "git", "commit", "-qm", "CI profile project")
    return dst


def kill_after_sft_checkpoint(project: Path, *args: str, after: float = 0.0, timeout: int = 900) -> None:
    """Run `dvc repro <args>` and SIGKILL its process group `after` seconds past checkpoints/sft/state.json's
    appearance; asserts the run was really interrupted."""
    state = project / "checkpoints" / "sft" / "state.json"
    proc = subprocess.Popen(
        ["dvc", "repro", *args],
        cwd=project,
        env=env_for(project),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not state.exists():
            assert proc.poll() is None, "dvc repro ended before its first checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout} s"
            time.sleep(0.02)
        time.sleep(after)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: nothing was interrupted"
