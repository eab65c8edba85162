"""The training loop's MetricLogger (dpoflow.training.callbacks) on dvclive: curves under dvclive/<stage>/.

Timing curves (TIMING_METRICS: they differ run to run) go to dvclive/<stage>/perf/<key>.tsv, outside the
DVC-tracked plots folder dvclive/<stage>/plots/metrics, so a rerun on the same inputs leaves that folder's hash,
and the stages that depend on it, unchanged (issue 21).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

from dpoflow.runtime import distributed
from dvclive import Live

TIMING_METRICS = ("tokens_per_sec", "step_seconds", "peak_memory_gb")
PERF_DIR = "perf"


class DvcLiveLogger:
    def __init__(self, live: Live):
        self.live = live
        shutil.rmtree(Path(live.dir) / PERF_DIR, ignore_errors=True)  # as dvclive clears its plots on a new run

    def log_step(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if key.rsplit("/", 1)[-1] in TIMING_METRICS:
                self._log_timing(key, value)
            else:
                self.live.log_metric(key, value)
        self.live.next_step()

    def _log_timing(self, key: str, value: float) -> None:
        path = Path(self.live.dir) / PERF_DIR / f"{key}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "" if path.exists() else f"step\t{key.rsplit('/', 1)[-1]}\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{header}{self.live.step}\t{value}\n")

    def restart(self, archive_as: str) -> None:
        """Move the curves so far to <live dir>/<archive_as> and start again at step 0."""
        source = Path(self.live.plots_dir) / "metrics"
        if source.exists():
            target = Path(self.live.dir) / archive_as
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
        perf = Path(self.live.dir) / PERF_DIR
        if perf.exists():
            shutil.move(str(perf), str(Path(self.live.dir) / archive_as / PERF_DIR))
        self.live.step = 0


@contextmanager
def live_logger(directory: str, fresh: bool = False) -> Iterator[DvcLiveLogger | None]:
    """A DvcLiveLogger writing to `directory` on the main process (None on the other ranks); `fresh` removes the
    previous run's curves first."""
    if not distributed.is_main_process():
        with nullcontext():
            yield None
        return
    if fresh:
        shutil.rmtree(directory, ignore_errors=True)
    with Live(directory, save_dvc_exp=False, dvcyaml=None, report=None) as live:
        yield DvcLiveLogger(live)
