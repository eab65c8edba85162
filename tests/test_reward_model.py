"""Tests for the reward model (Stage 4) on the tiny random model: a planted preference is learned, the split by
prompt never leaks, save/load round-trips, batched scoring equals one-by-one, stale bases are refused, the gate
prescribes, and the stage script writes its artifacts."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from dpoflow.core.batching import encode_pair
from dpoflow.core.losses import bradley_terry_loss
from dpoflow.data.pairs import make_pair, write_pairs
from dpoflow.eval.gates import evaluate_gate
from dpoflow.eval.statistics import wilson_interval
from dpoflow.modeling.loading import load_model, model_hash
from dpoflow.modeling.reward_model import (
    HEAD_FILE,
    RewardModelError,
    StaleRewardModelError,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from dpoflow.runtime.params import Params, RewardModelParams, parse_params
from dpoflow.training.reward import (
    find_contradictions,
    make_batch,
    pair_margins,
    prompt_key,
    reward_loss,
    split_by_prompt,
    train_reward_model,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "with",
    "red",
    "blue",
    "green",
    "dog",
    "ran",
    "far",
    "away",
    "near",
    "house",
    "tree",
    "river",
    "sun",
    "moon",
    "star",
]
MARKER = "banana"
MAX_LEN = 64

RM_KEYS = {f.name for f in dataclasses.fields(RewardModelParams)}


def train_rm(rm, pairs, **kw):
    """train_reward_model with the params given as keywords (center_coef 0 unless given)."""
    params = RewardModelParams(**{"center_coef": 0.0, **{k: kw.pop(k) for k in list(kw) if k in RM_KEYS}})
    return train_reward_model(rm, pairs, params, **kw)


def planted_pairs(n_prompts: int = 80, per_prompt: int = 2, seed: int = 0) -> list[dict]:
    """Random word salads; the chosen response always contains MARKER (at a random place), the rejected never."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(4))}]
        for _ in range(per_prompt):
            chosen = [rng.choice(WORDS) for _ in range(5)]
            chosen.insert(rng.randrange(6), MARKER)
            rejected = [rng.choice(WORDS) for _ in range(5)]
            pairs.append(make_pair(prompt, " ".join(chosen), " ".join(rejected), 1.0, 0.0, "planted", "test"))
    return pairs


def fresh_rm(model_dir, seed: int = 0):
    backbone, tokenizer = load_model(model_dir, dtype="float32")
    return build_reward_model(backbone, tokenizer, lora_rank=4, lora_layers=2, seed=seed, max_seq_len=MAX_LEN)


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A reward model trained on the planted preference (3 epochs, 48 steps, ~2 s) and its metrics."""
    rm = fresh_rm(tiny_model_dir)
    pairs = planted_pairs()
    metrics = train_rm(
        rm,
        pairs,
        learning_rate=1e-3,
        epochs=3,
        batch_size=8,
        seed=0,
        val_fraction=0.2,
        center_coef=0.01,
        contradiction_filter=0.9,
    )
    return rm, pairs, metrics


# ----------------------------------------------------------------------------------------------------- learning


def test_learns_planted_preference(trained):
    rm, pairs, m = trained
    assert m["val_accuracy"] >= 0.8, m  # chance is 0.5
    assert m["train_accuracy"] >= 0.8, m
    assert m["val_margin_mean"] > 0.5
    assert m["n_train"] + m["n_val"] == len(pairs)
    assert m["n_val_prompts"] == 16 and m["n_train_prompts"] == 64  # 20% of 80 prompts
    assert m["steps"] == 3 * int(np.ceil(m["n_train"] / 8)) and m["steps_per_epoch"] == m["n_train"] // 8
    assert m["overfit_gap"] == pytest.approx(m["train_accuracy"] - m["val_accuracy"])
    assert m["overfit"] is (m["overfit_gap"] > 0.15)
    assert [e["step"] for e in m["epoch_evals"]] == [16, 32, 48]
    assert m["epoch_evals"][-1]["val_accuracy"] == m["val_accuracy"]
    assert len(m["contradictions"]) == m["n_contradictions"]
    assert evaluate_gate(
        "reward_model", {"rm_accuracy": m["val_accuracy"], "rm_overfit_gap": m["overfit_gap"]}, Params()
    ).passed
    # the validation accuracy's Wilson interval over the validation pairs (ties half), issue 22
    assert m["val_accuracy_n"] == m["n_val"]
    assert m["val_accuracy_ci_low"] <= m["val_accuracy"] <= m["val_accuracy_ci_high"]
    low, high = wilson_interval(m["val_accuracy"] * m["n_val"], m["n_val"], 0.95)
    assert (m["val_accuracy_ci_low"], m["val_accuracy_ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_training_is_deterministic(tiny_model_dir):
    pairs = planted_pairs(n_prompts=20, per_prompt=1)
    runs = []
    for _ in range(2):
        m = train_rm(fresh_rm(tiny_model_dir), pairs, learning_rate=1e-3, epochs=1, batch_size=4, seed=1)
        m.pop("perf")
        runs.append(json.dumps(m, sort_keys=True))
    assert runs[0] == runs[1]


def test_killed_run_resumes_to_the_same_metrics(tiny_model_dir, tmp_path):
    pairs = planted_pairs(n_prompts=20, per_prompt=1)
    kwargs = dict(learning_rate=1e-3, epochs=2, batch_size=4, seed=0, checkpoint_every=2, fingerprint="f")
    full = train_rm(fresh_rm(tiny_model_dir), pairs, **kwargs)

    def die_at_step_5(step, metrics):
        if step == 5:  # the checkpoint of step 4 is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_rm(fresh_rm(tiny_model_dir), pairs, checkpoint_dir=tmp_path / "ckpt", on_step=die_at_step_5, **kwargs)
    resumed = train_rm(fresh_rm(tiny_model_dir), pairs, checkpoint_dir=tmp_path / "ckpt", **kwargs)
    assert resumed["perf"]["resumed_from_step"] == 4
    for m in (full, resumed):
        m.pop("perf")
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)


def test_loss_uses_margin_and_centering(tiny_model_dir):
    rm = fresh_rm(tiny_model_dir)
    pairs = planted_pairs(n_prompts=3, per_prompt=1)
    pairs[1] = {**pairs[1], "score_chosen": None}
    encoded = [encode_pair(rm.tokenizer, p, MAX_LEN) for p in pairs]
    margins = pair_margins(pairs, 2.0)
    np.testing.assert_allclose(margins, [2.0, 0.0, 2.0])
    assert pair_margins(pairs, 0.0) is None
    batch = make_batch(encoded, [0, 1, 2], rm.pad_id, margins)
    loss, aux = reward_loss(rm, batch, center_coef=0.5)
    r = rm(batch.pairs)
    expected = bradley_terry_loss(r[:3], r[3:], mx.array(margins), 0.5)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert 0.0 <= float(aux["accuracy"]) <= 1.0


def test_contradictions_listed_most_confident_first():
    pairs = [{"id": f"p{i}", "task": "t", "source": "s", "score_chosen": 1.0, "score_rejected": 0.0} for i in range(4)]
    chosen = np.array([0.0, 0.0, 5.0, 0.0])
    rejected = np.array([3.0, 0.1, 0.0, 5.0])  # P(rejected > chosen): 0.95, 0.52, 0.007, 0.993
    rows = find_contradictions(pairs, chosen, rejected, 0.9, ["train", "val", "train", "val"])
    assert [r["id"] for r in rows] == ["p3", "p0"]
    assert rows[0]["split"] == "val" and rows[0]["p_rejected_preferred"] == pytest.approx(1 / (1 + np.exp(-5)))


# -------------------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_split_never_leaks_a_prompt(seed, fraction):
    rng = random.Random(seed)
    pairs = planted_pairs(n_prompts=50, per_prompt=3, seed=seed)
    # A few prompts that differ only by a system message or whitespace are distinct prompts; exact repeats are not.
    pairs += [make_pair([{"role": "system", "content": "be brief"}] + pairs[0]["prompt"], "a", "b")]
    rng.shuffle(pairs)
    train_idx, val_idx = split_by_prompt(pairs, fraction, seed)
    assert sorted(train_idx + val_idx) == list(range(len(pairs)))
    train_prompts = {prompt_key(pairs[i]["prompt"]) for i in train_idx}
    val_prompts = {prompt_key(pairs[i]["prompt"]) for i in val_idx}
    assert not train_prompts & val_prompts
    assert len(val_prompts) == round(fraction * 51)
    # Deterministic, and a function of the prompts only (not of the row order).
    assert split_by_prompt(pairs, fraction, seed) == (train_idx, val_idx)
    reordered = list(reversed(pairs))
    _, val_rev = split_by_prompt(reordered, fraction, seed)
    assert {prompt_key(reordered[i]["prompt"]) for i in val_rev} == val_prompts


def test_split_depends_on_seed_and_needs_two_prompts():
    pairs = planted_pairs(n_prompts=40, per_prompt=1)
    assert split_by_prompt(pairs, 0.2, 0)[1] != split_by_prompt(pairs, 0.2, 1)[1]
    assert len(split_by_prompt(pairs[:2], 0.01, 0)[1]) == 1  # at least one validation prompt
    with pytest.raises(ValueError, match="distinct prompt"):
        split_by_prompt(planted_pairs(n_prompts=1, per_prompt=3), 0.2, 0)


# ------------------------------------------------------------------------------------------------------ scoring


def test_score_batches_equal_one_by_one(trained):
    rm, pairs, _ = trained
    prompts = [p["prompt"] for p in pairs[:11]]
    responses = [p["chosen"] if i % 2 else p["rejected"] + " and more words here" for i, p in enumerate(pairs[:11])]
    batched = rm.score(prompts, responses, batch_size=4)
    single = [rm.score([p], [r], batch_size=1)[0] for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
    assert rm.score(prompts, responses, batch_size=16) == pytest.approx(batched, abs=1e-5)
    # score_pairs tokenizes as training does; with no truncation it agrees with score().
    chosen, rejected = rm.score_pairs(pairs[:5], batch_size=2)
    np.testing.assert_allclose(
        chosen, rm.score([p["prompt"] for p in pairs[:5]], [p["chosen"] for p in pairs[:5]]), atol=1e-5
    )
    np.testing.assert_allclose(
        rejected, rm.score([p["prompt"] for p in pairs[:5]], [p["rejected"] for p in pairs[:5]]), atol=1e-5
    )
    with pytest.raises(ValueError):
        rm.score(prompts, responses[:-1])


@pytest.mark.parametrize("lm_weight", [0.0, 2.0])
def test_shared_prompt_rewards_and_gradients_equal_the_full_forward(tiny_model_dir, lm_weight):
    """Pair batches run their prompt once (logprobs.shared_prompt_hidden): rewards and the loss's gradients match
    the [2B, T] forward, with completions of different lengths (and one-token ones) in the batch; with and without
    the LM log-likelihood term."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from dpoflow.core import logprobs
    from dpoflow.core.batching import EncodedPair

    backbone, tokenizer = load_model(tiny_model_dir, dtype="float32")
    rm = build_reward_model(
        backbone, tokenizer, lora_rank=4, lora_layers=2, seed=3, max_seq_len=MAX_LEN, lm_logprob_weight=lm_weight
    )
    assert ("lm_weight" in rm) == bool(lm_weight)
    pairs = planted_pairs(n_prompts=4, per_prompt=1, seed=5)
    pairs[1] = dict(pairs[1], chosen="banana", rejected="a much longer rejected answer than the chosen one")
    encoded = [encode_pair(rm.tokenizer, p, MAX_LEN) for p in pairs] + [EncodedPair([5, 6, 7], [8], [9, 10])]
    batch = make_batch(encoded, range(len(encoded)), rm.pad_id)

    def loss_and_grads():
        loss, grads = nn.value_and_grad(rm, lambda m: reward_loss(m, batch, 0.01)[0])(rm)
        return rm(batch.pairs), grads

    shared, g_shared = loss_and_grads()
    old, logprobs.SHARED_PROMPT_ENABLED = logprobs.SHARED_PROMPT_ENABLED, False
    try:
        plain, g_plain = loss_and_grads()
    finally:
        logprobs.SHARED_PROMPT_ENABLED = old
    np.testing.assert_allclose(np.asarray(shared), np.asarray(plain), atol=1e-5, rtol=0)
    for (k, a), (_, b) in zip(tree_flatten(g_shared), tree_flatten(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-3, err_msg=k)


@pytest.mark.parametrize("lm_weight", [0.0, 2.0])
def test_forward_only_scoring_equals_the_batched_rewards(tiny_model_dir, monkeypatch, lm_weight):
    """score / score_encoded_pairs run one forward-only pass (reference.forward_completions: identical prompts once,
    their common prefix once); they equal the per-batch `rewards` forward within float32 rounding."""
    from dpoflow.modeling import reward_model

    backbone, tokenizer = load_model(tiny_model_dir, dtype="float32")
    rm = build_reward_model(
        backbone, tokenizer, lora_rank=4, lora_layers=2, seed=3, max_seq_len=MAX_LEN, lm_logprob_weight=lm_weight
    )
    from mlx.utils import tree_map

    rm.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), rm.trainable_parameters()))  # LoRA B != 0
    pairs = planted_pairs(n_prompts=5, per_prompt=2, seed=7)
    encoded = [encode_pair(rm.tokenizer, p, MAX_LEN) for p in pairs]
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] + " and more" for p in pairs]
    fast = rm.score_encoded_pairs(encoded, batch_size=3), rm.score(prompts, responses, batch_size=3)
    monkeypatch.setattr(reward_model, "forward_supported", lambda m: False)
    plain = rm.score_encoded_pairs(encoded, batch_size=3), rm.score(prompts, responses, batch_size=3)
    for f, p in zip(fast[0], plain[0]):
        np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast[1], plain[1], rtol=1e-5, atol=1e-5)


def test_lm_term_is_the_mean_completion_logprob_and_round_trips(tiny_model_dir, tmp_path):
    """reward = head(last hidden) + w * mean log p(completion | prompt); w is trained and saved with the head."""
    from dpoflow.core.batching import collate_sequences
    from dpoflow.core.logprobs import completion_logprobs

    backbone, tokenizer = load_model(tiny_model_dir, dtype="float32")
    with_lm = build_reward_model(
        backbone, tokenizer, lora_rank=4, lora_layers=2, seed=1, max_seq_len=MAX_LEN, lm_logprob_weight=3.0
    )
    pairs = planted_pairs(n_prompts=3, per_prompt=1, seed=2)
    encoded = [with_lm.encode(p["prompt"], p["chosen"]) for p in pairs]
    batch = collate_sequences([e[0] for e in encoded], [e[1] for e in encoded], with_lm.pad_id)
    sums, n = completion_logprobs(with_lm.backbone, batch)
    head_only = with_lm.lm_weight
    with_lm.lm_weight = mx.array([0.0])
    base = np.asarray(with_lm.rewards(batch))
    with_lm.lm_weight = head_only
    np.testing.assert_allclose(np.asarray(with_lm.rewards(batch)), base + 3.0 * np.asarray(sums / n), atol=1e-5)
    assert "lm_weight" in dict(tree_flatten(with_lm.trainable_parameters()))

    with_lm.lm_weight = mx.array([2.5])
    save_reward_model(with_lm, tmp_path / "rm", tiny_model_dir)
    loaded = load_reward_model(tmp_path / "rm")
    assert float(loaded.lm_weight[0]) == 2.5
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    np.testing.assert_allclose(loaded.score(prompts, responses), with_lm.score(prompts, responses), atol=1e-5)


def test_save_load_round_trip_identical_scores(trained, tiny_model_dir, tmp_path):
    rm, pairs, _ = trained
    out = save_reward_model(rm, tmp_path / "reward", tiny_model_dir)
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["adapters.safetensors", "adapter_config.json", HEAD_FILE, "reward_config.json"]
    )
    config = json.loads((out / "reward_config.json").read_text())
    assert config["base_model_hash"] == model_hash(tiny_model_dir)
    assert config["hidden_size"] == 64 and config["head_position"] == "last_non_pad"
    loaded = load_reward_model(out)
    prompts, responses = [p["prompt"] for p in pairs[:9]], [p["chosen"] for p in pairs[:9]]
    assert loaded.score(prompts, responses, batch_size=4) == rm.score(prompts, responses, batch_size=4)
    assert loaded.score_pairs(pairs[:6]) == rm.score_pairs(pairs[:6])


def test_stale_base_hash_detected(trained, tiny_model_dir, tmp_path):
    rm, _, _ = trained
    base = shutil.copytree(tiny_model_dir, tmp_path / "sft")
    out = save_reward_model(rm, tmp_path / "reward", base)
    load_reward_model(out)  # fine while the base is unchanged
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6  # the base model was retrained / changed
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(StaleRewardModelError, match=r"stale.*dvc repro reward_model"):
        load_reward_model(out)
    (out / HEAD_FILE).unlink()
    with pytest.raises(RewardModelError, match="not a reward-model folder"):
        load_reward_model(out)


# --------------------------------------------------------------------------------------------------------- gate


def test_gate_fails_with_prescription_on_low_accuracy():
    result = evaluate_gate("reward_model", {"rm_accuracy": 0.55, "rm_overfit_gap": 0.30}, Params())
    assert not result.passed
    report = result.report()
    assert "validation accuracy 0.55 < 0.7" in report
    assert "improve the data" in report and "more capacity" in report
    assert "overfitting" in report
    assert evaluate_gate("reward_model", {"rm_accuracy": 0.75, "rm_overfit_gap": 0.05}, Params()).passed


def test_overfitting_is_flagged_not_blocking():
    # Issue 4: the gate is validation accuracy; the train-validation gap is flagged.
    flagged = evaluate_gate("reward_model", {"rm_accuracy": 0.75, "rm_overfit_gap": 0.30}, Params())
    assert flagged.passed
    assert [w.check.metric for w in flagged.warnings] == ["rm_overfit_gap"]
    assert "gate reward_model: PASSED (1 warning)" in flagged.report()
    assert "WARNING (flag, not blocking): overfitting" in flagged.report()
    assert flagged.to_dict()["warnings"] == ["rm_overfit_gap"]
    assert evaluate_gate("reward_model", {"rm_accuracy": 0.75, "rm_overfit_gap": 0.05}, Params()).warnings == []
    missing = evaluate_gate("reward_model", {"rm_accuracy": 0.75}, Params())
    assert missing.passed and "metric `rm_overfit_gap` missing" in missing.report()


# -------------------------------------------------------------------------------------------------------- stage


def test_stage_writes_artifacts(tiny_model_dir, tmp_path):
    """stages/reward_model.py on a tiny project: model folder, contradictions, flat metrics, detail, perf, curves."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "sft")
    write_pairs(planted_pairs(n_prompts=20, per_prompt=2), tmp_path / "data" / "pairs.parquet")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["chip"] = "cpu"
    raw["batch_size"]["cpu"] = 8
    raw["reward_model"].update(learning_rate=1e-3, epochs=1, lora_layers=2, contradiction_filter=0.5)
    parse_params(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "reward_model.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "reward_model.json").read_text())
    assert set(metrics) == {
        "rm_accuracy",
        "rm_accuracy_ci_low",
        "rm_train_accuracy",
        "rm_overfit_gap",
        "n_contradictions",
    }
    detail = json.loads((tmp_path / "reports" / "reward_model.json").read_text())
    for key in ("val_accuracy", "overfit_gap", "train_accuracy", "val_margin_mean", "n_train", "n_val", "overfit"):
        assert key in detail, key
    assert metrics["rm_accuracy"] == detail["val_accuracy"] and "perf" not in detail
    assert "tokens_per_sec" in json.loads((tmp_path / "reports" / "perf" / "reward_model.json").read_text())
    lines = (tmp_path / "data" / "rm_contradictions.jsonl").read_text().splitlines()
    assert len(lines) == metrics["n_contradictions"]
    assert (tmp_path / "dvclive" / "reward_model" / "plots" / "metrics").is_dir()
    assert not (tmp_path / "checkpoints" / "reward_model").exists()
    config = json.loads((tmp_path / "models" / "reward" / "reward_config.json").read_text())
    assert config["base_model"] == "models/sft"
