"""`python -m dpoflow doctor | setup-blas | tune-batch | hub-inputs`."""

from __future__ import annotations

from pathlib import Path

import click

from dpoflow.runtime import device
from dpoflow.runtime.params import hub_params, load_params
from dpoflow.training.tune import tune_batch


@click.group()
def cli() -> None:
    """dpoflow utilities (the pipeline itself runs with `dvc repro`)."""


@cli.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def doctor(params_path: str) -> None:
    """Print the MLX device, detected chip, BLAS and its measured matmul rate, resolved batch size, versions, and the
    numerics environment (BLAS config and kernel, threads, MLX / mlx-lm versions, platform)."""
    params = load_params(params_path)
    chip, batch = params.resolved_batch_size()
    click.echo(f"MLX device:      {device.device_name()}")
    click.echo(
        f"detected chip:   {device.detect_chip()}"
        + (f" (forced in params: {params.chip})" if params.chip != "auto" else "")
    )
    click.echo(f"BLAS:            {device.blas_in_use()}")
    click.echo(f"fp32 matmul:     {device.matmul_gflops():.1f} GFLOP/s (1024x1024)")
    click.echo(f"batch size:      {batch} (params.yaml batch_size.{chip})")
    for name, version in device.library_versions().items():
        click.echo(f"{name + ':':<16} {version}")
    click.echo("numerics environment (device.numerics_environment; same labels + inputs = same bytes):")
    for key, label in device.numerics_environment().items():
        click.echo(f"  {key + ':':<22} {label}")


@cli.command("hub-inputs")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def hub_inputs(params_path: str) -> None:
    """Print the params that name a Hugging Face hub model or dataset (one per line; nothing when every input is
    local: `make run` then runs with HF_HUB_OFFLINE=1)."""
    for key, value in hub_params(load_params(params_path)):
        click.echo(f"{key}: {value}")


@cli.command("setup-blas")
def setup_blas() -> None:
    """Point MLX's CPU wheel at OpenBLAS (Linux; installs it with apt when root)."""
    click.echo(device.install_fast_blas())


@cli.command("tune-batch")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--model", "model_dir", default=None, help="mlx-lm model folder [default: models/sft, else models/base]")
@click.option("--candidates", default="1,2,4,8,16,32", show_default=True, help="batch sizes (pairs) to try")
@click.option("--prompt-len", default=48, show_default=True, help="prompt tokens of the synthetic pairs")
@click.option("--completion-len", default=24, show_default=True, help="completion tokens (chosen and rejected)")
@click.option("--steps", default=2, show_default=True, help="timed steps per batch size (after one warm-up)")
@click.option("--memory-fraction", default=0.6, show_default=True, help="peak memory budget, fraction of RAM")
def tune_batch_cmd(
    params_path: str,
    model_dir: str | None,
    candidates: str,
    prompt_len: int,
    completion_len: int,
    steps: int,
    memory_fraction: float,
) -> None:
    """Time the DPO step (Stage 5's) at candidate batch sizes on this chip; print the batch size to put under
    this chip in params.yaml (batch_size.<chip>)."""
    params = load_params(params_path)
    chip = params.resolved_chip()
    if model_dir is None:
        model_dir = "models/sft" if Path("models/sft/config.json").exists() else "models/base"
    click.echo(
        f"chip {chip}, model {model_dir}, dpo.finetune {params.dpo.finetune}, "
        f"pairs of {prompt_len} + {completion_len} tokens"
    )
    trials, best = tune_batch(
        Path(model_dir),
        params.dpo,
        [int(c) for c in candidates.split(",")],
        prompt_len,
        completion_len,
        steps,
        memory_fraction,
        log=click.echo,
    )
    click.echo(f"best: batch {best.batch_size} ({best.pairs_per_sec:.2f} pairs/s, peak {best.peak_memory_gb:.2f} GB)")
    click.echo(f"params.yaml:\nbatch_size:\n  {chip}: {best.batch_size}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
