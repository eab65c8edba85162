"""Capability benchmarks through lm-eval's Python API, with mlx-lm's lm-eval adapter (`MLXLM`).

Why the Python API: `mlx_lm.evaluate`'s CLI has no include-path flag and fails writing results for a task
path containing "/", and plain `lm_eval --model mlxlm` cannot find the model class (it is registered only when
`mlx_lm.evaluate` is imported). Here the model is loaded once and every task runs in-process. The local tasks
(what they measure, their scores) are described in dpoflow.data.benchmark_tasks.
"""

from __future__ import annotations

import json
import logging
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


def _flat_score(task: str, metrics: Mapping[str, float], manifest: Mapping[str, Any]) -> float | None:
    wanted = manifest.get(task, {}).get("score_metric") or SCORE_METRIC.get(task)
    order = (wanted,) if wanted else STOCK_SCORE_PREFERENCE
    for name in order:
        if name in metrics:
            return metrics[name]
    return None


def run_benchmarks(
    model_path: str | os.PathLike,
    task_names: list[str],
    include_path: IncludePath,
    limit: int | float | None | Mapping[str, int | float | None] = None,
    seed: int = 0,
    batch_size: int = 8,
    *,
    system_prompt: str | None = None,
    confirm_run_unsafe_code: bool = True,
    offline: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate the mlx-lm model at `model_path` on `task_names`; returns {task: {metric: value, ..., "score"}}.

    `score` is the flat retention number (see `SCORE_METRIC` / module docstring); `n_samples` is how many
    documents were scored (after `limit`, which lm-eval applies per task to the first documents; a mapping
    gives each task its own limit -- cheap log-likelihood tasks can afford many more documents than HumanEval;
    tasks missing from the mapping run in full).
    Deterministic: greedy decoding, all lm-eval/numpy/MLX seeds set from `seed`.

    Local tasks whose manifest says `chat_template` (dpoflow_task_gen, dpoflow_humaneval_chat) run with the
    model's chat template; those that also say `system_prompt` (dpoflow_task_gen) get `system_prompt`
    (default: the embedded task's SYSTEM_PROMPT), the way the pipeline prompts. The rest run as plain text
    (log-likelihood tasks and completion-style HumanEval). A model without a chat template runs everything
    plain. `offline` (default: when every task is local) sets HF_DATASETS_OFFLINE and
    HF_HUB_OFFLINE unless they are already set. `confirm_run_unsafe_code` lets dpoflow_humaneval execute
    generated code (in a limited subprocess).
    """
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
        task_limit = limit.get(task) if isinstance(limit, Mapping) else limit
        groups.setdefault((chat, system, task_limit), []).append(task)

    out: dict[str, dict[str, float]] = {}
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
            log_samples=False,
        )
        log.info("lm-eval %s (chat=%s): %.1f s", tasks, chat, time.perf_counter() - start)
        n_samples = result.get("n-samples", {})
        for task, task_results in result["results"].items():
            metrics = _flatten(task_results)
            if task in n_samples:
                metrics["n_samples"] = float(n_samples[task].get("effective", 0))
            score = _flat_score(task, metrics, manifest)
            if score is not None:
                metrics["score"] = score
            out[task] = metrics
    return out
