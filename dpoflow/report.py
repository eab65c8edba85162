"""Stage 7 report: reports/report.md, a self-contained reports/report.html (inline SVG plots, no external files,
no plotting library) and reports/deploy.json, for a person who decides whether to ship the model.

    deploy = write_report(Path("."), params)        # reads metrics/ and dvclive/, writes reports/

Plots: SFT and DPO training curves and DPO reward margins (dvclive/<stage>/plots/metrics/*.tsv), KL and held-out
gap per round (metrics/iterate.json), the win rate with its 95% interval and retention per benchmark
(metrics/evaluate.json). Everything is deterministic for the same inputs (no timestamps, fixed formatting).
"""
from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from dpoflow import io

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
Series = Sequence[tuple[float, float]]


# ---------------------------------------------------------------------------------------------------------
# Data


def read_tsv(path: Path) -> list[tuple[float, float]]:
    """(step, value) rows of a dvclive metric TSV (header `step<TAB>name`); missing file -> []."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if not header or len(header) < 2:
            return []
        step_col = header.index("step") if "step" in header else 0
        value_col = len(header) - 1 if step_col != len(header) - 1 else 0
        for row in reader:
            try:
                x, y = float(row[step_col]), float(row[value_col])
            except (ValueError, IndexError):
                continue
            if math.isfinite(x) and math.isfinite(y):
                out.append((x, y))
    return out


def dvclive_series(root: Path, stage: str, key: str) -> list[tuple[float, float]]:
    """dvclive/<stage>/plots/metrics/<key>.tsv, e.g. key "train/loss" or "train/rewards/margins"."""
    return read_tsv(Path(root) / "dvclive" / stage / "plots" / "metrics" / f"{key}.tsv")


def _read_optional(path: Path) -> Optional[dict]:
    return io.read_json(path) if Path(path).is_file() else None


# ---------------------------------------------------------------------------------------------------------
# SVG


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _frame(title: str, width: int, height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" class="plot">'
            f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>'
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-family="sans-serif" font-size="14" '
            f'font-weight="bold">{_esc(title)}</text>' + "".join(body) + "</svg>")


def _no_data(title: str, width: int, height: int, note: str = "no data") -> str:
    return _frame(title, width, height, [
        f'<rect x="50" y="30" width="{width - 70}" height="{height - 70}" fill="#f4f4f4" stroke="#cccccc"/>',
        f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-family="sans-serif" '
        f'font-size="13" fill="#777777">{_esc(note)}</text>'])


def _hlines(hlines: Sequence[tuple[float, str]], sy, left: float, pw: float) -> list[str]:
    """Dashed reference lines; labels alternate right / left so that two close lines stay readable."""
    out = []
    for i, (value, label) in enumerate(hlines):
        x, anchor = (left + pw - 4, "end") if i % 2 == 0 else (left + 4, "start")
        out.append(f'<line class="reference" x1="{left}" y1="{sy(value):.1f}" x2="{left + pw}" y2="{sy(value):.1f}" '
                   f'stroke="#555555" stroke-dasharray="6 4"/><text x="{x:.1f}" y="{sy(value) - 4:.1f}" '
                   f'text-anchor="{anchor}" font-family="sans-serif" font-size="11" fill="#555555">'
                   f'{_esc(label)}</text>')
    return out


def line_chart(title: str, series: Mapping[str, Series], x_label: str = "step", y_label: str = "",
               hlines: Sequence[tuple[float, str]] = (), width: int = 640, height: int = 300,
               markers: Optional[bool] = None, integer_x: bool = False) -> str:
    """An SVG line chart of named (x, y) series, with optional dashed horizontal reference lines (value, label).
    integer_x: x ticks only at whole numbers (rounds)."""
    data = {name: [(float(x), float(y)) for x, y in pts] for name, pts in series.items() if pts}
    if not data:
        return _no_data(title, width, height)
    left, right, top, bottom = 64, 16, 30, 56 + 16 * ((len(data) + 2) // 3)
    height = max(height, top + bottom + 120)
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts] + [v for v, _ in hlines]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or (abs(y1) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbbbbb"/>']
    for t in _ticks(y0, y1):
        body.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>'
                    f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-family="sans-serif" '
                    f'font-size="11">{_esc(_fmt(t, 3))}</text>')
    x_ticks = _ticks(x0, x1)
    if integer_x:
        x_ticks = [float(t) for t in range(math.ceil(x0), math.floor(x1) + 1)]
    for t in x_ticks:
        body.append(f'<text x="{sx(t):.1f}" y="{top + ph + 15}" text-anchor="middle" font-family="sans-serif" '
                    f'font-size="11">{_esc(_fmt(t, 4))}</text>')
    body.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" text-anchor="middle" font-family="sans-serif" '
                f'font-size="12">{_esc(x_label)}</text>')
    if y_label:
        body.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" font-family="sans-serif" '
                    f'font-size="12" transform="rotate(-90 14 {top + ph / 2:.1f})">{_esc(y_label)}</text>')
    body += _hlines(hlines, sy, left, pw)
    for i, (name, pts) in enumerate(data.items()):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        body.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        if markers or (markers is None and len(pts) <= 30):
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        lx = left + (i % 3) * (pw / 3)
        ly = top + ph + 48 + 16 * (i // 3)
        body.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="4" fill="{color}"/>'
                    f'<text x="{lx + 16:.1f}" y="{ly - 4}" font-family="sans-serif" font-size="11">{_esc(name)}</text>')
    return _frame(title, width, height, body)


def bar_chart(title: str, bars: Sequence[tuple[str, Optional[float], Optional[tuple[float, float]]]],
              y_label: str = "", hlines: Sequence[tuple[float, str]] = (), width: int = 640, height: int = 300,
              y_range: Optional[tuple[float, float]] = None) -> str:
    """An SVG bar chart: (label, value, optional (low, high) interval drawn as a whisker); None values show "n/a"."""
    if not bars:
        return _no_data(title, width, height)
    left, right, top, bottom = 64, 16, 30, 60
    pw, ph = width - left - right, height - top - bottom
    values = [v for _, v, _ in bars if v is not None] + [x for _, _, ci in bars if ci for x in ci] + \
        [v for v, _ in hlines]
    if y_range is not None:
        y0, y1 = y_range
    else:
        y0, y1 = min([0.0] + values), max([1.0] + values)
        y1 += (y1 - y0) * 0.08
    if y1 <= y0:
        y1 = y0 + 1

    def sy(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * ph

    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbbbbb"/>']
    for t in _ticks(y0, y1):
        body.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>'
                    f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-family="sans-serif" '
                    f'font-size="11">{_esc(_fmt(t, 3))}</text>')
    if y_label:
        body.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" font-family="sans-serif" '
                    f'font-size="12" transform="rotate(-90 14 {top + ph / 2:.1f})">{_esc(y_label)}</text>')
    slot = pw / len(bars)
    bw = min(80.0, slot * 0.6)
    for i, (label, value, ci) in enumerate(bars):
        cx = left + slot * (i + 0.5)
        color = PALETTE[i % len(PALETTE)]
        if value is None:
            body.append(f'<text x="{cx:.1f}" y="{top + ph - 6}" text-anchor="middle" font-family="sans-serif" '
                        f'font-size="11" fill="#777777">n/a</text>')
        else:
            y_top, y_base = sy(value), sy(max(y0, min(0.0, y1)) if y0 <= 0 <= y1 else y0)
            tx, ty, anchor = ((cx + bw / 2 + 4, y_top + 4, "start") if ci is not None
                              else (cx, min(y_top, y_base) - 4, "middle"))
            body.append(f'<rect class="bar" x="{cx - bw / 2:.1f}" y="{min(y_top, y_base):.1f}" width="{bw:.1f}" '
                        f'height="{abs(y_base - y_top):.1f}" fill="{color}" fill-opacity="0.75"/>'
                        f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" '
                        f'font-family="sans-serif" font-size="11">{_esc(_fmt(value, 4))}</text>')
        if ci is not None:
            lo, hi = sy(ci[0]), sy(ci[1])
            body.append(f'<line class="interval" x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" y2="{hi:.1f}" '
                        f'stroke="#000000" stroke-width="2"/>'
                        f'<line x1="{cx - 8:.1f}" y1="{lo:.1f}" x2="{cx + 8:.1f}" y2="{lo:.1f}" stroke="#000000" '
                        f'stroke-width="2"/><line x1="{cx - 8:.1f}" y1="{hi:.1f}" x2="{cx + 8:.1f}" y2="{hi:.1f}" '
                        f'stroke="#000000" stroke-width="2"/>')
        body.append(f'<text x="{cx:.1f}" y="{top + ph + 16}" text-anchor="middle" font-family="sans-serif" '
                    f'font-size="11">{_esc(label)}</text>')
    body += _hlines(hlines, sy, left, pw)
    return _frame(title, width, height, body)


# ---------------------------------------------------------------------------------------------------------
# The report


def collect(root: Path, p: Any, deploy: Mapping[str, Any]) -> dict:
    """Everything the report shows, read from the pipeline's metrics and dvclive folders under `root`."""
    root = Path(root)
    return {
        "evaluate": io.read_json(root / "metrics" / "evaluate.json"),
        "deploy": dict(deploy),
        "iterate": _read_optional(root / "metrics" / "iterate.json"),
        "curves": {
            "sft": {"train loss": dvclive_series(root, "sft", "train/loss"),
                    "validation loss": dvclive_series(root, "sft", "eval/val_loss")},
            "dpo": {"train loss": dvclive_series(root, "dpo", "train/loss")},
            "margins": {"reward margin": dvclive_series(root, "dpo", "train/rewards/margins"),
                        "chosen reward": dvclive_series(root, "dpo", "train/rewards/chosen"),
                        "rejected reward": dvclive_series(root, "dpo", "train/rewards/rejected")},
            "dpo_eval": {"KL (DPO checks)": dvclive_series(root, "dpo", "eval/kl"),
                         "held-out gap (DPO checks)": dvclive_series(root, "dpo", "eval/heldout_gap")},
        },
        "thresholds": {"min_retention": p.evaluate.min_retention, "max_kl": p.evaluate.max_kl,
                       "min_heldout_gap": p.evaluate.min_heldout_gap,
                       "min_win_rate_lower": p.evaluate.min_win_rate_lower},
    }


def plots(data: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{file stem: (title, svg)} in report order."""
    ev, th = data["evaluate"], data["thresholds"]
    rounds = (data.get("iterate") or {}).get("rounds") or []
    out: dict[str, tuple[str, str]] = {}
    c = data["curves"]
    out["sft_training"] = ("SFT training curves (Stage 1)",
                           line_chart("SFT training (Stage 1)", c["sft"], "step", "loss"))
    out["dpo_training"] = ("DPO training loss (Stage 5)", line_chart("DPO training loss (Stage 5)", c["dpo"], "step",
                                                                     "loss"))
    out["reward_margins"] = ("DPO reward margins (Stage 5)",
                             line_chart("DPO implicit rewards (Stage 5)", c["margins"], "step", "beta x log-ratio",
                                        hlines=[(0.0, "0")]))
    kl_rounds = [(r["round"], r["kl"]) for r in rounds if r.get("kl") is not None]
    gap_rounds = [(r["round"], r["heldout_gap"]) for r in rounds if r.get("heldout_gap") is not None]
    final_x = ev.get("selected_round")  # the final model is the selected round, not necessarily the last one
    final_x = max([x for x, _ in kl_rounds] or [0]) if final_x is None else final_x
    final = [] if ev.get("kl") is None else [(final_x, ev["kl"])]
    out["kl_rounds"] = ("KL(policy || SFT) per round", line_chart(
        "KL(policy || SFT) per round (round 0 = Stage 5)", {"round": kl_rounds, "final model": final},
        "round", "KL per token", hlines=[(th["max_kl"], f"evaluate.max_kl {th['max_kl']:g}")], markers=True,
        integer_x=True))
    out["gap_rounds"] = ("Held-out preference gap per round", line_chart(
        "Held-out preference gap per round", {"round": gap_rounds}, "round", "gap",
        hlines=[(th["min_heldout_gap"], f"evaluate.min_heldout_gap {th['min_heldout_gap']:g}")], markers=True,
        integer_x=True))
    wr = ev.get("win_rate")
    ci = (ev.get("win_rate_ci_low"), ev.get("win_rate_ci_high"))
    out["win_rate"] = ("Win rate vs SFT with 95% interval", bar_chart(
        "Win rate vs the SFT model (ties = 1/2), 95% bootstrap interval",
        [("final vs SFT", wr, ci if None not in ci else None)], "win rate",
        hlines=[(th["min_win_rate_lower"], f"lower bound must exceed {th['min_win_rate_lower']:g}")], y_range=(0, 1)))
    per = ev.get("retention_per_benchmark") or {}
    top = max([110.0] + [v * 1.08 for v in per.values() if v is not None])
    out["retention"] = ("Capability retention per benchmark", bar_chart(
        "Capability retention per benchmark (% of SFT)",
        [(name, value, None) for name, value in sorted(per.items())] + [("overall", ev.get("retention"), None)],
        "% of SFT", hlines=[(100.0, "100 %"), (th["min_retention"], f"evaluate.min_retention {th['min_retention']:g}")],
        y_range=(0, top)))
    return out


def _check_rows(deploy: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    return [(c["label"], _fmt(c["value"]), f"{c['op']} {_fmt(c['threshold'])}", c["param"],
             "pass" if c["passed"] else "FAIL") for c in deploy["checks"]]


def _summary_lines(data: Mapping[str, Any]) -> list[str]:
    ev, d = data["evaluate"], data["deploy"]
    wd = ev.get("win_rate_detail") or {}
    lines = [f"Final model: `models/final` (round {_fmt(ev.get('selected_round'))} of Stage 6, reference "
             f"{ev.get('selected_reference', '–')}).",
             f"Win rate vs SFT: {_fmt(ev.get('win_rate'))} (95% CI {_fmt(ev.get('win_rate_ci_low'))} – "
             f"{_fmt(ev.get('win_rate_ci_high'))}, {wd.get('n', '–')} prompts, judge {wd.get('judge', '–')}, "
             f"{wd.get('decoding', '–')}).",
             f"Capability retention: {_fmt(ev.get('retention'))} %; KL(final || SFT) {_fmt(ev.get('kl'))}; held-out "
             f"gap {_fmt(ev.get('heldout_gap'))}; contaminated training pairs {_fmt(ev.get('contaminated_pairs'))}.",
             d["note"]]
    return lines


def render_markdown(data: Mapping[str, Any], plot_files: Mapping[str, tuple[str, str]]) -> str:
    """reports/report.md (plots as reports/plots/*.svg files; report.html holds the same plots inline)."""
    ev, d = data["evaluate"], data["deploy"]
    verdict = "DEPLOY" if d["deploy"] else "DO NOT DEPLOY"
    lines = [f"# dpoflow report: **{verdict}**", ""] + [f"- {x}" for x in _summary_lines(data)]
    lines += ["", "## Gate checks (`reports/deploy.json`)", "", "| check | value | rule | param | result |",
              "|---|---:|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | `{p_}` | {r} |" for a, b, c, p_, r in _check_rows(d)]
    if d.get("rollback"):
        rb = d["rollback"]
        lines += ["", "## Rollback", "", rb["prescription"], ""]
        if rb["to"].get("round") is not None:
            lines.append(f"Last round that met every threshold: **{rb['to']['round']}** (retention "
                         f"{_fmt(rb['to'].get('retention'))} %, KL {_fmt(rb['to'].get('kl'))}, held-out gap "
                         f"{_fmt(rb['to'].get('heldout_gap'))}).")
        else:
            lines.append(rb["to"].get("note", ""))
    if d.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in d["warnings"]]
    lines += ["", "## Capability retention", "", "| benchmark | SFT | final | retention % |", "|---|---:|---:|---:|"]
    base, fin = ev.get("baseline_benchmarks") or {}, ev.get("benchmarks") or {}
    for name in sorted(set(base) | set(fin)):
        lines.append(f"| {name} | {_fmt(base.get(name))} | {_fmt(fin.get(name))} | "
                     f"{_fmt((ev.get('retention_per_benchmark') or {}).get(name))} |")
    lines.append(f"| **overall** | | | **{_fmt(ev.get('retention'))}** |")
    lines += [f"- {n}" for n in ev.get("retention_notes") or []]
    wd = ev.get("win_rate_detail") or {}
    lines += ["", "## Win rate", "", f"{wd.get('wins', '–')} wins, {wd.get('ties', '–')} ties, "
              f"{wd.get('losses', '–')} losses over {wd.get('n', '–')} held-out prompts (data/tasks/eval.jsonl); "
              "ties count 1/2; "
              f"{wd.get('bootstrap_samples', '–')} bootstrap resamples (seed {wd.get('seed', '–')}). Alignment "
              "improved means the interval's lower bound is above 0.5.",
              "", f"Decoding: {wd.get('decoding', '–')} (`evaluate.win_rate_temperature`; one response per prompt "
              "and model, the same seed for both)."]
    other = ev.get("win_rate_other_decoding")
    if other:
        lines += ["", f"Reported beside it, not gated: {other.get('decoding')}: win rate {_fmt(other.get('win_rate'))} "
                  f"(95% CI {_fmt(other.get('ci_low'))} – {_fmt(other.get('ci_high'))}; {other.get('wins')} wins, "
                  f"{other.get('ties')} ties, {other.get('losses')} losses). Greedy decoding shows only the prompts "
                  "where the model's most likely answer changed."]
    it = data.get("iterate")
    if it:
        lines += ["", "## Iterative training", "", f"Decision **{it.get('decision')}**, selected round "
                  f"**{it.get('selected_round')}**.", "", "| round | KL vs SFT | held-out gap | task accuracy | "
                  "benchmark mean | decision |", "|---:|---:|---:|---:|---:|---|"]
        for r in it.get("rounds") or []:
            lines.append(f"| {r['round']} | {_fmt(r.get('kl'))} | {_fmt(r.get('heldout_gap'))} | "
                         f"{_fmt(r.get('task_accuracy'))} | {_fmt(r.get('benchmark_mean'))} | {r.get('decision')} |")
        lines += ["", it.get("analysis", "")]
    cont = ev.get("contamination") or {}
    lines += ["", "## Contamination audit", "", f"{_fmt(ev.get('contaminated_pairs'))} of "
              f"{cont.get('n_pairs_checked', '–')} training pairs overlap an evaluation text "
              f"({cont.get('ngram', '–')}-gram rule of Stage 2)."]
    lines += [f"- `{c['file']}` row {c['row']} ({c['field']}): {', '.join(c['eval_sets'])}"
              for c in (cont.get("first") or [])]
    lines += ["", "## Plots", ""]
    lines += [f"![{title}](plots/{stem}.svg)" for stem, (title, _) in plot_files.items()]
    lines += ["", "## Human evaluation", "", "A blind side-by-side sheet is in `reports/human_eval_sheet.csv` "
              "(A/B order randomized, model identities in `reports/human_eval_key.json`: do not share the key with "
              "raters). Fill the `preference` column with A, B or tie, then run `python stages/evaluate.py "
              "--human-ratings "
              "reports/human_eval_sheet.csv` for the human win rate and its interval.", ""]
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
    """reports/report.html: self-contained (inline CSS and SVG; no scripts, no external resources)."""
    ev, d = data["evaluate"], data["deploy"]
    verdict = "DEPLOY" if d["deploy"] else "DO NOT DEPLOY"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>dpoflow report: " + _esc(verdict) + "</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>dpoflow: deploy decision</h1>",
             f'<div class="verdict {"deploy" if d["deploy"] else "nodeploy"}" id="decision">{_esc(verdict)}</div>',
             "<ul>" + "".join(f"<li>{_esc(x)}</li>" for x in _summary_lines(data)) + "</ul>",
             "<h2>Gate checks</h2><table><tr><th>check</th><th>value</th><th>rule</th><th>param</th>"
             "<th>result</th></tr>"]
    for a, b, c, p_, r in _check_rows(d):
        parts.append(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{_esc(c)}</td><td><code>{_esc(p_)}</code></td>"
                     f'<td class="{"pass" if r == "pass" else "fail"}">{_esc(r)}</td></tr>')
    parts.append("</table>")
    if d.get("rollback"):
        rb = d["rollback"]
        parts.append(f'<h2>Rollback</h2><p class="box">{_esc(rb["prescription"])}</p>')
    if d.get("warnings"):
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in d["warnings"]) + "</ul>")
    parts.append('<h2>Plots</h2><div class="plots">')
    for stem, (title, svg) in svgs.items():
        parts.append(f'<figure id="plot-{_esc(stem)}">{svg}<figcaption>{_esc(title)}</figcaption></figure>')
    parts.append("</div>")
    parts.append("<h2>Capability retention</h2><table><tr><th>benchmark</th><th>SFT</th><th>final</th>"
                 "<th>retention %</th></tr>")
    base, fin = ev.get("baseline_benchmarks") or {}, ev.get("benchmarks") or {}
    for name in sorted(set(base) | set(fin)):
        parts.append(f"<tr><td>{_esc(name)}</td><td>{_esc(_fmt(base.get(name)))}</td><td>{_esc(_fmt(fin.get(name)))}"
                     f"</td><td>{_esc(_fmt((ev.get('retention_per_benchmark') or {}).get(name)))}</td></tr>")
    parts.append(f"<tr><th>overall</th><td></td><td></td><th>{_esc(_fmt(ev.get('retention')))}</th></tr></table>")
    if ev.get("retention_notes"):
        parts.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in ev["retention_notes"]) + "</ul>")
    it = data.get("iterate")
    if it:
        parts.append(f"<h2>Iterative training</h2><p>Decision <b>{_esc(it.get('decision'))}</b>, selected round "
                     f"<b>{_esc(it.get('selected_round'))}</b>.</p><table><tr><th>round</th><th>KL vs SFT</th>"
                     "<th>held-out gap</th><th>task accuracy</th><th>benchmark mean</th><th>decision</th>"
                     "<th>reasons</th></tr>")
        for r in it.get("rounds") or []:
            parts.append(f"<tr><td>{r['round']}</td><td>{_esc(_fmt(r.get('kl')))}</td>"
                         f"<td>{_esc(_fmt(r.get('heldout_gap')))}</td><td>{_esc(_fmt(r.get('task_accuracy')))}</td>"
                         f"<td>{_esc(_fmt(r.get('benchmark_mean')))}</td><td>{_esc(r.get('decision'))}</td>"
                         f"<td>{_esc('; '.join(r.get('reasons') or []))}</td></tr>")
        parts.append(f"</table><p>{_esc(it.get('analysis', ''))}</p>")
    cont = ev.get("contamination") or {}
    parts.append(f"<h2>Contamination audit</h2><p>{_esc(_fmt(ev.get('contaminated_pairs')))} of "
                 f"{_esc(cont.get('n_pairs_checked', '–'))} training pairs overlap an evaluation text.</p>")
    parts.append("<h2>Human evaluation</h2><p>Blind side-by-side sheet: <code>reports/human_eval_sheet.csv</code> "
                 "(key kept apart in <code>reports/human_eval_key.json</code>). Fill <code>preference</code> with A, "
                 "B or tie, then run <code>python stages/evaluate.py --human-ratings "
                 "reports/human_eval_sheet.csv</code>.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(root: Path, p: Any, out_dir: Optional[Path] = None) -> dict:
    """Decide (dpoflow.evaluate.deploy_decision) and write reports/deploy.json, report.md, report.html and
    reports/plots/*.svg under `root`. Returns the deploy decision."""
    from dpoflow.evaluate import deploy_decision

    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "reports"
    ev = io.read_json(root / "metrics" / "evaluate.json")
    iterate = _read_optional(root / "metrics" / "iterate.json")
    deploy = deploy_decision(ev, p, iterate, ev.get("baseline_benchmarks") or {})
    data = collect(root, p, deploy)
    svgs = plots(data)
    with io.atomic_path(out_dir / "plots") as tmp:
        tmp.mkdir(parents=True)
        for stem, (_, svg) in svgs.items():
            (tmp / f"{stem}.svg").write_text(svg + "\n", encoding="utf-8")
    io.write_json(out_dir / "deploy.json", deploy)
    io.write_text(out_dir / "report.md", render_markdown(data, svgs))
    io.write_text(out_dir / "report.html", render_html(data, svgs))
    return deploy
