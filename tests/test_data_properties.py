"""Property tests: whatever the input, loading never crashes and every row is accounted for.

Arbitrary bytes, invalid UTF-8, broken JSON, wrong types, missing fields, empty strings, huge rows and
duplicate rows must each end as an accepted pair or a quarantine row with location, field and reason; the same
for Parquet files with any column types; a corrupt Parquet file is one DataFormatError naming it; a length limit
quarantines exactly the over-long rows.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpoflow.data.formats import convert_rows, load_pairs, read_pairs
from dpoflow.data.pairs import PREVIEW_CHARS, DataFormatError, prompt_text, write_pairs, write_quarantine
from dpoflow.data.validation import validate_dpo_pairs

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "task", "source")

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\n", "a", "same", "\ud800", "x\udfffy", "\x00", "Human:", "\n\nAssistant:"]),
    st.integers(0, 60_000).map(lambda n: "x" * n),  # huge strings
)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "", "Human"]), st.integers(), st.none())
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, st.integers(), st.none())}),
        st.fixed_dictionaries({"role": roles}),
        texts,
        st.integers(),
    ),
    max_size=4,
)
hh_turns = st.lists(
    st.tuples(st.sampled_from(["Human", "Assistant", "Human:", "Bot"]), st.text(max_size=10)), max_size=4
).map(lambda turns: "".join(f"\n\n{role}: {text}" for role, text in turns))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-20, 20),
    st.booleans(),
    st.integers(min_value=10**30, max_value=10**40),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
field_values = st.one_of(texts, messages, hh_turns, numbers, json_values)

# mostly valid rows, so that accepted pairs (and duplicates, conflicts) occur often
words = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
scores = st.one_of(st.floats(0, 1), st.integers(1, 10))
valid_rows = st.one_of(
    st.fixed_dictionaries(
        {"prompt": words, "chosen": words, "rejected": words},
        optional={"score_chosen": scores, "score_rejected": scores},
    ),
    st.builds(
        lambda q, a, b: {
            "prompt": q,
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": b}],
        },
        words,
        words,
        words,
    ),
    st.builds(
        lambda q, a, b: {
            "chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
            "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}",
        },
        words,
        words,
        words,
    ),
)

rows = st.one_of(
    valid_rows,
    st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=len(FIELDS)),
    st.fixed_dictionaries(
        {"prompt": texts, "chosen": texts, "rejected": texts},
        optional={"score_chosen": numbers, "score_rejected": numbers},
    ),
    st.fixed_dictionaries({"chosen": hh_turns, "rejected": hh_turns}),
    st.fixed_dictionaries(
        {"prompt": st.one_of(texts, messages), "chosen": messages, "rejected": messages},
        optional={"score_chosen": numbers, "score_rejected": numbers},
    ),
    json_values,
)


def encode_row(row) -> bytes:
    # allow_nan: NaN/Infinity tokens are what Python writers produce; surrogates stay escaped
    return json.dumps(row, allow_nan=True).encode("utf-8")


lines = st.one_of(
    rows.map(encode_row),
    rows.map(encode_row).flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])),  # cut JSON
    st.binary(max_size=40),  # arbitrary bytes, mostly invalid UTF-8
    st.sampled_from([b"\xff\xfe{}", b'{"prompt": "\xc3\x28"}', b"[" * 5000, b"1" * 5000, b"{}", b"null"]),
)
files = st.lists(lines, max_size=12).flatmap(
    # duplicate rows: repeat some of the generated lines
    lambda ls: st.lists(st.sampled_from(ls), max_size=4).map(lambda extra: ls + extra) if ls else st.just(ls)
)

LOCATION = re.compile(r"^.+:\d+$")


def expected_rows(data: bytes) -> int:
    return sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())


def check_quarantine(rows_out: list[dict], path: Path) -> None:
    for q in rows_out:
        assert set(q) == {"location", "field", "reason", "row"}
        assert LOCATION.match(q["location"]) and q["location"].startswith(str(path))
        assert isinstance(q["field"], str) and q["field"]
        assert isinstance(q["reason"], str) and q["reason"]
        assert set(q["row"]) - {"id"} == {"preview", "chars", "sha256"}  # bounded: never the row itself
        assert len(q["row"]["preview"]) <= PREVIEW_CHARS and len(str(q["row"].get("id", ""))) <= 64
        json.dumps(q, allow_nan=False, ensure_ascii=False).encode("utf-8")


@SETTINGS
@given(files)
def test_any_jsonl_file_is_fully_accounted_for(file_lines):
    data = b"\n".join(file_lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_bytes(data)
        result = load_pairs(path)
        assert result.n_input == expected_rows(data)
        assert result.n_input == len(result.pairs) + len(result.quarantined)
        assert len(result.locations) == len(result.pairs)
        check_quarantine(result.quarantined, path)
        for pair in result.pairs:
            for key in ("score_chosen", "score_rejected"):
                assert pair[key] is None or 0.0 <= pair[key] <= 1.0
        # everything that was accepted can be written and read back; quarantine rows can be written
        write_pairs(result.pairs, Path(tmp) / "out.parquet", Path(tmp) / "out.jsonl")
        assert read_pairs(Path(tmp) / "out.parquet") == result.pairs
        assert read_pairs(Path(tmp) / "out.jsonl") == result.pairs
        write_quarantine(result.quarantined, Path(tmp) / "q.jsonl")

        metrics = validate_dpo_pairs(dpo_path=path, min_pairs=1, eval_texts={"e": ["same x", "a b c d e f g h"]})
        assert metrics.n_input == result.n_input == metrics.n_pairs + metrics.n_quarantined
        check_quarantine(metrics.quarantined, path)
        json.dumps(metrics.to_dict(), allow_nan=False)


@SETTINGS
@given(st.lists(st.one_of(rows, st.just(object()), st.binary(max_size=5)), max_size=10))
def test_any_in_memory_rows_are_fully_accounted_for(items):
    result = convert_rows(items, origin="mem")
    assert result.n_input == len(items) == len(result.pairs) + len(result.quarantined)
    for q in result.quarantined:
        assert re.match(r"^mem:\d+$", q["location"]) and q["field"] and q["reason"]
        json.dumps(q, allow_nan=False)
    metrics = validate_dpo_pairs(pairs=items, min_pairs=1, conflict_rule="score")
    assert metrics.n_input == metrics.n_pairs + metrics.n_quarantined


preference_graph = st.lists(
    st.tuples(
        st.sampled_from(["p1", "p2"]),
        st.sampled_from("ABCD"),
        st.sampled_from("ABCD"),
        st.one_of(st.none(), st.floats(0, 1)),
    ),
    max_size=15,
)


@SETTINGS
@given(preference_graph, st.sampled_from(["majority", "score", "drop"]))
def test_conflict_resolution_leaves_no_conflicts(edges, rule):
    items = []
    for prompt, a, b, score in edges:
        row = {"prompt": prompt, "chosen": a, "rejected": b}
        if score is not None:
            row.update(score_chosen=score, score_rejected=score / 2)
        items.append(row)
    metrics = validate_dpo_pairs(pairs=items, min_pairs=1, conflict_rule=rule)
    assert metrics.n_input == metrics.n_pairs + metrics.n_quarantined
    kept = {(p["prompt"][0]["content"], p["chosen"], p["rejected"]) for p in metrics.accepted}
    assert len(kept) == metrics.n_pairs  # no duplicates left
    for prompt in ("p1", "p2"):
        graph = {(a, b) for p, a, b in kept if p == prompt}
        assert not any((b, a) in graph for a, b in graph)  # no opposite labels left
        assert not has_cycle(graph)


def has_cycle(graph: set[tuple[str, str]]) -> bool:
    nodes = {n for edge in graph for n in edge}
    state: dict[str, int] = {}

    def visit(node: str) -> bool:
        state[node] = 1
        for a, b in graph:
            if a == node and (state.get(b) == 1 or (b not in state and visit(b))):
                return True
        state[node] = 2
        return False

    return any(node not in state and visit(node) for node in nodes)


# --- Parquet input: the same accounting, whatever the column types; a corrupt file is one clear error ---------------
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
parquet_texts = texts.map(lambda s: s.encode("utf-8", "replace").decode("utf-8"))  # Parquet strings are UTF-8
COLUMN_KINDS = {  # Parquet columns have one type each: every column of a file gets one of these, nulls allowed
    "string": (pa.string(), parquet_texts),
    "int": (pa.int64(), st.integers(-(2**40), 2**40)),
    "float": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "bool": (pa.bool_(), st.booleans()),
    "messages": (
        pa.list_(MESSAGE),
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.one_of(st.none(), st.sampled_from(["user", "assistant", "system", "", "Human"])),
                    "content": st.one_of(st.none(), parquet_texts),
                }
            ),
            max_size=3,
        ),
    ),
}


@st.composite
def parquet_tables(draw):
    columns = draw(st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(sorted(COLUMN_KINDS)), min_size=1))
    n = draw(st.integers(0, 8))
    data = {}
    for name, kind in columns.items():
        typ, values = COLUMN_KINDS[kind]
        data[name] = pa.array(draw(st.lists(st.one_of(st.none(), values), min_size=n, max_size=n)), type=typ)
    return pa.table(data)


@SETTINGS
@given(parquet_tables())
def test_any_parquet_file_is_fully_accounted_for(table):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        pq.write_table(table, path)
        result = load_pairs(path)
        assert result.n_input == table.num_rows == len(result.pairs) + len(result.quarantined)
        check_quarantine(result.quarantined, path)
        write_pairs(result.pairs, Path(tmp) / "out.parquet")
        assert read_pairs(Path(tmp) / "out.parquet") == result.pairs


@SETTINGS
@given(st.data())
def test_a_corrupt_parquet_file_is_one_clear_error_naming_it(data):
    table = pa.table({"prompt": ["q1", "q2"], "chosen": ["a", "b"], "rejected": ["c", "d"]})
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.parquet"
        pq.write_table(table, good)
        raw = good.read_bytes()
        bad = data.draw(
            st.one_of(
                st.integers(4, len(raw) - 1).map(lambda n: raw[:n]),  # cut short
                st.binary(min_size=0, max_size=200).map(lambda b: b"PAR1" + b + b"PAR1"),  # magic around garbage
            )
        )
        path = Path(tmp) / "pairs.parquet"
        path.write_bytes(bad)
        with pytest.raises(DataFormatError, match=rf"^{path}: file: unreadable Parquet"):
            load_pairs(path)


@SETTINGS
@given(st.lists(st.tuples(texts, texts, texts), max_size=6), st.integers(1, 2_000))
def test_rows_over_max_chars_are_quarantined_as_over_long(triples, max_chars):
    rows = [{"prompt": q, "chosen": a, "rejected": b} for q, a, b in triples]
    unlimited = convert_rows(rows, origin="mem")
    limited = convert_rows(rows, origin="mem", max_chars=max_chars)
    assert limited.n_input == len(rows) == len(limited.pairs) + len(limited.quarantined)
    for pair in limited.pairs:
        assert len(prompt_text(pair["prompt"])) + max(len(pair["chosen"]), len(pair["rejected"])) <= max_chars
    assert {p["id"] for p in limited.pairs} <= {p["id"] for p in unlimited.pairs}
    reasons = {q["location"]: q for q in limited.quarantined}
    for location in set(unlimited.locations) - set(limited.locations):  # dropped only for its length
        assert reasons[location]["field"] in ("chosen", "rejected")
        assert reasons[location]["reason"].startswith("over-long: prompt + ")
