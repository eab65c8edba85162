"""Data-quality gate for preference pairs: gap, decontamination, conflicts, duplicates, lengths.

    from dpoflow.data.validation import validate_dpo_pairs
    metrics = validate_dpo_pairs(dpo_path=Path("preference_pairs.jsonl"), gap_threshold=3/20)

Processing order (every removal becomes a quarantine row with its reason, so that
n_input == n_pairs + n_quarantined always holds):

1. load and convert (dpoflow.data.pairs): format errors, empty strings, chosen == rejected, over-long rows;
2. mislabeled: score_chosen < score_rejected;
3. conflicts within a prompt: opposite labels (A>B and B>A), then preference cycles (A>B, B>C, C>A),
   resolved by `conflict_rule`;
4. exact duplicates (same prompt, chosen, rejected): the first is kept;
5. decontamination against `eval_texts` (the fraction is measured before the contaminated pairs go);
6. gap, histogram and length statistics on the accepted pairs.

The rules are documented in docs/preference-data-generation.md.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dpoflow.data.conflicts import LabeledPair, resolve_conflicts
from dpoflow.data.decontamination import DEFAULT_NGRAM, EvalIndex
from dpoflow.data.formats import convert_rows, load_pairs
from dpoflow.data.pairs import (
    LoadResult,
    prompt_text,
    quarantine_row,
    write_quarantine,
)
from dpoflow.runtime.params import CONFLICT_RULES

GAP_BINS = 10


# --------------------------------------------------------------------------------------------------
# Result


@dataclass
class PairValidation:
    """Metrics of one validation run. `accepted` and `quarantined` are left out of to_dict()."""

    n_input: int
    n_pairs: int
    n_quarantined: int
    avg_gap: float
    n_label_only: int
    gap_histogram: dict
    n_mislabeled: int
    n_duplicates: int
    n_conflicts: int
    n_conflict_rows: int
    conflicts: list[dict]
    decontamination: float
    decontamination_checked: bool
    ngram: int
    eval_sets: list[str]
    n_contaminated: int
    contaminated: list[dict]
    lengths: dict
    quarantine_reasons: dict[str, int]
    thresholds: dict
    passed: dict[str, bool]
    all_passed: bool
    accepted: list[dict] = field(default_factory=list, repr=False, metadata={"exclude": True})
    quarantined: list[dict] = field(default_factory=list, repr=False, metadata={"exclude": True})

    def to_dict(self) -> dict:
        """JSON-safe metrics (counts only for the accepted and quarantined rows)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("exclude")}


# --------------------------------------------------------------------------------------------------
# Validation


def validate_dpo_pairs(
    dpo_path: str | os.PathLike | None = None,
    pairs: list[dict] | None = None,
    gap_threshold: float = 0.15,
    min_pairs: int = 1000,
    decontamination_threshold: float = 0.9,
    eval_texts: dict[str, list[str]] | None = None,
    ngram: int = DEFAULT_NGRAM,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    conflict_rule: str = "majority",
    quarantine_path: str | os.PathLike | None = None,
    *,
    fmt: str = "auto",
    score_scale: float | None = None,
    max_chars: int | None = None,
) -> PairValidation:
    """Validate preference pairs from a file (JSONL or Parquet, any import format) or an in-memory list.

    Passing thresholds: avg_gap >= gap_threshold, n_pairs >= min_pairs,
    decontamination >= decontamination_threshold.
    """
    if (dpo_path is None) == (pairs is None):
        raise ValueError("pass exactly one of dpo_path and pairs")
    if conflict_rule not in CONFLICT_RULES:
        raise ValueError(f"conflict_rule must be one of {CONFLICT_RULES}, got {conflict_rule!r}")
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if count_tokens is not None:
        count_tokens = _memoized(count_tokens)

    options = dict(
        fmt=fmt, score_scale=score_scale, max_chars=max_chars, max_tokens=max_tokens, count_tokens=count_tokens
    )
    loaded: LoadResult = (
        load_pairs(dpo_path, **options) if dpo_path is not None else convert_rows(pairs, "<pairs>", **options)
    )
    quarantined = list(loaded.quarantined)
    items = [LabeledPair(p, loc) for p, loc in zip(loaded.pairs, loaded.locations)]

    def remove(item: LabeledPair, field_name: str, reason: str) -> None:
        quarantined.append(quarantine_row(item.location, field_name, reason, item.pair))

    # 2. mislabeled
    kept = []
    for item in items:
        if item.gap < 0:
            remove(
                item,
                "score_chosen",
                f"mislabeled: score_chosen {item.pair['score_chosen']:.4g} < "
                f"score_rejected {item.pair['score_rejected']:.4g}",
            )
        else:
            kept.append(item)
    n_mislabeled = len(items) - len(kept)

    # 3. conflicts
    kept, conflicts, dropped = resolve_conflicts(kept, conflict_rule)
    for item, reason in dropped:
        remove(item, "chosen", reason)

    # 4. duplicates
    first_seen: dict[str, str] = {}
    unique = []
    for item in kept:
        pid = item.pair["id"]
        if pid in first_seen:
            remove(item, "row", f"duplicate: same prompt, chosen and rejected as {first_seen[pid]}")
        else:
            first_seen[pid] = item.location
            unique.append(item)
    n_duplicates = len(kept) - len(unique)

    # 5. decontamination
    contaminated: list[dict] = []
    clean = unique
    if eval_texts:
        index = EvalIndex(eval_texts, ngram)
        clean = []
        for item in unique:
            texts = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(item.pair["prompt"])]
            texts += [("chosen", item.pair["chosen"]), ("rejected", item.pair["rejected"])]
            hits = index.matches(texts)
            if hits:
                contaminated.append(
                    {
                        "id": item.pair["id"],
                        "location": item.location,
                        "eval_sets": list(hits),
                        "fields": list(hits.values()),
                    }
                )
                remove(item, next(iter(hits.values())), f"contaminated: {', '.join(hits)}")
            else:
                clean.append(item)
    decontamination = 1.0 - len(contaminated) / len(unique) if unique else 1.0

    # 6. statistics on the accepted pairs
    accepted = [item.pair for item in clean]
    gaps = [item.gap for item in clean]
    avg_gap = sum(gaps) / len(gaps) if gaps else 0.0
    n_pairs = len(accepted)
    if loaded.n_input != n_pairs + len(quarantined):
        raise AssertionError(f"row accounting broken: {loaded.n_input} != {n_pairs} + {len(quarantined)}")

    passed = {
        "gap": avg_gap >= gap_threshold,
        "pairs": n_pairs >= min_pairs,
        "decontamination": decontamination >= decontamination_threshold,
    }
    result = PairValidation(
        n_input=loaded.n_input,
        n_pairs=n_pairs,
        n_quarantined=len(quarantined),
        avg_gap=avg_gap,
        n_label_only=sum(1 for p in accepted if p["score_chosen"] is None),
        gap_histogram=_histogram(gaps),
        n_mislabeled=n_mislabeled,
        n_duplicates=n_duplicates,
        n_conflicts=len(conflicts),
        n_conflict_rows=len(dropped),
        conflicts=conflicts,
        decontamination=decontamination,
        decontamination_checked=bool(eval_texts),
        ngram=ngram,
        eval_sets=sorted(eval_texts or {}),
        n_contaminated=len(contaminated),
        contaminated=contaminated,
        lengths=_length_stats(accepted, count_tokens),
        quarantine_reasons=dict(sorted(Counter(_reason_kind(q["reason"]) for q in quarantined).items())),
        thresholds={"gap": gap_threshold, "pairs": min_pairs, "decontamination": decontamination_threshold},
        passed=passed,
        all_passed=all(passed.values()),
        accepted=accepted,
        quarantined=quarantined,
    )
    if quarantine_path is not None:
        write_quarantine(quarantined, quarantine_path)
    return result


# --------------------------------------------------------------------------------------------------
# Conflicts


def _histogram(gaps: list[float], bins: int = GAP_BINS) -> dict:
    """Counts of gaps in equal bins [lo, hi) over [0, 1]; a gap of exactly 1.0 falls in the last bin.

    A gap within 1e-9 of an edge counts as on the edge (0.6 - 0.4 is 0.19999999999999996 in floats).
    """
    counts = [0] * bins
    for gap in gaps:
        counts[min(max(int(gap * bins + 1e-9), 0), bins - 1)] += 1
    return {"edges": [round(i / bins, 10) for i in range(bins + 1)], "counts": counts}


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    ordered = sorted(values)
    return {
        "mean": sum(ordered) / len(ordered),
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1],
    }


def _percentile(ordered: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _length_stats(pairs: list[dict], count_tokens: Callable[[str], int] | None) -> dict:
    texts = {
        "prompt": [prompt_text(p["prompt"]) for p in pairs],
        "chosen": [p["chosen"] for p in pairs],
        "rejected": [p["rejected"] for p in pairs],
    }
    stats: dict[str, Any] = {"chars": {k: _summary([len(t) for t in v]) for k, v in texts.items()}}
    stats["tokens"] = (
        None if count_tokens is None else {k: _summary([count_tokens(t) for t in v]) for k, v in texts.items()}
    )
    return stats


def _reason_kind(reason: str) -> str:
    """The stable head of a quarantine reason: "missing field (null)" -> "missing field"."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def _memoized(count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    cache: dict[str, int] = {}

    def counted(text: str) -> int:
        if text not in cache:
            cache[text] = int(count_tokens(text))
        return cache[text]

    return counted
