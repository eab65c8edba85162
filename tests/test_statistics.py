"""Tests for dpoflow.eval.statistics (issue 22): interval coverage by simulation, the paired retention gate's power,
exact sign-test values, the informative rule, validation and determinism. Fast: small bootstrap counts, binary
scores take the multinomial path; the whole file runs in a few seconds."""

import math

import numpy as np
import pytest

from dpoflow.eval import significance as es
from dpoflow.eval import statistics
from dpoflow.eval.significance import (
    detectable_regression_line,
    documents_needed,
    min_detectable_regression,
    p_greater,
    sign_test,
    z_value,
)
from dpoflow.eval.statistics import bootstrap_mean_interval, non_inferiority, paired_retention, wilson_interval

SEEDS = range(200)
BOOT = 300  # bootstrap resamples in the simulations: enough for a 95% percentile interval's coverage


def simulate_pair(rng, n, p0, retention, discordance):
    """0/1 scores of n documents for a baseline with accuracy p0 and a final model with accuracy retention * p0,
    disagreeing on a fraction `discordance` of the documents. Cells: P(b=1, f=0) = x, P(b=0, f=1) = y with
    x + y = discordance and x - y = p0 - p1."""
    p1 = retention * p0
    x, y = (discordance + p0 - p1) / 2, (discordance - p0 + p1) / 2
    cells = np.array([p0 - x, x, y, 1 - p0 - y])  # (1,1), (1,0), (0,1), (0,0)
    assert np.all(cells >= 0) and cells.sum() == pytest.approx(1)
    kind = np.repeat(np.arange(4), rng.multinomial(n, cells))  # documents are exchangeable: order is irrelevant
    return (kind <= 1).astype(float), ((kind == 0) | (kind == 2)).astype(float)


def lower_bounds(n, p0, retention, discordance, seeds=SEEDS, samples=BOOT):
    """Per seed: (ci_low, ci_high) of the single task's paired retention."""
    out = []
    for seed in seeds:
        b, f = simulate_pair(np.random.default_rng(10_000 + seed), n, p0, retention, discordance)
        row = paired_retention({"t": b}, {"t": f}, 0.95, samples, seed)["tasks"]["t"]
        out.append((row["ci_low"], row["ci_high"]))
    return np.array(out)


# ------------------------------------------------------------------------------------------------ (a) coverage


@pytest.mark.parametrize("p,n", [(0.5, 20), (0.1, 50), (0.3, 100), (0.9, 200), (0.02, 400)])
def test_wilson_exact_coverage(p, n):
    """Exact coverage, no simulation: sum over k of Binomial(n, p).pmf(k) * [low(k) <= p <= high(k)]."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    covered = sum(w for k, w in enumerate(pmf) if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1])
    assert 0.90 <= covered <= 0.99, covered


def test_wilson_simulated_coverage_with_half_counted_ties():
    """Outcomes win / tie / loss (0.4, 0.2, 0.4): true rate 0.5 with ties counting half."""
    truth, hits = 0.5, 0
    for seed in SEEDS:
        counts = np.random.default_rng(seed).multinomial(80, [0.4, 0.2, 0.4])
        low, high = wilson_interval(counts[0] + 0.5 * counts[1], 80)
        hits += low <= truth <= high
    # ties shrink the variance below p(1-p), so Wilson is conservative here: coverage >= nominal, not far above
    assert 0.93 <= hits / len(SEEDS) <= 1.0


def test_wilson_known_values_and_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # textbook value
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(3, 10, confidence=1.0)


@pytest.mark.parametrize(
    "draw,truth",
    [
        (lambda rng, n: rng.normal(0.3, 1.0, n), 0.3),
        (lambda rng, n: rng.gamma(2.0, 0.5, n), 1.0),  # skewed, like KL per prompt
    ],
)
def test_bootstrap_mean_coverage(draw, truth):
    hits = 0
    for seed in SEEDS:
        values = draw(np.random.default_rng(5_000 + seed), 200)
        low, high = bootstrap_mean_interval(values, 0.95, BOOT, seed)
        hits += low <= truth <= high
    assert 0.90 <= hits / len(SEEDS) <= 0.99


def test_bootstrap_mean_interval_width_matches_standard_error():
    values = np.random.default_rng(1).normal(0, 2.0, 400)
    low, high = bootstrap_mean_interval(values, 0.95, 4000, 0)
    se = values.std() / math.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.08)
    assert low < values.mean() < high


@pytest.mark.parametrize("retention,discordance", [(1.0, 0.2), (0.9, 0.2), (0.8, 0.4)])
def test_paired_retention_coverage_binary(retention, discordance):
    """Paired 0/1 scores, n = 200 documents, baseline accuracy 0.5: the 95% interval covers the true retention."""
    bounds = lower_bounds(200, 0.5, retention, discordance)
    truth = 100 * retention
    rate = np.mean((bounds[:, 0] <= truth) & (truth <= bounds[:, 1]))
    assert 0.90 <= rate <= 0.99, rate


def test_paired_retention_coverage_graded_scores_index_path():
    """Continuous scores (every pair distinct: the index-matrix path): b ~ Beta(2, 2), f = b * u, u ~ U(0.8, 1)
    independent of b, so E f / E b = 0.9 exactly."""
    hits = 0
    for seed in SEEDS:
        rng = np.random.default_rng(20_000 + seed)
        b = rng.beta(2, 2, 200)
        f = b * rng.uniform(0.8, 1.0, 200)
        row = paired_retention({"t": b}, {"t": f}, 0.95, BOOT, seed)["tasks"]["t"]
        hits += row["ci_low"] <= 90.0 <= row["ci_high"]
    assert 0.90 <= hits / len(SEEDS) <= 0.99


def test_pooled_retention_coverage():
    """Three informative tasks with true retention 90, 100 and 95 %: the pooled truth is their mean, 95 %."""
    specs = {"a": (0.5, 0.9, 0.2), "b": (0.3, 1.0, 0.15), "c": (0.7, 0.95, 0.25)}
    hits = 0
    for seed in SEEDS:
        rng = np.random.default_rng(30_000 + seed)
        base, fin = {}, {}
        for name, (p0, r, d) in specs.items():
            base[name], fin[name] = simulate_pair(rng, 150, p0, r, d)
        out = paired_retention(base, fin, 0.95, BOOT, seed)
        assert out["informative_tasks"] == ["a", "b", "c"]
        hits += out["pooled_ci_low"] <= 95.0 <= out["pooled_ci_high"]
    assert 0.90 <= hits / len(SEEDS) <= 0.99


def test_pairing_narrows_the_interval():
    """The same documents scored twice (discordance 0.1) vs the baseline against an independent copy: the paired
    interval is much narrower, which is the point of resampling documents jointly."""
    rng = np.random.default_rng(3)
    b, f = simulate_pair(rng, 400, 0.5, 1.0, 0.1)
    paired = paired_retention({"t": b}, {"t": f}, 0.95, 2000, 0)["tasks"]["t"]
    shuffled = paired_retention({"t": b}, {"t": rng.permutation(f)}, 0.95, 2000, 0)["tasks"]["t"]
    assert (paired["ci_high"] - paired["ci_low"]) < 0.6 * (shuffled["ci_high"] - shuffled["ci_low"])


# ------------------------------------------------------------------------------------------------ (b) gate power


def test_ten_percent_regression_at_400_documents_fails_the_gate():
    """Baseline accuracy 0.5, true retention 90 %, n = 400: the 95 % gate (lower bound >= 95) catches it."""
    bounds = lower_bounds(400, 0.5, 0.9, 0.2, seeds=range(100))
    assert np.mean([not non_inferiority(low, 95.0) for low in bounds[:, 0]]) >= 0.9


def test_no_regression_passes_the_gate_at_large_n():
    """No change, discordance 0.2, baseline 0.5: documents_needed(0.5, 5 %) ~ 2,500 documents; at 4,000 an unchanged
    model passes the 95 % gate most of the time (normal approximation: ~94 %)."""
    assert documents_needed(0.5, 5.0, paired_discordance=0.2) < 4000
    bounds = lower_bounds(4000, 0.5, 1.0, 0.2, seeds=range(100))
    assert np.mean([non_inferiority(low, 95.0) for low in bounds[:, 0]]) >= 0.85
    # and with only 100 documents the same unchanged model fails the gate most of the time: too few documents
    few = lower_bounds(100, 0.5, 1.0, 0.2, seeds=range(100))
    assert np.mean([non_inferiority(low, 95.0) for low in few[:, 0]]) < 0.5


def test_min_detectable_regression_has_the_stated_power():
    """At a true regression equal to the formula's delta, the paired interval's upper end falls below 100 % in about
    `power` (0.8) of the runs; and a gate with margin delta passes an unchanged model about as often."""
    delta = min_detectable_regression(0.5, 400, 0.95, 0.8, paired_discordance=0.2)
    assert delta == pytest.approx(100 * (1.959964 + 0.841621) * math.sqrt(0.2 / 400) / 0.5, rel=1e-6)
    regressed = lower_bounds(400, 0.5, 1 - delta / 100, 0.2)
    assert 0.70 <= np.mean(regressed[:, 1] < 100.0) <= 0.92
    unchanged = lower_bounds(400, 0.5, 1.0, 0.2)
    assert 0.70 <= np.mean([non_inferiority(low, 100 - delta) for low in unchanged[:, 0]]) <= 0.92


def test_power_formula_values_and_inverse():
    # unpaired: 100 * 2.8016 * sqrt(2 * 0.25 / 400) / 0.5 = 19.81 %
    assert min_detectable_regression(0.5, 400) == pytest.approx(19.8102, abs=1e-3)
    # more documents, a higher baseline, a smaller discordance: a smaller detectable regression
    assert min_detectable_regression(0.5, 1600) == pytest.approx(min_detectable_regression(0.5, 400) / 2)
    assert min_detectable_regression(0.8, 400) < min_detectable_regression(0.5, 400)
    assert min_detectable_regression(0.5, 400, paired_discordance=0.1) < min_detectable_regression(0.5, 400)
    for p0, delta, disc in [(0.5, 5.0, None), (0.3, 10.0, 0.15), (0.9, 2.0, 0.05), (0.05, 50.0, None)]:
        n = documents_needed(p0, delta, paired_discordance=disc)
        assert min_detectable_regression(p0, n, paired_discordance=disc) <= delta
        assert n == 1 or min_detectable_regression(p0, n - 1, paired_discordance=disc) > delta
    line = detectable_regression_line(0.5, 400)
    assert line.startswith("with 400 documents the smallest regression this gate detects at 95% is 19.8%")
    with pytest.raises(ValueError):
        min_detectable_regression(0.0, 400)
    with pytest.raises(ValueError):
        documents_needed(0.5, 0.0)


# ------------------------------------------------------------------------------------------------ (c) sign test


def test_sign_test_hand_computed_values():
    assert sign_test(9, 1) == 0.021484375  # 2 * (1 + 10) / 1024
    assert sign_test(1, 9) == 0.021484375
    assert p_greater(9, 1) == 11 / 1024
    assert p_greater(1, 9) == 1 - 1 / 1024  # P(W >= 1), m = 10
    assert sign_test(10, 0) == 2 / 1024
    assert sign_test(0, 7) == 2 / 128
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0 and p_greater(0, 0) == 1.0
    assert sign_test(3, 2) == 1.0  # 2 * P(W <= 2) = 2 * 16/32 -> capped at 1
    # m = 20, 15 wins: P(W <= 5) = (1 + 20 + 190 + 1140 + 4845 + 15504) / 2^20
    assert sign_test(15, 5) == pytest.approx(2 * 21700 / 2**20, rel=1e-15)
    assert p_greater(15, 5) == pytest.approx(21700 / 2**20, rel=1e-15)


def test_sign_test_large_counts_exact_and_log_space_agree(monkeypatch):
    exact = [es._binomial_half_cdf(k, 20000) for k in (9700, 9990, 10040)]
    monkeypatch.setattr(es, "EXACT_BINOMIAL_MAX", 0)  # force the log-space sum
    logspace = [es._binomial_half_cdf(k, 20000) for k in (9700, 9990, 10040)]
    assert logspace == pytest.approx(exact, rel=1e-9)
    # normal approximation check far above the exact range: z = 500 / sqrt(1e6 / 4) = 1 -> two-sided ~ 0.3173
    assert sign_test(500_250, 499_750) == pytest.approx(0.6171, abs=2e-3)
    assert sign_test(501_000, 499_000) == pytest.approx(2 * (1 - 0.97725), abs=2e-3)


def test_sign_test_validation():
    for bad in [(-1, 3), (2.5, 3), ("x", 1)]:
        with pytest.raises(ValueError):
            sign_test(*bad)
    assert sign_test(np.int64(9), 1.0) == 0.021484375


# ------------------------------------------------------------------------------------------------ (d) informative


def test_uninformative_tasks_flagged_and_excluded_from_pooled():
    rng = np.random.default_rng(0)
    b_ok, f_ok = simulate_pair(rng, 300, 0.5, 0.9, 0.2)
    floor_b = np.zeros(300)
    floor_b[:3] = 1  # 0.01
    floor_f = np.zeros(300)
    floor_f[5:11] = 1  # 0.02: 200 %, but noise
    ceil_b = np.ones(300)
    ceil_b[:2] = 0  # 0.993
    ceil_f = np.ones(300)
    ceil_f[2:5] = 0  # 0.99
    same = (rng.random(300) < 0.6).astype(float)
    moved_b = np.zeros(300)
    moved_b[:3] = 1  # 0.01 -> 0.3: left the floor, informative
    moved_f = np.zeros(300)
    moved_f[:90] = 1
    base = {
        "ok": b_ok,
        "floor": floor_b,
        "ceiling": ceil_b,
        "same": same,
        "zero": np.zeros(300),
        "empty": [],
        "moved": moved_b,
    }
    fin = {
        "ok": f_ok,
        "floor": floor_f,
        "ceiling": ceil_f,
        "same": same.copy(),
        "zero": np.full(300, 0.0),
        "empty": [],
        "moved": moved_f,
    }
    out = paired_retention(base, fin, 0.95, 500, 0)
    tasks = out["tasks"]
    assert out["informative_tasks"] == ["moved", "ok"]
    assert set(out["excluded_tasks"]) == {"floor", "ceiling", "same", "zero", "empty"}
    assert "floor" in tasks["floor"]["reason"] and tasks["floor"]["retention"] == pytest.approx(200.0)
    assert "ceiling" in tasks["ceiling"]["reason"]
    assert "discordant" in tasks["same"]["reason"] and tasks["same"]["retention"] == 100.0
    assert (tasks["same"]["ci_low"], tasks["same"]["ci_high"]) == (100.0, 100.0)  # the degenerate interval
    assert tasks["zero"]["retention"] is None and tasks["empty"]["n"] == 0
    assert tasks["ok"]["informative"] and tasks["ok"]["min_detectable_regression"] > 0
    assert out["pooled_retention"] == pytest.approx((tasks["ok"]["retention"] + tasks["moved"]["retention"]) / 2)
    # the pooled value does not depend on the excluded tasks at all (their draws are separate)
    alone = paired_retention({k: base[k] for k in ("ok", "moved")}, {k: fin[k] for k in ("ok", "moved")}, 0.95, 500, 0)
    assert (alone["pooled_retention"], alone["pooled_ci_low"], alone["pooled_ci_high"]) == (
        out["pooled_retention"],
        out["pooled_ci_low"],
        out["pooled_ci_high"],
    )
    # a task's interval does not depend on which other tasks are present
    assert alone["tasks"]["ok"]["ci_low"] == tasks["ok"]["ci_low"]


def test_no_informative_task_leaves_pooled_undefined_and_the_gate_fails():
    same = [1.0, 0.0, 1.0, 1.0]
    out = paired_retention({"a": same}, {"a": list(same)}, 0.95, 200, 0)
    assert out["pooled_retention"] is None and out["pooled_ci_low"] is None and "no informative" in out["pooled_note"]
    assert non_inferiority(out["pooled_ci_low"], 95.0) is False


def test_small_baseline_resamples_give_an_infinite_upper_bound_not_nan():
    b = np.zeros(20)
    b[0] = 1  # one baseline-correct document
    f = np.zeros(20)
    f[[0, 1, 2]] = 1
    row = paired_retention({"t": b}, {"t": f}, 0.95, 2000, 0)["tasks"]["t"]
    assert row["informative"] and row["retention"] == pytest.approx(300.0)
    assert row["ci_high"] == math.inf and math.isfinite(row["ci_low"])


def test_non_inferiority_semantics():
    assert non_inferiority(95.0, 95.0) and non_inferiority(96.1, 95.0)
    assert not non_inferiority(94.99, 95.0)
    assert not non_inferiority(None, 95.0) and not non_inferiority(float("nan"), 95.0)


# ------------------------------------------------------------------------------------------------ (e) validation


def test_mismatched_lengths_raise_naming_the_task():
    with pytest.raises(ValueError, match="'arc_easy'.*3 baseline scores but 2 final"):
        paired_retention({"ok": [1, 0], "arc_easy": [1, 0, 1]}, {"ok": [1, 1], "arc_easy": [1, 0]})


def test_task_in_one_mapping_only_raises_naming_it():
    with pytest.raises(ValueError, match="'gsm8k'"):
        paired_retention({"a": [1, 0], "gsm8k": [1]}, {"a": [1, 1]})
    with pytest.raises(ValueError, match="'extra'"):
        paired_retention({"a": [1, 0]}, {"a": [1, 1], "extra": [0]})


def test_bad_scores_and_arguments_raise():
    with pytest.raises(ValueError, match="'a'"):
        paired_retention({"a": [1, float("nan")]}, {"a": [1, 1]})
    with pytest.raises(ValueError):
        paired_retention({"a": [1, 0]}, {"a": [1, 1]}, samples=0)
    with pytest.raises(ValueError):
        bootstrap_mean_interval([], 0.95, 100, 0)
    with pytest.raises(ValueError):
        bootstrap_mean_interval([1.0, math.inf], 0.95, 100, 0)


# ------------------------------------------------------------------------------------------------ (f) determinism


def test_deterministic_for_a_fixed_seed_and_seed_sensitive():
    rng = np.random.default_rng(7)
    values = rng.gamma(2.0, 1.0, 500)
    assert bootstrap_mean_interval(values, 0.95, 1000, 3) == bootstrap_mean_interval(values, 0.95, 1000, 3)
    assert bootstrap_mean_interval(values, 0.95, 1000, 3) != bootstrap_mean_interval(values, 0.95, 1000, 4)
    b, f = simulate_pair(rng, 300, 0.6, 0.95, 0.2)
    g = rng.random(300)
    args = ({"x": b, "g": g}, {"x": f, "g": g * 0.9}, 0.95, 800, 11)
    first, second = paired_retention(*args), paired_retention(*args)
    assert first == second
    assert paired_retention(*args[:4], 12)["pooled_ci_low"] != first["pooled_ci_low"]
    # lists and arrays give the same answer; binary tasks do not depend on the documents' order
    as_lists = paired_retention(
        {"x": b.tolist(), "g": g.tolist()}, {"x": f.tolist(), "g": (g * 0.9).tolist()}, 0.95, 800, 11
    )
    assert as_lists == first
    order = rng.permutation(300)
    shuffled = paired_retention({"x": b[order]}, {"x": f[order]}, 0.95, 800, 11)["tasks"]["x"]
    assert (shuffled["ci_low"], shuffled["ci_high"]) == (first["tasks"]["x"]["ci_low"], first["tasks"]["x"]["ci_high"])


def test_multinomial_and_index_paths_agree(monkeypatch):
    """The two vectorized draws sample the same distribution: forcing the index matrix on 0/1 data moves the
    interval by no more than bootstrap noise."""
    b, f = simulate_pair(np.random.default_rng(5), 400, 0.5, 0.9, 0.2)
    fast = paired_retention({"t": b}, {"t": f}, 0.95, 4000, 0)["tasks"]["t"]
    monkeypatch.setattr(statistics, "MULTINOMIAL_MAX_CATEGORIES", 0)
    monkeypatch.setattr(statistics, "CHUNK_ELEMENTS", 50_000)  # several chunks
    slow = paired_retention({"t": b}, {"t": f}, 0.95, 4000, 0)["tasks"]["t"]
    assert slow["ci_low"] == pytest.approx(fast["ci_low"], abs=1.0)
    assert slow["ci_high"] == pytest.approx(fast["ci_high"], abs=1.0)


def test_z_value():
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_value(0.90) == pytest.approx(1.644854, abs=1e-6)
