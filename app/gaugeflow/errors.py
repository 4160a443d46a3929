"""Errors every room may raise; the jobs in :mod:`gaugeflow.cli` turn them into one line and an exit code."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input detected by gaugeflow: reported as one line, exit code 2."""


def require(cond: bool, message: str) -> None:
    """Raise :class:`UsageError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise UsageError(message)


class Diverged(RuntimeError):
    """Training stopped mid-way (non-finite steps, or an error in a step): one line naming the step
    and the last good checkpoint, which stays intact; exit code 1."""
