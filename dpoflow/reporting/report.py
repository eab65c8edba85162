"""Stage 7's report: report.md and a self-contained report.html (inline SVG plots, no external files, no plotting
library), for a person who decides whether to ship the model.

Plots: SFT and DPO training curves and DPO reward margins, KL and held-out gap per round (Stage 6's rounds), the
win rate with its 95% interval and retention per benchmark. Everything is deterministic for the same inputs (no
timestamps, fixed formatting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpoflow.reporting.charts import Series, bar_chart, esc, fmt, line_chart
from dpoflow.reporting.evidence import (
    category_rows,
    check_rows,
    pct,
    retention_bars,
    retention_shown,
    targeting_lines,
)
from dpoflow.reporting.qualitative import render_qualitative_html, render_qualitative_markdown
from dpoflow.runtime import io
from dpoflow.runtime.params import Params

# ---------------------------------------------------------------------------------------------------------
# The report


# The training curves the report draws: (stage, metric key) per series, grouped by chart.
CURVES = {
    "sft": {"train loss": ("sft", "train/loss"), "validation loss": ("sft", "eval/val_loss")},
    "dpo": {"train loss": ("dpo", "train/loss")},
    "margins": {
        "reward margin": ("dpo", "train/rewards/margins"),
        "chosen reward": ("dpo", "train/rewards/chosen"),
        "rejected reward": ("dpo", "train/rewards/rejected"),
    },
    "dpo_eval": {"KL (DPO checks)": ("dpo", "eval/kl"), "held-out gap (DPO checks)": ("dpo", "eval/heldout_gap")},
}


@dataclass
class ReportInputs:
    """Everything the report shows. `curves` holds, per CURVES chart and series, its (step, value) rows; `files`
    names the artifacts the text points to (final_model, deploy, sheet, key)."""

    evaluate: Mapping[str, Any]
    deploy: Mapping[str, Any]
    iterate: Mapping[str, Any] | None
    curves: Mapping[str, Mapping[str, Series]]
    params: Params
    files: Mapping[str, str] = field(default_factory=dict)
    provenance: Sequence[str] = ()  # which data and which judge each number comes from, one line each
    qualitative: Sequence[Mapping[str, Any]] = ()  # side-by-side rows (reporting.qualitative.qualitative_rows)


def input_lines(inputs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One provenance line per file of data.source files (prepare_data's inputs.json). Its `n_rows` counts the rows
    the reader accepted, before the screening that quarantined some of them; `n_quarantined` counts both, so the
    rows used are the rows read less the quarantined ones."""
    lines = []
    for key, info in sorted(inputs.items()):
        used = info["n_input"] - info["n_quarantined"]
        lines.append(
            f"{key} = {info['origin']}: {info['n_input']} rows read: {used} used, {info['n_quarantined']} quarantined"
        )
    return lines


def collect(inputs: ReportInputs) -> dict:
    p = inputs.params
    files = {
        "final_model": "the final model",
        "deploy": "the deploy decision",
        "sheet": "the human-eval sheet",
        "key": "its key",
        **dict(inputs.files),
    }
    return {
        "evaluate": dict(inputs.evaluate),
        "deploy": dict(inputs.deploy),
        "iterate": inputs.iterate,
        "curves": {chart: dict(inputs.curves.get(chart) or {}) for chart in CURVES},
        "thresholds": {
            "min_retention": p.evaluate.min_retention,
            "max_kl": p.evaluate.max_kl,
            "min_heldout_gap": p.evaluate.min_heldout_gap,
            "min_win_rate_lower": p.evaluate.min_win_rate_lower,
        },
        "files": files,
        "provenance": list(inputs.provenance),
        "qualitative": list(inputs.qualitative),
        "seed": p.seed,
    }


def plots(data: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{file stem: (title, svg)} in report order."""
    ev, th = data["evaluate"], data["thresholds"]
    rounds = (data.get("iterate") or {}).get("rounds") or []
    out: dict[str, tuple[str, str]] = {}
    c = data["curves"]
    out["sft_training"] = (
        "SFT training curves (Stage 1)",
        line_chart("SFT training (Stage 1)", c["sft"], "step", "loss"),
    )
    out["dpo_training"] = (
        "DPO training loss (Stage 5)",
        line_chart("DPO training loss (Stage 5)", c["dpo"], "step", "loss"),
    )
    out["reward_margins"] = (
        "DPO reward margins (Stage 5)",
        line_chart("DPO implicit rewards (Stage 5)", c["margins"], "step", "beta x log-ratio", hlines=[(0.0, "0")]),
    )
    kl_rounds = [(r["round"], r["kl"]) for r in rounds if r.get("kl") is not None]
    gap_rounds = [(r["round"], r["heldout_gap"]) for r in rounds if r.get("heldout_gap") is not None]
    final_x = ev.get("selected_round")  # the final model is the selected round, not necessarily the last one
    final_x = max([x for x, _ in kl_rounds] or [0]) if final_x is None else final_x
    final = [] if ev.get("kl") is None else [(final_x, ev["kl"])]
    out["kl_rounds"] = (
        "KL(policy || SFT) per round",
        line_chart(
            "KL(policy || SFT) per round (round 0 = Stage 5)",
            {"round": kl_rounds, "final model": final},
            "round",
            "KL per token",
            hlines=[(th["max_kl"], f"evaluate.max_kl {th['max_kl']:g}")],
            markers=True,
            integer_x=True,
        ),
    )
    out["gap_rounds"] = (
        "Held-out preference gap per round",
        line_chart(
            "Held-out preference gap per round",
            {"round": gap_rounds},
            "round",
            "gap",
            hlines=[(th["min_heldout_gap"], f"evaluate.min_heldout_gap {th['min_heldout_gap']:g}")],
            markers=True,
            integer_x=True,
        ),
    )
    wr = ev.get("win_rate")
    ci = (ev.get("win_rate_ci_low"), ev.get("win_rate_ci_high"))
    conf = pct((ev.get("win_rate_detail") or {}).get("confidence"))
    out["win_rate"] = (
        f"Win rate vs SFT with {conf} interval",
        bar_chart(
            f"Win rate vs the SFT model (ties = 1/2), {conf} bootstrap interval",
            [("final vs SFT", wr, ci if None not in ci else None)],
            "win rate",
            hlines=[(th["min_win_rate_lower"], f"lower bound must exceed {th['min_win_rate_lower']:g}")],
            y_range=(0, 1),
        ),
    )
    bars = retention_bars(ev)
    top = max([110.0] + [x * 1.08 for _, v, ci in bars for x in (v, *(ci or ())) if x is not None and x < 1e6])
    out["retention"] = (
        "Capability retention per benchmark",
        bar_chart(
            f"Capability retention per benchmark (% of SFT), paired {pct(ev.get('retention_confidence'))} interval",
            bars,
            "% of SFT",
            hlines=[(100.0, "100 %"), (th["min_retention"], f"evaluate.min_retention {th['min_retention']:g}")],
            y_range=(0, top),
        ),
    )
    return out


def _summary_lines(data: Mapping[str, Any]) -> list[str]:
    ev, d = data["evaluate"], data["deploy"]
    wd = ev.get("win_rate_detail") or {}
    lines = [
        f"Final model: `{data['files']['final_model']}` (round {fmt(ev.get('selected_round'))} of Stage 6, reference "
        f"{ev.get('selected_reference', '–')}).",
        f"Win rate vs SFT: {fmt(ev.get('win_rate'))} ({pct(wd.get('confidence'))} CI "
        f"{fmt(ev.get('win_rate_ci_low'))} – "
        f"{fmt(ev.get('win_rate_ci_high'))}, {wd.get('n', '–')} prompts, judge {wd.get('judge', '–')}, "
        f"{wd.get('decoding', '–')}).",
        f"Capability retention: {fmt(ev.get('retention'))} %; KL(final || SFT) {fmt(ev.get('kl'))}; held-out "
        f"gap {fmt(ev.get('heldout_gap'))}; contaminated training pairs {fmt(ev.get('contaminated_pairs'))}.",
        retention_shown(ev, data["thresholds"]["min_retention"]),
        d["note"],
    ]
    return lines


def render_markdown(data: Mapping[str, Any], plot_files: Mapping[str, tuple[str, str]]) -> str:
    """report.md (plots as plots/*.svg files beside it; report.html holds the same plots inline)."""
    ev, d = data["evaluate"], data["deploy"]
    verdict = "DEPLOY" if d["deploy"] else "DO NOT DEPLOY"
    lines = [f"# dpoflow report: **{verdict}**", ""] + [f"- {x}" for x in _summary_lines(data)]
    if data["provenance"]:
        lines += ["", "## Data and judges", ""] + [f"- {x}" for x in data["provenance"]]
    lines += [
        "",
        f"## Gate checks (`{data['files']['deploy']}`)",
        "",
        "| check | value | rule | param | result |",
        "|---|---:|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | `{p_}` | {r} |" for a, b, c, p_, r in check_rows(d)]
    if d.get("rollback"):
        rb = d["rollback"]
        lines += ["", "## Rollback", "", rb["prescription"], ""]
        if rb["to"].get("round") is not None:
            lines.append(
                f"Last round that met every threshold: **{rb['to']['round']}** (retention "
                f"{fmt(rb['to'].get('retention'))} %, KL {fmt(rb['to'].get('kl'))}, held-out gap "
                f"{fmt(rb['to'].get('heldout_gap'))})."
            )
        else:
            lines.append(rb["to"].get("note", ""))
    if d.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in d["warnings"]]
    lines += ["", "## Capability retention", "", "| benchmark | SFT | final | retention % |", "|---|---:|---:|---:|"]
    base, fin = ev.get("baseline_benchmarks") or {}, ev.get("benchmarks") or {}
    for name in sorted(set(base) | set(fin)):
        lines.append(
            f"| {name} | {fmt(base.get(name))} | {fmt(fin.get(name))} | "
            f"{fmt((ev.get('retention_per_benchmark') or {}).get(name))} |"
        )
    lines.append(f"| **overall** | | | **{fmt(ev.get('retention'))}** |")
    lines += [f"- {n}" for n in ev.get("retention_notes") or []]
    wd = ev.get("win_rate_detail") or {}
    lines += [
        "",
        "## Win rate",
        "",
        f"{wd.get('wins', '–')} wins, {wd.get('ties', '–')} ties, "
        f"{wd.get('losses', '–')} losses over {wd.get('n', '–')} held-out prompts (data/tasks/eval.jsonl); "
        "ties count 1/2; "
        f"{wd.get('bootstrap_samples', '–')} bootstrap resamples (seed {wd.get('seed', '–')}). Alignment "
        "improved means the interval's lower bound is above 0.5.",
        "",
        f"Decoding: {wd.get('decoding', '–')} (`evaluate.win_rate_temperature`; one response per prompt "
        "and model, the same seed for both).",
    ]
    other = ev.get("win_rate_other_decoding")
    if other:
        lines += [
            "",
            f"Reported beside it, not gated: {other.get('decoding')}: win rate {fmt(other.get('win_rate'))} "
            f"({pct(wd.get('confidence'))} CI {fmt(other.get('ci_low'))} – {fmt(other.get('ci_high'))}; "
            f"{other.get('wins')} wins, "
            f"{other.get('ties')} ties, {other.get('losses')} losses). Greedy decoding shows only the prompts "
            "where the model's most likely answer changed.",
        ]
    it = data.get("iterate")
    if it:
        lines += [
            "",
            "## Iterative training",
            "",
            f"Decision **{it.get('decision')}**, selected round **{it.get('selected_round')}**.",
            "",
            "| round | KL vs SFT | held-out gap | task accuracy | benchmark mean | decision |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for r in it.get("rounds") or []:
            lines.append(
                f"| {r['round']} | {fmt(r.get('kl'))} | {fmt(r.get('heldout_gap'))} | "
                f"{fmt(r.get('task_accuracy'))} | {fmt(r.get('benchmark_mean'))} | {r.get('decision')} |"
            )
        lines += ["", it.get("analysis", "")]
    if category_rows(ev) or targeting_lines(it):
        lines += [
            "",
            "## Results by category",
            "",
            "Mean judged score per category of the win-rate prompts (the judge of the win rate); `moved` says "
            "whether the 95% intervals of SFT and final separate.",
            "",
            "| category | n | SFT | final | change | moved |",
            "|---|---:|---:|---:|---:|---|",
        ]
        lines += [f"| {' | '.join(row)} |" for row in category_rows(ev)]
        lines += [""] + [f"- Stage 6 {x}" for x in targeting_lines(it)]
    if data["qualitative"]:
        lines += ["", render_qualitative_markdown(data["qualitative"], seed=data["seed"]).rstrip("\n")]
    cont = ev.get("contamination") or {}
    lines += [
        "",
        "## Contamination audit",
        "",
        f"{fmt(ev.get('contaminated_pairs'))} of "
        f"{cont.get('n_pairs_checked', '–')} training pairs overlap an evaluation text "
        f"({cont.get('ngram', '–')}-gram rule of Stage 2).",
    ]
    lines += [
        f"- `{c['file']}` row {c['row']} ({c['field']}): {', '.join(c['eval_sets'])}" for c in (cont.get("first") or [])
    ]
    lines += ["", "## Plots", ""]
    lines += [f"![{title}](plots/{stem}.svg)" for stem, (title, _) in plot_files.items()]
    files = data["files"]
    lines += [
        "",
        "## Human evaluation",
        "",
        f"A blind side-by-side sheet is in `{files['sheet']}` "
        f"(A/B order randomized, model identities in `{files['key']}`: do not share the key with "
        "raters). Fill the `preference` column with A, B or tie, then run `python stages/evaluate.py "
        f"--human-ratings {files['sheet']}` for the human win rate and its interval.",
        "",
    ]
    return "\n".join(lines)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:980px;color:#222}
h1{margin-bottom:4px} .verdict{padding:14px 18px;border-radius:6px;font-size:22px;font-weight:bold;color:#fff}
.deploy{background:#2e7d32} .nodeploy{background:#c62828} table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px} th{background:#f0f0f0} .pass{color:#2e7d32;font-weight:bold}
.fail{color:#c62828;font-weight:bold} .plots{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0}
figcaption{font-size:12px;color:#555}
.box{background:#fff8e1;border:1px solid #f0c36d;padding:8px 12px;border-radius:4px}
code{background:#f4f4f4;padding:1px 4px}
"""


def render_html(data: Mapping[str, Any], svgs: Mapping[str, tuple[str, str]]) -> str:
    """report.html: self-contained (inline CSS and SVG; no scripts, no external resources)."""
    ev, d = data["evaluate"], data["deploy"]
    verdict = "DEPLOY" if d["deploy"] else "DO NOT DEPLOY"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>dpoflow report: " + esc(verdict) + "</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>dpoflow: deploy decision</h1>",
        f'<div class="verdict {"deploy" if d["deploy"] else "nodeploy"}" id="decision">{esc(verdict)}</div>',
        "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in _summary_lines(data)) + "</ul>",
        "<h2>Data and judges</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in data["provenance"]) + "</ul>"
        if data["provenance"]
        else "",
        "<h2>Gate checks</h2><table><tr><th>check</th><th>value</th><th>rule</th><th>param</th><th>result</th></tr>",
    ]
    for a, b, c, p_, r in check_rows(d):
        parts.append(
            f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td><td><code>{esc(p_)}</code></td>"
            f'<td class="{"pass" if r == "pass" else "fail"}">{esc(r)}</td></tr>'
        )
    parts.append("</table>")
    if d.get("rollback"):
        rb = d["rollback"]
        parts.append(f'<h2>Rollback</h2><p class="box">{esc(rb["prescription"])}</p>')
    if d.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in d["warnings"]) + "</ul>")
    parts.append('<h2>Plots</h2><div class="plots">')
    for stem, (title, svg) in svgs.items():
        parts.append(f'<figure id="plot-{esc(stem)}">{svg}<figcaption>{esc(title)}</figcaption></figure>')
    parts.append("</div>")
    parts.append(
        "<h2>Capability retention</h2><table><tr><th>benchmark</th><th>SFT</th><th>final</th><th>retention %</th></tr>"
    )
    base, fin = ev.get("baseline_benchmarks") or {}, ev.get("benchmarks") or {}
    for name in sorted(set(base) | set(fin)):
        parts.append(
            f"<tr><td>{esc(name)}</td><td>{esc(fmt(base.get(name)))}</td><td>{esc(fmt(fin.get(name)))}"
            f"</td><td>{esc(fmt((ev.get('retention_per_benchmark') or {}).get(name)))}</td></tr>"
        )
    parts.append(f"<tr><th>overall</th><td></td><td></td><th>{esc(fmt(ev.get('retention')))}</th></tr></table>")
    if ev.get("retention_notes"):
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in ev["retention_notes"]) + "</ul>")
    it = data.get("iterate")
    if it:
        parts.append(
            f"<h2>Iterative training</h2><p>Decision <b>{esc(it.get('decision'))}</b>, selected round "
            f"<b>{esc(it.get('selected_round'))}</b>.</p><table><tr><th>round</th><th>KL vs SFT</th>"
            "<th>held-out gap</th><th>task accuracy</th><th>benchmark mean</th><th>decision</th>"
            "<th>reasons</th></tr>"
        )
        for r in it.get("rounds") or []:
            parts.append(
                f"<tr><td>{r['round']}</td><td>{esc(fmt(r.get('kl')))}</td>"
                f"<td>{esc(fmt(r.get('heldout_gap')))}</td><td>{esc(fmt(r.get('task_accuracy')))}</td>"
                f"<td>{esc(fmt(r.get('benchmark_mean')))}</td><td>{esc(r.get('decision'))}</td>"
                f"<td>{esc('; '.join(r.get('reasons') or []))}</td></tr>"
            )
        parts.append(f"</table><p>{esc(it.get('analysis', ''))}</p>")
    if category_rows(ev) or targeting_lines(it):
        parts.append(
            "<h2>Results by category</h2><table><tr><th>category</th><th>n</th><th>SFT</th><th>final</th>"
            "<th>change</th><th>moved</th></tr>"
        )
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in category_rows(ev)]
        parts.append("</table><ul>" + "".join(f"<li>Stage 6 {esc(x)}</li>" for x in targeting_lines(it)) + "</ul>")
    if data["qualitative"]:
        parts.append(render_qualitative_html(data["qualitative"], seed=data["seed"]))
    cont = ev.get("contamination") or {}
    parts.append(
        f"<h2>Contamination audit</h2><p>{esc(fmt(ev.get('contaminated_pairs')))} of "
        f"{esc(cont.get('n_pairs_checked', '–'))} training pairs overlap an evaluation text.</p>"
    )
    files = data["files"]
    parts.append(
        f"<h2>Human evaluation</h2><p>Blind side-by-side sheet: <code>{esc(files['sheet'])}</code> "
        f"(key kept apart in <code>{esc(files['key'])}</code>). Fill <code>preference</code> with A, "
        "B or tie, then run <code>python stages/evaluate.py --human-ratings "
        f"{esc(files['sheet'])}</code>.</p>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: Path, inputs: ReportInputs) -> None:
    """Write report.md, report.html and plots/*.svg into `out_dir` (deterministic for the same inputs)."""
    out_dir = Path(out_dir)
    data = collect(inputs)
    svgs = plots(data)
    with io.atomic_path(out_dir / "plots") as tmp:
        tmp.mkdir(parents=True)
        for stem, (_, svg) in svgs.items():
            (tmp / f"{stem}.svg").write_text(svg + "\n", encoding="utf-8")
    io.write_text(out_dir / "report.md", render_markdown(data, svgs))
    io.write_text(out_dir / "report.html", render_html(data, svgs))
