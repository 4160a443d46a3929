"""The oldest torch gaugeflow runs on, and the one-line refusal of an older one.

``TORCH_MIN`` must equal the ``torch>=`` bound in pyproject.toml (a test compares them); the
reasons for the number are written there. Every ``gaugeflow`` job checks the torch it imported
before it does anything else (:func:`require_torch`, called first by ``gaugeflow.cli.main``), so
an old torch from an HPC module ends the job with one line instead of an ``ImportError`` or
``TypeError`` deep inside a distributed start-up. ``python -m gaugeflow.requirements`` does the same
check without importing torch (it reads the installed package's version): the PBS templates run it
once before ``mpiexec`` starts the ranks.

Versions are compared by their release number, so the forms HPC modules and nightlies carry count
as the release they build: ``2.13.0+cpu``, ``2.8.0a0+gitba56102`` (a source build of 2.8) and
``2.6.0.dev20250101`` all count as ``2.13``, ``2.8`` and ``2.6``.
"""

from __future__ import annotations

import re
import sys

#: the oldest torch release gaugeflow supports (the ``torch>=`` bound in pyproject.toml)
TORCH_MIN = "2.6"
#: exit status of a refused environment (the same as a bad command line)
EXIT_CODE = 2


def release(version: str) -> tuple[int, ...] | None:
    """The release numbers of a version string (``'2.8.0a0+git1234'`` -> ``(2, 8, 0)``); None if unreadable."""
    text = str(version).strip()
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging is a declared dependency
        Version = None  # noqa: N806
    if Version is not None:
        try:
            return tuple(Version(text).release)
        except InvalidVersion:
            pass
    m = re.match(r"v?(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _padded(numbers: tuple[int, ...], n: int = 3) -> tuple[int, ...]:
    return tuple(numbers) + (0,) * max(0, n - len(numbers))


def torch_problem(version: str | None, minimum: str = TORCH_MIN) -> str | None:
    """One line saying why this torch cannot run gaugeflow, or None when it can.

    ``version`` None means torch is not installed. A version string that cannot be read at all
    is let through: refusing a working build for its label would be worse than the clear
    errors torch itself gives.
    """
    hint = (f"install torch>={minimum} (python -m pip install 'torch>={minimum}'; on a cluster, load a "
            "module that provides it or pip-install it into your venv)")
    if version is None:
        return f"gaugeflow needs torch >= {minimum}, and torch is not installed: {hint}"
    have, need = release(version), release(minimum)
    if have is None or need is None:
        return None
    if _padded(have) < _padded(need):
        return f"gaugeflow needs torch >= {minimum}, found torch {version}: {hint}"
    return None


def require_torch(minimum: str = TORCH_MIN) -> None:
    """Import torch and end the process with one line on stderr (exit 2) if it is older than ``minimum``."""
    try:
        import torch
    except ImportError:
        version = None
    else:
        version = str(torch.__version__)
    problem = torch_problem(version, minimum)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CODE)


def installed_torch_version() -> str | None:
    """The installed torch's version without importing it (None if torch is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        pass
    try:  # a torch on sys.path without package metadata (some source builds)
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def main(argv: list[str] | None = None) -> None:
    """``python -m gaugeflow.requirements``: print torch's version, or end with one line (exit 2)."""
    version = installed_torch_version()
    problem = torch_problem(version)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CODE)
    print(f"torch {version} (gaugeflow needs >= {TORCH_MIN})")


if __name__ == "__main__":  # pragma: no cover
    main()
