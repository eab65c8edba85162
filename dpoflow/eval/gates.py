"""Quality gates: checks over one stage's metrics file against thresholds in params.yaml.

Each gate is its own light DVC stage (`stages/gate.py STAGE`), so editing a threshold re-evaluates the gate without
retraining. A failing gate exits non-zero (stopping `dvc repro`) with one line per failed check naming the metric,
its value, the threshold and what the workflow prescribes. The stage's metrics stay readable either way.
A check with `blocking=False` is a flag, not a threshold: it is reported (WARNING) and recorded, and does not stop
the run (issue 4: the reward model's train-validation gap is flagged; its validation accuracy is the gate).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dpoflow.runtime.params import Params

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Check:
    metric: str  # key in the stage's metrics file (dotted for nested keys)
    label: str  # human name, e.g. "preference gap"
    op: str  # one of _OPS
    threshold: float
    param: str  # params.yaml key holding the threshold
    advice: str  # what the workflow prescribes when the check fails
    blocking: bool = True  # False: a flag (reported and recorded, does not fail the gate)
    applies: bool = True  # False: this data has nothing to check it on (e.g. accuracy without a verifier)
    on_bound: bool = False  # compare the confidence bound on the failing side (gates.bound), not the point

    @property
    def bound_metric(self) -> str:
        """The interval end a bound check reads: the lower one for >= / >, the upper one for <=."""
        return f"{self.metric}_ci_high" if self.op == "<=" else f"{self.metric}_ci_low"


@dataclass(frozen=True)
class CheckResult:
    check: Check
    value: float | None  # what was compared: the point, or the bound for an on_bound check
    passed: bool
    point: float | None = None
    bound: float | None = None  # the failing-side interval end, when the metrics carry it

    def message(self) -> str:
        c = self.check
        if self.value is None:
            missing = c.bound_metric if c.on_bound else c.metric
            return f"{c.label}: metric `{missing}` missing from the metrics file: rerun the stage"
        verdict = "ok" if self.passed else f"{'FAILED' if c.blocking else 'WARNING (flag, not blocking)'}: {c.advice}"
        negated = {">=": "<", "<=": ">", ">": "<=", "==": "!="}[c.op]
        shown = c.op if self.passed else negated
        side = "upper" if c.op == "<=" else "lower"
        if c.on_bound:
            compared = f"{side} bound {self.value:.4g} (point {_num(self.point)})"
        else:
            compared = f"{self.value:.4g}" + ("" if self.bound is None else f" ({side} bound {self.bound:.4g})")
        return f"{c.label} {compared} {shown} {c.threshold:.4g} ({c.param}): {verdict}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def gate_checks(stage: str, p: Params) -> list[Check]:
    """The checks of one stage's gate, with thresholds read from params; what applies, and the advice, follow the
    data's source (a verifier exists only for the embedded task; imported pairs are not generated)."""
    imported = p.preference.judge == "import"
    more_prompts = "data.sizes.pref_prompts" if p.data.source == "embedded" else "more rows in data.prompts"
    checks: dict[str, list[Check]] = {
        "sft": [
            Check(
                "val_accuracy",
                "SFT held-out accuracy",
                ">=",
                p.sft.min_val_accuracy,
                "sft.min_val_accuracy",
                "train longer (sft.steps) or with a higher sft.learning_rate, or check the SFT data",
                applies=p.data.source == "embedded",  # greedy accuracy needs the task's checker
            ),
            Check(
                "val_loss",
                "SFT held-out loss",
                "<=",
                p.sft.max_val_loss,
                "sft.max_val_loss",
                "train longer (sft.steps) or lower sft.learning_rate if the loss diverged",
            ),
        ],
        "preference_data": [
            Check(
                "avg_gap",
                "preference gap",
                ">=",
                p.preference.min_gap,
                "preference.min_gap",
                "the labels barely separate chosen from rejected: import pairs with clearer preferences (or drop the "
                "close calls)"
                if imported
                else "generate more diverse responses (raise preference.temperature or samples_per_prompt) "
                "or use a stricter judge",
            ),
            Check(
                "n_pairs",
                "pairs",
                ">=",
                p.preference.min_pairs,
                "preference.min_pairs",
                "import or label more pairs (preference.import_path), or lower preference.min_pairs for a first try"
                if imported
                else f"generate more: {more_prompts}, preference.samples_per_prompt or max_extra_passes",
            ),
            Check(
                "decontamination",
                "decontamination",
                ">=",
                p.preference.min_decontamination,
                "preference.min_decontamination",
                "too many pairs overlap evaluation data: regenerate prompts disjoint from the eval sets",
            ),
        ],
        "init": [
            Check(
                "initial_kl",
                "initial KL(policy||reference)",
                "<=",
                p.init.max_initial_kl,
                "init.max_initial_kl",
                "the policy does not start at the reference: check LoRA init (B must be zero) and the weights",
            ),
        ],
        "reward_model": [
            Check(
                "rm_accuracy",
                "reward model validation accuracy",
                ">=",
                p.reward_model.min_val_accuracy,
                "reward_model.min_val_accuracy",
                "improve the data (larger preference gap, more pairs) or give the model more capacity "
                "(reward_model.lora_rank/lora_layers, epochs)",
            ),
            Check(
                "rm_overfit_gap",
                "reward model train-val accuracy gap",
                "<=",
                p.reward_model.max_overfit_gap,
                "reward_model.max_overfit_gap",
                "overfitting: fewer epochs, lower learning rate, or more pairs; "
                "judge the model by its validation accuracy",
                blocking=False,
            ),
        ],
        "dpo": [
            Check(
                "kl",
                "KL(policy||reference)",
                "<=",
                p.dpo.max_kl,
                "dpo.max_kl",
                "use a smaller dpo.learning_rate or a larger dpo.beta",
            ),
            Check(
                "heldout_gap",
                "held-out preference gap",
                ">=",
                p.dpo.min_heldout_gap,
                "dpo.min_heldout_gap",
                "train longer (dpo.max_steps), raise dpo.learning_rate within the KL budget, or improve pair quality",
            ),
        ],
        "iterate": [
            Check(
                "selected_kl",
                "selected round KL",
                "<=",
                p.dpo.max_kl,
                "dpo.max_kl",
                "use a smaller dpo.learning_rate or fewer iterate.max_steps per round",
            ),
            Check(
                "selected_heldout_gap",
                "selected round held-out gap",
                ">=",
                p.dpo.min_heldout_gap,
                "dpo.min_heldout_gap",
                "more rounds or more steps per round, or better on-policy pairs",
            ),
        ],
        "evaluate": [
            Check(
                "retention",
                "capability retention %",
                ">=",
                p.evaluate.min_retention,
                "evaluate.min_retention",
                "roll back to the last round that met every threshold and retrain with a smaller learning rate "
                "(more gradual training)",
            ),
            Check(
                "win_rate",
                "win rate",
                ">",
                p.evaluate.min_win_rate_lower,
                "evaluate.min_win_rate_lower",
                "no clear alignment improvement: more or better preference data, more rounds",
            ),
            Check(
                "final_kl",
                "final KL(policy||reference)",
                "<=",
                p.evaluate.max_kl,
                "evaluate.max_kl",
                "use a smaller dpo.learning_rate or a larger dpo.beta",
            ),
            Check(
                "final_heldout_gap",
                "final held-out preference gap",
                ">=",
                p.evaluate.min_heldout_gap,
                "evaluate.min_heldout_gap",
                "train longer or improve pair quality",
            ),
            Check(
                "contaminated_pairs",
                "contaminated training pairs",
                "<=",
                0,
                "(fixed)",
                "remove evaluation overlap from the training pairs (Stage 2 decontamination)",
            ),
        ],
    }
    if stage not in checks:
        raise KeyError(f"unknown gate {stage!r}; gates: {', '.join(checks)}")
    bound = set(p.gates.bound)
    return [dataclasses.replace(c, on_bound=c.metric in bound) for c in checks[stage] if c.applies]


def lookup(metrics: dict, dotted: str) -> Any:
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclass(frozen=True)
class GateResult:
    stage: str
    results: list[CheckResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results if r.check.blocking)

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if not r.check.blocking and not r.passed]

    def report(self) -> str:
        head = f"gate {self.stage}: {'PASSED' if self.passed else 'FAILED'}"
        if self.warnings:
            head += f" ({len(self.warnings)} warning{'s' if len(self.warnings) > 1 else ''})"
        return "\n".join([head] + [f"  - {r.message()}" for r in self.results])

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "passed": self.passed,
            "warnings": [r.check.metric for r in self.warnings],
            "checks": [
                {**asdict(r.check), "value": r.value, "point": r.point, "bound": r.bound, "passed": r.passed}
                for r in self.results
            ],
        }


def evaluate_gate(stage: str, metrics: dict, p: Params) -> GateResult:
    results = []
    for check in gate_checks(stage, p):
        point, bound = lookup(metrics, check.metric), lookup(metrics, check.bound_metric)
        point, bound = (None if v is None else float(v) for v in (point, bound))
        value = bound if check.on_bound else point
        ok = value is not None and _OPS[check.op](value, float(check.threshold))
        results.append(CheckResult(check, value, bool(ok), point=point, bound=bound))
    return GateResult(stage, results)


def pair_gate(p: Params, min_pairs: int) -> Callable[[Mapping[str, Any]], list[str]]:
    """Stage 2's gate (gates.gate_checks("preference_data")) with n_pairs against `min_pairs` (iterate.min_pairs).
    Returns a function metrics -> failure messages (empty = passed)."""
    p_round = dataclasses.replace(p, preference=dataclasses.replace(p.preference, min_pairs=int(min_pairs)))

    def check(metrics: Mapping[str, Any]) -> list[str]:
        result = evaluate_gate("preference_data", dict(metrics), p_round)
        return [
            r.message()
            .replace("(preference.min_pairs)", "(iterate.min_pairs)")
            .replace("data.sizes.pref_prompts", "iterate.prompts_per_round")
            for r in result.results
            if not r.passed
        ]

    return check
