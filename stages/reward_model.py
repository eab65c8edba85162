"""Stage 4: preference modeling. Train a Bradley-Terry reward model (the SFT transformer + LoRA + a scalar head on
the last token) on data/pairs.parquet, split 80/20 by prompt; report train/validation accuracy, the overfitting gap
and (optionally) the pairs the model confidently contradicts. Writes models/reward, data/rm_contradictions.jsonl,
metrics/reward_model.json (numbers), reports/reward_model.json (detail), reports/perf/ and dvclive/reward_model."""

import shutil
from dataclasses import asdict
from pathlib import Path

import click
import mlx.core as mx

from dpoflow.data.formats import read_pairs
from dpoflow.modeling import loading
from dpoflow.modeling.reward_model import save_reward_model
from dpoflow.pipeline import reward_model
from dpoflow.runtime import distributed, io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params

from live_logger import live_logger
from resume import run_fingerprint

BASE = Path("models/sft")
PAIRS = Path("data/pairs.parquet")
OUT = Path("models/reward")
CONTRADICTIONS = Path("data/rm_contradictions.jsonl")
CHECKPOINT = Path("checkpoints/reward_model")  # resume point of a killed run (not a DVC output)
METRIC_KEYS = {
    "rm_accuracy": "val_accuracy",
    "rm_accuracy_ci_low": "val_accuracy_ci_low",
    "rm_train_accuracy": "train_accuracy",
    "rm_overfit_gap": "overfit_gap",
    "n_contradictions": "n_contradictions",
}
GATE_ONLY = ("min_val_accuracy", "max_overfit_gap")  # thresholds read by the gate stage, not by training


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    distributed.init(p.distributed.backend)  # data parallel under mlx.launch (docs/distributed.md)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size} pairs")
    mx.random.seed(p.seed)
    pairs = read_pairs(PAIRS)
    base_hash = loading.model_hash(BASE)
    train_params = {k: v for k, v in asdict(p.reward_model).items() if k not in GATE_ONLY}
    fingerprint = repr(
        (sorted(train_params.items()), p.seed, batch_size, p.preference.max_seq_len, base_hash, io.file_sha256(PAIRS))
    )
    fingerprint = run_fingerprint("reward_model", fingerprint)  # + the DVC run's identity (issue 21)
    with live_logger("dvclive/reward_model") as logger:
        rm, result = reward_model.train(
            p, BASE, pairs, batch_size=batch_size, logger=logger, checkpoint_dir=CHECKPOINT, fingerprint=fingerprint
        )
    if not distributed.is_main_process():
        return
    save_reward_model(rm, OUT, BASE, base_hash)
    contradictions = result.pop("contradictions")
    io.write_jsonl(CONTRADICTIONS, contradictions)  # empty when reward_model.contradiction_filter is null
    perf = result.pop("perf")
    detail = {**result, "chip": chip, "batch_size": batch_size, "base_model_hash": base_hash}
    io.write_json("reports/reward_model.json", detail)
    io.write_json("metrics/reward_model.json", io.headline(detail, METRIC_KEYS))
    io.write_json("reports/perf/reward_model.json", {**perf, "environment": numerics_environment()})
    shutil.rmtree(CHECKPOINT, ignore_errors=True)  # artifacts are written: nothing left to resume
    flag = " OVERFITTING" if result["overfit"] else ""
    click.echo(
        f"reward model: train_accuracy {result['train_accuracy']:.3f}, val_accuracy "
        f"{result['val_accuracy']:.3f} (n_val {result['n_val']}), "
        f"overfit_gap {result['overfit_gap']:.3f}{flag}, "
        f"val_margin_mean {result['val_margin_mean']:.3f}, contradictions {result['n_contradictions']}"
    )


if __name__ == "__main__":
    main()
