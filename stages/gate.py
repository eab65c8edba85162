"""Quality gate for one stage: reads metrics/<stage>.json and the thresholds in params.yaml.

Passing writes gates/<stage>.passed (the dependency of the next stage); failing removes it and exits 1 with the
failed checks and what to do next. The verdict, check by check, goes to reports/gates/<stage>.json either way.
"""

import sys
from pathlib import Path

import click

from dpoflow.eval.gates import evaluate_gate
from dpoflow.runtime import io
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params


@click.command()
@click.argument("stage")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(stage: str, params_path: str) -> None:
    params = load_params(params_path)
    path = Path("metrics") / f"{stage}.json"
    if not path.exists():
        raise click.ClickException(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
    result = evaluate_gate(stage, io.read_json(path), params)
    io.write_json(Path("reports/gates") / f"{stage}.json", result.to_dict())
    marker = Path("gates") / f"{stage}.passed"
    if result.passed:
        io.write_text(marker, "passed\n")
        click.echo(result.report())
        return
    marker.unlink(missing_ok=True)
    click.echo(result.report(), err=True)
    click.echo(f"the {stage} metrics stay in {path}; fix the cause above, then `dvc repro` again", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
