"""What every job shares: config location, one-line errors, time budgets, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator

import torch

from gaugeflow.errors import UsageError, require  # noqa: F401  (re-exported for the jobs)

#: the Hydra config tree (conf/ of the source tree, shipped inside the package)
CONFIG_DIR = str(pathlib.Path(__file__).resolve().parent.parent / "conf")


def _process_start() -> float:
    """``time.monotonic()`` at the start of this process (Linux: from /proc; else: at this import).

    A batch system's walltime counts from the launch, interpreter start-up and imports included,
    so job budgets (``train.max_time``, ``sample.max_time``) count from here.
    """
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return now - age if 0.0 <= age < 86400.0 else now
    except (OSError, ValueError, IndexError):
        return now


#: when this process started, on the ``time.monotonic()`` clock
JOB_START = _process_start()


def job_elapsed() -> float:
    """Seconds since this process started."""
    return time.monotonic() - JOB_START


def fail(message: str, run_dir: str | None = None) -> None:
    """Print ``error: message``, remove a run directory that holds only bookkeeping, exit 2."""
    if run_dir is not None:
        _remove_bookkeeping_only(pathlib.Path(run_dir))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _remove_bookkeeping_only(path: pathlib.Path) -> None:
    # Hydra writes .hydra/ and a log before the job runs; a job that rejected its
    # input leaves nothing behind. Never the working directory (ranks other than 0 run there).
    if not path.is_dir() or path.resolve() == pathlib.Path.cwd().resolve():
        return
    extra = [p for p in path.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not extra:
        shutil.rmtree(path, ignore_errors=True)


def guarded(job: Callable[[object], None]) -> Callable[[object], None]:
    """Turn the project's input errors raised by ``job`` into one-line errors with exit code 2,
    and a peer rank's failure (:class:`gaugeflow.distributed.PeerFailure`) into one line with exit code 1."""

    def run(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from gaugeflow.distributed.init import PeerFailure
        from gaugeflow.io.ensemble import EnsembleError

        try:
            job(cfg)
        except (UsageError, EnsembleError) as err:
            run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__, run_dir)
        except PeerFailure as err:
            # another rank died or hung: its one line (which rank, which collective), exit 1;
            # what was written stays (the last checkpoint is complete: writes are atomic)
            print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
            sys.exit(1)

    run.__name__ = getattr(job, "__name__", "job")
    run.__doc__ = job.__doc__
    return run


_HMS = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


def parse_duration(value, key: str) -> float | None:
    """Seconds from a number or ``[HH:]MM:SS``; None means no limit."""
    if value is None or value == "" or str(value).lower() in ("none", "null"):
        return None
    text = str(value).strip()
    m = _HMS.match(text)
    try:
        seconds = float(text) if m is None else int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    except ValueError:
        raise UsageError(f"{key} must be seconds or HH:MM:SS, got {value!r}") from None
    if not seconds > 0:
        raise UsageError(f"{key} must be positive, got {value!r}")
    return seconds


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[Callable[[], bool]]:
    """Yield a predicate that turns true once SIGTERM arrived (batch systems send it before the kill)."""
    flag = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no signal handling
        yield lambda: False
        return
    try:
        yield lambda: flag["stop"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_dtype(name: str, key: str) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise UsageError(f"{key} must be float32 or float64, got {name!r}")
    return table[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device must be auto, cpu, cuda or xpu, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError("device=xpu but no XPU device is available")
    return dev
