"""Stage 6: iterative training. On-policy rounds from the Stage 5 policy: fresh prompts (data/tasks/rounds.jsonl),
judged, validated (Stage 2's checks), reference log-probs, a DPO pass (Stage 5's train_dpo, KL rule included);
after each round KL / held-out gap / task accuracy / benchmarks against SFT, compared with the previous round:
continue, roll back (and stop) or stop as converged. Writes models/selected (the best eligible round), the round
pairs and quarantine (data/rounds/), metrics/iterate.json, dvclive/iterate (step = round) and reports/iterate.md."""
import logging
import shutil
from pathlib import Path

import click
import mlx.core as mx
from dvclive import Live

from dpoflow import benchmarks, dpo, io, judges, models, tasks
from dpoflow.data import read_pairs, write_pairs, write_quarantine
from dpoflow.iterate import (EvalContext, IterateSettings, log_rounds, make_pair_gate, render_iterate_report,
                             run_iteration, save_selected)
from dpoflow.params import load_params
from dpoflow.policy import kl_prompt_messages, read_ref_logps
from dpoflow.preference import PreferenceConfig, collect_eval_texts

SFT = Path("models/sft")
DPO = Path("models/dpo")
REWARD = Path("models/reward")
SPLITS = Path("data/tasks")
ROUNDS = SPLITS / "rounds.jsonl"
HELDOUT_TASKS = SPLITS / "heldout.jsonl"
HELDOUT_PAIRS = Path("data/heldout_pairs.parquet")
REF_LOGPS = Path("data/ref_logps.safetensors")
OUT = Path("models/selected")
ROUND_PAIRS = Path("data/rounds")
WORK = Path("checkpoints/iterate")  



@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def main(params_path: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    p = load_params(params_path)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    s = IterateSettings.from_params(p, batch_size)
    pp = p.preference
    reward_path = Path(getattr(pp, "reward_model_path", REWARD))
    judge = judges.make_judge(pp.judge, import_path=pp.import_path, batch_size=batch_size,
                              reward_model_path=reward_path)
    if s.rounds > 0 and not judge.generates:
        raise click.ClickException("iterative training judges the policy's own samples: preference.judge must be "
                                   "verifier or reward_model, not import; set iterate.rounds: 0 to skip Stage 6")
    sft_hash = models.model_hash(SFT)
    round_items = tasks.read_split(ROUNDS)
    heldout_items = tasks.read_split(HELDOUT_TASKS)
    heldout_pairs = read_pairs(HELDOUT_PAIRS)
    heldout_cache = read_ref_logps(REF_LOGPS, {"heldout": heldout_pairs}, max_len=p.preference.max_seq_len,
                                   reference_hash=sft_hash)["heldout"]
    sft_model, _ = models.load_model(SFT, dtype=p.model.dtype)
    sft_model.freeze()
    template_items = tasks.read_split(SPLITS / "pref_prompts.jsonl") + round_items
    eval_texts = collect_eval_texts(SPLITS, template_items=template_items)

    def benchmark_fn(model_dir: Path) -> dict:  # same tasks and settings as Stage 1 (stages/sft.py)
        bench = benchmarks.run_benchmarks(model_dir, p.benchmarks.tasks, include_path=SPLITS / "lm_eval",
                                          limit=p.benchmarks.limit, seed=p.seed, batch_size=p.benchmarks.batch_size)
        return {name: r["score"] for name, r in bench.items()}

    ctx = EvalContext(sft_dir=SFT, sft_model=sft_model,
                      kl_prompts=kl_prompt_messages(heldout_items, p.init.kl_prompts, p.data.system_prompt),
                      heldout_pairs=heldout_pairs, heldout_sft_logps=heldout_cache, heldout_items=heldout_items,
                      beta=p.dpo.beta, length_normalize=p.dpo.length_normalize,
                      benchmark_fn=benchmark_fn if p.benchmarks.tasks else None, work_dir=WORK)
    dpo_params = {k: getattr(p.dpo, k) for k in dpo.STAGE_KEYS}
    fingerprint = repr((s, dpo_params, p.preference, p.init, p.benchmarks, p.seed, batch_size,
                        io.files_hash(SFT, DPO, ROUNDS, HELDOUT_TASKS, HELDOUT_PAIRS, SPLITS / "lm_eval")
                        + (io.files_hash(reward_path) if pp.judge == "reward_model" else "")))
    result = run_iteration(
        sft_dir=SFT, dpo_dir=DPO, round_items=round_items, judge=judge,
        preference_config=PreferenceConfig.from_params(p), eval_texts=eval_texts,
        pair_gate=make_pair_gate(p, s.min_pairs), dpo_params=p.dpo, settings=s, ctx=ctx, work_dir=WORK,
        fingerprint=fingerprint, rounds_origin=str(ROUNDS), log=click.echo)

    with io.atomic_path(ROUND_PAIRS) as tmp:  # every round's pairs (Stage 7 checks their contamination)
        tmp.mkdir(parents=True)
        for k, pairs in sorted(result.pairs.items()):
            write_pairs(pairs, tmp / f"round_{k}.parquet")
        write_quarantine(result.quarantined, tmp / "quarantine.jsonl")  # screened-out prompts, rejected pairs
    selected = result.selected
    save_selected(OUT, result.chains[result.selected_round], {
        "round": result.selected_round, "reference": selected.get("reference"),
        "iterate_reference": s.reference, "reference_hash": sft_hash, "sft": str(SFT),
        "chain_rounds": list(range(len(result.chains[result.selected_round])))
        if s.reference == "previous" else [result.selected_round]})
    metrics = {**result.metrics(), "chip": chip, "batch_size": batch_size}
    io.write_json("metrics/iterate.json", metrics)
    io.write_json("metrics/perf/iterate.json", {**result.perf, "chip": chip, "batch_size": batch_size})
    io.write_text("reports/iterate.md", render_iterate_report(metrics))
    shutil.rmtree("dvclive/iterate", ignore_errors=True)  # curves of this run only
    with Live("dvclive/iterate", save_dvc_exp=False, dvcyaml=None, report=None) as live:
        log_rounds(live, result.rounds)
    shutil.rmtree(WORK, ignore_errors=True)  # artifacts are written: nothing left to resume
    click.echo(f"iterate: {result.decision}; selected round {result.selected_round} (KL {metrics['selected_kl']}, "
               f"held-out gap {metrics['selected_heldout_gap']}); {metrics['n_rounds_run']} round(s) run")


if __name__ == "__main__":
    main()
