"""`python -m dpoflow doctor | setup-blas | tune-batch`."""
from __future__ import annotations

import click

from dpoflow import device
from dpoflow.params import load_params


@click.group()
def cli() -> None:
    """dpoflow utilities (the pipeline itself runs with `dvc repro`)."""


@cli.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def doctor(params_path: str) -> None:
    """Print the MLX device, detected chip, BLAS and its measured matmul rate, resolved batch size, versions."""
    params = load_params(params_path)
    chip, batch = params.resolved_batch_size()
    click.echo(f"MLX device:      {device.device_name()}")
    click.echo(f"detected chip:   {device.detect_chip()}" + (f" (forced in params: {params.chip})" if params.chip != "auto" else ""))
    click.echo(f"BLAS:            {device.blas_in_use()}")
    click.echo(f"fp32 matmul:     {device.matmul_gflops():.1f} GFLOP/s (1024x1024)")
    click.echo(f"batch size:      {batch} (params.yaml batch_size.{chip})")
    for name, version in device.library_versions().items():
        click.echo(f"{name + ':':<16} {version}")


@cli.command("setup-blas")
def setup_blas() -> None:
    """Point MLX's CPU wheel at OpenBLAS (Linux; installs it with apt when root)."""
    click.echo(device.install_fast_blas())


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
