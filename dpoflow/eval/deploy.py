"""The deploy decision (Stage 7): every check of gate `evaluate` passes; on a capability regression, the rollback the
workflow prescribes (the last round that met every threshold, a smaller learning rate, more gradual training)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpoflow.eval.gates import evaluate_gate
from dpoflow.eval.retention import round_retention
from dpoflow.runtime.params import Params


def last_good_round(iterate_metrics: Mapping[str, Any] | None, baseline: Mapping[str, float], p: Params) -> dict:
    """The last iterate round that met every Stage 7 threshold measurable per round (retention of its benchmarks,
    KL vs SFT, held-out gap; the win rate is measured only for the final model) and passed Stage 6's checks."""
    rounds = list((iterate_metrics or {}).get("rounds") or [])
    ev = p.evaluate
    for record in reversed(rounds):
        if record["round"] > 0 and (not record.get("passed") or record.get("decision") == "rollback"):
            continue
        ret = round_retention(record, baseline)
        kl, gap = record.get("kl"), record.get("heldout_gap")
        if (
            ret is not None
            and ret >= ev.min_retention
            and kl is not None
            and kl <= ev.max_kl
            and gap is not None
            and gap >= ev.min_heldout_gap
        ):
            return {
                "round": record["round"],
                "retention": ret,
                "kl": kl,
                "heldout_gap": gap,
                "model": "the Stage 5 policy" if record["round"] == 0 else f"round {record['round']} of Stage 6",
            }
    return {
        "round": None,
        "model": "the SFT model",
        "note": "no DPO round met every threshold: fall back to the SFT model",
    }


def deploy_decision(
    metrics: Mapping[str, Any],
    p: Params,
    iterate_metrics: Mapping[str, Any] | None = None,
    baseline: Mapping[str, float] | None = None,
) -> dict:
    """The deploy decision: deploy = every check of gate `evaluate` passes (gates.gate_checks), with each check and
    its reason; on a capability regression, the rollback the workflow prescribes (the last round that met every
    threshold, a smaller learning rate and more gradual training)."""

    gate = evaluate_gate("evaluate", dict(metrics), p)
    checks = [
        {
            "metric": r.check.metric,
            "label": r.check.label,
            "op": r.check.op,
            "threshold": r.check.threshold,
            "param": r.check.param,
            "value": r.value,
            "point": r.point,
            "bound": r.bound,
            "on_bound": r.check.on_bound,
            "passed": r.passed,
            "message": r.message(),
        }
        for r in gate.results
    ]
    failed = {r.check.metric for r in gate.results if not r.passed}
    warnings = []
    per = metrics.get("retention_per_benchmark") or {}
    for name, value in sorted(per.items()):
        if value is not None and value < p.evaluate.min_retention:
            warnings.append(
                f"{name}: retention {value:.1f} % < {p.evaluate.min_retention:g} % (the overall mean "
                "is what the gate checks; look at this benchmark before shipping)"
            )
    rollback = None
    if "retention" in failed:
        good = last_good_round(iterate_metrics, baseline or {}, p)
        lr = p.dpo.learning_rate * p.dpo.lr_backoff
        steps = max(1, p.iterate.max_steps // 2)
        rollback = {
            "to": good,
            "parameter_changes": {
                "dpo.learning_rate": {"from": p.dpo.learning_rate, "to": lr},
                "iterate.max_steps": {"from": p.iterate.max_steps, "to": steps},
            },
            "prescription": (
                f"capability regression: roll back to {good['model']} (the last round that met every "
                f"threshold) and retrain more gradually: dpo.learning_rate {p.dpo.learning_rate:g} -> "
                f"{lr:g} (x dpo.lr_backoff) and iterate.max_steps {p.iterate.max_steps} -> {steps}"
            ),
        }
    deploy = gate.passed
    return {
        "deploy": deploy,
        "selected_round": metrics.get("selected_round"),
        "checks": checks,
        "reasons": [c["message"] for c in checks],
        "failed": sorted(failed),
        "warnings": warnings,
        "rollback": rollback,
        "note": (
            "The final model is exported on every run (so it can be inspected, benchmarked or compared); ship it "
            "only when deploy is true" + ("." if deploy else ": this run must NOT be shipped.")
        ),
    }
