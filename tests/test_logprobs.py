"""Tests for dpoflow.core.logprobs against a naive float64 token-by-token computation on a tiny llama."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.llama import Model, ModelArgs

from dpoflow.core.batching import EncodedPair, collate_pairs, collate_sequences, split_pairs
from dpoflow.core.logprobs import body_and_head, completion_logprobs, full_logits_at, target_logprobs, token_logprobs

VOCAB, PAD = 300, 0


def tiny_model(seed=0, tie=True):
    mx.random.seed(seed)
    args = ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, VOCAB, size=k).tolist()  # noqa: E731
    return [EncodedPair(ids(rng.integers(1, 10)), ids(rng.integers(1, 9)), ids(rng.integers(1, 9))) for _ in range(n)]


def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def naive_sums(model, prompts, completions):
    """One sequence at a time, full forward, float64 log_softmax, loop over completion tokens."""
    out = []
    for p, c in zip(prompts, completions):
        seq = list(p) + list(c)
        logp = log_softmax64(model(mx.array([seq]))[0])
        out.append(sum(logp[t - 1, seq[t]] for t in range(len(p), len(seq))))
    return np.array(out)


class Unsplittable(nn.Module):
    """Same function as the wrapped model, but no body/head split: exercises the full-logits fallback."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, x):
        return self.inner(x)


@pytest.mark.parametrize("tie", [True, False])
def test_matches_naive_float64(tie):
    model = tiny_model(tie=tie)
    assert body_and_head(model) is not None
    pairs = random_pairs(5)
    batch = collate_pairs(pairs, pad_id=PAD)
    sums, n = completion_logprobs(model, batch)
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    np.testing.assert_allclose(np.asarray(sums), naive_sums(model, prompts, completions), atol=1e-4, rtol=0)
    assert np.asarray(n).tolist() == [len(c) for c in completions]
    # fallback path gives the same numbers
    fb_sums, _ = completion_logprobs(Unsplittable(model), batch)
    np.testing.assert_allclose(np.asarray(fb_sums), np.asarray(sums), atol=1e-5, rtol=0)


def test_token_logprobs_dense_and_masked():
    model = tiny_model()
    batch = collate_pairs(random_pairs(4, seed=1), pad_id=PAD)
    dense = np.asarray(token_logprobs(model, batch))
    mask = np.asarray(batch.loss_mask)
    assert dense.shape == mask.shape
    assert (dense[mask == 0] == 0).all() and (dense[mask == 1] < 0).all()
    full = log_softmax64(model(batch.input_ids))
    tg = np.asarray(batch.targets)
    expected = np.take_along_axis(full, tg[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(dense, expected, atol=1e-5)
    np.testing.assert_allclose(dense.sum(1), np.asarray(completion_logprobs(model, batch)[0]), atol=1e-4)
    assert full_logits_at(model, batch).shape == (int(mask.sum()), VOCAB)


def test_padding_and_batch_composition_change_nothing():
    model = tiny_model()
    pairs = random_pairs(3, seed=2)
    base = np.asarray(completion_logprobs(model, collate_pairs(pairs, pad_id=PAD))[0])
    other_pad = np.asarray(completion_logprobs(model, collate_pairs(pairs, pad_id=7, pad_multiple=32))[0])
    np.testing.assert_allclose(other_pad, base, atol=1e-5)
    # an extra, much longer pair grows T; the first three pairs' sums do not move
    long_pair = EncodedPair(list(range(3, 40)), list(range(40, 60)), [5, 6])
    grown = np.asarray(completion_logprobs(model, collate_pairs(pairs + [long_pair], pad_id=PAD))[0])
    np.testing.assert_allclose(grown[[0, 1, 2, 4, 5, 6]], base, atol=1e-5)


def test_prompt_tokens_are_not_scored():
    """Moving tokens from the completion into the prompt removes exactly their terms from the sum."""
    model = tiny_model()
    prompt, completion = [5, 6, 7], [8, 9, 10, 11]
    batch = collate_sequences([prompt, prompt + completion[:2]], [completion, completion[2:]], pad_id=PAD)
    dense = np.asarray(token_logprobs(model, batch))
    sums = np.asarray(completion_logprobs(model, batch)[0])
    # row 1 scores only tokens 10, 11: equal to the last two terms of row 0
    np.testing.assert_allclose(sums[1], dense[0][dense[0] != 0][2:].sum(), atol=1e-5)


def test_one_forward_equals_separate_forwards():
    model = tiny_model()
    pairs = random_pairs(4, seed=3)
    joint = completion_logprobs(model, collate_pairs(pairs, pad_id=PAD))[0]
    chosen, rejected = split_pairs(joint, len(pairs))
    prompts = [p.prompt_ids for p in pairs]
    sep_c = completion_logprobs(model, collate_sequences(prompts, [p.chosen_ids for p in pairs], PAD))[0]
    sep_r = completion_logprobs(model, collate_sequences(prompts, [p.rejected_ids for p in pairs], PAD))[0]
    np.testing.assert_allclose(np.asarray(chosen), np.asarray(sep_c), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected), np.asarray(sep_r), atol=1e-5)


def test_differentiable_and_gradient_matches_full_forward():
    model = tiny_model(tie=False)
    batch = collate_pairs(random_pairs(3, seed=4), pad_id=PAD)

    def fast_loss(m):
        return completion_logprobs(m, batch)[0].sum()

    def naive_loss(m):
        logits = m(batch.input_ids)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = mx.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
        return (tok * batch.loss_mask).sum()

    v1, g1 = nn.value_and_grad(model, fast_loss)(model)
    v2, g2 = nn.value_and_grad(model, naive_loss)(model)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    from mlx.utils import tree_flatten

    flat1, flat2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert flat1.keys() == flat2.keys()
    for k in flat1:
        a, b = np.asarray(flat1[k]), np.asarray(flat2[k])
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3, err_msg=k)


def test_lora_model_still_splits():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny_model()
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batch = collate_pairs(random_pairs(2, seed=5), pad_id=PAD)
    assert body_and_head(model) is not None
    fast = np.asarray(completion_logprobs(model, batch)[0])
    slow = np.asarray(completion_logprobs(Unsplittable(model), batch)[0])
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def _plain(model, batch):
    """The [2B, T] forward (shared prompt switched off)."""
    from dpoflow.core import logprobs

    old, logprobs.SHARED_PROMPT_ENABLED = logprobs.SHARED_PROMPT_ENABLED, False
    try:
        return completion_logprobs(model, batch)[0]
    finally:
        logprobs.SHARED_PROMPT_ENABLED = old


@pytest.mark.parametrize("seed", [6, 7])
def test_shared_prompt_equals_the_full_pair_forward(seed):
    """Prompt once + both completions from its keys/values == prompt + completion for each row: values and
    gradients, with prompts and completions of different lengths (and one-token completions) in one batch."""
    from dpoflow.core.logprobs import shared_prompt_logprobs, shared_prompt_supported

    model = tiny_model(tie=False)
    pairs = random_pairs(5, seed=seed) + [EncodedPair([4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20], [21, 22])]
    batch = collate_pairs(pairs, pad_id=PAD)
    assert shared_prompt_supported(model)
    shared = completion_logprobs(model, batch)[0]
    np.testing.assert_allclose(np.asarray(shared), np.asarray(_plain(model, batch)), atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.asarray(shared_prompt_logprobs(model, batch)), np.asarray(target_logprobs(model, batch)), atol=1e-5, rtol=0
    )
    only_first = collate_pairs([EncodedPair([3, 4, 5], [6], [7]), EncodedPair([8], [9], [10])], pad_id=PAD)
    np.testing.assert_allclose(
        np.asarray(completion_logprobs(model, only_first)[0]), np.asarray(_plain(model, only_first)), atol=1e-5, rtol=0
    )

    from mlx.utils import tree_flatten

    g1 = nn.value_and_grad(model, lambda m: completion_logprobs(m, batch)[0].sum())(model)[1]
    g2 = nn.value_and_grad(model, lambda m: _plain(m, batch).sum())(model)[1]
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-3, err_msg=k)


def test_shared_prompt_with_lora_and_the_fallback_for_other_models():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from dpoflow.core.logprobs import shared_prompt_supported

    model = tiny_model()
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batch = collate_pairs(random_pairs(3, seed=8), pad_id=PAD)
    np.testing.assert_allclose(
        np.asarray(completion_logprobs(model, batch)[0]), np.asarray(_plain(model, batch)), atol=1e-5
    )
    assert not shared_prompt_supported(Unsplittable(model))


# ----------------------------------------------------------------------------------------------------------------
# The forward-only pass (dpoflow.modeling.reference.forward_completions)


def prefixed_items(n, seed=0, prefix_len=6):
    """(prompt, completion) rows: a shared prefix (a system turn), duplicated prompts, one-token completions."""
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, VOCAB, size=int(k)).tolist()  # noqa: E731
    prefix = ids(prefix_len)
    prompts = [prefix + ids(rng.integers(1, 8)) for _ in range(n)]
    prompts[1] = prompts[0]  # a duplicated prompt runs once
    completions = [ids(rng.integers(1, 12)) for _ in range(n)]
    completions[2] = completions[2][:1]
    return prompts, completions


@pytest.mark.parametrize("budget", [2048, 12])  # 12 tokens: many batches and completion buckets
@pytest.mark.parametrize("prefix_len", [6, 0])
def test_forward_completions_equal_the_plain_forward(monkeypatch, budget, prefix_len):
    from dpoflow.modeling import reference

    monkeypatch.setattr(reference, "FORWARD_TOKENS", budget)
    monkeypatch.setattr(reference, "MIN_BUCKET_TOKENS", 4)
    monkeypatch.setattr(reference, "HEAD_ROWS", 7)
    model = tiny_model(seed=4)
    prompts, completions = prefixed_items(23, seed=1, prefix_len=prefix_len)
    batch = collate_sequences(prompts, completions, PAD)
    want_sums, want_n = completion_logprobs(model, batch)  # plain [N, T] forward, stock ops
    want_hidden = model.model(batch.input_ids)[mx.arange(batch.n_rows), mx.array(batch.last_index)]
    got = reference.forward_completions(model, prompts, completions, last_hidden=True)
    np.testing.assert_allclose(got.logps, np.asarray(want_sums), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.n_tokens, np.asarray(want_n))
    np.testing.assert_allclose(np.asarray(got.last_hidden), np.asarray(want_hidden), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.logps, naive_sums(model, prompts, completions), rtol=1e-4, atol=1e-4)
    only_hidden = reference.forward_completions(model, prompts, completions, logprobs=False, last_hidden=True)
    assert only_hidden.logps is None
    np.testing.assert_allclose(np.asarray(only_hidden.last_hidden), np.asarray(got.last_hidden), atol=1e-6)


def test_ref_logps_and_implicit_rewards_equal_the_batched_forward(monkeypatch):
    """compute_ref_logps / implicit_rewards on the forward-only pass equal their per-batch [2B, T] forwards."""
    from dpoflow.core.batching import ChosenRejected
    from dpoflow.eval import measure
    from dpoflow.modeling import reference

    model = tiny_model(seed=5)
    prompts, completions = prefixed_items(12, seed=2)
    _, rejected = prefixed_items(12, seed=3)
    encoded = [EncodedPair(p, c, r) for p, c, r in zip(prompts, completions, rejected)]
    fast = reference.pair_forward(model, encoded).logps
    ref = ChosenRejected(fast[:12] + 0.25, fast[12:] - 0.5)
    got = [measure.implicit_rewards(model, encoded, ref, 0.3, norm, PAD, 4) for norm in (False, True)]
    monkeypatch.setattr(measure, "forward_supported", lambda m: False)
    want = [measure.implicit_rewards(model, encoded, ref, 0.3, norm, PAD, 4) for norm in (False, True)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.chosen, w.chosen, atol=1e-5)
        np.testing.assert_allclose(g.rejected, w.rejected, atol=1e-5)
    sums, _ = completion_logprobs(model, collate_pairs(encoded, PAD))
    np.testing.assert_allclose(fast, np.asarray(sums), rtol=1e-5, atol=1e-5)
