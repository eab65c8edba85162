"""Per-document benchmark scores (issue 22): run_benchmarks_per_document on the tiny model and the local tasks
(offline), per-task limits, and the paired retention computed from two such runs."""

from __future__ import annotations

import json

import pytest

from dpoflow.data import tasks
from dpoflow.data.benchmark_tasks import SCORE_METRIC, TASK_GEN, TASK_MC, TEXT_CLOZE, write_local_tasks
from dpoflow.eval.benchmarks import (
    document_scores,
    flat_scores,
    run_benchmarks,
    run_benchmarks_per_document,
)
from dpoflow.eval.retention import paired_benchmark_retention, retention

TASKS = [TASK_GEN, TASK_MC, TEXT_CLOZE]
LIMITS = {TASK_GEN: 4, TASK_MC: 6, TEXT_CLOZE: 9}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    splits = tasks.build_splits(sizes={"eval": 12, "heldout": 12}, seed=0)
    return write_local_tasks(tmp_path_factory.mktemp("lm_eval_docs") / "tasks", splits, seed=0)


@pytest.fixture(scope="module")
def per_doc(tiny_model_dir, task_dir):
    return run_benchmarks_per_document(tiny_model_dir, TASKS, task_dir, limit=LIMITS, seed=0)


def test_per_document_scores_average_to_the_flat_score(per_doc):
    assert set(per_doc) == set(TASKS)
    for task, res in per_doc.items():
        docs = res["docs"]
        assert res["doc_metric"] == SCORE_METRIC[task]
        assert len(docs) == LIMITS[task] == res["n_samples"]  # the per-task limit
        assert [d["doc_id"] for d in docs] == list(range(LIMITS[task]))  # lm-eval's limit: the first documents
        assert all(d["score"] in (0.0, 1.0) for d in docs)  # acc / acc_norm / exact_match per document
        mean = sum(d["score"] for d in docs) / len(docs)
        assert mean == pytest.approx(res["score"], abs=1e-12), task
    json.dumps(per_doc, allow_nan=False)  # metrics-file ready
    assert document_scores(per_doc)[TASK_MC] == [d["score"] for d in per_doc[TASK_MC]["docs"]]
    assert flat_scores(per_doc) == {t: per_doc[t]["score"] for t in TASKS}


def test_per_document_runs_are_deterministic_and_match_the_flat_run(per_doc, tiny_model_dir, task_dir):
    again = run_benchmarks_per_document(tiny_model_dir, TASKS, task_dir, limit=LIMITS, seed=0)
    assert again == per_doc
    flat = run_benchmarks(tiny_model_dir, [TASK_MC, TEXT_CLOZE], task_dir, limit=LIMITS | {TASK_GEN: None}, seed=0)
    for task in (TASK_MC, TEXT_CLOZE):
        assert flat[task] == {k: v for k, v in per_doc[task].items() if k not in ("docs", "doc_metric")}


def test_a_task_missing_from_the_limit_mapping_runs_in_full(tiny_model_dir, task_dir, caplog):
    out = run_benchmarks(tiny_model_dir, [TASK_MC, TASK_GEN], task_dir, limit={TASK_GEN: 2, "dpoflow_text_close": 5})
    assert out[TASK_GEN]["n_samples"] == 2 and out[TASK_MC]["n_samples"] == 12  # the whole heldout split
    assert "dpoflow_text_close" in caplog.text  # a misspelt name is reported


def test_paired_retention_of_a_model_against_itself(per_doc):
    """The same model twice: every task's retention is 100 % with no discordant document, so every task is
    uninformative (not counted as evidence of 100 %) and the gate has nothing to pass on."""
    out = paired_benchmark_retention(per_doc, per_doc, 95.0, 0.95, 200, 0)
    for task in TASKS:
        row = out["retention_tasks"][task]
        assert row["informative"] == 0 and row["n"] == LIMITS[task]
        assert row["retention"] in (100.0, None)  # None: a baseline of 0 on the tiny model
    assert sorted(out["retention_uninformative"]) == sorted(TASKS)
    assert out["retention_ci_low"] is None and out["retention_gate"]["passed"] == 0
    flat = retention(flat_scores(per_doc), flat_scores(per_doc))  # the old form still works on the same results
    assert flat["retention"] == 100.0


def test_different_limits_are_refused(per_doc):
    fewer = {t: dict(r, docs=r["docs"][:-1]) for t, r in per_doc.items()}
    with pytest.raises(ValueError, match="different documents"):
        paired_benchmark_retention(per_doc, fewer, 95.0)
