"""What we run on: the chip (for per-chip batch sizes), the BLAS MLX uses on Linux, and a matmul probe.

On Linux the `mlx[cpu]` wheel bundles the reference BLAS (~8 GFLOP/s fp32 here). `install_fast_blas` points the
wheel's bundled BLAS/LAPACK file names at the system OpenBLAS (found by libmlx through its RPATH), which is
15-30x faster and gives identical losses. On macOS MLX uses Accelerate/Metal and none of this applies.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

OPENBLAS_DIR = (
    Path("/usr/lib/x86_64-linux-gnu/openblas-pthread")
    if platform.machine() == "x86_64"
    else Path("/usr/lib/aarch64-linux-gnu/openblas-pthread")
)
OPENBLAS_APT_PACKAGE = "libopenblas0-pthread"


def detect_chip() -> str:
    """Map the MLX device to a batch_size key: m4_max, m3_ultra, apple (other Apple silicon), cuda or cpu."""
    import mlx.core as mx

    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        name = str(mx.device_info().get("device_name", "")).lower()
        for chip in ("m4 max", "m3 ultra"):
            if chip in name:
                return chip.replace(" ", "_")
        return "apple"
    return "cpu"


def device_name() -> str:
    import mlx.core as mx

    info = mx.device_info()
    return f"{mx.default_device()} ({info.get('device_name', platform.processor() or 'unknown')})"


def _mlx_libs_dir() -> Path | None:
    import mlx.core

    libs = Path(mlx.core.__file__).resolve().parent.parent / "mlx_cpu.libs"
    return libs if libs.is_dir() else None


def blas_in_use() -> str:
    """The BLAS library MLX resolves on Linux: 'openblas (<path>)', 'reference (<path>)' or the platform's."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    libs = _mlx_libs_dir()
    if libs is None:
        return "unknown (no bundled mlx_cpu.libs: a CUDA or source build)"
    bundled = sorted(glob.glob(str(libs / "libblas-*.so*")))
    if not bundled:
        return "unknown"
    target = Path(bundled[0]).resolve()
    kind = "openblas" if "openblas" in str(target).lower() else "reference"
    if kind == "reference" and "openblas" in os.environ.get("LD_PRELOAD", ""):
        kind = "openblas (LD_PRELOAD)"
    return f"{kind} ({target})"


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 n x n matmul rate on the default device, in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a @ b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e9


def install_fast_blas(apt: bool = True) -> str:
    """Make MLX's CPU wheel use OpenBLAS (Linux only). Returns a one-line status; never raises.

    Installs Debian's OpenBLAS with apt when missing and we are root; otherwise says what to do.
    """
    if not sys.platform.startswith("linux"):
        return "fast BLAS: not needed on this platform"
    libs = _mlx_libs_dir()
    if libs is None:
        return "fast BLAS: mlx_cpu.libs not found (not the mlx[cpu] wheel); nothing to do"
    openblas = OPENBLAS_DIR / "libblas.so.3"
    if not openblas.exists() and apt and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", OPENBLAS_APT_PACKAGE],
            check=False,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not openblas.exists():
        return (
            f"fast BLAS: NOT installed: {openblas} missing. As root run `apt-get install {OPENBLAS_APT_PACKAGE}` "
            f"and `make setup`, or run with LD_PRELOAD={OPENBLAS_DIR}/libopenblas.so.0. MLX on CPU will be ~20x slower."
        )
    for pattern, system_lib in (("libblas-*.so*", openblas), ("liblapack-*.so*", OPENBLAS_DIR / "liblapack.so.3")):
        for bundled in glob.glob(str(libs / pattern)):
            bundled = Path(bundled)
            if bundled.is_symlink() and bundled.resolve() == system_lib.resolve():
                continue
            backup = bundled.with_name(bundled.name + ".reference")
            if not bundled.is_symlink() and not backup.exists():
                os.rename(bundled, backup)
            elif bundled.exists() or bundled.is_symlink():
                bundled.unlink()
            bundled.symlink_to(system_lib)
    return f"fast BLAS: MLX now uses {openblas.resolve()}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("mlx", "mlx-lm", "lm-eval", "dvc", "dvclive", "transformers", "datasets", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
