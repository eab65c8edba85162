"""Capability benchmarks through lm-eval's Python API, with mlx-lm's lm-eval adapter (`MLXLM`).

Why the Python API: `mlx_lm.evaluate`'s CLI has no include-path flag and fails writing results for a task
path containing "/", and plain `lm_eval --model mlxlm` cannot find the model class (it is registered only when
`mlx_lm.evaluate` is imported). Here the model is loaded once and every task runs in-process. The local tasks
(what they measure, their scores) are described in dpoflow.data.benchmark_tasks.

Two entry points run the same evaluation: `run_benchmarks` returns each task's flat metrics, and
`run_benchmarks_per_document` adds each document's score (lm-eval's `log_samples`), which the paired retention gate
(dpoflow.eval.retention.paired_benchmark_retention) needs: the baseline and the final model scored on the SAME
documents. A document's score is the per-sample value of the task's score metric (acc / acc_norm for the
multiple-choice tasks, exact_match / pass_at_1 for the generation tasks), listed in doc_id order; their mean is the
flat score.

    results = run_benchmarks_per_document(model, tasks, include_path, limit={"dpoflow_task_gen": 200}, seed=0)
    results["dpoflow_task_mc"]["docs"]      # [{"doc_id": 0, "score": 1.0}, {"doc_id": 1, "score": 0.0}, ...]
    document_scores(results)                # {task: [score of doc 0, score of doc 1, ...]}
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpoflow.data.benchmark_tasks import (
    LOCAL_TASKS,
    MANIFEST,
    SCORE_METRIC,
    STOCK_SCORE_PREFERENCE,
)
from dpoflow.data.tasks import SYSTEM_PROMPT

log = logging.getLogger(__name__)
# One folder of task YAMLs, or several (the local tasks first, then the user's own).
IncludePath = str | os.PathLike | Sequence[str | os.PathLike] | None
# One limit for every task, or {task: limit} (a task missing from the mapping runs in full).
Limit = int | float | None | Mapping[str, int | float | None]


def _include_paths(include_path: IncludePath) -> list[Path]:
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    return [Path(p) for p in paths]


def user_tasks(folder: str | os.PathLike) -> list[str]:
    """The lm-eval task names the YAML files in `folder` define (a user's own tasks; `task:` keys)."""
    names = []
    for path in sorted(Path(folder).rglob("*.yaml")) if Path(folder).is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                names.append(line.split(":", 1)[1].strip().strip("'\""))
    return names


def non_local_tasks(names: Sequence[str], user_folder: str | os.PathLike) -> list[str]:
    """The names that are neither dpoflow's local tasks (LOCAL_TASKS, written offline by prepare_data) nor defined
    in `user_folder`: stock lm-eval tasks, whose datasets lm-eval fetches from the hub."""
    local = set(LOCAL_TASKS) | set(user_tasks(user_folder))
    return [name for name in names if name not in local]


def _read_manifest(include_path: IncludePath) -> dict[str, dict[str, Any]]:
    """The local tasks' manifest (dpoflow.data.benchmark_tasks), from the first include path that has one."""
    for folder in _include_paths(include_path):
        path = folder / MANIFEST
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def _flatten(task_results: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval keys look like "acc,none" / "acc_stderr,none": keep numeric values under the metric name."""
    out: dict[str, float] = {}
    for key, value in task_results.items():
        if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def _score_key(task: str, metrics: Mapping[str, float], manifest: Mapping[str, Any]) -> str | None:
    """The flattened metric name that is the task's flat `score` (see `SCORE_METRIC`), or None."""
    wanted = manifest.get(task, {}).get("score_metric") or SCORE_METRIC.get(task)
    order = (wanted,) if wanted else STOCK_SCORE_PREFERENCE
    return next((name for name in order if name in metrics), None)


def _documents(task: str, samples: Sequence[Mapping[str, Any]], score_key: str) -> list[dict[str, Any]] | None:
    """[{"doc_id", "score"}] in doc_id order: the per-sample value of `score_key` ("metric" or "metric,filter",
    as `_flatten` names it) from lm-eval's logged samples (one per document and filter). None when the metric has
    no numeric per-document value (corpus-level metrics such as BLEU log tuples that only their aggregation reads)."""
    metric, _, filt = score_key.partition(",")
    filt = filt or "none"
    by_id: dict[int, float] = {}
    for sample in samples:
        if sample.get("filter", "none") != filt:
            continue
        value = sample.get(metric)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        doc_id = int(sample["doc_id"])
        if doc_id in by_id:
            raise ValueError(f"{task}: lm-eval logged document {doc_id} twice for filter {filt!r}")
        by_id[doc_id] = float(value)
    return [{"doc_id": i, "score": by_id[i]} for i in sorted(by_id)]


def _task_limit(limit: Limit, task: str) -> int | float | None:
    return limit.get(task) if isinstance(limit, Mapping) else limit


def document_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float]]:
    """{task: [score of each document, in doc_id order]} from `run_benchmarks_per_document`'s result (tasks without
    per-document scores are left out): the input of statistics.paired_retention."""
    return {t: [float(d["score"]) for d in r["docs"]] for t, r in results.items() if r.get("docs") is not None}


def flat_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{task: flat score} (the `score` key; tasks without one are left out): the input of retention.retention."""
    return {t: float(r["score"]) for t, r in results.items() if r.get("score") is not None}


def run_benchmarks(
    model_path: str | os.PathLike,
    task_names: list[str],
    include_path: IncludePath,
    limit: Limit = None,
    seed: int = 0,
    batch_size: int = 8,
    *,
    system_prompt: str | None = None,
    confirm_run_unsafe_code: bool = True,
    offline: bool | None = None,
    per_document: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate the mlx-lm model at `model_path` on `task_names`; returns {task: {metric: value, ..., "score"}}.

    `score` is the flat retention number (see `SCORE_METRIC` / module docstring); `n_samples` is how many
    documents were scored. `limit` is applied by lm-eval to each task's first documents (document order is the
    task's own, so the same limit scores the same documents for every model): an int (that many documents), a float
    in (0, 1) (that fraction), None (all), or a mapping {task: int | float | None} giving each task its own limit --
    cheap log-likelihood tasks can afford many more documents than HumanEval. A task missing from the mapping runs
    in full; a mapping key that is not in `task_names` is ignored with a warning (a misspelt task name?).
    Deterministic: greedy decoding, all lm-eval/numpy/MLX seeds set from `seed`.

    Local tasks whose manifest says `chat_template` (dpoflow_task_gen, dpoflow_humaneval_chat) run with the
    model's chat template; those that also say `system_prompt` (dpoflow_task_gen) get `system_prompt`
    (default: the embedded task's SYSTEM_PROMPT), the way the pipeline prompts. The rest run as plain text
    (log-likelihood tasks and completion-style HumanEval). A model without a chat template runs everything
    plain. `offline` (default: when every task is local) sets HF_DATASETS_OFFLINE and
    HF_HUB_OFFLINE unless they are already set. `confirm_run_unsafe_code` lets dpoflow_humaneval execute
    generated code (in a limited subprocess). `per_document`: see `run_benchmarks_per_document`.
    """
    if isinstance(limit, Mapping) and set(limit) - set(task_names):
        log.warning("limit names task(s) %s that are not run: a misspelt name?", sorted(set(limit) - set(task_names)))
    manifest = _read_manifest(include_path)
    unknown_local = [t for t in task_names if t in LOCAL_TASKS and t not in manifest]
    if unknown_local:
        raise ValueError(
            f"local task(s) {unknown_local} not in {include_path}/{MANIFEST}; "
            "run write_local_tasks first (task_gen/task_mc need the eval/heldout splits)"
        )
    if offline is None:
        user = {t for folder in _include_paths(include_path) for t in user_tasks(folder)}
        offline = all(t in manifest or t in user for t in task_names)
    if offline:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import lm_eval
    import mlx.core as mx
    from lm_eval.tasks import TaskManager
    from mlx_lm.evaluate import MLXLM

    if system_prompt is None:
        system_prompt = SYSTEM_PROMPT

    mx.random.seed(seed)
    lm = MLXLM(str(model_path), batch_size=batch_size, use_chat_template=False)
    has_chat = lm.tokenizer.chat_template is not None
    stock = [t for t in task_names if t not in manifest]
    folders = [str(p) for p in _include_paths(include_path) if p.is_dir() and any(p.rglob("*.yaml"))]
    user = {t for folder in folders for t in user_tasks(folder)}
    stock = [t for t in stock if t not in user]
    task_manager = TaskManager(include_path=folders or None, include_defaults=bool(stock))

    # lm-eval takes one chat setting, system prompt and limit per call: one call per group of tasks sharing them.
    groups: dict[tuple[bool, bool, Any], list[str]] = {}
    for task in task_names:
        chat = bool(manifest.get(task, {}).get("chat_template")) and has_chat
        system = chat and bool(manifest.get(task, {}).get("system_prompt"))
        task_limit = _task_limit(limit, task)
        groups.setdefault((chat, system, task_limit), []).append(task)

    out: dict[str, dict[str, Any]] = {}
    for (chat, system, task_limit), tasks in groups.items():
        lm.use_chat_template = chat  # MLXLM tokenizes without special tokens when a chat template is used
        start = time.perf_counter()
        result = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            limit=task_limit,
            batch_size=batch_size,
            apply_chat_template=chat,
            system_instruction=system_prompt if system else None,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
            bootstrap_iters=1000,
            log_samples=per_document,
        )
        log.info("lm-eval %s (chat=%s): %.1f s", tasks, chat, time.perf_counter() - start)
        n_samples = result.get("n-samples", {})
        samples = result.get("samples") or {}
        for task, task_results in result["results"].items():
            metrics: dict[str, Any] = _flatten(task_results)
            if task in n_samples:
                metrics["n_samples"] = float(n_samples[task].get("effective", 0))
            key = _score_key(task, metrics, manifest)
            if key is not None:
                metrics["score"] = metrics[key]
            if per_document:
                metrics["doc_metric"] = key
                # a group's own row (stock lm-eval groups such as mmlu) has no samples: its subtasks do
                metrics["docs"] = _documents(task, samples[task], key) if key and task in samples else None
            out[task] = metrics
    return out


def run_benchmarks_per_document(
    model_path: str | os.PathLike,
    task_names: list[str],
    include_path: IncludePath,
    limit: Limit = None,
    seed: int = 0,
    batch_size: int = 8,
    *,
    system_prompt: str | None = None,
    confirm_run_unsafe_code: bool = True,
    offline: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """`run_benchmarks` (same arguments, same evaluation, same flat metrics) plus, per task, each document's score:

        {task: {...flat metrics, "score", "n_samples", "doc_metric": "acc_norm",
                "docs": [{"doc_id": 0, "score": 1.0}, {"doc_id": 1, "score": 0.0}, ...]}}

    `docs` is in doc_id order (deterministic: the same documents and scores for the same model, limit and seed) and
    its mean is `score`; `doc_metric` names the metric (lm-eval's "metric" or "metric,filter"). `docs` is None for
    a task whose score metric has no per-document value (corpus-level metrics). The cost over `run_benchmarks` is
    only lm-eval keeping the samples in memory."""
    return run_benchmarks(
        model_path,
        task_names,
        include_path,
        limit,
        seed,
        batch_size,
        system_prompt=system_prompt,
        confirm_run_unsafe_code=confirm_run_unsafe_code,
        offline=offline,
        per_document=True,
    )
