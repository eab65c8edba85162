"""Log-probabilities of completion tokens under a causal LM, computing the LM head only where it is needed.

For a batch from dpoflow.core.batching (input_ids [N, T], completion targets at the flat indices `batch.positions`):

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

Shared prompt (pair batches: chosen and rejected share their prompt). Instead of running prompt + completion for
both rows, the prompt runs ONCE and both completions attend to its keys/values:

    prompt pass      body(prompt_ids [B, Pmax])            records each layer's keys/values K_p, V_p (after RoPE)
    completion pass  body(completion_ids [2B, Cmax - 1])   row r (pair r mod B) starts at position p_r; each layer
                     attends to [K_p; K_c] with mask (t < p_r for prompt keys, causal for completion keys)
    targets          c_0 is predicted from the prompt pass at p_r - 1, c_j (j >= 1) from the completion pass at j - 1

Same numbers as the [2B, T] forward (tests: within float32 rounding), differentiable, and 2B(P+C) tokens become
B P + 2B C: 1.75x fewer at P=192, C=32. It works through mlx-lm's cache protocol (the model reads positions from
`cache.offset`, keys/values from `cache.update_and_fetch`, the mask from `cache.make_mask`), so it is used only
for SHARED_PROMPT_MODEL_TYPES without sliding-window layers; other models use the [2B, T] forward.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dpoflow.core.batching import PairBatch, SeqBatch

# mlx-lm model types whose Model.__call__ is exactly `head(self.model(inputs))`, head = lm_head or tied embeddings.
HEAD_SPLIT_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3", "starcoder2"}
)


# model types whose attention takes positions, keys/values and the mask from the cache object (mlx-lm protocol)
SHARED_PROMPT_MODEL_TYPES = frozenset({"llama"})
SHARED_PROMPT_ENABLED = True  # benchmarks switch it off to time the [2B, T] forward


def _model_type(model: nn.Module) -> str | None:
    model_type = getattr(model, "model_type", None)
    if model_type is None and hasattr(model, "args"):
        model_type = getattr(model.args, "model_type", None)
    return model_type


def body_and_head(model: nn.Module) -> tuple[Callable[[mx.array], mx.array], Callable[[mx.array], mx.array]] | None:
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

    For a PairBatch, rows 0..B-1 are chosen and B..2B-1 rejected (dpoflow.core.batching.split_pairs); its prompt runs
    once for both where the model allows (shared_prompt_logprobs).
    n_tokens is float32 so that `sum_logps / n_tokens` (length normalization) needs no cast.
    """
    if isinstance(batch, PairBatch) and shared_prompt_supported(model):
        values = shared_prompt_logprobs(model, batch)
    else:
        values = target_logprobs(model, batch)
    return scatter_rows(values, batch), mx.array(batch.completion_lengths, dtype=mx.float32)


# ----------------------------------------------------------------------------------------------------------------
# Shared prompt (module docstring)


def shared_prompt_supported(model: nn.Module) -> bool:
    if not SHARED_PROMPT_ENABLED or _model_type(model) not in SHARED_PROMPT_MODEL_TYPES or body_and_head(model) is None:
        return False
    return getattr(model["model"], "swa_idx", None) is None  # no sliding-window layers


class _PromptKV:
    """Stand-in cache of the prompt pass: positions from 0, causal mask, records the layer's keys/values."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, **kwargs):
        return "causal"


class _CompletionKV:
    """Stand-in cache of the completion pass: row r continues pair (r mod B)'s prompt from position p_r."""

    def __init__(self, prompt: _PromptKV, offset: mx.array, mask: mx.array):
        self.prompt, self.offset, self.mask = prompt, offset, mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        pk, pv = self.prompt.keys, self.prompt.values
        return (
            mx.concatenate([mx.concatenate([pk, pk]), keys], axis=2),
            mx.concatenate([mx.concatenate([pv, pv]), values], axis=2),
        )

    def make_mask(self, n: int, **kwargs) -> mx.array:
        return self.mask


def shared_prompt_hidden(body: nn.Module, batch: PairBatch, n_inputs: int) -> tuple[mx.array, int, np.ndarray]:
    """Final hidden states of a PairBatch with its prompt run once (module docstring).

    The completion pass reads the first `n_inputs` completion tokens of every row. Returns (hidden, P, plen):
    hidden [B*P + 2B*n_inputs, D] = the prompt pass's rows (pair i, position t at i*P + t) followed by the
    completion pass's (row r, completion token j at B*P + r*n_inputs + j); P the padded prompt length; plen [2B]
    each row's prompt length. Raises ValueError when a pair's rows do not share their prompt.
    """
    B, T = batch.n_pairs, batch.seq_len
    plen = (batch.lengths - batch.completion_lengths).astype(np.int64)  # [2B]
    if not np.array_equal(plen[:B], plen[B:]):
        raise ValueError("shared_prompt_hidden: chosen and rejected rows must share their prompt")
    P, C = int(plen.max()), int(n_inputs)
    prompt_kv = [_PromptKV() for _ in body.layers]
    prompt_h = body(batch.input_ids[:B, :P], cache=prompt_kv)  # [B, P, D]; positions >= p_i are never read
    hidden = prompt_h.reshape(-1, prompt_h.shape[-1])
    if C > 0:
        ids = np.asarray(batch.input_ids)
        rows = np.arange(2 * B)[:, None]
        cols = np.minimum(plen[:, None] + np.arange(C)[None], T - 1)
        comp_ids = mx.array(ids[rows, cols].astype(np.int32))  # [2B, C]; beyond a row's completion: masked/unread
        keys_pos = np.arange(P + C)[None, None, :]
        mask = np.where(
            keys_pos < P,
            keys_pos < plen[:, None, None],  # prompt keys of the row's own pair
            keys_pos - P <= np.arange(C)[None, :, None],
        )  # causal over the completion
        comp_kv = [_CompletionKV(kv, mx.array(plen.astype(np.int32)), mx.array(mask[:, None])) for kv in prompt_kv]
        comp_h = body(comp_ids, cache=comp_kv)  # [2B, C, D]
        hidden = mx.concatenate([hidden, comp_h.reshape(-1, comp_h.shape[-1])])
    return hidden, P, plen


def shared_target_index(batch: PairBatch, P: int, C: int, plen: np.ndarray) -> mx.array:
    """Rows of `shared_prompt_hidden(..., C)`'s output that predict each completion target, in the order of
    batch.target_ids (row-major): c_0 from the prompt pass at p_r - 1, c_j (j >= 1) from the completion pass at
    j - 1."""
    B, n_comp = batch.n_pairs, batch.completion_lengths.astype(np.int64)
    first = (np.arange(2 * B) % B) * P + plen - 1
    index = [np.concatenate([[f], B * P + r * C + np.arange(n_comp[r] - 1)]) for r, f in enumerate(first)]
    return mx.array(np.concatenate(index).astype(np.int64))


def shared_prompt_logprobs(model: nn.Module, batch: PairBatch) -> mx.array:
    """target_logprobs(model, batch) for a PairBatch, computed with the prompt run once (module docstring)."""
    body, head = body_and_head(model)
    C = int(batch.completion_lengths.max()) - 1  # completion inputs: all but the last completion token
    hidden, P, plen = shared_prompt_hidden(body, batch, C)
    h = hidden[shared_target_index(batch, P, C, plen)]
    return logprobs_from_logits(head(h).astype(mx.float32), mx.array(batch.target_ids))


def reference_logprobs(ref_model: nn.Module, batch: SeqBatch) -> tuple[mx.array, mx.array]:
    """completion_logprobs of a frozen reference: gradient stopped and evaluated now (not part of the loss graph)."""
    sums, n = completion_logprobs(ref_model, batch)
    sums = mx.stop_gradient(sums)
    mx.eval(sums)
    return sums, n
