"""Weaknesses, found and targeted (dpoflow.eval.weakness) and Stage 6's prompt seam (Rounds.choose_prompts)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import dpoflow.pipeline.iterate as iterate_mod
from dpoflow.data import tasks
from dpoflow.data.judges import Judge
from dpoflow.eval.rounds import round_slice
from dpoflow.eval.weakness import (
    TargetedPrompts,
    breakdown,
    breakdown_deltas,
    category_of,
    draw_targeted,
    judged_breakdown,
    policy_breakdown,
    targeted_summary,
    targeted_weights,
)
from dpoflow.modeling.loading import load_model
from dpoflow.pipeline.iterate import RoundOutcome, Rounds, run_iteration
from dpoflow.runtime.params import CHIPS, parse_params


def task_item(i, task="add_2term", digits=2, fixed=False):
    difficulty = {"num_terms": [2, 2], "num_digits": [1, 1] if fixed else [1, 2]}
    return {
        "id": f"{task}-{i}",
        "task": task,
        "question": f"Calculate {i} + {i + 1}.",
        "answer": str(2 * i + 1),
        "metadata": {"num_terms": 2, "num_digits": digits, "difficulty": difficulty},
    }


def pool(counts):
    """Prompt rows with a `category` column: counts = {category: n}."""
    return [
        {"id": f"{cat}-{i}", "prompt": [{"role": "user", "content": f"{cat} question {i}"}], "category": cat}
        for cat, n in counts.items()
        for i in range(n)
    ]


def bd_of(means, n=40):
    """A breakdown whose category c has mean means[c] (0/1 scores)."""
    cats, scores = [], []
    for cat, mean in means.items():
        k = round(mean * n)
        cats += [cat] * n
        scores += [1.0] * k + [0.0] * (n - k)
    return breakdown(cats, scores)


# ------------------------------------------------------------------------------------------------ categories


def test_category_of_task_difficulty_category_column_and_length_buckets():
    assert category_of(task_item(1, digits=1)) == "add_2term/num_digits=1"  # the item's own varying level
    assert category_of(task_item(1, task="add_3term", fixed=True)) == "add_3term"  # single-valued ranges: no suffix
    assert category_of({"task": "t", "question": "q?", "answer": "1", "metadata": {"difficulty": 3}}) == "t/3"
    assert category_of({"prompt": [{"role": "user", "content": "hi"}], "category": "chat", "task": "x"}) == "chat"
    assert category_of({"prompt": [{"role": "user", "content": "hi"}], "task": "pairs_task"}) == "pairs_task"
    words = lambda n: {"prompt": [{"role": "system", "content": "s " * 99}, {"role": "user", "content": "w " * n}]}  # noqa: E731
    assert [category_of(words(n)) for n in (3, 16, 17, 64, 65)] == [
        "length:short",
        "length:short",
        "length:medium",
        "length:medium",
        "length:long",
    ]
    assert category_of({"prompt": [{"role": "user", "content": "x"}], "category": None}) == "length:short"


def test_breakdown_means_intervals_and_deltas():
    bd = breakdown(["a", "a", "b", "b", "b"], [1.0, 0.5, 0.2, 0.4, 0.9], seed=3)
    a, b = bd["categories"]["a"], bd["categories"]["b"]
    assert (a["n"], a["mean"], a["interval"]) == (2, 0.75, "wilson") and b["interval"] == "bootstrap"
    assert b["mean"] == pytest.approx(0.5) and b["ci_low"] <= 0.5 <= b["ci_high"]
    assert bd["n"] == 5 and bd["mean"] == pytest.approx(3.0 / 5)
    assert bd == breakdown(["a", "a", "b", "b", "b"], [1.0, 0.5, 0.2, 0.4, 0.9], seed=3)  # seeded
    with pytest.raises(ValueError):
        breakdown(["a"], [1.5])
    d = breakdown_deltas(bd_of({"x": 0.1, "y": 0.5}, 200), bd_of({"x": 0.6, "y": 0.5, "z": 1.0}, 200))
    assert d["x"]["moved"] == "up" and d["x"]["delta"] == pytest.approx(0.5)
    assert d["y"]["moved"] == "within noise" and d["z"]["moved"] is None and d["z"]["delta"] is None


def test_judged_breakdown_from_stage7_judgments():
    items = [task_item(i, digits=1 + i % 2) for i in range(6)]
    judgments = [
        {"index": i, "prompt": [], "score_final": float(i % 2), "score_baseline": 0.0, "outcome": 0.5 + 0.5 * (i % 2)}
        for i in range(6)
    ]
    final = judged_breakdown(items, judgments)
    assert final["measure"] == "score_final"
    assert {c: v["mean"] for c, v in final["categories"].items()} == {
        "add_2term/num_digits=1": 0.0,
        "add_2term/num_digits=2": 1.0,
    }
    base = judged_breakdown(items, judgments, "score_baseline")
    assert breakdown_deltas(base, final)["add_2term/num_digits=2"]["delta"] == 1.0
    with pytest.raises(ValueError):
        judged_breakdown(items, judgments, "nope")


# ------------------------------------------------------------------------------------------------ weighting


def test_weighting_moves_toward_a_category_made_weak():
    balanced = targeted_weights(bd_of({"a": 0.7, "b": 0.7, "c": 0.7}))
    assert balanced == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    weak_b = targeted_weights(bd_of({"a": 0.7, "b": 0.1, "c": 0.7}))
    assert max(weak_b, key=weak_b.get) == "b" and weak_b["b"] > balanced["b"]
    assert weak_b["a"] < balanced["a"] and sum(weak_b.values()) == pytest.approx(1.0)
    # the draw follows: most of the prompts now come from b
    rows = pool({"a": 100, "b": 100, "c": 100})
    drawn = Counter(category_of(rows[i]) for i in draw_targeted(rows, weak_b, 60, seed=0))
    assert drawn["b"] > drawn["a"] and drawn["b"] > drawn["c"] and sum(drawn.values()) == 60


def test_floor_keeps_every_category():
    w = targeted_weights(bd_of({"solved": 1.0, "weak": 0.0, "mid": 0.5}), floor=0.05)
    assert all(v > 0 for v in w.values()) and w["solved"] == pytest.approx(0.05 / (0.05 + 1.05 + 0.55))
    rows = pool({"solved": 50, "weak": 50, "mid": 50})
    drawn = Counter(category_of(rows[i]) for i in draw_targeted(rows, w, 40, seed=1))
    assert set(drawn) == {"solved", "weak", "mid"} and drawn["solved"] >= 1
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            targeted_weights(bd_of({"a": 0.5}), floor=bad)


def test_draw_is_deterministic_disjoint_from_used_prompts_and_falls_back():
    rows = pool({"a": 30, "b": 30, "c": 5})
    w = {"a": 0.2, "b": 0.2, "c": 0.6}
    first = draw_targeted(rows, w, 20, seed=7)
    assert first == draw_targeted(rows, w, 20, seed=7) and first == sorted(first) and len(set(first)) == 20
    assert first != draw_targeted(rows, w, 20, seed=8)
    # c has only 5 rows: all of them, the shortfall goes to a and b
    assert Counter(category_of(rows[i]) for i in first)["c"] == 5
    used = {rows[i]["id"] for i in first}
    second = draw_targeted(rows, w, 20, seed=7, exclude=used)
    assert len(second) == 20 and used.isdisjoint(rows[i]["id"] for i in second)
    third = draw_targeted(rows, w, 100, seed=7, exclude=used | {rows[i]["id"] for i in second})
    assert len(third) == 65 - 40  # fewer when fewer remain
    # unmeasured categories get the mean weight; all-zero weights fall back to equal shares
    assert Counter(category_of(rows[i]) for i in draw_targeted(rows, {"a": 1.0}, 10, seed=0)) == {
        "a": 4,
        "b": 3,
        "c": 3,
    }
    assert len(draw_targeted(rows, {"a": 0.0, "b": 0.0, "c": 0.0}, 9, seed=0)) == 9
    assert draw_targeted(rows, w, 0, seed=0) == [] and draw_targeted([], w, 5, seed=0) == []


def test_targeted_summary_says_whether_the_targeted_categories_moved():
    before = bd_of({"a": 0.9, "b": 0.1, "c": 0.4}, 200)
    w = targeted_weights(before)
    s = targeted_summary(before, bd_of({"a": 0.9, "b": 0.6, "c": 0.4}, 200), w)
    assert s["targeted"] == ["b", "c"] and s["improved"] == ["b"] and s["regressed"] == []
    assert s["deltas"]["b"]["delta"] == pytest.approx(0.5) and "b 0.100 -> 0.600" in s["text"]
    assert targeted_summary(before, before, {"a": 0.5, "b": 0.5})["targeted"] == []


# ------------------------------------------------------------------------------------------------ Stage 6 seam


def test_targeted_prompts_chooser_first_round_is_the_fixed_slice_then_targets():
    screened = list(enumerate(pool({"a": 12, "b": 12}), start=1))
    calls = []

    def breakdown_of(k, chain):
        calls.append((k, chain))
        return None if k == 0 else bd_of({"a": 0.9, "b": 0.0})

    chooser = TargetedPrompts(per_round=6, breakdown_of=breakdown_of, seed=5)
    r1 = chooser(1, screened, {0: "dpo"}, [{"round": 0}])
    start, end = round_slice(len(screened), 1, 6)
    assert r1 == screened[start:end]  # no breakdown: exactly today's slice
    r2 = chooser(2, screened, {0: "dpo", 1: "r1"}, [{"round": 0}, {"round": 1}])
    assert {line for line, _ in r2}.isdisjoint(line for line, _ in r1) and len(r2) == 6
    assert Counter(category_of(item) for _, item in r2)["b"] >= 5  # toward the weak category
    assert r2 == TargetedPrompts(6, breakdown_of, seed=5, drawn={1: chooser.drawn[1]})(2, screened, {1: "r1"}, [])
    assert calls[:2] == [(0, "dpo"), (1, "r1")] and chooser.history[2]["weights"]["b"] > 0.5
    summary = chooser.summaries(final=bd_of({"a": 0.9, "b": 0.5}))
    assert list(summary) == [2] and summary[2]["targeted"] == ["b"]


def test_targeted_prompts_reads_round_records_by_default():
    screened = list(enumerate(pool({"a": 12, "b": 12}), start=1))
    chooser = TargetedPrompts(per_round=6, seed=5)
    r1 = chooser(1, screened, {}, [{"round": 0}])  # round 0 measured no categories: the fixed slice
    assert r1 == screened[:6]
    weak_b = [{"round": 0}, {"round": 1, "categories": bd_of({"a": 0.9, "b": 0.0})}]
    r2 = chooser(2, screened, {}, weak_b)
    assert Counter(category_of(item) for _, item in r2)["b"] >= 5
    weak_a = [{"round": 0}, {"round": 1, "categories": bd_of({"a": 0.0, "b": 0.9})}]
    r2a = TargetedPrompts(6, seed=5, drawn={1: chooser.drawn[1]})(2, screened, {}, weak_a)
    assert Counter(category_of(item) for _, item in r2a)["a"] >= 5


def _fake_iteration(monkeypatch, tmp_path, choose_prompts):
    """run_iteration with the model work faked: records which prompts each round received."""
    p = parse_params(
        {
            "batch_size": dict.fromkeys(CHIPS, 2),
            "iterate": {"rounds": 3, "prompts_per_round": 3, "min_pairs": 1, "convergence_epsilon": 0.0},
        }
    )
    received = {}
    monkeypatch.setattr(iterate_mod, "load_chain", lambda *a, **k: (None, None, None, None))
    monkeypatch.setattr(iterate_mod, "measure_round", lambda *a, **k: ({"heldout_gap": 0.1, "kl": 0.0}, {}))

    def fake_round(k, prompts, previous, chains, ctx, origin):
        received[k] = [line for line, _ in prompts]
        record = {"round": k, "prompts": [prompts[0][0], prompts[-1][0]], "n_prompts": len(prompts)}
        record.update(heldout_gap=0.1 + 0.1 * k, passed=True, failures=[], decision="continue", reasons=[], deltas={})
        return RoundOutcome(record, [], [], [Path(f"round_{k}")])

    monkeypatch.setattr(iterate_mod, "run_round", fake_round)

    class Scoring(Judge):
        name = "stub"

    ctx = Rounds(
        params=p,
        batch_size=2,
        sft_dir=tmp_path,
        sft_model=None,
        judge=Scoring(),
        probe=None,
        heldout_pairs=[],
        eval_texts=None,
        work_dir=tmp_path / "work",
        choose_prompts=choose_prompts,
    )
    items = [tasks.make_item("t", {"question": f"q{i}", "answer": str(i)}, {}) for i in range(8)]
    result = run_iteration(ctx, tmp_path / "dpo", items, origin="rounds.jsonl")
    return received, result


def test_run_iteration_seam_default_is_the_fixed_slice_and_a_chooser_replaces_it(monkeypatch, tmp_path):
    received, result = _fake_iteration(monkeypatch, tmp_path / "plain", None)
    assert received == {1: [1, 2, 3], 2: [4, 5, 6], 3: [7, 8]}
    calls = []

    def chooser(k, screened, chains, records):
        calls.append((k, len(screened), sorted(chains), [r["round"] for r in records]))
        return [screened[i] for i in ((7, 0, 1), (2, 3, 4), ())[k - 1]]

    targeted, result2 = _fake_iteration(monkeypatch, tmp_path / "targeted", chooser)
    assert targeted == {1: [8, 1, 2], 2: [3, 4, 5]} and result2.decision == "out_of_prompts"
    assert calls == [(1, 8, [0], [0]), (2, 8, [0, 1], [0, 1]), (3, 8, [0, 1, 2], [0, 1, 2])]
    assert set(result.metrics()) == set(result2.metrics())  # the metrics' keys do not change
    json.dumps(result2.metrics())


def test_policy_breakdown_on_a_tiny_model(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)

    class EvenLength(Judge):
        name = "even"

        def score(self, items, prompts, responses):
            return [[float(len(t) % 2 == 0) for t in texts] for texts in responses]

    items = [task_item(i, digits=1 + i % 2) for i in range(6)]
    bd = policy_breakdown(model, tokenizer, EvenLength(), items, system_prompt="s", max_tokens=4, batch_size=6)
    assert bd["n"] == 6 and set(bd["categories"]) == {"add_2term/num_digits=1", "add_2term/num_digits=2"}
    assert bd == policy_breakdown(model, tokenizer, EvenLength(), items, system_prompt="s", max_tokens=4, batch_size=6)
