"""The session's reproduced CI-profile pipeline, shared by every test file that needs one (a pytest plugin).

A test module opts in with `pytest_plugins = ["tests.fixtures_pipeline"]`. pytest registers the plugin once per
session, so the `pipeline` fixture (one full `dvc repro` of the CI profile) runs once however many files use it.
Importing the fixture function directly into several modules would NOT share it: each module would get its own
fixture definition and its own repro.

After the repro the fixture commits everything (dvc.lock, the .gitignore files DVC wrote, the `cache: false`
metrics, gates and plots), as the real workflow does, so tests can `git clone` it. Tests that mutate git state, the
remote config or the workspace beyond "edit a param, then restore it and repro" work on a clone (`clone_project`)
with its own cache (the pipeline's objects hardlinked in, no run-cache shared) instead of the shared project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.pipeline_project import ROOT, env_for, make_project, run


def stages_in(dvc_yaml: Path) -> list[str]:
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def ran(output: str) -> list[str]:
    """Names of the stages a `dvc repro` (or `dvc exp run`) output says it runs."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def sh(
    project: Path, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: int = 1800
) -> subprocess.CompletedProcess:
    """`pipeline_project.run` with extra environment variables (credentials, ...)."""
    if env is None:
        return run(project, *args, check=check, timeout=timeout)
    proc = subprocess.run(
        list(args), cwd=project, env={**env_for(project), **env}, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def timed(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = sh(project, *args, env=env)
    return proc, time.perf_counter() - t0


def commit_all(project: Path, message: str) -> None:
    run(project, "git", "add", "-A")
    if run(project, "git", "status", "--porcelain").stdout.strip():
        run(project, "git", "commit", "-qm", message)


def use_repo_dvc_config(project: Path) -> None:
    """Give a test project the repo's own committed .dvc/config (cache link types, default local remote).

    The default local remote's url is relative to .dvc/, so in a test project it points at a sibling folder of
    that project (`<parent>/dpoflow-remote`), exactly as it does for a checkout of the real repo.
    """
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")


def link_cache_objects(src: Path, dst: Path) -> None:
    """Seed dst's DVC cache with src's cached objects as hardlinks (copies where links fail). Cache objects are
    immutable and read-only, so sharing their inodes is safe; the run-cache (.dvc/cache/runs) is NOT shared, so a
    stage run in one project is never "restored from run-cache" in another."""
    objects = src / ".dvc" / "cache" / "files"
    if objects.exists():

        def link(a: str, b: str) -> None:
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)

        shutil.copytree(objects, dst / ".dvc" / "cache" / "files", copy_function=link, dirs_exist_ok=True)


def clone_project(src: Path, dst: Path, with_outputs: bool = True) -> Path:
    """`git clone` a test project. With `with_outputs`, the clone gets its own DVC cache holding src's objects
    (hardlinked, no data copied) and its outputs checked out, so experiments or pushes in the clone leave src
    untouched; without, it is a bare checkout that must `dvc pull`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    run(dst.parent, "git", "clone", "-q", str(src), str(dst))
    if with_outputs:
        link_cache_objects(src, dst)
        run(dst, "dvc", "checkout", "-q")
    return dst


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """One full `dvc repro` of the CI profile, committed. Tests may edit params but must restore them + repro."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    use_repo_dvc_config(project)
    commit_all(project, "the repo's .dvc/config")
    t0 = time.perf_counter()
    proc = run(project, "dvc", "repro")
    seconds = time.perf_counter() - t0
    (project / "repro.log").write_text(proc.stdout + proc.stderr + f"\n# dvc repro took {seconds:.1f} s\n")
    with open(project / ".git" / "info" / "exclude", "a") as exclude:
        exclude.write("/repro.log\n")
    commit_all(project, "dvc repro on the CI profile")
    return project
