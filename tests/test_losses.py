"""Tests for dpoflow.core.losses against independent numpy float64 formulas."""

import math

import mlx.core as mx
import numpy as np
import pytest

from dpoflow.core.batching import ChosenRejected
from dpoflow.core.losses import (
    bradley_terry_loss,
    dpo_loss,
    heldout_preference_gap,
    normalize_by_length,
    preference_stats,
    sft_loss,
)
from dpoflow.runtime.params import LOSS_TYPES


def dl(pc, pr, rc, rr, beta, **kw):
    """dpo_loss on the four log-prob arrays: (losses, chosen rewards, rejected rewards)."""
    out = dpo_loss(ChosenRejected(pc, pr), ChosenRejected(rc, rr), beta, **kw)
    return out.losses, out.rewards.chosen, out.rewards.rejected


def logsig64(x):
    return -np.logaddexp(0.0, -x)


def numpy_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type in ("sigmoid", "conservative"):
        return -(1 - eps) * logsig64(beta * h) - eps * logsig64(-beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -logsig64(beta * h) - eps * -logsig64(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    raise AssertionError(loss_type)


def random_logps(seed, n=64):
    rng = np.random.default_rng(seed)
    return [-rng.uniform(5, 80, size=n).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_equals_reference(loss_type):
    pc, pr, _, _ = random_logps(0)
    losses, cr, rr = dl(
        mx.array(pc), mx.array(pr), mx.array(pc), mx.array(pr), beta=0.1, loss_type=loss_type, label_smoothing=0.1
    )
    assert np.all(np.asarray(cr) == 0) and np.all(np.asarray(rr) == 0)
    if loss_type in ("sigmoid", "conservative"):
        np.testing.assert_allclose(np.asarray(losses), math.log(2), rtol=1e-6)
    plain = dl(mx.array(pc), mx.array(pr), mx.array(pc), mx.array(pr), beta=0.1)[0]
    np.testing.assert_allclose(np.asarray(plain), math.log(2), rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.05)])
def test_matches_numpy(loss_type, beta, eps):
    pc, pr, rc, rr = random_logps(1)
    losses, cr, rj = dl(*(mx.array(a) for a in (pc, pr, rc, rr)), beta=beta, loss_type=loss_type, label_smoothing=eps)
    f64 = [a.astype(np.float64) for a in (pc, pr, rc, rr)]
    expected = numpy_dpo(*f64, beta, loss_type, eps)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cr), beta * (f64[0] - f64[2]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rj), beta * (f64[1] - f64[3]), rtol=1e-5, atol=1e-5)


def test_robust_with_zero_smoothing_is_sigmoid():
    args = [mx.array(a) for a in random_logps(2)]
    a = dl(*args, beta=0.3, loss_type="robust")[0]
    b = dl(*args, beta=0.3, loss_type="sigmoid")[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_finite_including_extremes(loss_type):
    pc, pr, rc, rr = random_logps(3, n=6)
    pc[0], pr[0] = 1e4, -1e4  # huge margins: log-sigmoid must not overflow
    pc[1], pr[1] = -1e4, 1e4

    def f(pc_, pr_):
        return dl(pc_, pr_, mx.array(rc), mx.array(rr), beta=0.5, loss_type=loss_type, label_smoothing=0.1)[0].mean()

    value, grads = mx.value_and_grad(f, argnums=(0, 1))(mx.array(pc), mx.array(pr))
    assert np.isfinite(float(value))
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_rewards_carry_no_gradient():
    pc, pr, rc, rr = (mx.array(a) for a in random_logps(4, n=3))
    g = mx.grad(lambda x: dl(x, pr, rc, rr, beta=0.1)[1].sum())(pc)
    assert np.all(np.asarray(g) == 0)


def test_invalid_arguments():
    a = mx.zeros((2,))
    with pytest.raises(ValueError, match="loss_type"):
        dl(a, a, a, a, 0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dl(a, a, a, a, 0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dl(a, a, a, a, 0.0)


def test_normalize_and_sft():
    sums = mx.array([-10.0, -3.0, 0.0])
    n = mx.array([5.0, 1.0, 0.0])
    np.testing.assert_allclose(np.asarray(normalize_by_length(sums, n)), [-2.0, -3.0, 0.0])
    np.testing.assert_allclose(float(sft_loss(sums, n)), 13.0 / 6.0, rtol=1e-6)


def test_preference_stats_and_gap():
    cr = mx.array([1.0, 0.5, 0.0, -1.0])
    rr = mx.array([0.0, 0.5, 1.0, -2.0])
    stats = preference_stats(cr, rr)
    assert stats["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # tie counts 0.5
    assert stats["margin_mean"] == pytest.approx((1 + 0 - 1 + 1) / 4)
    assert stats["chosen_reward_mean"] == pytest.approx(0.125)
    assert stats["rejected_reward_mean"] == pytest.approx(-0.125)
    m = np.array([0.0, 2.0, -1.0, 30.0])
    expected = np.mean(2 / (1 + np.exp(-m)) - 1)
    assert heldout_preference_gap(mx.array(m.astype(np.float32))) == pytest.approx(expected, rel=1e-6)
    assert heldout_preference_gap(np.zeros(5)) == 0.0


def test_bradley_terry_matches_numpy():
    rng = np.random.default_rng(5)
    rc, rr, margin = (rng.normal(size=16).astype(np.float32) for _ in range(3))
    for m, coef in [(None, 0.0), (margin, 0.0), (margin, 0.01)]:
        got = float(bradley_terry_loss(mx.array(rc), mx.array(rr), None if m is None else mx.array(m), coef))
        d = rc.astype(np.float64) - rr - (0 if m is None else m)
        expected = np.mean(-logsig64(d)) + coef * np.mean((rc.astype(np.float64) + rr) ** 2)
        assert got == pytest.approx(expected, rel=1e-5)
    g = mx.grad(lambda x: bradley_terry_loss(x, mx.array(rr), center_coef=0.01))(mx.array(rc))
    assert np.isfinite(np.asarray(g)).all()
