"""The parameter check before any stage (the root of dvc.yaml: every stage depends on its output through the
chain of gates): the whole params file, read as DVC reads it, with every key present and known, every value and
combination allowed, and the names and files it points to checked (dpoflow.pipeline.check). Passing writes
gates/params.passed, whose content never changes, so a passing check reruns nothing after it."""

from pathlib import Path

import click

from dpoflow.pipeline.check import check_params
from dpoflow.runtime import io
from dpoflow.runtime.errors import user_errors

OUT = Path("gates/params.passed")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    check_params(params_path)
    io.write_text(OUT, "passed\n")
    click.echo(f"params: {params_path} checked")


if __name__ == "__main__":
    main()
