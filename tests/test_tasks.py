"""dpoflow.data.tasks: deterministic disjoint splits, the reasoning-gym checker as verifier, prompts, SFT targets."""

from __future__ import annotations

import pytest

from dpoflow.data import tasks
from dpoflow.data.lm_eval_tasks.task_utils import canonical_number, extract_last_number, process_results_exact_match

SIZES = {"eval": 30, "heldout": 20, "sft_val": 10, "pref_prompts": 40, "rounds": 30, "sft_train": 60}


@pytest.fixture(scope="module")
def splits():
    return tasks.build_splits(sizes=SIZES, seed=0)


def test_splits_have_the_requested_sizes_and_weights(splits):
    assert list(splits) == list(tasks.SPLITS)
    assert {name: len(items) for name, items in splits.items()} == SIZES
    assert sum(item["task"] == "add_3term" for item in splits["pref_prompts"]) == 8  # weight 0.2 of 40


def test_splits_are_disjoint_by_question_and_expression(splits):
    tasks.check_disjoint(splits)
    questions = [tasks.normalize_question(i["question"]) for items in splits.values() for i in items]
    assert len(questions) == len(set(questions)) == sum(SIZES.values())
    ids = [i["id"] for items in splits.values() for i in items]
    assert len(ids) == len(set(ids))


def test_check_disjoint_catches_repeats():
    a = {"question": "Calculate 1 + 2.", "metadata": {"expression": "1 + 2"}}
    with pytest.raises(ValueError, match="repeated"):
        tasks.check_disjoint({"sft_train": [a], "eval": [dict(a, question="  calculate 1 +  2. ")]})
    other_text_same_problem = {"question": "What is 1+2?", "metadata": {"expression": "1+2"}}
    with pytest.raises(ValueError, match="repeated"):
        tasks.check_disjoint({"sft_train": [a], "eval": [other_text_same_problem]})


def test_splits_are_deterministic_per_seed(splits):
    assert tasks.build_splits(sizes=SIZES, seed=0) == splits
    assert tasks.build_splits(sizes=SIZES, seed=1)["eval"] != splits["eval"]


def test_items_are_json_safe_and_round_trip(splits, tmp_path):
    paths = tasks.write_splits(splits, tmp_path)
    assert tasks.read_split(paths["eval"]) == splits["eval"]


def test_checker_right_and_wrong(splits):
    for item in splits["eval"]:
        answer = item["answer"]
        assert tasks.score(item, answer) == 1.0
        assert tasks.score(item, f"{item['metadata']['expression']} = {answer}") == 1.0
        assert tasks.score(item, str(int(answer) + 1)) == 0.0
        assert tasks.score(item, "I don't know") == 0.0
        assert tasks.score(item, "") == 0.0
    item = dict(splits["eval"][0], answer="5")
    assert tasks.score(item, "15") == 0.0  # reasoning-gym's substring credit (0.5) is snapped to 0 for numbers
    item = dict(splits["eval"][0], answer="1000")
    assert tasks.score(item, "The answer is 1,000.") == 1.0
    assert tasks.score(item, "1000.0") == 1.0


def test_sft_target_scores_full_and_is_short(splits):
    for item in splits["sft_train"]:
        target = tasks.sft_target(item)
        assert tasks.score(item, target) == 1.0
        assert target.endswith(item["answer"]) and len(target) < 24
        assert tasks.sft_target(item, style="answer") == item["answer"]


def test_prompt_shape():
    messages = tasks.make_prompt("Calculate 2 + 3.")
    assert messages == [
        {"role": "system", "content": tasks.SYSTEM_PROMPT},
        {"role": "user", "content": "Calculate 2 + 3.\nAnswer with only the final number."},
    ]
    assert [m["role"] for m in tasks.make_prompt("Q", system_prompt=None)] == ["user"]


def test_answer_extraction_edge_cases():
    assert extract_last_number("5 + 12 = 17") == "17"
    assert extract_last_number("It is -7.") == "-7"
    assert extract_last_number("10-3") == "3"  # a minus between numbers is an operator, not a sign
    assert extract_last_number("1,234 apples") == "1234"
    assert extract_last_number("no digits") is None
    assert canonical_number("+007.0") == "7"
    assert process_results_exact_match({"answer": "63"}, ["34 + 29 = 63"]) == {"exact_match": 1.0}
    assert process_results_exact_match({"answer": "63"}, ["73"]) == {"exact_match": 0.0}


def test_other_reasoning_gym_tasks_and_aliases():
    spec = {
        "products": {"weight": 1, "config": {"min_digits": 1, "max_digits": 1}},
        "add_again": {"dataset": "chain_sum", "weight": 1, "config": {"min_terms": 2, "max_terms": 2}},
    }
    out = tasks.build_splits(spec, {"eval": 10}, seed=0)
    assert {i["task"] for i in out["eval"]} == {"products", "add_again"}
    for item in out["eval"]:
        assert tasks.score(item, item["answer"]) == 1.0


def test_bad_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        tasks.build_splits({"nope": {"weight": 1}}, {"eval": 1})
    with pytest.raises(ValueError, match="weight"):
        tasks.build_splits({"products": {"weight": 0}}, {"eval": 1})
    with pytest.raises(ValueError, match="config is invalid"):
        tasks.build_splits({"products": {"config": {"min_digits": 3, "max_digits": 1}}}, {"eval": 1})
    with pytest.raises(ValueError, match="unknown split"):
        tasks.build_splits(None, {"train": 1})
    # products with one-digit operands has only 100 distinct questions
    with pytest.raises(ValueError, match="distinct questions"):
        tasks.build_splits({"products": {"config": {"min_digits": 1, "max_digits": 1}}}, {"sft_train": 150})
