"""Tests for dpoflow.modeling.policy (Stage 3): the policy starts at the reference, the one KL measurement, architecture
checks, and the reference log-prob cache."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from dpoflow.core.batching import collate_pairs, encode_pair
from dpoflow.core.batching import pad_id as pad_id_of
from dpoflow.core.logprobs import completion_logprobs
from dpoflow.data import tasks
from dpoflow.data.pairs import make_pair
from dpoflow.eval.measure import measure_kl, sample_completions
from dpoflow.modeling.loading import ArchitectureMismatch, load_model
from dpoflow.modeling.lora import base_parameters
from dpoflow.modeling.policy import StalePolicy, build_policy, load_policy, save_policy, verify_architecture
from dpoflow.modeling.reference import StaleRefLogps, compute_ref_logps, read_ref_logps, write_ref_logps
from dpoflow.modeling.tiny import make_tiny_model

SYSTEM = "Reply with only the final answer."
PROMPTS = [tasks.make_prompt(f"What is {a} + {2 * a}?", SYSTEM) for a in range(4)]
KL_ARGS = dict(seed=3, n_samples=2, max_tokens=8)


def lora_policy(model_dir, seed=0):
    return build_policy(model_dir, "lora", lora_rank=4, lora_layers=2, seed=seed)


def make_pairs(n, offset=0):
    return [
        make_pair(tasks.make_prompt(f"What is {a} + {a + 1}?", SYSTEM), str(2 * a + 1), str(2 * a))
        for a in range(offset, offset + n)
    ]


def perturb(model, scale=0.05, seed=1):
    leaves = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(leaves))
    model.update(
        tree_unflatten([(name, w + scale * mx.random.normal(w.shape, key=k)) for (name, w), k in zip(leaves, keys)])
    )
    mx.eval(model.parameters())
    return model


def randomize_lora_b(model, seed=1):
    for i, (_, module) in enumerate(m for m in model.named_modules() if "lora_b" in m[1]):
        module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=mx.random.key(seed + i))
    mx.eval(model.parameters())


def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_fresh_policy_kl_is_exactly_zero(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    assert policy.reference is None and policy.finetune == "lora"
    out = measure_kl(policy.model, policy.tokenizer, PROMPTS, None, **KL_ARGS)
    assert out["n_tokens"] > 0
    assert (out["kl"], out["kl_seq"], out["k3"]) == (0.0, 0.0, 0.0)  # LoRA B = 0: identical logits
    reference, _ = load_model(tiny_model_dir)  # an independent copy of the reference: also 0
    assert measure_kl(policy.model, policy.tokenizer, PROMPTS, reference, **KL_ARGS)["kl"] == 0.0

    full = build_policy(tiny_model_dir, "full")
    assert full.reference is not None and full.model is not full.reference
    trainable = {k for k, _ in tree_flatten(full.model.trainable_parameters())}
    assert trainable == {k for k, _ in tree_flatten(full.reference.parameters())}
    assert not tree_flatten(full.reference.trainable_parameters())
    assert measure_kl(full.model, full.tokenizer, PROMPTS, full.reference, **KL_ARGS)["kl"] == 0.0


def test_kl_against_perturbed_reference_matches_numpy(tiny_model_dir):
    policy, tokenizer = load_model(tiny_model_dir)
    reference = perturb(load_model(tiny_model_dir)[0])
    out = measure_kl(policy, tokenizer, PROMPTS, reference, **KL_ARGS)

    batch = sample_completions(policy, tokenizer, PROMPTS, **KL_ARGS)  # same seed: the same sampled completions
    mask = np.asarray(batch.loss_mask, dtype=np.float64)
    lp, lq = log_softmax64(policy(batch.input_ids)), log_softmax64(reference(batch.input_ids))
    per_token = (np.exp(lp) * (lp - lq)).sum(-1) * mask
    assert out["n_tokens"] == int(mask.sum())
    expected = per_token.sum() / mask.sum()
    assert expected > 1e-3  # a real perturbation
    np.testing.assert_allclose(out["kl"], expected, rtol=1e-4)
    np.testing.assert_allclose(out["kl_seq"], per_token.sum(-1).mean(), rtol=1e-4)
    targets = np.asarray(batch.targets)
    log_r = (np.take_along_axis(lq, targets[..., None], -1) - np.take_along_axis(lp, targets[..., None], -1))[..., 0]
    np.testing.assert_allclose(out["k3"], ((np.expm1(log_r) - log_r) * mask).sum() / mask.sum(), rtol=1e-3)


def test_samples_are_the_policys_and_reproducible(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    a = sample_completions(policy.model, policy.tokenizer, PROMPTS, **KL_ARGS)
    b = sample_completions(policy.model, policy.tokenizer, PROMPTS, **KL_ARGS)
    assert a.n_rows == len(PROMPTS) * KL_ARGS["n_samples"]
    np.testing.assert_array_equal(np.asarray(a.input_ids), np.asarray(b.input_ids))
    c = sample_completions(policy.model, policy.tokenizer, PROMPTS, seed=4, n_samples=2, max_tokens=8)
    assert not np.array_equal(np.asarray(a.input_ids), np.asarray(c.input_ids))


def test_adapters_disabled_is_the_reference(tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    randomize_lora_b(policy.model)  # a trained-looking policy
    reference, _ = load_model(tiny_model_dir)
    off = measure_kl(policy.model, policy.tokenizer, PROMPTS, None, **KL_ARGS)
    separate = measure_kl(policy.model, policy.tokenizer, PROMPTS, reference, **KL_ARGS)
    assert off["kl"] > 1e-4
    for key in ("kl", "kl_seq", "k3"):
        np.testing.assert_allclose(off[key], separate[key], rtol=1e-5)
    plain, tokenizer = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        measure_kl(plain, tokenizer, PROMPTS, None, **KL_ARGS)


def test_architecture_checks_name_the_first_difference(tmp_path, tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    reference, _ = load_model(tiny_model_dir)
    assert set(base_parameters(policy.model)) == {k for k, _ in tree_flatten(reference.parameters())}
    verify_architecture(policy.model, tiny_model_dir)  # LoRA: base weights under the adapters vs the folder
    verify_architecture(policy.model, reference)

    narrow_dir = make_tiny_model(tmp_path / "narrow", seed=0, hidden_size=32)
    with pytest.raises(ArchitectureMismatch, match="'hidden_size': 32 != 64"):
        verify_architecture(policy.model, narrow_dir)
    with pytest.raises(ArchitectureMismatch, match="hidden_size"):
        verify_architecture(policy.model, load_model(narrow_dir)[0])

    half = load_model(tiny_model_dir)[0]
    half.model.norm.weight = half.model.norm.weight.astype(mx.float16)
    with pytest.raises(ArchitectureMismatch, match=r"'model\.norm\.weight': dtype"):
        verify_architecture(policy.model, half)
    deeper = make_tiny_model(tmp_path / "deeper", seed=0, num_layers=3)
    with pytest.raises(ArchitectureMismatch, match="num_hidden_layers"):
        verify_architecture(policy.model, deeper)


def test_policy_round_trip_and_stale_reference(tmp_path, tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    save_policy(policy, tmp_path / "policy_init")
    assert {p.name for p in (tmp_path / "policy_init").iterdir()} == {
        "adapters.safetensors",
        "adapter_config.json",
        "policy_config.json",
    }
    loaded = load_policy(tiny_model_dir, tmp_path / "policy_init")
    assert loaded.reference_hash == policy.reference_hash
    assert sorted(k for k, _ in tree_flatten(loaded.model.trainable_parameters())) == sorted(
        k for k, _ in tree_flatten(policy.model.trainable_parameters())
    )
    assert measure_kl(loaded.model, loaded.tokenizer, PROMPTS, None, **KL_ARGS)["kl"] == 0.0

    full = build_policy(tiny_model_dir, "full")
    save_policy(full, tmp_path / "full_init", weights=False)
    assert load_policy(tiny_model_dir, tmp_path / "full_init").finetune == "full"

    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(StalePolicy, match="rerun Stage 3"):
        load_policy(other, tmp_path / "policy_init")


def test_ref_logps_cache_matches_direct_computation_and_detects_staleness(tmp_path, tiny_model_dir):
    policy = lora_policy(tiny_model_dir)
    pairs = {"train": make_pairs(11), "heldout": make_pairs(5, offset=40)}
    path = tmp_path / "ref_logps.safetensors"
    with policy.as_reference() as ref:  # several length-grouped batches
        computed = {split: compute_ref_logps(ref, policy.tokenizer, rows, 64, 3) for split, rows in pairs.items()}
    write_ref_logps(path, computed, pairs, 64, policy.reference_hash)

    reference, tokenizer = load_model(tiny_model_dir)
    for split, rows in pairs.items():
        for i, row in enumerate(rows):  # one pair at a time, a plain reference model
            sums, _ = completion_logprobs(
                reference, collate_pairs([encode_pair(tokenizer, row, 64)], pad_id_of(tokenizer))
            )
            np.testing.assert_allclose(computed[split].chosen[i], float(sums[0]), rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(computed[split].rejected[i], float(sums[1]), rtol=1e-5, atol=1e-4)

    cached = read_ref_logps(path, pairs, max_len=64, reference_hash=policy.reference_hash)
    for split in pairs:
        for side in ("chosen", "rejected"):
            value = getattr(cached[split], side)
            assert value.dtype == np.float32 and value.shape == (len(pairs[split]),)
            np.testing.assert_array_equal(value, getattr(computed[split], side))

    changed = {**pairs, "train": pairs["train"][:-1] + make_pairs(1, offset=90)}
    with pytest.raises(StaleRefLogps, match="'train' pairs changed"):
        read_ref_logps(path, changed)
    with pytest.raises(StaleRefLogps, match="'heldout' pairs changed"):
        read_ref_logps(path, {**pairs, "heldout": pairs["heldout"][::-1]})  # same ids, other order
    with pytest.raises(StaleRefLogps, match="max_len"):
        read_ref_logps(path, pairs, max_len=32)
    with pytest.raises(StaleRefLogps, match="another reference model"):
        read_ref_logps(path, pairs, reference_hash="0" * 64)
