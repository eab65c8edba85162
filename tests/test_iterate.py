"""Tests for Stage 6 (dpoflow.pipeline.iterate, dpoflow.eval.rounds): the pure round decisions and selection on
synthetic metrics, and one small
end-to-end run of the iterate + evaluate library calls on a tiny model (a handful of pairs, a stub judge)."""

import dataclasses
import json
import time

import mlx.core as mx
import numpy as np
import pytest

from dpoflow.data import tasks
from dpoflow.data.decontamination import screen_prompts
from dpoflow.data.judges import Judge
from dpoflow.data.pairs import make_pair
from dpoflow.eval.deploy import deploy_decision
from dpoflow.eval.gates import pair_gate as make_pair_gate
from dpoflow.eval.human import export_human_sheet, import_human_ratings
from dpoflow.eval.measure import make_probe, measure_policy
from dpoflow.eval.rounds import (
    convergence_analysis,
    decide_round,
    overall_decision,
    round_min_pairs,
    round_slice,
    round_steps,
    select_round,
)
from dpoflow.eval.win_rate import baseline_responses, responses
from dpoflow.modeling.chain import export_final, load_selected, save_selected
from dpoflow.modeling.loading import load_model, model_hash
from dpoflow.modeling.policy import build_policy, save_policy
from dpoflow.modeling.reference import compute_ref_logps
from dpoflow.pipeline.evaluate import Evaluation, decide, run_evaluation
from dpoflow.pipeline.iterate import Rounds, run_iteration
from dpoflow.reporting.iterate_report import render_iterate_report
from dpoflow.reporting.report import ReportInputs, write_report
from dpoflow.runtime.params import CHIPS, DpoParams, parse_params
from dpoflow.training.dpo import train_dpo

TOL, EPS = 0.02, 0.005


def rnd(round_, gap, acc=0.5, bench=0.5, passed=True, **extra):
    return {
        "round": round_,
        "heldout_gap": gap,
        "task_accuracy": acc,
        "benchmark_mean": bench,
        "passed": passed,
        "failures": [] if passed else ["pairs: 3 < 10 (iterate.min_pairs)"],
        **extra,
    }


# ------------------------------------------------------------------------------------------- decisions (pure)


def test_improving_round_continues():
    out = decide_round(rnd(0, 0.20), rnd(1, 0.25), TOL, EPS)
    assert out["decision"] == "continue"
    assert out["deltas"]["heldout_gap"] == pytest.approx(0.05)
    assert "improved" in out["reasons"][0]


@pytest.mark.parametrize(
    "key, prev, cur", [("heldout_gap", 0.30, 0.25), ("task_accuracy", 0.50, 0.45), ("benchmark_mean", 0.60, 0.55)]
)
def test_regression_beyond_tolerance_rolls_back(key, prev, cur):
    before, after = rnd(1, 0.30), rnd(2, 0.40)
    before[key], after[key] = prev, cur
    out = decide_round(before, after, TOL, EPS)
    assert out["decision"] == "rollback"
    assert key in out["reasons"][0] and "regression_tolerance" in out["reasons"][0]


def test_regression_within_tolerance_is_not_a_rollback():
    # accuracy fell by 0.01 <= 0.02 and the gap improved: keep going
    assert decide_round(rnd(1, 0.30, acc=0.50), rnd(2, 0.35, acc=0.49), TOL, EPS)["decision"] == "continue"


def test_stable_round_converges_and_small_decline_stops():
    assert decide_round(rnd(1, 0.300), rnd(2, 0.303), TOL, EPS)["decision"] == "converged"
    assert decide_round(rnd(1, 0.300), rnd(2, 0.297), TOL, EPS)["decision"] == "converged"
    out = decide_round(rnd(1, 0.300), rnd(2, 0.290), TOL, EPS)  # fell by 0.01: within tolerance, not a gain
    assert out["decision"] == "converged" and "fell" in out["reasons"][0]


def test_failed_round_rolls_back_and_missing_metrics_are_not_compared():
    assert decide_round(rnd(0, 0.2), rnd(1, 0.9, passed=False), TOL, EPS)["decision"] == "rollback"
    out = decide_round(rnd(0, 0.2, bench=None), rnd(1, 0.3, bench=0.0), TOL, EPS)  # no previous benchmarks
    assert out["decision"] == "continue" and "benchmark_mean" not in out["deltas"]
    assert decide_round(rnd(0, 0.2), rnd(1, None), TOL, EPS)["decision"] == "rollback"


def test_selection_prefers_best_eligible_round_and_earlier_on_ties():
    rounds = [
        rnd(0, 0.20, decision="baseline"),
        rnd(1, 0.30, decision="continue"),
        rnd(2, 0.50, decision="rollback"),
        rnd(3, 0.30, decision="converged"),
    ]
    assert select_round(rounds) == 1  # round 2 was rolled back; round 3 ties round 1: the earlier one
    rounds[3]["heldout_gap"] = 0.31
    assert select_round(rounds) == 3
    assert select_round([rnd(0, None, decision="baseline"), rnd(1, 0.4, passed=False, decision="rollback")]) == 0


def test_overall_decision_and_analysis():
    assert overall_decision([rnd(0, 0.2)], 0, None) == "no_rounds"
    assert overall_decision([rnd(0, 0.2), rnd(1, 0.3, decision="rollback")], 2, None) == "rolled_back"
    assert overall_decision([rnd(0, 0.2), rnd(1, 0.3, decision="converged")], 2, None) == "converged"
    assert overall_decision([rnd(0, 0.2), rnd(1, 0.3, decision="continue")], 1, None) == "max_rounds"
    assert overall_decision([rnd(0, 0.2)], 3, "out_of_prompts") == "out_of_prompts"
    text = convergence_analysis(
        [rnd(0, 0.2, kl=0.01, reasons=[]), rnd(1, 0.3, kl=0.02, decision="rollback", reasons=["task_accuracy fell"])],
        0,
        "rolled_back",
        TOL,
        EPS,
    )
    assert "r0 0.2 -> r1 0.3" in text and "rollback" in text and "Selected round 0" in text


def test_screen_prompts_keeps_line_numbers_and_sets_aside_with_reason():
    items = [item(i) for i in range(4)]
    clean, out = screen_prompts(
        items, {"eval": ["What is 1 plus 2?"], "bench": ["what is 3 plus 4"]}, 8, SYSTEM, "rounds.jsonl"
    )
    assert [line for line, _ in clean] == [1, 3] and [it["id"] for _, it in clean] == ["q0", "q2"]
    assert [(r["location"], r["reason"]) for r in out] == [
        ("rounds.jsonl:2", "contaminated prompt: eval"),
        ("rounds.jsonl:4", "contaminated prompt: bench"),
    ]
    assert screen_prompts(items, None, 8, SYSTEM, "x")[1] == []  # no eval texts: nothing screened


def test_round_steps_cap_passes_over_the_pairs():
    assert round_steps(60, None, 82, 8) == 60  # no cap: iterate.max_steps
    assert round_steps(60, 2.0, 82, 8) == 21  # ceil(2 * 82 / 8)
    assert round_steps(10, 2.0, 82, 8) == 10  # max_steps still bounds it
    assert round_steps(60, 0.01, 3, 8) == 1  # at least one step
    p = parse_params({"batch_size": dict.fromkeys(CHIPS, 4), "iterate": {"max_epochs": 1.5}})
    assert p.iterate.max_epochs == 1.5
    with pytest.raises(ValueError, match="max_epochs"):
        parse_params({"batch_size": dict.fromkeys(CHIPS, 4), "iterate": {"max_epochs": 0}})


def test_round_prompts_are_disjoint_and_min_pairs_documented_rule():
    slices = [round_slice(10, k, 4) for k in (1, 2, 3, 4)]
    assert slices == [(0, 4), (4, 8), (8, 10), (10, 10)]
    assert round_min_pairs(50, 1000, 400, 1600) == 50  # explicit iterate.min_pairs wins
    assert round_min_pairs(None, 1000, 400, 1600) == 250  # else Stage 2's, scaled by prompt share
    assert round_min_pairs(None, 3, 1, 1600) == 1


def test_pair_gate_is_stage2_gate_with_iterate_min_pairs():
    p = parse_params(
        {
            "batch_size": dict.fromkeys(CHIPS, 4),
            "preference": {"min_gap": 0.15, "min_pairs": 1000, "min_decontamination": 0.9},
        }
    )
    gate = make_pair_gate(p, 10)
    assert gate({"avg_gap": 1.0, "n_pairs": 12, "decontamination": 1.0}) == []
    failures = gate({"avg_gap": 0.1, "n_pairs": 3, "decontamination": 1.0})
    assert len(failures) == 2 and any("iterate.min_pairs" in f for f in failures)
    assert any("preference.min_gap" in f for f in failures)


# ------------------------------------------------------------------------------------------- end to end (tiny)

SYSTEM = "Reply with only the final answer."
MAX_LEN = 128
BATCH = 4


class ParityJudge(Judge):
    """A deterministic stand-in for the verifier: an even-length response is 'right'."""

    name = "parity"

    def score(self, items, prompts, responses):
        return [[1.0 if len(t.strip()) % 2 == 0 else 0.0 for t in texts] for texts in responses]


def item(i):
    return {
        "id": f"q{i}",
        "task": "toy",
        "question": f"What is {i} plus {i + 1}?",
        "answer": str(2 * i + 1),
        "metadata": {},
    }


def planted(offset, n):
    return [
        make_pair(tasks.make_prompt(f"Is {a} less than {a + 2}?", SYSTEM), "yes", "no")
        for a in range(offset, offset + n)
    ]


def dpo_params(**overrides):
    base = dict(
        learning_rate=1e-3,
        max_steps=4,
        warmup_steps=0,
        kl_every=4,
        checkpoint_every=2,
        kl_target=10.0,
        max_retries=0,
        beta=0.1,
    )
    return dataclasses.replace(DpoParams(), **{**base, **overrides})


def tiny_params(reference="initial"):
    """Params of the miniature Stages 5-7 below."""
    return parse_params(
        {
            "batch_size": dict.fromkeys(CHIPS, BATCH),
            "seed": 0,
            "data": {"system_prompt": SYSTEM},
            "init": {"kl_prompts": 2, "kl_samples": 1, "kl_max_tokens": 6},
            "preference": {
                "samples_per_prompt": 4,
                "temperature": 1.0,
                "max_tokens": 6,
                "max_seq_len": MAX_LEN,
                "max_extra_passes": 0,
                "min_gap": 0.1,
                "min_pairs": 1,
                "min_decontamination": 0.0,
                "generation_batch_size": 16,
            },
            "dpo": {
                "learning_rate": 1e-3,
                "max_steps": 4,
                "warmup_steps": 0,
                "kl_every": 4,
                "checkpoint_every": 2,
                "kl_target": 10.0,
                "max_retries": 0,
                "beta": 0.1,
            },
            "iterate": {
                "rounds": 2,
                "prompts_per_round": 4,
                "reference": reference,
                "max_steps": 3,
                "regression_tolerance": 0.5,
                "convergence_epsilon": 0.0,
                "min_pairs": 1,
            },
            "evaluate": {"bootstrap_samples": 200, "min_retention": 95.0},
        }
    )


def stage5_state(tmp_path, sft_dir, p):
    """Stages 3 + 5 in miniature: a LoRA policy trained a few steps on planted pairs, saved as models/dpo."""
    train, heldout = planted(0, 8), planted(40, 4)
    policy = build_policy(sft_dir, "lora", lora_rank=4, lora_layers=2, seed=0)
    with policy.as_reference() as ref:
        cache = {
            name: compute_ref_logps(ref, policy.tokenizer, rows, MAX_LEN, 8)
            for name, rows in (("train", train), ("heldout", heldout))
        }
    kl_prompts = [tasks.make_prompt(f"Is {a} less than {a + 3}?", SYSTEM) for a in range(2)]
    probe = make_probe(p, policy.tokenizer, kl_prompts, heldout, cache["heldout"], BATCH)
    train_dpo(
        policy.model,
        policy.tokenizer,
        train,
        cache["train"],
        p.dpo,
        batch_size=BATCH,
        seed=0,
        max_len=MAX_LEN,
        measure=lambda step: measure_policy(policy.model, policy.tokenizer, probe, None)[0],
    )
    save_policy(policy, tmp_path / "dpo")
    return tmp_path / "dpo", heldout, cache["heldout"], kl_prompts, policy.tokenizer


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_end_to_end_iterate_then_evaluate(tmp_path, tiny_model_dir, reference):
    start = time.perf_counter()
    sft_dir = tiny_model_dir
    p = tiny_params(reference)
    dpo_dir, heldout, heldout_logps, kl_prompts, tokenizer = stage5_state(tmp_path, sft_dir, p)
    sft_model, _ = load_model(sft_dir)
    calls = []

    def benchmark_fn(path):  # stands in for lm-eval: the fused copy must load as a plain mlx-lm folder
        model, _ = load_model(path)
        calls.append(path)
        return {"toy_bench": 0.5, "other": 0.25}

    heldout_items = [item(i) for i in range(100, 104)]
    probe = make_probe(p, tokenizer, kl_prompts, heldout, heldout_logps, BATCH, accuracy_items=heldout_items)
    ctx = Rounds(
        params=p,
        batch_size=BATCH,
        sft_dir=sft_dir,
        sft_model=sft_model,
        judge=ParityJudge(),
        probe=probe,
        heldout_pairs=heldout,
        work_dir=tmp_path / "work",
        benchmark_fn=benchmark_fn,
        fingerprint="fp",
        eval_texts={"eval": ["What is the capital of the planet Mars in the year 2889?", "what is 2 plus 3?"]},
    )
    # item(2) asks an evaluation question: screened out before sampling, the rounds take the 8 others
    round_items = [item(i) for i in range(9)]
    result = run_iteration(ctx, dpo_dir, round_items, origin="data/tasks/rounds.jsonl")

    rounds = result.rounds
    assert [r["round"] for r in rounds][:1] == [0] and rounds[0]["decision"] == "baseline"
    assert result.n_screened_out == 1 and result.metrics()["n_prompts_screened_out"] == 1
    screened = result.quarantined[0]
    assert screened["location"] == "data/tasks/rounds.jsonl:3" and screened["row"]["id"] == "q2"
    assert screened["reason"] == "contaminated prompt: eval" and screened["field"] == "prompt[1].content"
    assert rounds[1]["prompts"] == [1, 5]  # line numbers in rounds.jsonl: 1, 2, 4, 5
    assert 2 <= len(rounds) <= 3
    for r in rounds[1:]:
        assert (
            r["n_prompts"] == 4
            and r["pairs"]["n_pairs"] >= 1
            and r["decision"] in ("continue", "rollback", "converged")
        )
        assert r["dpo"]["steps"] == 3 and r["kl"] >= 0 and -1 < r["heldout_gap"] < 1
    assert len(calls) == len(rounds)  # benchmarks after every round, round 0 included
    # a rerun with the same fingerprint resumes every finished round from work_dir: same records, nothing re-run
    again = run_iteration(ctx, dpo_dir, round_items, origin="data/tasks/rounds.jsonl")
    assert again.rounds == rounds and again.selected_round == result.selected_round and len(calls) == len(rounds)
    assert {k: [str(c) for c in v] for k, v in again.chains.items()} == {
        k: [str(c) for c in v] for k, v in result.chains.items()
    }
    # round prompts are disjoint between rounds
    prompts = [{json.dumps(p["prompt"]) for p in pairs} for pairs in result.pairs.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(prompts) for b in prompts[i + 1 :])
    m = result.metrics()
    for key in ("selected_kl", "selected_heldout_gap", "selected_round", "n_rounds_run", "decision", "analysis"):
        assert key in m
    assert m["n_rounds_run"] == len(rounds) - 1 and m["selected_round"] == select_round(rounds)
    json.dumps(m, allow_nan=False)
    assert "Convergence analysis" in render_iterate_report(m)

    # models/selected from the LAST trained round (the longest chain with reference `previous`), rebuilt on SFT:
    # fused == adapters attached, and Stage 7 measures exactly the policy Stage 6 measured
    k = max(result.chains)
    assert k >= 1 and len(result.chains[k]) == (k + 1 if reference == "previous" else 1)
    save_selected(
        tmp_path / "selected",
        result.chains[k],
        {
            "round": k,
            "reference": rounds[k]["reference"],
            "iterate_reference": reference,
            "reference_hash": model_hash(sft_dir),
        },
    )
    fused, tok, sel = load_selected(sft_dir, tmp_path / "selected")
    attached, _, _ = load_selected(sft_dir, tmp_path / "selected", fuse=False)
    assert sel["round"] == k and len(sel["chain"]) == len(result.chains[k])
    ids = mx.array([tok.encode("Is 3 less than 5?")])
    np.testing.assert_allclose(np.asarray(fused(ids)), np.asarray(attached(ids)), atol=1e-4)

    # Stage 7 library calls on the same tiny models
    info = export_final(sft_dir, tmp_path / "selected", tmp_path / "final")
    import mlx_lm

    final_model, final_tok = mlx_lm.load(str(tmp_path / "final"))  # standalone folder, as mlx_lm.generate loads it
    np.testing.assert_allclose(np.asarray(final_model(ids)), np.asarray(fused(ids)), atol=1e-4)
    assert info["selected_round"] == k
    eval_items = [item(i) for i in range(200, 210)]
    eval_prompts = [tasks.item_prompt(i, SYSTEM) for i in eval_items]
    baseline = baseline_responses(sft_model, final_tok, eval_items, eval_prompts, p.preference.max_tokens, 0.0, p.seed)
    assert [r["decoding"] for r in baseline] == ["greedy"] * 10 + ["sampled (temperature 1)"] * 10
    metrics, judgments, _ = run_evaluation(
        Evaluation(
            params=p,
            final_model=final_model,
            sft_model=sft_model,
            tokenizer=final_tok,
            judge=ParityJudge(),
            judge_name="parity",
            items=eval_items,
            prompts=eval_prompts,
            baseline_responses=baseline,
            probe=make_probe(p, final_tok, kl_prompts, heldout, heldout_logps, BATCH),
            final_benchmarks={"toy_bench": 0.5, "other": 0.2},
            baseline_benchmarks={"toy_bench": 0.5, "other": 0.25},
            pair_sets={"pairs": planted(0, 8), **{f"round_{r}": ps for r, ps in result.pairs.items()}},
            eval_texts={"eval": ["What is the capital of the planet Mars in the year 2889?"]},
        )
    )
    assert metrics["retention"] == pytest.approx((100 + 80) / 2)
    assert metrics["contaminated_pairs"] == 0 and len(judgments) == 10
    assert [j["baseline"] for j in judgments] == [r["response"] for r in baseline[:10]]  # the SFT side, not redone
    assert metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
    other = metrics["win_rate_other_decoding"]  # gated greedy (temperature 0): sampled at 1.0 reported beside it
    assert metrics["win_rate_detail"]["decoding"] == "greedy" and other["decoding"] == "sampled (temperature 1)"
    assert other["n"] == 10 and other["wins"] + other["ties"] + other["losses"] == 10
    prompts = [tasks.item_prompt(item(i), SYSTEM) for i in range(200, 210)]
    sampled = responses(final_model, final_tok, prompts, 6, temperature=0.7, seed=3)
    assert sampled == responses(final_model, final_tok, prompts, 6, temperature=0.7, seed=3)  # seeded
    assert sampled != responses(final_model, final_tok, prompts, 6, temperature=0.0)
    assert metrics["kl"] == pytest.approx(rounds[k]["kl"], rel=1e-3, abs=1e-6)  # the same measurement as Stage 6
    export_human_sheet(judgments, tmp_path / "sheet.csv", tmp_path / "key.json", 10, bootstrap_samples=200)
    assert import_human_ratings(tmp_path / "sheet.csv", tmp_path / "key.json")["unrated"] == 10

    deploy = decide({**metrics, "selected_round": k}, p, m)
    assert deploy == deploy_decision({**metrics, "selected_round": k}, p, m, metrics["baseline_benchmarks"])
    assert deploy["deploy"] is False and "retention" in deploy["failed"] and deploy["rollback"] is not None
    write_report(
        tmp_path / "reports",
        ReportInputs(evaluate={**metrics, "selected_round": k}, deploy=deploy, iterate=m, curves={}, params=p),
    )
    assert "<svg" in (tmp_path / "reports" / "report.html").read_text()
    assert time.perf_counter() - start < 30
