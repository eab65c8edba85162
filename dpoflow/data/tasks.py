"""The embedded default task: seeded reasoning-gym questions, their checkers, prompts and disjoint splits.

Everything is generated offline from reasoning-gym's procedural generators, so the same seed and spec give
identical splits on any machine, and every question comes with the generator's own answer checker
(`score_answer`) to serve as the verifier judge.

A task mix ("spec") maps a task name to {"weight": float > 0, "config": {...reasoning-gym config...},
"dataset": reasoning-gym name (optional, defaults to the task name)}; `dataset` lets one generator appear
twice with different configs (two difficulty levels of the same skill).

A task item (one JSONL row of a split)::

    {"id": str,            # sha1 of task + normalized question, first 16 hex digits: stable across runs
     "task": str,          # the spec's task name, e.g. "add_2term"
     "question": str,
     "answer": str,        # the oracle answer
     "metadata": dict}     # reasoning-gym's metadata (JSON-safe) + "dataset" and "task_config" for scoring

Why the default mix (`DEFAULT_SPEC`). Measured here with SmolLM2-135M-Instruct (the Q4_1 GGUF converted by
dpoflow.modeling.loading), prompts from `item_prompt`, 80-100 seeded distinct questions per config:

* The base model never answers with the bare number: it explains ("To calculate 34 + 29, we need to add ...")
  or writes the equation ("17 + 23 = 38"). Greedy 0-shot, max 48 tokens, basic_arithmetic 2 terms 1-2 digits
  "+"/"-": 0.19 overall, 0.51 on one-digit questions with a non-negative result, 0.00 on two-digit questions
  and 0.00 on every negative result. NOTES.md's 0.37 came from draws without de-duplication, half of them
  from the only 242 distinct one-digit questions; de-duplicated splits are ~95% two-digit.
* As a proxy for the model after SFT, 3 in-context examples answered in the SFT target's format, greedy:
  with bare numbers as answers 0.02 (it copies the examples' numbers); with the equation ("9 + 5 = 14", see
  `sft_target`) 0.35 for "+"/"-" (one-digit 0.89, two-digit non-negative 0.11, negative results 0.00).
* Addition only, 2 terms, 1-2 digits, equation format: greedy 0.57 (one-digit 0.83, two-digit 0.36), sampled
  (T=0.9, 4 samples) accuracy 0.49, usable 0.36 (share of prompts with a right and a wrong sample, i.e. a
  verifier-labelled preference pair). 10,322 distinct questions. -> `add_2term`, weight 0.8.
* Addition only, 3 terms, 1 digit: greedy 0.15, sampled 0.11, usable 0.30; 1,331 distinct questions. A harder
  slice for DPO to move -> `add_3term`, weight 0.2 (800 questions at the default sizes; the builder stops
  with a clear error if sizes ask for more than a config can give: above ~6,600 items in all).
* Left out: subtraction (negative results are never right: hopeless), `products` with 1 digit (only 100
  distinct questions), letter_counting (answer "1" in 82% of items), chain_sum / number_sorting /
  leg_counting / spell_backward (near hopeless per NOTES.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpoflow.data.lm_eval_tasks.task_utils import extract_answer, is_numeric_answer
from dpoflow.runtime.io import write_jsonl
from dpoflow.runtime.params import SPLITS

DEFAULT_SIZES: dict[str, int] = {  # when no sizes are given; the pipeline passes params.yaml's data.sizes
    "eval": 200,  # Stage 7 win-rate prompts (and the lm-eval task-generation benchmark)
    "heldout": 100,  # held-out pairs / KL prompts (and the lm-eval arithmetic multiple choice)
    "sft_val": 100,
    "pref_prompts": 1600,
    "rounds": 800,  # fresh prompts for iterative rounds
    "sft_train": 1200,
}

_ADDITION = {
    "operators": ["+"],
    "allow_parentheses": False,
    "allow_negation": False,
    "format_style": "simple",
    "whitespace": "single",
}

DEFAULT_SPEC: dict[str, dict[str, Any]] = {
    "add_2term": {
        "dataset": "basic_arithmetic",
        "weight": 0.8,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, **_ADDITION},
    },
    "add_3term": {
        "dataset": "basic_arithmetic",
        "weight": 0.2,
        "config": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1, **_ADDITION},
    },
}

# The same arithmetic in two phrasings ("Calculate 12 + 5." / "State the final answer to the following arithmetic
# problem: 12 + 5 ="), with subtraction: the shape decontamination and per-task code must cope with. The
# default before measurement; kept for tests of template handling, not as a training mix (subtraction with a
# negative result is never answered right by SmolLM2-135M).
TWO_TEMPLATE_SPEC: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {
        "weight": 0.8,
        "config": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ["+", "-"],
            "allow_parentheses": False,
            "allow_negation": False,
            "format_style": "simple",
            "whitespace": "single",
        },
    },
    "chain_sum": {
        "weight": 0.2,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "allow_negation": False},
    },
}

# The prompt that worked best for SmolLM2-135M-Instruct (NOTES.md): the model's default system prompt made
# greedy accuracy drop from 0.33 to 0.17, and without the closing instruction it explains at length.
SYSTEM_PROMPT = "Reply with only the final answer, no explanation."
NUMERIC_INSTRUCTION = "Answer with only the final number."
TEXT_INSTRUCTION = "Answer with only the final answer."

# Draw budget per task: stop after this many draws per distinct question still needed (plus a constant), so a
# config with too few distinct questions fails quickly with a clear message instead of looping forever.
_DRAWS_PER_QUESTION = 30
_EXTRA_DRAWS = 2000


# ---- generators and checkers -------------------------------------------------------------------------


def _task_seed(seed: int, task: str) -> int:
    """Independent per-task stream seeds. reasoning-gym seeds item i with `Random(seed + i)`, so nearby
    seeds give shifted copies of the same stream; hashing the task name in keeps tasks independent."""
    digest = hashlib.sha256(f"dpoflow:{seed}:{task}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@functools.lru_cache(maxsize=64)
def _generator_cached(task: str, config_json: str, seed: int, size: int):
    import reasoning_gym  # heavy import (~1 s): only when a task is actually needed

    return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(config_json))


def generator(dataset: str, config: Mapping[str, Any] | None = None, seed: int = 0, size: int = 1):
    """The (cached) reasoning-gym dataset object `dataset` with `config`.

    Scoring needs the dataset object only for its `score_answer`; building one per call would re-import
    and re-validate for every response, so objects are cached by (task, config, seed, size).
    """
    config = dict(config or {})
    config.pop("seed", None)
    config.pop("size", None)
    return _generator_cached(dataset, json.dumps(config, sort_keys=True), int(seed), int(size))


def normalize_question(question: str) -> str:
    """The text used to decide that two questions are the same: NFKC, case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", question)).strip().casefold()


def dedup_keys(item: Mapping[str, Any]) -> list[str]:
    """The keys under which an item counts as "already used": its normalized question and, when the generator
    records one (all arithmetic tasks do), its expression with spaces removed.

    The expression key matters for mixes: basic_arithmetic's "Calculate 12 + 5." and chain_sum's "State the
    final answer to the following arithmetic problem: 12 + 5 =" are different texts but the same problem, and
    one of them in training with the other in eval would be contamination.
    """
    keys = [f"q:{normalize_question(item['question'])}"]
    expression = (item.get("metadata") or {}).get("expression")
    if isinstance(expression, str) and expression.strip():
        keys.append("e:" + re.sub(r"\s+", "", expression))
    return keys


def _item_id(task: str, question: str) -> str:
    return hashlib.sha1(f"{task}\n{normalize_question(question)}".encode()).hexdigest()[:16]


def _json_safe(obj: Any) -> Any:
    """reasoning-gym metadata holds tuples and occasionally other objects: round-trip through JSON."""
    return json.loads(json.dumps(obj, default=str, allow_nan=False))


def make_item(
    task: str, entry: Mapping[str, Any], config: Mapping[str, Any], dataset: str | None = None
) -> dict[str, Any]:
    """A task item from a reasoning-gym entry {question, answer, metadata} of `dataset` (default: `task`).

    The generator's name and config go into the metadata so `score` can rebuild the checker from the item
    alone (a split file read back is all a judge needs).
    """
    metadata = _json_safe(dict(entry.get("metadata") or {}))
    metadata["dataset"] = dataset or task
    metadata["task_config"] = _json_safe(dict(config))
    return {
        "id": _item_id(task, entry["question"]),
        "task": task,
        "question": entry["question"],
        "answer": str(entry["answer"]),
        "metadata": metadata,
    }


def score(item: Mapping[str, Any], response: str) -> float:
    """Verifier score of `response` to `item`, in [0, 1], from the reasoning-gym dataset's `score_answer`.

    Scale: for numeric tasks (the oracle answer is a number, e.g. all of DEFAULT_SPEC) the score is exactly
    1.0 (the response's last number equals the answer) or 0.0 (anything else, including no number). The
    last number is canonicalized first ("1,000", "+17", "17.0" -> "17"). reasoning-gym's generic checker
    gives substring partial credit (answer "5", response "15" -> 0.5); for a number that is just a wrong
    number, so numeric scores below 1.0 are snapped to 0.0. For non-numeric tasks the stripped response is
    passed through unchanged and the dataset's own graded scale is kept (partial credit possible).
    """
    answer = str(item["answer"])
    numeric = is_numeric_answer(answer)
    extracted = extract_answer(response, numeric)
    if extracted is None:
        return 0.0
    metadata = item.get("metadata") or {}
    dataset = generator(metadata.get("dataset") or item["task"], metadata.get("task_config") or {})
    entry = {"question": item["question"], "answer": answer, "metadata": item.get("metadata") or {}}
    value = float(dataset.score_answer(extracted, entry))
    if numeric and value < 1.0:
        value = 0.0
    return min(1.0, max(0.0, value))


def sft_target(item: Mapping[str, Any], style: str = "equation") -> str:
    """The SFT completion: short, correct, final number last (so `score` reads it back as 1.0).

    style="equation" (default): "<expression> = <answer>" when the item has an arithmetic expression, e.g.
    "34 + 29 = 63"; the bare answer otherwise. style="answer": always the bare answer.
    Why the equation although the prompt asks for "only the final number": SmolLM2-135M computes by writing
    the equation out. With 3 in-context examples answered by the bare number it scored 0.02 (it copies the
    examples' numbers); answered by the equation 0.35-0.57 (numbers in the module docstring).
    """
    answer = str(item["answer"]).strip()
    if style == "answer":
        return answer
    if style != "equation":
        raise ValueError(f"sft_target: style must be 'equation' or 'answer', got {style!r}")
    expression = (item.get("metadata") or {}).get("expression")
    if isinstance(expression, str) and re.fullmatch(r"[\d\s+\-*/()]+", expression) and is_numeric_answer(answer):
        return f"{expression.strip()} = {answer}"
    return answer


def make_prompt(
    question: str, system_prompt: str | None = SYSTEM_PROMPT, instruction: str | None = NUMERIC_INSTRUCTION
) -> list[dict[str, str]]:
    """Chat messages up to the assistant turn: optional system message, then question + instruction.

    An empty/None `system_prompt` omits the system message (the chat template may then insert its default).
    """
    content = question.strip() if not instruction else f"{question.strip()}\n{instruction}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    return messages


def item_prompt(item: Mapping[str, Any], system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """`make_prompt` with the instruction that fits the item (final number vs. final answer)."""
    numeric = is_numeric_answer(str(item["answer"]))
    return make_prompt(item["question"], system_prompt, NUMERIC_INSTRUCTION if numeric else TEXT_INSTRUCTION)


def sft_row(item: Mapping[str, Any], system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """The canonical SFT example of a task item (dpoflow.training.sft): the question asked as Stage 1 has always
    asked it (numeric instruction), the `sft_target` as the completion."""
    return {"id": item["id"], "prompt": make_prompt(item["question"], system_prompt), "completion": sft_target(item)}


# ---- splits ------------------------------------------------------------------------------------------


def validate_spec(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check a task mix {task: {"weight": float > 0, "config": dict, "dataset": str}} and normalize it:
    weights summed to 1, `dataset` filled in. Raises ValueError naming the offending task and field.
    """
    import reasoning_gym

    if not spec:
        raise ValueError("task spec is empty: give at least one reasoning-gym task")
    out: dict[str, dict[str, Any]] = {}
    for task, entry in spec.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"task spec: {task}: expected a mapping with 'weight' and 'config'")
        dataset = entry.get("dataset", task)
        if dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"task spec: {task}: unknown reasoning-gym dataset {dataset!r}")
        unknown = set(entry) - {"weight", "config", "dataset"}
        if unknown:
            raise ValueError(f"task spec: {task}: unknown field(s) {sorted(unknown)}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ValueError(f"task spec: {task}.weight must be a positive number, got {weight!r}")
        config = dict(entry.get("config") or {})
        if "seed" in config or "size" in config:
            raise ValueError(f"task spec: {task}.config must not set seed/size (derived from the split seed)")
        try:
            generator(dataset, config)  # validates the config through reasoning-gym's own checks
        except (TypeError, AssertionError, ValueError) as exc:
            raise ValueError(f"task spec: {task}.config is invalid: {exc}") from exc
        out[task] = {"weight": float(weight), "config": config, "dataset": dataset}
    total = sum(e["weight"] for e in out.values())
    for e in out.values():
        e["weight"] /= total
    return out


def _allocate(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split n items across tasks by weight (largest remainder; ties broken by task name): exact total."""
    raw = {t: n * w for t, w in weights.items()}
    counts = {t: int(v) for t, v in raw.items()}
    rest = n - sum(counts.values())
    for t in sorted(raw, key=lambda t: (-(raw[t] - counts[t]), t))[:rest]:
        counts[t] += 1
    return counts


class _DistinctStream:
    """A task's seeded question stream, skipping questions already used anywhere (shared `seen` set)."""

    def __init__(self, task: str, dataset: str, config: dict, seed: int, budget: int, seen: set[str]):
        self.task, self.dataset_name, self.config, self.budget, self.seen = task, dataset, config, budget, seen
        self.dataset = generator(dataset, config, seed=_task_seed(seed, task), size=budget)
        self.index = 0
        self.taken = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        items = []
        while len(items) < n:
            if self.index >= self.budget:
                raise ValueError(
                    f"task {self.task!r} with config {self.config} gave only {self.taken + len(items)} distinct "
                    f"questions in {self.budget} draws; lower its weight or the split sizes, or widen its config"
                )
            item = make_item(self.task, self.dataset[self.index], self.config, self.dataset_name)
            self.index += 1
            keys = dedup_keys(item)
            if any(k in self.seen for k in keys):
                continue
            self.seen.update(keys)
            items.append(item)
        self.taken += len(items)
        return items


def check_disjoint(splits: Mapping[str, list[Mapping[str, Any]]]) -> None:
    """Raise ValueError if a question (normalized text or expression, see `dedup_keys`) appears twice,
    within a split or across splits.

    Disjointness is what makes held-out gaps, KL prompts and win rates honest; call it on splits read back
    from disk too.
    """
    where: dict[str, str] = {}
    for name, items in splits.items():
        for i, item in enumerate(items):
            for key in dedup_keys(item):
                if key in where:
                    raise ValueError(f"question repeated: {name}[{i}] and {where[key]} ({key!r})")
                where[key] = f"{name}[{i}]"


def build_splits(
    spec: Mapping[str, Mapping[str, Any]] | None = None, sizes: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Generate the six disjoint splits, deterministically for (spec, sizes, seed).

    Each split's size is divided across tasks by weight. Each task draws, from its own seeded stream, as many
    distinct questions as all splits need together (a question already used -- same normalized text or
    same expression, see `dedup_keys` -- is skipped), shuffles that pool and deals it out to the splits.
    Dealing from one shuffled pool, rather than filling splits one after another, keeps every split the same
    difficulty mix: early draws of a stream are rich in the few small-operand questions (only 242 of them
    for basic_arithmetic with 1 digit), so filling sequentially made `eval` 38% one-digit and `sft_train` 0%.
    The price: changing any size reshuffles all splits. Disjointness is checked before returning. Items
    within a split are shuffled with a split-specific seed so tasks interleave. Missing sizes count as 0.
    """
    spec = validate_spec(DEFAULT_SPEC if spec is None else spec)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; splits are {list(SPLITS)}")
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"split size {name} must be a non-negative integer, got {n!r}")

    weights = {t: e["weight"] for t, e in spec.items()}
    per_split = {name: _allocate(sizes.get(name, 0), weights) for name in SPLITS}
    needed = {t: sum(per_split[s][t] for s in SPLITS) for t in spec}
    seen: set[str] = set()
    streams = {
        t: _DistinctStream(
            t, spec[t]["dataset"], spec[t]["config"], seed, _DRAWS_PER_QUESTION * needed[t] + _EXTRA_DRAWS, seen
        )
        for t in sorted(spec)
    }

    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for t in sorted(spec):
        pool = streams[t].take(needed[t])
        random.Random(f"dpoflow:{seed}:{t}:pool").shuffle(pool)
        start = 0
        for name in SPLITS:
            splits[name].extend(pool[start : start + per_split[name][t]])
            start += per_split[name][t]
    for name in SPLITS:
        random.Random(f"dpoflow:{seed}:{name}").shuffle(splits[name])
    check_disjoint(splits)
    return splits


def write_splits(splits: Mapping[str, list[Mapping[str, Any]]], out_dir: str | Path) -> dict[str, Path]:
    """Write each split to `<out_dir>/<split>.jsonl` (atomic per file); returns the paths by split."""
    out_dir = Path(out_dir)
    paths = {}
    for name, items in splits.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], [dict(item) for item in items])
    return paths


def read_split(path: str | Path) -> list[dict[str, Any]]:
    """Read a split JSONL written by `write_splits` (task items, or the canonical rows of a user's files: SFT rows
    with `prompt` + `completion`, prompt rows with `prompt`); errors name file:line:field."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            required = ("id", "task", "question", "answer") if "prompt" not in item else ("id",)
            if "prompt" in item and not isinstance(item["prompt"], list):
                raise ValueError(f"{path}:{line_no}:prompt: not a message list")
            for field in required:
                if not isinstance(item.get(field), str):
                    raise ValueError(f"{path}:{line_no}:{field}: missing or not a string")
            items.append(item)
    return items
