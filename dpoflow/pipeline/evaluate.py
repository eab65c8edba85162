"""Stage 7: the final model against the SFT model (retention, win rate with its interval, KL, held-out gap,
contamination audit), then the deploy decision and the report.

The measuring run reads no threshold (editing one reruns only the light decision and the gate); `decide` applies
gate `evaluate`'s checks (eval.deploy) and writes the report, also when the gate then fails.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from dpoflow.data.decontamination import find_contaminated_pairs
from dpoflow.data.judges import Judge
from dpoflow.eval.deploy import deploy_decision
from dpoflow.eval.measure import Probe, measure_policy
from dpoflow.eval.retention import retention
from dpoflow.eval.win_rate import baseline_texts_for, decoding_name, decodings, head_to_head
from dpoflow.runtime import io
from dpoflow.runtime.params import Params


@dataclass
class Evaluation:
    """What Stage 7 compares: the final and the SFT model on the same prompts, judged by one judge."""

    params: Params
    final_model: nn.Module
    sft_model: nn.Module  # the KL reference
    tokenizer: Any
    judge: Judge
    judge_name: str  # as reported (which judge, and why)
    items: Sequence[Mapping[str, Any] | None]  # per win-rate prompt: its task item (None without a verifier)
    prompts: Sequence[list[dict]]  # the win-rate prompts (chat messages)
    baseline_responses: Sequence[Mapping[str, Any]]  # the SFT model's, both decodings (win_rate.baseline_responses)
    probe: Probe  # KL and held-out gap, as every stage measures them
    final_benchmarks: Mapping[str, float]
    baseline_benchmarks: Mapping[str, float]
    pair_sets: Mapping[str, Sequence[Mapping[str, Any]]]  # every training pair set, by file (contamination audit)
    eval_texts: Mapping[str, Sequence[str]]


def run_evaluation(ev: Evaluation) -> tuple[dict, list[dict], dict]:
    """(metrics, judgments, perf): retention of the benchmarks; the win rate of the final model's responses over the
    SFT model's, decoded at evaluate.win_rate_temperature (gated; judgments returned) and with the other decoding
    (reported only; win_rate.decodings); KL(final || SFT) and the held-out gap (measure_policy); the contamination
    audit of every training pair set."""
    p = ev.params
    pe, max_tokens = p.evaluate, p.preference.max_tokens
    t0 = time.perf_counter()
    ret = retention(ev.final_benchmarks, ev.baseline_benchmarks)
    (wr, judgments), (wr_other, _) = (
        head_to_head(
            ev.final_model,
            ev.tokenizer,
            ev.judge,
            ev.items,
            ev.prompts,
            baseline_texts_for(ev.baseline_responses, ev.items, temperature),
            max_tokens,
            temperature,
            p.seed,
            pe.bootstrap_samples,
            p.gates.confidence,
        )
        for temperature in decodings(pe.win_rate_temperature)
    )
    t1 = time.perf_counter()
    measured, _ = measure_policy(ev.final_model, ev.tokenizer, ev.probe, ev.sft_model)
    t2 = time.perf_counter()
    ngram = p.preference.decontamination_ngram
    contaminated = find_contaminated_pairs(ev.pair_sets, ev.eval_texts, ngram)
    t3 = time.perf_counter()
    by_file = {name: sum(1 for c in contaminated if c["file"] == name) for name in ev.pair_sets}
    metrics = {
        "retention": ret["retention"],
        "retention_per_benchmark": ret["retention_per_benchmark"],
        "retention_notes": ret["notes"],
        "retention_lowest_benchmark": ret["lowest_benchmark"],
        "benchmarks": dict(ev.final_benchmarks),
        "baseline_benchmarks": dict(ev.baseline_benchmarks),
        "win_rate": wr["win_rate"],
        "win_rate_ci_low": wr["ci_low"],
        "win_rate_ci_high": wr["ci_high"],
        "win_rate_sign_p": wr.get("sign_test_p"),  # exact sign test on the non-tied outcomes (two-sided)
        "win_rate_detail": {
            k: wr[k] for k in ("n", "wins", "ties", "losses", "bootstrap_samples", "confidence", "seed")
        }
        | {"judge": ev.judge_name, "max_tokens": max_tokens, "decoding": decoding_name(pe.win_rate_temperature)},
        "win_rate_other_decoding": {
            "decoding": decoding_name(decodings(pe.win_rate_temperature)[1]),
            "win_rate": wr_other["win_rate"],
            "ci_low": wr_other["ci_low"],
            "ci_high": wr_other["ci_high"],
            **{k: wr_other[k] for k in ("n", "wins", "ties", "losses")},
        },
        **measured,
        "contaminated_pairs": len(contaminated),
        "contamination": {
            "n_pairs_checked": sum(len(v) for v in ev.pair_sets.values()),
            "by_file": by_file,
            "ngram": ngram,
            "eval_sets": {k: len(v) for k, v in sorted(ev.eval_texts.items())},
            "first": contaminated[:20],
        },
    }
    perf = {"win_rate_seconds": t1 - t0, "kl_and_gap_seconds": t2 - t1, "contamination_seconds": t3 - t2}
    return io.json_safe(metrics), judgments, perf


def decide(metrics: Mapping[str, Any], p: Params, iterate_metrics: Mapping[str, Any] | None) -> dict:
    """The deploy decision from Stage 7's metrics and the thresholds (eval.deploy)."""
    return deploy_decision(metrics, p, iterate_metrics, metrics.get("baseline_benchmarks") or {})
