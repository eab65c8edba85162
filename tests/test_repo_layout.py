"""What git holds and what DVC holds do not overlap: `dvc repro` refuses to cache an output git already tracks
("output ... is already tracked by SCM"), which stops the pipeline after the stage has done its work."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.pipeline_project import ROOT


def cached_outputs() -> list[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for kind, cached_by_default in (("outs", True), ("metrics", False), ("plots", False)):
            for out in stage.get(kind) or []:
                path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                if (opts or {}).get("cache", cached_by_default):
                    paths.append(path.rstrip("/"))
    return paths


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    proc = git("ls-files")
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return proc.stdout.splitlines()


def test_no_cached_output_is_tracked_by_git(tracked):
    both = [p for p in cached_outputs() for t in tracked if t == p or t.startswith(p + "/")]
    assert both == [], f"cached by DVC and tracked by git (git rm --cached them, ignore them): {both}"


def test_every_cached_output_is_git_ignored(tracked):
    assert cached_outputs()
    # a folder output may not exist here, and a "/name/" pattern matches only a folder: ask for a file inside too
    not_ignored = [
        p
        for p in cached_outputs()
        if all(git("check-ignore", "-q", "--no-index", q).returncode != 0 for q in (p, p + "/file"))
    ]
    assert not_ignored == [], f"add these DVC outputs to .gitignore: {not_ignored}"
