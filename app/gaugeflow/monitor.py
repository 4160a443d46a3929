"""Run monitoring: a small logger interface, a no-op logger and a wandb backend.

Jobs call :func:`build_logger` with the ``logger`` config node and use the result
as a context manager::

    with build_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), rank=rank) as log:
        log.log_metrics({"loss": 1.2, "ess": 0.4}, step=100)
        log.log_images({"plaquette_history": run_dir / "plaquette.png"})
        log.log_summary({"log_z": -12.3})

Monitoring never decides whether a job succeeds: wandb is imported lazily, never
started on non-zero ranks or under pytest, and any failure to start or to log is
reported as one warning line on stderr after which the job carries on unlogged.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import pathlib
import re
import secrets
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, List, Optional

from gaugeflow.errors import UsageError


@dataclass
class LoggerConf:
    """The ``logger`` config group (conf/logger/{none,wandb}.yaml)."""

    name: str = "none"  # none | wandb
    project: str = "gaugeflow"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_name: Optional[str] = None  # null: the run directory's name
    mode: Optional[str] = None  # online | offline | disabled; null: $WANDB_MODE, else offline
    dir: Optional[str] = None  # null: the run directory (wandb writes <dir>/wandb/)
    resume_id: Optional[str] = None  # null: <run dir>/wandb_id.txt if present, else a new id
    init_timeout: float = 60.0  # seconds wandb.init may take before the job continues unlogged
    finish_timeout: float = 120.0  # seconds an online run may spend uploading at the end


NAMES = ("none", "wandb")
MODES = ("online", "offline", "disabled")
#: the file in the run directory that keeps the wandb run id across resumed invocations
ID_FILE = "wandb_id.txt"
# wandb's legacy spellings of the modes, still accepted in $WANDB_MODE
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# wandb rejects ids containing / \ # ? % : ; keep to a portable subset
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Logger(abc.ABC):
    """What a job may report. Finishing twice is harmless; calls after finish are ignored."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """One row of scalars at optimizer/trajectory ``step`` (steps must not decrease)."""

    @abc.abstractmethod
    def log_config(self, config: Mapping[str, Any]) -> None:
        """Add or overwrite configuration values of the run."""

    @abc.abstractmethod
    def log_images(self, images: Mapping[str, str | os.PathLike], step: int | None = None) -> None:
        """Image files (png, jpg, ...) by name; ``step`` defaults to the last metrics step."""

    @abc.abstractmethod
    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Final values of the run (ESS, log Z, stop reason, ...)."""

    @abc.abstractmethod
    def finish(self, exit_code: int = 0) -> None:
        """Close the run; a non-zero ``exit_code`` marks it failed."""

    @property
    def active(self) -> bool:
        """True when calls reach a backend."""
        return False

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            code = 0
        elif isinstance(exc, SystemExit) and isinstance(exc.code, int):
            code = exc.code
        else:
            code = 1
        self.finish(code)


class NullLogger(Logger):
    """Logs nothing (logger=none, non-zero ranks, disabled mode, a backend that failed to start)."""

    def __init__(self, reason: str = "logger=none"):
        self.reason = reason

    def log_metrics(self, metrics, step):
        pass

    def log_config(self, config):
        pass

    def log_images(self, images, step=None):
        pass

    def log_summary(self, summary):
        pass

    def finish(self, exit_code=0):
        pass

    def __repr__(self) -> str:
        return f"NullLogger({self.reason!r})"


class WandbLogger(Logger):
    """Forwards to a started wandb run; the first backend error turns it into a no-op with one warning."""

    def __init__(self, run, wandb_module):
        self._run = run
        self._wandb = wandb_module
        self._last_step: int | None = None
        self._failed = False
        self._done = False

    @property
    def active(self) -> bool:
        return not (self._done or self._failed)

    @property
    def run(self):
        """The underlying ``wandb.Run`` (None once finished)."""
        return None if self._done else self._run

    @property
    def run_id(self) -> str:
        return self._run.id

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - monitoring must not end a training job
            _warn(f"wandb {what} failed ({type(err).__name__}: {_first_line(err)}); continuing without wandb")
            self._failed = True

    def log_metrics(self, metrics, step):
        self._last_step = int(step)
        self._call("log", self._run.log, dict(metrics), step=int(step))

    def log_config(self, config):
        self._call("config update", self._run.config.update, _plain(config), allow_val_change=True)

    def log_images(self, images, step=None):
        if not self.active:
            return
        found = {}
        for key, path in images.items():
            if pathlib.Path(path).is_file():
                found[key] = path
            else:
                _warn(f"wandb: image {key!r} not logged, no file {str(path)!r}")
        if not found:
            return
        step = self._last_step if step is None else int(step)

        def log():
            # wandb.Image reads the file now, so a plot rewritten later cannot change what was logged
            self._run.log({k: self._wandb.Image(str(p)) for k, p in found.items()},
                          **({} if step is None else {"step": step}))

        self._call("image log", log)

    def log_summary(self, summary):
        self._call("summary update", self._run.summary.update, _plain(summary))

    def finish(self, exit_code=0):
        if self._done:
            return
        self._done = True
        try:
            # even after a failed log: closing writes the exit record, so the run is not left "running"
            self._run.finish(exit_code=int(exit_code))
        except Exception as err:  # noqa: BLE001
            if not self._failed:
                _warn(f"wandb finish failed ({type(err).__name__}: {_first_line(err)})")

    def __repr__(self) -> str:
        return f"WandbLogger(id={self._run.id!r})"


def build_logger(
    cfg: Mapping | LoggerConf | None,
    run_dir: str | os.PathLike,
    config: Mapping | None = None,
    rank: int = 0,
    *,
    job_type: str | None = None,
    force: bool = False,
) -> Logger:
    """The logger a job should use, from the ``logger`` config node.

    ``config`` is the job's resolved configuration (stored with the run). Only rank 0
    logs. Under pytest (``PYTEST_CURRENT_TEST`` set) or with ``GAUGEFLOW_WANDB=disabled``
    wandb is forced off unless ``force`` is true. Bad keys raise :class:`UsageError`;
    a wandb that cannot start gives a warning and a :class:`NullLogger`.
    """
    if cfg is None:
        return NullLogger("no logger config")
    opts = _options(cfg)
    # validate on every rank, so a typo fails everywhere and not only where it would be used
    name = opts["name"]
    if name not in NAMES:
        raise UsageError(f"logger.name must be none or wandb, got {name!r}")
    mode = _resolve_mode(opts["mode"])
    for key in ("project", "entity", "group", "run_name", "dir", "resume_id"):
        kinds = (str, os.PathLike) if key == "dir" else str
        if opts[key] is not None and not isinstance(opts[key], kinds):
            raise UsageError(f"logger.{key} must be a string, got {opts[key]!r}")
    tags = opts["tags"] or []
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise UsageError(f"logger.tags must be a list of strings, e.g. 'logger.tags=[a,b]', got {tags!r}")
    if opts["resume_id"] is not None and not _ID_RE.match(opts["resume_id"]):
        raise UsageError(f"logger.resume_id must be letters, digits, '_', '-' or '.', got {opts['resume_id']!r}")
    for key in ("init_timeout", "finish_timeout"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], (int, float)) or not opts[key] > 0:
            raise UsageError(f"logger.{key} must be a positive number of seconds, got {opts[key]!r}")

    if name == "none":
        return NullLogger("logger=none")
    if rank != 0:
        return NullLogger(f"rank {rank}")
    forced_off = os.environ.get("PYTEST_CURRENT_TEST") or os.environ.get("GAUGEFLOW_WANDB", "").lower() == "disabled"
    if forced_off and not force:
        mode = "disabled"
    if mode == "disabled":
        return NullLogger("wandb disabled")

    run_dir = pathlib.Path(run_dir)
    id_file = run_dir / ID_FILE
    run_id, resuming = opts["resume_id"], opts["resume_id"] is not None
    if run_id is None and id_file.is_file():
        run_id = id_file.read_text().strip()
        if not _ID_RE.match(run_id):
            raise UsageError(f"{id_file}: not a wandb run id ({run_id[:40]!r}); delete it or set logger.resume_id")
        resuming = True
    if run_id is None:
        run_id = _new_id()
    wandb_dir = pathlib.Path(opts["dir"]) if opts["dir"] is not None else run_dir

    try:
        import wandb
    except ImportError as err:
        _warn(f"logger=wandb but wandb cannot be imported ({_first_line(err)}); continuing without wandb")
        return NullLogger("wandb not importable")
    try:
        wandb_dir.mkdir(parents=True, exist_ok=True)
        timeout = float(opts["init_timeout"])
        if mode == "online":
            # with no stored API key wandb prompts on a terminal; init's own settings do not reach
            # that prompt (it reads the process-wide ones), so bound it there
            wandb.setup(settings=_settings(wandb, login_timeout=timeout))
        settings = _settings(
            wandb,
            init_timeout=timeout,
            x_service_wait=timeout,
            finish_timeout=float(opts["finish_timeout"]),
            # leave stdout/stderr alone: the progress bar and Hydra's logging own the console
            console="off",
            silent=True,
        )
        run = wandb.init(
            project=opts["project"],
            entity=opts["entity"],
            group=opts["group"],
            tags=list(tags),
            name=opts["run_name"] or run_dir.resolve().name,
            job_type=job_type,
            dir=str(wandb_dir),
            id=run_id,
            resume="allow" if resuming else None,
            mode=mode,
            config=_plain(config) if config is not None else None,
            # one run per job; never touch a run someone else started in this process
            reinit="create_new",
            settings=settings,
        )
    except Exception as err:  # noqa: BLE001 - a job must not die because monitoring failed
        _warn(f"wandb did not start ({type(err).__name__}: {_first_line(err)}); continuing without wandb")
        return NullLogger("wandb init failed")
    if getattr(run, "disabled", False):
        # wandb turns a timed-out login into a no-op run: say so instead of logging into the void
        _warn("wandb started a disabled run (no login?); continuing without wandb")
        return NullLogger("wandb init disabled")
    _write_atomic(id_file, run.id + "\n")
    _announce(run, mode)
    return WandbLogger(run, wandb)


def _settings(wandb, **values):
    # timeouts were added to wandb.Settings over the versions; drop what this wandb does not know
    known = getattr(wandb.Settings, "model_fields", None)
    if known is not None:
        values = {k: v for k, v in values.items() if k in known}
    return wandb.Settings(**values)


def _options(cfg) -> dict:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        given = dataclasses.asdict(cfg)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:
            pass
        if not isinstance(cfg, Mapping):
            raise UsageError(f"logger must be a config group (logger=none or logger=wandb), got {cfg!r}")
        given = dict(cfg)
    defaults = dataclasses.asdict(LoggerConf())
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UsageError(f"logger.{unknown[0]}: unknown key (known: {', '.join(defaults)})")
    return {**defaults, **given}


def _resolve_mode(mode) -> str:
    if mode is not None:
        if mode not in MODES:
            raise UsageError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        return mode
    env = os.environ.get("WANDB_MODE")
    if not env:
        # batch nodes usually have no route out: write locally, `wandb sync` later
        return "offline"
    env = _MODE_ALIASES.get(env, env)
    if env not in MODES:
        raise UsageError(f"WANDB_MODE (used as logger.mode is null) must be online, offline or disabled, got {env!r}")
    return env


def _plain(values):
    # wandb stores plain containers; a DictConfig would be stored by repr
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(values, (DictConfig, ListConfig)):
            return OmegaConf.to_container(values, resolve=True)
    except ImportError:
        pass
    return dict(values)


def _new_id() -> str:
    # wandb's own format (8 lowercase alphanumerics), made here so no wandb import is needed for it
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    # a job killed mid-write must not leave a half id that the next resume would trip over
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _announce(run, mode: str) -> None:
    # silent=True hides wandb's banner; keep the one fact a batch user needs
    if mode == "offline":
        where = pathlib.Path(run.dir).parent if getattr(run, "dir", None) else "?"
        print(f"wandb: offline run {run.id} in {where} (upload later: wandb sync {where})",
              file=sys.stderr, flush=True)
    else:
        print(f"wandb: run {run.id} at {getattr(run, 'url', None) or '?'}", file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
