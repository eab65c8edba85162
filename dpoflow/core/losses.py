"""Preference and language-modelling losses: pure functions of log-probabilities (mx arrays).

Notation, per pair i (all log-probs are sums over completion tokens, see dpoflow.core.logprobs):
    pi_c, pi_w   policy log p(chosen | prompt), log p(rejected | prompt)
    ref_c, ref_w the same under the frozen reference
    h = (pi_c - ref_c) - (pi_w - ref_w)                     the log-ratio difference ("implicit reward margin / beta")
    log sigma(x) = -log(1 + exp(-x)), computed stably as -logaddexp(0, -x)
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from dpoflow.core.batching import ChosenRejected
from dpoflow.runtime.params import LOSS_TYPES


def log_sigmoid(x: mx.array) -> mx.array:
    """log sigma(x) = -logaddexp(0, -x): no overflow for large |x|."""
    return -mx.logaddexp(mx.zeros_like(x), -x)


class DpoLossOutput(NamedTuple):
    losses: mx.array  # [B] per pair: take .mean() for the batch loss
    rewards: ChosenRejected  # implicit rewards beta * (pi - ref), gradient stopped


def dpo_loss(
    policy: ChosenRejected,
    reference: ChosenRejected,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DpoLossOutput:
    """Per-pair DPO-family losses [B] and implicit rewards, from the policy's and the reference's summed
    log-probs of each pair's chosen and rejected response (pi_c, pi_w = policy; ref_c, ref_w = reference).

    With h as in the module docstring and eps = label_smoothing:
      sigmoid       (DPO, Rafailov et al. 2023)    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
                    (eps = 0 is plain DPO; eps > 0 is cDPO, as in TRL's "sigmoid")
      conservative  (cDPO, Mitchell 2023)          the same formula as sigmoid; an explicit name for eps > 0
      robust        (rDPO, Chowdhury et al. 2024)
                    [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps)
      ipo           (IPO, Azar et al. 2023)        (h - 1 / (2 beta))^2
                    (the paper uses per-token average log-probs: pass normalize_by_length(...) values)
      hinge         (SLiC, Zhao et al. 2023)       relu(1 - beta h)

    Rewards (for metrics only, gradient stopped):
      chosen_rewards = beta (pi_c - ref_c),   rejected_rewards = beta (pi_w - ref_w)
    so chosen_rewards - rejected_rewards = beta h.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    chosen_logratio = policy.chosen - reference.chosen
    rejected_logratio = policy.rejected - reference.rejected
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing

    if loss_type in ("sigmoid", "conservative"):
        losses = -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1.0 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = mx.maximum(1.0 - beta * h, 0.0)

    rewards = ChosenRejected(mx.stop_gradient(beta * chosen_logratio), mx.stop_gradient(beta * rejected_logratio))
    return DpoLossOutput(losses, rewards)


def normalize_by_length(sum_logps: mx.array, n_tokens: mx.array) -> mx.array:
    """Per-token average log-prob: sum_logps / max(n_tokens, 1) (for IPO or length-normalized DPO)."""
    return sum_logps / mx.maximum(n_tokens.astype(sum_logps.dtype), 1.0)


def length_normalized(logps: ChosenRejected, n_tokens: ChosenRejected) -> ChosenRejected:
    """Both responses' summed log-probs divided by their token counts (length-normalized DPO, IPO)."""
    return ChosenRejected(
        normalize_by_length(logps.chosen, n_tokens.chosen), normalize_by_length(logps.rejected, n_tokens.rejected)
    )


def sft_loss(policy_chosen_sum: mx.array, n_tokens: mx.array) -> mx.array:
    """Mean per-token negative log-likelihood: -sum_i logp_i / sum_i n_i (token-weighted over the batch, like
    mlx-lm's tuner), where logp_i is the summed completion log-prob of row i and n_i its completion token count."""
    return -policy_chosen_sum.sum() / mx.maximum(n_tokens.sum().astype(policy_chosen_sum.dtype), 1.0)


def bradley_terry_loss(
    r_chosen: mx.array,
    r_rejected: mx.array,
    margin: mx.array | None = None,
    center_coef: float = 0.0,
) -> mx.array:
    """Reward-model loss as in TRL's RewardTrainer (a scalar, already averaged over the batch):

        mean_i[ -log sigma(r_c,i - r_w,i - m_i) ] + center_coef * mean_i[ (r_c,i + r_w,i)^2 ]

    m_i is an optional per-pair margin (0 if None); the centering term keeps rewards near zero.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -log_sigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def preference_stats(chosen_rewards: mx.array, rejected_rewards: mx.array) -> dict[str, float]:
    """Metrics of a batch of implicit rewards (python floats, for logging).

    accuracy: per-pair fraction where chosen_reward > rejected_reward strictly; an exact tie counts 0.5
    (so at initialization, policy == reference and every margin is 0, accuracy is 0.5, not TRL's 0.0).
    margin_mean: mean of chosen_rewards - rejected_rewards (already beta-scaled).
    """
    c = np.asarray(chosen_rewards, dtype=np.float64)
    r = np.asarray(rejected_rewards, dtype=np.float64)
    margins = c - r
    wins = (margins > 0).astype(np.float64) + 0.5 * (margins == 0)
    return {
        "margin_mean": float(margins.mean()),
        "accuracy": float(wins.mean()),
        "chosen_reward_mean": float(c.mean()),
        "rejected_reward_mean": float(r.mean()),
    }


def heldout_preference_gap(margins_beta_scaled) -> float:
    """Held-out preference gap: mean_i (2 sigma(m_i) - 1) = mean_i tanh(m_i / 2), in (-1, 1).

    m_i = beta * h_i = chosen_reward_i - rejected_reward_i (the beta-scaled implicit reward margin). It is the
    model's implied P(chosen > rejected) rescaled from [0, 1] to [-1, 1]; 0 when policy == reference.
    """
    m = np.asarray(margins_beta_scaled, dtype=np.float64)
    return float(np.tanh(m / 2.0).mean())
