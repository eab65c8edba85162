"""Stage 0: every split the pipeline reads (data/tasks/<split>.jsonl: sft_train, sft_val, pref_prompts, heldout, eval,
rounds) from the embedded task (data.source: embedded, seeded and offline) or from your files (data.source: files:
data.sft, data.prompts, optional data.sft_val and data.eval_prompts under the inputs folder), the rows that could not
be used (data/tasks/quarantine.jsonl, with file:line, field and reason), what was read (data/tasks/inputs.json:
origins and fingerprints), and the local lm-eval tasks (data/tasks/lm_eval/) for Stages 1, 6 and 7.
"""

from pathlib import Path

import click

from dpoflow.data import benchmark_tasks, tasks
from dpoflow.data.pairs import write_quarantine
from dpoflow.pipeline import prepare
from dpoflow.runtime import io
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params

OUT = Path("data/tasks")
METRICS = Path("metrics/prepare_data.json")
DETAIL = Path("reports/prepare_data.json")  # every split and input file's row counts
METRIC_KEYS = {
    "n_sft_train": "n_sft_train",
    "n_pref_prompts": "n_pref_prompts",
    "n_eval": "n_eval",
    "n_rows_quarantined": "n_quarantined",
}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    data = prepare.embedded(p) if p.data.source == "embedded" else prepare.from_files(p)
    with io.atomic_path(OUT) as tmp:
        tmp.mkdir()
        tasks.write_splits(data.splits, tmp)
        write_quarantine(data.quarantined, tmp / "quarantine.jsonl")
        io.write_json(tmp / "inputs.json", data.inputs)
        # the embedded task's own benchmarks need its items; every source gets the general ones
        benchmark_tasks.write_local_tasks(
            tmp / "lm_eval", data.splits if p.data.source == "embedded" else {}, seed=p.seed
        )
    counts = data.metrics()
    io.write_json(DETAIL, counts)
    io.write_json(METRICS, io.headline(counts, METRIC_KEYS))
    click.echo(
        ", ".join(f"{name}: {len(items)}" for name, items in data.splits.items())
        + f"; {len(data.quarantined)} rows quarantined -> {OUT / 'quarantine.jsonl'}"
    )


if __name__ == "__main__":
    main()
