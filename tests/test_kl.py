"""Tests for dpoflow.core.kl: exact KL against numpy float64, chunking, the reference callable, and k3."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.llama import Model, ModelArgs

from dpoflow.core.batching import EncodedPair, collate_pairs
from dpoflow.core.kl import exact_token_kl, k3_estimate, k3_terms, kl_per_position, policy_reference_kl
from dpoflow.core.logprobs import full_logits_at, logprobs_from_logits, token_logprobs

VOCAB, PAD = 300, 0


def tiny_model(seed=0):
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
        tie_word_embeddings=True,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def perturbed(model, scale, seed=1):
    other = tiny_model()
    mx.random.seed(seed)
    other.update(tree_map(lambda w: w + scale * mx.random.normal(w.shape), model.parameters()))
    mx.eval(other.parameters())
    return other


def batch_of(n=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, VOCAB, size=k).tolist()  # noqa: E731
    pairs = [EncodedPair(ids(rng.integers(1, 8)), ids(rng.integers(2, 9)), ids(rng.integers(2, 9))) for _ in range(n)]
    return collate_pairs(pairs, pad_id=PAD)


def numpy_kl(p_logits, q_logits, mask):
    def lsm(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = lsm(p_logits), lsm(q_logits)
    per_tok = (np.exp(lp) * (lp - lq)).sum(-1) * mask
    return per_tok.sum() / mask.sum(), per_tok.sum(-1)


def test_self_kl_is_zero():
    model = tiny_model()
    batch = batch_of()
    logits = model(batch.input_ids)
    mean, per_seq = exact_token_kl(logits, model(batch.input_ids), batch.loss_mask)
    assert abs(float(mean)) <= 1e-7 and np.abs(np.asarray(per_seq)).max() <= 1e-7
    out = policy_reference_kl(model, model, batch)
    assert abs(out["kl_mean_per_token"]) <= 1e-7 and abs(out["kl_seq_mean"]) <= 1e-7 and out["k3"] <= 1e-7
    assert out["n_tokens"] == int(batch.completion_lengths.sum())


def test_kl_matches_numpy_float64():
    policy = tiny_model()
    ref = perturbed(policy, 0.05)
    batch = batch_of(seed=1)
    pl, ql = policy(batch.input_ids), ref(batch.input_ids)
    mask = np.asarray(batch.loss_mask)
    exp_mean, exp_seq = numpy_kl(pl, ql, mask)
    assert exp_mean > 1e-3  # a real perturbation
    mean, per_seq = exact_token_kl(pl, ql, batch.loss_mask)
    np.testing.assert_allclose(float(mean), exp_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per_seq), exp_seq, rtol=1e-5, atol=1e-7)

    out = policy_reference_kl(policy, ref, batch)
    np.testing.assert_allclose(out["kl_mean_per_token"], exp_mean, rtol=1e-5)
    np.testing.assert_allclose(out["kl_seq_mean"], exp_seq.mean(), rtol=1e-5)


def test_chunking_and_callable_reference_agree():
    policy = tiny_model()
    ref = perturbed(policy, 0.05)
    batch = batch_of(n=5, seed=2)
    whole = policy_reference_kl(policy, ref, batch)
    one_row_chunks = policy_reference_kl(policy, ref, batch, max_logit_elements=1)
    calls = []

    def ref_logits_fn(sub):
        calls.append(sub.n_rows)
        return full_logits_at(ref, sub)

    via_fn = policy_reference_kl(policy, ref_logits_fn, batch, max_logit_elements=VOCAB * 12)
    assert len(calls) > 1 and sum(calls) == batch.n_rows
    for other in (one_row_chunks, via_fn):
        for key in ("kl_mean_per_token", "kl_seq_mean", "k3"):
            np.testing.assert_allclose(other[key], whole[key], rtol=1e-5)


def test_k3_nonnegative_and_matches_dense_definition():
    policy = tiny_model()
    ref = perturbed(policy, 0.05)
    batch = batch_of(seed=3)
    lp, lq = token_logprobs(policy, batch), token_logprobs(ref, batch)
    k3 = float(k3_estimate(lp, lq, batch.loss_mask))
    mask = np.asarray(batch.loss_mask)
    log_r = np.asarray(lq, np.float64) - np.asarray(lp, np.float64)
    expected = ((np.exp(log_r) - 1 - log_r) * mask).sum() / mask.sum()
    np.testing.assert_allclose(k3, expected, rtol=1e-4)
    assert k3 >= 0
    assert np.asarray(k3_terms(mx.array([-1.0, 0.0, 3.0]), mx.array([2.0, 0.0, -4.0]))).min() >= 0
    assert abs(policy_reference_kl(policy, ref, batch)["k3"] - k3) <= 1e-5 * max(k3, 1e-3)


def test_k3_close_to_exact_kl_for_small_perturbation_on_policy_samples():
    """k3 is unbiased for KL when tokens are sampled from the policy: check it on sampled tokens."""
    policy = tiny_model()
    ref = perturbed(policy, 0.01)
    batch = batch_of(seed=4)
    pl, ql = full_logits_at(policy, batch), full_logits_at(ref, batch)  # [P, V]
    exact = float(kl_per_position(pl, ql).mean())
    n_samples = 400
    key = mx.random.key(0)
    samples = mx.random.categorical(pl, num_samples=n_samples, key=key)  # [P, S]
    P = pl.shape[0]
    rep = lambda x: mx.repeat(x, n_samples, axis=0)  # noqa: E731
    flat = samples.reshape(-1)
    lp = logprobs_from_logits(rep(pl), flat)
    lq = logprobs_from_logits(rep(ql), flat)
    k3 = float(k3_estimate(lp, lq, mx.ones((P * n_samples,))))
    assert exact > 0 and k3 >= 0
    assert abs(k3 - exact) < 0.1 * exact, (k3, exact)
