"""Reference log-probs of every pair's chosen and rejected response, computed once (Stage 3) and cached; and the
forward-only pass that computes them (also used by the held-out implicit rewards and the reward model's scoring).

`data/ref_logps.safetensors` (keys `<split>/chosen`, `<split>/rejected`, in row order) lets Stage 5 train without
running the reference. The cache's metadata holds a hash of the pair ids, the truncation length and the reference
model's hash: a cache that no longer matches its pairs or model is refused (`StaleRefLogps`). The file is
byte-deterministic (io.write_safetensors), so rerunning Stage 3 on the same inputs leaves Stages 5-7 up to date.

Forward-only pass (`forward_completions`, llama-type models): no gradient and no optimizer, so it can do less work
than the training forward while computing the same numbers (within float32 rounding; tests/test_logprobs.py):
    distinct prompts      deduplicated (a pair's chosen and rejected share theirs; so do K responses of a prompt)
    common prefix         of all distinct prompts (the chat template's system turn) runs once, batch 1
    middles               prompt[P0:] of each distinct prompt, right-padded, batches of ~FORWARD_TOKENS tokens,
                          attending causally to the prefix's keys/values
    completions           every completion row attends to the prefix and its own prompt's middle; rows sorted by
                          length and cut into buckets of ~FORWARD_TOKENS padded tokens (little padding)
    LM head               only at completion targets, HEAD_ROWS rows at a time, normalized by mlx_logsumexp
On the CPU the SwiGLU and attention softmax run on fast_ops.mlx_exp (MLX's own exp algorithm as compiled ops: the
stock numbers within 1 ulp, ~3x faster), and freed memory is kept for reuse (fast_ops.keep_freed_memory).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from dpoflow.core.batching import (
    ChosenRejected,
    EncodedPair,
    collate_pairs,
    encode_pair,
    pad_id,
    split_pairs,
)
from dpoflow.core.logprobs import body_and_head, completion_logprobs, shared_prompt_supported
from dpoflow.modeling.fast_ops import keep_freed_memory, mlx_exp_ops, mlx_logsumexp
from dpoflow.runtime import io
from dpoflow.runtime.errors import UserError

REF_LOGPS_FORMAT = "dpoflow-ref-logps-v1"


class StaleRefLogps(UserError, ValueError):
    """The reference log-prob cache does not belong to these pairs / this reference model / this max_len."""


def pairs_fingerprint(pairs: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the pair ids in row order: changes when any pair, or the order, changes."""
    return hashlib.sha256("\n".join(str(p["id"]) for p in pairs).encode("utf-8")).hexdigest()


def compute_ref_logps(
    reference: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Mapping[str, Any]],
    max_len: int,
    batch_size: int,
    desc: str = "ref logps",
) -> ChosenRejected:
    """Summed log-probs of each pair's chosen and rejected completion under `reference`, in row order:
    ChosenRejected([N] float32, [N] float32).

    Tokenized exactly as Stage 5 tokenizes (batching.encode_pair with the same max_len). Llama-type models: the
    forward-only pass (`forward_completions`, module docstring); others: `batch_size` pairs per forward, one
    forward for chosen and rejected, length-grouped batches."""
    n = len(pairs)
    chosen = np.zeros(n, dtype=np.float32)
    rejected = np.zeros(n, dtype=np.float32)
    if n == 0:
        return ChosenRejected(chosen, rejected)
    encoded = [encode_pair(tokenizer, pair, max_len) for pair in pairs]
    if forward_supported(reference):
        sums = pair_forward(reference, encoded, desc=desc).logps
        return ChosenRejected(sums[:n].copy(), sums[n:].copy())
    order = np.argsort([-e.max_length for e in encoded], kind="stable")
    pad = pad_id(tokenizer)
    with tqdm(total=n, desc=desc, unit="pair", dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = collate_pairs([encoded[i] for i in idx], pad)
            sums, _ = completion_logprobs(reference, batch)
            c, r = split_pairs(sums, len(idx))
            mx.eval(c, r)
            chosen[idx], rejected[idx] = np.asarray(c), np.asarray(r)
            bar.update(len(idx))
    return ChosenRejected(chosen, rejected)


# ---------------------------------------------------------------------------------------------------------------
# The forward-only pass (module docstring)

FORWARD_TOKENS = 2048  # padded body tokens per forward (middles of a batch; completions of a bucket)
MIN_BUCKET_TOKENS = 256  # a completion bucket is cut shorter (less padding) only once it has this many tokens
HEAD_ROWS = 128  # LM-head rows per chunk: its [rows, V] float32 logits stay under 32 MB (glibc's largest heap block)


@dataclass
class CompletionForward:
    logps: np.ndarray | None  # [N] float32: summed log p of each completion's tokens (None unless asked)
    last_hidden: mx.array | None  # [N, D]: final hidden state at each completion's last token (None unless asked)
    n_tokens: np.ndarray  # [N] int32: completion lengths


def forward_supported(model: nn.Module) -> bool:
    """Whether `forward_completions` runs on this model (llama-type models without sliding-window layers)."""
    return shared_prompt_supported(model)


class _Record:
    """Cache protocol of the prefix pass: positions from 0, causal, records the keys/values."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, **kwargs):
        return "causal" if n > 1 else None


class _AfterPrefix:
    """Cache protocol of the middles pass: right-padded rows continue the prefix (positions P0 + t), attending to
    its keys/values and causally to their own."""

    def __init__(self, prefix: _Record | None, offset: int):
        self.prefix, self.offset = prefix, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        if self.prefix is None:
            return keys, values
        shape = (keys.shape[0], *self.prefix.keys.shape[1:])
        pk, pv = mx.broadcast_to(self.prefix.keys, shape), mx.broadcast_to(self.prefix.values, shape)
        return mx.concatenate([pk, keys], axis=2), mx.concatenate([pv, values], axis=2)

    def make_mask(self, n: int, **kwargs):
        return "causal" if n > 1 else None  # bottom-right aligned: query t sees the prefix and middle keys <= t


class _AfterPrompt:
    """Cache protocol of a completion bucket: row r continues its prompt (prefix + middle of prompt g_r) from
    position P0 + m_r; keys = [prefix; middle of g_r (masked beyond m_r); own (causal)]."""

    def __init__(self, prefix: _Record | None, middle: _AfterPrefix, groups: mx.array, offset: mx.array, mask):
        self.prefix, self.middle, self.groups, self.offset, self.mask = prefix, middle, groups, offset, mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        parts_k, parts_v = [], []
        if self.prefix is not None:
            shape = (keys.shape[0], *self.prefix.keys.shape[1:])
            parts_k.append(mx.broadcast_to(self.prefix.keys, shape))
            parts_v.append(mx.broadcast_to(self.prefix.values, shape))
        parts_k += [self.middle.keys[self.groups], keys]
        parts_v += [self.middle.values[self.groups], values]
        return mx.concatenate(parts_k, axis=2), mx.concatenate(parts_v, axis=2)

    def make_mask(self, n: int, **kwargs):
        return self.mask


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n


def _buckets(runs: np.ndarray) -> list[np.ndarray]:
    """Rows with runs > 0, longest first, cut into buckets of <= FORWARD_TOKENS padded tokens; a new bucket starts
    where a row is <= 3/4 of the bucket's width once the bucket has MIN_BUCKET_TOKENS (padding vs GEMM height)."""
    rows = [k for k in np.argsort(-runs, kind="stable") if runs[k] > 0]
    out, cur = [], []
    for k in rows:
        if cur:
            width = runs[cur[0]]
            if (len(cur) + 1) * width > FORWARD_TOKENS or (
                runs[k] * 4 <= width * 3 and len(cur) * width >= MIN_BUCKET_TOKENS
            ):
                out.append(np.array(cur))
                cur = []
        cur.append(k)
    if cur:
        out.append(np.array(cur))
    return out


def _pad(rows: Sequence[Sequence[int]], width: int) -> mx.array:
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return mx.array(out)


def forward_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    logprobs: bool = True,
    last_hidden: bool = False,
    desc: str | None = None,
) -> CompletionForward:
    """Log-probs of `completions[i]` given `prompts[i]` (summed per completion) and/or the final hidden state at
    its last token, without gradients, for a model with `forward_supported` (module docstring). Every prompt and
    completion needs >= 1 token. Equal to `core.logprobs.completion_logprobs` / the body's output within float32
    rounding."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) < 1 for p in prompts) or any(len(c) < 1 for c in completions):
        raise ValueError("forward_completions: every prompt and completion needs at least one token")
    body, head = body_and_head(model)
    n = len(prompts)
    n_tokens = np.array([len(c) for c in completions], dtype=np.int32)
    if n == 0:
        return CompletionForward(np.zeros(0, np.float32) if logprobs else None, None, n_tokens)
    cpu = mx.default_device().type == mx.cpu
    if cpu:
        keep_freed_memory()
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    group_of = {p: g for g, p in enumerate(distinct)}
    items_of: list[list[int]] = [[] for _ in distinct]
    for i, p in enumerate(prompts):
        items_of[group_of[tuple(p)]].append(i)
    P0 = min(common_prefix_length(distinct), min(len(p) for p in distinct) - 1)  # every middle keeps a token
    sums = np.zeros(n, dtype=np.float32) if logprobs else None
    hidden_parts, hidden_items = [], []
    bar = tqdm(total=n, desc=desc, unit="seq", dynamic_ncols=True, disable=desc is None)
    with mlx_exp_ops(model) if cpu else nullcontext(), bar:
        prefix = None
        if P0 > 0:
            prefix = [_Record() for _ in body.layers]
            body(mx.array([list(distinct[0][:P0])]), cache=prefix)
            mx.eval([(c.keys, c.values) for c in prefix])
        order = sorted(range(len(distinct)), key=lambda g: len(distinct[g]))
        start = 0
        while start < len(order):  # batches of distinct prompts, ~FORWARD_TOKENS padded middle tokens each
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * (len(distinct[order[stop]]) - P0) <= FORWARD_TOKENS:
                stop += 1
            groups = order[start:stop]
            start = stop
            items = np.array([i for g in groups for i in items_of[g]], dtype=np.int64)
            local = np.repeat(np.arange(len(groups)), [len(items_of[g]) for g in groups])
            middles = [list(distinct[g][P0:]) for g in groups]
            s, h = _forward_batch(body, head, middles, items, local, completions, P0, prefix, logprobs, last_hidden)
            if logprobs:
                sums[items] = s
            if last_hidden:
                hidden_parts.append(h)
                hidden_items.append(items)
            bar.update(len(items))
    hidden = None
    if last_hidden:  # back to item order
        where = np.argsort(np.concatenate(hidden_items), kind="stable")
        hidden = mx.concatenate(hidden_parts)[mx.array(where.astype(np.int64))]
    return CompletionForward(sums, hidden, n_tokens)


def _forward_batch(body, head, middles, items, group, completions, P0, prefix, logprobs, last_hidden):
    """One batch: the middles of some distinct prompts and `items`, the completions on them (`group[k]`: the
    middle of item k). Returns (log-prob sums [K] float32 or None, last hidden states [K, D] or None)."""
    M = max(len(m) for m in middles)
    n_layers = len(body.layers)
    mid_cache = [_AfterPrefix(prefix[i] if prefix else None, P0) for i in range(n_layers)]
    h_mid = body(_pad(middles, M), cache=mid_cache)  # [G, M, D]
    D = h_mid.shape[-1]
    m_len = np.array([len(m) for m in middles], dtype=np.int64)
    first = group * M + m_len[group] - 1  # flat row predicting each completion's first token: the prompt's last
    flat, base = [h_mid.reshape(-1, D)], M * len(middles)
    runs = np.array([len(completions[i]) - (0 if last_hidden else 1) for i in items], dtype=np.int64)
    start_of = np.full(len(items), -1, dtype=np.int64)  # flat row of each completion's first input
    for bucket in _buckets(runs):
        C = int(runs[bucket[0]])
        g, m = group[bucket], m_len[group[bucket]]
        key = np.arange(P0 + M + C)[None, None, :]
        mask = (key < P0) | ((key >= P0) & (key < P0 + m[:, None, None]))
        mask = mask | ((key >= P0 + M) & (key - P0 - M <= np.arange(C)[None, :, None]))  # [R, C, P0 + M + C]
        offset, gi, mask = mx.array((P0 + m).astype(np.int32)), mx.array(g.astype(np.int32)), mx.array(mask[:, None])
        cache = [_AfterPrompt(prefix[i] if prefix else None, mid_cache[i], gi, offset, mask) for i in range(n_layers)]
        h = body(_pad([completions[items[k]][:C] for k in bucket], C), cache=cache)  # [R, C, D]
        start_of[bucket] = base + np.arange(len(bucket)) * C
        flat.append(h.reshape(-1, D))
        base += len(bucket) * C
    hidden = mx.concatenate(flat) if len(flat) > 1 else flat[0]
    h_last = sums = None
    if last_hidden:
        ends = np.array([len(completions[i]) for i in items]) - 1
        h_last = hidden[mx.array(np.where(start_of >= 0, start_of + ends, first))]
    if logprobs:
        index = np.concatenate(
            [
                np.concatenate([[first[k]], start_of[k] + np.arange(len(completions[i]) - 1)])
                for k, i in enumerate(items)
            ]
        ).astype(np.int64)
        target = np.concatenate([np.asarray(completions[i], dtype=np.int32) for i in items])
        owner = np.repeat(np.arange(len(items), dtype=np.int32), [len(completions[i]) for i in items])
        values = []
        for s in range(0, len(index), HEAD_ROWS):  # the LM head at completion targets only, in chunks
            logits = head(hidden[mx.array(index[s : s + HEAD_ROWS])]).astype(mx.float32)
            t = mx.array(target[s : s + HEAD_ROWS])
            values.append(mx.take_along_axis(logits, t[:, None], axis=-1).squeeze(-1) - mlx_logsumexp(logits))
        sums = mx.zeros((len(items),), dtype=mx.float32).at[mx.array(owner)].add(mx.concatenate(values))
    mx.eval([x for x in (sums, h_last) if x is not None])
    return (np.asarray(sums) if logprobs else None), h_last


def pair_forward(model: nn.Module, encoded: Sequence[EncodedPair], **kwargs) -> CompletionForward:
    """forward_completions of tokenized pairs: items 0..N-1 the chosen completions, N..2N-1 the rejected."""
    prompts = [e.prompt_ids for e in encoded]
    return forward_completions(
        model, prompts + prompts, [e.chosen_ids for e in encoded] + [e.rejected_ids for e in encoded], **kwargs
    )


def write_ref_logps(
    path: Path,
    logps: Mapping[str, ChosenRejected],
    pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    max_len: int,
    reference_hash: str,
) -> Path:
    """Write {split: ChosenRejected} as `<split>/chosen`, `<split>/rejected` + staleness metadata."""
    arrays, meta = {}, {"format": REF_LOGPS_FORMAT, "max_len": str(max_len), "reference_hash": reference_hash}
    for split, values in logps.items():
        if not len(values.chosen) == len(values.rejected) == len(pairs[split]):
            raise ValueError(f"ref logps for {split!r}: lengths differ from the {len(pairs[split])} pairs")
        arrays[f"{split}/chosen"] = np.ascontiguousarray(values.chosen, dtype=np.float32)
        arrays[f"{split}/rejected"] = np.ascontiguousarray(values.rejected, dtype=np.float32)
        meta[f"{split}/ids_sha256"] = pairs_fingerprint(pairs[split])
        meta[f"{split}/n_pairs"] = str(len(pairs[split]))
    io.write_safetensors(path, arrays, metadata=meta)  # sorted header: the same logps give the same bytes
    return Path(path)


def read_ref_logps(
    path: Path,
    pairs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    max_len: int | None = None,
    reference_hash: str | None = None,
) -> dict[str, ChosenRejected]:
    """Read the cache for the given splits, refusing it (StaleRefLogps) if any split's pair ids, the max_len or
    the reference hash differ from what it was computed for."""
    path = Path(path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        if meta.get("format") != REF_LOGPS_FORMAT:
            raise StaleRefLogps(f"{path}: not a dpoflow reference log-prob cache (format {meta.get('format')!r})")
        rerun = "rerun Stage 3 (dvc repro init)"
        if max_len is not None and meta.get("max_len") != str(max_len):
            raise StaleRefLogps(f"{path}: computed with max_len {meta.get('max_len')}, now {max_len}: {rerun}")
        if reference_hash is not None and meta.get("reference_hash") != reference_hash:
            raise StaleRefLogps(
                f"{path}: computed with another reference model "
                f"({str(meta.get('reference_hash'))[:12]} != {reference_hash[:12]}): {rerun}"
            )
        out = {}
        for split, rows in pairs.items():
            if f"{split}/chosen" not in keys:
                raise StaleRefLogps(f"{path}: no reference log-probs for split {split!r}: {rerun}")
            if meta.get(f"{split}/ids_sha256") != pairs_fingerprint(rows):
                raise StaleRefLogps(
                    f"{path}: the {split!r} pairs changed since the cache was computed "
                    f"({meta.get(f'{split}/n_pairs')} cached pairs, {len(rows)} now, "
                    f"different ids or order): {rerun}"
                )
            out[split] = ChosenRejected(f.get_tensor(f"{split}/chosen"), f.get_tensor(f"{split}/rejected"))
    return out
