"""The user's SFT rows and prompt sets in the formats people have, to canonical rows, and the seeded splits of them
(reading and quarantine: dpoflow.data.reading)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from dpoflow.data.pairs import RowError
from dpoflow.data.reading import PromptLoad, SftLoad, convert_records, in_input_order, open_input
from dpoflow.data.rows import (
    UnknownShape,
    as_object,
    check_prompt_end,
    check_text,
    content_id,
    key_list,
    optional_string,
    parse_messages,
    present,
    prompt_messages,
    required_field,
    string_field,
    type_name,
)
from dpoflow.data.tasks import normalize_question

# SFT rows


SFT_FORMATS = "`messages` (mlx-lm / TRL chat), `prompt` + `completion` (strings or TRL message lists), or `text`"


def load_sft_rows(spec: str | os.PathLike, *, system_prompt: str | None = None, split: str | None = None) -> SftLoad:
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
    source = open_input(spec, split)

    def convert(value: Any, location: str) -> dict:
        prompt, completion = sft_example(value)
        if prompt and system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        return {"id": content_id([prompt, completion]), "prompt": prompt, "completion": completion, "source": location}

    accepted, quarantined = convert_records(source, convert, f"an SFT example ({SFT_FORMATS})")
    return SftLoad(
        [row for _, row in accepted], in_input_order(quarantined), len(source.rows), source.fingerprint, source.origin
    )


def sft_example(row: Any) -> tuple[list[dict], str]:
    """(prompt messages, completion) of one SFT row in any supported format; raises RowError(field, reason)."""
    row = as_object(row)
    if present(row, "messages"):
        messages = parse_messages(row["messages"], "messages")
        last = messages[-1]
        if last["role"] != "assistant":
            raise RowError(
                "messages", f"invalid conversation: the last message must be an assistant turn, got {last['role']!r}"
            )
        if not last["content"].strip():
            raise RowError(f"messages[{len(messages) - 1}].content", "empty string (the completion)")
        prompt = messages[:-1]
        check_prompt_end(prompt, "messages", "the last assistant turn must follow a user turn")
        return prompt, last["content"]
    if present(row, "text") and not present(row, "completion"):
        text = string_field(row, "text")
        if not text.strip():
            raise RowError("text", "empty string")
        return [], text
    if "completion" in row or ("prompt" in row and not {"chosen", "rejected"} & row.keys()):
        prompt = prompt_messages(required_field(row, "prompt"), "prompt")
        completion = required_field(row, "completion")
        if isinstance(completion, list):
            turns = parse_messages(completion, "completion")
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise RowError(
                    "completion",
                    f"invalid conversation: expected exactly one assistant message, got "
                    f"{', '.join(m['role'] for m in turns)}",
                )
            completion = turns[0]["content"]
        elif not isinstance(completion, str):
            raise RowError(
                "completion", f"wrong type: expected a string or one assistant message, got {type_name(completion)}"
            )
        check_text("completion", completion)
        if not completion.strip():
            raise RowError("completion", "empty string")
        return prompt, completion
    raise UnknownShape("row", f"unknown row format: expected {SFT_FORMATS}; got keys {key_list(row)}")


# --------------------------------------------------------------------------------------------------

# Prompts


def load_prompts(spec: str | os.PathLike, *, system_prompt: str | None = None, split: str | None = None) -> PromptLoad:
    """Prompt-only rows (generation prompts, evaluation prompts) as canonical rows.

    Canonical row: ``{"id", "prompt": [messages], "category": str | None, "reference": str | None, "source":
    "<file>:<line>"}``; `id` is ``sha1(json.dumps(prompt))[:16]``. The prompt comes from ``prompt`` (a string,
    which becomes one user message, or a message list), ``messages`` (a message list) or ``question`` (a string,
    used verbatim: dpoflow task items read this way get no answer instruction), in that order; a message list must
    end with a user turn. `category` is the row's ``category`` or else ``task`` (a string: used for per-category
    breakdowns); `reference` is ``reference`` or else ``answer`` (a string; numbers are written with ``str``).
    `system_prompt`, if given, is put first in every prompt that has no system message of its own.
    """
    source = open_input(spec, split)

    def convert(value: Any, location: str) -> dict:
        row = as_object(value)
        for key in ("prompt", "messages", "question"):
            if present(row, key):
                prompt = (
                    prompt_messages(row[key], key)
                    if key != "question"
                    else prompt_messages(string_field(row, key), key)
                )
                break
        else:
            raise UnknownShape(
                "row",
                f"unknown row format: expected `prompt` (string or messages), `messages` "
                f"or `question`; got keys {key_list(row)}",
            )
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        category = optional_string(row, "category", "task")
        reference = optional_string(row, "reference", "answer", numbers=True)
        return {
            "id": content_id(prompt),
            "prompt": prompt,
            "category": category,
            "reference": reference,
            "source": location,
        }

    accepted, quarantined = convert_records(source, convert, "a prompt (`prompt`, `messages` or `question`)")
    return PromptLoad(
        [row for _, row in accepted], in_input_order(quarantined), len(source.rows), source.fingerprint, source.origin
    )


# --------------------------------------------------------------------------------------------------

# Deterministic held-out split


def prompt_key(row: dict) -> str:
    """The default split key: the prompt's messages (roles + normalized contents); for a row with an empty prompt
    (SFT `text` rows) the normalized completion, so such rows do not all share one key."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt:
        return json.dumps([[m["role"], normalize_question(m["content"])] for m in prompt])
    return json.dumps(["completion", normalize_question(str(row.get("completion") or row.get("text") or ""))])


def split_rows(
    rows: Iterable[dict], fraction: float, seed: int, key: Callable[[dict], str] = prompt_key
) -> tuple[list[dict], list[dict]]:
    """(kept, held_out): a row is held out iff ``sha256(f"{seed}\\0{key(row)}")`` as a number in [0, 1) is below
    `fraction`. Deterministic across runs and machines; disjoint by construction, and all rows with the same key
    (by default: the same prompt) land on the same side. Order is kept on both sides."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    kept, held = [], []
    for row in rows:
        digest = hashlib.sha256(f"{seed}\0{key(row)}".encode("utf-8", errors="surrogatepass")).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else kept).append(row)
    return kept, held


# --------------------------------------------------------------------------------------------------
