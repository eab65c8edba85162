"""Preference-pair formats in and out: import, canonical Parquet/JSONL, quarantine.

Every supported input format is converted into the canonical pair row of docs/architecture.md:

    {"id", "prompt": [{"role", "content"}, ...], "chosen", "rejected",
     "score_chosen", "score_rejected", "task", "source"}

Rows that cannot be converted are never dropped silently and never raise: they become quarantine rows
``{"location": "<file>:<line>", "field", "reason", "row"}``.  Only problems with a whole file (missing,
unreadable Parquet, unknown format name) raise :class:`DataFormatError`.  The formats, the score
normalization and every quarantine reason are documented in docs/preference-data-generation.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dpoflow.io import atomic_path, write_jsonl

FORMATS = ("auto", "plain", "trl", "ultrafeedback", "hh", "canonical")
COLUMNS = ("id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "task", "source")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
PAIR_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.list_(MESSAGE_TYPE)),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("score_chosen", pa.float64()),
    ("score_rejected", pa.float64()),
    ("task", pa.string()),
    ("source", pa.string()),
])

# Score scales that can be inferred: 1 means "already in [0, 1]"; k > 1 means a 1..k rating.
INFERABLE_SCALES = (1, 5, 10)
QUARANTINE_ROW_CHARS = 2000  # the original row kept in a quarantine row is cut to this many characters
_PARQUET_MAGIC = b"PAR1"
_PARQUET_SUFFIXES = (".parquet", ".pq")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # other names: Parquet if the bytes say so, else JSONL
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class DataFormatError(ValueError):
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
                f"{len(self.pairs)} pairs + {len(self.quarantined)} quarantined")
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


def make_pair(prompt: list[dict], chosen: str, rejected: str, score_chosen: float | None = None,
              score_rejected: float | None = None, task: str | None = None, source: str = "unknown") -> dict:
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


def quarantine_row(location: str, field: str, reason: str, row: Any) -> dict:
    """A quarantine row; the original row is made JSON-safe and cut to QUARANTINE_ROW_CHARS characters."""
    return {"location": location, "field": field, "reason": reason, "row": _truncated(row)}


# --------------------------------------------------------------------------------------------------
# Loading


def load_pairs(path: str | os.PathLike, fmt: str = "auto", *, score_scale: float | None = None,
               max_chars: int | None = None, max_tokens: int | None = None,
               count_tokens: Callable[[str], int] | None = None, task: str | None = None) -> LoadResult:
    """Load a local JSONL or Parquet file of preference pairs in any supported format.

    The file type comes from the suffix (.parquet/.pq; .jsonl/.ndjson/.json), else from Parquet's magic bytes.

    `fmt` is one of FORMATS ("auto" detects per row).  `score_scale`: 1 = scores already in [0, 1],
    k > 1 = ratings on 1..k mapped by (s - 1) / (k - 1); None infers it from the file (see the docs).
    Rows longer than `max_chars` characters, or `max_tokens` tokens by `count_tokens`, are quarantined.
    """
    _check_format(fmt, str(path))
    records = _read_records(Path(path))
    return _convert_records(records, fmt, score_scale=score_scale, max_chars=max_chars,
                           max_tokens=max_tokens, count_tokens=count_tokens, task=task)


def load_hub_pairs(name: str, split: str = "train", fmt: str = "auto", **kwargs: Any) -> LoadResult:
    """Load a Hugging Face hub dataset with ``datasets.load_dataset`` (needs network or a warm cache).

    Locations read ``<name>[<split>]:<row>``; other keyword arguments are those of :func:`load_pairs`.
    """
    import datasets  # imported lazily: heavy, and only this path needs it

    origin = f"{name}[{split}]"
    _check_format(fmt, origin)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # any failure to fetch or parse the dataset is a whole-input problem
        raise DataFormatError(origin, "dataset", f"cannot load: {exc}") from exc
    return convert_rows(dataset, origin, fmt, **kwargs)


def convert_rows(rows: Iterable[Any], origin: str = "<pairs>", fmt: str = "auto", **kwargs: Any) -> LoadResult:
    """Convert in-memory rows (dicts in any supported format); row i is located at ``<origin>:<i+1>``."""
    _check_format(fmt, origin)
    records = (_Record(f"{origin}:{i + 1}", row) for i, row in enumerate(rows))
    return _convert_records(records, fmt, **kwargs)


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Read a canonical pairs file (Parquet or JSONL); any bad row raises DataFormatError."""
    result = load_pairs(path, fmt="canonical")
    if result.quarantined:
        first = result.quarantined[0]
        raise DataFormatError(first["location"], first["field"], first["reason"])
    return result.pairs


def write_pairs(rows: list[dict], parquet_path: str | os.PathLike,
                jsonl_path: str | os.PathLike | None = None) -> None:
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
class _Record:
    location: str
    value: Any = None
    error: RowError | None = None  # set when the line itself could not be decoded


def _check_format(fmt: str, location: str) -> None:
    if fmt not in FORMATS:
        raise DataFormatError(location, "fmt", f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _read_records(path: Path) -> Iterator[_Record]:
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


def _read_parquet(path: Path) -> Iterator[_Record]:
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataFormatError(str(path), "file", f"unreadable Parquet: {exc}") from exc
    return (_Record(f"{path}:{i + 1}", row) for i, row in enumerate(rows))


def _read_jsonl(path: Path) -> Iterator[_Record]:
    """One record per non-blank line; blank lines are not rows. Line numbers are 1-based."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        location = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            snippet = raw.decode("utf-8", errors="replace")
            yield _Record(location, snippet, RowError("row", f"invalid UTF-8 at byte {exc.start}"))
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            yield _Record(location, text, RowError("row", "broken JSON: nested too deeply"))
            continue
        except ValueError as exc:  # JSONDecodeError, and int-digit limits
            yield _Record(location, text, RowError("row", f"broken JSON: {exc}"))
            continue
        yield _Record(location, value)


# --------------------------------------------------------------------------------------------------
# Conversion


def _convert_records(records: Iterable[_Record], fmt: str = "auto", *, score_scale: float | None = None,
                    max_chars: int | None = None, max_tokens: int | None = None,
                    count_tokens: Callable[[str], int] | None = None, task: str | None = None) -> LoadResult:
    """Convert raw records; scores are normalized in a second pass once the scale is known."""
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs count_tokens")
    if score_scale is not None and score_scale < 1:
        raise ValueError(f"score_scale must be 1 (scores in [0, 1]) or a rating maximum > 1, got {score_scale}")
    staged: list[tuple[int, str, dict, Any]] = []  # (order, location, pair with raw scores, raw row)
    quarantined: list[tuple[int, dict]] = []
    n_input = 0
    for order, record in enumerate(records):
        n_input += 1
        if record.error is not None:
            quarantined.append((order, quarantine_row(record.location, record.error.field,
                                                      record.error.reason, record.value)))
            continue
        try:
            pair = convert_row(record.value, fmt, source=f"import:{record.location}", task=task)
            _check_length(pair, max_chars, max_tokens, count_tokens)
        except RowError as err:
            quarantined.append((order, quarantine_row(record.location, err.field, err.reason, record.value)))
            continue
        staged.append((order, record.location, pair, record.value))

    scale = score_scale if score_scale is not None else (1 if fmt == "canonical" else _infer_scale(staged))
    pairs: list[tuple[int, str, dict]] = []
    for order, location, pair, raw in staged:
        try:
            for key in ("score_chosen", "score_rejected"):
                pair[key] = normalize_score(pair[key], scale, key)
        except RowError as err:
            quarantined.append((order, quarantine_row(location, err.field, err.reason, raw)))
            continue
        pairs.append((order, location, pair))

    quarantined.sort(key=lambda item: item[0])
    return LoadResult(pairs=[p for _, _, p in pairs], quarantined=[q for _, q in quarantined],
                      n_input=n_input, locations=[loc for _, loc, _ in pairs])


def detect_format(row: dict) -> str:
    """Which format a row is in (see the docs): by the types of `prompt` and `chosen`."""
    prompt, chosen = row.get("prompt"), row.get("chosen")
    if isinstance(chosen, list):
        return "ultrafeedback" if isinstance(prompt, str) else "trl"
    if isinstance(chosen, str) and prompt is None and ("Human:" in chosen or "Assistant:" in chosen):
        return "hh"
    if isinstance(prompt, list):
        return "canonical"
    return "plain"


def convert_row(row: Any, fmt: str = "auto", *, source: str = "unknown", task: str | None = None) -> dict:
    """Convert one row to a canonical pair with *raw* scores; raises RowError(field, reason)."""
    if not isinstance(row, dict):
        raise RowError("row", f"not an object: got {_type_name(row)}")
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind == "plain":
        prompt = [{"role": "user", "content": _string(row, "prompt")}]
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    elif kind == "canonical":
        prompt = _messages(_required(row, "prompt"), "prompt")
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    elif kind in ("trl", "ultrafeedback"):
        prompt, chosen, rejected = _conversational(row, kind)
    elif kind == "hh":
        prompt, chosen, rejected = _hh(_string(row, "chosen"), _string(row, "rejected"))
    else:
        raise RowError("fmt", f"unknown format {kind!r}")

    _check_prompt(prompt)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowError(name, "empty string")
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "chosen == rejected (identical responses)")
    row_task, row_source = row.get("task"), row.get("source")
    _check_unicode(prompt, chosen, rejected, row_task, row_source)

    score_chosen, score_rejected = _raw_score(row, "score_chosen"), _raw_score(row, "score_rejected")
    if (score_chosen is None) != (score_rejected is None):
        given, missing = ("score_chosen", "score_rejected") if score_rejected is None else \
            ("score_rejected", "score_chosen")
        raise RowError(missing, f"missing field ({given} is given, so both scores are required)")

    keep_source = kind == "canonical" and isinstance(row_source, str) and row_source
    return make_pair(prompt, chosen, rejected, score_chosen, score_rejected,
                     task=row_task if isinstance(row_task, str) else task,
                     source=row_source if keep_source else source)


def normalize_score(score: float | None, scale: float, field: str = "score") -> float | None:
    """Map a raw score to [0, 1]: scale 1 keeps it; scale k > 1 maps a 1..k rating by (s - 1) / (k - 1)."""
    if score is None:
        return None
    low = 0 if scale == 1 else 1
    if not low <= score <= scale:
        raise RowError(field, f"score out of range: {score} is outside the {low}-{scale:g} scale "
                              "(pass score_scale if the scale was inferred wrongly)")
    return float(score) if scale == 1 else (score - 1) / (scale - 1)


def _infer_scale(staged: list[tuple[int, str, dict, Any]]) -> float:
    """The smallest of INFERABLE_SCALES covering every raw score (10 if none does)."""
    scores = [p[k] for _, _, p, _ in staged for k in ("score_chosen", "score_rejected") if p[k] is not None]
    top = max(scores, default=0.0)
    return next((s for s in INFERABLE_SCALES if top <= s), INFERABLE_SCALES[-1])


def _check_length(pair: dict, max_chars: int | None, max_tokens: int | None,
                  count_tokens: Callable[[str], int] | None) -> None:
    """Over-long: prompt + the longer response exceeds max_chars characters or max_tokens tokens."""
    limits = []
    if max_chars is not None:
        limits.append(("chars", max_chars, len))
    if max_tokens is not None and count_tokens is not None:
        limits.append(("tokens", max_tokens, count_tokens))
    if not limits:
        return
    text = prompt_text(pair["prompt"])
    for unit, limit, measure in limits:
        n_prompt = measure(text)
        for name in ("chosen", "rejected"):
            total = n_prompt + measure(pair[name])
            if total > limit:
                raise RowError(name, f"over-long: prompt + {name} is {total} {unit} > {limit}")


def _conversational(row: dict, kind: str) -> tuple[list[dict], str, str]:
    """TRL conversational / UltraFeedback: the last assistant message of chosen/rejected is the response;
    the messages before it (identical in both) extend the prompt."""
    if kind == "ultrafeedback":
        prompt = [{"role": "user", "content": _string(row, "prompt")}]
    else:
        raw_prompt = row.get("prompt")
        prompt = [] if raw_prompt is None else _messages(raw_prompt, "prompt")
    chosen = _messages(_required(row, "chosen"), "chosen")
    rejected = _messages(_required(row, "rejected"), "rejected")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise RowError(name, "empty string (no messages)")
        if messages[-1]["role"] != "assistant":
            raise RowError(name, f"invalid conversation: the last message must be an assistant turn, "
                                 f"got {messages[-1]['role']!r}")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "invalid conversation: chosen and rejected continue different conversations")
    return _merge_prompt(prompt, chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def _merge_prompt(prompt: list[dict], history: list[dict]) -> list[dict]:
    """Append the shared history to the prompt unless the history already starts with the prompt."""
    if not history:
        return prompt
    head = history[:len(prompt)]
    if len(head) == len(prompt) and all(a["role"] == b["role"] and a["content"].strip() == b["content"].strip()
                                        for a, b in zip(head, prompt)):
        return history
    return prompt + history


def _hh(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Anthropic-HH: the longest shared prefix ending at the last "\\n\\nAssistant:" is the prompt."""
    chosen, rejected = _hh_normalize(chosen), _hh_normalize(rejected)
    shared = os.path.commonprefix([chosen, rejected])
    marker = "\n\nAssistant:"
    cut = shared.rfind(marker)
    if cut < 0:
        raise RowError("chosen", "unparsable HH transcript: no shared '\\n\\nAssistant:' turn")
    cut += len(marker)
    parts = _HH_TURN.split(chosen[:cut])
    if parts[0].strip():
        raise RowError("chosen", "unparsable HH transcript: text before the first '\\n\\nHuman:' turn")
    turns = [(_HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])]
    if turns[0][0] != "user":
        raise RowError("chosen", "unparsable HH transcript: the first turn is not a Human turn")
    turns.pop()  # the final, empty Assistant turn is where the responses start
    responses = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        response = text[cut:]
        if _HH_TURN.search(response):
            raise RowError(name, "unparsable HH transcript: the response continues with further turns")
        responses.append(response.strip())
    return [{"role": role, "content": content} for role, content in turns], responses[0], responses[1]


def _hh_normalize(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return "\n\n" + text if text.startswith(("Human:", "Assistant:")) else text


def _check_prompt(prompt: list[dict]) -> None:
    if not prompt:
        raise RowError("prompt", "empty string (no messages)")
    if not any(m["content"].strip() for m in prompt):
        raise RowError("prompt", "empty string")
    if prompt[-1]["role"] == "assistant":
        raise RowError("prompt", "invalid conversation: the prompt must not end with an assistant turn")


def _check_unicode(prompt: list[dict], chosen: str, rejected: str, task: Any, source: Any) -> None:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 writer accepts."""
    texts = [(f"prompt[{i}].{key}", m[key]) for i, m in enumerate(prompt) for key in ("role", "content")]
    texts += [("chosen", chosen), ("rejected", rejected), ("task", task), ("source", source)]
    for name, text in texts:
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RowError(name, f"invalid UTF-8: unpaired surrogate at character {exc.start}") from None


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
    return value


def _messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(name, f"wrong type: expected a list of {{role, content}} messages, got {_type_name(value)}")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, f"wrong type: expected a {{role, content}} object, got {_type_name(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RowError(f"{where}.{key}", "missing field")
            if not isinstance(message[key], str):
                raise RowError(f"{where}.{key}", f"wrong type: expected string, got {_type_name(message[key])}")
        if not message["role"].strip():
            raise RowError(f"{where}.role", "empty string")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _raw_score(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(key, f"wrong type: expected a number, got {_type_name(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise RowError(key, f"wrong type: expected a finite number, got {value}")
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _truncated(row: Any) -> Any:
    """The row made JSON-safe; if its JSON is longer than QUARANTINE_ROW_CHARS, a cut string instead."""
    safe = _json_safe(row)
    text = json.dumps(safe, ensure_ascii=False)
    if len(text) <= QUARANTINE_ROW_CHARS:
        return safe
    return f"{text[:QUARANTINE_ROW_CHARS]}... [truncated, {len(text)} chars]"


def _json_safe(value: Any, depth: int = 0) -> Any:
    if depth > 32:
        return "... [nested too deeply]"
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 1024 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {_json_safe(str(k), depth + 1): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return _json_safe(repr(value), depth + 1)
