"""`python -m dpoflow doctor | setup-blas | tune-batch | hub-inputs | autopilot`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dpoflow.eval.benchmarks import non_local_tasks
from dpoflow.pipeline.autopilot import autopilot, dvc_runner
from dpoflow.runtime import device, io
from dpoflow.runtime.params import hub_params, input_folder, load_params
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
    """Print the params that name a Hugging Face hub model or dataset, stock lm-eval tasks in benchmarks.tasks
    included (lm-eval downloads their data), one per line; nothing when every input is local: `make run` then runs
    with HF_HUB_OFFLINE=1."""
    params = load_params(params_path)
    stock = non_local_tasks(params.benchmarks.tasks, input_folder(params, "benchmarks"))
    for key, value in hub_params(params) + [("benchmarks.tasks", name) for name in stock]:
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


# Where the gates write their verdicts (the integrator is moving them from metrics/gates to reports/gates: the new
# folder is read when it holds a verdict, else the old one) and Stage 7's deploy decision.
GATES_DIR = "reports/gates"
OLD_GATES_DIR = "metrics/gates"
DEPLOY = "reports/deploy.json"


@cli.command("autopilot")
@click.option("--budget", default=3, show_default=True, type=click.IntRange(min=1), help="tries at most")
@click.option("--prefix", default="autopilot", show_default=True, help="experiments are named <prefix>-<n>")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--gates-dir", default=GATES_DIR, show_default=True, help="the gates' <stage>.json verdicts")
@click.option("--fallback-gates-dir", default=OLD_GATES_DIR, show_default=True, help="read when --gates-dir has none")
@click.option("--deploy", "deploy_path", default=DEPLOY, show_default=True, help="Stage 7's deploy decision")
@click.option("--json", "json_path", default=None, help="also write the result, every try included, to this file")
def autopilot_cmd(
    budget: int,
    prefix: str,
    params_path: str,
    gates_dir: str,
    fallback_gates_dir: str,
    deploy_path: str,
    json_path: str | None,
) -> None:
    """Run the pipeline as DVC experiments: on a failed gate, apply the workflow's prescription (the rule table in
    dpoflow/pipeline/autopilot.py) as the next `dvc exp run -n <prefix>-<n> -S ...`, up to --budget tries; apply
    the first try that passes every gate (`dvc exp apply`). Exit 0 when one passed, 1 otherwise."""
    result = autopilot(
        budget,
        runner=dvc_runner(echo=click.echo),
        gates_dir=Path(gates_dir),
        fallback_gates_dir=Path(fallback_gates_dir),
        deploy_path=Path(deploy_path),
        params_path=Path(params_path),
        prefix=prefix,
        log=click.echo,
    )
    if json_path:
        io.write_json(json_path, result.to_dict())
    sys.exit(0 if result.status == "passed" else 1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
