"""Stage 4: preference modeling. Train a Bradley-Terry reward model (the SFT transformer + LoRA + a scalar head on
the last token) on data/pairs.parquet, split 80/20 by prompt; report train/validation accuracy, the overfitting gap
and (optionally) the pairs the model confidently contradicts. Writes models/reward, data/rm_contradictions.jsonl,
metrics/reward_model.json (+ metrics/perf/reward_model.json) and dvclive/reward_model."""
import hashlib
import shutil
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import click
import mlx.core as mx
from dvclive import Live

from dpoflow import distributed, io, models
from dpoflow.data import read_pairs
from dpoflow.params import load_params
from dpoflow.reward_model import build_reward_model, save_reward_model, train_reward_model

BASE = Path("models/sft")
PAIRS = Path("data/pairs.parquet")
OUT = Path("models/reward")
CONTRADICTIONS = Path("data/rm_contradictions.jsonl")
CHECKPOINT = Path("checkpoints/reward_model")  # resume point of a killed run (not a DVC output)
GATE_ONLY = ("min_val_accuracy", "max_overfit_gap")  # thresholds read by the gate stage, not by training


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def main(params_path: str) -> None:
    p = load_params(params_path)
    distributed.init(p.distributed.backend)  # data parallel under mlx.launch (docs/distributed.md)
    rp = p.reward_model
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size} pairs")
    mx.random.seed(p.seed)
    pairs = read_pairs(PAIRS)
    base_hash = models.model_hash(BASE)
    model, tokenizer = models.load_model(BASE, dtype="float32")
    rm = build_reward_model(model, tokenizer, lora_rank=rp.lora_rank, lora_layers=rp.lora_layers, seed=p.seed,
                            max_seq_len=p.preference.max_seq_len, lm_logprob_weight=rp.lm_logprob_weight)
    train_params = {k: v for k, v in asdict(rp).items() if k not in GATE_ONLY}
    fingerprint = repr((sorted(train_params.items()), p.seed, batch_size, p.preference.max_seq_len, base_hash,
                        _file_sha256(PAIRS)))
    main_rank = distributed.is_main_process()  # only rank 0 writes curves and artifacts
    with (Live("dvclive/reward_model", save_dvc_exp=False, dvcyaml=None, report=None) if main_rank
          else nullcontext()) as live:
        result = train_reward_model(
            rm, pairs, learning_rate=rp.learning_rate, epochs=rp.epochs, batch_size=batch_size, seed=p.seed,
            val_fraction=rp.val_fraction, margin=rp.margin, center_coef=rp.center_coef,
            max_overfit_gap=rp.max_overfit_gap, contradiction_filter=rp.contradiction_filter, live=live,
            checkpoint_dir=CHECKPOINT, fingerprint=fingerprint)
    if not main_rank:
        return
    save_reward_model(rm, OUT, BASE, base_hash)
    contradictions = result.pop("contradictions")
    io.write_jsonl(CONTRADICTIONS, contradictions)  # empty when reward_model.contradiction_filter is null
    perf = result.pop("perf")
    io.write_json("metrics/reward_model.json", {**result, "chip": chip, "batch_size": batch_size,
                                                "base_model_hash": base_hash})
    io.write_json("metrics/perf/reward_model.json", perf)
    shutil.rmtree(CHECKPOINT, ignore_errors=True)  # artifacts are written: nothing left to resume
    flag = " OVERFITTING" if result["overfit"] else ""
    click.echo(f"reward model: train_accuracy {result['train_accuracy']:.3f}, val_accuracy "
               f"{result['val_accuracy']:.3f} (n_val {result['n_val']}), "
               f"overfit_gap {result['overfit_gap']:.3f}{flag}, "
               f"val_margin_mean {result['val_margin_mean']:.3f}, contradictions {result['n_contradictions']}")


if __name__ == "__main__":
    main()
