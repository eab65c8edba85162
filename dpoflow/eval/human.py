"""Human evaluation: a blind side-by-side sheet of the final and the baseline model's responses, and its import
(the same win-rate function as the automatic judge)."""

from __future__ import annotations

import csv
import io as textio
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.data.pairs import DataFormatError
from dpoflow.eval.win_rate import win_rate
from dpoflow.runtime import io

SHEET_COLUMNS = ("row", "prompt", "response_a", "response_b", "preference", "comment")
KEY_FORMAT = "dpoflow-human-eval-key-v1"
RATINGS = {"a": "a", "b": "b", "tie": "tie", "=": "tie", "equal": "tie", "same": "tie"}


def shown_prompt(prompt: Sequence[Mapping[str, str]]) -> str:
    """What the rater reads: the user turn(s) (the system prompt is the same for every row)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return "\n".join(users) if users else "\n".join(m["content"] for m in prompt)


def export_human_sheet(
    judgments: Sequence[Mapping[str, Any]],
    sheet_csv: str | Path,
    key_json: str | Path,
    n_rows: int,
    seed: int = 0,
    bootstrap_samples: int = 2000,
    meta: Mapping[str, Any] | None = None,
    include: Sequence[int] = (),
) -> dict:
    """Write a blind side-by-side CSV (columns SHEET_COLUMNS; `preference` left blank for A / B / tie) and, separately,
    the key mapping each row's A and B to final / baseline.

    Rows: a seeded sample of min(n_rows, len(judgments)) prompts in a seeded random order; which model is A is a
    seeded coin flip per row. Nothing in the sheet names a model. `include`: judgment indices (their "index") that
    come first, in that order (e.g. the report's qualitative rows, reporting.qualitative.sheet_indices), then a
    seeded sample of the others up to n_rows (all of `include` is kept when it is longer). Returns a summary."""
    rng = random.Random(f"dpoflow-human-eval:{seed}")
    n = min(int(n_rows), len(judgments))
    if include:
        position = {j.get("index", i): i for i, j in enumerate(judgments)}
        bad = [x for x in include if x not in position] or [x for x in include if list(include).count(x) > 1]
        if bad:
            raise ValueError(f"include: judgment index {bad[0]!r} is unknown or repeated")
        first = [position[x] for x in include]
        taken = set(first)
        others = [i for i in range(len(judgments)) if i not in taken]
        n = max(n, len(first))
        chosen = first + rng.sample(others, n - len(first))
    else:
        chosen = rng.sample(range(len(judgments)), n)
    rows, key_rows = [], {}
    for number, index in enumerate(chosen, start=1):
        j = judgments[index]
        final_is_a = rng.random() < 0.5
        a, b = (j["final"], j["baseline"]) if final_is_a else (j["baseline"], j["final"])
        rows.append(
            {
                "row": str(number),
                "prompt": shown_prompt(j["prompt"]),
                "response_a": a,
                "response_b": b,
                "preference": "",
                "comment": "",
            }
        )
        key_rows[str(number)] = {
            "a": "final" if final_is_a else "baseline",
            "b": "baseline" if final_is_a else "final",
            "index": j.get("index", index),
            "id": j.get("id"),
        }
    with io.atomic_path(sheet_csv) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SHEET_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    io.write_json(
        key_json,
        {
            "format": KEY_FORMAT,
            "seed": int(seed),
            "bootstrap_samples": int(bootstrap_samples),
            "rows": key_rows,
            **({"meta": dict(meta)} if meta else {}),
        },
    )
    return {"rows": n, "included": len(include), "sheet": str(sheet_csv), "key": str(key_json)}


def _sheet_text(sheet_csv: str | Path) -> str:
    """The sheet's text (UTF-8, a spreadsheet's BOM allowed); bad UTF-8 is a DataFormatError naming file:line."""
    data = Path(sheet_csv).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(
            f"{sheet_csv}:{line}", "encoding", f"invalid UTF-8 at byte {exc.start}: save the sheet as CSV UTF-8"
        ) from None


def _sheet_rows(sheet_csv: str | Path) -> Iterator[tuple[int, dict]]:
    """(line, row) of each record (line: its last physical line; prompts may span lines). A record the csv module
    cannot read (an oversized field, a stray NUL) is a DataFormatError naming file:line, not a bare csv.Error."""
    reader = csv.DictReader(textio.StringIO(_sheet_text(sheet_csv), newline=""))
    try:
        missing = [c for c in ("row", "preference") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(
                f"{sheet_csv}:1", "header", f"column {missing[0]!r} missing (expected {', '.join(SHEET_COLUMNS)})"
            )
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        raise DataFormatError(f"{sheet_csv}:{reader.line_num}", "csv", f"{exc}: is this the exported sheet?") from None


def _row_order(number: str) -> tuple[int, str]:
    return (int(number), number) if number.isdigit() else (1 << 62, number)


def read_human_ratings(sheet_csv: str | Path, key_json: str | Path) -> tuple[list[float], dict]:
    """(outcomes for the final model, counts) from a filled-in sheet and its key. `preference` per row: A, B or tie
    (also "=", "equal", "same"; case-insensitive); blank = not rated (skipped and counted).

    The sheet's rows are checked against the key: a row the key does not have, or a row twice, raises; rows of
    the key missing from the sheet (a cut sheet) are counted and named (`missing`, `missing_rows`) and count as
    not rated (`unrated` = blank + missing). Every problem with the sheet raises DataFormatError (a UserError and
    a ValueError) naming file:line: a bad value, bad UTF-8, a field the csv module cannot read."""
    key = io.read_json(key_json)
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT or not isinstance(key.get("rows"), dict):
        found = key.get("format") if isinstance(key, dict) else None
        raise DataFormatError(str(key_json), "format", f"not a dpoflow human-eval key (format {found!r})")
    outcomes, blank, seen = [], 0, set()
    for line, row in _sheet_rows(sheet_csv):
        number = (row.get("row") or "").strip()
        where = f"{sheet_csv}:{line}"
        if number not in key["rows"]:
            raise DataFormatError(where, "row", f"{number[:40]!r} is not a row of {key_json}")
        if number in seen:
            raise DataFormatError(where, "row", f"{number!r} appears twice")
        seen.add(number)
        raw = (row.get("preference") or "").strip()
        if not raw:
            blank += 1
            continue
        rating = RATINGS.get(raw.lower())
        if rating is None:
            raise DataFormatError(
                where, "preference", f"{raw[:40]!r} is not one of A, B, tie (blank = not rated) [sheet row {number}]"
            )
        if rating == "tie":
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 if key["rows"][number][rating] == "final" else 0.0)
    missing = sorted(set(key["rows"]) - seen, key=_row_order)
    return outcomes, {
        "rated": len(outcomes),
        "unrated": blank + len(missing),
        "blank": blank,
        "missing": len(missing),
        "missing_rows": missing,
        "rows_in_key": len(key["rows"]),
        "seed": key.get("seed", 0),
        "bootstrap_samples": key.get("bootstrap_samples", 2000),
    }


def import_human_ratings(
    sheet_csv: str | Path, key_json: str | Path, *, bootstrap_samples: int | None = None, seed: int | None = None
) -> dict:
    """Win rate of the final model from human ratings: the same `win_rate` as the automatic path, with the
    bootstrap settings recorded in the key (overridable). Returns win_rate's dict + the counts of rated and not
    rated rows (`unrated` = `blank` + `missing`: rows of the key the sheet no longer has, named in
    `missing_rows`)."""
    outcomes, info = read_human_ratings(sheet_csv, key_json)
    result = win_rate(
        outcomes,
        bootstrap_samples=info["bootstrap_samples"] if bootstrap_samples is None else bootstrap_samples,
        seed=info["seed"] if seed is None else seed,
    )
    counts = {k: info[k] for k in ("rated", "unrated", "blank", "missing", "missing_rows", "rows_in_key")}
    return {**result, **counts, "source": str(sheet_csv)}
