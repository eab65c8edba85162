"""What a row of a split asks, and what answers it, whichever the data's source: an embedded task item (question,
answer, the reasoning-gym task that checks it) or a user's row (dpoflow.data.sources: `prompt` messages, an optional
`reference`, SFT rows with a `completion`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dpoflow.data.lm_eval_tasks.task_utils import exact_match
from dpoflow.data.tasks import SYSTEM_PROMPT, item_prompt, score, sft_row


def is_task_item(item: Mapping[str, Any]) -> bool:
    """An embedded task item (question + answer + the reasoning-gym task that checks it), not a user's prompt row."""
    return "question" in item and "task" in item and "prompt" not in item


def prompt_of(item: Mapping[str, Any], system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat messages a prompt row asks: a user's row (dpoflow.data.sources: its own `prompt` messages, with
    `system_prompt` first when the row has no system turn), or an embedded task item's question (`item_prompt`)."""
    if "prompt" not in item:
        return item_prompt(item, system_prompt)
    messages = [{"role": m["role"], "content": m["content"]} for m in item["prompt"]]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def reference_of(item: Mapping[str, Any]) -> str | None:
    """The answer a verifier checks: an embedded item's `answer`, a user's row's `reference` (None without one)."""
    value = item.get("answer") if is_task_item(item) else item.get("reference")
    return None if value is None or not str(value).strip() else str(value)


def verify(item: Mapping[str, Any], response: str) -> float:
    """The verifier's score in [0, 1]: the task's own checker for an embedded item (`score`), exact match of the
    final answer against the row's `reference` for a user's prompt row (numbers canonicalized)."""
    if is_task_item(item):
        return score(item, response)
    reference = reference_of(item)
    if reference is None:
        raise ValueError(f"prompt row {item.get('id')!r} has no reference answer for the verifier to check")
    return exact_match(response, reference)


def sft_rows(rows: Sequence[Mapping[str, Any]], system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, Any]]:
    """Canonical SFT examples ({"prompt", "completion"}) of the SFT split: a user's row with `system_prompt` first
    when its chat prompt has no system turn (`prompt_of`'s rule, so Stage 1 trains on prompts as Stages 2, 6 and 7
    ask them; a `text` row has no chat prompt and stays as it is), an embedded task item as `sft_row`."""
    return [_user_sft_row(row, system_prompt) if "completion" in row else sft_row(row, system_prompt) for row in rows]


def _user_sft_row(row: Mapping[str, Any], system_prompt: str | None) -> dict[str, Any]:
    out = dict(row)
    if out.get("prompt"):
        out["prompt"] = prompt_of(out, system_prompt)
    return out
