"""From one prompt's scored responses to canonical pairs: deduplication, pairing rules, reference answers, and the
token counter that makes Stage 2's length check follow the batching convention."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpoflow.core.batching import encode_completion, encode_prompt
from dpoflow.data import tasks
from dpoflow.data.judges import Judge
from dpoflow.data.pairs import make_pair, prompt_text
from dpoflow.data.prompts import is_task_item, reference_of
from dpoflow.runtime.params import PAIRINGS


@dataclass
class PromptState:
    """One prompt through the passes: its pooled responses and their scores."""

    item: Mapping[str, Any] | None
    prompt: list[dict]
    location: str
    heldout: bool = False
    raw_texts: list[str] = field(default_factory=list)  # every sample, all passes, in order
    responses: list[str] = field(default_factory=list)  # deduplicated, non-empty
    scores: list[float] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    n_duplicate_responses: int = 0
    n_empty_responses: int = 0
    n_truncated_responses: int = 0  # hit max_tokens without eos
    response_tokens: list[int] = field(default_factory=list)
    first_pair_pass: int | None = None
    passes: list[int] = field(default_factory=list)

    @property
    def task(self) -> str | None:
        return None if self.item is None else (self.item.get("task") or self.item.get("category"))


def dedupe_responses(texts: Sequence[str]) -> tuple[list[str], int, int]:
    """(kept texts, n_duplicates, n_empty): identical after strip() keeps the first; empty/blank ones dropped."""
    kept, seen, n_dup, n_empty = [], set(), 0, 0
    for text in texts:
        key = text.strip()
        if not key:
            n_empty += 1
        elif key in seen:
            n_dup += 1
        else:
            seen.add(key)
            kept.append(text)
    return kept, n_dup, n_empty


def make_pairs(
    prompt: list[dict],
    responses: Sequence[str],
    scores: Sequence[float],
    pairing: str = "best_vs_worst",
    task: str | None = None,
    source: str = "verifier",
) -> list[dict]:
    """Canonical pairs from one prompt's (deduplicated) scored responses.

    best_vs_worst: max vs min score, the first in order among equals; none when all scores are equal.
    all_pairs: every (i, j) with different scores, higher chosen; ordered by (i, j).
    """
    if len(responses) != len(scores):
        raise ValueError(f"{len(responses)} responses but {len(scores)} scores")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if len(responses) < 2:
        return []
    if pairing == "best_vs_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] == scores[worst]:
            return []
        return [make_pair(prompt, responses[best], responses[worst], scores[best], scores[worst], task, source)]
    out = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if scores[i] == scores[j]:
                continue
            hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
            out.append(make_pair(prompt, responses[hi], responses[lo], scores[hi], scores[lo], task, source))
    return out


def reference_pairs(states: Sequence[PromptState], judge: Judge, source: str) -> list[int]:
    """Give each state without a pair whose responses all score below its reference answer one pair: the reference
    (an embedded item's `tasks.sft_target`, a user's row's `reference`) chosen, the worst response rejected. Returns
    the indices of the states that got one.

    The reference is judged together with the prompt's responses (one list), so judges whose scores depend on the
    other responses (the reward model centres on their mean) put all of them on one scale; the pair carries the
    scores of that call.
    """
    todo = [
        i
        for i, st in enumerate(states)
        if not st.pairs and st.responses and st.item is not None and reference_of(st.item) is not None
    ]
    if not todo:
        return []
    references = [
        tasks.sft_target(states[i].item) if is_task_item(states[i].item) else reference_of(states[i].item) for i in todo
    ]
    scored = judge.score(
        [states[i].item for i in todo],
        [states[i].prompt for i in todo],
        [list(states[i].responses) + [ref] for i, ref in zip(todo, references)],
    )
    got = []
    for i, reference, scores in zip(todo, references, scored):
        st = states[i]
        *response_scores, ref_score = (float(x) for x in scores)
        if ref_score <= max(response_scores):
            continue  # a sample is as good as the reference: nothing to teach, or a pair exists already
        worst = min(range(len(response_scores)), key=lambda j: (response_scores[j], j))
        st.pairs = [
            make_pair(
                st.prompt,
                reference,
                st.responses[worst],
                ref_score,
                response_scores[worst],
                st.task,
                f"{source}+reference",
            )
        ]
        got.append(i)
    return got


def token_counter(tokenizer: Any, prompts: Iterable[list[dict]]) -> Callable[[str], int]:
    """A `count_tokens` for validate_dpo_pairs that follows the batching convention exactly.

    validate_dpo_pairs measures `prompt_text(prompt)` and each response separately; this counter returns, for a
    known prompt's text, the length of its chat-formatted ids (`encode_prompt`, generation prompt included), and
    for any other text the completion length (`encode_completion`: text + eos). So the over-long check is
    prompt ids + completion ids > max_seq_len, the sequence the trainer would see.
    """
    prompt_lengths: dict[str, int] = {}
    for messages in prompts:
        text = prompt_text(messages)
        if text not in prompt_lengths:
            try:
                prompt_lengths[text] = len(encode_prompt(tokenizer, messages))
            except Exception:  # a template that rejects the conversation: count the raw text instead
                prompt_lengths[text] = len(tokenizer.encode(text, add_special_tokens=False))

    def count(text: str) -> int:
        if text in prompt_lengths:
            return prompt_lengths[text]
        return len(encode_completion(tokenizer, text))

    return count
