"""One command for the benchmarks: `python benchmarks/run.py` (from the project root, dpoflow's venv).

    python benchmarks/run.py                  # everything (creates the peers' venvs first: slow the first time)
    python benchmarks/run.py --only generation,dpoflow,trl-best
    python benchmarks/run.py --report         # only rewrite RESULTS.md from benchmarks/results/*.json

Sections, in priority order (each writes benchmarks/results/<name>.json; RESULTS.md is rewritten at the end):
  gemm        same-run fp32 GEMM rate (MLX + OpenBLAS, SmolLM2 shapes): the MFU denominator
  generation  Stage 2 sampling: shared prefill vs plain vs one by one, decode-step breakdown
  dpoflow     Stage 5 step: LoRA/full x 32+32/192+32 x shared prompt/plain [2B, T] forward
  trl-best    TRL LoRA + precomputed reference at both shapes
  trl         TRL: the other configurations (per-step reference, full)
  mlx-lm-lora mlx-lm-lora DPO, LoRA and full, both shapes
  dvc         no-op `dvc repro` time (skipped while a `dvc repro` runs) + reports/perf/*.json stage times
Every command runs under `nice -n 19` (the machine may be shared with a pipeline run that keeps priority).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROJECT = ROOT.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

PY = str(PROJECT / ".venv/bin/python")
TRL_PY = str(PROJECT / ".cache/benchmarks/venv-trl/bin/python")
MLL_PY = str(PROJECT / ".cache/benchmarks/venv-mlx-lm-lora/bin/python")
SECTIONS = ["gemm", "generation", "dpoflow", "trl-best", "trl", "mlx-lm-lora", "dvc"]


THREADS = 2


def sh(cmd: list[str], **kw) -> int:
    print("+", " ".join(cmd), flush=True)
    t = str(THREADS)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": str(PROJECT / ".cache/huggingface"),
        "DVC_NO_ANALYTICS": "1",
        "BENCH_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
    }
    return subprocess.run(["nice", "-n", "19", *cmd], cwd=PROJECT, env=env, **kw).returncode


def shapes() -> list[str]:
    return list(common.SHAPES)


def run_section(name: str) -> None:
    b = str(ROOT)
    if name == "gemm":
        sh([PY, f"{b}/bench_gemm.py"])
    elif name == "generation":
        sh([PY, f"{b}/bench_generation.py"])
    elif name == "dpoflow":
        for shape in shapes():
            for ft in ("lora", "full"):
                for path in ("shared", "plain"):
                    sh(
                        [
                            PY,
                            f"{b}/bench_dpoflow.py",
                            "--shape",
                            shape,
                            "--finetune",
                            ft,
                            "--path",
                            path,
                            "--name",
                            f"dpoflow_{ft}_{shape.replace('+', '_')}_{path}",
                        ]
                    )
    elif name in ("trl-best", "trl"):
        sh(["bash", f"{b}/setup_envs.sh", "trl"])
        configs = (
            [("lora", "precomputed")]
            if name == "trl-best"
            else [("lora", "per-step"), ("full", "precomputed"), ("full", "per-step")]
        )
        for shape in shapes():
            for ft, ref in configs:
                sh([TRL_PY, f"{b}/bench_trl.py", "--shape", shape, "--finetune", ft, "--reference", ref])
    elif name == "mlx-lm-lora":
        sh(["bash", f"{b}/setup_envs.sh", "mlx-lm-lora"])
        for shape in shapes():
            for ft in ("lora", "full"):
                sh([MLL_PY, f"{b}/bench_mlx_lm_lora.py", "--shape", shape, "--finetune", ft])
    elif name == "dvc":
        dvc_noop()


def dvc_noop() -> None:
    busy = subprocess.run(["pgrep", "-f", "dvc repro"], capture_output=True, text=True).stdout.split()
    busy = [p for p in busy if int(p) != os.getpid()]
    out: dict = {"stage_perf": {}}
    for f in sorted((PROJECT / "reports/perf").glob("*.json")):
        out["stage_perf"][f.stem] = json.loads(f.read_text())
    dvc = str(PROJECT / ".venv/bin/dvc")
    stale = None
    if not busy:  # what every `dvc repro` does before deciding what to run: hash every dep and out
        times = []
        for _ in range(3):
            t = time.perf_counter()
            stale = sh([dvc, "status", "--quiet"], capture_output=True)  # exit 1: some stage is not up to date
            times.append(time.perf_counter() - t)
        out["status"] = {"command": "dvc status", "seconds": times}
    if busy:
        out["noop_repro"] = f"skipped: a `dvc repro` is running (pids {' '.join(busy)})"
    elif stale:
        # A real `dvc repro` would run stages here: only time it when every stage is up to date.
        out["noop_repro"] = "skipped: `dvc status` reports changed stages (run `dvc repro` first)"
    else:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            rc = sh([dvc, "repro"], capture_output=True)
            times.append(time.perf_counter() - t)
        out["noop_repro"] = {"command": "dvc repro (every stage up to date)", "seconds": times, "rc": rc}
    common.write_result("dvc", out)


# ------------------------------------------------------------------------------------------------- RESULTS.md
def load(name: str) -> dict | None:
    p = common.RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def nominal(d: dict) -> float:
    """Nominal GFLOP of a result's step (recomputed: one definition, benchmarks/common.py::step_flops)."""
    P, C = common.SHAPES[d["shape"]]
    return common.step_flops(P, C, d["n_pairs"], d["finetune"], d["reference"] == "per-step") / 1e9


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def report() -> str:
    gemm = load("gemm")
    lines = [
        "# Benchmarks: dpoflow vs TRL vs mlx-lm-lora (SmolLM2-135M-Instruct fp32, CPU)",
        "",
        "Generated by `python benchmarks/run.py` from `benchmarks/results/*.json` (do not edit the tables by hand;",
        "the notes at the end are kept in `benchmarks/NOTES_RESULTS.md`).",
        "",
    ]
    m = (gemm or {}).get("machine") or {}
    lines += [
        "## Machine",
        "",
        f"- CPU: {m.get('cpu_model')} ({m.get('cpus')} vCPUs, AVX-512: {m.get('avx512f')}), "
        f"{m.get('mem_gib')} GiB RAM; {m.get('platform')}; Python {m.get('python')}",
        f"- BLAS: MLX with Debian OpenBLAS (pthread), OPENBLAS_CORETYPE={m.get('OPENBLAS_CORETYPE')}; "
        "torch 2.13 CPU (its own MKL/oneDNN)",
        f"- Same-run fp32 GEMM (MLX/OpenBLAS, SmolLM2 shapes, best of runs): "
        f"**{fmt((gemm or {}).get('mlx_openblas_gflops'), 0)} GFLOP/s** at 2 threads (`results/gemm.json`, "
        f"wall time: under load it measures the share of the machine this run got), "
        f"**{fmt((load('gemm_t1') or {}).get('mlx_openblas_gflops'), 0)} GFLOP/s** at 1 thread "
        "(`results/gemm_t1.json`, CPU time). An idle machine gives ~250 at 2 threads (shared/NOTES.md).",
        "",
    ]
    for name in ("generation", "generation_t1"):
        gen = load(name)
        if not gen:
            continue
        w, t = gen["workload"], gen.get("threads", 2)
        lines += [
            f"## Generation (Stage 2 workload), {t} thread{'s' if t > 1 else ''} (`results/{name}.json`)",
            "",
            f"{w['prompts']} real Stage 2 prompts x {w['samples']} samples, T={w['temperature']}, "
            f"max {w['max_tokens']} new tokens. tok/s = generated tokens / wall seconds; tok/CPU-s = generated "
            "tokens / process CPU seconds (not inflated by other processes).",
            "",
            "| path | batch | generated tok | wall s | tok/s | CPU s | tok/CPU-s | prompt tok run | prefill s | "
            "GEMM GF/s after |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in gen["runs"]:
            lines.append(
                f"| {r['name']} | {r['batch_size']} | {r['generated_tokens']} | {fmt(r['seconds'], 1)} | "
                f"**{fmt(r['tokens_per_sec'], 1)}** | {fmt(r.get('cpu_seconds'), 1)} | "
                f"**{fmt(r.get('tokens_per_cpu_sec'), 1)}** | {r['prompt_tokens']} | "
                f"{fmt(r['prefill_seconds'], 1)} | {fmt(r.get('gemm_gflops'), 0)} |"
            )
        lines += [
            "",
            f"Decode step breakdown (best of 5, ms{' of CPU time' if t == 1 else ''}): mlx-lm's step "
            "normalizes (logsumexp) before sampling; dpoflow's loop skips it unless top_p < 1.",
            "",
            "| batch | context | body | LM head | normalize (logsumexp) | sampler | body+head+sampler | tok/s bound |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in gen["decode_breakdown"]:
            s_ = d["body_ms"] + d["lm_head_ms"] + d["sampler_ms"]
            lines.append(
                f"| {d['batch']} | {d['context']} | {fmt(d['body_ms'], 1)} | {fmt(d['lm_head_ms'], 1)} | "
                f"{fmt(d['normalize_ms'], 1)} | {fmt(d['sampler_ms'], 1)} | {fmt(s_, 1)} | "
                f"{fmt(d['batch'] / s_ * 1000, 0)} |"
            )
        lines.append("")
    rows, cpu_rows = [], []
    for f in sorted(common.RESULTS.glob("*.json")):
        d = json.loads(f.read_text())
        if d.get("framework"):
            (cpu_rows if d.get("threads") == 1 else rows).append(d)
    order = {"dpoflow": 0, "trl": 1, "mlx-lm-lora": 2}
    if cpu_rows:
        g1 = (load("gemm_t1") or {}).get("mlx_openblas_gflops")
        lines += [
            "## DPO step, 1 thread, CPU seconds per step (the comparison that survives a shared machine)",
            "",
            "Each framework on 1 thread (OPENBLAS/OMP/MKL_NUM_THREADS=1, torch.set_num_threads(1)); the figure is "
            "the process CPU time of a step (best of the timed steps), which other processes on the machine do "
            "not inflate the way they inflate wall time. tok/CPU-s = 2B(P+C) / CPU seconds. MFU = nominal FLOPs / "
            f"CPU seconds / 1-thread OpenBLAS GEMM rate ({fmt(g1, 0)} GFLOP/s, `results/gemm_t1.json`): the same "
            "nominal work for every framework, so a shared prompt (less work) can exceed 100%; 'utilization of "
            "work done' counts the body tokens really run (B P + 2B(C-1) for dpoflow's shared prompt; "
            "mlx-lm-lora also runs the LM head at every position, not counted).",
            "",
            "| framework | fine-tune | shape | reference | path | CPU s/step (median) | pairs/CPU-s | tok/CPU-s | "
            "peak RSS GB (MLX peak) | MFU nominal | utilization of work done |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in sorted(cpu_rows, key=lambda d: (d["shape"], d["finetune"], order[d["framework"]], d.get("path", ""))):
            c = d["cpu_seconds"]
            tokens = d["tokens_per_sec"] * d["step_seconds"]
            d["nominal_gflop_per_step"] = nominal(d)
            P, C = common.SHAPES[d["shape"]]
            work = (
                common.work_flops(
                    P, C, d["n_pairs"], d["finetune"], d["reference"] == "per-step", d.get("path") == "shared"
                )
                / 1e9
            )
            mlx_peak = f" ({fmt(d['peak_memory_gb'])})" if d.get("peak_memory_gb") else ""
            lines.append(
                f"| {d['framework']} | {d['finetune']} | {d['shape']} | {d['reference']} | {d.get('path', '-')} | "
                f"{fmt(c)} ({fmt(d.get('cpu_seconds_median'))}) | {fmt(d['n_pairs'] / c)} | **{fmt(tokens / c, 0)}** | "
                f"{fmt(d.get('peak_rss_gb'))}{mlx_peak} | "
                f"{fmt(g1 and 100 * d['nominal_gflop_per_step'] / c / g1, 0)}% | "
                f"{fmt(g1 and 100 * work / c / g1, 0)}% |"
            )
        best1 = {}
        for d in cpu_rows:
            best1.setdefault((d["framework"], d["shape"]), []).append(
                d["tokens_per_sec"] * d["step_seconds"] / d["cpu_seconds"]
            )
        lines += ["", "Ratios, 1 thread (best tok/CPU-s of each framework, any configuration):", ""]
        for shape in common.SHAPES:
            ours = max(best1.get(("dpoflow", shape), [0]))
            for peer in ("trl", "mlx-lm-lora"):
                theirs = max(best1.get((peer, shape), [0]))
                if ours and theirs:
                    lines.append(f"- {shape}: dpoflow / {peer} = **{ours / theirs:.2f}x** ({ours:.0f} vs {theirs:.0f})")
        lines.append("")
    if rows:
        lines += [
            "## DPO step, 2 threads, wall time (8 pairs; best of the timed steps; see the load note below)",
            "",
            "tokens/s counts prompt+chosen and prompt+rejected tokens (2B(P+C) per step) for every framework. "
            "MFU = nominal model FLOPs (benchmarks/common.py: same count for every framework) / step time / "
            "GEMM rate measured in the same run (torch's own matmul for TRL). Under the load described below "
            "these are indicative only.",
            "",
            "| framework | fine-tune | shape | reference | path | s/step (median) | pairs/s | tok/s | peak mem GB | "
            "MFU | GEMM GF/s in run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in sorted(rows, key=lambda d: (d["shape"], d["finetune"], order[d["framework"]], d.get("path", ""))):
            mem = d.get("peak_memory_gb") or d.get("peak_rss_gb")
            mem_s = f"{fmt(mem)}" + (" (RSS)" if d["framework"] == "trl" else "")
            in_run = (
                d.get("gemm_gflops_torch")
                if d["framework"] == "trl"
                else max(d.get("gemm_gflops_before", 0), d.get("gemm_gflops_after", 0))
            )
            mfu = nominal(d) / d["step_seconds"] / in_run if in_run else None  # vs the GEMM rate of the same run
            lines.append(
                f"| {d['framework']} | {d['finetune']} | {d['shape']} | {d['reference']} | {d.get('path', '-')} | "
                f"{fmt(d['step_seconds'])} ({fmt(d.get('step_seconds_median'))}) | {fmt(d['pairs_per_sec'])} | "
                f"**{fmt(d['tokens_per_sec'], 0)}** | {mem_s} | {fmt(mfu and 100 * mfu, 0)}% | "
                f"{fmt(in_run, 0)}{' (torch)' if d['framework'] == 'trl' else ''} |"
            )
        lines.append("")
        best = {}
        for d in rows:
            best.setdefault((d["framework"], d["shape"]), []).append(d["tokens_per_sec"])
        lines += ["Ratios (best tokens/s of each framework, any configuration):", ""]
        for shape in common.SHAPES:
            ours = max(best.get(("dpoflow", shape), [0]))
            for peer in ("trl", "mlx-lm-lora"):
                theirs = max(best.get((peer, shape), [0]))
                if ours and theirs:
                    lines.append(
                        f"- {shape}: dpoflow / {peer} = **{ours / theirs:.2f}x** ({ours:.0f} vs {theirs:.0f} tok/s)"
                    )
        lines.append("")
    dvc = load("dvc")
    if dvc:
        lines += [
            "## DVC",
            "",
            f"- no-op repro: {dvc['noop_repro']}",
            f"- dvc status: {dvc.get('status', 'not run')}",
            "",
        ]
        if dvc["stage_perf"]:
            lines += ["Per-stage perf of the embedded-default pipeline (`reports/perf/*.json`):", ""]
            for stage, perf in dvc["stage_perf"].items():
                lines.append(
                    f"- {stage}: "
                    + ", ".join(
                        f"{k}={fmt(v) if isinstance(v, float) else v}"
                        for k, v in perf.items()
                        if not isinstance(v, (dict, list))
                    )
                )
            lines.append("")
    notes = ROOT / "NOTES_RESULTS.md"
    if notes.exists():
        lines += [notes.read_text()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    ap.add_argument("--report", action="store_true", help="only rewrite RESULTS.md")
    ap.add_argument("--threads", type=int, default=2, help="threads per framework; 1 = the CPU-time protocol")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if not args.report:
        for name in args.only.split(","):
            if name not in SECTIONS:
                raise SystemExit(f"unknown section {name!r}; choose from {SECTIONS}")
            run_section(name)
    (ROOT / "RESULTS.md").write_text(report())
    print(ROOT / "RESULTS.md")


if __name__ == "__main__":
    main()
