"""Tests for dpoflow.training.dpo (Stage 5) on a tiny model with a planted preference ("yes" over "no")."""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest

from dpoflow.core.batching import encode_pair
from dpoflow.core.batching import pad_id as pad_id_of
from dpoflow.core.losses import sft_loss
from dpoflow.data import tasks
from dpoflow.data.pairs import make_pair
from dpoflow.eval.gates import evaluate_gate
from dpoflow.eval.measure import Probe, heldout_metrics, measure_policy
from dpoflow.modeling.policy import build_policy
from dpoflow.modeling.reference import compute_ref_logps
from dpoflow.runtime.params import CHIPS, DpoParams, parse_params
from dpoflow.training import dpo
from dpoflow.training.dpo import likelihood_displacement, make_batch, make_loss_fn, train_dpo
from dpoflow.training.trainer import TrainingDiverged

SYSTEM = "Reply with only the final answer."
MAX_LEN = 64
BATCH = 4


def planted(pairs_of):
    return [make_pair(tasks.make_prompt(f"Is {a} less than {a + b}?", SYSTEM), "yes", "no") for a, b in pairs_of]


TRAIN = planted([(a, b) for a in range(8) for b in range(1, 5)])  # 32 pairs
HELDOUT = planted([(a, b) for a in range(20, 24) for b in range(1, 3)])  # 8 pairs, other prompts
KL_PROMPTS = [tasks.make_prompt(f"Is {a} less than {a + 3}?", SYSTEM) for a in range(30, 34)]


class Killed(RuntimeError):
    pass


def params(**overrides):
    base = dict(
        learning_rate=1e-3, max_steps=8, warmup_steps=0, kl_every=4, checkpoint_every=2, kl_target=10.0, max_retries=0
    )
    return dataclasses.replace(DpoParams(), **{**base, **overrides})


def fresh(model_dir):
    """The Stage 3 state: a fresh LoRA policy and its reference log-prob cache."""
    policy = build_policy(model_dir, "lora", lora_rank=4, lora_layers=2, seed=0)
    with policy.as_reference() as reference:
        cache = {
            split: compute_ref_logps(reference, policy.tokenizer, rows, MAX_LEN, 16)
            for split, rows in (("train", TRAIN), ("heldout", HELDOUT))
        }
    return policy, cache


def run(policy, cache, dpo_params, checkpoint_dir=None, **kwargs):
    probe = Probe(
        kl_prompts=KL_PROMPTS,
        kl_samples=1,
        kl_max_tokens=8,
        seed=0,
        heldout=[encode_pair(policy.tokenizer, row, MAX_LEN) for row in HELDOUT],
        heldout_ref_logps=cache["heldout"],
        beta=dpo_params.beta,
        length_normalize=dpo_params.length_normalize,
        batch_size=2 * BATCH,
    )
    return train_dpo(
        policy.model,
        policy.tokenizer,
        TRAIN,
        cache["train"],
        dpo_params,
        batch_size=BATCH,
        seed=0,
        max_len=MAX_LEN,
        checkpoint_dir=checkpoint_dir,
        measure=lambda step: measure_policy(policy.model, policy.tokenizer, probe, policy.reference)[0],
        **kwargs,
    )


def first_batch(policy, cache):
    encoded = [encode_pair(policy.tokenizer, row, MAX_LEN) for row in TRAIN[:BATCH]]
    return make_batch(encoded, range(BATCH), cache["train"], pad_id_of(policy.tokenizer))


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", math.log(2)),
        ("robust", math.log(2)),
        ("hinge", 1.0),
        ("ipo", (1 / (2 * 0.1)) ** 2),
    ],
)
def test_policy_equal_to_reference_gives_the_textbook_initial_loss(tiny_model_dir, loss_type, expected):
    policy, cache = fresh(tiny_model_dir)
    loss, aux = make_loss_fn(params(loss_type=loss_type))(policy.model, first_batch(policy, cache))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(aux[key])) < 1e-5


def test_first_training_step_is_ln2_with_zero_rewards(tiny_model_dir):
    policy, cache = fresh(tiny_model_dir)
    result = run(policy, cache, params(max_steps=1))
    first = result.history[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5  # cached reference == policy at step 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5
    assert set(dpo.STEP_KEYS) | {"loss", "grad_norm", "tokens_per_sec", "peak_memory_gb"} <= set(first)
    assert first["logps/chosen"] < 0 and first["tokens_per_sec"] > 0


def test_sft_weight_adds_the_chosen_nll_and_length_normalization_keeps_ln2(tiny_model_dir):
    policy, cache = fresh(tiny_model_dir)
    batch = first_batch(policy, cache)
    loss, aux = make_loss_fn(params(sft_weight=0.5))(policy.model, batch)
    nc = mx.array(batch.pairs.completion_lengths[:BATCH], dtype=mx.float32)
    expected = math.log(2) + 0.5 * float(sft_loss(batch.reference.chosen, nc))  # policy == reference: same log-probs
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(aux["dpo_loss"]), math.log(2), rtol=1e-5)
    loss, _ = make_loss_fn(params(length_normalize=True))(policy.model, batch)
    np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-5)


def test_training_on_a_planted_preference_raises_heldout_gap_and_accuracy(tiny_model_dir):
    policy, cache = fresh(tiny_model_dir)
    heldout = [encode_pair(policy.tokenizer, row, MAX_LEN) for row in HELDOUT]
    before = heldout_metrics(policy.model, heldout, cache["heldout"], 0.1, False, pad_id_of(policy.tokenizer), 8)
    assert abs(before["heldout_gap"]) < 1e-5  # policy == reference
    result = run(policy, cache, params(max_steps=10))
    m = result.metrics
    assert result.kl_target_met and m["attempts"][0]["reason"] == "completed"
    assert m["heldout_gap"] > 0.1 and m["heldout_gap"] > before["heldout_gap"] + 0.1
    assert m["heldout_accuracy"] > 0.9 > before["heldout_accuracy"]
    assert 0 < m["kl"] < 10.0 and m["steps"] == 10
    assert m["train"]["rewards/margins"] > 0 and m["train"]["loss"] < math.log(2)
    assert [e["step"] for e in m["kl_checks"]] == [4, 8, 10]  # every kl_every steps and at the end
    assert {"tokens_per_sec", "pairs_per_sec", "peak_memory_gb", "train_seconds"} <= set(result.perf)


def test_kl_over_target_retries_with_lower_lr_from_stage3_policy_and_gate_fails(tiny_model_dir):
    policy, cache = fresh(tiny_model_dir)
    first_losses = []
    on_step = lambda step, metrics: first_losses.append(metrics["loss"]) if step == 1 else None  # noqa: E731
    result = run(
        policy,
        cache,
        params(learning_rate=1e-2, kl_target=1e-6, max_retries=2, lr_backoff=0.5, max_steps=6, kl_every=2),
        on_step=on_step,
    )
    attempts = result.metrics["attempts"]
    assert [a["learning_rate"] for a in attempts] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    assert all(not a["kl_target_met"] and "kl_target" in a["reason"] and a["steps"] == 2 for a in attempts)
    assert all(a["kl"] > 1e-6 for a in attempts)
    # every retry restarts from the Stage 3 policy: its first loss is ln 2 again
    assert first_losses == pytest.approx([math.log(2)] * 3, abs=1e-5)
    assert not result.kl_target_met and result.warnings

    p = parse_params({"batch_size": dict.fromkeys(CHIPS, 1), "dpo": {"max_kl": 1e-6, "min_heldout_gap": -1.0}})
    gate = evaluate_gate("dpo", result.metrics, p)
    assert not gate.passed
    assert [r.check.metric for r in gate.results if not r.passed] == ["kl"]


def test_killed_run_resumes_with_the_same_final_metrics(tmp_path, tiny_model_dir):
    # attempt 1 (lr 1e-3) goes over the KL target and is retried at lr 1e-5; the kill hits the retry
    dpo_params = params(
        learning_rate=1e-3, kl_target=3e-3, lr_backoff=0.01, max_retries=1, max_steps=8, kl_every=4, checkpoint_every=2
    )
    policy, cache = fresh(tiny_model_dir)
    uninterrupted = run(policy, cache, dpo_params, tmp_path / "a", fingerprint="f")
    assert [a["reason"] == "completed" for a in uninterrupted.attempts] == [False, True]

    def kill(step, metrics):
        if step == 5 and kill.armed and metrics["learning_rate"] < 1e-4:  # attempt 2, after its step-4 checkpoint
            raise Killed

    kill.armed = True
    policy, cache = fresh(tiny_model_dir)
    with pytest.raises(Killed):
        run(policy, cache, dpo_params, tmp_path / "b", fingerprint="f", on_step=kill)
    assert (tmp_path / "b" / "attempts.json").exists() and (tmp_path / "b" / "attempt_2" / "state.json").exists()

    kill.armed = False
    policy, cache = fresh(tiny_model_dir)  # a new process: the Stage 3 policy again
    resumed = run(policy, cache, dpo_params, tmp_path / "b", fingerprint="f", on_step=kill)
    assert resumed.perf["resumed_from_step"] == 4
    assert resumed.metrics == uninterrupted.metrics
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in uninterrupted.history]


def test_a_checkpoint_with_another_fingerprint_is_not_resumed(tmp_path, tiny_model_dir):
    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed

    policy, cache = fresh(tiny_model_dir)
    with pytest.raises(Killed):
        run(policy, cache, params(max_steps=4), tmp_path, fingerprint="f", on_step=kill_at_3)
    policy, cache = fresh(tiny_model_dir)
    assert run(policy, cache, params(max_steps=4), tmp_path, fingerprint="g").perf["resumed_from_step"] == 0
    policy, cache = fresh(tiny_model_dir)
    with pytest.raises(Killed):
        run(policy, cache, params(max_steps=4), tmp_path / "f", fingerprint="f", on_step=kill_at_3)
    policy, cache = fresh(tiny_model_dir)
    assert run(policy, cache, params(max_steps=4), tmp_path / "f", fingerprint="f").perf["resumed_from_step"] == 2


def test_nan_loss_stops_with_training_diverged_and_keeps_the_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    calls = {"n": 0}
    real = dpo.dpo_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out._replace(losses=out.losses * float("nan") if calls["n"] == 3 else out.losses)

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    policy, cache = fresh(tiny_model_dir)
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 3"):
        run(policy, cache, params(checkpoint_every=1, kl_every=100), tmp_path / "ckpt")
    state = tmp_path / "ckpt" / "attempt_1" / "state.json"
    assert state.exists() and '"step": 2' in state.read_text()


def test_likelihood_displacement_compares_first_and_last_tenth():
    falling = [{"logps/chosen": -10.0 - i} for i in range(20)]
    out = likelihood_displacement(falling)
    assert out["likelihood_displacement"] is True
    assert out["likelihood_displacement_drop"] == pytest.approx(18.0)  # mean(-10,-11) vs mean(-28,-29)
    rising = [{"logps/chosen": -10.0 + i} for i in range(20)]
    assert likelihood_displacement(rising)["likelihood_displacement"] is False
