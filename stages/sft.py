"""Stage 1: SFT preparation. Fine-tune the base model on the task's SFT split, validate on the held-out split,
run the capability benchmarks through lm-eval and record the baseline metrics later stages compare against."""
import shutil
from contextlib import nullcontext
from pathlib import Path

import click
import mlx.core as mx
from dvclive import Live

from dpoflow import benchmarks, distributed, io, models, tasks
from dpoflow.params import load_params
from dpoflow.sft import run_sft

OUT = Path("models/sft")
CHECKPOINT = Path("checkpoints/sft")  # resume point of a killed run (not a DVC output)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def main(params_path: str) -> None:
    p = load_params(params_path)
    distributed.init(p.distributed.backend)  # data parallel under mlx.launch (docs/distributed.md)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    model, tokenizer = models.load_model("models/base", dtype=p.model.dtype)
    if p.sft.finetune == "lora":
        models.attach_lora(model, rank=p.sft.lora_rank, scale=p.sft.lora_scale, num_layers=p.sft.lora_layers, seed=p.seed)
    else:
        model.unfreeze()
    splits = Path("data/tasks")
    main_rank = distributed.is_main_process()  # only rank 0 writes curves and artifacts
    with (Live("dvclive/sft", save_dvc_exp=False, dvcyaml=None, report=None) if main_rank else nullcontext()) as live:
        result = run_sft(
            model, tokenizer, tasks.read_split(splits / "sft_train.jsonl"), tasks.read_split(splits / "sft_val.jsonl"),
            system_prompt=p.data.system_prompt, steps=p.sft.steps, learning_rate=p.sft.learning_rate,
            warmup_steps=p.sft.warmup_steps, max_seq_len=p.sft.max_seq_len, batch_size=batch_size,
            val_every=p.sft.val_every, seed=p.seed, live=live, checkpoint_dir=CHECKPOINT,
            fingerprint=repr((p.sft, p.seed, batch_size, models.model_hash(Path("models/base")))))
    if not main_rank:
        return
    models.fuse_lora(model)
    models.save_model(model, tokenizer, OUT, io.read_json(Path("models/base/config.json")))
    bench = distributed.alone(benchmarks.run_benchmarks, OUT, p.benchmarks.tasks, include_path=splits / "lm_eval",
                              limit=p.benchmarks.limit, seed=p.seed, batch_size=p.benchmarks.batch_size)
    perf = result.pop("perf")
    io.write_json("metrics/sft.json", {**result, "chip": chip, "batch_size": batch_size,
                                       "benchmarks": {name: r["score"] for name, r in bench.items()},
                                       "model_hash": models.model_hash(OUT)})
    io.write_json("metrics/perf/sft.json", perf)
    shutil.rmtree(CHECKPOINT, ignore_errors=True)  # artifacts are written: nothing left to resume
    scores = ", ".join(f"{name} {r['score']:.3f}" for name, r in bench.items())
    click.echo(f"SFT: val_loss {result['val_loss']:.4f}, val_accuracy {result['val_accuracy']:.3f}; {scores}")


if __name__ == "__main__":
    main()
