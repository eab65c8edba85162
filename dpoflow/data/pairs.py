"""The canonical preference pair: its schema, ids, Parquet/JSONL files, and the quarantine of rows that cannot be
used.

    {"id", "prompt": [{"role", "content"}, ...], "chosen", "rejected",
     "score_chosen", "score_rejected", "task", "source"}

Rows that cannot be converted are never dropped silently and never raise: they become quarantine rows
``{"location": "<file>:<line>", "field", "reason", "row"}``. Only problems with a whole file (missing,
unreadable Parquet, unknown format name) raise :class:`DataFormatError`. External formats: dpoflow.data.formats.

A quarantine row never copies its input (issue 21: ``import_path: /etc/shadow`` must not end up in
data/quarantine.jsonl): ``row`` is :func:`quarantine_preview` of it, ``{"preview": <at most PREVIEW_CHARS
characters>, "chars": <length>, "sha256": <hex>}``, plus the row's ``id`` when it has a short one. The sha256 is
taken over the exact bytes of the JSON Lines line (without its newline), else over the row's sorted JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpoflow.runtime.errors import UserError
from dpoflow.runtime.io import atomic_path, write_jsonl

FORMATS = ("auto", "plain", "trl", "ultrafeedback", "hh", "canonical")
COLUMNS = ("id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "task", "source")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.list_(MESSAGE_TYPE)),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("task", pa.string()),
        ("source", pa.string()),
    ]
)

PREVIEW_CHARS = 80  # characters of raw input kept in a quarantine row (issue 21)
QUARANTINE_ID_CHARS = 64  # a row's own id is kept in its quarantine row only up to this length
_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # other names: Parquet if the bytes say so, else JSONL


class DataFormatError(UserError, ValueError):
    """A problem with a whole input (missing file, unreadable Parquet, unknown format): `location: field: reason`."""

    def __init__(self, location: str, field: str, reason: str):
        self.location, self.field, self.reason = location, field, reason
        super().__init__(f"{location}: {field}: {reason}")


class RowError(Exception):
    """One row cannot be converted; becomes a quarantine row with this field and reason."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


@dataclass
class LoadResult:
    """Outcome of a load. `locations[i]` is where `pairs[i]` came from (`<file>:<line>`)."""

    pairs: list[dict]
    quarantined: list[dict]
    n_input: int
    locations: list[str] = dc_field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_input != len(self.pairs) + len(self.quarantined):
            raise AssertionError(
                f"row accounting broken: {self.n_input} input rows != "
                f"{len(self.pairs)} pairs + {len(self.quarantined)} quarantined"
            )
        if not self.locations:
            self.locations = [f"<pairs>:{i + 1}" for i in range(len(self.pairs))]
        if len(self.locations) != len(self.pairs):
            raise AssertionError(f"{len(self.locations)} locations for {len(self.pairs)} pairs")


# --------------------------------------------------------------------------------------------------
# Canonical rows


def pair_id(prompt: list[dict], chosen: str, rejected: str) -> str:
    """Stable id: sha1 of ``json.dumps([prompt, chosen, rejected])``, first 16 hex digits.

    Messages are reduced to ``{"role", "content"}`` in that key order, so the id depends only on content.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return hashlib.sha1(json.dumps([messages, chosen, rejected]).encode("utf-8")).hexdigest()[:16]


def prompt_text(messages: list[dict]) -> str:
    """The prompt's message contents joined by newlines (for text analysis, not for tokenization)."""
    return "\n".join(m["content"] for m in messages)


def make_pair(
    prompt: list[dict],
    chosen: str,
    rejected: str,
    score_chosen: float | None = None,
    score_rejected: float | None = None,
    task: str | None = None,
    source: str = "unknown",
) -> dict:
    """Build a canonical pair row (with its id) from already-validated parts."""
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return {
        "id": pair_id(messages, chosen, rejected),
        "prompt": messages,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": None if score_chosen is None else float(score_chosen),
        "score_rejected": None if score_rejected is None else float(score_rejected),
        "task": task,
        "source": source,
    }


def quarantine_preview(raw: str | bytes | Any) -> dict:
    """A bounded stand-in for raw input: ``{"preview", "chars", "sha256"}``.

    `preview` is at most PREVIEW_CHARS characters of the text (whitespace runs collapsed to one space, other control
    characters replaced by U+FFFD, lone surrogates escaped; a cut preview ends with "…"). `chars` is the length of
    the whole text and `sha256` the hex digest of the raw bytes (str: UTF-8; other values: their sorted JSON), so
    the row can be found in the input without being copied.
    """
    if isinstance(raw, bytes):
        data, text = raw, raw.decode("utf-8", errors="replace")
    else:
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, sort_keys=True, default=repr)
        data = text.encode("utf-8", errors="surrogatepass")
    head = re.sub(r"\s+", " ", text[: PREVIEW_CHARS * 2])
    head = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in head)
    head = head.encode("utf-8", errors="backslashreplace").decode("utf-8")
    if len(text) > PREVIEW_CHARS * 2 or len(head) > PREVIEW_CHARS:
        head = head[: PREVIEW_CHARS - 1] + "…"
    return {"preview": head, "chars": len(text), "sha256": hashlib.sha256(data).hexdigest()}


def quarantine_row(location: str, field: str, reason: str, row: Any, raw: str | bytes | None = None) -> dict:
    """A quarantine row: `row` is :func:`quarantine_preview` of `raw` (the bytes the row was read from) or, when
    there are none (Parquet, in-memory rows), of the row itself; plus the row's `id` if it is short."""
    row_id = row.get("id") if isinstance(row, dict) else None
    short_id = (
        isinstance(row_id, (str, int)) and not isinstance(row_id, bool) and len(str(row_id)) <= QUARANTINE_ID_CHARS
    )
    preview = quarantine_preview(row if raw is None else raw)
    return {
        "location": location,
        "field": field,
        "reason": reason,
        "row": {"id": row_id, **preview} if short_id else preview,
    }


def write_pairs(rows: list[dict], parquet_path: str | os.PathLike, jsonl_path: str | os.PathLike | None = None) -> None:
    """Write canonical rows atomically to Parquet (and optionally JSONL). A missing id is computed."""
    canonical = []
    for row in rows:
        out = {key: row.get(key) for key in COLUMNS}
        if out["id"] is None:
            out["id"] = pair_id(out["prompt"], out["chosen"], out["rejected"])
        canonical.append(out)
    table = pa.Table.from_pylist(canonical, schema=PAIR_SCHEMA)
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp)
    if jsonl_path is not None:
        write_jsonl(jsonl_path, canonical)


def write_quarantine(rows: list[dict], path: str | os.PathLike) -> None:
    """Write quarantine rows as JSONL, atomically (an empty list writes an empty file)."""
    write_jsonl(path, rows)


# --------------------------------------------------------------------------------------------------
# Reading raw records


@dataclass
class Record:
    location: str
    value: Any = None
    error: RowError | None = None  # set when the line itself could not be decoded
    raw: bytes | None = None  # the line the row was read from (JSON Lines), for its quarantine preview and sha256


def check_format(fmt: str, location: str) -> None:
    if fmt not in FORMATS:
        raise DataFormatError(location, "fmt", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def read_records(path: Path) -> Iterator[Record]:
    if not path.exists():
        raise DataFormatError(str(path), "file", "not found")
    if not path.is_file():
        raise DataFormatError(str(path), "file", "not a regular file")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in _PARQUET_SUFFIXES or _has_parquet_magic(path):
        return _read_parquet(path)
    return _read_jsonl(path)


def _has_parquet_magic(path: Path) -> bool:
    """A Parquet file starts and ends with b"PAR1"."""
    with open(path, "rb") as f:
        head = f.read(4)
        if f.seek(0, os.SEEK_END) < 8:
            return False
        f.seek(-4, os.SEEK_END)
        return head == f.read(4) == _PARQUET_MAGIC


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataFormatError(str(path), "file", f"unreadable Parquet: {exc}") from exc
    return (Record(f"{path}:{i + 1}", row) for i, row in enumerate(rows))


def _read_jsonl(path: Path) -> Iterator[Record]:
    """One record per non-blank line; blank lines are not rows. Line numbers are 1-based."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        location = f"{path}:{number}"
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Record(location, None, RowError("row", f"invalid UTF-8 at byte {exc.start}"), raw)
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            yield Record(location, None, RowError("row", "broken JSON: nested too deeply"), raw)
            continue
        except ValueError as exc:  # JSONDecodeError, and int-digit limits
            yield Record(location, None, RowError("row", f"broken JSON: {_short(str(exc))}"), raw)
            continue
        yield Record(location, value, raw=raw)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(value), type(value).__name__
    )


def required_field(row: dict, key: str) -> Any:
    """row[key], or a RowError naming the field when it is absent or null."""
    if key not in row:
        raise RowError(key, "missing field")
    if row[key] is None:
        raise RowError(key, "missing field (null)")
    return row[key]


def check_text(field: str, text: str) -> None:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 writer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(field, f"invalid UTF-8: unpaired surrogate at character {exc.start}") from None


def as_message_list(value: Any, field: str) -> list:
    """`value` if it is a list (of messages, checked one by one with role_and_content)."""
    if not isinstance(value, list):
        raise RowError(field, f"wrong type: expected a list of {{role, content}} messages, got {type_name(value)}")
    return value


def role_and_content(message: Any, where: str) -> tuple[str, str]:
    """The string `role` and `content` of one message object."""
    if not isinstance(message, dict):
        raise RowError(where, f"wrong type: expected a {{role, content}} object, got {type_name(message)}")
    for key in ("role", "content"):
        if message.get(key) is None:
            raise RowError(f"{where}.{key}", "missing field")
        if not isinstance(message[key], str):
            raise RowError(f"{where}.{key}", f"wrong type: expected string, got {type_name(message[key])}")
    return message["role"], message["content"]


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
