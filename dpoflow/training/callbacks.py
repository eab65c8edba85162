"""How the training loop reports: a small protocol (after mlx-lm's `TrainingCallback`), so the loop knows nothing
of the logger behind it. The stages pass a dvclive adapter (stages/live_logger.py); tests pass a list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class MetricLogger(Protocol):
    def log_step(self, metrics: Mapping[str, float]) -> None:
        """One optimizer step's metrics ("train/<key>", and "eval/<key>" at evaluation steps), in step order."""

    def restart(self, archive_as: str) -> None:
        """A retry starts its curves again from the first step; the curves logged so far are kept aside under
        `archive_as` (a relative name such as "failed_attempts/attempt_1")."""
