"""The paired retention gate (issue 22): dpoflow.eval.retention.paired_benchmark_retention on simulated per-document
scores -- its metrics-file shape, document alignment, interval coverage at a known true retention, and the gate's
power at the recommended benchmark sizes. Fast: 0/1 scores take the multinomial bootstrap path (a few seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpoflow.eval.retention import detectable_lines, paired_benchmark_retention, retention_gate

# The embedded default's tasks: plausible SFT baselines (docs/capability-assessment.md, metrics/sft.json), the
# discordance assumed in benchmarks/power_table.py, and the recommended per-task limits (benchmarks.limit).
BASELINE = {"dpoflow_task_gen": 0.80, "dpoflow_task_mc": 0.50, "dpoflow_text_cloze": 0.45}
DISCORDANCE = {"dpoflow_task_gen": 0.15, "dpoflow_task_mc": 0.10, "dpoflow_text_cloze": 0.10}
RECOMMENDED = {"dpoflow_task_gen": 150, "dpoflow_task_mc": 100, "dpoflow_text_cloze": 100}
GATE = 90.0  # the retention_ci_low threshold these sizes support (docs/quality-thresholds.md)
SEEDS = range(200)
BOOT = 300


def simulate(rng, n, p0, retention, discordance):
    """0/1 scores of n documents: baseline accuracy p0, final accuracy retention * p0, the two disagreeing on a
    fraction `discordance`. Cells P(b=1, f=0) = x, P(b=0, f=1) = y, x + y = discordance, x - y = p0 - p1."""
    p1 = retention * p0
    x, y = (discordance + p0 - p1) / 2, (discordance - p0 + p1) / 2
    cells = np.array([p0 - x, x, y, 1 - p0 - y])  # (1,1), (1,0), (0,1), (0,0)
    assert np.all(cells >= 0)
    kind = rng.permutation(np.repeat(np.arange(4), rng.multinomial(n, cells)))
    return (kind <= 1).astype(float), ((kind == 0) | (kind == 2)).astype(float)


def simulated_run(seed, retention, sizes=RECOMMENDED, discordance=DISCORDANCE):
    """Per-document results of both models in run_benchmarks_per_document's shape."""
    rng = np.random.default_rng(40_000 + seed)
    base, fin = {}, {}
    for task, n in sizes.items():
        b, f = simulate(rng, n, BASELINE[task], retention, discordance[task])
        base[task] = {"docs": [{"doc_id": i, "score": s} for i, s in enumerate(b)]}
        fin[task] = {"docs": [{"doc_id": i, "score": s} for i, s in enumerate(f)]}
    return base, fin


def gate_results(retention, threshold, seeds=SEEDS):
    out = []
    for seed in seeds:
        base, fin = simulated_run(seed, retention)
        out.append(paired_benchmark_retention(base, fin, threshold, 0.95, BOOT, seed))
    return out


# ------------------------------------------------------------------------------------------------ shape


def test_metrics_shape_and_json_safety():
    base, fin = simulated_run(0, 0.95)
    base["floor"], fin["floor"] = [0.0] * 50, [0.0] * 50  # both 0: uninformative, no ratio
    base["ceiling"], fin["ceiling"] = [1.0] * 50, [1.0] * 49 + [0.0]  # both >= 0.98: uninformative
    b = np.zeros(30)
    b[0] = 1  # one baseline-correct document: an unbounded upper end
    f = np.zeros(30)
    f[[0, 1, 2]] = 1
    base["few"], fin["few"] = b.tolist(), f.tolist()
    out = paired_benchmark_retention(base, fin, 95.0, 0.95, 500, 3)
    json.dumps(out, allow_nan=False)  # writable by runtime.io.write_json
    tasks = out["retention_tasks"]
    assert out["retention_uninformative"] == ["ceiling", "floor"]
    assert tasks["floor"]["informative"] == 0 and tasks["floor"]["retention"] is None
    assert tasks["few"]["informative"] == 1 and tasks["few"]["ci_high"] is None  # +inf -> None
    for task in BASELINE:
        row = tasks[task]
        assert row["informative"] == 1 and row["n"] == RECOMMENDED[task]
        assert row["ci_low"] < row["retention"] < row["ci_high"]
        assert out["retention_detectable"][task] == row["detectable"]
        assert row["detectable"].startswith(f"with {RECOMMENDED[task]} documents the smallest regression this gate ")
    assert out["retention_n"] == sum(RECOMMENDED.values()) + 30
    assert out["retention_ci_low"] < out["retention_pooled"] < (out["retention_ci_high"] or math.inf)
    assert out["retention_pooled"] == pytest.approx(np.mean([tasks[t]["retention"] for t in [*BASELINE, "few"]]))
    gate = out["retention_gate"]
    assert gate["passed"] == int(out["retention_ci_low"] >= 95.0) and gate["rule"] == "retention_ci_low >= 95"
    assert out["retention_min_detectable"] > 0 and out["retention_confidence"] == 0.95
    assert (
        "floor" in out["retention_detectable"]["floor"] or "baseline score of 0" in out["retention_detectable"]["floor"]
    )


def test_documents_are_aligned_by_doc_id_and_the_result_is_seeded():
    base, fin = simulated_run(1, 0.9)
    shuffled = {t: {"docs": list(reversed(r["docs"]))} for t, r in fin.items()}
    plain = {t: [d["score"] for d in r["docs"]] for t, r in fin.items()}
    a = paired_benchmark_retention(base, fin, 95.0, 0.95, 400, 7)
    assert paired_benchmark_retention(base, shuffled, 95.0, 0.95, 400, 7) == a
    assert paired_benchmark_retention(base, plain, 95.0, 0.95, 400, 7) == a
    assert paired_benchmark_retention(base, fin, 95.0, 0.95, 400, 8)["retention_ci_low"] != a["retention_ci_low"]
    with pytest.raises(ValueError, match="one model only"):
        paired_benchmark_retention(base, {t: fin[t] for t in list(fin)[:2]}, 95.0)
    other = {t: {"docs": [dict(d, doc_id=d["doc_id"] + 1) for d in r["docs"]]} for t, r in fin.items()}
    with pytest.raises(ValueError, match="different documents"):
        paired_benchmark_retention(base, other, 95.0)


def test_retention_gate_is_non_inferiority_on_the_lower_bound():
    assert retention_gate(95.0, 95.0)["passed"] == 1
    assert retention_gate(94.9, 95.0)["passed"] == 0
    failed = retention_gate(None, 95.0)
    assert failed["passed"] == 0 and "no informative task" in failed["message"]
    lines = detectable_lines(
        {"dpoflow_task_mc": 0.5, "dpoflow_humaneval": 0.0}, {"dpoflow_task_mc": 100, "dpoflow_humaneval": 20}
    )
    assert lines["dpoflow_task_mc"].startswith("with 100 documents the smallest regression this gate detects at 95%")
    assert "no regression can be measured" in lines["dpoflow_humaneval"]


# ------------------------------------------------------------------------------------------------ coverage


def test_pooled_and_per_task_intervals_cover_a_known_retention():
    """True retention 93 % on every task (so 93 % pooled), the recommended sizes: the 95 % intervals cover it at
    about their nominal rate (200 seeds: a binomial 95 % band is about 0.92-0.98; the percentile bootstrap of a
    ratio on 100 documents runs a little below nominal, 0.90-0.94 per task here)."""
    results = gate_results(0.93, GATE)
    pooled = np.mean([r["retention_ci_low"] <= 93.0 <= r["retention_ci_high"] for r in results])
    assert 0.90 <= pooled <= 0.99, pooled
    for task in BASELINE:
        rows = [r["retention_tasks"][task] for r in results]
        rate = np.mean([row["ci_low"] <= 93.0 <= row["ci_high"] for row in rows])
        assert 0.87 <= rate <= 0.99, (task, rate)


# ------------------------------------------------------------------------------------------------ power


def test_ten_percent_regression_fails_and_no_regression_passes_at_the_recommended_sizes():
    """At the recommended limits (150 / 100 / 100) and the gate retention_ci_low >= 90: a 10 % regression on every
    task fails (normal approximation: 97.5 %; 97 % here), an unchanged model passes most of the time (83 %; 85 %)."""
    regressed = gate_results(0.90, GATE)
    assert np.mean([r["retention_gate"]["passed"] == 0 for r in regressed]) >= 0.9
    unchanged = gate_results(1.00, GATE)
    assert np.mean([r["retention_gate"]["passed"] == 1 for r in unchanged]) >= 0.75
    # the same sizes cannot hold a 95 % lower bound: an unchanged model would fail more often than it passes
    assert np.mean([r["retention_ci_low"] >= 95.0 for r in unchanged]) < 0.6


def test_todays_twenty_documents_cannot_tell_a_ten_percent_regression_from_none():
    """limit 20 per task: the pooled interval is about +-15 points wide, so even the 90 gate fails most unchanged
    models -- the reason the limits must grow before the gate reads a lower bound."""
    sizes = dict.fromkeys(BASELINE, 20)
    passed = []
    for seed in range(100):
        base, fin = simulated_run(seed, 1.0, sizes)
        passed.append(paired_benchmark_retention(base, fin, GATE, 0.95, BOOT, seed)["retention_gate"]["passed"])
    assert np.mean(passed) < 0.5
