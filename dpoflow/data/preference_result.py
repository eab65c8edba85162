"""What collecting preference pairs produced (data.collect): the pairs, the quarantine, every pass, and the metrics
the gate reads (deterministic: no timings; those are in `perf`)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpoflow.data.pairing import PromptState
from dpoflow.data.validation import PairValidation
from dpoflow.runtime.params import PreferenceParams

SCORE_BINS = 10


@dataclass
class PassRecord:
    index: int
    temperature: float
    seed: int
    prompts: int  # training prompts sampled in this pass
    heldout_prompts: int
    responses: int  # training samples drawn in this pass (prompts * K)
    new_prompts_with_pair: int  # training prompts whose first pair came from this pass
    candidate_pairs: int  # training candidate pairs after this pass (all passes)
    pairs: int  # validated training pairs after this pass
    avg_gap: float
    decontamination: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PreferenceResult:
    """What collect_pairs produced; `metrics()`: every statistic (the stage report), `perf`: timings."""

    judge: str
    pairing: str
    pairs: list[dict]
    heldout_pairs: list[dict]
    quarantined: list[dict]  # training quarantine rows (file locations)
    heldout_quarantined: list[dict]
    validation: PairValidation
    heldout_validation: PairValidation | None
    n_input: int  # training rows in = n_pairs + n_quarantined
    n_prompts: int
    n_prompts_with_pair: int
    heldout_prompts: int
    heldout_input: int
    passes: list[PassRecord]
    params: PreferenceParams
    seed: int
    prompt_states: list[PromptState] = field(default_factory=list, repr=False)
    eval_set_sizes: dict[str, int] = field(default_factory=dict)
    perf: dict = field(default_factory=dict)

    @property
    def all_quarantined(self) -> list[dict]:
        """Every removed row: training rows first, then held-out rows (their locations name heldout.jsonl)."""
        return self.quarantined + self.heldout_quarantined

    def score_distribution(self) -> dict:
        scores = [s for st in self.prompt_states if not st.heldout for s in st.scores]
        counts = [0] * SCORE_BINS
        for s in scores:
            counts[min(int(s * SCORE_BINS), SCORE_BINS - 1)] += 1
        return {
            "n": len(scores),
            "mean": _mean(scores),
            "zero": sum(1 for s in scores if s == 0.0),
            "one": sum(1 for s in scores if s == 1.0),
            "histogram": {"edges": [round(i / SCORE_BINS, 10) for i in range(SCORE_BINS + 1)], "counts": counts},
        }

    def metrics(self) -> dict:
        """Flat keys for the gate (avg_gap, n_pairs, decontamination) + detail; deterministic (no timings)."""
        v = self.validation
        train_states = [st for st in self.prompt_states if not st.heldout]
        tokens = (v.lengths.get("tokens") or {}) if v.lengths else {}
        length_flat = {
            f"{part}_tokens_{stat}": tokens[part][stat]
            for part in ("prompt", "chosen", "rejected")
            if tokens.get(part)
            for stat in ("mean", "p95", "max")
        }
        diffs = _length_bias(self.pairs, self._count_tokens) if self.pairs else {}
        reasons = reason_counts(self.quarantined)
        out: dict[str, Any] = {
            "judge": self.judge,
            "pairing": self.pairing,
            "avg_gap": v.avg_gap,
            "n_pairs": v.n_pairs,
            "decontamination": v.decontamination,
            "n_input": self.n_input,
            "n_quarantined": len(self.quarantined),
            "n_conflicts": v.n_conflicts,
            "n_conflict_rows": v.n_conflict_rows,
            "n_duplicates": v.n_duplicates,
            "n_mislabeled": v.n_mislabeled,
            "n_contaminated": v.n_contaminated,
            "n_label_only": v.n_label_only,
            "n_overlong": reasons.get("over-long", 0),
            "n_prompts": self.n_prompts,
            "n_prompts_with_pair": self.n_prompts_with_pair,
            "n_reference_pairs": sum(1 for p in self.pairs if (p.get("source") or "").endswith("+reference")),
            "usable_prompt_fraction": self.n_prompts_with_pair / self.n_prompts if self.n_prompts else 0.0,
            "passes": len(self.passes),
            "temperature_final": self.passes[-1].temperature if self.passes else None,
            "heldout_pairs": len(self.heldout_pairs),
            "heldout_input": self.heldout_input,
            "heldout_quarantined": len(self.heldout_quarantined),
            "heldout_prompts": self.heldout_prompts,
            "heldout_avg_gap": self.heldout_validation.avg_gap if self.heldout_validation else 0.0,
            **length_flat,
            **diffs,
            "quarantine_reasons": reasons,
            "gap_histogram": v.gap_histogram,
            "lengths": v.lengths,
            "eval_sets": self.eval_set_sizes,
            "contamination_by_set": dict(sorted(Counter(s for c in v.contaminated for s in c["eval_sets"]).items())),
            "regeneration_target": {"min_gap": self.params.min_gap, "min_pairs": self.params.min_pairs},
            "pass_log": {str(p.index): p.to_dict() for p in self.passes},
        }
        if train_states:
            n_samples = sum(len(st.raw_texts) for st in train_states)
            out.update(
                {
                    "samples_per_prompt": self.params.samples_per_prompt,
                    "n_responses": n_samples,
                    "n_duplicate_responses": sum(st.n_duplicate_responses for st in train_states),
                    "n_empty_responses": sum(st.n_empty_responses for st in train_states),
                    "truncated_response_fraction": (
                        sum(st.n_truncated_responses for st in train_states) / n_samples if n_samples else 0.0
                    ),
                    "response_tokens_mean": _mean([t for st in train_states for t in st.response_tokens]),
                    "judge_scores": self.score_distribution(),
                }
            )
        return out

    _count_tokens: Callable[[str], int] | None = field(default=None, repr=False)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _length_bias(pairs: list[dict], count: Callable[[str], int] | None) -> dict:
    """Length bias of the pairs (DPO readily learns "longer wins"): share with a longer chosen, mean difference."""
    measure = count or len
    diffs = [measure(p["chosen"]) - measure(p["rejected"]) for p in pairs]
    unit = "tokens" if count else "chars"
    return {
        "chosen_longer_fraction": sum(1 for d in diffs if d > 0) / len(diffs),
        f"length_diff_{unit}_mean": _mean(diffs),
    }


def reason_counts(rows: list[dict]) -> dict[str, int]:
    """Counts by the stable head of each reason ("over-long: prompt + chosen is 140 tokens" -> "over-long")."""
    return dict(sorted(Counter(re.split(r"[:(]", q["reason"], maxsplit=1)[0].strip() for q in rows).items()))
