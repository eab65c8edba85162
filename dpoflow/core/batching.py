"""Tokenize preference pairs and pack them into padded batches.

Tokenization convention (docs/architecture.md):
    prompt ids     = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True)
    completion ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]

Batch layout (one forward for chosen AND rejected):
    sequence s_i   = prompt_ids + completion_ids           (length L_i)
    input_ids[i]   = s_i, right-padded with pad_id to T    (T = max L_i rounded up to a multiple of 8)
    targets[i, t]  = s_i[t + 1]  (the input shifted left); pad_id from t = L_i - 1 on
    loss_mask[i,t] = 1.0 iff targets[i, t] is a completion token, i.e. len(prompt) - 1 <= t <= L_i - 2
Rows 0..B-1 of a pair batch are the chosen sequences, rows B..2B-1 the rejected ones, in the same pair order.
`positions` lists the flat indices (row * T + t) where loss_mask == 1, in row-major order, so that the LM head can be
applied only there (see dpoflow.core.logprobs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

PAD_MULTIPLE = 8  # pad T to a multiple of this: fewer distinct shapes, fewer recompiles / allocator misses
MEGA_CHUNK_BATCHES = 50  # length grouping sorts within shuffled chunks of this many batches


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion ids, ending with eos (unless truncated, see encode_pair)
    rejected_ids: list[int]
    truncated: bool = False  # True if encode_pair cut the prompt or a completion to fit max_len

    @property
    def max_length(self) -> int:
        """Length of the longer of the two full sequences (prompt + completion)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def pad_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, or eos when it has none (the loss mask hides it)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant generation prompt.

    Works with a Hugging Face tokenizer (whose transformers-5 `apply_chat_template` returns a BatchEncoding) and
    with mlx-lm's TokenizerWrapper (which returns a list).
    """
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("the chat template produced an empty prompt; at least one prompt token is required")
    return ids


def encode_completion(tokenizer: Any, response: str) -> list[int]:
    """Token ids of an assistant response: the text without special tokens, then eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; completions must end with eos")
    return [int(i) for i in tokenizer.encode(response, add_special_tokens=False)] + [int(eos)]


def encode_pair(tokenizer: Any, pair: Mapping[str, Any], max_len: int) -> EncodedPair:
    """Tokenize one canonical pair ({"prompt": messages, "chosen": str, "rejected": str, ...}).

    Truncation policy, applied when prompt + longer completion > max_len:
      1. The prompt is cut from the LEFT (its end, with the assistant generation prompt, is kept) so that the longer
         completion fits whole. Chosen and rejected always share the same (truncated) prompt. At least one prompt
         token is kept (the first completion token needs a position to be predicted from).
      2. Only if a completion alone is longer than max_len - 1, that completion is cut from the RIGHT (it then loses
         its eos) to max_len - len(prompt).
    `truncated` is set when either happens, so callers can count or drop such pairs.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    prompt = encode_prompt(tokenizer, pair["prompt"])
    chosen = encode_completion(tokenizer, pair["chosen"])
    rejected = encode_completion(tokenizer, pair["rejected"])

    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return EncodedPair(prompt, chosen, rejected)

    keep = max(max_len - longest, 1)
    prompt = prompt[-keep:]
    room = max_len - len(prompt)
    return EncodedPair(prompt, chosen[:room], rejected[:room], truncated=True)


# ----------------------------------------------------------------------------------------------------------------
# Length-grouped batch order


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices into `lengths`, grouped so that a batch holds sequences of similar length.

    Recipe: shuffle all indices; cut them into mega-chunks of MEGA_CHUNK_BATCHES * batch_size; sort each chunk by
    length (longest first); cut the chunk into batches; finally shuffle the order of all batches. Deterministic for
    (seed, epoch); every index appears exactly once. Only the last mega-chunk can leave one smaller batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    lengths = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lengths))
    chunk = MEGA_CHUNK_BATCHES * batch_size

    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        batches.extend(idx[b : b + batch_size].tolist() for b in range(0, len(idx), batch_size))

    return [batches[i] for i in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------------------------------------------
# Collation


@dataclass
class SeqBatch:
    """N padded sequences with a completion mask. See the module docstring for the layout."""

    input_ids: mx.array  # [N, T] int32
    targets: mx.array  # [N, T] int32, input shifted left
    loss_mask: mx.array  # [N, T] float32, 1 where the target is a completion token
    positions: np.ndarray  # [P] int64, flat indices row * T + t of completion targets (row-major)
    rows: np.ndarray  # [P] int32, row of each position
    target_ids: np.ndarray  # [P] int32, the target token at each position
    lengths: np.ndarray  # [N] int32, real (unpadded) sequence lengths L_i
    completion_lengths: np.ndarray  # [N] int32, completion tokens per row (= loss_mask.sum(1))
    n_tokens: int  # real tokens fed to the model (sum of lengths), for tokens/s

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def last_index(self) -> np.ndarray:
        """[N] position of the last real token of each row (the eos, unless truncated): where a reward head reads."""
        return self.lengths - 1

    def select_rows(self, rows: Sequence[int]) -> SeqBatch:
        """A sub-batch with the given rows (same T). Used to process big batches in chunks."""
        rows = np.asarray(rows, dtype=np.int64)
        T = self.seq_len
        mask = np.asarray(self.loss_mask)[rows]
        r, t = np.nonzero(mask)
        row_idx = mx.array(rows.astype(np.int32))
        return SeqBatch(
            input_ids=self.input_ids[row_idx],
            targets=self.targets[row_idx],
            loss_mask=self.loss_mask[row_idx],
            positions=(r * T + t).astype(np.int64),
            rows=r.astype(np.int32),
            target_ids=np.asarray(self.targets)[rows][r, t].astype(np.int32),
            lengths=self.lengths[rows],
            completion_lengths=self.completion_lengths[rows],
            n_tokens=int(self.lengths[rows].sum()),
        )


@dataclass
class PairBatch(SeqBatch):
    """A SeqBatch of 2B rows: rows 0..B-1 chosen, rows B..2B-1 rejected (pair i = rows i and B + i)."""

    n_pairs: int = 0


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def collate_sequences(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    pad_multiple: int = PAD_MULTIPLE,
) -> SeqBatch:
    """Pad prompt + completion sequences into a SeqBatch (for SFT, reward-model and DPO batches alike)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("cannot collate an empty batch")
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(p) < 1:
            raise ValueError(f"row {i}: empty prompt (the first completion token needs a prompt token before it)")
        if len(c) < 1:
            raise ValueError(f"row {i}: empty completion")

    N = len(prompt_ids)
    lengths = np.array([len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)], dtype=np.int32)
    T = _round_up(int(lengths.max()), pad_multiple)

    inputs = np.full((N, T), pad_id, dtype=np.int32)
    targets = np.full((N, T), pad_id, dtype=np.int32)
    mask = np.zeros((N, T), dtype=np.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        seq = np.asarray(list(p) + list(c), dtype=np.int32)
        L = len(seq)
        inputs[i, :L] = seq
        targets[i, : L - 1] = seq[1:]
        mask[i, len(p) - 1 : L - 1] = 1.0  # targets seq[len(p)] .. seq[L-1]: the completion

    r, t = np.nonzero(mask)
    return SeqBatch(
        input_ids=mx.array(inputs),
        targets=mx.array(targets),
        loss_mask=mx.array(mask),
        positions=(r * T + t).astype(np.int64),
        rows=r.astype(np.int32),
        target_ids=targets[r, t],
        lengths=lengths,
        completion_lengths=np.array([len(c) for c in completion_ids], dtype=np.int32),
        n_tokens=int(lengths.sum()),
    )


def collate_pairs(encoded: Sequence[EncodedPair], pad_id: int, pad_multiple: int = PAD_MULTIPLE) -> PairBatch:
    """One [2B, T] batch: chosen sequences in rows 0..B-1, rejected in rows B..2B-1 (same pair order)."""
    prompts = [e.prompt_ids for e in encoded]
    completions = [e.chosen_ids for e in encoded] + [e.rejected_ids for e in encoded]
    seq = collate_sequences(prompts + prompts, completions, pad_id, pad_multiple)
    return PairBatch(**{f.name: getattr(seq, f.name) for f in fields(seq)}, n_pairs=len(encoded))


class ChosenRejected(NamedTuple):
    """One value per pair for the chosen and for the rejected response (log-probs, rewards, token counts: [B]
    mx or numpy arrays each). A tuple, so `chosen, rejected = x` still works."""

    chosen: Any
    rejected: Any


def split_pairs(values: mx.array, n_pairs: int) -> ChosenRejected:
    """Split a per-row [2B] array of a PairBatch into (chosen [B], rejected [B])."""
    return ChosenRejected(values[:n_pairs], values[n_pairs:])
