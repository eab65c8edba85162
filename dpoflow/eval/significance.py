"""The exact sign test on the non-tied outcomes of a win rate, and the power of the retention gate: the smallest
regression a non-inferiority gate on a paired lower bound detects with n documents, and the documents it needs.

    p = sign_test(wins=9, losses=1)                                # 0.021484375, exact
    x = min_detectable_regression(0.5, 400)                        # % of the baseline score
    x = pooled_min_detectable_regression([(0.8, 200, 0.15), (0.5, 100, 0.1)])   # the pooled gate's
    print(detectable_regression_line(0.5, 400))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95
POWER = 0.8
EXACT_BINOMIAL_MAX = 20000  # sign test: exact integer sums up to this many non-tied outcomes, log-space above


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def z_value(confidence: float = CONFIDENCE) -> float:
    """Two-sided standard normal quantile: z = Phi^-1(1 - (1 - confidence) / 2); z_value(0.95) = 1.959964."""
    confidence = _check_confidence(confidence)
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


# ---------------------------------------------------------------------------------------------------------
# Sign test


def _count(name: str, value: Any) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}") from None
    if k != value or k < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    return k


def _binomial_half_cdf(k: int, m: int) -> float:
    """P(X <= k) for X ~ Binomial(m, 1/2) = 2^-m sum_{j=0..k} C(m, j).

    m <= EXACT_BINOMIAL_MAX: the integer sum over the shorter tail (C(m, j+1) = C(m, j) (m - j) / (j + 1)), then one
    correctly rounded int / int division. Above: the same sum in log space, log C(m, j) = sum_{i<j} log((m - i) /
    (i + 1)) (a cumulative sum), combined with log-sum-exp."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    upper = 2 * k > m  # sum the other (shorter) tail and complement: P(X <= k) = 1 - P(X <= m - k - 1)
    kk = m - k - 1 if upper else k
    if m <= EXACT_BINOMIAL_MAX:
        term, total = 1, 1
        for j in range(kk):
            term = term * (m - j) // (j + 1)
            total += term
        total_all = 1 << m
        return (total_all - total) / total_all if upper else total / total_all
    j = np.arange(kk, dtype=float)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(m - j) - np.log(j + 1))])  # log C(m, 0..kk)
    logs = log_comb - m * math.log(2.0)
    top = float(logs.max())
    tail = math.exp(top + math.log(float(np.exp(logs - top).sum())))
    return 1.0 - tail if upper else tail


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test on the non-tied outcomes (ties are dropped, the classical sign test). Under
    H0 (a win and a loss are equally likely) W ~ Binomial(m, 1/2), m = wins + losses, and

        p = min(1, 2 * P(W <= min(wins, losses))) = min(1, 2^(1-m) sum_{j=0..min(wins, losses)} C(m, j))

    (the distribution is symmetric, so doubling the smaller tail equals summing every outcome at most as likely as
    the observed one). m = 0 gives 1. sign_test(9, 1) = 2 * 11 / 1024 = 0.021484375."""
    won, lost = _count("wins", wins), _count("losses", losses)
    return min(1.0, 2.0 * _binomial_half_cdf(min(won, lost), won + lost))


def p_greater(wins: int, losses: int) -> float:
    """Exact one-sided sign test, H1: wins are more likely than losses (the final model is better):

        p = P(W >= wins) = P(W <= losses) = 2^-m sum_{j=0..losses} C(m, j),  W ~ Binomial(m = wins + losses, 1/2)

    m = 0 gives 1. p_greater(9, 1) = 11 / 1024."""
    won, lost = _count("wins", wins), _count("losses", losses)
    return _binomial_half_cdf(lost, won + lost)


# ---------------------------------------------------------------------------------------------------------
# Power of the retention gate


def _paired_variance(baseline_mean: float, paired_discordance: float | None) -> float:
    """Per-document variance of the paired difference d_i = f_i - b_i at no change: the discordant fraction pi_d
    when given (Var d = pi_d - (p0 - p1)^2 <= pi_d for 0/1 scores; for graded scores pass mean((f - b)^2)), else the
    unpaired variance 2 p0 (1 - p0) (two independent Bernoulli(p0) scores), which bounds the paired one from above
    whenever the two models' scores are non-negatively correlated, as they are on shared documents."""
    p0 = float(baseline_mean)
    if not math.isfinite(p0) or p0 <= 0:
        raise ValueError(f"baseline_mean must be > 0, got {baseline_mean!r}")
    if paired_discordance is None:
        if p0 > 1:
            raise ValueError(
                f"baseline_mean must be in (0, 1] for the unpaired Bernoulli variance, got {p0}; "
                "pass paired_discordance for graded scores"
            )
        return 2.0 * p0 * (1.0 - p0)
    v = float(paired_discordance)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"paired_discordance must be >= 0, got {paired_discordance!r}")
    return v


def _check_power(power: float) -> float:
    power = float(power)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    return power


def min_detectable_regression(
    baseline_mean: float,
    n: int,
    confidence: float = CONFIDENCE,
    power: float = POWER,
    paired_discordance: float | None = None,
) -> float:
    """Smallest relative regression (% of the baseline score) of a task that the paired retention gate detects
    with probability `power`, normal approximation:

        delta% = 100 * (z_{1-alpha/2} + z_power) * sqrt(v / n) / p0

    p0 = baseline_mean, n = documents, z_{1-alpha/2} = z_value(confidence), z_power = Phi^-1(power), v = the
    per-document variance of f_i - b_i at no change: the discordant fraction pi_d when `paired_discordance` is given,
    else the conservative unpaired 2 p0 (1 - p0). By the delta method the retention estimate R^ = mean(f)/mean(b)
    has standard error se ~ sqrt(v / n) / p0 near R = 1. Two equivalent readings:
      * a true regression of delta puts the interval's upper end below 100 % (a regression shown) with probability
        `power`: P(R^ + z se < 1 | R = 1 - delta) = Phi(delta / se - z) = power;
      * a gate "lower bound >= 100 - delta %" passes an unchanged model with probability `power`, while a model that
        lost delta fails it with probability 1 - alpha/2: a margin smaller than delta fails good models by chance.
    Approximate: it ignores the Var(d) reduction by (p0 - p1)^2 and the ratio's skew, both small near R = 1."""
    confidence, power = _check_confidence(confidence), _check_power(power)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    v = _paired_variance(baseline_mean, paired_discordance)
    z = z_value(confidence) + NormalDist().inv_cdf(power)
    return 100.0 * z * math.sqrt(v / int(n)) / float(baseline_mean)


def pooled_min_detectable_regression(
    tasks: Sequence[tuple[float, int, float | None]],
    confidence: float = CONFIDENCE,
    power: float = POWER,
) -> float:
    """The same for the pooled retention (the mean of K task ratios, each task's documents resampled within it):

        delta% = 100 * (z_{1-alpha/2} + z_power) * sqrt(sum_t v_t / (n_t p0_t^2)) / K

    over `tasks` = [(baseline_mean, n, paired_discordance or None)], v_t as in min_detectable_regression (the
    per-task standard errors add in quadrature; the tasks' documents are independent)."""
    confidence, power = _check_confidence(confidence), _check_power(power)
    if not tasks:
        raise ValueError("pooled_min_detectable_regression needs at least one task")
    total = 0.0
    for p0, n, disc in tasks:
        if int(n) != n or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        total += _paired_variance(p0, disc) / (int(n) * float(p0) ** 2)
    z = z_value(confidence) + NormalDist().inv_cdf(power)
    return 100.0 * z * math.sqrt(total) / len(tasks)


def documents_needed(
    baseline_mean: float,
    regression_pct: float,
    confidence: float = CONFIDENCE,
    power: float = POWER,
    paired_discordance: float | None = None,
) -> int:
    """Inverse of min_detectable_regression: the smallest n with min_detectable_regression(...) <= regression_pct,

        n = ceil(v * ((z_{1-alpha/2} + z_power) / (p0 * regression_pct / 100))^2)

    (v, z as in min_detectable_regression), corrected by a step either way against floating-point rounding."""
    confidence, power = _check_confidence(confidence), _check_power(power)
    delta = float(regression_pct)
    if not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"regression_pct must be > 0, got {regression_pct!r}")
    v = _paired_variance(baseline_mean, paired_discordance)
    z = z_value(confidence) + NormalDist().inv_cdf(power)
    n = max(1, math.ceil(v * (z / (float(baseline_mean) * delta / 100.0)) ** 2))
    args = (baseline_mean, confidence, power, paired_discordance)

    def mdr(k: int) -> float:
        return min_detectable_regression(args[0], k, args[1], args[2], args[3])

    while mdr(n) > delta:
        n += 1
    while n > 1 and mdr(n - 1) <= delta:
        n -= 1
    return n


def detectable_regression_line(
    baseline_mean: float,
    n: int,
    confidence: float = CONFIDENCE,
    power: float = POWER,
    paired_discordance: float | None = None,
) -> str:
    """The printed line: "with {n} documents the smallest regression this gate detects at {confidence} is {X}%
    ({power} power, baseline {p0}, {variance used})", X = min_detectable_regression(...)."""
    x = min_detectable_regression(baseline_mean, n, confidence, power, paired_discordance)
    how = (
        "unpaired variance 2p(1-p), conservative"
        if paired_discordance is None
        else f"paired, discordance {float(paired_discordance):.3g}"
    )
    return (
        f"with {int(n)} documents the smallest regression this gate detects at {confidence:.0%} is {x:.1f}% "
        f"({power:.0%} power, baseline {float(baseline_mean):.3g}, {how})"
    )
