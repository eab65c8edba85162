"""Failures the user can fix (bad input, a missing or stale artifact, an unreachable hub): a stage prints them as one
`Error: ...` line that says what to change, with no traceback (set DPOFLOW_DEBUG=1 to get one)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import click


class UserError(Exception):
    """A failure with a message for the user: what is wrong (file:line:field where it applies) and what to do."""


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage's click command: a UserError or a missing file becomes click's one-line `Error: ...`."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (UserError, FileNotFoundError) as err:
            if os.environ.get("DPOFLOW_DEBUG"):
                raise
            text = " ".join(str(err).split()) or type(err).__name__
            raise click.ClickException(text) from None

    return run
