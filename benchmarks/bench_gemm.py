"""Same-run fp32 GEMM rate with MLX (OpenBLAS) at SmolLM2-135M's shapes: the MFU denominator (dpoflow's venv)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

if __name__ == "__main__":
    rates = [common.gemm_gflops_mlx() for _ in range(3)]
    out = {
        "mlx_openblas_gflops": max(rates),
        "samples": rates,
        "shapes_mkn": common.gemm_shapes(),
        "load": common.cpu_load(),
    }
    out["threads"] = common.threads()
    print(common.write_result("gemm" + common.suffix(), out), out["mlx_openblas_gflops"])
