"""dpoflow.data (sources, human_labels, feedback): SFT rows, prompts, Argilla / Label Studio exports, production
feedback, splits, examples."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dpoflow.data.feedback import feedback_pairs
from dpoflow.data.formats import load_pairs
from dpoflow.data.human_labels import load_argilla, load_label_studio
from dpoflow.data.pairs import DataFormatError, pair_id
from dpoflow.data.prompts import prompt_of, sft_rows
from dpoflow.data.rows import PREVIEW_CHARS, quarantine_preview
from dpoflow.data.sources import load_prompts, load_sft_rows, split_rows
from dpoflow.data.tasks import SYSTEM_PROMPT, build_splits, normalize_question, sft_row
from dpoflow.pipeline import prepare
from dpoflow.runtime.errors import UserError
from dpoflow.runtime.params import parse_params
from tests.chat_rows import assistant, system, user, write_lines

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "chat" / "inputs"


def sha1_id(content) -> str:
    return hashlib.sha1(json.dumps(content).encode("utf-8")).hexdigest()[:16]


def reasons(load) -> list[tuple[str, str, str]]:
    return [(q["location"], q["field"], q["reason"]) for q in load.quarantined]


# ------------------------------------------------------------------------------------------------ SFT


def test_sft_formats_canonical_rows(tmp_path):
    chat = [system("Be brief."), user("Hi"), assistant("Hello!"), user("2+2?"), assistant("4")]
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {"messages": chat},  # mlx-lm chat, multi-turn
            {"prompt": "Capital of France?", "completion": "Paris."},  # mlx-lm / TRL standard
            {"prompt": [user("Sky colour?")], "completion": [assistant("Blue.")]},  # TRL conversational
            {"text": "Once upon a time."},  # mlx-lm text
            {"prompt": [user("Hi")], "completion": "Hey.", "id": "x", "source": "y"},  # canonical round trip
        ],
    )
    load = load_sft_rows(path)
    assert load.quarantined == [] and load.n_input == 5
    assert load.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load.rows[0] == {
        "id": sha1_id([chat[:-1], "4"]),
        "prompt": chat[:-1],
        "completion": "4",
        "source": f"{path}:1",
    }
    assert [(r["prompt"], r["completion"]) for r in load.rows[1:]] == [
        ([user("Capital of France?")], "Paris."),
        ([user("Sky colour?")], "Blue."),
        ([], "Once upon a time."),
        ([user("Hi")], "Hey."),
    ]
    assert load.rows[4]["source"] == f"{path}:5"
    assert load.summary() == {
        "origin": str(path),
        "fingerprint": load.fingerprint,
        "n_input": 5,
        "n_rows": 5,
        "n_quarantined": 0,
    }


def test_sft_system_prompt_only_where_missing(tmp_path):
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {"messages": [system("Own."), user("a"), assistant("b")]},
            {"prompt": "c", "completion": "d"},
            {"text": "e"},
        ],
    )
    rows = load_sft_rows(path, system_prompt="Default.").rows
    assert rows[0]["prompt"] == [system("Own."), user("a")]
    assert rows[1]["prompt"] == [system("Default."), user("c")]
    assert rows[2]["prompt"] == []


def test_sft_rows_put_the_system_prompt_first_as_prompt_of_does(tmp_path):
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {"messages": [system("Own."), user("a"), assistant("b")]},
            {"messages": [user("c"), assistant("d"), user("e"), assistant("f")]},
            {"text": "g"},
        ],
    )
    rows = load_sft_rows(path).rows
    trained = sft_rows(rows, "Default.")
    # before: a user's rows were trained without the system prompt Stages 2, 6 and 7 ask with
    assert trained[1]["prompt"] == [system("Default."), user("c"), assistant("d"), user("e")]
    assert trained[1]["prompt"] == prompt_of(rows[1], "Default.")
    assert trained[0] == rows[0] and trained[2] == rows[2]  # its own system turn; a text row has no chat prompt
    assert {k: v for k, v in trained[1].items() if k != "prompt"} == {k: v for k, v in rows[1].items() if k != "prompt"}
    assert sft_rows(rows, None) == rows and sft_rows(rows, "") == rows
    assert rows[1]["prompt"][0] == user("c")  # the split's rows are not changed in place


def test_sft_rows_of_the_embedded_task_are_unchanged():
    items = build_splits(sizes={"sft_train": 30, "sft_val": 10}, seed=0)
    for split in ("sft_train", "sft_val"):
        for system_prompt in (SYSTEM_PROMPT, None, "Other."):
            expected = [sft_row(item, system_prompt) for item in items[split]]  # what sft_rows always gave them
            assert json.dumps(sft_rows(items[split], system_prompt)) == json.dumps(expected)


BAD_SFT = [
    ({"messages": [{"role": "tool", "content": "x"}, assistant("y")]}, "messages[0].role", "unsupported role"),
    (
        {"messages": [user("q"), {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
        "messages[1].content",
        "wrong type",
    ),
    ({"messages": [user("q")]}, "messages", "invalid conversation"),
    ({"messages": [user("q"), assistant("  ")]}, "messages[1].content", "empty string"),
    ({"messages": [user("q"), system("s"), assistant("a")]}, "messages[1].role", "invalid conversation"),
    ({"messages": [assistant("a"), assistant("b")]}, "messages", "invalid conversation"),
    ({"messages": [{"role": "user"}, assistant("a")]}, "messages[0].content", "missing field"),
    ({"messages": "hi"}, "messages", "wrong type"),
    ({"messages": []}, "messages", "empty string"),
    ({"prompt": "q"}, "completion", "missing field"),
    ({"prompt": "q", "completion": None}, "completion", "missing field (null)"),
    ({"prompt": "q", "completion": 3}, "completion", "wrong type"),
    ({"prompt": " ", "completion": "a"}, "prompt", "empty string"),
    ({"prompt": [user("q")], "completion": [assistant("a"), assistant("b")]}, "completion", "invalid conversation"),
    ({"prompt": [assistant("q")], "completion": "a"}, "prompt", "invalid conversation"),
    ({"text": "   "}, "text", "empty string"),
    ('{"prompt": "\\ud800", "completion": "a"}', "prompt", "invalid UTF-8"),
    ([1, 2], "row", "not an object"),
    ('{"messages": [', "row", "broken JSON"),
    (b'{"text": "\xff"}', "row", "invalid UTF-8"),
    ({"question": "q"}, "row", "unknown row format"),
]


def test_sft_malformed_rows_quarantined_with_location(tmp_path):
    good = {"messages": [user("q"), assistant("a")]}
    path = write_lines(tmp_path / "sft.jsonl", [good, ""] + [row for row, _, _ in BAD_SFT])
    load = load_sft_rows(path)
    assert len(load.rows) == 1 and load.n_input == 1 + len(BAD_SFT)
    assert load.n_input == len(load.rows) + len(load.quarantined)
    for (location, field, reason), (_, want_field, want_reason), line in zip(
        reasons(load), BAD_SFT, range(3, 3 + len(BAD_SFT)), strict=True
    ):  # line 2 is blank: not a row
        assert (location, field) == (f"{path}:{line}", want_field), reason
        assert reason.startswith(want_reason), (field, reason)
        assert "\n" not in reason and len(reason) < 200
    assert all(set(q) == {"location", "field", "reason", "row"} for q in load.quarantined)
    assert all(set(q["row"]) == {"preview", "chars", "sha256"} for q in load.quarantined)


def test_quarantine_keeps_bounded_preview_and_sha256(tmp_path):
    foreign = "root:$6$" + "Ab1/" * 1250 + ":19000:0:99999:7:::"  # 5,000+ characters, not JSON
    long_role = {"messages": [{"role": "x" * 5000, "content": "c"}, assistant("a")]}
    path = write_lines(tmp_path / "sft.jsonl", [{"text": "ok"}, foreign, long_role])
    load = load_sft_rows(path)
    broken, bad_role = load.quarantined
    assert broken["location"] == f"{path}:2" and broken["reason"].startswith("broken JSON")
    stored = broken["row"]
    assert len(stored["preview"]) <= PREVIEW_CHARS <= 100
    assert stored["sha256"] == hashlib.sha256(foreign.encode()).hexdigest()
    assert stored["chars"] == len(foreign)
    assert len(json.dumps(broken)) < 400 and "Ab1/" * 30 not in json.dumps(broken)
    line = json.dumps(long_role).encode()
    assert bad_role["row"]["sha256"] == hashlib.sha256(line).hexdigest()
    assert len(json.dumps(bad_role)) < 500 and "x" * 100 not in json.dumps(bad_role)


def test_quarantine_preview_helper():
    assert quarantine_preview("short\nline") == {
        "preview": "short line",
        "chars": 10,
        "sha256": hashlib.sha256(b"short\nline").hexdigest(),
    }
    cut = quarantine_preview(b"\xff" + b"y" * 300)
    assert len(cut["preview"]) == PREVIEW_CHARS and cut["preview"].endswith("…")
    assert cut["sha256"] == hashlib.sha256(b"\xff" + b"y" * 300).hexdigest()
    assert quarantine_preview({"b": 1, "a": "\ud800"})["preview"] == '{"a": "\\ud800", "b": 1}'


def test_sft_parquet_input(tmp_path):
    rows = [
        {"messages": [user("q1"), assistant("a1")], "text": None, "prompt": None, "completion": None},
        {"messages": None, "text": "a document", "prompt": None, "completion": None},
        {"messages": [user("q3"), assistant("")], "text": None, "prompt": None, "completion": None},
        {"messages": None, "text": None, "prompt": "q4", "completion": "c4"},
    ]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    load = load_sft_rows(path)
    assert [(r["prompt"], r["completion"], r["source"]) for r in load.rows] == [
        ([user("q1")], "a1", f"{path}:1"),
        ([], "a document", f"{path}:2"),
        ([user("q4")], "c4", f"{path}:4"),
    ]
    (bad,) = load.quarantined
    assert (bad["location"], bad["field"]) == (f"{path}:3", "messages[1].content")
    raw = json.dumps(rows[2], ensure_ascii=False, sort_keys=True).encode()
    assert bad["row"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert load.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sft_saved_datasets_folder(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": ""}]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    load = load_sft_rows(folder)
    assert [(r["prompt"], r["completion"], r["source"]) for r in load.rows] == [([user("p1")], "c1", f"{folder}:1")]
    assert reasons(load) == [(f"{folder}:2", "completion", "empty string")]
    assert load.fingerprint == datasets.load_from_disk(str(folder))._fingerprint != ""

    both = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "validation": datasets.Dataset.from_list([{"text": "t"}])}
    ).save_to_disk(str(both))
    with pytest.raises(DataFormatError, match="pass split=; the dataset has splits train, validation"):
        load_sft_rows(both)
    val = load_sft_rows(both, split="validation")
    assert val.rows[0]["source"] == f"{both}[validation]:1"


def test_whole_input_errors_are_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "folder").mkdir()
    pairs = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    broken_array = tmp_path / "tasks.json"
    broken_array.write_text('[\n  {"text": "a"},\n  {"text": "b",\n]\n')
    cases = [
        (tmp_path / "missing.jsonl", "not found"),
        (tmp_path / "empty.jsonl", "no rows"),
        (tmp_path / "data.csv", "unsupported file type '.csv'"),
        (tmp_path / "folder", "not a saved datasets folder"),
        (pairs, "no row is an SFT example"),
        (broken_array, f"{broken_array}:4: file: broken JSON"),
        ("hf:someorg/not-a-dataset", "hf:someorg/not-a-dataset[train]: dataset: cannot load it from the Hugging"),
        ("someorg/not-a-dataset:test", "no such local path, and cannot load it"),
    ]
    for spec, message in cases:
        with pytest.raises(DataFormatError) as info:
            load_sft_rows(spec)
        assert message in str(info.value), str(info.value)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ prompts


def test_prompts_canonical_rows(tmp_path):
    path = write_lines(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "What is 2+2?", "category": "math", "answer": 4},
            {"prompt": [system("S"), user("Hi")], "reference": "Hello"},
            {"messages": [user("Tell a joke")], "task": "humour"},
            {"question": "Calculate 3 + 4.", "task": "add_2term", "answer": "7", "metadata": {}},
            {"prompt": [user("q"), assistant("a")]},
            {"prompt": "q", "category": 3},
            {"prompt": "  "},
            {"prompt": "q", "reference": True},
        ],
    )
    load = load_prompts(path)
    assert load.rows[0] == {
        "id": sha1_id([user("What is 2+2?")]),
        "prompt": [user("What is 2+2?")],
        "category": "math",
        "reference": "4",
        "source": f"{path}:1",
    }
    assert [(r["prompt"], r["category"], r["reference"]) for r in load.rows[1:]] == [
        ([system("S"), user("Hi")], None, "Hello"),
        ([user("Tell a joke")], "humour", None),
        ([user("Calculate 3 + 4.")], "add_2term", "7"),
    ]
    assert [(f, r.split(":")[0]) for _, f, r in reasons(load)] == [
        ("prompt", "invalid conversation"),
        ("category", "wrong type"),
        ("prompt", "empty string"),
        ("reference", "wrong type"),
    ]
    assert load.n_input == 8 == len(load.rows) + len(load.quarantined)
    with_system = load_prompts(path, system_prompt="Default.").rows
    assert with_system[0]["prompt"] == [system("Default."), user("What is 2+2?")]
    assert with_system[1]["prompt"][0] == system("S")


# ------------------------------------------------------------------------------------------------ Argilla


def argilla_flat(prompt, r1, r2, values, statuses=None, **extra):
    """An Argilla 2.x flat record (records.to_list(flatten=True)) with a ranking question `preference`."""
    row = {
        "id": "rec",
        "status": "completed",
        "_server_id": "srv",
        "prompt": prompt,
        "response1": r1,
        "response2": r2,
        "preference.responses": values,
        "preference.responses.users": None if values is None else [f"u{i}" for i in range(len(values))],
        "preference.responses.status": None if values is None else (statuses or ["submitted"] * len(values)),
    }
    row.update(extra)
    return row


def test_argilla_v2_flat_ranking(tmp_path):
    first, second = ["response1", "response2"], ["response2", "response1"]
    path = write_lines(
        tmp_path / "argilla.jsonl",
        [
            argilla_flat("Name a prime.", "8", "7", [second, second]),  # agreement
            argilla_flat("Capital of Peru?", "Lima", "Quito", [first, first, second]),  # 2 vs 1: majority
            argilla_flat("Best pet?", "Cat", "Dog", [first, second]),  # 1 vs 1: conflict
            argilla_flat("Hi?", "Hello", "Go away", [first], ["discarded"]),  # skipped
            argilla_flat("Bye?", "Bye!", "No", None),  # nobody answered
            argilla_flat("Sum 2+2?", "4", "5", [first, second], ["submitted", "draft"]),  # the draft does not count
            argilla_flat("Same?", "x", "x ", [first]),  # identical responses
        ],
    )
    load = load_argilla(path)
    assert load.pairs[0] == {
        "id": pair_id([user("Name a prime.")], "7", "8"),
        "prompt": [user("Name a prime.")],
        "chosen": "7",
        "rejected": "8",
        "score_chosen": None,
        "score_rejected": None,
        "task": None,
        "source": f"argilla:{path}:1",
    }
    assert [(p["chosen"], p["rejected"]) for p in load.pairs[1:]] == [("Lima", "Quito"), ("4", "5")]
    assert load.locations == [f"{path}:1", f"{path}:2", f"{path}:6"]
    assert [(loc.rsplit(":", 1)[1], f, r.split(":")[0]) for loc, f, r in reasons(load)] == [
        ("3", "preference", "conflict"),
        ("4", "preference", "skipped"),
        ("5", "preference", "missing annotation"),
        ("7", "response2", "chosen == rejected (identical responses)"),
    ]
    assert load.n_input == 7 and load.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()


def test_argilla_label_question_tie_and_question_detection(tmp_path):
    def row(values):
        return {
            "prompt": "Pick one",
            "response1": "A",
            "response2": "B",
            "preference.responses": values,
            "preference.responses.status": ["submitted"] * len(values),
            "rationale.responses": ["because"],
            "rationale.responses.status": ["submitted"],
        }

    path = write_lines(tmp_path / "labels.jsonl", [row(["response2"]), row(["tie"]), row(["response3"])])
    load = load_argilla(path)
    assert [(p["chosen"], p["rejected"]) for p in load.pairs] == [("B", "A")]
    assert [(f, r.split(":")[0]) for _, f, r in reasons(load)] == [("preference", "tie"), ("responses", "ambiguous")]
    explicit = load_argilla(path, question="preference")
    assert [(f, r) for _, f, r in reasons(explicit)][1] == (
        "preference[0]",
        "wrong value: label 'response3' names no response field (response1, response2)",
    )


def test_argilla_v2_nested_json_array_and_three_responses(tmp_path):
    records = [
        {
            "id": "a",
            "fields": {"instruction": "Say hi", "response1": "hi", "response2": "yo", "response3": "..."},
            "metadata": {"category": "greeting"},
            "responses": {
                "preference": [
                    {"value": ["response1", "response2", "response3"], "user_id": "u1", "status": "submitted"},
                    {"value": ["response2", "response1", "response3"], "user_id": "u2", "status": "submitted"},
                    {"value": ["response1", "response3", "response2"], "user_id": "u3", "status": "submitted"},
                ]
            },
        },
        {
            "id": "b",
            "fields": {"instruction": "Say bye", "response1": "bye", "response2": "no"},
            "responses": {"preference": []},
        },
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records, indent=2))
    load = load_argilla(path)
    (pair,) = load.pairs  # mean ranks: response1 1.33, response2 2.0, response3 2.67
    assert (pair["prompt"], pair["chosen"], pair["rejected"], pair["task"]) == (
        [user("Say hi")],
        "hi",
        "...",
        "greeting",
    )
    starts = [n for n, text in enumerate(path.read_text().split("\n"), start=1) if text == "  {"]
    assert load.locations == [f"{path}:{starts[0]}"] and starts[0] == 2
    second_line = starts[1]
    assert reasons(load) == [(f"{path}:{second_line}", "preference", "missing annotation: no response")]


def test_argilla_v1_feedback_dataset_export(tmp_path):
    def row(prompt, responses):
        return {
            "prompt": prompt,
            "response1": "one",
            "response2": "two",
            "preference": responses,
            "preference-suggestion": None,
            "preference-suggestion-metadata": {"type": None},
            "external_id": None,
            "metadata": "{}",
        }

    ranked = [{"rank": 2, "value": "response1"}, {"rank": 1, "value": "response2"}]
    path = write_lines(
        tmp_path / "v1.jsonl",
        [
            row("q1", [{"user_id": "u1", "value": ranked, "status": "submitted"}]),
            row(
                "q2",
                {
                    "user_id": ["u1"],
                    "value": [{"rank": [1, 2], "value": ["response1", "response2"]}],
                    "status": ["submitted"],
                },
            ),  # read back through datasets
            row(
                "q3",
                [
                    {
                        "user_id": "u1",
                        "value": [{"rank": 1, "value": "response1"}, {"rank": 1, "value": "response2"}],
                        "status": "submitted",
                    }
                ],
            ),  # equal ranks
            row("q4", []),
        ],
    )
    load = load_argilla(path)
    assert [(p["prompt"][0]["content"], p["chosen"]) for p in load.pairs] == [("q1", "two"), ("q2", "one")]
    assert [(f, r.split(":")[0]) for _, f, r in reasons(load)] == [
        ("preference", "tie"),
        ("preference", "missing annotation"),
    ]


# ------------------------------------------------------------------------------------------------ Label Studio


def ls_task(task_id, selections, data=None, cancelled=(), result=None):
    annotations = []
    for i, selected in enumerate(selections):
        annotations.append(
            {
                "id": 100 * task_id + i,
                "completed_by": i + 1,
                "was_cancelled": i in cancelled,
                "ground_truth": False,
                "result": []
                if selected is None
                else (
                    result
                    or [
                        {
                            "id": "r",
                            "from_name": "comparison",
                            "to_name": "answer1,answer2",
                            "type": "pairwise",
                            "origin": "manual",
                            "value": {"selected": selected},
                        }
                    ]
                ),
            }
        )
    return {
        "id": task_id,
        "data": data or {"prompt": f"Prompt {task_id}", "answer1": f"left {task_id}", "answer2": f"right {task_id}"},
        "annotations": annotations,
        "predictions": [],
        "meta": {},
        "inner_id": task_id,
    }


def test_label_studio_pairwise_export(tmp_path):
    tasks = [
        ls_task(1, ["left"]),
        ls_task(2, ["right", "right", "left"]),
        ls_task(3, ["left", "right"]),  # conflict
        ls_task(4, ["left"], cancelled={0}),  # skipped
        ls_task(5, []),  # no annotations
        ls_task(6, [None]),  # an annotation without a choice
        ls_task(7, ["middle"]),  # wrong value
        ls_task(8, ["right"], data={"prompt": [system("S"), user("Q8")], "text1": "t1", "text2": "t2"}),
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks, indent=2))
    lines = [n for n, text in enumerate(path.read_text().split("\n"), start=1) if text == "  {"]
    load = load_label_studio(path)
    assert load.pairs[0] == {
        "id": pair_id([user("Prompt 1")], "left 1", "right 1"),
        "prompt": [user("Prompt 1")],
        "chosen": "left 1",
        "rejected": "right 1",
        "score_chosen": None,
        "score_rejected": None,
        "task": None,
        "source": f"label_studio:{path}:{lines[0]}",
    }
    assert [(p["chosen"], p["rejected"]) for p in load.pairs[1:]] == [("right 2", "left 2"), ("t2", "t1")]
    assert load.pairs[2]["prompt"] == [system("S"), user("Q8")]
    assert load.locations == [f"{path}:{lines[i]}" for i in (0, 1, 7)]
    assert [(loc, f, r.split(":")[0]) for loc, f, r in reasons(load)] == [
        (f"{path}:{lines[2]}", "annotations", "conflict"),
        (f"{path}:{lines[3]}", "annotations", "skipped"),
        (f"{path}:{lines[4]}", "annotations", "missing annotation"),
        (f"{path}:{lines[5]}", "annotations", "missing annotation"),
        (f"{path}:{lines[6]}", "annotations[0].result", "wrong value"),
    ]
    assert "1 left vs 1 right" in load.quarantined[0]["reason"]
    assert load.n_input == 8 == len(load.pairs) + len(load.quarantined)


def test_label_studio_jsonl_and_from_name(tmp_path):
    two_controls = [
        {"from_name": "helpful", "type": "pairwise", "value": {"selected": "left"}},
        {"from_name": "harmless", "type": "pairwise", "value": {"selected": "right"}},
    ]
    path = write_lines(tmp_path / "tasks.jsonl", [ls_task(1, ["x"], result=two_controls)])
    assert load_label_studio(path).quarantined[0]["reason"].startswith("ambiguous")
    assert load_label_studio(path, from_name="harmless").pairs[0]["chosen"] == "right 1"


# ------------------------------------------------------------------------------------------------ feedback


def test_feedback_pairs_grouping_thumbs_ratings_ties(tmp_path):
    path = write_lines(
        tmp_path / "feedback.jsonl",
        [
            {"prompt": "Reset password?", "response": "Use the link.", "thumbs": "up", "session_id": "s1"},
            {"prompt": "  reset   PASSWORD? ", "response": "No idea.", "thumbs": "DOWN"},  # same prompt, normalized
            {"prompt": [user("Reset password?")], "response": "Use the link. ", "thumbs": True},  # duplicate
            {"prompt": "Hours?", "response": "9 to 5.", "rating": 5},
            {"prompt": "Hours?", "response": "Sometimes.", "rating": 1},
            {"prompt": "Hours?", "response": "Weekdays.", "rating": 3},
            {"prompt": "Only one", "response": "single", "rating": 4},  # one response: unpaired
            {"prompt": "Equal", "response": "e1", "rating": 4},
            {"prompt": "Equal", "response": "e2", "rating": 4},  # all equal: unpaired
            {"prompt": "Avg", "response": "a", "rating": 5},
            {"prompt": "Avg", "response": "b", "rating": 4},
            {"prompt": "Avg", "response": "a", "rating": 1},  # a averages to 0.5
            {"prompt": "Bad", "response": "", "rating": 3},
            {"prompt": "Bad", "response": "r", "rating": "five"},
            {"prompt": "Bad", "response": "r", "thumbs": "meh"},
            {"prompt": "Bad", "response": "r"},
            {"prompt": [user("q"), assistant("a")], "response": "r", "rating": 2},
        ],
    )
    load = feedback_pairs(path)
    assert load.rating_scale == (1, 5)
    assert load.pairs[0] == {
        "id": pair_id([user("Reset password?")], "Use the link.", "No idea."),
        "prompt": [user("Reset password?")],
        "chosen": "Use the link.",
        "rejected": "No idea.",
        "score_chosen": 1.0,
        "score_rejected": 0.0,
        "task": None,
        "source": f"feedback:{path}:1",
    }
    assert [(p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"]) for p in load.pairs[1:]] == [
        ("9 to 5.", "Sometimes.", 1.0, 0.0),
        ("b", "a", 0.75, 0.5),
    ]
    assert load.locations == [f"{path}:1", f"{path}:4", f"{path}:11"]
    assert (load.n_input, load.n_accepted, len(load.quarantined)) == (17, 12, 5)
    assert (load.n_prompts, load.n_unpaired_prompts, load.n_duplicate_responses) == (5, 2, 2)
    assert [(f, r.split(":")[0]) for _, f, r in reasons(load)] == [
        ("response", "empty string"),
        ("rating", "wrong type"),
        ("thumbs", "wrong value"),
        ("rating", "missing field"),
        ("prompt", "invalid conversation"),
    ]


def test_feedback_declared_scale(tmp_path):
    path = write_lines(
        tmp_path / "feedback.jsonl",
        [
            {"prompt": "q", "response": "good", "rating": 10},
            {"prompt": "q", "response": "ok", "rating": 4},
            {"prompt": "q", "response": "huh", "rating": 11},
        ],
    )
    load = feedback_pairs(path, rating_scale=(1, 10))
    (pair,) = load.pairs
    assert (pair["score_chosen"], pair["score_rejected"]) == (1.0, 3 / 9)
    assert reasons(load) == [(f"{path}:3", "rating", "rating out of range: 11 is outside 1-10")]


# ------------------------------------------------------------------------------------------------ splits


def test_split_rows_deterministic_and_disjoint():
    rows = [{"prompt": [user(f"question {i % 150}")], "completion": f"c{i}"} for i in range(300)]
    rows += [{"prompt": [], "completion": f"document {i}"} for i in range(100)]
    kept, held = split_rows(rows, 0.2, seed=7)
    assert (kept, held) == split_rows(rows, 0.2, seed=7)
    assert len(kept) + len(held) == len(rows)
    assert {id(r) for r in kept}.isdisjoint(id(r) for r in held)

    def key(r):
        return json.dumps(r["prompt"]) if r["prompt"] else r["completion"]

    assert {key(r) for r in kept}.isdisjoint(key(r) for r in held)  # a prompt never lands on both sides
    assert 0.1 < len(held) / len(rows) < 0.3
    assert any(not r["prompt"] for r in held) and any(not r["prompt"] for r in kept)
    assert split_rows(rows, 0.2, seed=8) != (kept, held)
    assert split_rows(rows, 0.0, seed=7) == (rows, [])
    assert split_rows(rows, 1.0, seed=7) == ([], rows)
    assert kept == [r for r in rows if r in kept]  # order kept
    with pytest.raises(ValueError):
        split_rows(rows, 1.5, seed=0)


def files_params(tmp_path, monkeypatch, kl_prompts: int):
    """Params of data.source files on 10 SFT rows, 60 prompts (a seeded tenth held out) and 10 eval prompts."""
    inputs = tmp_path / "inputs"
    for kind in ("sft", "prompts", "eval"):
        (inputs / kind).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the params name inputs/... relative to the project
    write_lines(inputs / "sft" / "sft.jsonl", [{"prompt": f"Say {i}", "completion": str(i)} for i in range(10)])
    write_lines(inputs / "prompts" / "prompts.jsonl", [{"prompt": f"Sum of {i} and {i + 1}"} for i in range(60)])
    write_lines(inputs / "eval" / "eval.jsonl", [{"prompt": f"zebra {i} quokka"} for i in range(10)])
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"].update(
        source="files",
        sft="inputs/sft/sft.jsonl",
        prompts="inputs/prompts/prompts.jsonl",
        eval_prompts="inputs/eval/eval.jsonl",
    )
    raw["benchmarks"]["tasks"] = ["dpoflow_text_cloze"]
    raw["init"]["kl_prompts"] = kl_prompts
    return parse_params(raw)


def test_prepare_stops_when_the_heldout_prompts_are_fewer_than_the_kl_prompts(tmp_path, monkeypatch):
    n_heldout = len(prepare.from_files(files_params(tmp_path, monkeypatch, 1)).splits["heldout"])
    assert 1 <= n_heldout < 32
    # before: prepare_data passed, SFT and Stage 2 ran, then Stage 3 stopped with a ValueError traceback
    message = (
        rf"^init\.kl_prompts: 32 held-out prompts are needed for the KL measurements, but data\.prompts gives "
        rf"{n_heldout} \(data\.fractions\.heldout 0\.1, after screening\); set init\.kl_prompts to at most {n_heldout}"
    )
    with pytest.raises(UserError, match=message):
        prepare.from_files(files_params(tmp_path / "again", monkeypatch, 32))
    assert (
        len(prepare.from_files(files_params(tmp_path / "exact", monkeypatch, n_heldout)).splits["heldout"]) == n_heldout
    )


# ------------------------------------------------------------------------------------------------ examples


def test_example_files_load_cleanly():
    sft = load_sft_rows(EXAMPLES / "sft" / "chat.jsonl")
    prompts = load_prompts(EXAMPLES / "prompts" / "prompts.jsonl")
    evals = load_prompts(EXAMPLES / "eval" / "eval_prompts.jsonl")
    hh = load_pairs(EXAMPLES / "labels" / "preferences_hh.jsonl", fmt="hh")
    feedback = feedback_pairs(EXAMPLES / "labels" / "feedback.jsonl")
    for load in (sft, prompts, evals, hh, feedback):
        assert load.quarantined == []
    assert 40 <= len(sft.rows) <= 80 and 40 <= len(prompts.rows) <= 80 and 40 <= len(evals.rows) <= 80
    assert 40 <= len(hh.pairs) <= 80 and len(feedback.pairs) >= 8
    assert any(sum(m["role"] == "assistant" for m in r["prompt"]) for r in sft.rows)  # multi-turn
    assert any(r["prompt"][0]["role"] == "system" for r in sft.rows)
    assert any(len(p["prompt"]) > 1 for p in hh.pairs)
    assert {r["category"] for r in evals.rows} == {r["category"] for r in prompts.rows}
    assert all(r["reference"] for r in evals.rows if r["category"] in ("math", "factual"))

    def texts(rows):
        return {normalize_question(m["content"]) for r in rows for m in r["prompt"] if m["role"] == "user"}

    eval_texts = texts(evals.rows)
    assert eval_texts.isdisjoint(texts(prompts.rows) | texts(sft.rows) | texts(hh.pairs))
