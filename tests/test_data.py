"""dpoflow.data.pairs: import formats, quarantine reasons, canonical Parquet/JSONL round trip."""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpoflow.data.formats import convert_rows, load_pairs, read_pairs
from dpoflow.data.pairs import (
    PAIR_SCHEMA,
    PREVIEW_CHARS,
    DataFormatError,
    LoadResult,
    make_pair,
    pair_id,
    prompt_text,
    write_pairs,
    write_quarantine,
)
from dpoflow.data.validation import validate_dpo_pairs
from tests.chat_rows import assistant, user, write_lines


def load_one(tmp_path: Path, row, **kwargs) -> LoadResult:
    return load_pairs(write_lines(tmp_path / "pairs.jsonl", [row]), **kwargs)


def only_pair(result: LoadResult) -> dict:
    assert result.quarantined == [], result.quarantined
    assert len(result.pairs) == 1
    return result.pairs[0]


def only_quarantined(result: LoadResult) -> dict:
    assert result.pairs == []
    assert len(result.quarantined) == 1
    return result.quarantined[0]


# ---------------------------------------------------------------------------------------------- formats


def test_plain_format(tmp_path):
    pair = only_pair(load_one(tmp_path, {"prompt": "2+2?", "chosen": "4", "rejected": "5"}))
    assert pair["prompt"] == [user("2+2?")]
    assert (pair["chosen"], pair["rejected"]) == ("4", "5")
    assert pair["score_chosen"] is None and pair["score_rejected"] is None
    assert pair["id"] == pair_id(pair["prompt"], "4", "5")
    assert pair["source"] == f"import:{tmp_path / 'pairs.jsonl'}:1"
    assert pair["task"] is None


def test_plain_format_with_unit_scores_and_task(tmp_path):
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 0.9, "score_rejected": 0.25, "task": "t"}
    pair = only_pair(load_one(tmp_path, row))
    assert (pair["score_chosen"], pair["score_rejected"], pair["task"]) == (0.9, 0.25, "t")


def test_trl_explicit_prompt(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "be brief"}, user("hi")],
        "chosen": [assistant("hello")],
        "rejected": [assistant("go away")],
    }
    pair = only_pair(load_one(tmp_path, row))
    assert pair["prompt"] == [{"role": "system", "content": "be brief"}, user("hi")]
    assert (pair["chosen"], pair["rejected"]) == ("hello", "go away")


def test_trl_implicit_prompt_moves_shared_prefix(tmp_path):
    history = [user("hi"), assistant("hello"), user("what is 2+2?")]
    row = {"chosen": history + [assistant("4")], "rejected": history + [assistant("5")]}
    pair = only_pair(load_one(tmp_path, row))
    assert pair["prompt"] == history
    assert (pair["chosen"], pair["rejected"]) == ("4", "5")


def test_trl_explicit_prompt_plus_shared_history(tmp_path):
    row = {
        "prompt": [user("hi")],
        "chosen": [assistant("hello"), user("2+2?"), assistant("4")],
        "rejected": [assistant("hello"), user("2+2?"), assistant("5")],
    }
    pair = only_pair(load_one(tmp_path, row))
    assert pair["prompt"] == [user("hi"), assistant("hello"), user("2+2?")]


def test_ultrafeedback_binarized_scores_normalized(tmp_path):
    row = {
        "prompt": "Name a color.",
        "prompt_id": "abc",
        "chosen": [user("Name a color."), assistant("Blue.")],
        "rejected": [user("Name a color."), assistant("Seven.")],
        "messages": [user("Name a color."), assistant("Blue.")],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    }
    pair = only_pair(load_one(tmp_path, row))
    assert pair["prompt"] == [user("Name a color.")]  # the user turn is not duplicated
    assert (pair["chosen"], pair["rejected"]) == ("Blue.", "Seven.")
    # inferred 1-10 scale: (s - 1) / 9
    assert pair["score_chosen"] == pytest.approx(7.5 / 9)
    assert pair["score_rejected"] == pytest.approx(2 / 9)


def test_score_scale_inferred_1_to_5_and_explicit(tmp_path):
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 2}
    pair = only_pair(load_one(tmp_path, row))
    assert (pair["score_chosen"], pair["score_rejected"]) == (1.0, 0.25)
    pair = only_pair(load_one(tmp_path, row, score_scale=10))
    assert pair["score_chosen"] == pytest.approx(4 / 9)


def test_score_out_of_range_is_quarantined(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 7, "score_rejected": 0},
        {"prompt": "q", "chosen": "a", "rejected": "c", "score_chosen": 42, "score_rejected": 1},
    ]
    result = load_pairs(write_lines(tmp_path / "p.jsonl", rows))
    assert [q["field"] for q in result.quarantined] == ["score_rejected", "score_chosen"]
    assert all(q["reason"].startswith("score out of range") for q in result.quarantined)
    result = load_pairs(write_lines(tmp_path / "p.jsonl", rows[:1]), score_scale=1)
    assert result.quarantined[0]["field"] == "score_chosen"


def test_hh_transcript(tmp_path):
    prefix = "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: Are you sure?\n\nAssistant:"
    row = {"chosen": prefix + " Yes, it is 4.", "rejected": prefix + " Yes, it is 5."}
    pair = only_pair(load_one(tmp_path, row))
    assert pair["prompt"] == [user("What is 2+2?"), assistant("4"), user("Are you sure?")]
    assert (pair["chosen"], pair["rejected"]) == ("Yes, it is 4.", "Yes, it is 5.")


def test_hh_without_leading_blank_lines(tmp_path):
    row = {"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: bye"}
    pair = only_pair(load_one(tmp_path, row, fmt="hh"))
    assert pair["prompt"] == [user("hi")]
    assert (pair["chosen"], pair["rejected"]) == ("hello", "bye")


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hey"}, "no shared"),
        (
            {"chosen": "preamble\n\nHuman: hi\n\nAssistant: a", "rejected": "preamble\n\nHuman: hi\n\nAssistant: b"},
            "text before",
        ),
        ({"chosen": "\n\nAssistant: a\n\nAssistant: x", "rejected": "\n\nAssistant: a\n\nAssistant: y"}, "first turn"),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            "further turns",
        ),
    ],
)
def test_hh_unparsable(tmp_path, row, reason):
    q = only_quarantined(load_one(tmp_path, row))
    assert q["reason"].startswith("unparsable HH transcript") and reason in q["reason"]


def test_canonical_rows_round_trip(tmp_path):
    pairs = [
        make_pair([user("q1")], "a", "b", 1.0, 0.0, task="arith", source="verifier"),
        make_pair([{"role": "system", "content": "s"}, user("q2")], "c", "d"),
    ]
    write_pairs(pairs, tmp_path / "pairs.parquet", tmp_path / "pairs.jsonl")
    assert pq.read_schema(tmp_path / "pairs.parquet").equals(PAIR_SCHEMA)
    assert read_pairs(tmp_path / "pairs.parquet") == pairs
    assert read_pairs(tmp_path / "pairs.jsonl") == pairs
    # a canonical file also loads through the importer, keeping its provenance
    result = load_pairs(tmp_path / "pairs.parquet")
    assert result.pairs == pairs
    assert result.locations == [f"{tmp_path / 'pairs.parquet'}:1", f"{tmp_path / 'pairs.parquet'}:2"]


def test_write_pairs_fills_missing_id_and_is_atomic(tmp_path):
    row = make_pair([user("q")], "a", "b")
    del row["id"]
    write_pairs([row], tmp_path / "out.parquet")
    assert read_pairs(tmp_path / "out.parquet")[0]["id"] == pair_id([user("q")], "a", "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]  # no temporary left behind


def test_parquet_import_locations_are_row_numbers(tmp_path):
    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "same", "rejected": "same"},
        {"prompt": "q3", "chosen": "a", "rejected": ""},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "plain.parquet")
    result = load_pairs(tmp_path / "plain.parquet")
    assert result.n_input == 3 and len(result.pairs) == 1
    assert [q["location"] for q in result.quarantined] == [
        f"{tmp_path / 'plain.parquet'}:2",
        f"{tmp_path / 'plain.parquet'}:3",
    ]


def test_parquet_ultrafeedback_nested_messages(tmp_path):
    rows = [
        {
            "prompt": "q",
            "chosen": [user("q"), assistant("good")],
            "rejected": [user("q"), assistant("bad")],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    pair = only_pair(load_pairs(tmp_path / "uf.parquet", fmt="ultrafeedback"))
    assert pair["prompt"] == [user("q")] and pair["score_chosen"] == pytest.approx(8 / 9)


def test_explicit_format_mismatch_is_quarantined(tmp_path):
    q = only_quarantined(load_one(tmp_path, {"prompt": "q", "chosen": "a", "rejected": "b"}, fmt="trl"))
    assert q["field"] == "prompt" and q["reason"].startswith("wrong type")


def test_convert_rows_in_memory():
    result = convert_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}, 7], origin="gen")
    assert len(result.pairs) == 1
    assert result.quarantined[0]["location"] == "gen:2"
    assert result.locations == ["gen:1"]


# ---------------------------------------------------------------------------------------------- quarantine


BAD_ROWS = [
    # (raw line or row, field, reason prefix)
    (b'{"prompt": "q", "chosen": "\xff\xfe", "rejected": "b"}', "row", "invalid UTF-8"),
    ('{"prompt": "q", "chosen": ', "row", "broken JSON"),
    ("[1, 2, 3]", "row", "not an object"),
    ("42", "row", "not an object"),
    ({"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen", "missing field"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing field"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "wrong type"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "rejected", "wrong type"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "missing field"),
    ({"prompt": [{"role": "user", "content": 1}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "wrong type"),
    (
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": "9", "score_rejected": 1},
        "score_chosen",
        "wrong type",
    ),
    (
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": True, "score_rejected": 0},
        "score_chosen",
        "wrong type",
    ),
    (
        '{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": NaN, "score_rejected": 0}',
        "score_chosen",
        "wrong type",
    ),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 0.5}, "score_rejected", "missing field"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty string"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty string"),
    ({"prompt": "q", "chosen": "a", "rejected": "\n"}, "rejected", "empty string"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "empty string"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "rejected", "chosen == rejected"),
    ({"prompt": "q", "chosen": "\ud800", "rejected": "b"}, "chosen", "invalid UTF-8"),
    (
        {"chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]},
        "rejected",
        "invalid conversation",
    ),
    (
        {"chosen": [user("q"), assistant("a"), user("more")], "rejected": [user("q"), assistant("b")]},
        "chosen",
        "invalid conversation",
    ),
    ({"prompt": [user("q"), assistant("a")], "chosen": "a", "rejected": "b"}, "prompt", "invalid conversation"),
]


@pytest.mark.parametrize("row, field, reason", BAD_ROWS)
def test_each_quarantine_reason(tmp_path, row, field, reason):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    result = load_pairs(path)
    assert result.n_input == 2 and len(result.pairs) == 1
    q = result.quarantined[0]
    assert q["location"] == f"{path}:2"
    assert q["field"] == field
    assert q["reason"].startswith(reason), q["reason"]
    json.dumps(q, allow_nan=False).encode("utf-8")  # always writable


def test_over_long_rows(tmp_path):
    rows = [{"prompt": "q", "chosen": "a" * 10, "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b" * 3}]
    path = write_lines(tmp_path / "long.jsonl", rows)
    result = load_pairs(path, max_chars=5)
    assert len(result.pairs) == 1
    assert result.quarantined[0]["field"] == "chosen"
    assert result.quarantined[0]["reason"] == "over-long: prompt + chosen is 11 chars > 5"
    result = load_pairs(path, max_tokens=2, count_tokens=lambda text: len(text) // 2 + 1)
    assert [q["field"] for q in result.quarantined] == ["chosen", "rejected"]
    assert result.quarantined[0]["reason"].startswith("over-long") and "tokens" in result.quarantined[0]["reason"]


def test_blank_lines_are_not_rows_and_line_numbers_count_them(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n  \n{"prompt": 1}\n', encoding="utf-8")
    result = load_pairs(path)
    assert result.n_input == 2
    assert result.quarantined[0]["location"] == f"{path}:5"
    assert result.locations == [f"{path}:2"]


def test_huge_row_is_cut_to_a_preview_in_quarantine(tmp_path):
    row = {"id": "r1", "prompt": "q", "chosen": "x" * 100_000, "rejected": "y" * 100_000}
    q = only_quarantined(load_one(tmp_path, row, max_chars=1000))
    assert q["reason"].startswith("over-long")
    assert set(q["row"]) == {"id", "preview", "chars", "sha256"} and q["row"]["id"] == "r1"
    assert len(q["row"]["preview"]) <= PREVIEW_CHARS and q["row"]["chars"] == len(json.dumps(row))
    assert q["row"]["sha256"] == hashlib.sha256(json.dumps(row).encode()).hexdigest()


def _noise(n: int, seed: int) -> str:
    """n characters that repeat nowhere (a password hash, a token): any 20 of them pin their place."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + string.digits + "./") for _ in range(n))


SHADOW = [
    f"root:$6${_noise(8, 1)}${_noise(86, 2)}:19700:0:99999:7:::",
    "daemon:*:19700:0:99999:7:::",
    f"alice:$y$j9T${_noise(22, 3)}${_noise(43, 4)}:19701:0:99999:7:::",
]


def test_a_foreign_file_and_a_huge_line_leave_only_previews_and_hashes(tmp_path):
    """Issue 21: `import_path: /etc/shadow` copied every line, password hashes included, into the quarantine file.
    Every quarantine row of the pair readers keeps <= PREVIEW_CHARS characters of its input and its sha256."""
    huge = _noise(2000, 5) + "SECRET-TAIL" + _noise(3000, 6)  # 5,011 characters, not JSON
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 0.0}
    lines = [*SHADOW, huge, json.dumps(good), json.dumps({**good, "id": _noise(5000, 7), "chosen": _noise(5000, 8)})]
    path = write_lines(tmp_path / "shadow", lines)  # no suffix, no Parquet magic: read as JSON Lines
    quarantine = tmp_path / "quarantine.jsonl"
    result = validate_dpo_pairs(dpo_path=path, min_pairs=1, max_chars=2000, quarantine_path=quarantine)
    assert result.n_input == len(lines) == result.n_pairs + result.n_quarantined  # the accounting holds
    rows = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
    assert [r["location"] for r in rows] == [f"{path}:{n}" for n in (1, 2, 3, 4, 6)]
    assert rows[0]["reason"].startswith("broken JSON") and rows[-1]["reason"].startswith("over-long")
    text = quarantine.read_text(encoding="utf-8")
    for line, row in zip([*SHADOW, huge, lines[-1]], rows):
        assert set(row) == {"location", "field", "reason", "row"}
        assert set(row["row"]) == {"preview", "chars", "sha256"}  # the over-long id is not kept either
        assert len(row["row"]["preview"]) <= PREVIEW_CHARS <= 100 and row["row"]["chars"] == len(line)
        assert row["row"]["sha256"] == hashlib.sha256(line.encode()).hexdigest()
        assert len(json.dumps(row["row"], ensure_ascii=False)) < PREVIEW_CHARS + 150 and len(row["reason"]) < 120
        for start in range(PREVIEW_CHARS, len(line) - 20, 20):  # nothing past the preview reaches the file
            assert line[start : start + 20] not in text
    assert "SECRET-TAIL" not in text and SHADOW[0][-60:] not in text and SHADOW[2][-60:] not in text
    assert len(text) < len(rows) * 450


def test_write_quarantine(tmp_path):
    result = load_one(tmp_path, "not json")
    write_quarantine(result.quarantined, tmp_path / "q.jsonl")
    lines = (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["reason"].split(":")[0] for line in lines] == ["broken JSON"]


# ---------------------------------------------------------------------------------------------- whole-file errors


def test_missing_file_raises_clear_error(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.jsonl: file: not found"):
        load_pairs(tmp_path / "nope.jsonl")


def test_unknown_format_name(tmp_path):
    with pytest.raises(DataFormatError, match="fmt: unknown format 'csv'"):
        load_pairs(write_lines(tmp_path / "p.jsonl", []), fmt="csv")


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataFormatError, match="unreadable Parquet"):
        load_pairs(path)


def test_read_pairs_is_strict(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [make_pair([user("q")], "a", "b"), {"prompt": [user("q")]}])
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: chosen: missing field"):
        read_pairs(path)


def test_load_result_invariant_is_enforced():
    with pytest.raises(AssertionError):
        LoadResult(pairs=[], quarantined=[], n_input=1)


# ---------------------------------------------------------------------------------------------- helpers


def test_pair_id_is_stable_and_key_order_independent():
    a = pair_id([{"role": "user", "content": "q"}], "a", "b")
    b = pair_id([{"content": "q", "role": "user"}], "a", "b")
    assert a == b == pair_id([user("q")], "a", "b")
    assert len(a) == 16 and a != pair_id([user("q")], "b", "a")


def test_prompt_text_joins_contents():
    assert prompt_text([{"role": "system", "content": "s"}, user("q")]) == "s\nq"
