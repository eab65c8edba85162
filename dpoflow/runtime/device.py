"""What we run on: the chip (for per-chip batch sizes), the BLAS MLX uses on Linux, a matmul probe, and the
numerics environment (`numerics_environment`: the labels that decide whether two runs can give the same bytes).

On Linux the `mlx[cpu]` wheel bundles the reference BLAS (~8 GFLOP/s fp32 here). `install_fast_blas` points the
wheel's bundled BLAS/LAPACK file names at the system OpenBLAS (found by libmlx through its RPATH), which is
15-30x faster and gives identical losses. On macOS MLX uses Accelerate/Metal and none of this applies.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
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
    out = {"python": platform.python_version()}
    for name in ("mlx", "mlx-lm", "lm-eval", "dvc", "dvclive", "transformers", "datasets", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------
# Numerics environment (issue 21)

UNSET = "(unset)"


def _loaded_libraries() -> list[str]:
    """Shared objects mapped into this process, in load order (Linux: /proc/self/maps; elsewhere none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = [parts[5] for parts in (line.split(maxsplit=5) for line in lines) if len(parts) == 6]
    return list(dict.fromkeys(p for p in paths if p.startswith("/") and ".so" in Path(p).name))


def _openblas_labels() -> dict[str, str]:
    """OpenBLAS's own labels, through ctypes, from the BLAS MLX loaded into this process ({} if it is not
    OpenBLAS): the library file, its build config, the kernel (core type) it picked and its thread count."""
    for path in _loaded_libraries():
        if "blas" not in Path(path).name.lower():
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if not all(hasattr(lib, f) for f in ("openblas_get_config", "openblas_get_corename")):
            continue
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        threads = str(lib.openblas_get_num_threads()) if hasattr(lib, "openblas_get_num_threads") else "unknown"
        return {
            "blas_library": path,
            "blas_config": (lib.openblas_get_config() or b"").decode(errors="replace").strip(),
            "blas_core": (lib.openblas_get_corename() or b"").decode(errors="replace").strip(),
            "blas_threads": threads,
        }
    return {}


def _threadpoolctl_labels() -> dict[str, str]:
    """The same labels from threadpoolctl when it is installed (MKL, BLIS, or an OpenBLAS ctypes missed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            name = f"{info.get('internal_api', 'blas')} {info.get('version') or ''}".strip()
            return {
                "blas_library": str(info.get("filepath", "unknown")),
                "blas_config": f"{name} ({info.get('threading_layer', 'unknown')} threads)",
                "blas_core": str(info.get("architecture") or "unknown"),
                "blas_threads": str(info.get("num_threads", "unknown")),
            }
    return {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def numerics_environment() -> dict[str, str]:
    """What decides the numerics of a run, as labels (strings: to record beside a run's metrics and compare by eye,
    never as numbers). The same labels and inputs give the same bytes; another BLAS kernel, thread count, device
    (Metal, CUDA) or MLX version gives the same gate decisions within their intervals, not the same bytes
    (docs/remote-and-experiments.md, "What reproduces where").

    Keys: device, chip, blas (kind and path, `blas_in_use`), blas_library, blas_config, blas_core (OpenBLAS's
    kernel / core type), blas_threads, openblas_coretype / openblas_num_threads / omp_num_threads (the variables
    that override them), cpu, cpu_count, mlx, mlx-lm, python, platform, machine.
    """
    import mlx.core as mx

    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # the BLAS is loaded (and has picked its kernel) by now
    blas = {"blas_library": "n/a", "blas_config": "n/a", "blas_core": "n/a", "blas_threads": "n/a"}
    blas.update(_openblas_labels() or _threadpoolctl_labels())
    return {
        "device": device_name(),
        "chip": detect_chip(),
        "blas": blas_in_use(),
        **blas,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", UNSET),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", UNSET),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", UNSET),
        "cpu": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "mlx": _version("mlx"),
        "mlx-lm": _version("mlx-lm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
