"""Data sources beyond preference pairs: SFT rows, prompt sets, human label exports, production feedback.

Every loader takes a `spec` naming where the rows are and returns the accepted rows in a canonical form, the
quarantined rows, the number of input rows and a `fingerprint` of what was read (for the stage's records).

Specs (`_open`):

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

This module will move to dpoflow/data/sources.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow.parquet as pq

from dpoflow.data import DataFormatError, LoadResult, RowError, make_pair
from dpoflow.tasks import normalize_question

PREVIEW_CHARS = 80          # characters of raw input kept in a quarantine row (issue 21)
REASON_VALUE_CHARS = 40     # an input value quoted in a reason is cut to this many characters
ROLES = ("system", "user", "assistant")

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_MAGIC = b"PAR1"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_JSON_WS = re.compile(r"[ \t\n\r]*")


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
            raise AssertionError(f"row accounting broken: {self.n_input} input rows != "
                                 f"{len(self.rows)} accepted + {len(self.quarantined)} quarantined")

    def summary(self) -> dict:
        """Counts and the fingerprint, JSON-safe, for a stage's metrics."""
        return {"origin": self.origin, "fingerprint": self.fingerprint, "n_input": self.n_input,
                "n_rows": len(self.rows), "n_quarantined": len(self.quarantined)}


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
    n_accepted: int                  # valid rows (grouped into prompts)
    n_prompts: int                   # distinct normalized prompts among the valid rows
    n_unpaired_prompts: int          # prompts with one distinct response or all-equal scores: no pair
    n_duplicate_responses: int       # valid rows repeating a (prompt, response) seen before (averaged in)
    rating_scale: tuple[float, float] | None   # the (low, high) used to scale ratings; None if no ratings
    fingerprint: str
    origin: str
    locations: list[str] = dc_field(default_factory=list)   # where each pair's chosen response was first logged

    def __post_init__(self) -> None:
        if self.n_input != self.n_accepted + len(self.quarantined):
            raise AssertionError(f"row accounting broken: {self.n_input} input rows != "
                                 f"{self.n_accepted} accepted + {len(self.quarantined)} quarantined")
        if len(self.locations) != len(self.pairs):
            raise AssertionError(f"{len(self.locations)} locations for {len(self.pairs)} pairs")


# --------------------------------------------------------------------------------------------------
# Quarantine preview (issue 21)


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
        text = raw if isinstance(raw, str) else _row_json(raw)
        data = text.encode("utf-8", errors="surrogatepass")
    head = re.sub(r"\s+", " ", text[:PREVIEW_CHARS * 2])
    head = "".join("\ufffd" if unicodedata.category(c) == "Cc" else c for c in head)
    head = head.encode("utf-8", errors="backslashreplace").decode("utf-8")
    if len(text) > PREVIEW_CHARS * 2 or len(head) > PREVIEW_CHARS:
        head = head[:PREVIEW_CHARS - 1] + "…"
    return {"preview": head, "chars": len(text), "sha256": hashlib.sha256(data).hexdigest()}


def quarantine(location: str, field: str, reason: str, raw: Any) -> dict:
    """A quarantine row whose `row` is the bounded :func:`quarantine_preview` of `raw`."""
    return {"location": location, "field": field, "reason": reason, "row": quarantine_preview(raw)}


# --------------------------------------------------------------------------------------------------
# Reading a spec


@dataclass
class _Raw:
    location: str
    raw: str | bytes | None       # the text the row was read from (None: a structured row, previewed as JSON)
    value: Any = None
    error: RowError | None = None  # the row could not be decoded at all


@dataclass
class _Source:
    origin: str
    rows: list[_Raw]
    fingerprint: str


class _UnknownShape(RowError):
    """The row parsed but matches none of the shapes a loader reads (counts toward 'unknown format')."""


def _open(spec: str | os.PathLike, split: str | None = None) -> _Source:
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
            raise DataFormatError(text, "file", "not a regular file; pass a JSONL/JSON/Parquet file or a saved "
                                                "datasets folder")
        source = _read_file(path)
    elif _HUB_NAME.match(text) and path.suffix.lower() not in _JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES:
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
        raise DataFormatError(str(path), "file", f"unreadable: {_one_line(exc)}") from exc
    fingerprint = hashlib.sha256(data).hexdigest()
    if suffix in _PARQUET_SUFFIXES or _has_parquet_magic(data):
        return _Source(str(path), _parquet_rows(path), fingerprint)
    if suffix in _JSONL_SUFFIXES:
        return _Source(str(path), _jsonl_rows(path, data), fingerprint)
    if suffix in _JSON_SUFFIXES:
        body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        start = body.lstrip(b" \t\r\n")[:1]
        if start == b"[" or (start == b"{" and _single_document(body)):
            return _Source(str(path), _json_document_rows(path, body), fingerprint)
        return _Source(str(path), _jsonl_rows(path, data), fingerprint)
    raise DataFormatError(str(path), "file", f"unsupported file type {suffix or '(no suffix)'!r}; expected .jsonl, "
                                             ".ndjson, .json, .parquet/.pq or a saved datasets folder")


def _single_document(body: bytes) -> bool:
    """True if the whole file is one JSON value (a pretty-printed object); False for JSON Lines."""
    try:
        json.loads(body.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


def _has_parquet_magic(data: bytes) -> bool:
    return len(data) >= 8 and data[:4] == data[-4:] == _PARQUET_MAGIC


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
        return _Raw(location, line, error=RowError("row", f"broken JSON: {_one_line(exc)}"))


def _json_document_rows(path: Path, body: bytes) -> list[_Raw]:
    """A JSON array of rows (each located at the line where it starts), or a single object (line 1)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(str(path), "file", f"invalid UTF-8 at byte {exc.start}; re-export the file as "
                                                 "UTF-8") from exc
    decoder = json.JSONDecoder()

    def broken(exc: json.JSONDecodeError) -> DataFormatError:
        return DataFormatError(f"{path}:{exc.lineno}", "file", f"broken JSON at column {exc.colno}: {exc.msg}; "
                                                               "the file is one JSON document: fix or re-export it")

    def ws(i: int) -> int:
        return _JSON_WS.match(text, i).end()

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
        raise DataFormatError(str(path), "file", f"unreadable Parquet: {_one_line(exc)}; re-export the file") from exc
    return [_Raw(f"{path}:{i + 1}", None, row) for i, row in enumerate(records)]


def _read_saved_dataset(path: Path, split: str | None) -> _Source:
    if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        raise DataFormatError(str(path), "file", "a folder but not a saved datasets folder (no state.json or "
                                                 "dataset_dict.json); pass a file or Dataset.save_to_disk output")
    import datasets  # lazily: heavy, and only folders and hub names need it

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataFormatError(str(path), "file", f"unreadable saved dataset: {_one_line(exc)}") from exc
    origin = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            raise DataFormatError(str(path), "split", f"{'pass split=' if split is None else f'no split {split!r}'}"
                                                      f"; the dataset has splits {', '.join(names)}")
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
        raise DataFormatError(origin, "dataset", f"{'no such local path, and ' if bare else ''}cannot load it "
                                                 f"from the Hugging Face hub ({_one_line(exc)}); "
                                                 "with no network, save it elsewhere with Dataset.save_to_disk and "
                                                 "pass that folder, or pass a JSONL/Parquet file") from None
    source = _dataset_source(loaded, origin)
    if not source.rows:
        raise DataFormatError(origin, "dataset", "no rows; the split is empty")
    return source


def _dataset_source(dataset: Any, origin: str) -> _Source:
    rows = [_Raw(f"{origin}:{i + 1}", None, row) for i, row in enumerate(dataset)]
    return _Source(origin, rows, str(getattr(dataset, "_fingerprint", "")))


# --------------------------------------------------------------------------------------------------
# Row conversion driver


def _convert(source: _Source, convert: Callable[[Any, str], Any], what: str
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
        except _UnknownShape as err:
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
        raise DataFormatError(source.origin, "format", f"no row is {what} ({len(source.rows)} rows: "
                                                       f"{', '.join(kinds)}); check that this is the right file")
    return accepted, quarantined


def _ordered(quarantined: list[tuple[int, dict]]) -> list[dict]:
    return [q for _, q in sorted(quarantined, key=lambda item: item[0])]


# --------------------------------------------------------------------------------------------------
# 1. SFT rows


SFT_FORMATS = "`messages` (mlx-lm / TRL chat), `prompt` + `completion` (strings or TRL message lists), or `text`"


def load_sft_rows(spec: str | os.PathLike, *, system_prompt: str | None = None,
                  split: str | None = None) -> SftLoad:
    """SFT examples from a file, saved datasets folder or hub name, as canonical rows.

    Canonical row: ``{"id", "prompt": [messages up to the last assistant turn], "completion": str, "source":
    "<file>:<line>"}``; `id` is ``sha1(json.dumps([prompt, completion]))[:16]``. Row formats, detected per row by
    the non-null keys (Parquet/datasets rows carry every column, null where absent): `messages`, else `text` (with
    no `completion`), else `prompt` + `completion` (a row with `prompt` but no `completion` is quarantined as
    missing it, unless it has `chosen`/`rejected`: preference pairs are not SFT rows):

    * ``{"messages": [...]}`` (mlx-lm chat, TRL conversational): optional system turn first, any number of
      user/assistant turns, the last one an assistant turn. The last assistant turn is the completion; earlier
      assistant turns are context (not trained on). The message before it must be a user turn.
    * ``{"prompt", "completion"}``: strings (mlx-lm completions, TRL standard; the prompt becomes one user
      message), or TRL conversational lists (`prompt` messages ending with a user turn, `completion` exactly one
      assistant message). A message-list prompt with a string completion (the canonical form) is read as is.
    * ``{"text": str}``: prompt = [] and completion = the text: the whole text is trained on, with no chat
      template (mlx-lm's text format).

    Messages must be ``{"role", "content"}`` objects with string content and a role in system/user/assistant (a
    system message only first); extra keys are dropped. Empty completions and blank last user turns are
    quarantined. `system_prompt`, if given, is put first in every chat prompt that has no system message of its
    own (not in `text` rows).
    """
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
    source = _open(spec, split)

    def convert(value: Any, location: str) -> dict:
        prompt, completion = sft_example(value)
        if prompt and system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        return {"id": _content_id([prompt, completion]), "prompt": prompt, "completion": completion,
                "source": location}

    accepted, quarantined = _convert(source, convert, f"an SFT example ({SFT_FORMATS})")
    return SftLoad([row for _, row in accepted], _ordered(quarantined), len(source.rows),
                   source.fingerprint, source.origin)


def sft_example(row: Any) -> tuple[list[dict], str]:
    """(prompt messages, completion) of one SFT row in any supported format; raises RowError(field, reason)."""
    row = _object(row)
    if _present(row, "messages"):
        messages = _messages(row["messages"], "messages")
        last = messages[-1]
        if last["role"] != "assistant":
            raise RowError("messages", f"invalid conversation: the last message must be an assistant turn, got "
                                       f"{last['role']!r}")
        if not last["content"].strip():
            raise RowError(f"messages[{len(messages) - 1}].content", "empty string (the completion)")
        prompt = messages[:-1]
        _check_prompt_end(prompt, "messages", "the last assistant turn must follow a user turn")
        return prompt, last["content"]
    if _present(row, "text") and not _present(row, "completion"):
        text = _string(row, "text")
        if not text.strip():
            raise RowError("text", "empty string")
        return [], text
    if "completion" in row or ("prompt" in row and not {"chosen", "rejected"} & row.keys()):
        prompt = _prompt_messages(_required(row, "prompt"), "prompt")
        completion = _required(row, "completion")
        if isinstance(completion, list):
            turns = _messages(completion, "completion")
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise RowError("completion", f"invalid conversation: expected exactly one assistant message, got "
                                             f"{', '.join(m['role'] for m in turns)}")
            completion = turns[0]["content"]
        elif not isinstance(completion, str):
            raise RowError("completion", f"wrong type: expected a string or one assistant message, got "
                                         f"{_type_name(completion)}")
        _check_text("completion", completion)
        if not completion.strip():
            raise RowError("completion", "empty string")
        return prompt, completion
    raise _UnknownShape("row", f"unknown row format: expected {SFT_FORMATS}; got keys {_keys(row)}")


# --------------------------------------------------------------------------------------------------
# 2. Prompts


def load_prompts(spec: str | os.PathLike, *, system_prompt: str | None = None,
                 split: str | None = None) -> PromptLoad:
    """Prompt-only rows (generation prompts, evaluation prompts) as canonical rows.

    Canonical row: ``{"id", "prompt": [messages], "category": str | None, "reference": str | None, "source":
    "<file>:<line>"}``; `id` is ``sha1(json.dumps(prompt))[:16]``. The prompt comes from ``prompt`` (a string,
    which becomes one user message, or a message list), ``messages`` (a message list) or ``question`` (a string,
    used verbatim: dpoflow task items read this way get no answer instruction), in that order; a message list must
    end with a user turn. `category` is the row's ``category`` or else ``task`` (a string: used for per-category
    breakdowns); `reference` is ``reference`` or else ``answer`` (a string; numbers are written with ``str``).
    `system_prompt`, if given, is put first in every prompt that has no system message of its own.
    """
    source = _open(spec, split)

    def convert(value: Any, location: str) -> dict:
        row = _object(value)
        for key in ("prompt", "messages", "question"):
            if _present(row, key):
                prompt = _prompt_messages(row[key], key) if key != "question" else \
                    _prompt_messages(_string(row, key), key)
                break
        else:
            raise _UnknownShape("row", f"unknown row format: expected `prompt` (string or messages), `messages` "
                                       f"or `question`; got keys {_keys(row)}")
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        category = _optional_string(row, "category", "task")
        reference = _optional_string(row, "reference", "answer", numbers=True)
        return {"id": _content_id(prompt), "prompt": prompt, "category": category, "reference": reference,
                "source": location}

    accepted, quarantined = _convert(source, convert, "a prompt (`prompt`, `messages` or `question`)")
    return PromptLoad([row for _, row in accepted], _ordered(quarantined), len(source.rows),
                      source.fingerprint, source.origin)


# --------------------------------------------------------------------------------------------------
# 3a. Argilla preference exports


ARGILLA_PROMPT_FIELDS = ("prompt", "instruction", "input", "question")
ARGILLA_TIE_LABELS = ("tie", "equal", "same", "both", "neither", "none")
_ARGILLA_META = frozenset({"id", "status", "_server_id", "inserted_at", "updated_at", "external_id", "metadata",
                           "score", "vectors", "suggestions", "responses", "fields", "task", "category"})


def load_argilla(spec: str | os.PathLike, *, question: str | None = None, prompt_field: str | None = None,
                 response_fields: Sequence[str] | None = None, task: str | None = None,
                 split: str | None = None) -> PairLoad:
    """Preference pairs from an Argilla export of a preference dataset (fields: a prompt and two or more responses;
    a ranking question, or a label question naming the better response).

    Shapes read, per row (any file type of the module docstring, a saved folder or a hub name):

    * **Argilla 2.x flat** (``dataset.records.to_list(flatten=True)``, ``records.to_datasets()``, the data files of
      ``Dataset.to_hub``): fields as top-level columns, and for question ``q`` the columns ``q.responses`` (one value
      per annotator), ``q.responses.users`` and ``q.responses.status``::

        {"id": "r1", "status": "completed", "prompt": "Name a prime.", "response1": "7", "response2": "8",
         "preference.responses": [["response1", "response2"], ["response1", "response2"]],
         "preference.responses.users": ["u1", "u2"], "preference.responses.status": ["submitted", "submitted"]}

    * **Argilla 2.x nested** (``records.to_list()`` / ``Record.to_dict()``)::

        {"id": "r1", "fields": {"prompt": ..., "response1": ..., "response2": ...},
         "responses": {"preference": [{"value": ["response2", "response1"], "user_id": "u1", "status": "submitted"}]}}

    * **Argilla 1.x** (``FeedbackDataset.format_as("datasets")`` / ``push_to_huggingface``): fields as columns, and
      ``q`` a list of ``{"user_id", "value", "status"}`` (or, read back through ``datasets``, a struct of lists).

    Response values: a ranking as a list of option names best first (2.x), as ``[{"value", "rank"}]`` or
    ``{"value": [...], "rank": [...]}`` (1.x, equal ranks allowed); or a label naming the preferred response field
    (two response fields only; a label in ARGILLA_TIE_LABELS is a tie vote). Option names must be field names.
    Only responses with status ``submitted`` (or none) count; ``discarded`` and ``draft`` ones are ignored.

    Several annotators: each option's mean rank over the annotators who ranked it; chosen = best mean, rejected =
    worst mean (for two responses that is the majority vote). A tie at either end is quarantined (``tie`` when
    every annotator gave a tie, else ``conflict``); so are records with no counted response (``skipped`` when all
    were discarded, else ``missing annotation``). Pairs are label-only (no scores), ``source`` is
    ``argilla:<location>``, ``task`` is the record's ``task``/``category`` column (or metadata key), else the
    `task` argument.

    `question` (the question name), `prompt_field` (default: the first of ARGILLA_PROMPT_FIELDS present) and
    `response_fields` (for label questions; default: the string fields other than the prompt and Argilla's own
    columns, which must be exactly two) override the detection.
    """
    source = _open(spec, split)

    def convert(value: Any, location: str) -> tuple[dict, str]:
        row = _object(value)
        fields, questions = _argilla_record(row)
        name = _argilla_question(questions, fields, question)
        prompt_name = prompt_field or next((f for f in ARGILLA_PROMPT_FIELDS if f in fields), None)
        if prompt_name is None or fields.get(prompt_name) is None:
            raise RowError(prompt_field or "prompt", "missing field" + (
                "" if prompt_field else f" (none of {', '.join(ARGILLA_PROMPT_FIELDS)}; pass prompt_field=)"))
        prompt = _prompt_messages(fields[prompt_name], prompt_name)
        candidates = list(response_fields) if response_fields else \
            [k for k, v in fields.items() if k != prompt_name and isinstance(v, str) and k not in _ARGILLA_META]
        ballots, n_discarded, n_draft = [], 0, 0
        for i, (vote, status) in enumerate(questions[name]):
            if status == "discarded":
                n_discarded += 1
            elif status not in (None, "submitted"):
                n_draft += 1
            else:
                ballots.append(_argilla_ranks(vote, fields, candidates, f"{name}[{i}]"))
        if not ballots:
            if n_discarded and not n_draft:
                raise RowError(name, f"skipped: every response ({n_discarded}) was discarded")
            reason = f"no submitted response ({n_draft} draft)" if n_draft else "no response"
            raise RowError(name, f"missing annotation: {reason}")
        chosen, rejected = _aggregate_ranks(ballots, name)
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        pair_task = next((v for v in (row.get("task"), row.get("category"), meta.get("task"), meta.get("category"))
                          if isinstance(v, str)), task)
        pair = _label_pair(prompt, fields, chosen, rejected, pair_task, f"argilla:{location}")
        return pair, location

    accepted, quarantined = _convert(source, convert, "an Argilla record (fields plus a question's responses)")
    return PairLoad([p for _, (p, _) in accepted], _ordered(quarantined), len(source.rows),
                    [loc for loc, _ in accepted], fingerprint=source.fingerprint, origin=source.origin)


def _argilla_record(row: dict) -> tuple[dict, dict[str, list[tuple[Any, str | None]]]]:
    """(fields, {question: [(value, status), ...]}) of a record in any of the three export shapes."""
    if isinstance(row.get("fields"), dict) and isinstance(row.get("responses"), dict):  # 2.x nested
        questions = {}
        for name, responses in row["responses"].items():
            if responses is None:
                questions[name] = []
                continue
            if not isinstance(responses, list):
                raise RowError(f"responses.{name}", f"wrong type: expected a list, got {_type_name(responses)}")
            questions[name] = [_vote_entry(r, f"responses.{name}[{i}]") for i, r in enumerate(responses)]
        return row["fields"], questions
    flat = [k[: -len(".responses")] for k in row if k.endswith(".responses")]
    if flat:  # 2.x flat
        questions = {}
        for name in flat:
            values = row[f"{name}.responses"] or []
            statuses = row.get(f"{name}.responses.status") or []
            if not isinstance(values, list) or not isinstance(statuses, list):
                raise RowError(f"{name}.responses", "wrong type: expected lists of responses and statuses")
            if statuses and len(statuses) != len(values):
                raise RowError(f"{name}.responses.status", f"wrong type: {len(statuses)} statuses for "
                                                            f"{len(values)} responses")
            questions[name] = [(v, statuses[i] if statuses else None) for i, v in enumerate(values)]
        return {k: v for k, v in row.items() if "." not in k}, questions
    questions = {}
    for name, value in row.items():  # 1.x: a list of {user_id, value, status}, or that as a struct of lists
        if isinstance(value, dict) and isinstance(value.get("value"), list) and "status" in value:
            statuses = value.get("status") or [None] * len(value["value"])
            if not isinstance(statuses, list) or len(statuses) != len(value["value"]):
                raise RowError(f"{name}.status", "wrong type: expected one status per response")
            questions[name] = list(zip(value["value"], statuses, strict=True))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "value" in v and
                                                       ("status" in v or "user_id" in v) for v in value):
            questions[name] = [(v["value"], v.get("status")) for v in value]
        elif isinstance(value, list) and not value and f"{name}-suggestion" in row:
            questions[name] = []  # 1.x writes `<question>-suggestion` beside every question column
    if not questions:
        raise _UnknownShape("row", f"unknown row format: no Argilla responses (`<question>.responses`, nested "
                                   f"`responses` or 1.x response lists); got keys {_keys(row)}")
    return {k: v for k, v in row.items() if k not in questions and not k.endswith("-suggestion")
            and not k.endswith("-suggestion-metadata")}, questions


def _vote_entry(response: Any, where: str) -> tuple[Any, str | None]:
    if not isinstance(response, dict) or "value" not in response:
        raise RowError(where, f"wrong type: expected a {{value, user_id, status}} object, got {_type_name(response)}")
    return response["value"], response.get("status")


def _argilla_question(questions: dict[str, list], fields: dict, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in questions:
            raise RowError(wanted, f"missing field: no responses to question {_short(wanted)} (the record has "
                                   f"{', '.join(map(_short, questions)) or 'none'})")
        return wanted
    if len(questions) == 1:
        return next(iter(questions))

    def refers(value: Any) -> bool:
        if isinstance(value, str):
            return value in fields or value.strip().lower() in ARGILLA_TIE_LABELS
        if isinstance(value, dict):
            value = value.get("value")
        options = [v.get("value") if isinstance(v, dict) else v for v in value] if isinstance(value, list) else []
        return bool(options) and all(isinstance(o, str) and o in fields for o in options)

    ranked = [name for name, votes in questions.items() if any(refers(v) for v, _ in votes)]
    if len(ranked) == 1:
        return ranked[0]
    names = ", ".join(map(_short, questions))
    if not ranked and not any(questions.values()):
        raise RowError("responses", f"missing annotation: no response to any question ({names})")
    which = "several preference questions" if ranked else "no question's responses name a response field"
    raise RowError("responses", f"ambiguous: {which} ({names}); pass question=")


def _argilla_ranks(value: Any, fields: dict, candidates: list[str], where: str) -> dict[str, float]:
    """One annotator's ranks {field: rank}, 1 = best."""
    if isinstance(value, str):
        if len(candidates) != 2:
            raise RowError(where, f"wrong value: a label can only pair two response fields, the record has "
                                  f"{len(candidates)} ({', '.join(map(_short, candidates))}); pass response_fields=")
        if value.strip().lower() in ARGILLA_TIE_LABELS:
            return {candidates[0]: 1, candidates[1]: 1}
        if value not in candidates:
            raise RowError(where, f"wrong value: label {_short(value)} names no response field "
                                  f"({', '.join(candidates)})")
        return {value: 1, next(c for c in candidates if c != value): 2}
    if isinstance(value, dict) and isinstance(value.get("value"), list):  # 1.x read back: struct of lists
        ranks = value.get("rank")
        if not isinstance(ranks, list) or len(ranks) != len(value["value"]):
            raise RowError(where, "wrong value: expected one rank per ranked option")
        value = [{"value": v, "rank": r} for v, r in zip(value["value"], ranks, strict=True)]
    if not isinstance(value, list) or not value:
        raise RowError(where, f"wrong type: expected a ranking (list) or a label (string), got {_type_name(value)}")
    ranks: dict[str, float] = {}
    for i, item in enumerate(value):
        option, rank = (item.get("value"), item.get("rank")) if isinstance(item, dict) else (item, i + 1)
        if not isinstance(option, str) or option not in fields:
            raise RowError(where, f"wrong value: ranked option {_short(option)} is not a field of the record")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
            raise RowError(where, f"wrong type: rank of {_short(option)} must be a number, got {_type_name(rank)}")
        if option in ranks:
            raise RowError(where, f"wrong value: option {_short(option)} ranked twice")
        ranks[option] = float(rank)
    if len(ranks) < 2:
        raise RowError(where, "wrong value: a ranking needs at least two options")
    return ranks


def _aggregate_ranks(ballots: list[dict[str, float]], field: str) -> tuple[str, str]:
    """(chosen, rejected) by mean rank over the annotators who ranked each option; ties are RowErrors."""
    totals: dict[str, list[float]] = defaultdict(list)
    for ballot in ballots:
        for option, rank in ballot.items():
            totals[option].append(rank)
    means = {option: sum(r) / len(r) for option, r in totals.items()}
    best, worst = min(means.values()), max(means.values())
    top = [o for o, m in means.items() if m == best]
    bottom = [o for o, m in means.items() if m == worst]
    detail = ", ".join(f"{_short(o)} {m:.2f}" for o, m in means.items())
    if best == worst or len(top) > 1 or len(bottom) > 1:
        if all(len(set(b.values())) == 1 for b in ballots):
            raise RowError(field, f"tie: the annotators ranked the responses equal ({len(ballots)} responses)")
        raise RowError(field, f"conflict: annotators disagree and no response wins (mean ranks {detail}; "
                              f"{len(ballots)} annotators)")
    return top[0], bottom[0]


def _label_pair(prompt: list[dict], texts: dict, chosen_key: str, rejected_key: str, task: Any,
                source: str) -> dict:
    chosen = _response_text(texts.get(chosen_key), chosen_key)
    rejected = _response_text(texts.get(rejected_key), rejected_key)
    if chosen.strip() == rejected.strip():
        raise RowError(rejected_key, "chosen == rejected (identical responses)")
    return make_pair(prompt, chosen, rejected, None, None, task=task if isinstance(task, str) else None,
                     source=source)


# --------------------------------------------------------------------------------------------------
# 3b. Label Studio pairwise exports


LABEL_STUDIO_KEYS = (("answer1", "answer2"), ("text1", "text2"), ("response1", "response2"))


def load_label_studio(spec: str | os.PathLike, *, prompt_key: str = "prompt", left_key: str | None = None,
                      right_key: str | None = None, from_name: str | None = None,
                      task: str | None = None) -> PairLoad:
    """Preference pairs from a Label Studio JSON export of a pairwise project.

    The shape is Label Studio's "JSON" export (a list of tasks; also read: one task per JSON Lines line, or a
    single task object) of the "Human Preference collection for RLHF" template (``<Pairwise name="comparison"
    toName="answer1,answer2"/>``) or the "Pairwise Classification" one (``text1``/``text2``)::

        [{"id": 7, "data": {"prompt": "Name a prime.", "answer1": "7", "answer2": "8"},
          "annotations": [{"id": 1, "completed_by": 1, "was_cancelled": false,
                           "result": [{"from_name": "comparison", "to_name": "answer1,answer2", "type": "pairwise",
                                       "value": {"selected": "left"}}]}]}]

    ``selected: "left"`` prefers the left text (`left_key`, default the first of answer1/text1/response1 present in
    `data`), ``"right"`` the right one. `prompt_key` names the prompt (a string or a message list). Every annotation
    that is not cancelled (``was_cancelled``: skipped) and has a pairwise result (one with ``value.selected``; only
    `from_name`'s if given) is a vote; the majority wins. Quarantined: tasks with no annotations or no vote
    (``missing annotation``), only cancelled annotations (``skipped``), as many left as right votes (``conflict``),
    a `selected` other than left/right (``wrong value``). Predictions (pre-annotations) are ignored. Pairs are
    label-only, ``source`` is ``label_studio:<file>:<line>``, ``task`` is ``data.task`` or the `task` argument.
    """
    source = _open(spec)

    def convert(value: Any, location: str) -> tuple[dict, str]:
        row = _object(value)
        data = row.get("data")
        if not isinstance(data, dict):
            raise _UnknownShape("data", f"unknown row format: not a Label Studio task (no `data` object); got keys "
                                        f"{_keys(row)}")
        keys = (left_key, right_key) if left_key and right_key else next(
            (pair for pair in LABEL_STUDIO_KEYS if pair[0] in data and pair[1] in data), None)
        if keys is None:
            raise RowError("data", "missing field: no answer1/answer2, text1/text2 or response1/response2 (pass "
                                   "left_key= and right_key=)")
        if data.get(prompt_key) is None:
            raise RowError(f"data.{prompt_key}", "missing field")
        prompt = _prompt_messages(data[prompt_key], f"data.{prompt_key}")
        annotations = row.get("annotations")
        if not annotations:
            raise RowError("annotations", "missing annotation: the task has no annotations")
        if not isinstance(annotations, list):
            raise RowError("annotations", f"wrong type: expected a list, got {_type_name(annotations)}")
        votes = {"left": 0, "right": 0}
        n_cancelled = 0
        for i, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                raise RowError(f"annotations[{i}]", f"wrong type: expected an object, got {_type_name(annotation)}")
            if annotation.get("was_cancelled"):
                n_cancelled += 1
                continue
            results = annotation.get("result") or []
            if not isinstance(results, list):
                raise RowError(f"annotations[{i}].result", f"wrong type: expected a list, got {_type_name(results)}")
            selected = [r["value"]["selected"] for r in results
                        if isinstance(r, dict) and isinstance(r.get("value"), dict) and "selected" in r["value"]
                        and (from_name is None or r.get("from_name") == from_name)]
            if not selected:
                continue
            choices = {c if isinstance(c, str) else _short(c) for c in selected}
            if len(choices) > 1:
                raise RowError(f"annotations[{i}].result", "ambiguous: several pairwise results disagree; pass "
                                                           "from_name=")
            choice = selected[0]
            if not isinstance(choice, str) or choice not in votes:
                raise RowError(f"annotations[{i}].result", f"wrong value: selected must be 'left' or 'right', got "
                                                           f"{_short(choice)}")
            votes[choice] += 1
        if not votes["left"] and not votes["right"]:
            if n_cancelled == len(annotations):
                raise RowError("annotations", f"skipped: every annotation ({n_cancelled}) was cancelled")
            raise RowError("annotations", f"missing annotation: no pairwise choice in {len(annotations)} "
                                          "annotations")
        if votes["left"] == votes["right"]:
            raise RowError("annotations", f"conflict: annotators disagree ({votes['left']} left vs "
                                          f"{votes['right']} right)")
        chosen, rejected = keys if votes["left"] > votes["right"] else keys[::-1]
        texts = {key: data.get(key) for key in keys}
        pair = _label_pair(prompt, {f"data.{k}": v for k, v in texts.items()}, f"data.{chosen}",
                           f"data.{rejected}", data.get("task") or task, f"label_studio:{location}")
        return pair, location

    accepted, quarantined = _convert(source, convert, "a Label Studio task (`data` plus `annotations`)")
    return PairLoad([p for _, (p, _) in accepted], _ordered(quarantined), len(source.rows),
                    [loc for loc, _ in accepted], fingerprint=source.fingerprint, origin=source.origin)


# --------------------------------------------------------------------------------------------------
# 4. Production feedback


THUMBS = {"up": 1.0, "down": 0.0, True: 1.0, False: 0.0}


def feedback_pairs(spec: str | os.PathLike, *, rating_scale: tuple[float, float] | None = None,
                   task: str | None = None, split: str | None = None) -> FeedbackLoad:
    """Preference pairs from logged production feedback.

    Rows: ``{"prompt": str or messages ending with a user turn, "response": str, "rating": number}`` or with
    ``"thumbs"`` instead of ``rating``: "up"/"down" (any case), true/false, 1/0. Optional ``session_id`` (not used
    for pairing), ``task``/``category`` (the pair's task; else the `task` argument). A row with both uses `rating`.

    Scores in [0, 1]: thumbs up 1.0, down 0.0; a rating r becomes ``(r - low) / (high - low)`` with `rating_scale`
    = (low, high) if given (ratings outside it are quarantined as ``rating out of range``), else the lowest and
    highest rating observed in the input (all equal: 0.5).

    Rows are grouped by prompt: the messages with contents normalized by ``dpoflow.tasks.normalize_question``
    (NFKC, whitespace collapsed, case-folded), so a string prompt and one user message group together. Within a
    prompt, responses are compared after stripping whitespace; **duplicates are averaged**: a response logged
    several times scores the mean of its scores (`n_duplicate_responses` counts the repeats). Each prompt gives at
    most one pair: the best-scored response (the first logged among equals) as chosen, the worst (likewise) as
    rejected, their scores as the pair's scores (so the gap is their difference). A prompt with one distinct
    response or with all scores equal gives no pair: its rows are valid, counted in `n_unpaired_prompts`, not
    quarantined. The pair's prompt is the first logged row's; ``source`` is ``feedback:<location>`` of the chosen
    response's first row.
    """
    if rating_scale is not None:
        low, high = (float(x) for x in rating_scale)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"rating_scale must be (low, high) with low < high, got {rating_scale!r}")
    source = _open(spec, split)

    def convert(value: Any, location: str) -> dict:
        row = _object(value)
        if not any(key in row for key in ("response", "rating", "thumbs")):
            raise _UnknownShape("row", f"unknown row format: expected `prompt`, `response` and `rating` or "
                                       f"`thumbs`; got keys {_keys(row)}")
        prompt = _prompt_messages(_required(row, "prompt"), "prompt")
        response = _string(row, "response")
        if not response.strip():
            raise RowError("response", "empty string")
        if _present(row, "rating"):
            rating = row["rating"]
            if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
                raise RowError("rating", f"wrong type: expected a finite number, got {_type_name(rating)}")
            if rating_scale is not None and not low <= rating <= high:
                raise RowError("rating", f"rating out of range: {rating:g} is outside {low:g}-{high:g}")
            kind, score = "rating", float(rating)
        elif _present(row, "thumbs"):
            kind, score = "thumbs", _thumbs(row["thumbs"])
        else:
            raise RowError("rating", "missing field: expected `rating` (a number) or `thumbs` (up/down)")
        category = row.get("task") if isinstance(row.get("task"), str) else row.get("category")
        return {"prompt": prompt, "response": response, "kind": kind, "score": score,
                "task": category if isinstance(category, str) else task}

    accepted, quarantined = _convert(source, convert, "a feedback row (`prompt`, `response`, `rating`/`thumbs`)")
    ratings = [r["score"] for _, r in accepted if r["kind"] == "rating"]
    scale = (low, high) if rating_scale is not None else ((min(ratings), max(ratings)) if ratings else None)

    groups: dict[str, dict] = {}
    n_duplicates = 0
    for location, row in accepted:
        score = row["score"]
        if row["kind"] == "rating":
            score = 0.5 if scale[1] == scale[0] else (score - scale[0]) / (scale[1] - scale[0])
        key = json.dumps([[m["role"], normalize_question(m["content"])] for m in row["prompt"]])
        group = groups.setdefault(key, {"prompt": row["prompt"], "task": row["task"], "responses": {}})
        text = row["response"].strip()
        entry = group["responses"].get(text)
        if entry is None:
            group["responses"][text] = {"response": row["response"], "scores": [score], "location": location}
        else:
            n_duplicates += 1
            entry["scores"].append(score)

    pairs, locations, unpaired = [], [], 0
    for group in groups.values():
        entries = [(sum(e["scores"]) / len(e["scores"]), e) for e in group["responses"].values()]
        best = max(entries, key=lambda item: item[0])      # max/min return the first among equals
        worst = min(entries, key=lambda item: item[0])
        if len(entries) < 2 or best[0] == worst[0]:
            unpaired += 1
            continue
        (score_chosen, chosen), (score_rejected, rejected) = best, worst
        pairs.append(make_pair(group["prompt"], chosen["response"], rejected["response"], score_chosen,
                               score_rejected, task=group["task"], source=f"feedback:{chosen['location']}"))
        locations.append(chosen["location"])
    return FeedbackLoad(pairs=pairs, quarantined=_ordered(quarantined), n_input=len(source.rows),
                        n_accepted=len(accepted), n_prompts=len(groups), n_unpaired_prompts=unpaired,
                        n_duplicate_responses=n_duplicates, rating_scale=scale, fingerprint=source.fingerprint,
                        origin=source.origin, locations=locations)


def _thumbs(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in THUMBS:
        return THUMBS[value.strip().lower()]
    if isinstance(value, bool):
        return THUMBS[value]
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    raise RowError("thumbs", f"wrong value: expected up/down, true/false or 1/0, got {_short(value)}")


# --------------------------------------------------------------------------------------------------
# 5. Deterministic held-out split


def prompt_key(row: dict) -> str:
    """The default split key: the prompt's messages (roles + normalized contents); for a row with an empty prompt
    (SFT `text` rows) the normalized completion, so such rows do not all share one key."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt:
        return json.dumps([[m["role"], normalize_question(m["content"])] for m in prompt])
    return json.dumps(["completion", normalize_question(str(row.get("completion") or row.get("text") or ""))])


def split_rows(rows: Iterable[dict], fraction: float, seed: int,
               key: Callable[[dict], str] = prompt_key) -> tuple[list[dict], list[dict]]:
    """(kept, held_out): a row is held out iff ``sha256(f"{seed}\\0{key(row)}")`` as a number in [0, 1) is below
    `fraction`. Deterministic across runs and machines; disjoint by construction, and all rows with the same key
    (by default: the same prompt) land on the same side. Order is kept on both sides."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    kept, held = [], []
    for row in rows:
        digest = hashlib.sha256(f"{seed}\0{key(row)}".encode("utf-8", errors="surrogatepass")).digest()
        (held if int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction else kept).append(row)
    return kept, held


# --------------------------------------------------------------------------------------------------
# Validation helpers (raise RowError(field, reason))


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise _UnknownShape("row", f"not an object: got {_type_name(value)}")
    return value


def _present(row: dict, key: str) -> bool:
    """Columnar inputs (Parquet, datasets) carry every column in every row, null where absent."""
    return row.get(key) is not None


def _required(row: dict, key: str) -> Any:
    if key not in row:
        raise RowError(key, "missing field")
    if row[key] is None:
        raise RowError(key, "missing field (null)")
    return row[key]


def _string(row: dict, key: str) -> str:
    value = _required(row, key)
    if not isinstance(value, str):
        raise RowError(key, f"wrong type: expected string, got {_type_name(value)}")
    _check_text(key, value)
    return value


def _optional_string(row: dict, *keys: str, numbers: bool = False) -> str | None:
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)
        if not isinstance(value, str):
            raise RowError(key, f"wrong type: expected string{' or number' if numbers else ''}, got "
                                f"{_type_name(value)}")
        _check_text(key, value)
        return value
    return None


def _response_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "missing field")
    if not isinstance(value, str):
        raise RowError(field, f"wrong type: expected string, got {_type_name(value)}")
    _check_text(field, value)
    if not value.strip():
        raise RowError(field, "empty string")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    """A non-empty list of {role, content} with string content, roles in ROLES, a system message only first."""
    if not isinstance(value, list):
        raise RowError(field, f"wrong type: expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise RowError(field, "empty string (no messages)")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"wrong type: expected a {{role, content}} object, got {_type_name(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RowError(f"{where}.{key}", "missing field")
            if not isinstance(message[key], str):
                raise RowError(f"{where}.{key}", f"wrong type: expected string, got {_type_name(message[key])}")
        role = message["role"]
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unsupported role {_short(role)}: expected system, user or assistant")
        if role == "system" and i:
            raise RowError(f"{where}.role", "invalid conversation: a system message is only allowed first")
        _check_text(f"{where}.content", message["content"])
        messages.append({"role": role, "content": message["content"]})
    return messages


def _prompt_messages(value: Any, field: str) -> list[dict]:
    """A prompt: a non-blank string (one user message) or messages ending with a non-blank user turn."""
    if isinstance(value, str):
        _check_text(field, value)
        if not value.strip():
            raise RowError(field, "empty string")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RowError(field, f"wrong type: expected a string or a list of messages, got {_type_name(value)}")
    messages = _messages(value, field)
    _check_prompt_end(messages, field, "the prompt must end with a user turn")
    return messages


def _check_prompt_end(prompt: list[dict], field: str, why: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        got = repr(prompt[-1]["role"]) if prompt else "nothing"
        raise RowError(field, f"invalid conversation: {why}, got {got}")
    if not prompt[-1]["content"].strip():
        raise RowError(f"{field}[{len(prompt) - 1}].content", "empty string (the last user turn)")


def _check_text(field: str, text: str) -> None:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 writer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(field, f"invalid UTF-8: unpaired surrogate at character {exc.start}") from None


def _content_id(content: Any) -> str:
    return hashlib.sha1(json.dumps(content).encode("utf-8")).hexdigest()[:16]


def _row_json(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=repr)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = REASON_VALUE_CHARS) -> str:
    """A value quoted in a reason: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _keys(row: dict, limit: int = 6) -> str:
    names = [_short(str(k), 24) for k in list(row)[:limit]]
    return "[" + ", ".join(names) + (", …" if len(row) > limit else "") + "]"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
