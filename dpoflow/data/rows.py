"""Reading one raw row safely: field accessors that raise RowError with the field and a short reason, and the
bounded quarantine record of a row that could not be used (never a whole foreign line: PREVIEW_CHARS characters
and a sha256 of the raw bytes)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from dpoflow.data.pairs import (  # noqa: F401 (PREVIEW_CHARS, required_field, type_name: re-exported)
    PREVIEW_CHARS,
    RowError,
    as_message_list,
    check_text,
    quarantine_preview,
    required_field,
    role_and_content,
    type_name,
)

REASON_VALUE_CHARS = 40  # an input value quoted in a reason is cut to this many characters
ROLES = ("system", "user", "assistant")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
JSON_WS = re.compile(r"[ \t\n\r]*")

# Quarantine preview (issue 21): quarantine_preview lives in dpoflow.data.pairs, which every pair reader uses


class UnknownShape(RowError):
    """The row parsed but matches none of the shapes a loader reads (counts toward 'unknown format')."""


def quarantine(location: str, field: str, reason: str, raw: Any) -> dict:
    """A quarantine row whose `row` is the bounded :func:`quarantine_preview` of `raw`."""
    return {"location": location, "field": field, "reason": reason, "row": quarantine_preview(raw)}


# --------------------------------------------------------------------------------------------------

# Validation helpers (raise RowError(field, reason))


def as_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise UnknownShape("row", f"not an object: got {type_name(value)}")
    return value


def present(row: dict, key: str) -> bool:
    """Columnar inputs (Parquet, datasets) carry every column in every row, null where absent."""
    return row.get(key) is not None


def string_field(row: dict, key: str) -> str:
    value = required_field(row, key)
    if not isinstance(value, str):
        raise RowError(key, f"wrong type: expected string, got {type_name(value)}")
    check_text(key, value)
    return value


def optional_string(row: dict, *keys: str, numbers: bool = False) -> str | None:
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)
        if not isinstance(value, str):
            raise RowError(key, f"wrong type: expected string{' or number' if numbers else ''}, got {type_name(value)}")
        check_text(key, value)
        return value
    return None


def response_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "missing field")
    if not isinstance(value, str):
        raise RowError(field, f"wrong type: expected string, got {type_name(value)}")
    check_text(field, value)
    if not value.strip():
        raise RowError(field, "empty string")
    return value


def parse_messages(value: Any, field: str) -> list[dict]:
    """A non-empty list of {role, content} with string content, roles in ROLES, a system message only first."""
    items = as_message_list(value, field)
    if not items:
        raise RowError(field, "empty string (no messages)")
    messages = []
    for i, message in enumerate(items):
        where = f"{field}[{i}]"
        role, content = role_and_content(message, where)
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unsupported role {short_value(role)}: expected system, user or assistant")
        if role == "system" and i:
            raise RowError(f"{where}.role", "invalid conversation: a system message is only allowed first")
        check_text(f"{where}.content", content)
        messages.append({"role": role, "content": content})
    return messages


def prompt_messages(value: Any, field: str) -> list[dict]:
    """A prompt: a non-blank string (one user message) or messages ending with a non-blank user turn."""
    if isinstance(value, str):
        check_text(field, value)
        if not value.strip():
            raise RowError(field, "empty string")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RowError(field, f"wrong type: expected a string or a list of messages, got {type_name(value)}")
    messages = parse_messages(value, field)
    check_prompt_end(messages, field, "the prompt must end with a user turn")
    return messages


def check_prompt_end(prompt: list[dict], field: str, why: str) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        got = repr(prompt[-1]["role"]) if prompt else "nothing"
        raise RowError(field, f"invalid conversation: {why}, got {got}")
    if not prompt[-1]["content"].strip():
        raise RowError(f"{field}[{len(prompt) - 1}].content", "empty string (the last user turn)")


def content_id(content: Any) -> str:
    return hashlib.sha1(json.dumps(content).encode("utf-8")).hexdigest()[:16]


def row_json(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=repr)


def short_value(value: Any, limit: int = REASON_VALUE_CHARS) -> str:
    """A value quoted in a reason: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_list(row: dict, limit: int = 6) -> str:
    names = [short_value(str(k), 24) for k in list(row)[:limit]]
    return "[" + ", ".join(names) + (", …" if len(row) > limit else "") + "]"


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
