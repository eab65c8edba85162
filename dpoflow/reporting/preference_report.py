"""Stage 2's markdown report: statistics of the preference pairs (deterministic: no timings)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dpoflow.data.preference_result import PreferenceResult, reason_counts


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _bar(count: int, top: int, width: int = 30) -> str:
    return "#" * (round(width * count / top) if top else 0)


def _histogram_table(hist: Mapping[str, Any], label: str) -> list[str]:
    edges, counts = hist["edges"], hist["counts"]
    top = max(counts, default=0)
    lines = [f"| {label} | count | |", "|---|---:|---|"]
    for i, c in enumerate(counts):
        right = "]" if i == len(counts) - 1 else ")"
        lines.append(f"| [{edges[i]:.1f}, {edges[i + 1]:.1f}{right} | {c} | `{_bar(c, top)}` |")
    return lines


def render_preference_report(
    result: PreferenceResult, metrics: Mapping[str, Any] | None = None, quarantine_file: str = "the quarantine file"
) -> str:
    """Stage 2's report: statistics of the data; `quarantine_file` names where the removed rows are."""
    m = dict(metrics or result.metrics())
    v = result.validation
    lines = [
        "# Preference data (Stage 2)",
        "",
        f"Judge `{result.judge}`, pairing `{result.pairing}`. Training pairs: **{m['n_pairs']}** from "
        f"{m['n_prompts']} prompts (rows in {m['n_input']} = pairs {m['n_pairs']} + quarantined "
        f"{m['n_quarantined']}); held-out pairs: **{m['heldout_pairs']}** from {m['heldout_prompts']} prompts "
        f"(never trained on).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in (
        "avg_gap",
        "n_pairs",
        "decontamination",
        "n_prompts",
        "n_prompts_with_pair",
        "n_reference_pairs",
        "usable_prompt_fraction",
        "n_input",
        "n_quarantined",
        "n_conflicts",
        "n_duplicates",
        "n_mislabeled",
        "n_contaminated",
        "n_overlong",
        "passes",
        "temperature_final",
        "heldout_pairs",
        "heldout_quarantined",
        "heldout_avg_gap",
        "n_responses",
        "n_duplicate_responses",
        "n_empty_responses",
        "truncated_response_fraction",
        "response_tokens_mean",
        "chosen_longer_fraction",
        "length_diff_tokens_mean",
    ):
        if key in m:
            lines.append(f"| {key} | {_fmt(m[key])} |")
    if result.passes:
        lines += [
            "",
            "## Generation passes",
            "",
            "| pass | temperature | seed | prompts | held-out prompts | new prompts with a pair | "
            "candidate pairs | valid pairs | avg gap |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in result.passes:
            lines.append(
                f"| {p.index} | {p.temperature:g} | {p.seed} | {p.prompts} | {p.heldout_prompts} | "
                f"{p.new_prompts_with_pair} | {p.candidate_pairs} | {p.pairs} | {p.avg_gap:.4f} |"
            )
        lines += [
            "",
            f"Regeneration target: avg_gap >= {result.params.min_gap:g} and n_pairs >= "
            f"{result.params.min_pairs} (preference.min_gap / min_pairs); at most "
            f"{result.params.max_extra_passes} extra passes.",
        ]
    lines += ["", "## Preference gap (score_chosen - score_rejected; label-only pairs count as 1.0)", ""]
    lines += _histogram_table(v.gap_histogram, "gap")
    if "judge_scores" in m:
        js = m["judge_scores"]
        lines += [
            "",
            f"## Judge score distribution ({js['n']} judged training responses, mean {js['mean']:.4f}, "
            f"exactly 0: {js['zero']}, exactly 1: {js['one']})",
            "",
        ]
        lines += _histogram_table(js["histogram"], "score")
    lines += ["", "## Lengths of the accepted pairs", ""]
    for unit in ("tokens", "chars"):
        stats = (v.lengths or {}).get(unit)
        if not stats:
            continue
        note = " (prompt: chat-formatted prompt ids; chosen/rejected: response ids + eos)" if unit == "tokens" else ""
        lines += [f"{unit}{note}:", "", "| part | mean | p50 | p95 | max |", "|---|---:|---:|---:|---:|"]
        for part, s in stats.items():
            lines.append(f"| {part} | {s['mean']:.1f} | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']} |")
        lines.append("")
    lines += [
        "## Quarantine",
        "",
        f"{len(result.quarantined)} training rows and {len(result.heldout_quarantined)} "
        f"held-out rows removed ({quarantine_file}: location, field, reason, row).",
        "",
    ]
    reasons = reason_counts(result.quarantined)
    held_reasons = reason_counts(result.heldout_quarantined)
    if reasons or held_reasons:
        lines += ["| reason | training | held-out |", "|---|---:|---:|"]
        for reason in sorted(set(reasons) | set(held_reasons)):
            lines.append(f"| {reason} | {reasons.get(reason, 0)} | {held_reasons.get(reason, 0)} |")
    lines += ["", "## Decontamination", ""]
    if v.decontamination_checked:
        lines += [
            f"{v.n_contaminated} training pairs overlap an evaluation set ({v.ngram}-gram or whole short text "
            f"match); decontamination = {v.decontamination:.4f}.",
            "",
            "| evaluation set | texts | contaminated pairs |",
            "|---|---:|---:|",
        ]
        by_set = m.get("contamination_by_set", {})
        for name, size in result.eval_set_sizes.items():
            lines.append(f"| {name} | {size} | {by_set.get(name, 0)} |")
        if v.contaminated:
            lines += ["", "First contaminated pairs:", ""]
            lines += [f"- `{c['id']}` at {c['location']}: {', '.join(c['eval_sets'])}" for c in v.contaminated[:20]]
            if len(v.contaminated) > 20:
                lines.append(f"- ... and {len(v.contaminated) - 20} more (see {quarantine_file})")
    else:
        lines.append("No evaluation texts were given: decontamination was not checked.")
    if v.conflicts:
        lines += [
            "",
            "## Conflicts",
            "",
            f"{len(v.conflicts)} conflicts resolved with rule `{result.params.conflict_rule}`.",
        ]
    return "\n".join(lines) + "\n"
