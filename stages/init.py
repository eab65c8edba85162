"""Stage 3: model initialization. Reference = the SFT model (frozen); policy = LoRA adapters on it (B = 0) or, with
dpo.finetune: full, a full-weights clone. Verifies the architectures, measures the initial KL on policy samples
(must be ~0), and caches the reference log-probs of every chosen/rejected completion so Stage 5 never runs the
reference."""

from pathlib import Path

import click
import mlx.core as mx

from dpoflow.data import tasks
from dpoflow.data.formats import read_pairs
from dpoflow.eval.measure import KL_TEMPERATURE, kl_prompt_messages
from dpoflow.modeling.policy import save_policy, trainable_parameter_count
from dpoflow.modeling.reference import write_ref_logps
from dpoflow.pipeline.init import initialize
from dpoflow.runtime import io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params

SFT = Path("models/sft")
OUT = Path("models/policy_init")
REF_LOGPS = Path("data/ref_logps.safetensors")
PAIRS = {"train": Path("data/pairs.parquet"), "heldout": Path("data/heldout_pairs.parquet")}
HELDOUT_TASKS = Path("data/tasks/heldout.jsonl")
METRIC_KEYS = ("initial_kl", "trainable_parameters")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    chip, batch_size = p.resolved_batch_size()
    click.echo(f"chip {chip}: batch size {batch_size}")
    mx.random.seed(p.seed)
    prompts = kl_prompt_messages(tasks.read_split(HELDOUT_TASKS), p.init.kl_prompts, p.data.system_prompt)
    pairs = {split: read_pairs(path) for split, path in PAIRS.items()}
    policy, kl, logps, timings = initialize(p, SFT, pairs, prompts, batch_size)
    click.echo(
        f"policy: {p.dpo.finetune}, {trainable_parameter_count(policy.model):,} trainable parameters; "
        "architecture matches the reference"
    )
    write_ref_logps(REF_LOGPS, logps, pairs, p.preference.max_seq_len, policy.reference_hash)
    save_policy(policy, OUT, weights=False)  # LoRA: adapters (B = 0); full: the policy is the reference's weights
    resolved = {
        "finetune": p.dpo.finetune,
        "lora_rank": p.dpo.lora_rank,
        "lora_scale": p.dpo.lora_scale,
        "lora_layers": p.dpo.lora_layers,
        "adapter_config": policy.adapter_config,
        "max_len": p.preference.max_seq_len,
        "dtype": p.model.dtype,
        "seed": p.seed,
        "kl": {
            "prompts": p.init.kl_prompts,
            "samples": p.init.kl_samples,
            "max_tokens": p.init.kl_max_tokens,
            "temperature": KL_TEMPERATURE,
            "prompts_file": str(HELDOUT_TASKS),
        },
    }
    io.write_json(
        "data/dpo_config.json",
        {
            "dpo": resolved,
            "chip": chip,
            "batch_size": batch_size,
            "reference": {"path": str(SFT), "model_hash": policy.reference_hash},
            "ref_logps": {"path": str(REF_LOGPS), **{f"n_{s}_pairs": len(rows) for s, rows in pairs.items()}},
        },
    )
    detail = {
        "initial_kl": kl["kl"],
        "initial_kl_seq": kl["kl_seq"],
        "initial_k3": kl["k3"],
        "kl_n_tokens": kl["n_tokens"],
        "architecture_match": 1,
        "n_train_pairs": len(pairs["train"]),
        "n_heldout_pairs": len(pairs["heldout"]),
        "finetune": p.dpo.finetune,
        "trainable_parameters": trainable_parameter_count(policy.model),
        "reference_hash": policy.reference_hash,
        "chip": chip,
        "batch_size": batch_size,
    }
    io.write_json("reports/init.json", detail)
    io.write_json("metrics/init.json", io.headline(detail, METRIC_KEYS))
    io.write_json("reports/perf/init.json", {**timings, "environment": numerics_environment()})
    n_pairs = sum(len(rows) for rows in pairs.values())
    click.echo(
        f"init: initial KL {kl['kl']:.3g} over {kl['n_tokens']} sampled tokens; reference log-probs of "
        f"{n_pairs} pairs -> {REF_LOGPS}"
    )


if __name__ == "__main__":
    main()
