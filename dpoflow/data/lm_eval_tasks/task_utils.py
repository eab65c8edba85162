"""Helpers referenced from dpoflow's local lm-eval task YAMLs (`!function task_utils.<name>`).

lm-eval imports a `!function` module from the folder of the YAML that names it, so
`dpoflow.data.benchmark_tasks.write_local_tasks` copies this file next to the YAMLs. That makes a task folder
self-contained and relocatable (a DVC checkout elsewhere still works) and puts this code inside the
folder's hash, so editing the scorer invalidates the benchmark stage. Consequently this module imports
only the standard library at module level (plus `datasets`, which lm-eval already needs).

`dpoflow.data.tasks` imports the answer extraction from here, so the verifier that labels preference pairs and
the benchmark that measures them read a model's answer the same way.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

# A number is either comma-grouped ("1,234.5") or plain ("-17", "3.25"). A leading "-" counts as a sign
# only when it does not follow a word character or ")": in "10-3" the last number is 3, not -3.
_NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def canonical_number(text: str) -> str | None:
    """Canonical string of a number: no commas, no "+", no leading zeros, "12.0" -> "12", "-0" -> "0".

    Returns None when `text` is not a finite decimal number. The canonical form of an integer is exactly
    Python's `str(int)`, which is how reasoning-gym writes its arithmetic answers, so an exact string
    comparison against the oracle works.
    """
    try:
        value = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def is_numeric_answer(answer: str) -> bool:
    """True when an oracle answer is a single number, i.e. the task is scored on the final number."""
    return canonical_number(answer) is not None and _NUMBER.fullmatch(answer.strip()) is not None


def extract_last_number(text: str) -> str | None:
    """The last number in a response, canonicalized; None when the response holds no number.

    "Last" rather than "first" because a model that explains itself ("5 + 12 = 17") states the result
    last; the prompt asks for the number alone, and then first and last coincide.
    """
    matches = _NUMBER.findall(text or "")
    if not matches:
        return None
    return canonical_number(matches[-1])


def extract_answer(response: str, numeric: bool) -> str | None:
    """The answer a response gives: its last number for numeric tasks, else the stripped text.

    None means "no answer" (empty response, or no number for a numeric task): it scores 0.
    """
    if numeric:
        return extract_last_number(response)
    text = (response or "").strip()
    return text or None


def exact_match(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals the oracle answer, else 0.0 (see `extract_answer`)."""
    numeric = is_numeric_answer(answer)
    got = extract_answer(response, numeric)
    if got is None:
        return 0.0
    want = canonical_number(answer) if numeric else answer.strip()
    return float(got == want)


# ---- lm-eval hooks ---------------------------------------------------------------------------------


def load_jsonl(data_file: str, **_ignored) -> datasets.DatasetDict:  # noqa: F821
    """`custom_dataset` hook: load `data_file` (relative to this folder) as the `test` split.

    Uses the `datasets` JSON builder, which works with HF_DATASETS_OFFLINE=1 for local files. Resolving the
    path against this module's folder (not the working directory) is what keeps the task folder
    relocatable. lm-eval also passes the task's metadata as keyword arguments; they are ignored.
    """
    import datasets  # lm-eval's own dependency; imported lazily so answer helpers stay stdlib-only

    path = Path(__file__).resolve().parent / data_file
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task data not found: {path}")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def process_results_exact_match(doc: dict, results: list[str]) -> dict[str, float]:
    """`process_results` hook for the reasoning task's generate_until benchmark: final-answer exact match."""
    return {"exact_match": exact_match(results[0], str(doc["answer"]))}
