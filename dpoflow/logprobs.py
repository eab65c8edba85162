"""Log-probabilities of completion tokens under a causal LM, computing the LM head only where it is needed.

For a batch from dpoflow.batching (input_ids [N, T], completion targets at the flat indices `batch.positions`):

    h        = body(input_ids)                  [N, T, D]   transformer body incl. final norm (`model.model`)
    h_c      = h.reshape(N*T, D)[positions]     [P, D]      only completion-target positions (P << N*T)
    logits   = head(h_c)                        [P, V]      `model.lm_head` or tied `embed_tokens.as_linear`
    logp_j   = logits[j, y_j] - logsumexp(logits[j])        no full log_softmax is materialized
    sum_i    = sum of logp_j over the positions j of row i

The LM head (V = 49k for SmolLM2) dominates a small model's step, so skipping prompt and padding positions saves
most of its cost. All functions are differentiable (usable inside nn.value_and_grad).

The body/head split is only used for model types whose forward is exactly `head(model.model(x))` (see
HEAD_SPLIT_MODEL_TYPES; e.g. granite and cohere scale their logits, so they are not listed). Any other model falls
back to the full forward `model(x)` and gathers the logits at the same positions: same numbers, slower.
"""
from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from dpoflow.batching import SeqBatch

# mlx-lm model types whose Model.__call__ is exactly `head(self.model(inputs))`, head = lm_head or tied embeddings.
HEAD_SPLIT_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3", "starcoder2"}
)


def _model_type(model: nn.Module) -> Optional[str]:
    model_type = getattr(model, "model_type", None)
    if model_type is None and hasattr(model, "args"):
        model_type = getattr(model.args, "model_type", None)
    return model_type


def body_and_head(model: nn.Module) -> Optional[tuple[Callable[[mx.array], mx.array], Callable[[mx.array], mx.array]]]:
    """(body, head) with model(x) == head(body(x)), or None if this model cannot be split safely."""
    if _model_type(model) not in HEAD_SPLIT_MODEL_TYPES or "model" not in model:
        return None
    body = model["model"]
    if "lm_head" in model:
        return body, model["lm_head"]
    if "embed_tokens" in body:
        return body, body["embed_tokens"].as_linear
    return None


def full_logits_at(model: nn.Module, batch: SeqBatch) -> mx.array:
    """Logits [P, V] (float32) at the completion-target positions of `batch`, in the order of `batch.positions`."""
    positions = mx.array(batch.positions)
    split = body_and_head(model)
    if split is None:
        logits = model(batch.input_ids)  # [N, T, V]
        return logits.reshape(-1, logits.shape[-1])[positions].astype(mx.float32)
    body, head = split
    hidden = body(batch.input_ids)  # [N, T, D]
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # [P, D]
    return head(hidden).astype(mx.float32)


def logprobs_from_logits(logits: mx.array, target_ids: mx.array) -> mx.array:
    """log softmax(logits)[target] = logit[target] - logsumexp(logits), per row of logits [P, V] -> [P]."""
    target_logit = mx.take_along_axis(logits, target_ids[:, None], axis=-1).squeeze(-1)
    return target_logit - mx.logsumexp(logits, axis=-1)


def target_logprobs(model: nn.Module, batch: SeqBatch) -> mx.array:
    """log p(target) at each completion-target position: flat [P], aligned with batch.positions / batch.rows."""
    return logprobs_from_logits(full_logits_at(model, batch), mx.array(batch.target_ids))


def scatter_rows(values: mx.array, batch: SeqBatch) -> mx.array:
    """Sum flat per-position values [P] into per-row totals [N]."""
    return mx.zeros((batch.n_rows,), dtype=values.dtype).at[mx.array(batch.rows)].add(values)


def token_logprobs(model: nn.Module, batch: SeqBatch) -> mx.array:
    """Dense per-token log-probs [N, T]: log p(targets[i, t]) where loss_mask == 1, exactly 0 elsewhere."""
    flat = target_logprobs(model, batch)
    dense = mx.zeros((batch.n_rows * batch.seq_len,), dtype=flat.dtype).at[mx.array(batch.positions)].add(flat)
    return dense.reshape(batch.n_rows, batch.seq_len)


def completion_logprobs(model: nn.Module, batch: SeqBatch) -> tuple[mx.array, mx.array]:
    """(sum_logps [N], n_tokens [N]): per-row sum of log p(target) over completion tokens, and their count.

    For a PairBatch, rows 0..B-1 are chosen and B..2B-1 rejected (dpoflow.batching.split_pairs).
    n_tokens is float32 so that `sum_logps / n_tokens` (length normalization) needs no cast.
    """
    sums = scatter_rows(target_logprobs(model, batch), batch)
    return sums, mx.array(batch.completion_lengths, dtype=mx.float32)


def reference_logprobs(ref_model: nn.Module, batch: SeqBatch) -> tuple[mx.array, mx.array]:
    """completion_logprobs of a frozen reference: gradient stopped and evaluated now (not part of the loss graph)."""
    sums, n = completion_logprobs(ref_model, batch)
    sums = mx.stop_gradient(sums)
    mx.eval(sums)
    return sums, n
