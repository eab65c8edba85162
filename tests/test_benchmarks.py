"""Local lm-eval tasks (offline) on a tiny random model (the HumanEval executor: tests/test_sandbox.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from dpoflow.data import tasks
from dpoflow.data.benchmark_tasks import (
    HUMANEVAL,
    HUMANEVAL_CHAT,
    LOCAL_TASKS,
    MANIFEST,
    SCORE_METRIC,
    TASK_GEN,
    TASK_MC,
    TEXT_CLOZE,
    write_local_tasks,
)
from dpoflow.data.lm_eval_tasks.task_utils import process_results_exact_match
from dpoflow.eval.benchmarks import run_benchmarks


@pytest.fixture(scope="module")
def splits():
    return tasks.build_splits(sizes={"eval": 12, "heldout": 12}, seed=0)


@pytest.fixture(scope="module")
def task_dir(splits, tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp("lm_eval") / "tasks", splits, seed=0)


def test_local_task_folder_is_complete(task_dir, splits):
    manifest = json.loads((task_dir / MANIFEST).read_text())
    assert set(manifest) == set(LOCAL_TASKS)
    assert manifest[HUMANEVAL]["docs"] == 164
    assert manifest[TASK_GEN]["docs"] == 12 and manifest[TASK_GEN]["system_prompt"]
    assert manifest[HUMANEVAL_CHAT]["chat_template"] and not manifest[HUMANEVAL_CHAT]["system_prompt"]
    for name in ("task_utils.py", "humaneval_utils.py", *(f"{t}.yaml" for t in LOCAL_TASKS)):
        assert (task_dir / name).is_file(), name
    mc = [json.loads(line) for line in (task_dir / f"{TASK_MC}.jsonl").read_text().splitlines()]
    by_id = {item["id"]: item for item in splits["heldout"]}
    for row in mc:
        assert len(set(row["choices"])) == 4 and row["choices"][row["gold"]] == by_id[row["id"]]["answer"]
    cloze = [json.loads(line) for line in (task_dir / f"{TEXT_CLOZE}.jsonl").read_text().splitlines()]
    assert len(cloze) == 200 and all(len(set(r["choices"])) == 4 for r in cloze)


def test_task_gen_asks_like_the_pipeline_and_scores_like_the_verifier(task_dir, splits):
    rows = [json.loads(line) for line in (task_dir / f"{TASK_GEN}.jsonl").read_text().splitlines()]
    for row, item in zip(rows, splits["eval"]):
        assert row["prompt"] == tasks.item_prompt(item)[-1]["content"]
        for response in (item["answer"], tasks.sft_target(item), "12345", ""):
            assert process_results_exact_match(row, [response])["exact_match"] == tasks.score(item, response)


def test_local_tasks_run_offline_on_tiny_model(task_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    moved = tmp_path / "elsewhere"  # the folder is relocatable: data and helpers resolve next to the YAMLs
    shutil.copytree(task_dir, moved)
    results = run_benchmarks(tiny_model_dir, list(LOCAL_TASKS), moved, limit=3, seed=0)
    assert set(results) == set(LOCAL_TASKS)
    for task, metrics in results.items():
        assert 0.0 <= metrics["score"] <= 1.0, (task, metrics)
        assert metrics["score"] == metrics[SCORE_METRIC[task]]
        assert metrics["n_samples"] == 3
    again = run_benchmarks(tiny_model_dir, [TASK_MC, TEXT_CLOZE], moved, limit={TASK_MC: 3, TEXT_CLOZE: 2}, seed=0)
    assert again[TASK_MC] == results[TASK_MC]  # deterministic
    assert again[TEXT_CLOZE]["n_samples"] == 2  # per-task limits


def test_rewritten_task_data_is_not_served_from_a_stale_cache(tiny_model_dir, splits, tmp_path):
    out = tmp_path / "tasks"
    counts = []
    for n in (4, 6):
        write_local_tasks(out, {"heldout": splits["heldout"][:n]})
        counts.append(run_benchmarks(tiny_model_dir, [TASK_MC], out)[TASK_MC]["n_samples"])
    assert counts == [4, 6]


def test_missing_local_task_is_a_clear_error(tiny_model_dir, tmp_path):
    out = write_local_tasks(tmp_path / "tasks", {})
    with pytest.raises(ValueError, match="dpoflow_task_gen"):
        run_benchmarks(tiny_model_dir, [TASK_GEN], out, limit=1)


@pytest.mark.slow
def test_real_model_benchmarks(smollm2_dir, task_dir):
    limit = {TEXT_CLOZE: 20, HUMANEVAL: 1, HUMANEVAL_CHAT: 1}
    results = run_benchmarks(
        smollm2_dir, list(LOCAL_TASKS), task_dir, limit={t: limit.get(t, 3) for t in LOCAL_TASKS}, seed=0
    )
    assert all(0.0 <= m["score"] <= 1.0 for m in results.values())
    assert results[TEXT_CLOZE]["score"] > 0.25  # above chance (0.42 on 200 docs): it reads English
