"""Stage 4: a Bradley-Terry reward model on the Stage 1 (SFT) transformer.

    hidden = body(input_ids)                      [N, T, D]   the SFT transformer incl. final norm, LoRA-adapted
    r_i    = head(hidden[i, last_index_i])        [N]         nn.Linear(D, 1) on the LAST NON-PAD token (the eos)
    loss   = mean -log sigma(r_c - r_w - m) + center_coef * mean (r_c + r_w)^2      (TRL's RewardTrainer)

Chosen and rejected go through one forward (`batching.collate_pairs`: rows 0..B-1 chosen, B..2B-1 rejected); their
shared prompt runs once where the model allows (`logprobs.shared_prompt_hidden`, as in DPO).
Sequences are right-padded and attention is causal, so the reward read at the last real token does not depend on
padding or on the other rows of the batch: scoring in batches equals scoring one by one.

The body trains through LoRA (`models.attach_lora`) plus the head; `dpoflow.trainer.train` is the loop. The data
is split 80/20 BY PROMPT (`split_by_prompt`), so no prompt is in both splits.

Artifact (`save_reward_model` / `load_reward_model`), a folder:
    adapters.safetensors + adapter_config.json   LoRA of the body (the layout of models.save_adapters / mlx-lm)
    head.safetensors                             {"weight": [1, D], "bias": [1]}
    reward_config.json                           base model path + models.model_hash, hidden size, head position
Loading verifies the base model's hash, so a reward model trained on an older `models/sft` is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow import models
from dpoflow.batching import (
    EncodedPair,
    PairBatch,
    SeqBatch,
    collate_pairs,
    collate_sequences,
    encode_completion,
    encode_pair,
    encode_prompt,
    split_pairs,
)
from dpoflow.io import atomic_path, read_json, write_json
from dpoflow.logprobs import (
    body_and_head,
    logprobs_from_logits,
    scatter_rows,
    shared_prompt_hidden,
    shared_prompt_supported,
    shared_target_index,
)
from dpoflow.losses import bradley_terry_loss, preference_stats
from dpoflow.trainer import BatchSchedule, TrainConfig, train

FORMAT_VERSION = 1
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "head.safetensors"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
HEAD_POSITION = "last_non_pad"
HEAD_POSITION_RULE = ("reward = head(final hidden state at SeqBatch.last_index = sequence length - 1), the last "
                      "non-pad token: the completion's eos unless the completion was truncated")
HEAD_INIT_STD = 0.02          # normal(0, 0.02) head weight, zero bias (HF's initializer_range for a score head)
DEFAULT_LORA_SCALE = 20.0     # mlx-lm's default; params.yaml has no reward_model.lora_scale
MAX_WARMUP_STEPS = 10         # warmup = min(10, steps // 10), then cosine decay (dpoflow.trainer.make_optimizer)


class RewardModelError(ValueError):
    """A reward-model folder that cannot be loaded as asked."""


class StaleRewardModelError(RewardModelError):
    """The reward model's base model changed since it was trained (its models.model_hash differs)."""


# ---------------------------------------------------------------------------------------------------------------
# The model


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _hidden_size(backbone: nn.Module) -> int:
    args = getattr(backbone, "args", None)
    size = getattr(args, "hidden_size", None)
    if size is None:
        size = backbone["model"]["embed_tokens"].weight.shape[-1]
    return int(size)


def _body(backbone: nn.Module) -> Callable[[mx.array], mx.array]:
    """The transformer without its LM head: input ids [N, T] -> final (normed) hidden states [N, T, D]."""
    split = body_and_head(backbone)
    if split is not None:
        return split[0]
    if "model" in backbone:  # mlx-lm models keep the body (embeddings, blocks, final norm) in `model`
        return backbone["model"]
    raise RewardModelError(f"cannot find the transformer body of a {type(backbone).__name__}: "
                           "expected an mlx-lm model with a `model` attribute")


def init_head(hidden_size: int, seed: int) -> nn.Linear:
    """nn.Linear(hidden_size, 1): weight normal(0, HEAD_INIT_STD) from a key derived from `seed` only (it neither
    depends on nor disturbs MLX's global random state), bias 0."""
    head = nn.Linear(hidden_size, 1)
    head.weight = HEAD_INIT_STD * mx.random.normal((1, hidden_size), key=mx.random.key(int(seed)))
    head.bias = mx.zeros((1,))
    return head


class RewardModel(nn.Module):
    """A causal-LM body (`backbone`, an mlx-lm model, usually LoRA-adapted) with a scalar head on the last token.

    Trainable parameters: whatever is unfrozen in the backbone (the LoRA matrices) and the head.
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, *, max_seq_len: int, seed: int = 0,
                 adapter_config: Optional[dict] = None, head: Optional[nn.Linear] = None, lm_weight: float = 0.0):
        super().__init__()
        self.backbone = backbone
        if lm_weight:  # a trainable scalar; absent = no LM term (and no LM head computed)
            if body_and_head(backbone) is None:
                raise RewardModelError(f"lm_logprob_weight needs a model whose LM head can be split off; "
                                       f"{type(backbone).__name__} cannot")
            self.lm_weight = mx.array([float(lm_weight)])
        self.hidden_size = _hidden_size(backbone)
        self.head = head if head is not None else init_head(self.hidden_size, seed)
        if tuple(self.head.weight.shape) != (1, self.hidden_size):
            raise RewardModelError(f"head weight has shape {tuple(self.head.weight.shape)}; expected "
                                   f"(1, {self.hidden_size}) for this base model")
        # Plain attributes, not children: nn.Module would treat a dict (or a module) as part of the parameter tree.
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "adapter_config", adapter_config)  # from attach_lora / adapter_config.json
        self.max_seq_len = int(max_seq_len)
        self.pad_id = _pad_id(tokenizer)
        _body(backbone)  # fail early if the body cannot be found

    # ----------------------------------------------------------------------------------------- forward
    def rewards(self, batch: SeqBatch) -> mx.array:
        """Scalar reward [N] (float32) of every row of `batch`, read at its last non-pad token, plus
        `lm_weight * mean log p(completion | prompt)` under the (LoRA-adapted) LM when the model has that term.

        A PairBatch whose rows share their prompt runs that prompt once for chosen and rejected
        (logprobs.shared_prompt_hidden): same rewards up to float32 rounding, B*P + 2B*C body tokens instead of
        2B*(P + C)."""
        body = _body(self.backbone)
        lm_head = body_and_head(self.backbone)[1] if "lm_weight" in self else None
        n_comp = batch.completion_lengths.astype(np.int64)
        hidden = None
        if isinstance(batch, PairBatch) and shared_prompt_supported(self.backbone):
            n_pairs = batch.n_pairs
            plen = batch.lengths - batch.completion_lengths
            if np.array_equal(plen[:n_pairs], plen[n_pairs:]):
                C = int(n_comp.max())
                hidden, P, plen = shared_prompt_hidden(body, batch, C)
                last = n_pairs * P + np.arange(2 * n_pairs, dtype=np.int64) * C + n_comp - 1  # each row's last token
                targets = shared_target_index(batch, P, C, plen) if lm_head is not None else None
        if hidden is None:
            h = body(batch.input_ids)                                                # [N, T, D]
            hidden = h.reshape(-1, h.shape[-1])
            last = np.arange(batch.n_rows, dtype=np.int64) * batch.seq_len + np.asarray(batch.last_index, np.int64)
            targets = mx.array(batch.positions) if lm_head is not None else None
        reward = self.head(hidden[mx.array(last)]).reshape(batch.n_rows).astype(mx.float32)
        if lm_head is None:
            return reward
        logps = logprobs_from_logits(lm_head(hidden[targets]).astype(mx.float32), mx.array(batch.target_ids))
        mean_logp = scatter_rows(logps, batch) / mx.array(batch.completion_lengths, dtype=mx.float32)
        return reward + self.lm_weight * mean_logp

    def __call__(self, batch: SeqBatch) -> mx.array:
        return self.rewards(batch)

    # ----------------------------------------------------------------------------------------- scoring
    def encode(self, prompt: Sequence[Mapping[str, str]], response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) under the project's convention, cut to max_seq_len like encode_pair:
        the prompt loses tokens from the left first; only a completion longer than max_seq_len - 1 is cut."""
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        completion = encode_completion(self.tokenizer, response)
        if len(prompt_ids) + len(completion) > self.max_seq_len:
            prompt_ids = prompt_ids[-max(self.max_seq_len - len(completion), 1):]
            completion = completion[: self.max_seq_len - len(prompt_ids)]
        return prompt_ids, completion

    def score(self, prompts: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str],
              batch_size: int = 16) -> list[float]:
        """Reward of each (prompt messages, response text) pair, computed in length-sorted batches.

        Equals scoring one by one (up to float rounding): see the module docstring.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        out = np.zeros(len(encoded), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate_sequences([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], self.pad_id)
            r = self.rewards(batch)
            mx.eval(r)
            out[idx] = np.asarray(r, dtype=np.float64)
        return [float(x) for x in out]

    def score_encoded_pairs(self, encoded: Sequence[EncodedPair],
                            batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(chosen rewards [P], rejected rewards [P]) of tokenized pairs, `batch_size` pairs per forward."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(encoded)), key=lambda i: -encoded[i].max_length)
        chosen = np.zeros(len(encoded), dtype=np.float64)
        rejected = np.zeros(len(encoded), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate_pairs([encoded[i] for i in idx], self.pad_id)
            c, w = split_pairs(self.rewards(batch), len(idx))
            mx.eval(c, w)
            chosen[idx] = np.asarray(c, dtype=np.float64)
            rejected[idx] = np.asarray(w, dtype=np.float64)
        return chosen, rejected

    def score_pairs(self, pairs: Sequence[Mapping[str, Any]], batch_size: int = 16) -> tuple[list[float], list[float]]:
        """(chosen rewards, rejected rewards) of canonical pairs, tokenized exactly as in training (encode_pair)."""
        encoded = [encode_pair(self.tokenizer, pair, self.max_seq_len) for pair in pairs]
        chosen, rejected = self.score_encoded_pairs(encoded, batch_size)
        return [float(x) for x in chosen], [float(x) for x in rejected]


def build_reward_model(backbone: nn.Module, tokenizer: Any, *, lora_rank: int, lora_layers: int, seed: int,
                       max_seq_len: int, lora_scale: float = DEFAULT_LORA_SCALE,
                       lm_logprob_weight: float = 0.0) -> RewardModel:
    """Freeze `backbone` (the SFT model), attach LoRA to its last `lora_layers` blocks and add a fresh head (and the
    LM log-likelihood term, initial weight `lm_logprob_weight`, when non-zero)."""
    adapter_config = models.attach_lora(backbone, rank=lora_rank, scale=lora_scale, num_layers=lora_layers, seed=seed)
    return RewardModel(backbone, tokenizer, max_seq_len=max_seq_len, seed=seed, adapter_config=adapter_config,
                       lm_weight=lm_logprob_weight)


# ---------------------------------------------------------------------------------------------------------------
# Data: split by prompt, margins, batches


def prompt_key(prompt: Sequence[Mapping[str, str]]) -> str:
    """The prompt as text (roles and contents, in order): what the split hashes and compares."""
    return json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)


def split_by_prompt(pairs: Sequence[Mapping[str, Any]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) into `pairs`, split by PROMPT: all pairs of a prompt share a side.

    Each distinct prompt is ranked by sha256(f"{seed}\\n{prompt_key}"); the first round(val_fraction * n_prompts)
    prompts (at least 1, at most n_prompts - 1) go to validation. Deterministic for (prompts, seed).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    keys = [prompt_key(p["prompt"]) for p in pairs]
    distinct = sorted(set(keys), key=lambda k: (hashlib.sha256(f"{seed}\n{k}".encode("utf-8")).hexdigest(), k))
    if len(distinct) < 2:
        raise ValueError(f"{len(pairs)} pairs have {len(distinct)} distinct prompt(s); a split by prompt needs "
                         "at least 2 (more preference data is needed)")
    n_val = min(max(int(round(val_fraction * len(distinct))), 1), len(distinct) - 1)
    val_keys = set(distinct[:n_val])
    train_idx = [i for i, k in enumerate(keys) if k not in val_keys]
    val_idx = [i for i, k in enumerate(keys) if k in val_keys]
    return train_idx, val_idx


def pair_margins(pairs: Sequence[Mapping[str, Any]], margin: float) -> Optional[np.ndarray]:
    """Per-pair BT margin m_i = margin * (score_chosen - score_rejected), 0 where a score is unknown;
    None when margin == 0 (no margin term at all)."""
    if not margin:
        return None
    out = np.zeros(len(pairs), dtype=np.float32)
    for i, p in enumerate(pairs):
        sc, sr = p.get("score_chosen"), p.get("score_rejected")
        if sc is not None and sr is not None:
            out[i] = margin * (float(sc) - float(sr))
    return out


@dataclass
class RewardBatch:
    pairs: PairBatch
    margins: Optional[mx.array] = None   # [B] or None


def make_batch(encoded: Sequence[EncodedPair], indices: Sequence[int], pad_id: int,
               margins: Optional[np.ndarray] = None) -> RewardBatch:
    batch = collate_pairs([encoded[i] for i in indices], pad_id)
    m = None if margins is None else mx.array(margins[np.asarray(indices, dtype=np.int64)])
    return RewardBatch(batch, m)


def reward_loss(rm: RewardModel, batch: RewardBatch, center_coef: float = 0.0) -> tuple[mx.array, dict[str, mx.array]]:
    """Bradley-Terry loss of one pair batch (one forward for chosen and rejected) and its metrics."""
    r_c, r_w = split_pairs(rm(batch.pairs), batch.pairs.n_pairs)
    loss = bradley_terry_loss(r_c, r_w, batch.margins, center_coef)
    diff = mx.stop_gradient(r_c - r_w)
    aux = {
        "accuracy": ((diff > 0).astype(mx.float32) + 0.5 * (diff == 0).astype(mx.float32)).mean(),
        "margin_mean": diff.mean(),
        "reward_mean": mx.stop_gradient((r_c + r_w) / 2).mean(),
    }
    return loss, aux


def pair_stats(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """accuracy (ties 0.5), mean margin r_c - r_w, and the plain BT loss mean -log sigma(r_c - r_w)."""
    if len(chosen) == 0:
        return {"accuracy": float("nan"), "margin_mean": float("nan"), "loss": float("nan")}
    stats = preference_stats(chosen, rejected)
    diff = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    return {"accuracy": stats["accuracy"], "margin_mean": stats["margin_mean"],
            "loss": float(np.logaddexp(0.0, -diff).mean())}


def find_contradictions(pairs: Sequence[Mapping[str, Any]], chosen: np.ndarray, rejected: np.ndarray,
                        threshold: float, split_of: Sequence[str]) -> list[dict]:
    """Pairs the reward model confidently contradicts: P(rejected > chosen) = sigma(r_w - r_c) >= threshold.

    Rows (most confident first): id, p_rejected_preferred, reward_chosen, reward_rejected, split, task, source,
    score_chosen, score_rejected. The pairs themselves are not changed.
    """
    diff = np.asarray(rejected, dtype=np.float64) - np.asarray(chosen, dtype=np.float64)
    p_flip = 1.0 / (1.0 + np.exp(-diff))
    rows = []
    for i in np.nonzero(p_flip >= threshold)[0]:
        p = pairs[i]
        rows.append({"id": p.get("id"), "p_rejected_preferred": float(p_flip[i]),
                     "reward_chosen": float(chosen[i]), "reward_rejected": float(rejected[i]),
                     "split": split_of[i], "task": p.get("task"), "source": p.get("source"),
                     "score_chosen": p.get("score_chosen"), "score_rejected": p.get("score_rejected")})
    rows.sort(key=lambda r: (-r["p_rejected_preferred"], str(r["id"])))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_reward_model(rm: RewardModel, pairs: Sequence[Mapping[str, Any]], *, learning_rate: float, epochs: int,
                       batch_size: int, seed: int, val_fraction: float = 0.2, margin: float = 0.0,
                       center_coef: float = 0.0, max_overfit_gap: float = 0.15,
                       contradiction_filter: Optional[float] = None, eval_batch_size: Optional[int] = None,
                       live: Any = None, checkpoint_dir: Optional[Path] = None, checkpoint_every: int = 25,
                       fingerprint: str = "", max_grad_norm: float = 1.0,
                       on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train `rm` on the training split of `pairs` and evaluate it on both splits.

    steps = ceil(n_train / batch_size) * epochs (length-grouped batches, reshuffled each epoch); validation at the
    end of every epoch; `on_step` is passed to trainer.train (tests use it to simulate a killed run). Returns the
    flat metrics of metrics/reward_model.json plus "perf" (timings) and "contradictions" (rows for
    data/rm_contradictions.jsonl; empty when contradiction_filter is None).
    """
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    t_start = time.perf_counter()
    encoded = [encode_pair(rm.tokenizer, pair, rm.max_seq_len) for pair in pairs]
    train_idx, val_idx = split_by_prompt(pairs, val_fraction, seed)
    margins = pair_margins(pairs, margin)
    eval_bs = eval_batch_size or 2 * batch_size
    schedule = BatchSchedule([encoded[i].max_length for i in train_idx], batch_size, seed)
    per_epoch = schedule.per_epoch
    assert per_epoch == math.ceil(len(train_idx) / batch_size)
    steps = per_epoch * epochs
    val_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def val_rewards() -> tuple[np.ndarray, np.ndarray]:
        return rm.score_encoded_pairs([encoded[i] for i in val_idx], eval_bs)

    def evaluate(step: int) -> dict[str, float]:
        c, w = val_rewards()
        val_cache.clear()
        val_cache[step] = (c, w)
        s = pair_stats(c, w)
        return {"val_accuracy": s["accuracy"], "val_margin_mean": s["margin_mean"], "val_loss": s["loss"]}

    def batch_at(step: int, micro: int) -> tuple[RewardBatch, float]:
        indices, keep = schedule.shard(step, micro)  # this rank's part of the global batch (all of it on one process)
        batch = make_batch(encoded, [train_idx[j] for j in indices], rm.pad_id, margins)
        return batch, keep * len(indices)  # the loss: a mean over pairs

    cfg = TrainConfig(steps=steps, learning_rate=learning_rate, warmup_steps=min(MAX_WARMUP_STEPS, steps // 10),
                      max_grad_norm=max_grad_norm, eval_every=per_epoch, checkpoint_every=checkpoint_every,
                      seed=seed, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, desc="reward_model")
    result = train(rm, lambda model, batch: reward_loss(model, batch, center_coef), batch_at, cfg,
                   evaluate=evaluate, live=live, tokens_in=lambda b: b.pairs.n_tokens, on_step=on_step)

    t_eval = time.perf_counter()
    train_c, train_w = rm.score_encoded_pairs([encoded[i] for i in train_idx], eval_bs)
    val_c, val_w = val_cache[steps] if steps in val_cache else val_rewards()
    eval_seconds = time.perf_counter() - t_eval
    tr, va = pair_stats(train_c, train_w), pair_stats(val_c, val_w)

    chosen, rejected = np.zeros(len(pairs)), np.zeros(len(pairs))
    chosen[train_idx], rejected[train_idx] = train_c, train_w
    chosen[val_idx], rejected[val_idx] = val_c, val_w
    split_of = ["train"] * len(pairs)
    for i in val_idx:
        split_of[i] = "val"
    contradictions = ([] if contradiction_filter is None
                      else find_contradictions(pairs, chosen, rejected, contradiction_filter, split_of))

    overfit_gap = tr["accuracy"] - va["accuracy"]
    tail = result.history[-10:]
    metrics = {
        # Gate keys (dpoflow.gates: reward_model)
        "val_accuracy": va["accuracy"],
        "overfit_gap": overfit_gap,
        # Detail
        "train_accuracy": tr["accuracy"],
        "val_margin_mean": va["margin_mean"],
        "train_margin_mean": tr["margin_mean"],
        "val_loss": va["loss"],
        "train_loss": tr["loss"],
        "train_batch_loss": float(np.mean([h["loss"] for h in tail])),
        "overfit": bool(overfit_gap > max_overfit_gap),
        "max_overfit_gap": max_overfit_gap,
        "n_pairs": len(pairs),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_train_prompts": len({prompt_key(pairs[i]["prompt"]) for i in train_idx}),
        "n_val_prompts": len({prompt_key(pairs[i]["prompt"]) for i in val_idx}),
        "n_truncated": int(sum(e.truncated for e in encoded)),
        "n_contradictions": len(contradictions),
        "n_contradictions_val": sum(r["split"] == "val" for r in contradictions),
        "contradiction_filter": contradiction_filter,
        "steps": steps,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
        "reward_mean": float(np.concatenate([chosen, rejected]).mean()) if len(pairs) else 0.0,
        "reward_std": float(np.concatenate([chosen, rejected]).std()) if len(pairs) else 0.0,
        "epoch_evals": [{k: v for k, v in e.items()} for e in result.evals],
    }
    history = result.history[1:] or result.history
    metrics["perf"] = {
        "tokens_per_sec": float(np.mean([h["tokens_per_sec"] for h in history])) if history else 0.0,
        "peak_memory_gb": max((h["peak_memory_gb"] for h in result.history), default=0.0),
        "train_seconds": result.seconds,
        "final_eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "resumed_from_step": result.resumed_from,
    }
    metrics["contradictions"] = contradictions
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_reward_model(rm: RewardModel, out_dir: Path, base_path: Path, base_hash: Optional[str] = None) -> Path:
    """Write the reward-model folder atomically (see the module docstring). `base_path` is recorded as given
    (keep it relative, e.g. `models/sft`, so the folder works from the project root anywhere)."""
    if rm.adapter_config is None:
        raise RewardModelError("the reward model has no adapter config: build it with build_reward_model")
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": str(base_path),
        "base_model_hash": base_hash or models.model_hash(Path(base_path)),
        "model_type": getattr(getattr(rm.backbone, "args", None), "model_type", None),
        "hidden_size": rm.hidden_size,
        "head_position": HEAD_POSITION,
        "head_position_rule": HEAD_POSITION_RULE,
        "head_file": HEAD_FILE,
        "max_seq_len": rm.max_seq_len,
        "dtype": "float32",
    }
    with atomic_path(out_dir) as tmp:
        models.save_adapters(rm.backbone, tmp, rm.adapter_config)   # creates tmp/ with the two adapter files
        head = {"weight": rm.head.weight, "bias": rm.head.bias}
        if "lm_weight" in rm:
            head["lm_weight"] = rm.lm_weight
        mx.save_safetensors(str(tmp / HEAD_FILE), head, metadata={"format": "mlx"})
        write_json(tmp / CONFIG_FILE, config)
    return Path(out_dir)


def read_reward_config(path: Path) -> dict:
    path = Path(path)
    missing = [name for name in (CONFIG_FILE, HEAD_FILE) + ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise RewardModelError(f"{path}: not a reward-model folder (missing {', '.join(missing)}); "
                               "train one with `dvc repro reward_model`")
    config = read_json(path / CONFIG_FILE)
    if config.get("format_version") != FORMAT_VERSION or config.get("head_position") != HEAD_POSITION:
        raise RewardModelError(f"{path / CONFIG_FILE}: format_version {config.get('format_version')!r} / "
                               f"head_position {config.get('head_position')!r} not supported "
                               f"(expected {FORMAT_VERSION} / {HEAD_POSITION!r}); retrain the reward model")
    return config


def check_base(path: Path, base_path: Optional[Path] = None) -> tuple[Path, dict]:
    """(base model folder, reward config) after checking the base exists and still has the recorded hash."""
    config = read_reward_config(path)
    base = Path(base_path if base_path is not None else config["base_model"])
    if not base.is_dir():
        raise RewardModelError(f"{path}: its base model folder {base} does not exist (paths in {CONFIG_FILE} are "
                               "relative to the project root: run from there, or pass base_path)")
    current = models.model_hash(base)
    if current != config["base_model_hash"]:
        raise StaleRewardModelError(
            f"{path} is stale: it was trained on {config['base_model']} with model_hash "
            f"{config['base_model_hash'][:12]}..., but {base} now has model_hash {current[:12]}...; "
            "retrain the reward model on the current base (`dvc repro reward_model`)")
    return base, config


def load_reward_model(path: str | Path, base_path: Optional[str | Path] = None) -> RewardModel:
    """Load a reward-model folder on its base model (from reward_config.json, or `base_path`).

    Raises StaleRewardModelError when the base model's hash differs from the one recorded at training time.
    The returned model is frozen and in eval mode: use score / score_pairs.
    """
    path = Path(path)
    base, config = check_base(path, None if base_path is None else Path(base_path))
    backbone, tokenizer = models.load_model(base, dtype=config.get("dtype", "float32"))
    if _hidden_size(backbone) != int(config["hidden_size"]):
        raise RewardModelError(f"{path}: hidden_size {config['hidden_size']} does not match the base model's "
                               f"{_hidden_size(backbone)}")
    models.load_adapters(backbone, path)
    head = nn.Linear(int(config["hidden_size"]), 1)
    weights = mx.load(str(path / HEAD_FILE))
    lm_weight = weights.pop("lm_weight", None)
    head.load_weights(list(weights.items()), strict=True)
    rm = RewardModel(backbone, tokenizer, max_seq_len=int(config["max_seq_len"]), head=head,
                     adapter_config=read_json(path / "adapter_config.json"),
                     lm_weight=1.0 if lm_weight is not None else 0.0)
    if lm_weight is not None:
        rm.lm_weight = lm_weight
    rm.freeze()
    rm.eval()
    mx.eval(rm.parameters())
    return rm
