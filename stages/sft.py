"""Stage 1: SFT preparation. Fine-tune the base model on the SFT split, validate on the held-out split, run the
capability benchmarks through lm-eval and record the baseline metrics later stages compare against."""

import shutil
from pathlib import Path

import click
import mlx.core as mx

from dpoflow.data import tasks
from dpoflow.data.prompts import is_task_item, sft_rows
from dpoflow.eval import benchmarks
from dpoflow.modeling import loading
from dpoflow.pipeline import sft
from dpoflow.runtime import distributed, io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import input_folder, load_params

from live_logger import live_logger
from resume import run_fingerprint

BASE = Path("models/base")
SPLITS = Path("data/tasks")
OUT = Path("models/sft")
METRIC_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_accuracy_ci_low")  # and bench_<task> per benchmark
CHECKPOINT = Path("checkpoints/sft")  # resume point of a killed run (not a DVC output)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    distributed.init(p.distributed.backend)  # data parallel under mlx.launch (docs/distributed.md)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    model, tokenizer = loading.load_model(BASE, dtype=p.model.dtype)
    sft.prepare(model, p)
    train_items = tasks.read_split(SPLITS / "sft_train.jsonl")
    val_items = tasks.read_split(SPLITS / "sft_val.jsonl")
    with live_logger("dvclive/sft") as logger:
        result = sft.train(
            model,
            tokenizer,
            p,
            sft_rows(train_items, p.data.system_prompt),
            sft_rows(val_items, p.data.system_prompt),
            batch_size=batch_size,
            val_items=[i for i in val_items if is_task_item(i)],  # greedy accuracy needs the task's checker
            logger=logger,
            checkpoint_dir=CHECKPOINT,
            fingerprint=run_fingerprint("sft", repr((p.sft, p.seed, batch_size, loading.model_hash(BASE)))),
        )
    if not distributed.is_main_process():
        return
    loading.save_model(model, tokenizer, OUT, io.read_json(BASE / "config.json"))
    bench = distributed.alone(
        benchmarks.run_benchmarks_per_document,
        OUT,
        p.benchmarks.tasks,
        include_path=[SPLITS / "lm_eval", input_folder(p, "benchmarks")],
        limit=p.benchmarks.limit,
        seed=p.seed,
        batch_size=p.benchmarks.batch_size,
    )
    perf = result.pop("perf")
    detail = {
        **result,
        "chip": chip,
        "batch_size": batch_size,
        "benchmarks": {name: r["score"] for name, r in bench.items()},
        "benchmark_documents": {name: r["docs"] for name, r in bench.items()},  # Stage 7 pairs its scores with these
        "model_hash": loading.model_hash(OUT),
    }
    io.write_json("reports/sft.json", detail)  # Stage 7's baseline benchmark scores are read from here
    io.write_json(
        "metrics/sft.json",
        {**io.headline(detail, METRIC_KEYS), **{f"bench_{name}": r["score"] for name, r in bench.items()}},
    )
    io.write_json("reports/perf/sft.json", {**perf, "environment": numerics_environment()})
    shutil.rmtree(CHECKPOINT, ignore_errors=True)  # artifacts are written: nothing left to resume
    scores = ", ".join(f"{name} {r['score']:.3f}" for name, r in bench.items())
    accuracy = f", val_accuracy {result['val_accuracy']:.3f}" if "val_accuracy" in result else ""
    click.echo(f"SFT: val_loss {result['val_loss']:.4f}{accuracy}; {scores}")


if __name__ == "__main__":
    main()
