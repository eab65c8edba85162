"""No-op `dvc repro` with ruamel's C YAML parser and with its pure-Python one, alternating, in one run (issue 23).

    python benchmarks/bench_noop_repro.py [--project DIR] [--rounds 3]

DVC parses dvc.yaml / dvc.lock several times and params.yaml once per stage; ruamel uses its C parser when
`ruamel.yaml.clib` is installed (requirements.lock). The pure-Python side hides that module from the child process
(a sitecustomize that maps `_ruamel_yaml` to None), nothing else changes. Every stage must be up to date (checked
with `dvc status` first). Writes results/noop_repro.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed_repro(project: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "Running stage" in proc.stdout:
        sys.exit(f"Error: dvc repro in {project} is not a no-op (rc {proc.returncode}): {proc.stdout[-300:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=HERE.parent)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    status = subprocess.run(["dvc", "status", "--quiet"], cwd=args.project, env=env)
    if status.returncode != 0:
        sys.exit(f"Error: {args.project}: `dvc status` reports changed stages; run `dvc repro` first")
    hide = Path(tempfile.mkdtemp())
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["_ruamel_yaml"] = None\n')
    pure_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), env.get("PYTHONPATH")]))}
    times: dict[str, list[float]] = {"c_parser": [], "pure_python": []}
    try:
        timed_repro(args.project, env)  # warm the file system cache and DVC's state database
        for _ in range(args.rounds):
            times["c_parser"].append(timed_repro(args.project, env))
            times["pure_python"].append(timed_repro(args.project, pure_env))
    finally:
        shutil.rmtree(hide, ignore_errors=True)
    n_stages = subprocess.run(
        ["dvc", "stage", "list", "--name-only"], cwd=args.project, env=env, capture_output=True, text=True
    ).stdout.split()
    out = {
        "command": "dvc repro (every stage up to date)",
        "project": str(args.project),
        "stages": len(n_stages),
        "seconds": times,
        "best": {k: min(v) for k, v in times.items()},
    }
    path = HERE / "results" / "noop_repro.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["best"]), "->", path)


if __name__ == "__main__":
    main()
