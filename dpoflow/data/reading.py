"""Reading the user's inputs: files, saved `datasets` folders and hub datasets, row by row, with quarantine.

Every loader takes a `spec` naming where the rows are and returns the accepted rows in a canonical form, the
quarantined rows, the number of input rows and a `fingerprint` of what was read (for the stage's records).

Specs (`open_input`):

* a local file: ``.jsonl`` / ``.ndjson`` (one JSON value per line), ``.json`` (JSON Lines, or one JSON array of
  rows when the first non-blank character is ``[``, or one object), ``.parquet`` / ``.pq`` (or any name whose
  bytes start and end with ``PAR1``). Any other file type raises :class:`DataFormatError`.
  Fingerprint: sha256 of the file's bytes.
* a folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``: pass ``split=`` unless it
  has a single split). Fingerprint: the dataset's own ``_fingerprint``.
* a Hugging Face hub dataset: ``hf:owner/name`` or ``hf:owner/name:split``, or a bare ``owner/name`` that is not a
  local path. Loaded with ``datasets.load_dataset``: needs network or a warm cache; offline it fails with one line.

Conventions (those of dpoflow.data, docs/preference-data-generation.md): a malformed row never raises and is never
dropped silently. It becomes a quarantine row ``{"location": "<file>:<line>", "field", "reason", "row"}`` and
``n_input == accepted + quarantined``. Locations are 1-based lines for JSON Lines, the line where the element starts
for a JSON array, the row index + 1 for Parquet and datasets (``<folder>[<split>]:<n>``, ``hf:<name>[<split>]:<n>``).
Reasons start with a stable kind (``missing field``, ``wrong type``, ``empty string``, ``invalid conversation``,
``unsupported role``, ``broken JSON``, ``not an object``, ``invalid UTF-8``, ``unknown row format``,
``missing annotation``, ``skipped``, ``tie``, ``conflict``, ``wrong value``, ``rating out of range``,
``chosen == rejected``).

Issue 21: quarantine rows written here never copy the input. ``row`` is :func:`quarantine_preview` of the raw
text: ``{"preview": <at most PREVIEW_CHARS characters>, "chars": <length>, "sha256": <hex of the raw bytes>}``,
so a foreign file (``/etc/shadow`` passed by mistake) is not copied into the quarantine file. The sha256 is taken
over the exact bytes of the JSON Lines line (without its newline), over the element's text for a JSON array, and
over ``json.dumps(row, sort_keys=True, ensure_ascii=False)`` for Parquet/datasets rows. Reasons that quote an
input value cut it to 40 characters.

Whole-input problems raise :class:`dpoflow.data.DataFormatError` with one line naming the input (and line/field
where relevant) and what to do: a missing path, an unsupported file type, an unreadable Parquet file or broken
JSON array, a folder that is not a saved dataset, an input with no rows, an input in which no row has a
recognizable shape (the wrong kind of file), a hub dataset that cannot be loaded.

"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dpoflow.data.pairs import DataFormatError, LoadResult, RowError
from dpoflow.data.rows import (
    HUB_NAME,
    JSON_SUFFIXES,
    JSON_WS,
    JSONL_SUFFIXES,
    PARQUET_MAGIC,
    PARQUET_SUFFIXES,
    UnknownShape,
    one_line,
    quarantine,
)

# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class RowsLoad:
    """Accepted canonical rows, quarantine rows, the input row count and what was read."""

    rows: list[dict]
    quarantined: list[dict]
    n_input: int
    fingerprint: str
    origin: str

    def __post_init__(self) -> None:
        if self.n_input != len(self.rows) + len(self.quarantined):
            raise AssertionError(
                f"row accounting broken: {self.n_input} input rows != "
                f"{len(self.rows)} accepted + {len(self.quarantined)} quarantined"
            )

    def summary(self) -> dict:
        """Counts and the fingerprint, JSON-safe, for a stage's metrics."""
        return {
            "origin": self.origin,
            "fingerprint": self.fingerprint,
            "n_input": self.n_input,
            "n_rows": len(self.rows),
            "n_quarantined": len(self.quarantined),
        }


class SftLoad(RowsLoad):
    """`rows` are canonical SFT examples: {"id", "prompt": [messages], "completion": str, "source"}."""


class PromptLoad(RowsLoad):
    """`rows` are canonical prompts: {"id", "prompt": [messages], "category", "reference", "source"}."""


@dataclass
class PairLoad(LoadResult):
    """dpoflow.data.LoadResult (canonical pairs, quarantine, n_input, locations) plus what was read."""

    fingerprint: str = ""
    origin: str = ""


@dataclass
class FeedbackLoad:
    """Pairs built from production feedback. Rows are not pairs here: several rows make one pair, and valid rows
    of a prompt without a usable pair are counted, not quarantined, so ``n_input == n_accepted + quarantined``."""

    pairs: list[dict]
    quarantined: list[dict]
    n_input: int
    n_accepted: int  # valid rows (grouped into prompts)
    n_prompts: int  # distinct normalized prompts among the valid rows
    n_unpaired_prompts: int  # prompts with one distinct response or all-equal scores: no pair
    n_duplicate_responses: int  # valid rows repeating a (prompt, response) seen before (averaged in)
    rating_scale: tuple[float, float] | None  # the (low, high) used to scale ratings; None if no ratings
    fingerprint: str
    origin: str
    locations: list[str] = dc_field(default_factory=list)  # where each pair's chosen response was first logged

    def __post_init__(self) -> None:
        if self.n_input != self.n_accepted + len(self.quarantined):
            raise AssertionError(
                f"row accounting broken: {self.n_input} input rows != "
                f"{self.n_accepted} accepted + {len(self.quarantined)} quarantined"
            )
        if len(self.locations) != len(self.pairs):
            raise AssertionError(f"{len(self.locations)} locations for {len(self.pairs)} pairs")


# --------------------------------------------------------------------------------------------------

# Reading a spec


@dataclass
class _Raw:
    location: str
    raw: str | bytes | None  # the text the row was read from (None: a structured row, previewed as JSON)
    value: Any = None
    error: RowError | None = None  # the row could not be decoded at all


@dataclass
class _Source:
    origin: str
    rows: list[_Raw]
    fingerprint: str


def open_input(spec: str | os.PathLike, split: str | None = None) -> _Source:
    """Read every row of `spec` (see the module docstring); whole-input problems raise DataFormatError."""
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text.startswith("hf:"):
        return _read_hub(text[3:], split)
    path = Path(text)
    if path.is_dir():
        source = _read_saved_dataset(path, split)
    elif path.exists():
        if not path.is_file():
            raise DataFormatError(
                text, "file", "not a regular file; pass a JSONL/JSON/Parquet file or a saved datasets folder"
            )
        source = _read_file(path)
    elif HUB_NAME.match(text) and path.suffix.lower() not in JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES:
        return _read_hub(text, split, bare=True)
    else:
        raise DataFormatError(text, "file", "not found; check the path (hub datasets are written hf:owner/name)")
    if not source.rows:
        raise DataFormatError(source.origin, "file", "no rows; the input is empty")
    return source


def _read_file(path: Path) -> _Source:
    suffix = path.suffix.lower()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(str(path), "file", f"unreadable: {one_line(exc)}") from exc
    fingerprint = hashlib.sha256(data).hexdigest()
    if suffix in PARQUET_SUFFIXES or _has_parquet_magic(data):
        return _Source(str(path), _parquet_rows(path), fingerprint)
    if suffix in JSONL_SUFFIXES:
        return _Source(str(path), _jsonl_rows(path, data), fingerprint)
    if suffix in JSON_SUFFIXES:
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        start = body.lstrip(b" \t\r\n")[:1]
        if start == b"[" or (start == b"{" and _single_document(body)):
            return _Source(str(path), _json_document_rows(path, body), fingerprint)
        return _Source(str(path), _jsonl_rows(path, data), fingerprint)
    raise DataFormatError(
        str(path),
        "file",
        f"unsupported file type {suffix or '(no suffix)'!r}; expected .jsonl, "
        ".ndjson, .json, .parquet/.pq or a saved datasets folder",
    )


def _single_document(body: bytes) -> bool:
    """True if the whole file is one JSON value (a pretty-printed object); False for JSON Lines."""
    try:
        json.loads(body.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


def _has_parquet_magic(data: bytes) -> bool:
    return len(data) >= 8 and data[:4] == data[-4:] == PARQUET_MAGIC


def _jsonl_rows(path: Path, data: bytes) -> list[_Raw]:
    """One row per non-blank line (blank lines still count toward line numbers); a leading BOM is ignored."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        line = line[:-1] if line.endswith(b"\r") else line
        if not line.strip():
            continue
        rows.append(_decode_line(f"{path}:{number}", line))
    return rows


def _decode_line(location: str, line: bytes) -> _Raw:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Raw(location, line, error=RowError("row", f"invalid UTF-8 at byte {exc.start}"))
    try:
        return _Raw(location, line, json.loads(text))
    except RecursionError:
        return _Raw(location, line, error=RowError("row", "broken JSON: nested too deeply"))
    except ValueError as exc:
        return _Raw(location, line, error=RowError("row", f"broken JSON: {one_line(exc)}"))


def _json_document_rows(path: Path, body: bytes) -> list[_Raw]:
    """A JSON array of rows (each located at the line where it starts), or a single object (line 1)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            str(path), "file", f"invalid UTF-8 at byte {exc.start}; re-export the file as UTF-8"
        ) from exc
    decoder = json.JSONDecoder()

    def broken(exc: json.JSONDecodeError) -> DataFormatError:
        return DataFormatError(
            f"{path}:{exc.lineno}",
            "file",
            f"broken JSON at column {exc.colno}: {exc.msg}; the file is one JSON document: fix or re-export it",
        )

    def ws(i: int) -> int:
        return JSON_WS.match(text, i).end()

    rows: list[_Raw] = []
    try:
        i = ws(0)
        if i < len(text) and text[i] == "{":
            value, end = decoder.raw_decode(text, i)
            if ws(end) != len(text):
                raise json.JSONDecodeError("extra data after the object", text, ws(end))
            return [_Raw(f"{path}:{text.count(chr(10), 0, i) + 1}", text[i:end], value)]
        if i >= len(text) or text[i] != "[":
            raise json.JSONDecodeError("expected '[' or '{'", text, i)
        i = ws(i + 1)
        if i < len(text) and text[i] == "]":
            if ws(i + 1) != len(text):
                raise json.JSONDecodeError("extra data after the array", text, ws(i + 1))
            return rows
        line, counted = 1, 0
        while True:
            value, end = decoder.raw_decode(text, i)
            line += text.count("\n", counted, i)
            counted = i
            rows.append(_Raw(f"{path}:{line}", text[i:end], value))
            i = ws(end)
            if i < len(text) and text[i] == ",":
                i = ws(i + 1)
                continue
            if i < len(text) and text[i] == "]":
                if ws(i + 1) != len(text):
                    raise json.JSONDecodeError("extra data after the array", text, ws(i + 1))
                break
            raise json.JSONDecodeError("expected ',' or ']' after an array element", text, i)
    except json.JSONDecodeError as exc:
        raise broken(exc) from None
    except RecursionError:
        raise DataFormatError(str(path), "file", "broken JSON: nested too deeply") from None
    return rows


def _parquet_rows(path: Path) -> list[_Raw]:
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataFormatError(str(path), "file", f"unreadable Parquet: {one_line(exc)}; re-export the file") from exc
    return [_Raw(f"{path}:{i + 1}", None, row) for i, row in enumerate(records)]


def _read_saved_dataset(path: Path, split: str | None) -> _Source:
    if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        raise DataFormatError(
            str(path),
            "file",
            "a folder but not a saved datasets folder (no state.json or "
            "dataset_dict.json); pass a file or Dataset.save_to_disk output",
        )
    import datasets  # lazily: heavy, and only folders and hub names need it

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataFormatError(str(path), "file", f"unreadable saved dataset: {one_line(exc)}") from exc
    origin = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            raise DataFormatError(
                str(path),
                "split",
                f"{'pass split=' if split is None else f'no split {split!r}'}"
                f"; the dataset has splits {', '.join(names)}",
            )
        loaded, origin = loaded[split], f"{path}[{split}]"
    return _dataset_source(loaded, origin)


def _read_hub(name: str, split: str | None, bare: bool = False) -> _Source:
    if ":" in name and split is None:
        name, split = name.rsplit(":", 1)
    split = split or "train"
    origin = f"hf:{name}[{split}]"
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, no access, bad split: all whole-input problems
        raise DataFormatError(
            origin,
            "dataset",
            f"{'no such local path, and ' if bare else ''}cannot load it "
            f"from the Hugging Face hub ({one_line(exc)}); "
            "with no network, save it elsewhere with Dataset.save_to_disk and "
            "pass that folder, or pass a JSONL/Parquet file",
        ) from None
    source = _dataset_source(loaded, origin)
    if not source.rows:
        raise DataFormatError(origin, "dataset", "no rows; the split is empty")
    return source


def _dataset_source(dataset: Any, origin: str) -> _Source:
    rows = [_Raw(f"{origin}:{i + 1}", None, row) for i, row in enumerate(dataset)]
    return _Source(origin, rows, str(getattr(dataset, "_fingerprint", "")))


# --------------------------------------------------------------------------------------------------
# Row conversion driver


def convert_records(
    source: _Source, convert: Callable[[Any, str], Any], what: str
) -> tuple[list[tuple[str, Any]], list[tuple[int, dict]]]:
    """Run `convert(value, location)` on every row: (location, result) for accepted rows, (order, quarantine row)
    for the rest. Raises DataFormatError if no row has a recognizable shape (the wrong kind of input)."""
    accepted: list[tuple[str, Any]] = []
    quarantined: list[tuple[int, dict]] = []
    recognized = 0
    for order, row in enumerate(source.rows):
        raw = row.value if row.raw is None else row.raw
        if row.error is not None:
            quarantined.append((order, quarantine(row.location, row.error.field, row.error.reason, raw)))
            continue
        try:
            result = convert(row.value, row.location)
        except UnknownShape as err:
            quarantined.append((order, quarantine(row.location, err.field, err.reason, raw)))
            continue
        except RowError as err:
            recognized += 1
            quarantined.append((order, quarantine(row.location, err.field, err.reason, raw)))
            continue
        recognized += 1
        accepted.append((row.location, result))
    if not recognized:
        kinds = sorted({q["reason"].split(":")[0] for _, q in quarantined})
        raise DataFormatError(
            source.origin,
            "format",
            f"no row is {what} ({len(source.rows)} rows: {', '.join(kinds)}); check that this is the right file",
        )
    return accepted, quarantined


def in_input_order(quarantined: list[tuple[int, dict]]) -> list[dict]:
    return [q for _, q in sorted(quarantined, key=lambda item: item[0])]


# --------------------------------------------------------------------------------------------------
