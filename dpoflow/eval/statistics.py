"""Interval estimates and paired capability retention (the sign test and the gates' power: eval.significance).

Pure numpy + stdlib, no I/O. Every random quantity comes from a numpy generator seeded by the caller, so a result is
a function of (inputs, confidence, samples, seed).

    low, high = wilson_interval(successes=37.5, n=50)              # ties may count half
    low, high = bootstrap_mean_interval(gap_terms, 0.95, 2000, seed=0)
    low, high = bootstrap_ratio_interval(kl_sum_per_prompt, tokens_per_prompt, 0.95, 2000, seed=0)
    ret = paired_retention(baseline_scores, final_scores, 0.95, 2000, seed=0)   # {task: [score per document]}
    ok = non_inferiority(ret["pooled_ci_low"], 95.0)
    p = sign_test(wins=9, losses=1)                                # 0.021484375, exact
    x = min_detectable_regression(0.5, 400)                        # % of the baseline score
    print(detectable_regression_line(0.5, 400))

Conventions (the same as dpoflow.eval.win_rate):

* Intervals are two-sided at `confidence`; a gate uses the lower end. z = the standard normal quantile
  Phi^-1(1 - (1 - confidence) / 2) (1.95996... at 0.95).
* Percentile bootstrap: `samples` resamples of the n items (documents, prompts, pairs) drawn with replacement; the
  interval is the (alpha/2, 1 - alpha/2) quantiles, alpha = 1 - confidence, of the statistic over the resamples
  (numpy's default linear interpolation).
* Resampling is vectorized. When the items take at most MULTINOMIAL_MAX_CATEGORIES distinct values (0/1 accuracies,
  the (baseline, final) pairs of a 0/1 task: at most 4), a resample is drawn as multinomial counts over the distinct
  values, which is the same distribution as drawing items with replacement, costs O(samples x distinct values) and
  does not depend on the items' order. Otherwise an index matrix [chunk, n] is drawn with rng.integers and gathered,
  in chunks of at most CHUNK_ELEMENTS indices so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpoflow.eval.significance import CONFIDENCE, POWER, _check_confidence, min_detectable_regression, z_value

SAMPLES = 2000
FLOOR = 0.02  # both models' mean at or below this: the task is at the floor (uninformative)
CEILING = 0.98  # both models' mean at or above this: the task is at the ceiling (uninformative)
MULTINOMIAL_MAX_CATEGORIES = 64
CHUNK_ELEMENTS = 1 << 22  # indices per bootstrap chunk (32 MiB of int64)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _check_samples(samples: int) -> int:
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    return int(samples)


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    """(Q(alpha/2), Q(1 - alpha/2)) of `stats`, alpha = 1 - confidence, Q = numpy's linear-interpolation quantile
    Q(q) = x_(lo) + (h - lo) (x_(lo+1) - x_(lo)), h = (m - 1) q, lo = floor(h), over the sorted stats x_(.).
    +inf entries (a ratio whose resampled denominator is 0) are allowed: a quantile that reaches them is +inf
    (numpy would return nan for inf - inf)."""
    alpha = (1.0 - confidence) / 2.0
    stats = np.asarray(stats, dtype=float)
    if np.all(np.isfinite(stats)):
        low, high = np.quantile(stats, [alpha, 1.0 - alpha])
        return float(low), float(high)
    x = np.sort(stats)
    out = []
    for q in (alpha, 1.0 - alpha):
        h = (len(x) - 1) * q
        lo = int(math.floor(h))
        hi = min(lo + 1, len(x) - 1)
        t = h - lo
        a, b = float(x[lo]), float(x[hi])
        out.append(a if t == 0.0 or a == b else a + (b - a) * t)
    return out[0], out[1]


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(distinct rows in lexicographic order, their counts), or None when there are more than
    MULTINOMIAL_MAX_CATEGORIES. Each column is coded by its sorted distinct values, code = sum_j code_j prod_{j'>j}
    k_j' (a 1-D integer key: much faster than np.unique(axis=0)), and the keys are counted."""
    key = np.zeros(len(rows), dtype=np.int64)
    for j in range(rows.shape[1]):
        values, inverse = np.unique(rows[:, j], return_inverse=True)
        if len(values) > MULTINOMIAL_MAX_CATEGORIES:
            return None
        key = key * len(values) + inverse.reshape(-1)
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if len(first) > MULTINOMIAL_MAX_CATEGORIES:
        return None
    return rows[first], counts


def _bootstrap_means(rows: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Column means of `samples` bootstrap resamples of the rows of `rows` [n, d]: returns [samples, d] with
    out[s, j] = (1/n) sum_i rows[I_si, j], I_si ~ Uniform{0..n-1} i.i.d. (rows drawn jointly: a paired resample).

    Few distinct rows (<= MULTINOMIAL_MAX_CATEGORIES): counts C[s] ~ Multinomial(n, c_k / n) over the distinct rows
    u_k (c_k = how often u_k occurs) and out[s] = C[s] @ u / n, the same distribution. Otherwise an index matrix
    drawn in chunks of at most CHUNK_ELEMENTS indices."""
    n, d = rows.shape
    grouped = _distinct_rows(rows)
    if grouped is not None:
        unique, counts = grouped
        draws = rng.multinomial(n, counts / n, size=samples)
        return draws @ unique / n
    out = np.empty((samples, d))
    chunk = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = rows[idx].mean(axis=1)
    return out


def _scores(name: str, which: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(
            f"task {name!r}: {which} scores must be a flat list (one score per document), got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"task {name!r}: {which} scores contain a non-finite value")
    return arr


def _task_rng(seed: int, task: str) -> np.random.Generator:
    """Generator of one task: seeded by (seed, first 8 bytes of sha256(task name)), so a task's resamples do not
    change when other tasks are added, removed or reordered."""
    key = int.from_bytes(hashlib.sha256(task.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def _ratio_pct(final_mean: np.ndarray, baseline_mean: np.ndarray) -> np.ndarray:
    """100 * final / baseline elementwise; baseline 0 gives 100 when final is 0 too (nothing to lose, nothing lost,
    the convention of dpoflow.evaluate.retention) and +inf when final > 0 (no finite ratio)."""
    final_mean = np.asarray(final_mean, dtype=float)
    baseline_mean = np.asarray(baseline_mean, dtype=float)
    zero = baseline_mean == 0
    safe = np.where(zero, 1.0, baseline_mean)
    return np.where(zero, np.where(final_mean == 0, 100.0, np.inf), 100.0 * (final_mean / safe))


# ---------------------------------------------------------------------------------------------------------
# Intervals


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion p = successes / n:

        center = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        (low, high) = (center - half, center + half), clipped to [0, 1]

    z = z_value(confidence). `successes` may be fractional (ties counted half: wins + 0.5 ties), 0 <= successes <= n.
    n = 0 gives (0, 1): no information. Unlike the Wald interval p +- z sqrt(p(1-p)/n), it never collapses to a
    point at p = 0 or 1 and keeps close to nominal coverage for small n."""
    z = z_value(confidence)
    successes, n = float(successes), float(n)
    if not (math.isfinite(successes) and math.isfinite(n)) or n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends: no rounding residue at p = 0 or 1
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def bootstrap_mean_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, samples: int = SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (one value per item: KL of a prompt, a held-out pair's
    gap term, ...):

        mean*_s = (1/n) sum_i v[I_si],  I_si ~ Uniform{0..n-1} i.i.d., s = 1..samples
        (low, high) = (Q(alpha/2), Q(1 - alpha/2)) of mean*_s,  alpha = 1 - confidence

    drawn from np.random.default_rng(seed) (see the module docstring for the vectorized draw). Raises ValueError
    for no values or a non-finite value."""
    confidence = _check_confidence(confidence)
    samples, seed = _check_samples(samples), _check_seed(seed)
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ValueError("bootstrap_mean_interval needs at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError("bootstrap_mean_interval: values contain a non-finite value")
    means = _bootstrap_means(arr[:, None], samples, np.random.default_rng(seed))[:, 0]
    return _percentile_interval(means, confidence)


def bootstrap_ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of a ratio of sums over items (clusters) resampled together:

        ratio*_s = sum_i x[I_si] / sum_i y[I_si],  I_si ~ Uniform{0..n-1} i.i.d., s = 1..samples

    e.g. the mean per-token KL over prompts: x_i = the KL summed over prompt i's sampled tokens, y_i = its token
    count, so a prompt's samples move together (they share the prompt) and long completions weigh by their tokens,
    as in the point estimate sum x / sum y. Drawn from np.random.default_rng(seed) (the vectorized draw of the module
    docstring). Needs y_i >= 0 with sum y > 0; a resample whose denominator is 0 gives +inf (0 / 0: 0)."""
    confidence = _check_confidence(confidence)
    samples, seed = _check_samples(samples), _check_seed(seed)
    x = np.asarray(numerators, dtype=float).reshape(-1)
    y = np.asarray(denominators, dtype=float).reshape(-1)
    if x.size == 0 or x.size != y.size:
        raise ValueError(f"bootstrap_ratio_interval needs equal, non-empty lists, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(y < 0) or y.sum() <= 0:
        raise ValueError("bootstrap_ratio_interval: values must be finite, denominators >= 0 with a positive sum")
    means = _bootstrap_means(np.stack([x, y], axis=1), samples, np.random.default_rng(seed))
    num, den = means[:, 0], means[:, 1]
    zero = den == 0
    ratios = np.where(zero, np.where(num == 0, 0.0, np.inf), num / np.where(zero, 1.0, den))
    return _percentile_interval(ratios, confidence)


# ---------------------------------------------------------------------------------------------------------
# Paired retention


def paired_retention(
    baseline: Mapping[str, Sequence[float]],
    final: Mapping[str, Sequence[float]],
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = 0,
    *,
    floor: float = FLOOR,
    ceiling: float = CEILING,
    power: float = POWER,
) -> dict:
    """Capability retention of a final model against a baseline scored on the SAME documents, per task and pooled.

    Inputs: {task: [score of document i]} for both models, document i the same document in both lists (scores are
    accuracy-like, in [0, 1]: 0/1 correctness, pass@1, ...). Per task, with b_i, f_i the two scores of document i:

        baseline_mean = mean(b),  final_mean = mean(f),  retention = 100 * final_mean / baseline_mean
        discordant    = #{i : f_i != b_i}
        interval      = percentile bootstrap of 100 * mean(f[I]) / mean(b[I]), the SAME indices I for both models
                        (documents resampled jointly: the pairing cancels the documents' shared difficulty)

    A resample whose baseline mean is 0 gives +inf (or 100 when its final mean is 0 too), so the upper bound can be
    inf for a task that rests on a handful of baseline-correct documents. Each task draws from its own generator,
    seeded by (seed, task name): adding or removing a task does not change another task's interval.

    Informative rule. A task is uninformative (reported, but kept out of the pooled value) when
      * it has no documents, or the baseline mean is 0 (no ratio); or
      * both means are <= `floor` (0.02): at the floor a ratio rests on one or two documents (1 -> 2 correct is
        200 %, 1 -> 0 is 0 %), pure noise that would dominate the pooled interval and fail or pass the gate by luck; or
      * both means are >= `ceiling` (0.98): nothing can be lost, the ratio is ~100 % with almost no variance, and
        averaging it in drags the pooled value towards 100 % and narrows its interval without evidence; or
      * no document is discordant (f_i == b_i for every i): the ratio is exactly 100 % and every paired resample
        repeats it, a zero-width interval that is an artefact (resampling cannot produce a disagreement that was not
        observed) and would shrink the pooled interval as if the task had been measured without error.
    "Both" matters: a task where one model left the floor or ceiling moved, and is informative.

    Pooled retention (over the informative tasks, K of them) = the mean of the per-task ratios, (1/K) sum_t R_t,
    with a stratified bootstrap: in each resample every task's documents are resampled within the task (the same
    draws as its own interval), every R_t is recomputed, and the K ratios are averaged; the interval is the
    percentile interval of that average. Why: (1) it is the definition dpoflow.evaluate.retention and the
    `evaluate.min_retention` gate already use (mean of per-benchmark retention), so the threshold keeps its meaning;
    (2) every task weighs the same whatever its size or difficulty, whereas a ratio of summed scores would let a
    large, easy task hide a collapse on a small one; (3) the tasks are fixed, not sampled, and documents are the
    sampling unit, so resampling within tasks (not across them) is the design's own variance. As with the old
    overall mean, a gain on one task offsets a loss on another: read the per-task intervals too.

    Per informative task, `min_detectable_regression` = min_detectable_regression(baseline_mean, n, confidence,
    power, paired_discordance = mean((f - b)^2)), the observed paired variance (the discordant fraction for 0/1).

    Returns {"confidence", "samples", "seed", "floor", "ceiling",
             "tasks": {task: {"n", "baseline_mean", "final_mean", "retention", "ci_low", "ci_high", "discordant",
                              "discordant_fraction", "informative", "reason", "min_detectable_regression"}},
             "informative_tasks": [names], "excluded_tasks": {name: reason},
             "pooled_retention", "pooled_ci_low", "pooled_ci_high", "pooled_note"}
    (pooled values None, with a note, when no task is informative). Raises ValueError naming the task when a task is
    in one mapping only, the two lists differ in length, or a score is not finite."""
    confidence = _check_confidence(confidence)
    samples, seed = _check_samples(samples), _check_seed(seed)
    only_base = sorted(set(baseline) - set(final))
    only_final = sorted(set(final) - set(baseline))
    if only_base or only_final:
        parts = [f"task {t!r} has baseline scores but no final scores" for t in only_base]
        parts += [f"task {t!r} has final scores but no baseline scores" for t in only_final]
        raise ValueError("; ".join(parts))
    tasks: dict[str, dict] = {}
    resampled: dict[str, np.ndarray] = {}
    for name in sorted(baseline):
        b = _scores(name, "baseline", baseline[name])
        f = _scores(name, "final", final[name])
        if len(b) != len(f):
            raise ValueError(
                f"task {name!r}: {len(b)} baseline scores but {len(f)} final scores; paired retention "
                "needs one score per document from each model, in the same document order"
            )
        n = len(b)
        row: dict[str, Any] = {
            "n": n,
            "baseline_mean": None,
            "final_mean": None,
            "retention": None,
            "ci_low": None,
            "ci_high": None,
            "discordant": 0,
            "discordant_fraction": None,
            "informative": False,
            "reason": None,
            "min_detectable_regression": None,
        }
        tasks[name] = row
        if n == 0:
            row["reason"] = "no documents"
            continue
        bm, fm = float(b.mean()), float(f.mean())
        discordant = int(np.count_nonzero(b != f))
        row.update(baseline_mean=bm, final_mean=fm, discordant=discordant, discordant_fraction=discordant / n)
        if bm == 0:
            row["reason"] = (
                f"baseline mean is 0 (final {fm:.4g}): no ratio" if fm > 0 else "both models score 0: no ratio"
            )
            continue
        row["retention"] = 100.0 * (fm / bm)  # x / x is exactly 1: equal means give exactly 100
        means = _bootstrap_means(np.stack([b, f], axis=1), samples, _task_rng(seed, name))
        ratios = _ratio_pct(means[:, 1], means[:, 0])
        row["ci_low"], row["ci_high"] = _percentile_interval(ratios, confidence)
        if bm <= floor and fm <= floor:
            row["reason"] = f"both means <= {floor:g} (floor): the ratio rests on a few documents"
        elif bm >= ceiling and fm >= ceiling:
            row["reason"] = f"both means >= {ceiling:g} (ceiling): nothing to lose, no evidence either way"
        elif discordant == 0:
            row["reason"] = "no discordant documents: the same score on every document, a zero-width interval"
        else:
            row["informative"] = True
            resampled[name] = ratios
            row["min_detectable_regression"] = min_detectable_regression(
                bm, n, confidence, power, paired_discordance=float(np.mean((f - b) ** 2))
            )
    informative = [t for t in tasks if tasks[t]["informative"]]
    out: dict[str, Any] = {
        "confidence": confidence,
        "samples": samples,
        "seed": seed,
        "floor": floor,
        "ceiling": ceiling,
        "tasks": tasks,
        "informative_tasks": informative,
        "excluded_tasks": {t: r["reason"] for t, r in tasks.items() if not r["informative"]},
    }
    if not informative:
        return {
            **out,
            "pooled_retention": None,
            "pooled_ci_low": None,
            "pooled_ci_high": None,
            "pooled_note": "no informative task: pooled retention undefined (every task is empty, at the floor "
            "or ceiling, or identical between the models)",
        }
    pooled = float(np.mean([tasks[t]["retention"] for t in informative]))
    pooled_draws = np.mean(np.stack([resampled[t] for t in informative]), axis=0)
    low, high = _percentile_interval(pooled_draws, confidence)
    return {
        **out,
        "pooled_retention": pooled,
        "pooled_ci_low": low,
        "pooled_ci_high": high,
        "pooled_note": f"mean of {len(informative)} informative task(s)' retention, stratified bootstrap",
    }


def non_inferiority(ci_low: float | None, threshold: float) -> bool:
    """Non-inferiority gate: pass iff ci_low >= threshold (e.g. the pooled retention's lower bound >= 95 %).
    A missing or nan lower bound fails (nothing measured, nothing shown)."""
    if ci_low is None:
        return False
    ci_low = float(ci_low)
    return not math.isnan(ci_low) and ci_low >= float(threshold)
