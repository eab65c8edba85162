"""The numerics environment (issue 21): the labels that decide whether two runs can give the same bytes, from
`device.numerics_environment()` and `python -m dpoflow doctor`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpoflow.__main__ import cli
from dpoflow.runtime.device import numerics_environment

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "device",
    "chip",
    "blas",
    "blas_library",
    "blas_config",
    "blas_core",
    "blas_threads",
    "openblas_coretype",
    "openblas_num_threads",
    "omp_num_threads",
    "cpu",
    "cpu_count",
    "mlx",
    "mlx-lm",
    "python",
    "platform",
    "machine",
}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return numerics_environment()


def test_numerics_environment_has_every_label_as_a_string(env):
    assert set(env) == KEYS
    assert all(isinstance(v, str) and v for v in env.values()), env
    assert env["mlx"] == version("mlx") and env["mlx-lm"] == version("mlx-lm")
    assert env["python"] == platform.python_version() and env["machine"] == platform.machine()
    assert env["cpu_count"] == str(os.cpu_count())
    if env["blas"].startswith("openblas"):  # Linux with OpenBLAS (`make setup`): its own labels, read via ctypes
        assert env["blas_config"].startswith("OpenBLAS") and env["blas_core"] not in ("", "n/a", "unknown")
        assert Path(env["blas_library"]).exists() and env["blas_threads"].isdigit()


def test_blas_labels_come_from_the_loaded_library(env):
    """OPENBLAS_CORETYPE picks OpenBLAS's kernel at load time: a process started with it reports that kernel."""
    if "DYNAMIC_ARCH" not in env["blas_config"] or platform.machine() != "x86_64":
        pytest.skip(f"needs an x86_64 DYNAMIC_ARCH OpenBLAS, MLX uses {env['blas']}")
    code = "import json; from dpoflow.runtime.device import numerics_environment as n; print(json.dumps(n()))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    other = json.loads(proc.stdout)
    assert other["openblas_coretype"] == "Prescott" and other["blas_core"].lower() == "prescott"
    assert other["openblas_num_threads"] == "1" and other["blas_threads"] == "1"


def test_doctor_prints_the_numerics_environment(env):
    result = CliRunner().invoke(cli, ["doctor", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("numerics environment"))
    printed = dict(line.strip().split(":", 1) for line in lines[start + 1 :] if line.startswith("  "))
    assert set(printed) == KEYS
    assert {k: v.strip() for k, v in printed.items() if k not in ("blas_threads",)} == {
        k: v for k, v in env.items() if k != "blas_threads"
    }
