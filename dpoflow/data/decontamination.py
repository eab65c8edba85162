"""Decontamination: is a training text an evaluation text? One index (EvalIndex) for Stage 2's pair check, Stage 6's
prompt screen and Stage 7's audit.

Texts are normalized (normalize_text) and compared by hashed word n-grams (n = preference.decontamination_ngram); an
evaluation text shorter than n tokens matches when its whole token sequence occurs in the training text (at least
MIN_CONTAINED_TOKENS tokens) or equals it. Task questions lose their shared template first (question_templates), so
a template longer than n does not flag every pair of that task.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.data import tasks
from dpoflow.data.pairs import quarantine_row
from dpoflow.data.prompts import prompt_of

DEFAULT_NGRAM = 8
MIN_CONTAINED_TOKENS = 3  # a short eval text with fewer tokens must equal a whole pair text
MIN_TEMPLATE_ITEMS = 20  # a task's question template is inferred only from at least this many questions
EVAL_SPLITS = ("heldout", "eval", "sft_val")
# Fields of an lm-eval data row that hold text the model is shown. Never answers, gold indices, targets or test code.
LM_EVAL_TEXT_FIELDS = ("question", "context", "passage", "text", "query")
_KEPT_PUNCTUATION = frozenset("-*/%")  # arithmetic operators survive normalization as tokens


# --------------------------------------------------------------------------------------------------
# Text normalization and n-grams (public: Stage 7 reuses them)


def normalize_text(text: str) -> str:
    """NFKC, lowercase, punctuation removed, symbols split off as tokens, whitespace collapsed.

    Unicode punctuation (category P*) becomes a space, except the arithmetic operators - * / %;
    those and symbols (+ = < > ^ $ ...) become tokens of their own, so "3+4" and "3 + 4" normalize
    alike while "3+4" and "3-4" stay different.
    """
    out = []
    for char in unicodedata.normalize("NFKC", text).lower():
        if char.isalnum():
            out.append(char)
        elif char.isspace() or unicodedata.category(char).startswith("P") and char not in _KEPT_PUNCTUATION:
            out.append(" ")
        else:
            out.append(f" {char} ")
    return " ".join("".join(out).split())


def ngram_set(text: str, n: int = DEFAULT_NGRAM) -> set[int]:
    """Stable 64-bit hashes of the word n-grams of `normalize_text(text)`.

    A text shorter than n tokens yields one hash, of its whole normalized text (the exact-match
    fallback); an empty text yields the empty set.
    """
    return _gram_hashes(normalize_text(text).split(), n)


def _gram_hashes(tokens: list[str], n: int) -> set[int]:
    if not tokens:
        return set()
    if len(tokens) <= n:
        return {_hash(" ".join(tokens))}
    return {_hash(" ".join(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


def _hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8", "backslashreplace"), digest_size=8).digest(), "little")


class EvalIndex:
    """Hashed n-grams of every eval set, plus the short eval texts matched whole.

    An eval text of at least n tokens contaminates a pair text sharing any of its n-grams; a shorter one
    (of k >= MIN_CONTAINED_TOKENS tokens) when its whole token sequence occurs in the pair text; one of
    fewer tokens only when it equals a whole pair text.
    """

    def __init__(self, eval_texts: dict[str, Iterable[str]], n: int):
        self.n = n
        self.long: dict[str, set[int]] = {}
        self.short: dict[str, dict[int, set[int]]] = {}  # eval set -> k -> whole-text hashes
        self.exact: dict[str, set[int]] = {}
        for name, texts in eval_texts.items():
            long, short, exact = set(), defaultdict(set), set()
            for text in texts:
                tokens = normalize_text(text).split()
                if len(tokens) >= n:
                    long |= _gram_hashes(tokens, n)
                elif len(tokens) >= MIN_CONTAINED_TOKENS:
                    short[len(tokens)].add(_hash(" ".join(tokens)))
                elif tokens:
                    exact.add(_hash(" ".join(tokens)))
            self.long[name], self.short[name], self.exact[name] = long, dict(short), exact
        self.short_lengths = sorted({k for by_k in self.short.values() for k in by_k})
        self._cache: dict[str, tuple[set[int], dict[int, set[int]], int | None]] = {}

    def _grams(self, text: str) -> tuple[set[int], dict[int, set[int]], int | None]:
        cached = self._cache.get(text)
        if cached is None:
            tokens = normalize_text(text).split()
            long = {_hash(" ".join(tokens[i : i + self.n])) for i in range(len(tokens) - self.n + 1)}
            short = {k: _windows(tokens, k) for k in self.short_lengths if k <= len(tokens)}
            whole = _hash(" ".join(tokens)) if tokens else None
            cached = self._cache[text] = (long, short, whole)
        return cached

    def matches(self, texts: list[tuple[str, str]]) -> dict[str, str]:
        """For each eval set that one of the (field, text) pairs overlaps: the first such field."""
        grams = [(name, self._grams(text)) for name, text in texts]
        hits = {}
        for eval_set in self.long:
            for field_name, (long, short, whole) in grams:
                if (
                    not long.isdisjoint(self.long[eval_set])
                    or any(not short[k].isdisjoint(hashes) for k, hashes in self.short[eval_set].items() if k in short)
                    or whole in self.exact[eval_set]
                ):
                    hits[eval_set] = field_name
                    break
        return hits

    def hits(self, text: str) -> list[str]:
        """The eval sets that `text` overlaps."""
        return list(self.matches([("", text)]))


def _windows(tokens: list[str], k: int) -> set[int]:
    return {_hash(" ".join(tokens[i : i + k])) for i in range(len(tokens) - k + 1)}


def question_templates(
    items: Iterable[Mapping[str, Any]], min_items: int = MIN_TEMPLATE_ITEMS
) -> dict[str, tuple[list[str], list[str]]]:
    """Per task: the normalized tokens every question starts with and ends with (its template).

    chain_sum asks "State the final answer to the following arithmetic problem: 14 + 75 =" for every problem: the
    template alone is longer than the 8-gram window, so matching whole questions would flag every chain_sum pair
    as contaminated by every chain_sum eval question. Inferred only from >= `min_items` questions of a task, so an
    operand shared by chance in a small sample is not mistaken for template.
    """
    by_task: dict[str, list[list[str]]] = defaultdict(list)
    for item in items:
        if isinstance(item.get("task"), str) and isinstance(item.get("question"), str):
            by_task[item["task"]].append(normalize_text(item["question"]).split())
    out = {}
    for task, seqs in sorted(by_task.items()):
        if len(seqs) < min_items:
            continue
        prefix = _common_prefix(seqs)
        shortest = min(len(s) for s in seqs)
        suffix = _common_prefix([s[::-1] for s in seqs])[::-1][: max(0, shortest - len(prefix))]
        if prefix or suffix:
            out[task] = (prefix, suffix)
    return out


def _common_prefix(seqs: list[list[str]]) -> list[str]:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        n = min(n, len(s))
        for i in range(n):
            if s[i] != first[i]:
                n = i
                break
    return first[:n]


def strip_template(question: str, template: tuple[list[str], list[str]] | None) -> str:
    """The question without its task template (normalized tokens joined by spaces), or the question unchanged
    when it does not fit the template or too little (< MIN_CONTAINED_TOKENS tokens) would remain."""
    if not template:
        return question
    prefix, suffix = template
    tokens = normalize_text(question).split()
    if tokens[: len(prefix)] != prefix or (suffix and tokens[len(tokens) - len(suffix) :] != suffix):
        return question
    middle = tokens[len(prefix) : len(tokens) - len(suffix)]
    return " ".join(middle) if len(middle) >= MIN_CONTAINED_TOKENS else question


def lm_eval_row_texts(row: Mapping[str, Any]) -> list[str]:
    """The texts of one lm-eval data row that a model is shown.

    `question`/`context`/`passage`/`text`/`query` strings; `prompt` only when the row has no `question` (the local
    generation task's `prompt` is the question plus the shared instruction "Answer with only the final number.",
    whose words would match every pair); `choices` that are text (>= MIN_CONTAINED_TOKENS tokens): the cloze
    task's candidate sentences, not the numeric options of the multiple-choice task, which would match any pair
    whose response is that number. Never answers, gold indices, targets or HumanEval's hidden tests.
    """
    texts = [row[f] for f in LM_EVAL_TEXT_FIELDS if isinstance(row.get(f), str) and row[f].strip()]
    if "question" not in row and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        texts.append(row["prompt"])
    choices = row.get("choices")
    if isinstance(choices, list):
        texts += [c for c in choices if isinstance(c, str) and len(normalize_text(c).split()) >= MIN_CONTAINED_TOKENS]
    return texts


def _read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            if isinstance(row, dict):
                rows.append(row)
    return rows


def collect_eval_texts(
    tasks_dir: str | Path,
    lm_eval_dir: str | Path | None = None,
    splits: Sequence[str] = EVAL_SPLITS,
    template_items: Iterable[Mapping[str, Any]] = (),
    strip_templates: bool = True,
) -> dict[str, list[str]]:
    """Texts of every evaluation set, by set name, for `validate_dpo_pairs(eval_texts=...)`.

    Sets: the splits `splits` (a task item's `question`, a user row's non-system messages), named by split; and
    every `*.jsonl` data file of the local lm-eval tasks in `lm_eval_dir` (default `<tasks_dir>/lm_eval`), named
    `lm_eval/<file stem>`, with the fields of `lm_eval_row_texts`. Task questions lose their task template
    (`question_templates`, inferred from all task items seen here plus `template_items`, e.g. the preference
    prompts) unless `strip_templates` is False.
    """
    tasks_dir = Path(tasks_dir)
    lm_eval_dir = tasks_dir / "lm_eval" if lm_eval_dir is None else Path(lm_eval_dir)
    split_items = {}
    for name in splits:
        path = tasks_dir / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: evaluation split not found (run the prepare_data stage)")
        split_items[name] = tasks.read_split(path)
    lm_rows = (
        {f"lm_eval/{path.stem}": _read_jsonl_rows(path) for path in sorted(lm_eval_dir.glob("*.jsonl"))}
        if lm_eval_dir.is_dir()
        else {}
    )

    templates: dict[str, tuple[list[str], list[str]]] = {}
    if strip_templates:
        known = [it for items in split_items.values() for it in items]
        known += [row for rows in lm_rows.values() for row in rows]
        templates = question_templates(known + list(template_items))

    def question_text(row: Mapping[str, Any]) -> str:
        return strip_template(row["question"], templates.get(row.get("task")))

    def split_texts(item: Mapping[str, Any]) -> list[str]:  # a task item's question; a user row's messages
        if "question" in item:
            return [question_text(item)]
        texts = [m["content"] for m in item.get("prompt") or [] if m["role"] != "system"]
        return texts or ([item["completion"]] if item.get("completion") else [])

    out: dict[str, list[str]] = {}
    for name, items in split_items.items():
        out[name] = [text for item in items for text in split_texts(item)]
    for name, rows in lm_rows.items():
        texts = []
        for row in rows:
            for text in lm_eval_row_texts(row):
                texts.append(question_text(row) if text is row.get("question") else text)
        out[name] = texts
    return out


def screen_prompts(
    items: Sequence[Mapping[str, Any]],
    eval_texts: Mapping[str, list[str]] | None,
    ngram: int,
    system_prompt: str | None,
    origin: str,
) -> tuple[list[tuple[int, Mapping[str, Any]]], list[dict]]:
    """Split the round prompts into ((line number, item) of the clean ones, quarantine rows of the others).

    A prompt is set aside when its messages overlap an evaluation set by Stage 2's test (`validate_dpo_pairs`'s
    n-gram / whole-short-text match, same n). Stage 2 samples first and quarantines contaminated pairs, and its
    decontamination fraction measures that; a round is small and the contaminated prompts (short add_3term
    sums, ~4% of rounds.jsonl) are the ones most likely to make a pair, so without screening a round's fraction
    fell under 0.9 (10 of 89 on 2026-12-03) and the round was rolled back before training. The pair check still
    runs on what the round generates: a response can overlap an evaluation set on its own.
    """
    lines = list(enumerate(items, 1))
    if not eval_texts:
        return lines, []
    index = EvalIndex(dict(eval_texts), ngram)
    clean, quarantined = [], []
    for line, item in lines:
        prompt = prompt_of(item, system_prompt)
        hits = index.matches([(f"prompt[{i}].content", m["content"]) for i, m in enumerate(prompt)])
        if hits:
            field, reason = next(iter(hits.values())), f"contaminated prompt: {', '.join(hits)}"
            quarantined.append(quarantine_row(f"{origin}:{line}", field, reason, dict(item)))  # bounded, with its id
        else:
            clean.append((line, item))
    return clean, quarantined


def find_contaminated_pairs(
    pair_sets: Mapping[str, Sequence[Mapping[str, Any]]],
    eval_texts: Mapping[str, Sequence[str]],
    ngram: int = DEFAULT_NGRAM,
) -> list[dict]:
    """Training pairs (by file) whose prompt, chosen or rejected text overlaps an evaluation text (Stage 2's
    decontamination test, training_metrics.EvalIndex).
    One dict per contaminated pair: {"file", "row", "id", "field", "eval_sets"}."""
    index = EvalIndex(eval_texts, ngram)
    found = []
    for file, pairs in pair_sets.items():
        for row, pair in enumerate(pairs, start=1):
            fields = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(pair["prompt"])]
            fields += [("chosen", pair["chosen"]), ("rejected", pair["rejected"])]
            for field_name, text in fields:
                sets = index.hits(text)
                if sets:
                    found.append(
                        {"file": file, "row": row, "id": pair.get("id"), "field": field_name, "eval_sets": sets}
                    )
                    break
    return found
