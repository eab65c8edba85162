"""Stage 3: model initialization. Reference = the SFT model (frozen); policy = LoRA adapters on it (B = 0) or a
full-weights clone. Verifies the architectures, measures the initial KL on policy samples (must be ~0), and computes
the reference log-probs of every chosen/rejected completion once, so Stage 5 never runs the reference."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.core.batching import ChosenRejected
from dpoflow.eval.measure import measure_kl
from dpoflow.modeling.policy import Policy, build_policy
from dpoflow.modeling.reference import compute_ref_logps
from dpoflow.runtime.params import Params


def initialize(
    p: Params,
    sft_dir: Path,
    pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    kl_prompts: Sequence[list[dict]],
    batch_size: int,
) -> tuple[Policy, dict, dict[str, ChosenRejected], dict]:
    """(policy, initial KL, reference log-probs per split of `pairs`, timings)."""
    t0 = time.perf_counter()
    policy = build_policy(
        sft_dir,
        p.dpo.finetune,
        lora_rank=p.dpo.lora_rank,
        lora_scale=p.dpo.lora_scale,
        lora_layers=p.dpo.lora_layers,
        seed=p.seed,
        dtype=p.model.dtype,
    )  # verifies the architecture
    t1 = time.perf_counter()
    kl = measure_kl(
        policy.model, policy.tokenizer, kl_prompts, policy.reference, p.seed, p.init.kl_samples, p.init.kl_max_tokens
    )
    t2 = time.perf_counter()
    with policy.as_reference() as reference:
        logps = {
            split: compute_ref_logps(
                reference, policy.tokenizer, rows, p.preference.max_seq_len, batch_size, desc=f"ref logps {split}"
            )
            for split, rows in pairs.items()
        }
    t3 = time.perf_counter()
    n_pairs = sum(len(rows) for rows in pairs.values())
    timings = {
        "setup_seconds": t1 - t0,
        "kl_seconds": t2 - t1,
        "ref_logps_seconds": t3 - t2,
        "ref_logps_pairs_per_sec": n_pairs / (t3 - t2) if t3 > t2 else 0.0,
    }
    return policy, kl, logps, timings
