"""Stage 5: DPO. Trains the Stage 3 policy on data/pairs.parquet against the cached reference log-probs, checks the
held-out KL every dpo.kl_every steps (over dpo.kl_target: lower the learning rate and retry from Stage 3), and
writes the trained policy, the metrics the gate reads, and the training curves."""

import logging
import shutil
from pathlib import Path

import click
import mlx.core as mx

from dpoflow.data import tasks
from dpoflow.data.formats import read_pairs
from dpoflow.eval.measure import kl_prompt_messages
from dpoflow.modeling.policy import load_policy, save_policy
from dpoflow.modeling.reference import read_ref_logps
from dpoflow.pipeline import dpo
from dpoflow.runtime import distributed, io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params
from dpoflow.training.dpo import STAGE_KEYS

from live_logger import live_logger
from resume import run_fingerprint

SFT = Path("models/sft")
POLICY_INIT = Path("models/policy_init")
REF_LOGPS = Path("data/ref_logps.safetensors")
PAIRS = {"train": Path("data/pairs.parquet"), "heldout": Path("data/heldout_pairs.parquet")}
HELDOUT_TASKS = Path("data/tasks/heldout.jsonl")
OUT = Path("models/dpo")
METRIC_KEYS = {
    "kl": "kl",
    "kl_ci_high": "kl_ci_high",
    "heldout_gap": "heldout_gap",
    "heldout_gap_ci_low": "heldout_gap_ci_low",
    "heldout_accuracy": "heldout_accuracy",
    "dpo_train_loss": "train.loss",
    "learning_rate": "learning_rate",
    "n_attempts": "n_attempts",
}
CHECKPOINT = Path("checkpoints/dpo")  # resume point of a killed run (not a DVC output)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # the library's warnings
    p = load_params(params_path)
    distributed.init(p.distributed.backend)  # data parallel under mlx.launch (docs/distributed.md)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    policy = load_policy(SFT, POLICY_INIT, dtype=p.model.dtype)  # refuses a stale policy_init / other architecture
    pairs = {split: read_pairs(path) for split, path in PAIRS.items()}
    cache = read_ref_logps(REF_LOGPS, pairs, max_len=p.preference.max_seq_len, reference_hash=policy.reference_hash)
    prompts = kl_prompt_messages(tasks.read_split(HELDOUT_TASKS), p.init.kl_prompts, p.data.system_prompt)
    dpo_params = {k: getattr(p.dpo, k) for k in STAGE_KEYS}
    kl_settings = (p.init.kl_prompts, p.init.kl_samples, p.init.kl_max_tokens)
    fingerprint = repr(
        (
            dpo_params,
            p.seed,
            batch_size,
            p.model.dtype,
            p.preference.max_seq_len,
            kl_settings,
            p.data.system_prompt,
            io.files_hash(POLICY_INIT, REF_LOGPS, *PAIRS.values()),
        )
    )
    with live_logger("dvclive/dpo") as logger:
        result = dpo.train(
            p,
            policy,
            pairs["train"],
            cache["train"],
            pairs["heldout"],
            cache["heldout"],
            prompts,
            batch_size=batch_size,
            logger=logger,
            checkpoint_dir=CHECKPOINT,
            fingerprint=run_fingerprint("dpo", fingerprint),  # + the DVC run's identity (issue 21)
        )
    if not distributed.is_main_process():
        return
    save_policy(policy, OUT)
    detail = {
        **result.metrics,
        "finetune": policy.finetune,
        "chip": chip,
        "batch_size": batch_size,
        "reference_hash": policy.reference_hash,
    }
    io.write_json("reports/dpo.json", detail)  # with every attempt and KL check
    io.write_json("metrics/dpo.json", io.headline(detail, METRIC_KEYS))
    io.write_json(
        "reports/perf/dpo.json",
        {**result.perf, "chip": chip, "batch_size": batch_size, "environment": numerics_environment()},
    )
    shutil.rmtree(CHECKPOINT, ignore_errors=True)  # artifacts are written: nothing left to resume
    m = result.metrics
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    click.echo(
        f"DPO: KL {fmt(m['kl'])} (target {p.dpo.kl_target:g}, {m['n_attempts']} attempt(s), final lr "
        f"{m['learning_rate']:.3g}), held-out gap {fmt(m['heldout_gap'])}, "
        f"accuracy {fmt(m['heldout_accuracy'])}"
    )


if __name__ == "__main__":
    main()
