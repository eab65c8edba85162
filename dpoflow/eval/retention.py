"""Capability retention: the final model's benchmark scores as a percentage of the baseline (SFT) model's.

Two forms:

* `retention(final, baseline)`: from flat scores (one number per benchmark). Retention of a benchmark = final score
  / baseline (SFT) score * 100. Baseline 0: counted as 100 when the final score is 0 too (nothing to lose, nothing
  lost); skipped with a note when the final score is above 0 (a gain from nothing: no ratio). A benchmark of the
  baseline the final model was not measured on counts 0 (fail-safe). Overall = the mean of the counted benchmarks'
  retention (100 when none could be counted but some were gains). No interval: for callers with flat scores only.
* `paired_benchmark_retention(baseline, final, min_retention)`: from per-document scores of the SAME documents
  (benchmarks.run_benchmarks_per_document with the same tasks and limits for both models). statistics.
  paired_retention's paired bootstrap over documents gives each task's interval and the pooled one (mean of the
  informative tasks' ratios); tasks at the floor or ceiling for both models, or with no document scored
  differently, are reported as uninformative instead of counting as 100 %; the gate is non-inferiority,
  `retention_ci_low >= min_retention` (`retention_gate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dpoflow.eval.significance import (
    CONFIDENCE,
    POWER,
    detectable_regression_line,
    pooled_min_detectable_regression,
)
from dpoflow.eval.statistics import SAMPLES, non_inferiority, paired_retention
from dpoflow.runtime.io import json_safe


def retention(final: Mapping[str, float | None], baseline: Mapping[str, float | None]) -> dict:
    """Retention (%) per benchmark and overall; see the module docstring for the rules.

    Returns {"retention": overall or None, "retention_per_benchmark": {name: % or None}, "counted": [names],
    "notes": [str], "lowest_benchmark": name or None}."""
    per: dict[str, float | None] = {}
    counted, notes, gains = [], [], 0
    for name in sorted(baseline):
        base = baseline[name]
        value = final.get(name)
        if base is None or not math.isfinite(base):
            per[name] = None
            notes.append(f"{name}: no baseline score: not counted")
            continue
        if value is None or not math.isfinite(value):
            per[name] = 0.0
            counted.append(name)
            notes.append(f"{name}: not measured on the final model: counted as 0 % (fail-safe)")
            continue
        if base == 0:
            if value == 0:
                per[name] = 100.0
                counted.append(name)
                notes.append(f"{name}: baseline and final are both 0: counted as 100 % (nothing lost)")
            else:
                per[name] = None
                gains += 1
                notes.append(f"{name}: baseline 0, final {value:.4g}: a gain from nothing, no ratio: not counted")
            continue
        per[name] = 100.0 * value / base
        counted.append(name)
    for name in sorted(set(final) - set(baseline)):
        notes.append(f"{name}: not in the baseline (Stage 1): not counted")
    if counted:
        overall: float | None = float(np.mean([per[n] for n in counted]))
    elif gains:
        overall = 100.0
        notes.append("no benchmark had a non-zero baseline: overall counted as 100 % (only gains)")
    else:
        overall = None
        notes.append("no benchmark to compare: overall retention undefined (the gate fails)")
    lowest = min(counted, key=lambda n: per[n]) if counted else None
    return {
        "retention": overall,
        "retention_per_benchmark": per,
        "counted": counted,
        "notes": notes,
        "lowest_benchmark": lowest,
    }


def round_retention(record: Mapping[str, Any], baseline: Mapping[str, float]) -> float | None:
    bench = record.get("benchmarks")
    return retention(bench, baseline)["retention"] if bench else None


# ---------------------------------------------------------------------------------------------------------
# Paired retention from per-document scores


def _docs(task: str, which: str, entry: Any) -> tuple[list[int] | None, list[float]]:
    """(doc ids or None, scores) of one task: a run_benchmarks_per_document entry ({"docs": [...]}), a list of
    {"doc_id", "score"}, or a plain list of scores (in a document order both models share)."""
    if isinstance(entry, Mapping):
        if entry.get("docs") is None:
            raise ValueError(f"task {task!r}: no per-document {which} scores (run_benchmarks_per_document gives them)")
        entry = entry["docs"]
    rows = list(entry)
    if rows and isinstance(rows[0], Mapping):
        ids = [int(r["doc_id"]) for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {task!r}: a {which} document id occurs twice")
        order = np.argsort(ids, kind="stable")
        return [ids[i] for i in order], [float(rows[i]["score"]) for i in order]
    return None, [float(v) for v in rows]


def _aligned(baseline: Mapping[str, Any], final: Mapping[str, Any]) -> tuple[dict, dict]:
    """{task: scores} of both models in the same document order; ValueError naming the task when the tasks or the
    documents differ (the two runs must use the same tasks and limits)."""
    missing = sorted(set(baseline) ^ set(final))
    if missing:
        raise ValueError(
            f"task(s) {missing} scored for one model only: score both with the same tasks and limits "
            f"(baseline: {sorted(baseline)}, final: {sorted(final)})"
        )
    base, fin = {}, {}
    for task in sorted(baseline):
        b_ids, b = _docs(task, "baseline", baseline[task])
        f_ids, f = _docs(task, "final", final[task])
        if b_ids is not None and f_ids is not None and b_ids != f_ids:
            only_b, only_f = len(set(b_ids) - set(f_ids)), len(set(f_ids) - set(b_ids))
            raise ValueError(
                f"task {task!r}: the models were scored on different documents ({len(b_ids)} baseline, "
                f"{len(f_ids)} final; {only_b} only in the baseline, {only_f} only in the final): use the same limit"
            )
        base[task], fin[task] = b, f
    return base, fin


def _line(row: Mapping[str, Any], confidence: float, power: float) -> str:
    n, p0 = row["n"], row["baseline_mean"]
    if not n:
        return "no documents: nothing measured"
    if not p0:
        return f"with {n} documents and a baseline score of 0 no regression can be measured (nothing to lose)"
    disc = row["discordant_fraction"] if row["discordant"] else None  # none observed: the conservative variance
    return detectable_regression_line(p0, n, confidence, power, paired_discordance=disc)


def paired_benchmark_retention(
    baseline: Mapping[str, Any],
    final: Mapping[str, Any],
    min_retention: float | None,
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = 0,
    *,
    power: float = POWER,
    name: str = "retention",
) -> dict:
    """Paired retention of the final model against the baseline, shaped for a metrics file (JSON-safe: an unbounded
    upper end, a task resting on a few baseline-correct documents, is written as None).

    `baseline` / `final`: {task: per-document scores} of the same documents -- run_benchmarks_per_document's result
    (aligned by doc_id), lists of {"doc_id", "score"}, or plain lists in a shared order. `min_retention` is
    evaluate.min_retention (%), `confidence` evaluate.confidence. Keys (name = "retention"):

        retention_pooled, retention_ci_low, retention_ci_high   mean of the informative tasks' retention (%) and its
                                                                 stratified paired-bootstrap interval (None if none)
        retention_confidence, retention_n                       confidence; documents in the informative tasks
        retention_tasks      {task: {retention, ci_low, ci_high, n, informative (0/1), baseline, final,
                                     discordant, reason, min_detectable_regression, detectable}}
        retention_uninformative   [tasks]: both ~0, both ~1, no document scored differently, or baseline 0
        retention_detectable      {task: "with n documents the smallest regression this gate detects at 95% is
                                          X% (...)"} (the observed paired discordance; unpaired if none observed)
        retention_min_detectable  the pooled gate's smallest detectable regression (%), at `power`
        retention_gate            {passed (0/1), value, threshold, rule, message}: non-inferiority,
                                  retention_ci_low >= min_retention (retention_gate)
        retention_note            how the pooled value was formed
    """
    base, fin = _aligned(baseline, final)
    res = paired_retention(base, fin, confidence, samples, seed, power=power)
    tasks, detectable, pooled_terms = {}, {}, []
    for task, row in res["tasks"].items():
        line = _line(row, confidence, power)
        detectable[task] = line
        tasks[task] = {
            "retention": row["retention"],
            "ci_low": row["ci_low"],
            "ci_high": row["ci_high"],
            "n": row["n"],
            "informative": int(row["informative"]),
            "baseline": row["baseline_mean"],
            "final": row["final_mean"],
            "discordant": row["discordant"],
            "reason": row["reason"],
            "min_detectable_regression": row["min_detectable_regression"],
            "detectable": line,
        }
        if row["informative"]:
            pooled_terms.append((row["baseline_mean"], row["n"], row["discordant_fraction"]))
    out = {
        f"{name}_pooled": res["pooled_retention"],
        f"{name}_ci_low": res["pooled_ci_low"],
        f"{name}_ci_high": res["pooled_ci_high"],
        f"{name}_confidence": confidence,
        f"{name}_n": int(sum(t[1] for t in pooled_terms)),
        f"{name}_tasks": tasks,
        f"{name}_uninformative": [t for t in tasks if not tasks[t]["informative"]],
        f"{name}_detectable": detectable,
        f"{name}_min_detectable": (
            pooled_min_detectable_regression(pooled_terms, confidence, power) if pooled_terms else None
        ),
        f"{name}_note": res["pooled_note"],
    }
    if min_retention is not None:  # None: a measurement only (Stage 7's gate applies the threshold)
        out[f"{name}_gate"] = retention_gate(out[f"{name}_ci_low"], min_retention, name)
    return json_safe(out)


def retention_gate(ci_low: float | None, min_retention: float, name: str = "retention") -> dict:
    """Non-inferiority: passed (1) iff the pooled lower bound `ci_low` >= `min_retention` (%); a missing bound (no
    informative task) fails. Returns {passed, value, threshold, rule, message}."""
    passed = non_inferiority(ci_low, min_retention)
    shown = "undefined (no informative task)" if ci_low is None else f"{float(ci_low):.1f} %"
    return {
        "passed": int(passed),
        "value": ci_low,
        "threshold": float(min_retention),
        "rule": f"{name}_ci_low >= {float(min_retention):g}",
        "message": f"{name} lower bound {shown} {'>=' if passed else '<'} {float(min_retention):g} %: "
        + ("non-inferior" if passed else "inferiority not ruled out"),
    }


def detectable_lines(
    baseline_scores: Mapping[str, float], n: Mapping[str, int] | int, confidence: float = CONFIDENCE
) -> dict[str, str]:
    """{task: detectable_regression_line(...)} before running anything: from the baseline's flat scores and the
    planned documents per task (the conservative unpaired variance, since no pairing has been observed yet)."""
    out = {}
    for task, p0 in baseline_scores.items():
        k = n[task] if isinstance(n, Mapping) else n
        out[task] = (
            detectable_regression_line(p0, k, confidence)
            if p0 and k
            else f"with {k} documents and a baseline score of {p0} no regression can be measured"
        )
    return out
