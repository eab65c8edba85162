"""Qualitative analysis (dpoflow.reporting.qualitative) and the human sheet that starts with the same rows."""

from __future__ import annotations

import csv
import json
import random

import pytest

from dpoflow.eval.human import export_human_sheet
from dpoflow.reporting.qualitative import (
    qualitative_rows,
    render_qualitative_html,
    render_qualitative_markdown,
    sheet_indices,
)


def judgments(n=40):
    """pairwise_judgments-shaped rows: outcome from graded scores; prompts carry a system turn."""
    out = []
    for i in range(n):
        final, base = (i % 5) / 4, ((i * 3) % 5) / 4
        out.append(
            {
                "index": i,
                "id": f"q{i}",
                "prompt": [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": f"What is {i} + 1?"}],
                "final": f"final answer {i}",
                "baseline": f"sft answer {i}",
                "score_final": final,
                "score_baseline": base,
                "outcome": 0.5 if final == base else float(final > base),
            }
        )
    return out


def test_rows_sample_each_outcome_and_the_largest_regressions_deterministically():
    js = judgments()
    rows = qualitative_rows(js, per_outcome=3, regressions=2, seed=0)
    kinds = [r["kind"] for r in rows]
    assert kinds == ["regression"] * 2 + ["loss"] * 3 + ["win"] * 3 + ["tie"] * 3
    drops = sorted((j["score_baseline"] - j["score_final"], -j["index"]) for j in js)
    assert [r["index"] for r in rows[:2]] == [-i for _, i in drops[::-1][:2]]  # largest drop first
    assert rows[0]["drop"] == 0.5 and rows[0]["prompt"] == f"What is {rows[0]['index']} + 1?"  # user turn only
    for r in rows:
        j = js[r["index"]]
        assert (r["sft"], r["final"], r["score_sft"], r["score_final"]) == (
            j["baseline"],
            j["final"],
            j["score_baseline"],
            j["score_final"],
        )
        assert r["kind"] == "regression" or r["outcome"] == {"loss": 0.0, "win": 1.0, "tie": 0.5}[r["kind"]]
    assert len({r["index"] for r in rows}) == len(rows)  # a regression is not shown again as a loss
    assert rows == qualitative_rows(js, per_outcome=3, regressions=2, seed=0)
    assert rows != qualitative_rows(js, per_outcome=3, regressions=2, seed=1)
    assert [r["kind"] for r in qualitative_rows(js[:2], per_outcome=5, regressions=0)] == ["loss", "tie"]


def test_sections_contain_the_sampled_rows_and_html_is_escaped():
    js = judgments()
    js[7]["final"] = "<script>alert('x')</script> & | pipes\nsecond line"
    js[7]["score_final"], js[7]["score_baseline"], js[7]["outcome"] = 0.0, 1.0, 0.0  # the largest regression
    rows = qualitative_rows(js, per_outcome=2, regressions=1, seed=3)
    assert rows[0]["index"] == 7
    md, html = render_qualitative_markdown(rows, seed=3), render_qualitative_html(rows, seed=3)
    assert md.startswith("## Qualitative examples") and "### Largest regressions" in md and "### Ties" in md
    for r in rows[1:]:
        for text in (r["prompt"], r["sft"], r["final"]):
            assert text in md and text in html
        assert f"judgment {r['index']} (id {r['id']})" in md
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; | pipes" in html
    assert "<script>" not in md and "&amp; \\| pipes<br>second line" in md  # one table row per example
    assert html.count("<tr>") == len(rows) + 4  # a header per kind shown
    assert (md, html) == (render_qualitative_markdown(rows, seed=3), render_qualitative_html(rows, seed=3))
    assert "No judgments to show." in render_qualitative_markdown([]) and "No judgments" in render_qualitative_html([])


def _sheet(tmp_path, name, js, n_rows, **kw):
    sheet, key = tmp_path / f"{name}.csv", tmp_path / f"{name}.json"
    export_human_sheet(js, sheet, key, n_rows, seed=4, **kw)
    with open(sheet, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f)), json.loads(key.read_text())


def test_human_sheet_starts_with_the_report_rows_and_keeps_its_default(tmp_path):
    js = judgments(30)
    rows = qualitative_rows(js, per_outcome=2, regressions=2, seed=0)
    first = sheet_indices(rows)
    sheet, key = _sheet(tmp_path, "with", js, 12, include=first)
    assert len(sheet) == 12 and [key["rows"][str(n)]["index"] for n in range(1, 9)] == first
    assert [s["prompt"] for s in sheet[:8]] == [r["prompt"] for r in rows]
    assert len({key["rows"][str(n)]["index"] for n in range(1, 13)}) == 12
    for n, r in enumerate(rows, start=1):  # the sheet's A/B hold exactly the report's two responses
        assert {sheet[n - 1]["response_a"], sheet[n - 1]["response_b"]} == {r["sft"], r["final"]}
    # more included rows than n_rows: all of them
    assert len(_sheet(tmp_path, "all", js, 3, include=first)[0]) == 8
    # default: unchanged (the seeded sample of range(n), then one coin flip per row)
    plain, plain_key = _sheet(tmp_path, "plain", js, 12)
    rng = random.Random("dpoflow-human-eval:4")
    chosen = rng.sample(range(30), 12)
    assert [plain_key["rows"][str(n)]["index"] for n in range(1, 13)] == chosen
    assert [plain_key["rows"][str(n)]["a"] for n in range(1, 13)] == [
        "final" if rng.random() < 0.5 else "baseline" for _ in chosen
    ]
    assert (plain, plain_key) == _sheet(tmp_path, "plain2", js, 12, include=())
    with pytest.raises(ValueError, match="unknown or repeated"):
        _sheet(tmp_path, "bad", js, 5, include=[99])
    with pytest.raises(ValueError, match="unknown or repeated"):
        _sheet(tmp_path, "bad", js, 5, include=[1, 1])
