"""Stage 4: preference modeling. A Bradley-Terry reward model (the SFT transformer + LoRA + a scalar head on the last
token) trained on the preference pairs, split 80/20 by prompt; train/validation accuracy, the overfitting gap and
(optionally) the pairs the model confidently contradicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.modeling import loading
from dpoflow.modeling.reward_model import RewardModel, build_reward_model
from dpoflow.runtime.params import Params
from dpoflow.training.callbacks import MetricLogger
from dpoflow.training.reward import train_reward_model


def train(
    p: Params,
    base_dir: Path,
    pairs: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    logger: MetricLogger | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
) -> tuple[RewardModel, dict]:
    rp = p.reward_model
    model, tokenizer = loading.load_model(base_dir, dtype="float32")
    rm = build_reward_model(
        model,
        tokenizer,
        lora_rank=rp.lora_rank,
        lora_layers=rp.lora_layers,
        seed=p.seed,
        max_seq_len=p.preference.max_seq_len,
        lm_logprob_weight=rp.lm_logprob_weight,
    )
    result = train_reward_model(
        rm,
        pairs,
        rp,
        batch_size=batch_size,
        seed=p.seed,
        logger=logger,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        confidence=p.gates.confidence,
    )
    return rm, result
