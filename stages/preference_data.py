"""Stage 2: preference data. Sample K responses per prompt from the SFT model, judge them, build chosen/rejected
pairs (training and held-out), validate them (lengths, conflicts, duplicates, decontamination against every
evaluation set), regenerate on weak data, and write the pairs, the quarantine, the data report and the metrics the
gate reads. With `preference.judge: import`, load `preference.import_path` instead of generating."""
from pathlib import Path

import click

from dpoflow import judges, models, tasks
from dpoflow.params import load_params
from dpoflow.preference import PreferenceConfig, build_preference_data, collect_eval_texts, write_outputs

SPLITS = Path("data/tasks")
MODEL = Path("models/sft")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def main(params_path: str) -> None:
    p = load_params(params_path)
    chip, batch_size = p.resolved_batch_size()
    pp = p.preference
    config = PreferenceConfig.from_params(p)
    click.echo(f"chip {chip}: batch size {batch_size} (reward model), generation batch {config.generation_batch_size}")
    judge = judges.make_judge(pp.judge, import_path=pp.import_path, batch_size=batch_size,
                              reward_model_path=getattr(pp, "reward_model_path", "models/reward"))
    # The import judge needs only the tokenizer (length checks): lazy loading leaves the weights on disk.
    model, tokenizer = models.load_model(MODEL, dtype=p.model.dtype, lazy=not judge.generates)
    items = tasks.read_split(SPLITS / "pref_prompts.jsonl") if judge.generates else []
    heldout = tasks.read_split(SPLITS / "heldout.jsonl") if judge.generates else []
    eval_texts = collect_eval_texts(SPLITS, template_items=items)
    result = build_preference_data(
        config, judge, model=model, tokenizer=tokenizer, items=items, heldout_items=heldout, eval_texts=eval_texts,
        items_origin=str(SPLITS / "pref_prompts.jsonl"), heldout_origin=str(SPLITS / "heldout.jsonl"), log=click.echo)
    write_outputs(result, perf_extra={"chip": chip, "batch_size": batch_size})
    m = result.metrics()
    click.echo(f"preference data: {m['n_pairs']} pairs (avg gap {m['avg_gap']:.3f}, decontamination "
               f"{m['decontamination']:.3f}) from {m['n_prompts']} prompts in {m['passes']} pass(es); "
               f"{m['n_quarantined']} quarantined; {m['heldout_pairs']} held-out pairs")


if __name__ == "__main__":
    main()
