"""What the report says about the evidence: the gate checks with their points and bounds, the paired retention
intervals and what they show, the results by category and the Stage 6 targeting (Stage 7's report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpoflow.reporting.charts import fmt


def category_rows(ev: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(category, n, SFT, final, change, moved) per category of the win-rate prompts, judged as the win rate is."""
    cats = ev.get("categories") or {}
    return [
        (name, str(d["n_after"]), fmt(d["before"]), fmt(d["after"]), fmt(d["delta"]), d["moved"] or "–")
        for name, d in sorted((cats.get("deltas") or {}).items())
    ]


def targeting_lines(it: Mapping[str, Any] | None) -> list[str]:
    """One line per targeted Stage 6 round: which categories it aimed at and whether they moved."""
    summaries = ((it or {}).get("targeting") or {}).get("summaries") or {}
    return [f"round {k}: {s['text']}" for k, s in sorted(summaries.items(), key=lambda kv: int(kv[0]))]


def pct(confidence: Any) -> str:
    return "95%" if confidence is None else f"{float(confidence):.0%}"


def retention_bars(ev: Mapping[str, Any]) -> list[tuple[str, float | None, tuple[float, float] | None]]:
    """Per benchmark and overall: the paired retention and its interval (per-document scores), else the flat ratio."""
    tasks = ev.get("retention_tasks") or {}
    if not tasks:
        per = ev.get("retention_per_benchmark") or {}
        return [(name, value, None) for name, value in sorted(per.items())] + [("overall", ev.get("retention"), None)]

    def interval(low: Any, high: Any) -> tuple[float, float] | None:
        return None if low is None or high is None else (float(low), float(high))

    bars = [
        (name + ("" if t["informative"] else " (uninformative)"), t["retention"], interval(t["ci_low"], t["ci_high"]))
        for name, t in sorted(tasks.items())
    ]
    return bars + [("pooled", ev.get("retention"), interval(ev.get("retention_ci_low"), ev.get("retention_ci_high")))]


def retention_shown(ev: Mapping[str, Any], min_retention: float) -> str:
    """In words: what the retention evidence shows and does not (which benchmarks counted, which were uninformative)."""
    tasks = ev.get("retention_tasks") or {}
    if not tasks:
        return "Retention from flat scores only: no interval."
    informative = [t for t, row in tasks.items() if row["informative"]]
    low, conf = ev.get("retention_ci_low"), ev.get("retention_confidence")
    one_sided = "95%" if conf is None else f"{(1 + float(conf)) / 2:.1%}".replace(".0%", "%")
    if low is None:
        head = "Retention not shown: no benchmark is informative"
    else:
        verdict = "shown" if low >= min_retention else "not shown"
        head = (
            f"Retention >= {min_retention:g}% {verdict} at {one_sided} confidence (one-sided lower bound "
            f"{low:.1f}%) on {len(informative)} of {len(tasks)} benchmarks"
        )
    others = [f"{t} uninformative ({row['reason']})" for t, row in sorted(tasks.items()) if not row["informative"]]
    return "; ".join([head, *others]) + "."


def check_rows(deploy: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    def shown(c: Mapping[str, Any]) -> str:
        side = "upper" if c["op"] == "<=" else "lower"
        if c.get("on_bound"):
            return f"{fmt(c['value'])} ({side} bound; point {fmt(c.get('point'))})"
        return fmt(c["value"]) + ("" if c.get("bound") is None else f" ({side} bound {fmt(c['bound'])})")

    return [
        (c["label"], shown(c), f"{c['op']} {fmt(c['threshold'])}", c["param"], "pass" if c["passed"] else "FAIL")
        for c in deploy["checks"]
    ]
