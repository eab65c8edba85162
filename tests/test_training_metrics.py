"""dpoflow.data.validation: gap, conflicts, duplicates, decontamination, gate flags, the documented snippet."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from dpoflow.data.decontamination import ngram_set, normalize_text
from dpoflow.data.pairs import make_pair, write_pairs
from dpoflow.data.validation import PairValidation, validate_dpo_pairs


def plain(prompt: str, chosen: str, rejected: str, sc: float | None = None, sr: float | None = None) -> dict:
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if sc is not None:
        row.update(score_chosen=sc, score_rejected=sr)
    return row


def validate(pairs: list[dict], **kwargs) -> PairValidation:
    kwargs.setdefault("min_pairs", 1)
    result = validate_dpo_pairs(pairs=pairs, **kwargs)
    assert result.n_input == result.n_pairs + result.n_quarantined
    assert len(result.accepted) == result.n_pairs and len(result.quarantined) == result.n_quarantined
    return result


def reasons(result: PairValidation) -> list[tuple[str, str]]:
    return [(q["location"], q["reason"]) for q in result.quarantined]


# ---------------------------------------------------------------------------------------------- gap


def test_gap_is_mean_score_difference_and_label_only_counts_one():
    result = validate([plain("q1", "a", "b", 0.9, 0.1), plain("q2", "a", "b", 0.6, 0.4), plain("q3", "a", "b")])
    assert result.avg_gap == pytest.approx((0.8 + 0.2 + 1.0) / 3)
    assert result.n_label_only == 1
    assert result.gap_histogram["counts"] == [0, 0, 1, 0, 0, 0, 0, 0, 1, 1]
    assert len(result.gap_histogram["edges"]) == 11


def test_gap_on_a_1_to_10_scale():
    result = validate([plain("q", "a", "b", 10, 1), plain("q2", "a", "b", 5.5, 1)])
    assert result.avg_gap == pytest.approx((1.0 + 0.5) / 2)


def test_mislabeled_pair_is_quarantined():
    result = validate([plain("q", "a", "b", 0.2, 0.7), plain("q2", "a", "b", 0.7, 0.7)])
    assert result.n_mislabeled == 1 and result.n_pairs == 1
    assert reasons(result) == [("<pairs>:1", "mislabeled: score_chosen 0.2 < score_rejected 0.7")]
    assert result.avg_gap == 0.0  # an equal-score pair stays, with gap 0


# ---------------------------------------------------------------------------------------------- duplicates


def test_duplicates_keep_the_first():
    result = validate([plain("q", "a", "b"), plain("q", "a", "c"), plain("q", "a", "b"), plain("q", "a", "b")])
    assert result.n_duplicates == 2 and result.n_pairs == 2
    assert [loc for loc, _ in reasons(result)] == ["<pairs>:3", "<pairs>:4"]
    assert all(r == "duplicate: same prompt, chosen and rejected as <pairs>:1" for _, r in reasons(result))


# ---------------------------------------------------------------------------------------------- conflicts


def test_opposite_labels_majority_keeps_majority_direction():
    rows = [plain("q", "A", "B"), plain("q", "B", "A"), plain("q", "A", "B"), plain("other", "B", "A")]
    result = validate(rows)
    assert result.n_conflicts == 1 and result.n_conflict_rows == 1
    assert reasons(result)[0][0] == "<pairs>:2" and reasons(result)[0][1].startswith("conflict: opposite labels")
    assert result.n_duplicates == 1  # the second A>B vote is then a duplicate
    assert [p["chosen"] for p in result.accepted] == ["A", "B"]  # "other" prompt is not a conflict


def test_opposite_labels_tie_drops_all():
    result = validate([plain("q", "A", "B"), plain("q", "B", "A"), plain("q", "A", "C")])
    assert result.n_conflicts == 1 and result.n_conflict_rows == 2
    assert all("tie" in r for _, r in reasons(result))
    assert [p["rejected"] for p in result.accepted] == ["C"]
    assert result.conflicts[0]["kind"] == "opposite" and result.conflicts[0]["resolution"] == "dropped all"


def test_opposite_labels_score_rule_keeps_larger_gap():
    rows = [plain("q", "A", "B", 0.9, 0.1), plain("q", "B", "A", 0.6, 0.5)]
    result = validate(rows, conflict_rule="score")
    assert [p["chosen"] for p in result.accepted] == ["A"]
    result = validate(rows, conflict_rule="drop")
    assert result.n_pairs == 0 and result.n_conflict_rows == 2


def test_three_cycle_is_detected_and_dropped_on_tie():
    rows = [plain("q", "A", "B"), plain("q", "B", "C"), plain("q", "C", "A"), plain("q", "A", "D")]
    result = validate(rows)
    assert result.n_conflicts == 1
    assert result.conflicts[0]["kind"] == "cycle" and result.conflicts[0]["n_responses"] == 3
    assert [loc for loc, _ in reasons(result)] == ["<pairs>:1", "<pairs>:2", "<pairs>:3"]
    assert all(r.startswith("conflict: preference cycle among 3 responses") for _, r in reasons(result))
    assert [p["rejected"] for p in result.accepted] == ["D"]


def test_three_cycle_majority_drops_the_weakest_edge():
    rows = [
        plain("q", "A", "B"),
        plain("q", "A", "B"),
        plain("q", "B", "C"),
        plain("q", "B", "C"),
        plain("q", "C", "A"),
    ]
    result = validate(rows)
    assert reasons(result)[0] == (
        "<pairs>:5",
        "conflict: preference cycle among 3 responses to the same prompt (fewest votes)",
    )
    assert result.n_conflicts == 1 and result.n_duplicates == 2 and result.n_pairs == 2


def test_conflict_rule_is_checked():
    with pytest.raises(ValueError, match="conflict_rule"):
        validate([plain("q", "a", "b")], conflict_rule="vote")


# ---------------------------------------------------------------------------------------------- decontamination


EVAL = {
    "gsm": ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."],
    "arith": ["What is 17 + 25?"],
}


def test_clean_data_scores_one():
    result = validate([plain("What is 3 + 4?", "7", "8"), plain("Name a color.", "Blue", "Seven")], eval_texts=EVAL)
    assert result.decontamination == 1.0 and result.n_contaminated == 0
    assert result.decontamination_checked and result.eval_sets == ["arith", "gsm"]


def test_planted_overlap_is_found_and_removed():
    planted = "Question: natalia SOLD clips to 48 of her friends in April -- how many in May?"
    rows = [
        plain(planted, "72", "50"),
        plain("What is 3 + 4?", "7", "8"),
        plain("Solve: what is 17+25? Answer with only the final number.", "42", "41"),
        plain("Name a color.", "Blue", "Seven"),
    ]
    result = validate(rows, eval_texts=EVAL)
    assert result.n_contaminated == 2
    assert [(c["location"], c["eval_sets"]) for c in result.contaminated] == [
        ("<pairs>:1", ["gsm"]),
        ("<pairs>:3", ["arith"]),
    ]
    assert result.decontamination == pytest.approx(0.5)  # measured before removal
    assert reasons(result) == [("<pairs>:1", "contaminated: gsm"), ("<pairs>:3", "contaminated: arith")]
    assert [q["field"] for q in result.quarantined] == ["prompt[0].content", "prompt[0].content"]
    assert result.n_pairs == 2
    assert not result.passed["decontamination"]


def test_overlap_in_a_response_counts():
    rows = [plain("Tell me a story.", "Natalia sold clips to 48 of her friends in April and so on", "No.")]
    result = validate(rows, eval_texts=EVAL)
    assert result.contaminated[0]["fields"] == ["chosen"] and result.quarantined[0]["field"] == "chosen"


def test_short_eval_text_needs_the_whole_sequence():
    rows = [plain("What is 17 + 2?", "19", "18"), plain("What is 17 - 25?", "-8", "8")]
    assert validate(rows, eval_texts=EVAL).n_contaminated == 0


def test_very_short_eval_text_needs_an_exact_match():
    result = validate([plain("hello", "hi", "no"), plain("hello there", "hi", "no")], eval_texts={"tiny": ["Hello!"]})
    assert [c["location"] for c in result.contaminated] == ["<pairs>:1"]


def test_without_eval_texts_nothing_is_checked():
    result = validate([plain("q", "a", "b")])
    assert result.decontamination == 1.0 and not result.decontamination_checked


def test_normalize_text():
    assert normalize_text("  Ｗhat's   3+4?\tDON'T…") == "what s 3 + 4 don t"
    assert normalize_text("3 + 4") == normalize_text("3+4") != normalize_text("3-4")
    assert normalize_text("x_y") == "x y"


def test_ngram_set():
    assert len(ngram_set("a b c d e", 2)) == 4
    assert ngram_set("A b, C!", 8) == ngram_set("a b c", 8)  # short text: one hash of the whole text
    assert ngram_set("", 3) == set() and ngram_set("...", 3) == set()
    assert ngram_set("a b c d", 3) & ngram_set("x b c d", 3)


# ---------------------------------------------------------------------------------------------- gates, stats


def test_passed_flags_fail_on_weak_data():
    rows = [plain(f"q{i}", "a", "b", 0.55, 0.5) for i in range(20)]
    result = validate(rows, min_pairs=1000)
    assert result.avg_gap == pytest.approx(0.05)
    assert result.passed == {"gap": False, "pairs": False, "decontamination": True}
    assert not result.all_passed
    result = validate([plain(f"q{i}", "a", "b", 0.9, 0.1) for i in range(20)], min_pairs=20)
    assert result.passed == {"gap": True, "pairs": True, "decontamination": True} and result.all_passed


def test_length_statistics_chars_and_tokens():
    rows = [plain("abcd", "x" * 10, "y"), plain("ab", "x" * 20, "yy")]
    result = validate(rows, count_tokens=lambda text: len(text.split()) + 1)
    chars = result.lengths["chars"]
    assert chars["prompt"] == {"mean": 3.0, "p50": 3.0, "p95": pytest.approx(3.9), "max": 4}
    assert chars["chosen"]["max"] == 20 and chars["rejected"]["mean"] == 1.5
    assert result.lengths["tokens"]["chosen"] == {"mean": 2.0, "p50": 2.0, "p95": 2.0, "max": 2}
    assert validate(rows).lengths["tokens"] is None


def test_over_long_pairs_are_quarantined_by_tokens():
    rows = [plain("q", "one two three four", "x"), plain("q", "one", "x")]
    result = validate(rows, max_tokens=3, count_tokens=lambda text: len(text.split()))
    assert result.n_pairs == 1 and result.quarantine_reasons == {"over-long": 1}


def test_to_dict_is_json_safe_and_excludes_rows(tmp_path):
    rows = [plain("q", "a", "b", 0.9, 0.1), plain("q", "b", "a"), "garbage", plain("q", "a", "a")]
    result = validate(rows, eval_texts=EVAL, quarantine_path=tmp_path / "q.jsonl")
    data = result.to_dict()
    assert "accepted" not in data and "quarantined" not in data
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["n_quarantined"] == result.n_quarantined
    assert all(not isinstance(v, float) or math.isfinite(v) for v in data.values())
    lines = (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == result.n_quarantined
    assert all({"location", "field", "reason", "row"} <= json.loads(line).keys() for line in lines)


def test_exactly_one_input():
    with pytest.raises(ValueError, match="exactly one"):
        validate_dpo_pairs()
    with pytest.raises(ValueError, match="exactly one"):
        validate_dpo_pairs(dpo_path=Path("x.jsonl"), pairs=[])


def test_canonical_parquet_input(tmp_path):
    pairs = [make_pair([{"role": "user", "content": f"q{i}"}], "a", "b", 1.0, 0.0, source="verifier") for i in range(3)]
    write_pairs(pairs, tmp_path / "pairs.parquet")
    result = validate_dpo_pairs(dpo_path=tmp_path / "pairs.parquet", min_pairs=3)
    assert result.accepted == pairs and result.all_passed


# ---------------------------------------------------------------------------------------------- documented snippet


SNIPPET = textwrap.dedent("""\
    from dpoflow.data.validation import validate_dpo_pairs
    metrics = validate_dpo_pairs(dpo_path=Path("preference_pairs.jsonl"), gap_threshold=3/20)
""")


def test_documented_snippet_runs_as_written(tmp_path, monkeypatch):
    rows = [plain(f"What is {i} + {i}?", str(2 * i), str(2 * i + 1), 1.0, 0.0) for i in range(1000)]
    rows.append({"prompt": "q", "chosen": "same", "rejected": "same"})
    (tmp_path / "preference_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec("from pathlib import Path\n" + SNIPPET, namespace)  # the workflow imports Path beforehand
    metrics = namespace["metrics"]
    assert metrics.n_input == 1001 and metrics.n_pairs == 1000 and metrics.n_quarantined == 1
    assert metrics.avg_gap == 1.0 and metrics.all_passed
    assert metrics.quarantined[0]["location"] == "preference_pairs.jsonl:1001"
