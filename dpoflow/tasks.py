"""The embedded default task: seeded reasoning-gym questions, their checkers, prompts and disjoint splits.

Everything is generated offline from reasoning-gym's procedural generators, so the same seed and spec give
byte-identical splits on any machine, and every question comes with the generator's own answer checker
(`score_answer`) to serve as the verifier judge.

A task item (one JSONL row of a split)::

    {"id": str,            # sha1 of task + normalized question, first 16 hex digits: stable across runs
     "task": str,          # reasoning-gym dataset name, e.g. "basic_arithmetic"
     "question": str,
     "answer": str,        # the oracle answer
     "metadata": dict}     # reasoning-gym's metadata, JSON-safe, plus "task_config" (the generator config)

Why the default mix (`DEFAULT_SPEC`) is what it is -- numbers measured with SmolLM2-135M-Instruct on 60 seeded
questions per task (docs: /work/shared/NOTES.md), "usable" = share of prompts whose 4 samples at T=0.9 contain
both a right and a wrong answer, i.e. that yield a verifier-labelled preference pair:

* basic_arithmetic, 2 terms, 1-2 digits, "+"/"-", no brackets or negation: greedy 0.37, usable 0.48 -- neither
  hopeless nor solved, and 20,604 distinct questions (242 with 1-digit operands, 20,402 with 2-digit ones).
  It carries most of the weight.
* chain_sum, 2 terms, 1-2 digits: the same skill phrased differently ("State the final answer to the following
  arithmetic problem: 12 + 5 ="), which keeps the policy from learning a single question template; chain_sum
  only adds and subtracts. NOTES measured chain_sum at 2-3 terms with its default (larger) operands as weak
  (greedy 0.05); at 2 terms and 1-2 digits it is the same difficulty as basic_arithmetic. Thousands distinct.
* Not in the default: `products` (1 digit) has only 100 distinct questions, too few to split six ways;
  letter_counting's answer is "1" for 82% of items (a constant answer would score well); number_sorting,
  leg_counting and spell_backward are (near) hopeless for a 135M model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, Mapping

from dpoflow.io import write_jsonl
from dpoflow.lm_eval_tasks.task_utils import extract_answer, is_numeric_answer

SPLITS: tuple[str, ...] = ("eval", "heldout", "sft_val", "pref_prompts", "rounds", "sft_train")

DEFAULT_SIZES: dict[str, int] = {
    "eval": 200,          # Stage 7 win-rate prompts (and the lm-eval task-generation benchmark)
    "heldout": 200,       # held-out pairs / KL prompts (and the lm-eval arithmetic multiple choice)
    "sft_val": 200,
    "pref_prompts": 1000,
    "rounds": 1000,       # fresh prompts for iterative rounds
    "sft_train": 2000,
}

_EASY_ADD_SUB = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}

DEFAULT_SPEC: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {
        "weight": 0.8,
        "config": {**_EASY_ADD_SUB, "operators": ["+", "-"], "allow_parentheses": False,
                   "allow_negation": False, "format_style": "simple", "whitespace": "single"},
    },
    "chain_sum": {
        "weight": 0.2,
        "config": {**_EASY_ADD_SUB, "allow_negation": False},
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


def generator(task: str, config: Mapping[str, Any] | None = None, seed: int = 0, size: int = 1):
    """The (cached) reasoning-gym dataset object for `task` with `config`.

    Scoring needs the dataset object only for its `score_answer`; building one per call would re-import
    and re-validate for every response, so objects are cached by (task, config, seed, size).
    """
    config = dict(config or {})
    config.pop("seed", None)
    config.pop("size", None)
    return _generator_cached(task, json.dumps(config, sort_keys=True), int(seed), int(size))


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


def make_item(task: str, entry: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A task item from a reasoning-gym entry {question, answer, metadata}."""
    metadata = _json_safe(dict(entry.get("metadata") or {}))
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
    config = (item.get("metadata") or {}).get("task_config") or {}
    dataset = generator(item["task"], config)
    entry = {"question": item["question"], "answer": answer, "metadata": item.get("metadata") or {}}
    value = float(dataset.score_answer(extracted, entry))
    if numeric and value < 1.0:
        value = 0.0
    return min(1.0, max(0.0, value))


def sft_target(item: Mapping[str, Any]) -> str:
    """The SFT completion: the bare correct answer, which is exactly what the prompt asks for."""
    return str(item["answer"]).strip()


def make_prompt(question: str, system_prompt: str | None = SYSTEM_PROMPT,
                instruction: str | None = NUMERIC_INSTRUCTION) -> list[dict[str, str]]:
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


# ---- splits ------------------------------------------------------------------------------------------

def validate_spec(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check a task mix {task: {"weight": float > 0, "config": dict}} and return normalized weights.

    Raises ValueError naming the offending task and field.
    """
    import reasoning_gym

    if not spec:
        raise ValueError("task spec is empty: give at least one reasoning-gym task")
    out: dict[str, dict[str, Any]] = {}
    for task, entry in spec.items():
        if task not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"task spec: unknown reasoning-gym task {task!r}")
        if not isinstance(entry, Mapping):
            raise ValueError(f"task spec: {task}: expected a mapping with 'weight' and 'config'")
        unknown = set(entry) - {"weight", "config"}
        if unknown:
            raise ValueError(f"task spec: {task}: unknown field(s) {sorted(unknown)}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ValueError(f"task spec: {task}.weight must be a positive number, got {weight!r}")
        config = dict(entry.get("config") or {})
        if "seed" in config or "size" in config:
            raise ValueError(f"task spec: {task}.config must not set seed/size (derived from the split seed)")
        try:
            generator(task, config)  # validates the config through reasoning-gym's own checks
        except (TypeError, AssertionError, ValueError) as exc:
            raise ValueError(f"task spec: {task}.config is invalid: {exc}") from exc
        out[task] = {"weight": float(weight), "config": config}
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

    def __init__(self, task: str, config: dict, seed: int, budget: int, seen: set[str]):
        self.task, self.config, self.budget, self.seen = task, config, budget, seen
        self.dataset = generator(task, config, seed=_task_seed(seed, task), size=budget)
        self.index = 0
        self.taken = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        items = []
        while len(items) < n:
            if self.index >= self.budget:
                raise ValueError(
                    f"task {self.task!r} with config {self.config} gave only {self.taken + len(items)} distinct "
                    f"questions in {self.budget} draws; lower its weight or the split sizes, or widen its config")
            item = make_item(self.task, self.dataset[self.index], self.config)
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


def build_splits(spec: Mapping[str, Mapping[str, Any]] | None = None,
                 sizes: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
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
    streams = {t: _DistinctStream(t, spec[t]["config"], seed, _DRAWS_PER_QUESTION * needed[t] + _EXTRA_DRAWS, seen)
               for t in sorted(spec)}

    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for t in sorted(spec):
        pool = streams[t].take(needed[t])
        random.Random(f"dpoflow:{seed}:{t}:pool").shuffle(pool)
        start = 0
        for name in SPLITS:
            splits[name].extend(pool[start:start + per_split[name][t]])
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
    """Read a split JSONL written by `write_splits`; errors name file:line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            for field in ("id", "task", "question", "answer"):
                if not isinstance(item.get(field), str):
                    raise ValueError(f"{path}:{line_no}:{field}: missing or not a string")
            items.append(item)
    return items
