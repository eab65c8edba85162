"""The one definition of KL(policy || reference) used by every stage.

Definition: the mean per-token KL over completion tokens, computed EXACTLY over the full vocabulary at each
completion-target position t of each row (the positions of dpoflow.core.batching's loss_mask):

    KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)),   p = softmax(policy logits), q = softmax(reference logits)
    kl_mean_per_token = sum_{i,t} KL_{i,t} / (number of completion tokens)     (token-weighted over the batch)
    kl_seq_mean       = mean_i sum_t KL_{i,t}                                  (per-sequence KL, averaged)

Both distributions are conditioned on the same (dataset) prefix. log_softmax is taken in float32.

k3 (Schulman, "Approximating KL divergence", 2020) at the target tokens y_t, with log r = log q(y_t) - log p(y_t):
    k3 = mean_t [ (r - 1) - log r ]  >= 0
It is an unbiased estimate of KL only when the y_t are sampled from the policy (on-policy completions); on
dataset completions it is a cheap diagnostic that tracks the exact KL, not a substitute for it.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow.core.batching import SeqBatch
from dpoflow.core.logprobs import full_logits_at, logprobs_from_logits

# Max logits elements (positions x vocab) of one model held at once by policy_reference_kl: 2**25 floats = 128 MiB.
DEFAULT_MAX_LOGIT_ELEMENTS = 2**25


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_per_position(policy_logits: mx.array, ref_logits: mx.array) -> mx.array:
    """Exact KL(p || q) over the last (vocabulary) axis: [..., V] x [..., V] -> [...]."""
    logp = _log_softmax(policy_logits)
    logq = _log_softmax(ref_logits)
    return (mx.exp(logp) * (logp - logq)).sum(axis=-1)


def exact_token_kl(policy_logits: mx.array, ref_logits: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(kl_mean_per_token scalar, per_sequence_sum [N]) for logits [N, T, V] and a 0/1 mask [N, T].

    kl_mean_per_token = sum(mask * KL) / sum(mask); per_sequence_sum[i] = sum_t mask[i, t] KL[i, t].
    Differentiable (can serve as a KL penalty).
    """
    mask = mask.astype(mx.float32)
    per_token = kl_per_position(policy_logits, ref_logits) * mask
    per_sequence = per_token.sum(axis=-1)
    return per_sequence.sum() / mx.maximum(mask.sum(), 1.0), per_sequence


def k3_terms(policy_logp_tokens: mx.array, ref_logp_tokens: mx.array) -> mx.array:
    """Per-token k3 = (r - 1) - log r with log r = ref - policy; clipped at 0 (it is >= 0 up to rounding)."""
    log_r = ref_logp_tokens.astype(mx.float32) - policy_logp_tokens.astype(mx.float32)
    return mx.maximum(mx.expm1(log_r) - log_r, 0.0)


def k3_estimate(policy_logp_tokens: mx.array, ref_logp_tokens: mx.array, mask: mx.array) -> mx.array:
    """Masked mean of k3 over tokens: sum(mask * k3) / sum(mask). Inputs are per-token log-probs of the same
    tokens (e.g. dpoflow.core.logprobs.token_logprobs [N, T]) and a 0/1 mask of the same shape."""
    mask = mask.astype(mx.float32)
    return (k3_terms(policy_logp_tokens, ref_logp_tokens) * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _vocab_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    if args is not None and getattr(args, "vocab_size", None):
        return int(args.vocab_size)
    return 65536  # unknown: assume a large vocabulary, i.e. small chunks


def _row_chunks(batch: SeqBatch, max_positions: int) -> list[list[int]]:
    """Consecutive row groups whose completion-token count stays within max_positions (at least one row each)."""
    chunks, current, count = [], [], 0
    for row, n in enumerate(batch.completion_lengths.tolist()):
        if current and count + n > max_positions:
            chunks.append(current)
            current, count = [], 0
        current.append(row)
        count += n
    if current:
        chunks.append(current)
    return chunks


RefLogitsFn = Callable[[SeqBatch], mx.array]


def policy_reference_kl(
    policy_model: nn.Module,
    ref: nn.Module | RefLogitsFn,
    batch: SeqBatch,
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
    *,
    per_sequence: bool = False,
) -> dict:
    """KL(policy || reference) on `batch`, as python floats (a metric: no gradient).

    `ref` is either the reference model, or a callable `ref_logits_fn(sub_batch) -> [P, V]` returning the reference
    logits at sub_batch's completion positions (for LoRA: disable the adapters inside it and call
    dpoflow.core.logprobs.full_logits_at(policy_model, sub_batch)). Rows are processed in chunks so that at most
    max_logit_elements logits per model exist at once (the vocabulary can be 49k).

    Returns {"kl_mean_per_token", "kl_seq_mean", "k3", "n_tokens"} (definitions in the module docstring); with
    `per_sequence`, also "kl_per_sequence" (sum_t KL_{i,t} of each row, a list of floats) and "tokens_per_sequence"
    (each row's completion tokens), so that a caller can resample sequences or prompts (dpoflow.eval.measure).
    """
    if isinstance(ref, nn.Module):
        ref_model = ref
        ref_logits_fn: RefLogitsFn = lambda b: full_logits_at(ref_model, b)  # noqa: E731
    else:
        ref_logits_fn = ref

    max_positions = max(1, max_logit_elements // _vocab_size(policy_model))
    seq_kl = np.zeros(batch.n_rows, dtype=np.float64)
    k3_sum = 0.0
    for rows in _row_chunks(batch, max_positions):
        sub = batch.select_rows(rows)
        policy_logits = mx.stop_gradient(full_logits_at(policy_model, sub))
        ref_logits = mx.stop_gradient(ref_logits_fn(sub))
        targets = mx.array(sub.target_ids)
        kl_tokens = kl_per_position(policy_logits, ref_logits)  # [P_sub]
        kl_rows = mx.zeros((len(rows),), dtype=mx.float32).at[mx.array(sub.rows)].add(kl_tokens)
        policy_logp = logprobs_from_logits(policy_logits, targets)
        ref_logp = logprobs_from_logits(ref_logits, targets)
        k3_chunk = k3_terms(policy_logp, ref_logp).sum()
        mx.eval(kl_rows, k3_chunk)
        seq_kl[rows] = np.asarray(kl_rows, dtype=np.float64)
        k3_sum += float(k3_chunk)

    n_tokens = int(batch.completion_lengths.sum())
    out = {
        "kl_mean_per_token": float(seq_kl.sum() / max(n_tokens, 1)),
        "kl_seq_mean": float(seq_kl.mean()),
        "k3": k3_sum / max(n_tokens, 1),
        "n_tokens": n_tokens,
    }
    if per_sequence:
        out["kl_per_sequence"] = seq_kl.tolist()
        out["tokens_per_sequence"] = [int(n) for n in batch.completion_lengths.tolist()]
    return out
