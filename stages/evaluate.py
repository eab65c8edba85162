"""Stage 7: evaluation, report and deploy decision.

    python stages/evaluate.py                      # DVC stage `evaluate`: export models/final (adapters fused),
                                                   # benchmarks -> retention, win rate + CI vs SFT, KL, held-out gap,
                                                   # contamination audit, blind human-eval sheet; metrics/evaluate.json
                                                   # (numbers), reports/evaluate.json (detail)
    python stages/evaluate.py --decide             # DVC stage `gate_evaluate` (before stages/gate.py evaluate):
                                                   # reports/deploy.json, report.md, report.html (reads the thresholds)
    python stages/evaluate.py --human-ratings reports/human_eval_sheet.csv [--key reports/human_eval_key.json]
                                                   # import filled-in human ratings: the same win-rate function;
                                                   # prints it and writes reports/human_eval.json

The measuring run reads no threshold (editing one re-runs only the light decision + gate); `--decide` applies
the gate's checks (dpoflow.eval.deploy) and always writes the report, also when the gate then fails.
"""

import time
from pathlib import Path

import click
import mlx.core as mx

from dpoflow.data import tasks
from dpoflow.data.decontamination import collect_eval_texts
from dpoflow.data.formats import read_pairs
from dpoflow.data.prompts import prompt_of
from dpoflow.eval import benchmarks
from dpoflow.eval.human import export_human_sheet, import_human_ratings
from dpoflow.eval.measure import kl_prompt_messages, make_probe
from dpoflow.eval.retention import paired_benchmark_retention
from dpoflow.eval.weakness import breakdown_deltas, judged_breakdown
from dpoflow.eval.win_rate import baseline_texts_for, decodings
from dpoflow.modeling import loading
from dpoflow.modeling.chain import export_final
from dpoflow.modeling.reference import read_ref_logps
from dpoflow.pipeline.evaluate import Evaluation, decide, run_evaluation
from dpoflow.reporting.charts import read_tsv
from dpoflow.reporting.qualitative import qualitative_rows, sheet_indices
from dpoflow.reporting.report import CURVES, ReportInputs, input_lines, write_report
from dpoflow.runtime import io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import UserError, user_errors
from dpoflow.runtime.params import input_folder, load_params

from judging import judge_for

SFT = Path("models/sft")
SELECTED = Path("models/selected")
FINAL = Path("models/final")
SPLITS = Path("data/tasks")
PAIRS = Path("data/pairs.parquet")
ROUND_PAIRS = Path("data/rounds")
HELDOUT_PAIRS = Path("data/heldout_pairs.parquet")
REF_LOGPS = Path("data/ref_logps.safetensors")
SFT_RESPONSES = Path("data/sft_responses.jsonl")  # stage sft_responses: the baseline side of the win rate
JUDGMENTS = Path("data/evaluation/judgments.jsonl")
REPORTS = Path("reports")
SHEET = REPORTS / "human_eval_sheet.csv"
KEY = REPORTS / "human_eval_key.json"
QUALITATIVE = REPORTS / "qualitative.json"
METRICS = Path("metrics/evaluate.json")
DETAIL = REPORTS / "evaluate.json"
METRIC_KEYS = {
    "retention": "retention",
    "retention_ci_low": "retention_ci_low",
    "win_rate": "win_rate",
    "win_rate_ci_low": "win_rate_ci_low",
    "final_kl": "kl",
    "final_kl_ci_high": "kl_ci_high",
    "final_heldout_gap": "heldout_gap",
    "final_heldout_gap_ci_low": "heldout_gap_ci_low",
    "contaminated_pairs": "contaminated_pairs",
    "win_rate_position_bias": "judge_position_bias_rate",
}  # and final_<task> per benchmark (Stage 1 wrote bench_<task>)
DEPLOY_METRICS = Path("metrics/deploy.json")
SFT_DETAIL = REPORTS / "sft.json"  # the baseline benchmark scores
ITERATE_DETAIL = REPORTS / "iterate.json"
INPUTS = SPLITS / "inputs.json"


def _measure(p) -> None:
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    items = tasks.read_split(SPLITS / "eval.jsonl")[: p.evaluate.win_rate_prompts]
    sft_responses = io.read_jsonl(SFT_RESPONSES)
    for temperature in decodings(p.evaluate.win_rate_temperature):
        try:
            baseline_texts_for(sft_responses, items, temperature)
        except ValueError as exc:  # run by hand after a params edit, without `dvc repro`
            raise UserError(f"{SFT_RESPONSES}: {exc}") from exc
    t0 = time.perf_counter()
    info = export_final(SFT, SELECTED, FINAL, dtype=p.model.dtype)
    click.echo(f"exported round {info['selected_round']} -> {FINAL} (standalone mlx-lm folder, adapters fused)")
    t1 = time.perf_counter()
    bench = benchmarks.run_benchmarks_per_document(
        FINAL,
        p.benchmarks.tasks,
        include_path=[SPLITS / "lm_eval", input_folder(p, "benchmarks")],
        limit=p.benchmarks.limit,
        seed=p.seed,
        batch_size=p.benchmarks.batch_size,
    )
    final_scores = {name: r["score"] for name, r in bench.items()}
    sft_detail = io.read_json(SFT_DETAIL)
    baseline = sft_detail.get("benchmarks") or {}
    t2 = time.perf_counter()

    final_model, tokenizer = loading.load_model(FINAL, dtype=p.model.dtype)  # loads exactly what is shipped
    sft_model, _ = loading.load_model(SFT, dtype=p.model.dtype)
    final_model.freeze()
    sft_model.freeze()
    pp = p.preference
    judge, judge_name = judge_for(p, "evaluate", batch_size)
    heldout_items = tasks.read_split(SPLITS / "heldout.jsonl")
    heldout_pairs = read_pairs(HELDOUT_PAIRS)
    heldout_cache = read_ref_logps(
        REF_LOGPS, {"heldout": heldout_pairs}, max_len=pp.max_seq_len, reference_hash=loading.model_hash(SFT)
    )["heldout"]
    pair_sets = {str(PAIRS): read_pairs(PAIRS)}
    for path in sorted(ROUND_PAIRS.glob("round_*.parquet")):
        pair_sets[str(path)] = read_pairs(path)
    template_items = tasks.read_split(SPLITS / "pref_prompts.jsonl") + tasks.read_split(SPLITS / "rounds.jsonl")
    kl_prompts = kl_prompt_messages(heldout_items, p.init.kl_prompts, p.data.system_prompt)
    ev = Evaluation(
        params=p,
        final_model=final_model,
        sft_model=sft_model,
        tokenizer=tokenizer,
        judge=judge,
        judge_name=judge_name,
        items=items,
        prompts=[prompt_of(item, p.data.system_prompt or None) for item in items],
        baseline_responses=sft_responses,
        probe=make_probe(p, tokenizer, kl_prompts, heldout_pairs, heldout_cache, batch_size),
        final_benchmarks=final_scores,
        baseline_benchmarks=baseline,
        pair_sets=pair_sets,
        eval_texts=collect_eval_texts(SPLITS, template_items=template_items),
    )
    metrics, judgments, perf = run_evaluation(ev)
    # Retention paired by document (the same documents as Stage 1's): its interval is what the gate can bound.
    # With no informative task the point stays the ratio of the flat scores and the bound is undefined.
    base_docs = {t: d for t, d in (sft_detail.get("benchmark_documents") or {}).items() if d and t in bench}
    paired = paired_benchmark_retention(
        base_docs,
        {t: bench[t]["docs"] for t in base_docs},
        None,
        confidence=p.gates.confidence,
        samples=p.evaluate.bootstrap_samples,
        seed=p.seed,
    )
    metrics |= {"retention_of_flat_scores": metrics["retention"], **paired}
    if paired["retention_pooled"] is not None:
        metrics["retention"] = paired["retention_pooled"]
    if getattr(judge, "position_bias_rate", None) is not None:  # the llm judge: how often the order decided
        metrics["judge_position_bias_rate"] = judge.position_bias_rate
    sft_by_category = judged_breakdown(items, judgments, "score_baseline", seed=p.seed)
    final_by_category = judged_breakdown(items, judgments, "score_final", seed=p.seed)
    metrics["categories"] = {
        "sft": sft_by_category,
        "final": final_by_category,
        "deltas": breakdown_deltas(sft_by_category, final_by_category),
    }
    io.write_jsonl(JUDGMENTS, judgments)
    examples = qualitative_rows(judgments, seed=p.seed)  # the report's side-by-side rows, first in the sheet too
    io.write_json(QUALITATIVE, examples)
    export_human_sheet(
        judgments,
        SHEET,
        KEY,
        p.evaluate.human_eval_sheet,
        seed=p.seed,
        bootstrap_samples=p.evaluate.bootstrap_samples,
        meta={"final": str(FINAL), "baseline": str(SFT), "prompts": str(SPLITS / "eval.jsonl")},
        include=sheet_indices(examples),
    )
    detail = {
        **metrics,
        "selected_round": info["selected_round"],
        "selected_reference": info["reference"],
        "final_model_hash": info["model_hash"],
        "chip": chip,
        "batch_size": batch_size,
    }
    io.write_json(DETAIL, detail)
    io.write_json(
        METRICS,
        {**io.headline(detail, METRIC_KEYS), **{f"final_{name}": score for name, score in final_scores.items()}},
    )
    io.write_json(
        REPORTS / "perf" / "evaluate.json",
        {
            **perf,
            "export_seconds": t1 - t0,
            "benchmark_seconds": t2 - t1,
            "total_seconds": time.perf_counter() - t0,
            "chip": chip,
            "batch_size": batch_size,
            "environment": numerics_environment(),
        },
    )
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    click.echo(
        f"evaluate: retention {fmt(metrics['retention'])} %, win rate {fmt(metrics['win_rate'])} "
        f"[{fmt(metrics['win_rate_ci_low'])}, {fmt(metrics['win_rate_ci_high'])}], KL {fmt(metrics['kl'])}, "
        f"held-out gap {fmt(metrics['heldout_gap'])}, contaminated pairs {metrics['contaminated_pairs']}"
    )


def _provenance(p, metrics: dict) -> list[str]:
    """Which data and which judge each number of the report comes from."""
    if p.data.source == "embedded":
        lines = [f"Data: the embedded task (reasoning-gym, seed {p.seed}): {SPLITS}/*.jsonl"]
    else:
        lines = [f"Data: your files (data.source: files), read by prepare_data into {SPLITS}/:"]
        lines += input_lines(io.read_json(INPUTS))
    pp = p.preference
    pairs = f"imported from {pp.import_path} ({pp.import_format})" if pp.judge == "import" else f"judge {pp.judge}"
    lines.append(f"Stage 2 preference pairs: {pairs}")
    lines.append(f"Stage 6 rounds judged by {p.stage_judge('iterate')}")
    detail = metrics.get("win_rate_detail") or {}
    lines.append(
        f"Stage 7 win rate judged by {detail.get('judge', p.stage_judge('evaluate'))} on the eval split "
        f"({detail.get('n', '?')} prompts); benchmarks: {', '.join(p.benchmarks.tasks) or 'none'}"
    )
    return lines


def _decide(p) -> dict:
    metrics = {**io.read_json(DETAIL), **io.read_json(METRICS)}  # the detail, and the numbers the gate reads
    iterate = io.read_json(ITERATE_DETAIL) if ITERATE_DETAIL.is_file() else None
    deploy = {**decide(metrics, p, iterate), "model": str(FINAL)}
    curves = {
        chart: {
            name: read_tsv(Path("dvclive") / stage / "plots" / "metrics" / f"{key}.tsv")
            for name, (stage, key) in series.items()
        }
        for chart, series in CURVES.items()
    }
    io.write_json(REPORTS / "deploy.json", deploy)
    io.write_json(DEPLOY_METRICS, {"deploy": int(deploy["deploy"])})
    write_report(
        REPORTS,
        ReportInputs(
            evaluate=metrics,
            deploy=deploy,
            iterate=iterate,
            curves=curves,
            params=p,
            provenance=_provenance(p, metrics),
            qualitative=io.read_json(QUALITATIVE) if QUALITATIVE.is_file() else [],
            files={
                "final_model": str(FINAL),
                "deploy": str(REPORTS / "deploy.json"),
                "sheet": str(SHEET),
                "key": str(KEY),
            },
        ),
    )
    return deploy


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option(
    "--decide",
    "decide_only",
    is_flag=True,
    help="Write reports/deploy.json, report.md and report.html from the metrics.",
)
@click.option(
    "--human-ratings",
    "ratings",
    type=click.Path(exists=True, dir_okay=False),
    help="A filled-in human_eval_sheet.csv: print the human win rate (same function as the automatic one).",
)
@click.option(
    "--key",
    "key_path",
    default=str(KEY),
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The sheet's key (which side is which model), for --human-ratings.",
)
@user_errors
def main(params_path: str, decide_only: bool, ratings: str | None, key_path: str) -> None:
    p = load_params(params_path)
    if ratings:
        result = import_human_ratings(ratings, key_path)
        io.write_json("reports/human_eval.json", result)
        fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        click.echo(
            f"human win rate {fmt(result['win_rate'])} [{fmt(result['ci_low'])}, {fmt(result['ci_high'])}] "
            f"from {result['rated']} rated rows ({result['wins']} wins, {result['ties']} ties, "
            f"{result['losses']} losses; {result['unrated']} not rated) -> reports/human_eval.json"
        )
        ok = result["ci_low"] is not None and result["ci_low"] > p.evaluate.min_win_rate_lower
        click.echo(
            "alignment improved by human judgment (lower bound > evaluate.min_win_rate_lower)"
            if ok
            else "no clear improvement by human judgment (lower bound <= evaluate.min_win_rate_lower)"
        )
        return
    if decide_only:
        deploy = _decide(p)
        click.echo(f"deploy: {str(deploy['deploy']).lower()} -> {REPORTS / 'deploy.json'}, {REPORTS / 'report.html'}")
        for reason in deploy["reasons"]:
            click.echo(f"  - {reason}")
        if deploy.get("rollback"):
            click.echo(f"  rollback: {deploy['rollback']['prescription']}")
        return
    _measure(p)


if __name__ == "__main__":
    main()
