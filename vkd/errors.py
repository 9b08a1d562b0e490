"""Exceptions that the CLI turns into one-line messages and exit codes.

``UserError`` marks a mistake the user can fix (bad path, bad key, bad data): the CLI prints
``vkd: error: <message>`` and exits with code 2, never a traceback. ``NonFiniteError`` marks a
numerical fault during training: the run stops at that step, keeps its last good checkpoint, and the
CLI exits with code 3.
"""

from __future__ import annotations


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when the message is empty), for a one-line error;
    cut to ``limit`` characters when given."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if limit is None else line[:limit]


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration key, value or file."""


class DataError(UserError):
    """Missing, malformed or unreadable input data."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped training: exit code 3."""

    exit_code = 3

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved: exit code 130."""

    exit_code = 130

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
