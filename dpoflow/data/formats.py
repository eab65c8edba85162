"""External preference-pair formats -> canonical pairs (dpoflow.data.pairs): plain, TRL (standard and
conversational), UltraFeedback-binarized, Anthropic-HH, canonical; JSONL, Parquet or a `datasets` name. The formats,
the score normalization and every quarantine reason are documented in docs/preference-data-generation.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dpoflow.data.pairs import (
    DataFormatError,
    LoadResult,
    Record,
    RowError,
    as_message_list,
    check_format,
    check_text,
    make_pair,
    prompt_text,
    quarantine_row,
    read_records,
    required_field,
    role_and_content,
    type_name,
)

# Score scales that can be inferred: 1 means "already in [0, 1]"; k > 1 means a 1..k rating.
INFERABLE_SCALES = (1, 5, 10)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

# --------------------------------------------------------------------------------------------------
# Loading


def load_pairs(
    path: str | os.PathLike,
    fmt: str = "auto",
    *,
    score_scale: float | None = None,
    max_chars: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    task: str | None = None,
) -> LoadResult:
    """Load a local JSONL or Parquet file of preference pairs in any supported format.

    The file type comes from the suffix (.parquet/.pq; .jsonl/.ndjson/.json), else from Parquet's magic bytes.

    `fmt` is one of FORMATS ("auto" detects per row).  `score_scale`: 1 = scores already in [0, 1],
    k > 1 = ratings on 1..k mapped by (s - 1) / (k - 1); None infers it from the file (see the docs).
    Rows longer than `max_chars` characters, or `max_tokens` tokens by `count_tokens`, are quarantined.
    """
    check_format(fmt, str(path))
    records = read_records(Path(path))
    return _convert_records(
        records,
        fmt,
        score_scale=score_scale,
        max_chars=max_chars,
        max_tokens=max_tokens,
        count_tokens=count_tokens,
        task=task,
    )


def load_hub_pairs(name: str, split: str = "train", fmt: str = "auto", **kwargs: Any) -> LoadResult:
    """Load a Hugging Face hub dataset with ``datasets.load_dataset`` (needs network or a warm cache).

    Locations read ``<name>[<split>]:<row>``; other keyword arguments are those of :func:`load_pairs`.
    """
    import datasets  # imported lazily: heavy, and only this path needs it

    origin = f"{name}[{split}]"
    check_format(fmt, origin)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # any failure to fetch or parse the dataset is a whole-input problem
        raise DataFormatError(origin, "dataset", f"cannot load: {exc}") from exc
    return convert_rows(dataset, origin, fmt, **kwargs)


def convert_rows(rows: Iterable[Any], origin: str = "<pairs>", fmt: str = "auto", **kwargs: Any) -> LoadResult:
    """Convert in-memory rows (dicts in any supported format); row i is located at ``<origin>:<i+1>``."""
    check_format(fmt, origin)
    records = (Record(f"{origin}:{i + 1}", row) for i, row in enumerate(rows))
    return _convert_records(records, fmt, **kwargs)


# --------------------------------------------------------------------------------------------------
# Conversion


def _convert_records(
    records: Iterable[Record],
    fmt: str = "auto",
    *,
    score_scale: float | None = None,
    max_chars: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    task: str | None = None,
) -> LoadResult:
    """Convert raw records; scores are normalized in a second pass once the scale is known."""
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs count_tokens")
    if score_scale is not None and score_scale < 1:
        raise ValueError(f"score_scale must be 1 (scores in [0, 1]) or a rating maximum > 1, got {score_scale}")
    staged: list[tuple[int, Record, dict]] = []  # (order, record, pair with raw scores)
    quarantined: list[tuple[int, dict]] = []
    n_input = 0
    for order, record in enumerate(records):
        n_input += 1
        if record.error is not None:
            error = record.error
            quarantined.append((order, quarantine_row(record.location, error.field, error.reason, None, record.raw)))
            continue
        try:
            pair = convert_row(record.value, fmt, source=f"import:{record.location}", task=task)
            _check_length(pair, max_chars, max_tokens, count_tokens)
        except RowError as err:
            quarantined.append(
                (order, quarantine_row(record.location, err.field, err.reason, record.value, record.raw))
            )
            continue
        staged.append((order, record, pair))

    scale = score_scale if score_scale is not None else (1 if fmt == "canonical" else _infer_scale(staged))
    pairs: list[tuple[int, str, dict]] = []
    for order, record, pair in staged:
        try:
            for key in ("score_chosen", "score_rejected"):
                pair[key] = normalize_score(pair[key], scale, key)
        except RowError as err:
            quarantined.append(
                (order, quarantine_row(record.location, err.field, err.reason, record.value, record.raw))
            )
            continue
        pairs.append((order, record.location, pair))

    quarantined.sort(key=lambda item: item[0])
    return LoadResult(
        pairs=[p for _, _, p in pairs],
        quarantined=[q for _, q in quarantined],
        n_input=n_input,
        locations=[loc for _, loc, _ in pairs],
    )


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
        raise RowError("row", f"not an object: got {type_name(row)}")
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind == "plain":
        prompt = [{"role": "user", "content": _string(row, "prompt")}]
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    elif kind == "canonical":
        prompt = _messages(required_field(row, "prompt"), "prompt")
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
        given, missing = (
            ("score_chosen", "score_rejected") if score_rejected is None else ("score_rejected", "score_chosen")
        )
        raise RowError(missing, f"missing field ({given} is given, so both scores are required)")

    keep_source = kind == "canonical" and isinstance(row_source, str) and row_source
    return make_pair(
        prompt,
        chosen,
        rejected,
        score_chosen,
        score_rejected,
        task=row_task if isinstance(row_task, str) else task,
        source=row_source if keep_source else source,
    )


def normalize_score(score: float | None, scale: float, field: str = "score") -> float | None:
    """Map a raw score to [0, 1]: scale 1 keeps it; scale k > 1 maps a 1..k rating by (s - 1) / (k - 1)."""
    if score is None:
        return None
    low = 0 if scale == 1 else 1
    if not low <= score <= scale:
        raise RowError(
            field,
            f"score out of range: {score} is outside the {low}-{scale:g} scale "
            "(pass score_scale if the scale was inferred wrongly)",
        )
    return float(score) if scale == 1 else (score - 1) / (scale - 1)


def _infer_scale(staged: list[tuple[int, Record, dict]]) -> float:
    """The smallest of INFERABLE_SCALES covering every raw score (10 if none does)."""
    scores = [p[k] for _, _, p in staged for k in ("score_chosen", "score_rejected") if p[k] is not None]
    top = max(scores, default=0.0)
    return next((s for s in INFERABLE_SCALES if top <= s), INFERABLE_SCALES[-1])


def _check_length(
    pair: dict, max_chars: int | None, max_tokens: int | None, count_tokens: Callable[[str], int] | None
) -> None:
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
    chosen = _messages(required_field(row, "chosen"), "chosen")
    rejected = _messages(required_field(row, "rejected"), "rejected")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise RowError(name, "empty string (no messages)")
        if messages[-1]["role"] != "assistant":
            raise RowError(
                name, f"invalid conversation: the last message must be an assistant turn, got {messages[-1]['role']!r}"
            )
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "invalid conversation: chosen and rejected continue different conversations")
    return _merge_prompt(prompt, chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def _merge_prompt(prompt: list[dict], history: list[dict]) -> list[dict]:
    """Append the shared history to the prompt unless the history already starts with the prompt."""
    if not history:
        return prompt
    head = history[: len(prompt)]
    if len(head) == len(prompt) and all(
        a["role"] == b["role"] and a["content"].strip() == b["content"].strip() for a, b in zip(head, prompt)
    ):
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
        if isinstance(text, str):
            check_text(name, text)


def _string(row: dict, key: str) -> str:
    value = required_field(row, key)
    if not isinstance(value, str):
        raise RowError(key, f"wrong type: expected string, got {type_name(value)}")
    return value


def _messages(value: Any, name: str) -> list[dict]:
    messages = []
    for i, message in enumerate(as_message_list(value, name)):
        where = f"{name}[{i}]"
        role, content = role_and_content(message, where)
        if not role.strip():
            raise RowError(f"{where}.role", "empty string")
        messages.append({"role": role, "content": content})
    return messages


def _raw_score(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(key, f"wrong type: expected a number, got {type_name(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise RowError(key, f"wrong type: expected a finite number, got {value}")
    return value


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Read a canonical pairs file (Parquet or JSONL); any bad row raises DataFormatError."""
    result = load_pairs(path, fmt="canonical")
    if result.quarantined:
        first = result.quarantined[0]
        raise DataFormatError(first["location"], first["field"], first["reason"])
    return result.pairs
