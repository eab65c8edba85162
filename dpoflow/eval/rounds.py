"""Stage 6's rules, as pure functions: compare a round with the previous one, select the best round, say why the
iteration stopped, and size a round.

`decide_round` compares a round with the previous one: a failed round or a drop of any watched metric by more than
iterate.regression_tolerance -> "rollback" (stop; the previous round stays selected); a change of the held-out gap
below iterate.convergence_epsilon -> "converged" (stop); a gain of at least epsilon -> "continue"; a loss between
epsilon and the tolerance -> "converged" too (no further gain; the better earlier round is selected).
`select_round` picks, among round 0 and the rounds that passed every check and were not rolled back, the one with
the highest held-out gap (ties: the earlier round, i.e. less drift from SFT).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from dpoflow.runtime.params import DpoParams

# Metrics compared between rounds; a drop of any of them by more than iterate.regression_tolerance is a regression.
# heldout_gap: the DPO objective on held-out pairs; task_accuracy: greedy accuracy on the held-out task items;
# benchmark_mean: mean lm-eval score (capability). All in comparable absolute units ([-1, 1] / [0, 1]).
WATCHED = ("heldout_gap", "task_accuracy", "benchmark_mean")
PRIMARY = "heldout_gap"  # improvement / convergence are judged on this one


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def decide_round(
    previous: Mapping[str, Any], current: Mapping[str, Any], regression_tolerance: float, convergence_epsilon: float
) -> dict:
    """Compare round `current` with round `previous` (metric dicts as in `IterateResult.rounds`).

    Returns {"decision": "continue" | "rollback" | "converged", "reasons": [str], "deltas": {metric: cur - prev}}.
    Rules, in order:
      1. current["passed"] is False (a failed check: pairs, KL, divergence)   -> rollback
      2. any WATCHED metric fell by more than regression_tolerance              -> rollback
      3. |delta of PRIMARY| < convergence_epsilon                              -> converged (stable)
      4. delta of PRIMARY >= convergence_epsilon                               -> continue (improving)
      5. otherwise (PRIMARY fell by epsilon .. tolerance)                      -> converged (no further gain)
    Metrics missing (None) on either side are not compared; a missing PRIMARY on the current round is a failure.
    """
    if regression_tolerance < 0 or convergence_epsilon < 0:
        raise ValueError("regression_tolerance and convergence_epsilon must be >= 0")
    deltas = {
        key: current[key] - previous[key] for key in WATCHED if finite(current.get(key)) and finite(previous.get(key))
    }
    if not current.get("passed", False):
        failures = list(current.get("failures") or ["the round failed a check"])
        return {"decision": "rollback", "reasons": failures, "deltas": deltas}
    if not finite(current.get(PRIMARY)):
        return {"decision": "rollback", "reasons": [f"{PRIMARY} is missing or not finite"], "deltas": deltas}
    regressions = [
        f"{key} fell by {-d:.4g} ({previous[key]:.4g} -> {current[key]:.4g}) > iterate.regression_tolerance "
        f"{regression_tolerance:g}"
        for key, d in deltas.items()
        if -d > regression_tolerance
    ]
    if regressions:
        return {"decision": "rollback", "reasons": regressions, "deltas": deltas}
    delta = deltas.get(PRIMARY)
    if delta is None:  # the previous round has no primary metric: nothing to compare, keep going
        return {"decision": "continue", "reasons": [f"no previous {PRIMARY} to compare with"], "deltas": deltas}
    if abs(delta) < convergence_epsilon:
        return {
            "decision": "converged",
            "reasons": [
                f"{PRIMARY} changed by {delta:+.4g}, below iterate.convergence_epsilon {convergence_epsilon:g}: stable"
            ],
            "deltas": deltas,
        }
    if delta >= convergence_epsilon:
        return {
            "decision": "continue",
            "reasons": [
                f"{PRIMARY} improved by {delta:+.4g} (>= "
                f"iterate.convergence_epsilon {convergence_epsilon:g}), no "
                "regression beyond tolerance"
            ],
            "deltas": deltas,
        }
    return {
        "decision": "converged",
        "reasons": [
            f"{PRIMARY} fell by {-delta:.4g}, within iterate.regression_tolerance "
            f"{regression_tolerance:g}: no further gain, the better earlier round "
            "is kept"
        ],
        "deltas": deltas,
    }


def eligible(record: Mapping[str, Any]) -> bool:
    """A round that may be selected: round 0, or a round that passed every check and was not rolled back."""
    return record["round"] == 0 or (bool(record.get("passed")) and record.get("decision") != "rollback")


def select_round(rounds: Sequence[Mapping[str, Any]]) -> int:
    """The eligible round with the highest PRIMARY metric; ties go to the earlier round (less drift from SFT).
    Round 0 (the Stage 5 policy) is always eligible, so there is always a selection."""
    best, best_value = 0, None
    for record in rounds:
        if not eligible(record):
            continue
        value = record.get(PRIMARY)
        value = value if finite(value) else -math.inf
        if best_value is None or value > best_value:
            best, best_value = record["round"], value
    return best


def overall_decision(rounds: Sequence[Mapping[str, Any]], planned: int, stop: str | None) -> str:
    """How the iteration ended: no_rounds | out_of_prompts | rolled_back | converged | max_rounds."""
    if planned == 0:
        return "no_rounds"
    if stop is not None:
        return stop
    last = rounds[-1]
    if last["round"] == 0:
        return "no_rounds"
    return {"rollback": "rolled_back", "converged": "converged"}.get(last.get("decision"), "max_rounds")


def round_min_pairs(
    iterate_min_pairs: int | None, preference_min_pairs: int, prompts_per_round: int, pref_prompts: int | None
) -> int:
    """Minimum valid pairs for a round: iterate.min_pairs when set; otherwise Stage 2's preference.min_pairs scaled
    by prompts_per_round / data.sizes.pref_prompts (rounded up, at least 1)."""
    if iterate_min_pairs is not None:
        return int(iterate_min_pairs)
    if not pref_prompts:
        return max(1, int(preference_min_pairs))
    return max(1, math.ceil(preference_min_pairs * prompts_per_round / pref_prompts))


def round_slice(n_items: int, round_index: int, per_round: int) -> tuple[int, int]:
    """[start, stop) of round `round_index`'s (1-based) prompts among the round prompts; empty when exhausted."""
    start = min(n_items, (round_index - 1) * per_round)
    return start, min(n_items, start + per_round)


def convergence_analysis(
    rounds: Sequence[Mapping[str, Any]], selected: int, decision: str, tolerance: float, epsilon: float
) -> str:
    """A short text: the trajectory of the watched metrics, why the iteration stopped, what was selected."""
    lines = []
    trained = [r for r in rounds if r["round"] > 0]
    fmt = lambda v: "n/a" if not finite(v) else f"{v:.4g}"  # noqa: E731
    traj = " -> ".join(f"r{r['round']} {fmt(r.get(PRIMARY))}" for r in rounds)
    lines.append(f"Held-out preference gap by round: {traj}.")
    kl = " -> ".join(f"r{r['round']} {fmt(r.get('kl'))}" for r in rounds)
    lines.append(f"KL(policy || SFT) by round: {kl}.")
    acc = " -> ".join(f"r{r['round']} {fmt(r.get('task_accuracy'))}" for r in rounds)
    lines.append(f"Held-out task accuracy by round: {acc}.")
    if any(finite(r.get("benchmark_mean")) for r in rounds):
        bench = " -> ".join(f"r{r['round']} {fmt(r.get('benchmark_mean'))}" for r in rounds)
        lines.append(f"Mean benchmark score by round: {bench}.")
    explain = {
        "no_rounds": "No iterative round ran (iterate.rounds is 0): the Stage 5 policy is the result.",
        "out_of_prompts": "Stopped: data/tasks/rounds.jsonl has no fresh prompts left for another round "
        "(raise data.sizes.rounds or lower iterate.prompts_per_round).",
        "rolled_back": "Stopped with a rollback: the last round failed a check or regressed beyond "
        f"iterate.regression_tolerance {tolerance:g}; its policy was discarded.",
        "converged": f"Stopped as converged: the held-out gap moved by less than iterate.convergence_epsilon "
        f"{epsilon:g} (or fell within the tolerance): another round is not expected to help.",
        "max_rounds": "Stopped after the planned number of rounds while still improving: more rounds "
        "(iterate.rounds) may help further.",
    }
    lines.append(explain.get(decision, f"Stopped: {decision}."))
    if trained:
        last = trained[-1]
        lines.append(f"Last round {last['round']}: {last.get('decision')} ({'; '.join(last.get('reasons') or [])}).")
    lines.append(f"Selected round {selected} (the best eligible held-out gap; ties go to the earlier round).")
    return " ".join(lines)


def round_steps(max_steps: int, max_epochs: float | None, n_pairs: int, batch_size: int) -> int:
    """A round's DPO steps: iterate.max_steps, capped at iterate.max_epochs passes over its pairs (at least 1)."""
    if max_epochs is None:
        return max_steps
    return max(1, min(max_steps, math.ceil(max_epochs * n_pairs / batch_size)))


def round_dpo_params(dpo_params: DpoParams, max_steps: int) -> DpoParams:
    """Stage 5's DPO params for one round: `max_steps` steps, warmup capped at half of them."""
    return dataclasses.replace(
        dpo_params, max_steps=max_steps, warmup_steps=min(dpo_params.warmup_steps, max_steps // 2)
    )
