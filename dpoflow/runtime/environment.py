"""The numerics environment of a run written beside its metrics: `write_environment(path)` (issue 21)."""

from __future__ import annotations

import os

from dpoflow.runtime import io
from dpoflow.runtime.device import numerics_environment


def write_environment(path: str | os.PathLike) -> dict[str, str]:
    """Write `device.numerics_environment()` as JSON to `path` (atomically) and return it. Machine-dependent by
    design: it belongs beside a stage's metrics (e.g. metrics/perf/<stage>.environment.json), not in the
    deterministic quality metrics that tests/test_reproducibility.py compares byte for byte."""
    env = numerics_environment()
    io.write_json(path, env)
    return env
