"""Generate the embedded default's task data (seeded, offline) and the local lm-eval benchmark tasks.

data/tasks/<split>.jsonl for sft_train, sft_val, pref_prompts, heldout, eval, rounds (disjoint by question),
data/tasks/lm_eval/ (task YAMLs + data + manifest) for Stage 1 and Stage 7 benchmarks.
"""

from pathlib import Path

import click

from dpoflow.data import benchmark_tasks, tasks
from dpoflow.runtime import io
from dpoflow.runtime.params import load_params

OUT = Path("data/tasks")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def main(params_path: str) -> None:
    p = load_params(params_path)
    splits = tasks.build_splits(p.data.tasks or None, p.data.sizes, seed=p.seed)
    with io.atomic_path(OUT) as tmp:
        tmp.mkdir()
        tasks.write_splits(splits, tmp)
        benchmark_tasks.write_local_tasks(tmp / "lm_eval", splits, seed=p.seed)
    click.echo(", ".join(f"{name}: {len(items)}" for name, items in splits.items()))


if __name__ == "__main__":
    main()
