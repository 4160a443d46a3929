"""Provenance recorded in every file: version, git commit, creation time."""

from __future__ import annotations

import datetime as _dt
import functools
import pathlib
import subprocess

import gaugeflow


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """Commit of the source tree gaugeflow runs from, or ``"unknown"`` for an installed copy."""
    here = pathlib.Path(gaugeflow.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, str]:
    return {"gaugeflow_version": gaugeflow.__version__, "git_sha": git_sha(), "created": now_iso()}
