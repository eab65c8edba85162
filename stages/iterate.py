"""Stage 6: iterative training. On-policy rounds from the Stage 5 policy: fresh prompts (data/tasks/rounds.jsonl),
judged, validated (Stage 2's checks), reference log-probs, a DPO pass (Stage 5's training, KL rule included);
after each round KL / held-out gap / task accuracy / benchmarks against SFT, compared with the previous round:
continue, roll back (and stop) or stop as converged. Writes models/selected (the best eligible round), the round
pairs and quarantine (data/rounds/), metrics/iterate.json (the selected round's numbers), reports/iterate.json (every
round), reports/iterate.md and dvclive/iterate (step = round)."""

import logging
import shutil
from pathlib import Path

import click
import mlx.core as mx

from dpoflow.data import tasks
from dpoflow.data.decontamination import collect_eval_texts
from dpoflow.data.formats import read_pairs
from dpoflow.data.pairs import write_pairs, write_quarantine
from dpoflow.data.prompts import reference_of
from dpoflow.eval import benchmarks
from dpoflow.eval.measure import kl_prompt_messages, make_probe
from dpoflow.eval.rounds import finite
from dpoflow.eval.weakness import TargetedPrompts, greedy_responses, policy_breakdown
from dpoflow.modeling import loading
from dpoflow.modeling.chain import save_selected
from dpoflow.modeling.reference import read_ref_logps
from dpoflow.pipeline.iterate import Rounds, run_iteration
from dpoflow.reporting.iterate_report import render_iterate_report
from dpoflow.runtime import io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import input_folder, load_params
from dpoflow.training.dpo import STAGE_KEYS

from judging import STAGE4_REWARD_MODEL, judge_for
from live_logger import DvcLiveLogger, live_logger
from resume import run_fingerprint

SFT = Path("models/sft")
DPO = Path("models/dpo")
SPLITS = Path("data/tasks")
ROUNDS = SPLITS / "rounds.jsonl"
HELDOUT_TASKS = SPLITS / "heldout.jsonl"
HELDOUT_PAIRS = Path("data/heldout_pairs.parquet")
REF_LOGPS = Path("data/ref_logps.safetensors")
OUT = Path("models/selected")
ROUND_PAIRS = Path("data/rounds")
METRIC_KEYS = (
    "selected_round",
    "selected_kl",
    "selected_kl_ci_high",
    "selected_heldout_gap",
    "selected_heldout_gap_ci_low",
    "n_rounds_run",
)  # and rolled_back (0/1)
WORK = Path("checkpoints/iterate")  # round states of a killed run (not a DVC output)


def log_rounds(logger: DvcLiveLogger | None, rounds: list[dict]) -> None:
    """Curves across rounds (one step per round): the measurements and the pairs of every round."""
    if logger is None:
        return
    for record in rounds:
        values = {
            key: record.get(key)
            for key in ("kl", "heldout_gap", "heldout_accuracy", "heldout_margin", "task_accuracy", "benchmark_mean")
        }
        pairs = record.get("pairs") or {}
        values["n_pairs"] = pairs.get("n_pairs")
        values["pairs_avg_gap"] = pairs.get("avg_gap")
        train = (record.get("dpo") or {}).get("train") or {}
        values["train_margin"] = train.get("rewards/margins")
        logger.log_step({key: float(value) for key, value in values.items() if finite(value)})


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    p = load_params(params_path)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    pp, it = p.preference, p.iterate
    judge, judge_name = judge_for(p, "iterate", batch_size)
    click.echo(f"judge: {judge_name}")
    sft_hash = loading.model_hash(SFT)
    round_items = tasks.read_split(ROUNDS)
    heldout_items = tasks.read_split(HELDOUT_TASKS)
    heldout_pairs = read_pairs(HELDOUT_PAIRS)
    heldout_cache = read_ref_logps(
        REF_LOGPS, {"heldout": heldout_pairs}, max_len=pp.max_seq_len, reference_hash=sft_hash
    )["heldout"]
    sft_model, tokenizer = loading.load_model(SFT, dtype=p.model.dtype)
    sft_model.freeze()
    template_items = tasks.read_split(SPLITS / "pref_prompts.jsonl") + round_items
    eval_texts = collect_eval_texts(SPLITS, template_items=template_items)

    def benchmark_fn(model_dir: Path) -> dict:  # Stage 1's tasks, on iterate.benchmark_limit documents
        bench = benchmarks.run_benchmarks(
            model_dir,
            p.benchmarks.tasks,
            include_path=[SPLITS / "lm_eval", input_folder(p, "benchmarks")],
            limit=it.benchmark_limit,  # a round's regression watch; Stage 7 measures the final model in full
            seed=p.seed,
            batch_size=p.benchmarks.batch_size,
        )
        return {name: r["score"] for name, r in bench.items()}

    kl_prompts = kl_prompt_messages(heldout_items, p.init.kl_prompts, p.data.system_prompt)
    probe = make_probe(
        p,
        tokenizer,
        kl_prompts,
        heldout_pairs,
        heldout_cache,
        batch_size,
        accuracy_items=[i for i in heldout_items if reference_of(i) is not None],
    )
    dpo_params = {k: getattr(p.dpo, k) for k in STAGE_KEYS}
    fingerprint = repr(
        (
            it,
            dpo_params,
            p.preference,
            p.init,
            p.benchmarks,
            p.seed,
            batch_size,
            io.files_hash(SFT, DPO, ROUNDS, HELDOUT_TASKS, HELDOUT_PAIRS, SPLITS / "lm_eval")
            + (io.files_hash(STAGE4_REWARD_MODEL) if judge.name == "reward_model" else ""),
        )
    )
    categorize = None
    if judge.generates:  # the per-category results every round records (and targeting reads)
        settings = {"system_prompt": p.data.system_prompt or None, "max_tokens": pp.max_tokens, "seed": p.seed}
        baseline = greedy_responses(sft_model, tokenizer, heldout_items, **settings) if judge.relative else None

        def categorize(model, tok) -> dict:
            return policy_breakdown(model, tok, judge, heldout_items, baseline=baseline, **settings)

    chooser = TargetedPrompts(it.prompts_per_round, floor=it.target_floor, seed=p.seed) if it.targeted else None
    ctx = Rounds(
        params=p,
        batch_size=batch_size,
        sft_dir=SFT,
        sft_model=sft_model,
        judge=judge,
        probe=probe,
        heldout_pairs=heldout_pairs,
        eval_texts=eval_texts,
        work_dir=WORK,
        benchmark_fn=benchmark_fn if p.benchmarks.tasks else None,
        fingerprint=run_fingerprint("iterate", fingerprint),  # + the DVC run's identity (issue 21)
        log=click.echo,
        choose_prompts=chooser,
        categorize=categorize,
    )
    result = run_iteration(ctx, DPO, round_items, origin=str(ROUNDS))

    with io.atomic_path(ROUND_PAIRS) as tmp:  # every round's pairs (Stage 7 checks their contamination)
        tmp.mkdir(parents=True)
        for k, pairs in sorted(result.pairs.items()):
            write_pairs(pairs, tmp / f"round_{k}.parquet")
        write_quarantine(result.quarantined, tmp / "quarantine.jsonl")  # screened-out prompts, rejected pairs
    selected = result.selected
    save_selected(
        OUT,
        result.chains[result.selected_round],
        {
            "round": result.selected_round,
            "reference": selected.get("reference"),
            "iterate_reference": it.reference,
            "reference_hash": sft_hash,
            "sft": str(SFT),
            "chain_rounds": list(range(len(result.chains[result.selected_round])))
            if it.reference == "previous"
            else [result.selected_round],
        },
    )
    detail = {**result.metrics(), "chip": chip, "batch_size": batch_size}
    if chooser is not None:  # per targeted round: its weights and whether the targeted categories moved
        detail["targeting"] = {
            "floor": it.target_floor,
            "rounds": {str(k): h["weights"] for k, h in sorted(chooser.history.items())},
            "summaries": {str(k): s for k, s in chooser.summaries(result.rounds[-1].get("categories")).items()},
        }
    io.write_json("reports/iterate.json", detail)  # every round's record, the settings and the analysis
    io.write_json(
        "metrics/iterate.json",
        {**io.headline(detail, METRIC_KEYS), "rolled_back": int(result.decision == "rolled_back")},
    )
    io.write_json(
        "reports/perf/iterate.json",
        {**result.perf, "chip": chip, "batch_size": batch_size, "environment": numerics_environment()},
    )
    io.write_text("reports/iterate.md", render_iterate_report(detail))
    with live_logger("dvclive/iterate", fresh=True) as logger:  # curves of this run only
        log_rounds(logger, result.rounds)
    shutil.rmtree(WORK, ignore_errors=True)  # artifacts are written: nothing left to resume
    click.echo(
        f"iterate: {result.decision}; selected round {result.selected_round} (KL {detail['selected_kl']}, "
        f"held-out gap {detail['selected_heldout_gap']}); {detail['n_rounds_run']} round(s) run"
    )


if __name__ == "__main__":
    main()
