"""The Bradley-Terry reward model (Stage 4): the Stage 1 (SFT) transformer with a scalar head; training lives in
dpoflow.training.reward.

    hidden = body(input_ids)                      [N, T, D]   the SFT transformer incl. final norm, LoRA-adapted
    r_i    = head(hidden[i, last_index_i])        [N]         nn.Linear(D, 1) on the LAST NON-PAD token (the eos)
    loss   = mean -log sigma(r_c - r_w - m) + center_coef * mean (r_c + r_w)^2      (TRL's RewardTrainer)

Chosen and rejected go through one forward (`batching.collate_pairs`: rows 0..B-1 chosen, B..2B-1 rejected); their
shared prompt runs once where the model allows (`logprobs.shared_prompt_hidden`, as in DPO).
Sequences are right-padded and attention is causal, so the reward read at the last real token does not depend on
padding or on the other rows of the batch: scoring in batches equals scoring one by one.

The body trains through LoRA (`lora.attach_lora`) plus the head; `dpoflow.training.trainer.train` is the loop. The data
is split 80/20 BY PROMPT (`split_by_prompt`), so no prompt is in both splits.

Artifact (`save_reward_model` / `load_reward_model`), a folder:
    adapters.safetensors + adapter_config.json   LoRA of the body (the layout of lora.save_adapters / mlx-lm)
    head.safetensors                             {"weight": [1, D], "bias": [1]}
    reward_config.json                           base model path + loading.model_hash, hidden size, head position
Loading verifies the base model's hash, so a reward model trained on an older `models/sft` is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow.core.batching import (
    EncodedPair,
    PairBatch,
    SeqBatch,
    collate_pairs,
    collate_sequences,
    encode_completion,
    encode_pair,
    encode_prompt,
    pad_id,
    split_pairs,
)
from dpoflow.core.logprobs import (
    body_and_head,
    logprobs_from_logits,
    scatter_rows,
    shared_prompt_hidden,
    shared_prompt_supported,
    shared_target_index,
)
from dpoflow.modeling import loading, lora
from dpoflow.modeling.reference import forward_completions, forward_supported
from dpoflow.runtime.errors import UserError
from dpoflow.runtime.io import atomic_path, read_json, write_json

FORMAT_VERSION = 1
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "head.safetensors"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
HEAD_POSITION = "last_non_pad"
HEAD_POSITION_RULE = (
    "reward = head(final hidden state at SeqBatch.last_index = sequence length - 1), the last "
    "non-pad token: the completion's eos unless the completion was truncated"
)
HEAD_INIT_STD = 0.02  # normal(0, 0.02) head weight, zero bias (HF's initializer_range for a score head)
DEFAULT_LORA_SCALE = 20.0  # mlx-lm's default; params.yaml has no reward_model.lora_scale


class RewardModelError(UserError, ValueError):
    """A reward-model folder that cannot be loaded as asked."""


class StaleRewardModelError(RewardModelError):
    """The reward model's base model changed since it was trained (its loading.model_hash differs)."""


# ---------------------------------------------------------------------------------------------------------------
# The model


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
    raise RewardModelError(
        f"cannot find the transformer body of a {type(backbone).__name__}: "
        "expected an mlx-lm model with a `model` attribute"
    )


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

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        *,
        max_seq_len: int,
        seed: int = 0,
        adapter_config: dict | None = None,
        head: nn.Linear | None = None,
        lm_weight: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        if lm_weight:  # a trainable scalar; absent = no LM term (and no LM head computed)
            if body_and_head(backbone) is None:
                raise RewardModelError(
                    f"lm_logprob_weight needs a model whose LM head can be split off; {type(backbone).__name__} cannot"
                )
            self.lm_weight = mx.array([float(lm_weight)])
        self.hidden_size = _hidden_size(backbone)
        self.head = head if head is not None else init_head(self.hidden_size, seed)
        if tuple(self.head.weight.shape) != (1, self.hidden_size):
            raise RewardModelError(
                f"head weight has shape {tuple(self.head.weight.shape)}; expected "
                f"(1, {self.hidden_size}) for this base model"
            )
        # Plain attributes, not children: nn.Module would treat a dict (or a module) as part of the parameter tree.
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "adapter_config", adapter_config)  # from attach_lora / adapter_config.json
        self.max_seq_len = int(max_seq_len)
        self.pad_id = pad_id(tokenizer)
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
            h = body(batch.input_ids)  # [N, T, D]
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
            prompt_ids = prompt_ids[-max(self.max_seq_len - len(completion), 1) :]
            completion = completion[: self.max_seq_len - len(prompt_ids)]
        return prompt_ids, completion

    def score(
        self, prompts: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str], batch_size: int = 16
    ) -> list[float]:
        """Reward of each (prompt messages, response text) pair: one forward-only pass where the model allows
        (identical prompts run once; `batch_size` then only applies to other models), else length-sorted batches.

        Equals scoring one by one (up to float rounding): see the module docstring.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        if encoded and forward_supported(self.backbone):
            rewards = self._forward_rewards([e[0] for e in encoded], [e[1] for e in encoded])
            return [float(x) for x in np.asarray(rewards, dtype=np.float64)]
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        out = np.zeros(len(encoded), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate_sequences([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], self.pad_id)
            r = self.rewards(batch)
            mx.eval(r)
            out[idx] = np.asarray(r, dtype=np.float64)
        return [float(x) for x in out]

    def _forward_rewards(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> mx.array:
        """`rewards` of (prompt, completion) rows in one forward-only pass (reference.forward_completions: prompts
        deduplicated, their common prefix run once; the same rewards within float32 rounding) [N] float32."""
        lm = "lm_weight" in self
        out = forward_completions(self.backbone, prompts, completions, logprobs=lm, last_hidden=True)
        reward = self.head(out.last_hidden).reshape(len(prompts)).astype(mx.float32)
        if not lm:
            return reward
        return reward + self.lm_weight * (mx.array(out.logps) / mx.array(out.n_tokens, dtype=mx.float32))

    def score_encoded_pairs(
        self, encoded: Sequence[EncodedPair], batch_size: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """(chosen rewards [P], rejected rewards [P]) of tokenized pairs: one forward-only pass where the model
        allows (reference.forward_completions), else `batch_size` pairs per forward."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(encoded)
        if n and forward_supported(self.backbone):
            prompts = [e.prompt_ids for e in encoded]
            rewards = self._forward_rewards(
                prompts + prompts, [e.chosen_ids for e in encoded] + [e.rejected_ids for e in encoded]
            )
            rewards = np.asarray(rewards, dtype=np.float64)
            return rewards[:n], rewards[n:]
        order = sorted(range(n), key=lambda i: -encoded[i].max_length)
        chosen = np.zeros(n, dtype=np.float64)
        rejected = np.zeros(n, dtype=np.float64)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
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


def build_reward_model(
    backbone: nn.Module,
    tokenizer: Any,
    *,
    lora_rank: int,
    lora_layers: int,
    seed: int,
    max_seq_len: int,
    lora_scale: float = DEFAULT_LORA_SCALE,
    lm_logprob_weight: float = 0.0,
) -> RewardModel:
    """Freeze `backbone` (the SFT model), attach LoRA to its last `lora_layers` blocks and add a fresh head (and the
    LM log-likelihood term, initial weight `lm_logprob_weight`, when non-zero)."""
    adapter_config = lora.attach_lora(backbone, rank=lora_rank, scale=lora_scale, num_layers=lora_layers, seed=seed)
    return RewardModel(
        backbone,
        tokenizer,
        max_seq_len=max_seq_len,
        seed=seed,
        adapter_config=adapter_config,
        lm_weight=lm_logprob_weight,
    )


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_reward_model(rm: RewardModel, out_dir: Path, base_path: Path, base_hash: str | None = None) -> Path:
    """Write the reward-model folder atomically (see the module docstring). `base_path` is recorded as given
    (keep it relative, e.g. `models/sft`, so the folder works from the project root anywhere)."""
    if rm.adapter_config is None:
        raise RewardModelError("the reward model has no adapter config: build it with build_reward_model")
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": str(base_path),
        "base_model_hash": base_hash or loading.model_hash(Path(base_path)),
        "model_type": getattr(getattr(rm.backbone, "args", None), "model_type", None),
        "hidden_size": rm.hidden_size,
        "head_position": HEAD_POSITION,
        "head_position_rule": HEAD_POSITION_RULE,
        "head_file": HEAD_FILE,
        "max_seq_len": rm.max_seq_len,
        "dtype": "float32",
    }
    with atomic_path(out_dir) as tmp:
        lora.save_adapters(rm.backbone, tmp, rm.adapter_config)  # creates tmp/ with the two adapter files
        head = {"weight": rm.head.weight, "bias": rm.head.bias}
        if "lm_weight" in rm:
            head["lm_weight"] = rm.lm_weight
        # sorted: byte-deterministic
        mx.save_safetensors(str(tmp / HEAD_FILE), dict(sorted(head.items())), metadata={"format": "mlx"})
        write_json(tmp / CONFIG_FILE, config)
    return Path(out_dir)


def read_reward_config(path: Path) -> dict:
    path = Path(path)
    missing = [name for name in (CONFIG_FILE, HEAD_FILE) + ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise RewardModelError(
            f"{path}: not a reward-model folder (missing {', '.join(missing)}); train one with `dvc repro reward_model`"
        )
    config = read_json(path / CONFIG_FILE)
    if config.get("format_version") != FORMAT_VERSION or config.get("head_position") != HEAD_POSITION:
        raise RewardModelError(
            f"{path / CONFIG_FILE}: format_version {config.get('format_version')!r} / "
            f"head_position {config.get('head_position')!r} not supported "
            f"(expected {FORMAT_VERSION} / {HEAD_POSITION!r}); retrain the reward model"
        )
    return config


def check_base(path: Path, base_path: Path | None = None) -> tuple[Path, dict]:
    """(base model folder, reward config) after checking the base exists and still has the recorded hash."""
    config = read_reward_config(path)
    base = Path(base_path if base_path is not None else config["base_model"])
    if not base.is_dir():
        raise RewardModelError(
            f"{path}: its base model folder {base} does not exist (paths in {CONFIG_FILE} are "
            "relative to the project root: run from there, or pass base_path)"
        )
    current = loading.model_hash(base)
    if current != config["base_model_hash"]:
        raise StaleRewardModelError(
            f"{path} is stale: it was trained on {config['base_model']} with model_hash "
            f"{config['base_model_hash'][:12]}..., but {base} now has model_hash {current[:12]}...; "
            "retrain the reward model on the current base (`dvc repro reward_model`)"
        )
    return base, config


def load_reward_model(path: str | Path, base_path: str | Path | None = None) -> RewardModel:
    """Load a reward-model folder on its base model (from reward_config.json, or `base_path`).

    Raises StaleRewardModelError when the base model's hash differs from the one recorded at training time.
    The returned model is frozen and in eval mode: use score / score_pairs.
    """
    path = Path(path)
    base, config = check_base(path, None if base_path is None else Path(base_path))
    backbone, tokenizer = loading.load_model(base, dtype=config.get("dtype", "float32"))
    if _hidden_size(backbone) != int(config["hidden_size"]):
        raise RewardModelError(
            f"{path}: hidden_size {config['hidden_size']} does not match the base model's {_hidden_size(backbone)}"
        )
    lora.load_adapters(backbone, path)
    head = nn.Linear(int(config["hidden_size"]), 1)
    weights = mx.load(str(path / HEAD_FILE))
    lm_weight = weights.pop("lm_weight", None)
    head.load_weights(list(weights.items()), strict=True)
    rm = RewardModel(
        backbone,
        tokenizer,
        max_seq_len=int(config["max_seq_len"]),
        head=head,
        adapter_config=read_json(path / "adapter_config.json"),
        lm_weight=1.0 if lm_weight is not None else 0.0,
    )
    if lm_weight is not None:
        rm.lm_weight = lm_weight
    rm.freeze()
    rm.eval()
    mx.eval(rm.parameters())
    return rm
