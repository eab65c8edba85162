"""dpoflow.training.tune / `python -m dpoflow tune-batch` on the tiny model."""

from click.testing import CliRunner

from dpoflow.__main__ import cli
from dpoflow.runtime.params import DpoParams
from dpoflow.training.tune import Trial, choose, tune_batch


def test_choose_takes_the_smallest_batch_near_the_best_throughput():
    trials = [Trial(1, 1.0, 1.0, 10, 1), Trial(2, 1.0, 2.0, 20, 2), Trial(4, 1.9, 2.1, 21, 4), Trial(8, 4, 2.0, 20, 8)]
    assert choose(trials).batch_size == 2  # 2.0 pairs/s is within 5% of the best 2.1
    assert choose(trials, tolerance=0.01).batch_size == 4


def test_tune_batch_times_each_candidate_and_stops_at_the_memory_budget(tiny_model_dir):
    trials, best = tune_batch(
        tiny_model_dir, DpoParams(), [1, 2], prompt_len=8, completion_len=4, steps=1, log=lambda m: None
    )
    assert [t.batch_size for t in trials] == [1, 2] and best in trials
    assert all(t.step_seconds > 0 and t.peak_memory_gb > 0 for t in trials)
    small, _ = tune_batch(
        tiny_model_dir,
        DpoParams(),
        [1, 2, 4],
        prompt_len=8,
        completion_len=4,
        steps=1,
        memory_gb=trials[0].peak_memory_gb * 1.2,
        memory_fraction=1.0,
        log=lambda m: None,
    )
    assert [t.batch_size for t in small] == [1]


def test_cli_prints_the_params_entry(tiny_model_dir, tmp_path):
    import shutil
    from pathlib import Path

    params = tmp_path / "params.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", params)
    out = CliRunner().invoke(
        cli,
        [
            "tune-batch",
            "--params",
            str(params),
            "--model",
            str(tiny_model_dir),
            "--candidates",
            "1,2",
            "--steps",
            "1",
            "--prompt-len",
            "8",
            "--completion-len",
            "4",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "batch_size:\n  cpu: " in out.output
