"""The judges that need no verifier (llm, python:<module>:<function>), the verifier on a user's `reference`, the
import judge on annotation-tool exports, and the params that pick a judge per stage."""

from __future__ import annotations

import json

import pytest

from dpoflow.data import judges, tasks
from dpoflow.data.judges import JudgeError, LlmJudge, make_judge
from dpoflow.data.prompts import prompt_of
from dpoflow.modeling.loading import load_model
from dpoflow.runtime.params import CHIPS, ParamsError, parse_params

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def base(**overrides):
    raw = {"batch_size": dict.fromkeys(CHIPS, 4)}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return parse_params(raw)


def test_verifier_checks_a_users_reference_answer():
    judge = make_judge("verifier")
    row = {"id": "r1", "prompt": PROMPT, "reference": "5"}
    assert judge.score([row], [PROMPT], [["It is 5.", "6", "five"]]) == [[1.0, 0.0, 0.0]]
    with pytest.raises(JudgeError, match="needs a reference answer"):
        judge.score([{"id": "r2", "prompt": PROMPT}], [PROMPT], [["5"]])


def test_python_judge_imports_the_users_function_and_checks_its_range(tmp_path):
    (tmp_path / "my_judge.py").write_text(
        "def polite(prompt, response, item):\n"
        "    return 1.0 if 'please' in response.lower() else 0.0\n"
        "def broken(prompt, response, item):\n"
        "    return 2.0\n"
    )
    judge = make_judge("python:my_judge:polite", python_path=tmp_path)
    assert judge.score([None], [PROMPT], [["Please wait", "no"]]) == [[1.0, 0.0]]
    with pytest.raises(JudgeError, match=r"expected a number in \[0, 1\]"):
        make_judge("python:my_judge:broken", python_path=tmp_path).score([None], [PROMPT], [["x"]])
    with pytest.raises(JudgeError, match="does not import"):
        make_judge("python:no_such_module:f", python_path=tmp_path)
    with pytest.raises(JudgeError, match="is not a function"):
        make_judge("python:my_judge:missing", python_path=tmp_path)


def test_llm_judge_counts_position_bias_as_ties(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    judge = LlmJudge(model, tokenizer, batch_size=3)
    scores = judge.score([None, None], [PROMPT, PROMPT], [["5", "6", "seven"], ["a", "b"]])
    assert [len(s) for s in scores] == [3, 2] and all(0.0 <= x <= 1.0 for s in scores for x in s)
    assert judge.comparisons == 3 + 1 and 0.0 <= judge.position_bias_rate <= 1.0

    # a judge that always answers "A" (pure position bias): every pair is a tie, bias rate 1
    judge.prefers_a = lambda requests: [True] * len(requests)
    judge.comparisons = judge.inconsistent = 0
    assert judge.score([None], [PROMPT], [["x", "y", "z"]]) == [[0.5, 0.5, 0.5]]
    assert judge.position_bias_rate == 1.0

    # a judge that prefers the longer response whichever slot it is in: consistent, no bias
    judge.prefers_a = lambda requests: [len(a) > len(b) for _, a, b in requests]
    judge.comparisons = judge.inconsistent = 0
    assert judge.score([None], [PROMPT], [["xx", "x", "xxx"]]) == [[0.5, 0.0, 1.0]]
    assert judge.position_bias_rate == 0.0
    with pytest.raises(JudgeError, match="template lacks"):
        LlmJudge(model, tokenizer, template="Which is better? {prompt}")


def test_the_prompt_of_a_users_row_and_of_a_task_item():
    row = {"id": "r", "prompt": [{"role": "user", "content": "Hi"}]}
    assert prompt_of(row, "Be brief.") == [{"role": "system", "content": "Be brief."}, row["prompt"][0]]
    with_system = {"id": "s", "prompt": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]}
    assert prompt_of(with_system, "Be brief.") == with_system["prompt"]
    item = {"id": "t", "task": "basic_arithmetic", "question": "1 + 1 =", "answer": "2"}
    assert prompt_of(item, "S") == tasks.item_prompt(item, "S")


def test_import_judge_reads_annotation_exports_and_feedback(tmp_path):
    path = tmp_path / "feedback.jsonl"
    rows = [
        {"prompt": "Name a fruit.", "response": "Apple.", "thumbs": "up"},
        {"prompt": "Name a fruit.", "response": "Chair.", "thumbs": "down"},
        {"prompt": "Say hi.", "response": "Hi!", "rating": 5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = make_judge("import", import_path=str(path), import_format="feedback")
    loaded = judge.load()
    assert [(p["chosen"], p["rejected"]) for p in loaded.pairs] == [("Apple.", "Chair.")]
    assert judge.info["n_rows"] == 3 and judge.info["n_unpaired_prompts"] == 1
    assert loaded.n_input == len(loaded.pairs) + len(loaded.quarantined)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"preference__judge": "llm"}, "judges.model"),
        ({"iterate__judge": "llm"}, "judges.model"),
        ({"preference__judge": "reward_model"}, "judges.reward_model"),
        ({"preference__judge": "import"}, "preference.import_path"),
        ({"evaluate__judge": "import"}, "evaluate.judge"),
        ({"preference__judge": "python:oops"}, "preference.judge"),
        ({"data__source": "files"}, "data.sft"),
        ({"data__sft": "inputs/sft/x.jsonl"}, "data.sft"),
        (
            {"data__source": "files", "data__sft": "elsewhere/x.jsonl", "data__prompts": "inputs/prompts/p.jsonl"},
            "data.sft",
        ),
        (
            {
                "data__source": "files",
                "data__sft": "inputs/sft/x.jsonl",
                "data__prompts": "inputs/prompts/p.jsonl",
                "benchmarks__tasks": ["dpoflow_task_gen"],
            },
            "benchmarks.tasks",
        ),
    ],
)
def test_inconsistent_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        base(**overrides)


def test_stage_judges_default_to_the_stage2_judge_or_the_reward_model_after_an_import():
    p = base(preference__judge="import", preference__import_path="inputs/labels/pairs.jsonl")
    assert p.stage_judge("iterate") == p.stage_judge("evaluate") == "reward_model"
    p = base(preference__judge="python:judge:score")
    assert p.stage_judge("evaluate") == "python:judge:score"
    p = base(evaluate__judge="verifier")
    assert p.stage_judge("evaluate") == "verifier" and p.stage_judge("iterate") == "verifier"
    assert judges.make_judge("verifier").name == "verifier"
