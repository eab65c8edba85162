"""Stage 6's markdown report: the rounds, their decisions, the convergence analysis (deterministic: no timings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpoflow.eval.rounds import PRIMARY, WATCHED, finite


def render_iterate_report(metrics: Mapping[str, Any]) -> str:
    """Stage 6's report: the rounds table, the decisions and the convergence analysis."""
    fmt = lambda v: "–" if not finite(v) else f"{v:.4g}"  # noqa: E731
    lines = [
        "# Iterative training (Stage 6)",
        "",
        f"Decision: **{metrics['decision']}**; selected round **{metrics['selected_round']}** "
        f"(reference of that round: {metrics.get('selected_reference')}). KL(selected || SFT) "
        f"{fmt(metrics.get('selected_kl'))}, held-out gap {fmt(metrics.get('selected_heldout_gap'))}.",
        "",
        "| round | reference | pairs | pair gap | KL vs SFT | held-out gap | task accuracy | benchmark mean | "
        "passed | decision |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in metrics["rounds"]:
        pairs = r.get("pairs") or {}
        lines.append(
            f"| {r['round']} | {r.get('reference')} | {pairs.get('n_pairs', '–') if pairs else '–'} | "
            f"{fmt(pairs.get('avg_gap')) if pairs else '–'} | {fmt(r.get('kl'))} | "
            f"{fmt(r.get('heldout_gap'))} | "
            f"{fmt(r.get('task_accuracy'))} | {fmt(r.get('benchmark_mean'))} | "
            f"{'yes' if r.get('passed') else 'no'} | {r.get('decision')} |"
        )
    lines += ["", "## Decisions", ""]
    for r in metrics["rounds"]:
        lines.append(f"- round {r['round']}: **{r.get('decision')}** — {'; '.join(r.get('reasons') or [])}")
    targeting = metrics.get("targeting")
    if targeting:
        lines += [
            "",
            "## Weakness targeting",
            "",
            "Round k draws its prompts with weights toward the categories round k-1's policy scored lowest on "
            f"(held-out items, weight = 1 - mean + {targeting['floor']:g}, normalized).",
            "",
        ]
        for k, weights in sorted(targeting["rounds"].items(), key=lambda kv: int(kv[0])):
            if not weights:
                lines.append(f"- round {k}: the fixed slice (no breakdown of round {int(k) - 1})")
                continue
            top = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
            shown = ", ".join(f"{name} {w:.2f}" for name, w in top)
            summary = (targeting.get("summaries") or {}).get(k)
            lines.append(f"- round {k}: weights {shown}" + (f"; {summary['text']}" if summary else ""))
    lines += [
        "",
        "## Convergence analysis",
        "",
        metrics["analysis"],
        "",
        "Rules: a round that fails a check or lets any of "
        + ", ".join(f"`{w}`" for w in WATCHED)
        + " drop by more than `iterate.regression_tolerance` is rolled back and the iteration stops; a change of "
        f"`{PRIMARY}` below `iterate.convergence_epsilon` stops it as converged. See docs/iterative-training.md.",
        "",
    ]
    return "\n".join(lines)
