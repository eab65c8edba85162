"""Inline SVG charts for the reports: line charts (training curves, per-round series) and bar charts with error
bars (win rate, retention). No plotting library, deterministic output."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
Series = Sequence[tuple[float, float]]


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


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
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
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}" class="plot">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>'
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-family="sans-serif" font-size="14" '
        f'font-weight="bold">{esc(title)}</text>' + "".join(body) + "</svg>"
    )


def _no_data(title: str, width: int, height: int, note: str = "no data") -> str:
    return _frame(
        title,
        width,
        height,
        [
            f'<rect x="50" y="30" width="{width - 70}" height="{height - 70}" fill="#f4f4f4" stroke="#cccccc"/>',
            f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="13" fill="#777777">{esc(note)}</text>',
        ],
    )


def _hlines(hlines: Sequence[tuple[float, str]], sy, left: float, pw: float) -> list[str]:
    """Dashed reference lines; labels alternate right / left so that two close lines stay readable."""
    out = []
    for i, (value, label) in enumerate(hlines):
        x, anchor = (left + pw - 4, "end") if i % 2 == 0 else (left + 4, "start")
        out.append(
            f'<line class="reference" x1="{left}" y1="{sy(value):.1f}" x2="{left + pw}" y2="{sy(value):.1f}" '
            f'stroke="#555555" stroke-dasharray="6 4"/><text x="{x:.1f}" y="{sy(value) - 4:.1f}" '
            f'text-anchor="{anchor}" font-family="sans-serif" font-size="11" fill="#555555">'
            f"{esc(label)}</text>"
        )
    return out


def _plot_area(
    y0: float, y1: float, sy: Callable[[float], float], left: float, top: float, pw: float, ph: float
) -> list[str]:
    """The plot area's background, with a grid line and a label at each y tick."""
    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#bbbbbb"/>']
    for t in _ticks(y0, y1):
        body.append(
            f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-family="sans-serif" '
            f'font-size="11">{esc(fmt(t, 3))}</text>'
        )
    return body


def _y_label(y_label: str, top: float, ph: float) -> list[str]:
    if not y_label:
        return []
    return [
        f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" font-family="sans-serif" '
        f'font-size="12" transform="rotate(-90 14 {top + ph / 2:.1f})">{esc(y_label)}</text>'
    ]


def line_chart(
    title: str,
    series: Mapping[str, Series],
    x_label: str = "step",
    y_label: str = "",
    hlines: Sequence[tuple[float, str]] = (),
    width: int = 640,
    height: int = 300,
    markers: bool | None = None,
    integer_x: bool = False,
) -> str:
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

    body = _plot_area(y0, y1, sy, left, top, pw, ph)
    x_ticks = _ticks(x0, x1)
    if integer_x:
        x_ticks = [float(t) for t in range(math.ceil(x0), math.floor(x1) + 1)]
    for t in x_ticks:
        body.append(
            f'<text x="{sx(t):.1f}" y="{top + ph + 15}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="11">{esc(fmt(t, 4))}</text>'
        )
    body.append(
        f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" text-anchor="middle" font-family="sans-serif" '
        f'font-size="12">{esc(x_label)}</text>'
    )
    body += _y_label(y_label, top, ph)
    body += _hlines(hlines, sy, left, pw)
    for i, (name, pts) in enumerate(data.items()):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        body.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        if markers or (markers is None and len(pts) <= 30):
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        lx = left + (i % 3) * (pw / 3)
        ly = top + ph + 48 + 16 * (i // 3)
        body.append(
            f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="4" fill="{color}"/>'
            f'<text x="{lx + 16:.1f}" y="{ly - 4}" font-family="sans-serif" font-size="11">{esc(name)}</text>'
        )
    return _frame(title, width, height, body)


def bar_chart(
    title: str,
    bars: Sequence[tuple[str, float | None, tuple[float, float] | None]],
    y_label: str = "",
    hlines: Sequence[tuple[float, str]] = (),
    width: int = 640,
    height: int = 300,
    y_range: tuple[float, float] | None = None,
) -> str:
    """An SVG bar chart: (label, value, optional (low, high) interval drawn as a whisker); None values show "n/a"."""
    if not bars:
        return _no_data(title, width, height)
    left, right, top, bottom = 64, 16, 30, 60
    pw, ph = width - left - right, height - top - bottom
    values = (
        [v for _, v, _ in bars if v is not None] + [x for _, _, ci in bars if ci for x in ci] + [v for v, _ in hlines]
    )
    if y_range is not None:
        y0, y1 = y_range
    else:
        y0, y1 = min([0.0] + values), max([1.0] + values)
        y1 += (y1 - y0) * 0.08
    if y1 <= y0:
        y1 = y0 + 1

    def sy(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * ph

    body = _plot_area(y0, y1, sy, left, top, pw, ph)
    body += _y_label(y_label, top, ph)
    slot = pw / len(bars)
    bw = min(80.0, slot * 0.6)
    for i, (label, value, ci) in enumerate(bars):
        cx = left + slot * (i + 0.5)
        color = PALETTE[i % len(PALETTE)]
        if value is None:
            body.append(
                f'<text x="{cx:.1f}" y="{top + ph - 6}" text-anchor="middle" font-family="sans-serif" '
                f'font-size="11" fill="#777777">n/a</text>'
            )
        else:
            y_top, y_base = sy(value), sy(max(y0, min(0.0, y1)) if y0 <= 0 <= y1 else y0)
            tx, ty, anchor = (
                (cx + bw / 2 + 4, y_top + 4, "start") if ci is not None else (cx, min(y_top, y_base) - 4, "middle")
            )
            body.append(
                f'<rect class="bar" x="{cx - bw / 2:.1f}" y="{min(y_top, y_base):.1f}" width="{bw:.1f}" '
                f'height="{abs(y_base - y_top):.1f}" fill="{color}" fill-opacity="0.75"/>'
                f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" '
                f'font-family="sans-serif" font-size="11">{esc(fmt(value, 4))}</text>'
            )
        if ci is not None:
            lo, hi = sy(ci[0]), sy(ci[1])
            body.append(
                f'<line class="interval" x1="{cx:.1f}" y1="{lo:.1f}" x2="{cx:.1f}" y2="{hi:.1f}" '
                f'stroke="#000000" stroke-width="2"/>'
                f'<line x1="{cx - 8:.1f}" y1="{lo:.1f}" x2="{cx + 8:.1f}" y2="{lo:.1f}" stroke="#000000" '
                f'stroke-width="2"/><line x1="{cx - 8:.1f}" y1="{hi:.1f}" x2="{cx + 8:.1f}" y2="{hi:.1f}" '
                f'stroke="#000000" stroke-width="2"/>'
            )
        body.append(
            f'<text x="{cx:.1f}" y="{top + ph + 16}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="11">{esc(label)}</text>'
        )
    body += _hlines(hlines, sy, left, pw)
    return _frame(title, width, height, body)
