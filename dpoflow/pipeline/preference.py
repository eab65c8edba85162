"""Stage 2: preference data. Sample K responses per prompt from the SFT model, judge them, build chosen/rejected pairs
(training and held-out), validate them, regenerate on weak data (dpoflow.data.collect); or, with imported labels,
load, split and validate them. Then write the pairs, the quarantine, the report and the metrics the gate reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoflow.data.collect import collect_pairs
from dpoflow.data.judges import Judge
from dpoflow.data.pairs import write_pairs, write_quarantine
from dpoflow.data.preference_result import PreferenceResult
from dpoflow.reporting.preference_report import render_preference_report
from dpoflow.runtime import io
from dpoflow.runtime.params import Params


@dataclass(frozen=True)
class PreferenceOutputs:
    """Where Stage 2 writes (the stage script names the paths)."""

    pairs: Path
    pairs_jsonl: Path
    heldout_pairs: Path
    quarantine: Path
    report: Path
    detail: Path  # every statistic (JSON), beside the Markdown report
    metrics: Path  # the few numbers a person compares (`metric_keys` of the detail)
    perf: Path


def run(
    p: Params,
    judge: Judge,
    *,
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    heldout_items: Sequence[Mapping[str, Any]],
    eval_texts: dict[str, list[str]] | None,
    items_origin: str,
    heldout_origin: str,
    log: Callable[[str], None],
) -> PreferenceResult:
    return collect_pairs(
        p.preference,
        judge,
        seed=p.seed,
        system_prompt=p.data.system_prompt or None,
        model=model,
        tokenizer=tokenizer,
        items=items,
        heldout_items=heldout_items,
        eval_texts=eval_texts,
        items_origin=items_origin,
        heldout_origin=heldout_origin,
        log=log,
    )


def judge_info(judge: Judge) -> dict:
    """What a judge reports beside the pairs: the llm judge's position-bias rate, what an import read."""
    info = dict(getattr(judge, "info", {}) or {})
    rate = getattr(judge, "position_bias_rate", None)
    if rate is not None:
        info["judge_position_bias_rate"] = rate
    return info


def write_outputs(
    result: PreferenceResult,
    out: PreferenceOutputs,
    *,
    metric_keys: Sequence[str],
    perf_extra: Mapping[str, Any],
    judge_info: Mapping[str, Any] | None = None,
) -> dict:
    """Write every Stage 2 artifact atomically; returns the detail (every statistic)."""
    write_pairs(result.pairs, out.pairs, out.pairs_jsonl)
    write_pairs(result.heldout_pairs, out.heldout_pairs)
    write_quarantine(result.all_quarantined, out.quarantine)
    info = dict(judge_info or {})  # what the judge reports (position bias; an import's format, fingerprint, rows)
    metrics = {**result.metrics(), **{k: v for k, v in info.items() if k.startswith("judge_")}, "judge_info": info}
    io.write_text(out.report, render_preference_report(result, metrics, quarantine_file=str(out.quarantine)))
    io.write_json(out.detail, metrics)
    io.write_json(out.metrics, io.headline(metrics, metric_keys))
    io.write_json(out.perf, {**result.perf, **dict(perf_extra)})
    return metrics
