"""The training loop's MetricLogger (dpoflow.training.callbacks) on dvclive: curves under dvclive/<stage>/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

from dpoflow.runtime import distributed
from dvclive import Live


class DvcLiveLogger:
    def __init__(self, live: Live):
        self.live = live

    def log_step(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.live.log_metric(key, value)
        self.live.next_step()

    def restart(self, archive_as: str) -> None:
        """Move the curves so far to <live dir>/<archive_as> and start again at step 0."""
        source = Path(self.live.plots_dir) / "metrics"
        if source.exists():
            target = Path(self.live.dir) / archive_as
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
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
