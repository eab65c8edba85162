"""Capability retention: the final model's benchmark scores as a percentage of the baseline (SFT) model's.

* Retention of a benchmark = final score / baseline (SFT) score * 100. Baseline 0: counted as 100 when the final
  score is 0 too (nothing to lose, nothing lost); skipped with a note when the final score is above 0 (a gain from
  nothing: no ratio). A benchmark of the baseline the final model was not measured on counts 0 (fail-safe).
  Overall = the mean of the counted benchmarks' retention (100 when none could be counted but some were gains).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


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
