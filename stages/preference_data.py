"""Stage 2: preference data. Sample K responses per prompt from the SFT model, judge them, build chosen/rejected
pairs (training and held-out), validate them (lengths, conflicts, duplicates, decontamination against every
evaluation set), regenerate on weak data, and write the pairs, the quarantine, the data report and the metrics the
gate reads. With `preference.judge: import`, load `preference.import_path` instead of generating."""

from pathlib import Path

import click

from dpoflow.data import tasks
from dpoflow.data.decontamination import collect_eval_texts
from dpoflow.modeling import loading
from dpoflow.pipeline import preference
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params

from judging import judge_for

SPLITS = Path("data/tasks")
PROMPTS = SPLITS / "pref_prompts.jsonl"
HELDOUT = SPLITS / "heldout.jsonl"
MODEL = Path("models/sft")
OUT = preference.PreferenceOutputs(
    pairs=Path("data/pairs.parquet"),
    pairs_jsonl=Path("data/pairs.jsonl"),
    heldout_pairs=Path("data/heldout_pairs.parquet"),
    quarantine=Path("data/quarantine.jsonl"),
    report=Path("reports/preference_data.md"),
    detail=Path("reports/preference_data.json"),
    metrics=Path("metrics/preference_data.json"),
    perf=Path("reports/perf/preference_data.json"),
)
METRIC_KEYS = ("n_pairs", "avg_gap", "decontamination", "heldout_pairs", "n_quarantined", "judge_position_bias_rate")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    chip, batch_size = p.resolved_batch_size()
    pp = p.preference
    click.echo(f"chip {chip}: batch size {batch_size} (reward model), generation batch {pp.generation_batch_size}")
    judge, _ = judge_for(p, "preference", batch_size)
    # The import judge needs only the tokenizer (length checks): lazy loading leaves the weights on disk.
    model, tokenizer = loading.load_model(MODEL, dtype=p.model.dtype, lazy=not judge.generates)
    items = tasks.read_split(PROMPTS) if judge.generates else []
    heldout = tasks.read_split(HELDOUT) if judge.generates else []
    eval_texts = collect_eval_texts(SPLITS, template_items=items)
    result = preference.run(
        p,
        judge,
        model=model,
        tokenizer=tokenizer,
        items=items,
        heldout_items=heldout,
        eval_texts=eval_texts,
        items_origin=str(PROMPTS),
        heldout_origin=str(HELDOUT),
        log=click.echo,
    )
    m = preference.write_outputs(
        result,
        OUT,
        metric_keys=METRIC_KEYS,
        perf_extra={"chip": chip, "batch_size": batch_size, "environment": numerics_environment()},
        judge_info=preference.judge_info(judge),
    )
    click.echo(
        f"preference data: {m['n_pairs']} pairs (avg gap {m['avg_gap']:.3f}, decontamination "
        f"{m['decontamination']:.3f}) from {m['n_prompts']} prompts in {m['passes']} pass(es); "
        f"{m['n_quarantined']} quarantined; {m['heldout_pairs']} held-out pairs"
    )


if __name__ == "__main__":
    main()
