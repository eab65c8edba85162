"""Qualitative analysis for Stage 7's report: a seeded sample of the final model's wins, losses and ties against the
SFT model, plus its largest regressions, shown side by side (prompt, SFT response, final response, judge scores).

    rows = qualitative_rows(judgments, per_outcome=3, regressions=3, seed=p.seed)   # pairwise_judgments rows
    md = render_qualitative_markdown(rows, seed=p.seed)       # a "## Qualitative examples" section for report.md
    html = render_qualitative_html(rows, seed=p.seed)         # the same, escaped, for report.html
    export_human_sheet(judgments, ..., include=sheet_indices(rows))   # the sheet's first rows = these rows

Selection (deterministic for the same judgments and seed):
1. Largest regressions: the `regressions` judgments with the largest drop = score_baseline - score_final > 0,
   largest first (ties: lower index first). With a 0/1 verifier every loss drops by 1, so these are the first
   losses by index.
2. Then, from the judgments not already shown, per outcome (loss 0, win 1, tie 0.5): a sample of `per_outcome`
   drawn with random.Random seeded by (seed, outcome), shown in index order.
Rows in that order: regressions, losses, wins, ties. The prompt shown is the user turn(s) (eval.human.shown_prompt,
what the human raters read).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from dpoflow.eval.human import shown_prompt
from dpoflow.reporting.charts import esc, fmt

KINDS = {"regression": "Largest regressions", "loss": "Losses", "win": "Wins", "tie": "Ties"}
OUTCOMES = (("loss", 0.0), ("win", 1.0), ("tie", 0.5))


def _row(kind: str, j: Mapping[str, Any]) -> dict:
    return {
        "kind": kind,
        "index": int(j["index"]),
        "id": j.get("id"),
        "prompt": shown_prompt(j["prompt"]),
        "sft": j["baseline"],
        "final": j["final"],
        "score_sft": float(j["score_baseline"]),
        "score_final": float(j["score_final"]),
        "outcome": float(j["outcome"]),
        "drop": float(j["score_baseline"]) - float(j["score_final"]),
    }


def qualitative_rows(
    judgments: Sequence[Mapping[str, Any]], per_outcome: int = 3, regressions: int = 3, seed: int = 0
) -> list[dict]:
    """The rows the report shows (module docstring): {"kind" (regression | loss | win | tie), "index", "id",
    "prompt" (user turns), "sft", "final" (responses), "score_sft", "score_final", "outcome", "drop"}."""
    if per_outcome < 0 or regressions < 0:
        raise ValueError("per_outcome and regressions must be >= 0")
    dropped = [j for j in judgments if float(j["score_baseline"]) - float(j["score_final"]) > 0]
    dropped.sort(key=lambda j: (-(float(j["score_baseline"]) - float(j["score_final"])), int(j["index"])))
    rows = [_row("regression", j) for j in dropped[:regressions]]
    shown = {r["index"] for r in rows}
    for kind, outcome in OUTCOMES:
        pool = [j for j in judgments if float(j["outcome"]) == outcome and int(j["index"]) not in shown]
        picked = random.Random(f"dpoflow-qualitative:{int(seed)}:{kind}").sample(pool, min(per_outcome, len(pool)))
        rows += [_row(kind, j) for j in sorted(picked, key=lambda j: int(j["index"]))]
    return rows


def sheet_indices(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The judgment indices of `rows`, in report order: export_human_sheet(include=...) puts them first."""
    return [int(r["index"]) for r in rows]


def _md_cell(text: Any) -> str:
    """Text in a markdown table cell: HTML-escaped, pipes escaped, line breaks as <br>."""
    return esc(text).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>") or " "


def _caption(r: Mapping[str, Any]) -> str:
    drop = f", drop {fmt(r['drop'])}" if r["kind"] == "regression" else ""
    return f"judgment {r['index']} (id {r['id']}): SFT score {fmt(r['score_sft'])}, final {fmt(r['score_final'])}{drop}"


def render_qualitative_markdown(rows: Sequence[Mapping[str, Any]], seed: int = 0, heading: str = "##") -> str:
    """A markdown section: per kind, one side-by-side table per row (prompt | SFT response | final response)."""
    lines = [
        f"{heading} Qualitative examples",
        "",
        f"Judged prompts of the win rate, side by side (seed {seed}): the largest regressions (SFT score minus final "
        "score), then a seeded sample of losses, wins and ties. The human-evaluation sheet starts with the same rows.",
    ]
    if not rows:
        return "\n".join(lines + ["", "No judgments to show.", ""])
    for kind, title in KINDS.items():
        some = [r for r in rows if r["kind"] == kind]
        if not some:
            continue
        lines += ["", f"{heading}# {title}"]
        for r in some:
            lines += [
                "",
                f"*{esc(_caption(r))}*",
                "",
                "| prompt | SFT response | final response |",
                "|---|---|---|",
                f"| {_md_cell(r['prompt'])} | {_md_cell(r['sft'])} | {_md_cell(r['final'])} |",
            ]
    return "\n".join(lines + [""])


def render_qualitative_html(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> str:
    """The same section as HTML (every text escaped), one table per kind, prompt | SFT | final side by side."""
    cell = 'style="white-space:pre-wrap;vertical-align:top"'
    parts = [
        '<section id="qualitative"><h2>Qualitative examples</h2>',
        f"<p>Judged prompts of the win rate, side by side (seed {esc(seed)}): the largest regressions, then a seeded "
        "sample of losses, wins and ties. The human-evaluation sheet starts with the same rows.</p>",
    ]
    if not rows:
        parts.append("<p>No judgments to show.</p>")
    for kind, title in KINDS.items():
        some = [r for r in rows if r["kind"] == kind]
        if not some:
            continue
        parts.append(
            f'<h3>{esc(title)}</h3><table class="qualitative" id="qualitative-{esc(kind)}"><tr><th>judgment</th>'
            "<th>prompt</th><th>SFT response</th><th>final response</th><th>scores (SFT / final)</th></tr>"
        )
        for r in some:
            parts.append(
                f"<tr><td>{esc(r['index'])}<br><code>{esc(r['id'])}</code></td><td {cell}>{esc(r['prompt'])}</td>"
                f"<td {cell}>{esc(r['sft'])}</td><td {cell}>{esc(r['final'])}</td>"
                f"<td>{esc(fmt(r['score_sft']))} / {esc(fmt(r['score_final']))}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</section>")
    return "\n".join(parts)
