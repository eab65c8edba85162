"""Tests for dpoflow.eval and dpoflow.reporting (Stage 7): retention, win rate with ties and a bootstrap interval,
the blind human sheet round trip, the contamination audit, the deploy decision and the report."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpoflow.data import tasks
from dpoflow.data.decontamination import find_contaminated_pairs
from dpoflow.data.judges import Judge
from dpoflow.data.pairs import DataFormatError, make_pair
from dpoflow.data.validation import validate_dpo_pairs
from dpoflow.eval.deploy import deploy_decision, last_good_round
from dpoflow.eval.human import export_human_sheet, import_human_ratings, read_human_ratings
from dpoflow.eval.retention import retention
from dpoflow.eval.win_rate import baseline_texts_for, decodings, outcome_of, pairwise_judgments, win_rate
from dpoflow.reporting.charts import bar_chart, line_chart, read_tsv
from dpoflow.reporting.report import CURVES, ReportInputs, input_lines, write_report
from dpoflow.runtime import io
from dpoflow.runtime.errors import UserError
from dpoflow.runtime.params import CHIPS, parse_params

SYSTEM = "Reply with only the final answer."


def params(**sections):
    return parse_params({"batch_size": dict.fromkeys(CHIPS, 4), **sections})


# ------------------------------------------------------------------------------------------------ retention


def test_retention_per_benchmark_and_overall():
    out = retention({"a": 0.45, "b": 0.30, "c": 0.0, "d": 0.2}, {"a": 0.50, "b": 0.30, "c": 0.0, "d": 0.0, "e": 0.4})
    per = out["retention_per_benchmark"]
    assert per["a"] == pytest.approx(90.0) and per["b"] == pytest.approx(100.0)
    assert per["c"] == 100.0  # 0 -> 0: nothing lost
    assert per["d"] is None  # 0 -> 0.2: a gain from nothing, no ratio, not counted
    assert per["e"] == 0.0  # not measured on the final model: fail-safe 0
    assert out["counted"] == ["a", "b", "c", "e"]
    assert out["retention"] == pytest.approx((90 + 100 + 100 + 0) / 4)
    assert out["lowest_benchmark"] == "e"
    assert any("d:" in n and "gain" in n for n in out["notes"])


def test_retention_edge_cases():
    assert retention({"a": 0.3}, {"a": 0.0})["retention"] == 100.0  # only gains
    assert retention({}, {})["retention"] is None  # nothing to compare: the gate fails
    assert retention({"a": 0.6}, {"a": 0.4})["retention"] == pytest.approx(150.0)


# ------------------------------------------------------------------------------------------------ win rate


def test_win_rate_ties_count_half_and_known_interval():
    outcomes = [1.0] * 60 + [0.5] * 20 + [0.0] * 20
    out = win_rate(outcomes, bootstrap_samples=4000, seed=0)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (60, 20, 20, 100)
    assert out["win_rate"] == pytest.approx(0.7)
    # outcome variance 0.65 - 0.49 = 0.16 -> standard error 0.04 -> 95% interval ~ 0.7 +- 0.078
    assert out["ci_low"] == pytest.approx(0.7 - 1.96 * 0.04, abs=0.015)
    assert out["ci_high"] == pytest.approx(0.7 + 1.96 * 0.04, abs=0.015)
    assert win_rate(outcomes, bootstrap_samples=4000, seed=0) == out  # seeded
    assert win_rate(list(reversed(outcomes)), bootstrap_samples=4000, seed=0) == out  # order-free
    assert win_rate([1.0, 0.5, 0.0], 500)["win_rate"] == 0.5
    assert win_rate([0.5] * 10, 500)[("ci_low")] == 0.5  # all ties: exactly 1/2
    all_wins = win_rate([1.0] * 5, 500)
    assert (all_wins["win_rate"], all_wins["ci_low"], all_wins["ci_high"]) == (1.0, 1.0, 1.0)
    assert win_rate([], 500)["win_rate"] is None
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        win_rate([0.7])


def test_alignment_improved_only_when_the_interval_clears_one_half():
    p = params()
    base = {"retention": 100.0, "retention_ci_low": 99.0, "final_kl": 0.01, "final_heldout_gap": 0.3}
    base["contaminated_pairs"] = 0
    clear = win_rate([1.0] * 70 + [0.0] * 30, 2000)
    unclear = win_rate([1.0] * 11 + [0.0] * 9, 2000)  # 0.55 but the interval includes 0.5
    assert deploy_decision({**base, "win_rate": 0.7, "win_rate_ci_low": clear["ci_low"]}, p)["deploy"] is True
    decision = deploy_decision({**base, "win_rate": 0.55, "win_rate_ci_low": unclear["ci_low"]}, p)
    assert decision["deploy"] is False and decision["failed"] == ["win_rate"]


class StubJudge(Judge):
    name = "stub"

    def score(self, items, prompts, responses):
        return [[float(len(t)) for t in texts] for texts in responses]


def test_pairwise_judgments_outcomes():
    prompts = [tasks.make_prompt(f"q{i}", SYSTEM) for i in range(4)]
    j = pairwise_judgments(
        StubJudge(), [None] * 4, prompts, ["long answer", "a", "same", "xy"], ["short", "bbb", "same", "ab"]
    )
    assert [x["outcome"] for x in j] == [1.0, 0.0, 0.5, 0.5]  # longer wins; identical text; equal score
    assert outcome_of(0.2, 0.2) == 0.5 and outcome_of(1.0, 0.0) == 1.0 and outcome_of(0.0, 1.0) == 0.0


def test_verifier_judged_win_rate_on_task_items():
    from dpoflow.data.judges import make_judge

    items = [
        {
            "id": f"i{a}",
            "task": "basic_arithmetic",
            "question": f"{a} + 1 =",
            "answer": str(a + 1),
            "metadata": {"task_config": {}},
        }
        for a in range(3)
    ]
    prompts = [tasks.item_prompt(it, SYSTEM) for it in items]
    j = pairwise_judgments(make_judge("verifier"), items, prompts, ["1", "2", "7"], ["0", "2", "3"])
    assert [x["outcome"] for x in j] == [1.0, 0.5, 0.0]


def test_baseline_responses_are_read_back_per_decoding_and_refused_for_other_prompts():
    items = [{"id": f"q{i}"} for i in range(3)]
    assert decodings(0.0) == (0.0, 1.0) and decodings(0.7) == (0.7, 0.0)
    rows = [
        {"decoding": "x", "temperature": t, "index": i, "id": f"q{i}", "response": f"{t}:{i}"}
        for t in (1.0, 0.0)
        for i in (2, 0, 1)
    ]
    assert baseline_texts_for(rows, items, 0.0) == ["0.0:0", "0.0:1", "0.0:2"]  # prompt order, one decoding
    assert baseline_texts_for(rows, items, 1.0) == ["1.0:0", "1.0:1", "1.0:2"]
    with pytest.raises(ValueError, match="other prompts: 1 of 3 differ"):
        baseline_texts_for(rows, [{"id": "q0"}, {"id": "zz"}, {"id": "q2"}], 0.0)  # another eval split
    with pytest.raises(ValueError, match="other prompts"):
        baseline_texts_for(rows, items[:2], 0.0)  # made for more win_rate_prompts
    with pytest.raises(ValueError, match="other prompts"):
        baseline_texts_for(rows, items, 0.5)  # another decoding


# ------------------------------------------------------------------------------------------------ human sheet


def synthetic_judgments(n=40):
    out = []
    for i in range(n):
        outcome = (1.0, 0.5, 0.0)[i % 3] if i % 5 else 1.0
        out.append(
            {
                "index": i,
                "id": f"q{i}",
                "prompt": tasks.make_prompt(f"What is {i} + {i}?", SYSTEM),
                "final": f"reply {i} one",
                "baseline": f"reply {i} two",
                "score_final": outcome,
                "score_baseline": 0.5,
                "outcome": outcome,
            }
        )
    return out


def fill_sheet(sheet, key, judgments, blank_rows=()):
    """A rater who agrees with the automatic judge: picks the side the key says is the better model."""
    key_rows = io.read_json(key)["rows"]
    with open(sheet, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["row"] in blank_rows:
            continue
        entry = key_rows[row["row"]]
        outcome = judgments[entry["index"]]["outcome"]
        if outcome == 0.5:
            row["preference"] = "tie"
        else:
            winner = "final" if outcome == 1.0 else "baseline"
            row["preference"] = "A" if entry["a"] == winner else "b"  # case-insensitive
    with open(sheet, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_human_sheet_round_trip_gives_the_automatic_win_rate(tmp_path):
    judgments = synthetic_judgments(40)
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.json"
    export_human_sheet(judgments, sheet, key, n_rows=40, seed=3, bootstrap_samples=1500)
    text = sheet.read_text().lower().replace("only the final number", "")
    assert "final" not in text and "baseline" not in text and "sft" not in text  # no model identity in the sheet
    with open(sheet, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["row", "prompt", "response_a", "response_b", "preference", "comment"]
    assert all(r["preference"] == "" for r in rows)
    sides = [io.read_json(key)["rows"][r["row"]]["a"] for r in rows]
    assert 5 < sides.count("final") < 35  # randomized A/B order
    fill_sheet(sheet, key, judgments)
    human = import_human_ratings(sheet, key)
    auto = win_rate([j["outcome"] for j in judgments], bootstrap_samples=1500, seed=3)
    assert {k: human[k] for k in auto} == auto
    assert human["rated"] == 40 and human["unrated"] == 0


def test_human_sheet_subset_blank_rows_and_bad_values(tmp_path):
    judgments = synthetic_judgments(30)
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.json"
    export_human_sheet(judgments, sheet, key, n_rows=12, seed=0)
    assert len(io.read_json(key)["rows"]) == 12
    fill_sheet(sheet, key, judgments, blank_rows={"1", "2"})
    outcomes, info = read_human_ratings(sheet, key)
    assert (info["rated"], info["unrated"], len(outcomes)) == (10, 2, 10)
    with open(sheet, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[4]["preference"] = "maybe"
    with open(sheet, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"sheet\.csv:\d+: preference: 'maybe' .*\[sheet row " + rows[4]["row"]):
        import_human_ratings(sheet, key)


def _sheet_with(tmp_path, n_rows=4, edit=None):
    """An exported sheet of n_rows (rows filled in by a rater who agrees with the judge), then `edit(rows)`."""
    judgments = synthetic_judgments(12)
    sheet, key = tmp_path / "sheet.csv", tmp_path / "key.json"
    export_human_sheet(judgments, sheet, key, n_rows=n_rows, seed=0)
    fill_sheet(sheet, key, judgments)
    with open(sheet, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows) if edit else rows
    with open(sheet, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["row", "prompt", "response_a", "response_b", "preference", "comment"])
        writer.writeheader()
        writer.writerows(rows)
    return sheet, key


def test_human_sheet_cut_short_reports_the_missing_rows(tmp_path):
    """A sheet cut from 4 rows to 1 said "0 not rated": the rows of the key it lacks are counted and named."""
    sheet, key = _sheet_with(tmp_path, 4, edit=lambda rows: [r for r in rows if r["row"] == "3"])
    outcomes, info = read_human_ratings(sheet, key)
    assert (len(outcomes), info["rated"], info["blank"]) == (1, 1, 0)
    assert (info["missing"], info["missing_rows"], info["unrated"], info["rows_in_key"]) == (3, ["1", "2", "4"], 3, 4)
    human = import_human_ratings(sheet, key)
    assert (human["rated"], human["unrated"], human["missing_rows"]) == (1, 3, ["1", "2", "4"])
    whole, _ = _sheet_with(tmp_path / "whole", 4)
    assert read_human_ratings(whole, tmp_path / "whole" / "key.json")[1]["missing_rows"] == []


def test_human_sheet_row_not_in_the_key_is_refused(tmp_path):
    extra = {"row": "99", "prompt": "p", "response_a": "a", "response_b": "b", "preference": "A", "comment": ""}
    sheet, key = _sheet_with(tmp_path, 4, edit=lambda rows: rows + [extra])  # 4 rows of 2 lines, then line 10
    with pytest.raises(DataFormatError, match=r"sheet\.csv:10: row: '99' is not a row of .*key\.json") as err:
        read_human_ratings(sheet, key)
    assert isinstance(err.value, UserError)


def test_human_sheet_bad_utf8_names_file_and_line(tmp_path):
    sheet, key = _sheet_with(tmp_path, 4)
    lines = sheet.read_bytes().split(b"\n")
    assert lines[2].startswith(b"Answer") and b"reply" in lines[2]  # line 3: the end of row 1 (prompts span lines)
    lines[2] = lines[2].replace(b"reply", b"r\xe9ply", 1)  # a Latin-1 export
    sheet.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFormatError, match=r"sheet\.csv:3: encoding: invalid UTF-8 at byte \d+") as err:
        import_human_ratings(sheet, key)
    assert isinstance(err.value, UserError) and err.value.__cause__ is None


def test_human_sheet_oversized_field_names_file_and_line(tmp_path):
    def huge(rows):
        rows[1]["comment"] = "x" * 200_000  # over the csv module's 131,072-character field limit
        return rows

    sheet, key = _sheet_with(tmp_path, 4, edit=huge)
    with pytest.raises(DataFormatError, match=r"sheet\.csv:3: csv: field larger than field limit") as err:
        read_human_ratings(sheet, key)
    assert isinstance(err.value, UserError)


def test_human_sheet_error_is_one_error_line_from_the_stage(tmp_path):
    """`stages/evaluate.py --human-ratings` prints a bad sheet as one `Error: <file>:<line>: ...` line."""
    sheet, key = _sheet_with(tmp_path, 4)
    sheet.write_bytes(sheet.read_bytes().replace(b"reply", b"\xff", 1))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "stages" / "evaluate.py"), "--params", str(root / "params.yaml")]
        + ["--human-ratings", str(sheet), "--key", str(key)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {sheet}:3: encoding: invalid UTF-8"), proc.stderr


# ------------------------------------------------------------------------------------------------ contamination


def test_planted_eval_question_is_detected():
    eval_texts = {
        "eval": ["A farmer has 17 cows and buys 25 more at the market on Tuesday. How many cows now?", "12 + 30 ="],
        "lm_eval/cloze": ["The airship rose slowly above the glittering towers of the city."],
    }
    clean = make_pair(tasks.make_prompt("What is 3 + 4?", SYSTEM), "7", "8")
    planted = make_pair(
        tasks.make_prompt("A farmer has 17 cows and buys 25 more at the market on Tuesday. How many cows now?", SYSTEM),
        "42",
        "41",
    )
    in_response = make_pair(
        tasks.make_prompt("Tell a story.", SYSTEM),
        "the airship rose slowly above the glittering towers of the city, then fell",
        "no",
    )
    short = make_pair(tasks.make_prompt("Compute 12 + 30 = please", SYSTEM), "42", "41")
    found = find_contaminated_pairs(
        {"pairs.parquet": [clean, planted], "round_1.parquet": [in_response, short]}, eval_texts
    )
    assert [(f["file"], f["row"]) for f in found] == [
        ("pairs.parquet", 2),
        ("round_1.parquet", 1),
        ("round_1.parquet", 2),
    ]
    assert found[0]["eval_sets"] == ["eval"] and found[0]["field"] == "prompt[1].content"
    assert found[1]["eval_sets"] == ["lm_eval/cloze"] and found[1]["field"] == "chosen"
    # the same rule as Stage 2's decontamination
    stage2 = validate_dpo_pairs(pairs=[clean, planted, in_response, short], eval_texts=eval_texts, min_pairs=1)
    assert stage2.n_contaminated == len(found)


# ------------------------------------------------------------------------------------------------ decision + report


ROUNDS = [
    {
        "round": 0,
        "passed": True,
        "decision": "baseline",
        "kl": 0.02,
        "heldout_gap": 0.2,
        "task_accuracy": 0.4,
        "benchmark_mean": 0.5,
        "benchmarks": {"gen": 0.4, "mc": 0.6},
        "reasons": ["stage 5"],
    },
    {
        "round": 1,
        "passed": True,
        "decision": "continue",
        "kl": 0.04,
        "heldout_gap": 0.3,
        "task_accuracy": 0.45,
        "benchmark_mean": 0.49,
        "benchmarks": {"gen": 0.4, "mc": 0.58},
        "reasons": ["improved"],
    },
    {
        "round": 2,
        "passed": True,
        "decision": "continue",
        "kl": 0.07,
        "heldout_gap": 0.35,
        "task_accuracy": 0.45,
        "benchmark_mean": 0.40,
        "benchmarks": {"gen": 0.3, "mc": 0.5},
        "reasons": ["improved"],
    },
]
BASELINE = {"gen": 0.4, "mc": 0.6}


def project(tmp_path, final_benchmarks, win=(0.62, 0.55, 0.69)):
    root = tmp_path / "project"
    ret = retention(final_benchmarks, BASELINE)
    io.write_json(
        root / "metrics" / "evaluate.json",
        {
            "retention": ret["retention"],
            "retention_ci_low": ret["retention"] - 3.0,  # the gate checks this bound (gates.bound)
            "retention_per_benchmark": ret["retention_per_benchmark"],
            "retention_notes": ret["notes"],
            "benchmarks": final_benchmarks,
            "baseline_benchmarks": BASELINE,
            "win_rate": win[0],
            "win_rate_ci_low": win[1],
            "win_rate_ci_high": win[2],
            "win_rate_detail": {
                "n": 200,
                "wins": 110,
                "ties": 28,
                "losses": 62,
                "judge": "verifier",
                "bootstrap_samples": 2000,
                "seed": 0,
            },
            "kl": 0.07,
            "heldout_gap": 0.35,
            "final_kl": 0.07,  # the gate's names (metrics/evaluate.json) beside the detail's
            "final_heldout_gap": 0.35,
            "contaminated_pairs": 0,
            "selected_round": 2,
            "contamination": {"n_pairs_checked": 1200, "first": []},
        },
    )
    io.write_json(
        root / "metrics" / "iterate.json",
        {"decision": "max_rounds", "selected_round": 2, "rounds": ROUNDS, "analysis": "Held-out gap rose every round."},
    )
    for stage, key, values in (
        ("sft", "train/loss", [3.0, 2.1, 1.5]),
        ("sft", "eval/val_loss", [2.0, 1.6]),
        ("dpo", "train/loss", [0.69, 0.6, 0.5]),
        ("dpo", "train/rewards/margins", [0.0, 0.1, 0.3]),
    ):
        path = root / "dvclive" / stage / "plots" / "metrics" / f"{key}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("step\t" + key.rsplit("/", 1)[-1] + "\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
    return root


def decide_and_report(root, p):
    """What `stages/evaluate.py --decide` does in a project: the deploy decision, then the report."""
    ev = io.read_json(root / "metrics" / "evaluate.json")
    iterate = io.read_json(root / "metrics" / "iterate.json")
    deploy = {**deploy_decision(ev, p, iterate, ev.get("baseline_benchmarks") or {}), "model": "models/final"}
    curves = {
        chart: {
            name: read_tsv(root / "dvclive" / stage / "plots" / "metrics" / f"{key}.tsv")
            for name, (stage, key) in series.items()
        }
        for chart, series in CURVES.items()
    }
    io.write_json(root / "reports" / "deploy.json", deploy)
    write_report(
        root / "reports",
        ReportInputs(
            evaluate=ev, deploy=deploy, iterate=iterate, curves=curves, params=p, files={"final_model": "models/final"}
        ),
    )
    return deploy


def test_capability_regression_names_the_rollback(tmp_path):
    p = params(
        evaluate={"min_retention": 95.0, "max_kl": 0.1, "min_heldout_gap": 0.15},
        dpo={"learning_rate": 4e-5, "lr_backoff": 0.5},
        iterate={"max_steps": 60},
    )
    root = project(tmp_path, {"gen": 0.3, "mc": 0.5})  # round 2's benchmarks: 79 % retention
    deploy = decide_and_report(root, p)
    assert deploy["deploy"] is False and deploy["failed"] == ["retention"]
    rb = deploy["rollback"]
    assert rb["to"]["round"] == 1  # round 2 fails retention; round 1 retains 98 % and meets KL / gap
    assert rb["parameter_changes"]["dpo.learning_rate"]["to"] == pytest.approx(2e-5)
    assert rb["parameter_changes"]["iterate.max_steps"]["to"] == 30
    assert "roll back" in rb["prescription"] and "dpo.learning_rate" in rb["prescription"]
    assert json.loads((root / "reports" / "deploy.json").read_text()) == deploy
    html_text = (root / "reports" / "report.html").read_text()
    assert "DO NOT DEPLOY" in html_text and "roll back" in html_text


def test_no_round_meets_thresholds_falls_back_to_sft():
    p = params(evaluate={"max_kl": 0.001})
    assert last_good_round({"rounds": ROUNDS}, BASELINE, p)["model"] == "the SFT model"


def test_report_renders_plots_and_decision(tmp_path):
    p = params()
    root = project(tmp_path, {"gen": 0.4, "mc": 0.6})
    deploy = decide_and_report(root, p)
    assert deploy["deploy"] is True and deploy["rollback"] is None
    assert [c["passed"] for c in deploy["checks"]] == [True] * 5
    html_text = (root / "reports" / "report.html").read_text()
    assert html_text.startswith("<!DOCTYPE html>") and 'id="decision"' in html_text and ">DEPLOY<" in html_text
    assert html_text.count("<svg") == 7 and "polyline" in html_text and 'class="interval"' in html_text
    for plot in ("sft_training", "dpo_training", "reward_margins", "kl_rounds", "gap_rounds", "win_rate", "retention"):
        assert f'id="plot-{plot}"' in html_text
        assert (root / "reports" / "plots" / f"{plot}.svg").read_text().startswith("<svg")
    assert "http" not in html_text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    md = (root / "reports" / "report.md").read_text()
    assert "**DEPLOY**" in md and "plots/win_rate.svg" in md and "| gen |" in md
    # deterministic
    first = (root / "reports" / "report.html").read_bytes()
    decide_and_report(root, p)
    assert (root / "reports" / "report.html").read_bytes() == first


def test_the_input_lines_add_up():
    # prepare_data's inputs.json for 60 SFT rows of which one was screened out (the worked example's data.sft):
    # n_rows counts the rows the reader accepted, before screening, and n_quarantined includes the screened one
    inputs = {
        "data.sft": {"origin": "inputs/sft/chat.jsonl", "n_input": 60, "n_rows": 60, "n_quarantined": 1},
        "data.prompts": {"origin": "inputs/prompts/p.jsonl", "n_input": 44, "n_rows": 41, "n_quarantined": 5},
    }
    # before: "60 rows used, 1 quarantined" for 60 rows
    assert input_lines(inputs) == [
        "data.prompts = inputs/prompts/p.jsonl: 44 rows read: 39 used, 5 quarantined",
        "data.sft = inputs/sft/chat.jsonl: 60 rows read: 59 used, 1 quarantined",
    ]


def test_svg_helpers_handle_empty_and_constant_data(tmp_path):
    assert "no data" in line_chart("t", {"a": []})
    assert "<polyline" in line_chart("t", {"a": [(0, 1.0), (1, 1.0)]})
    assert "n/a" in bar_chart("t", [("x", None, None)])
    tsv = tmp_path / "m.tsv"
    tsv.write_text("step\tloss\n0\t1.5\n1\tnan\n2\t1.0\n")
    assert read_tsv(tsv) == [(0.0, 1.5), (2.0, 1.0)] and read_tsv(tmp_path / "missing.tsv") == []


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium not installed")
def test_report_screenshot_is_not_blank(tmp_path):
    from PIL import Image

    root = project(tmp_path, {"gen": 0.3, "mc": 0.5})
    decide_and_report(root, params())
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "/usr/bin/chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1000,1400",
            (root / "reports" / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("L")
    lo, hi = image.getextrema()
    assert hi - lo > 100  # text, plots and the decision banner: far from one flat colour
    assert len(set(image.resize((100, 140)).getdata())) > 20


def test_the_report_says_what_the_retention_evidence_shows():
    from dpoflow.reporting.evidence import check_rows, retention_bars, retention_shown

    row = {"retention": 101.0, "ci_low": 96.0, "ci_high": 106.0, "informative": 1, "reason": None}
    flat = {"retention": 100.0, "ci_low": 100.0, "ci_high": 100.0, "informative": 0, "reason": "both means <= 0.02"}
    ev = {
        "retention": 101.0,
        "retention_ci_low": 96.5,
        "retention_ci_high": 105.0,
        "retention_confidence": 0.9,
        "retention_tasks": {"gen": row, "humaneval": flat},
    }
    text = retention_shown(ev, 95.0)
    assert text.startswith("Retention >= 95% shown at 95% confidence (one-sided lower bound 96.5%) on 1 of 2")
    assert "humaneval uninformative (both means <= 0.02)" in text
    assert "not shown" in retention_shown(ev, 97.0)
    assert retention_shown({**ev, "retention_ci_low": None}, 95.0).startswith("Retention not shown")
    bars = retention_bars(ev)
    assert bars[0] == ("gen", 101.0, (96.0, 106.0)) and bars[-1] == ("pooled", 101.0, (96.5, 105.0))
    assert bars[1][0] == "humaneval (uninformative)"
    check = {"label": "retention", "op": ">=", "threshold": 95.0, "param": "evaluate.min_retention", "passed": True}
    (bound_row,) = check_rows({"checks": [{**check, "value": 96.5, "point": 101.0, "bound": 96.5, "on_bound": True}]})
    assert bound_row[1] == "96.5 (lower bound; point 101)" and bound_row[-1] == "pass"
    (point_row,) = check_rows({"checks": [{**check, "value": 101.0, "point": 101.0, "bound": 96.5}]})
    assert point_row[1] == "101 (lower bound 96.5)"


def test_a_gate_checks_the_bound_it_is_told_to_and_prints_both():
    from dpoflow.eval.gates import evaluate_gate

    ev = {"retention": 100.0, "retention_ci_low": 93.0, "final_kl": 0.05, "final_kl_ci_high": 0.12}
    ev |= {"final_heldout_gap": 0.3, "win_rate": 0.6, "win_rate_ci_low": 0.55, "contaminated_pairs": 0}
    on_bound = evaluate_gate("evaluate", ev, params(gates={"bound": ["retention", "win_rate"]}))
    assert not on_bound.passed and [r.check.metric for r in on_bound.results if not r.passed] == ["retention"]
    assert "capability retention % lower bound 93 (point 100) < 95" in on_bound.report()
    on_point = evaluate_gate("evaluate", ev, params(gates={"bound": ["win_rate"]}))
    assert on_point.passed and "capability retention % 100 (lower bound 93) >= 95" in on_point.report()
    kl_bound = evaluate_gate("evaluate", ev, params(gates={"bound": ["final_kl"]}))
    assert [r.check.metric for r in kl_bound.results if not r.passed] == ["final_kl"]
    assert "upper bound 0.12 (point 0.05) > 0.1" in kl_bound.report()
    missing = evaluate_gate("evaluate", {**ev, "retention_ci_low": None}, params())
    assert not missing.passed and "metric `retention_ci_low` missing" in missing.report()
