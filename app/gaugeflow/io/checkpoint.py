"""HDF5 checkpoints of training runs (a contract: users read weights with plain h5py).

Layout: ``<run dir>/checkpoints/step_<8-digit step>.h5`` with groups ``model/`` (one
dataset per state-dict key), ``optim/``, ``sched/``, ``rng/`` and attributes ``step``,
``theory``, ``config`` (resolved YAML) and ``gaugeflow_version`` (UTF-8 strings), plus
``git_sha`` and ``created``. Written under a temporary name and renamed; loading never
unpickles anything (:mod:`gaugeflow.io.tree`).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import h5py

from gaugeflow.io.provenance import provenance
from gaugeflow.io.tree import read_tree, write_tree

_NAME = re.compile(r"^step_(\d{8})\.h5$")
SECTIONS = ("model", "optim", "sched", "rng")


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint; the message is one line naming the file."""


@dataclass
class Checkpoint:
    path: pathlib.Path
    step: int
    attrs: dict[str, Any]
    model: dict[str, Any]
    optim: dict[str, Any] = field(default_factory=dict)
    sched: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)

    @property
    def theory(self) -> str:
        return str(self.attrs.get("theory", ""))

    @property
    def config(self) -> str:
        return str(self.attrs.get("config", ""))


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / "checkpoints" / f"step_{step:08d}.h5"


def save_checkpoint(run_dir, step: int, *, model: dict, optim: dict | None = None, sched: dict | None = None,
                    rng: dict | None = None, theory: str = "", config: str = "", keep: int | None = None,
                    attrs: dict | None = None) -> pathlib.Path:
    """Write a checkpoint atomically; with ``keep`` remove all but the newest ``keep`` ones.

    ``attrs``: further file attributes (UTF-8 strings or numbers), e.g. the provenance of the
    weights a run started from.
    """
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in provenance().items():
                f.attrs[k] = v
            f.attrs["step"] = int(step)
            f.attrs["theory"] = str(theory)
            f.attrs["config"] = str(config)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            for name, content in zip(SECTIONS, (model, optim or {}, sched or {}, rng or {})):
                write_tree(f.create_group(name), content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if keep is not None and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


_TEMP = re.compile(r"^\.step_\d{8}(\.h5)?\.tmp-")


def remove_stale_temporaries(run_dir) -> list[pathlib.Path]:
    """Remove what interrupted checkpoint writes of this run left (``checkpoints/.step_*.tmp-*``).

    A write killed with -9 cannot clean up after itself; call this at the start of a job that
    owns ``run_dir`` (no other writer of this run is alive then). Returns what was removed.
    """
    d = pathlib.Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    gone = []
    for p in d.iterdir():
        if _TEMP.match(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def list_checkpoints(run_dir) -> list[pathlib.Path]:
    """Checkpoints of a run directory, oldest first."""
    d = pathlib.Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def resolve_checkpoint(spec: str | os.PathLike, key: str = "checkpoint") -> pathlib.Path:
    """A checkpoint file, or a run directory meaning its latest checkpoint."""
    p = pathlib.Path(spec)
    if p.is_dir():
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"{key}={p}: run directory holds no checkpoints/step_*.h5")
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"{key}={p}: no such checkpoint file or run directory")
    return p


def load_checkpoint(spec: str | os.PathLike, key: str = "checkpoint", sections=SECTIONS) -> Checkpoint:
    path = resolve_checkpoint(spec, key)
    if not h5py.is_hdf5(path):
        raise CheckpointError(f"{key}={path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            if "step" not in attrs or "model" not in f:
                raise CheckpointError(f"{key}={path}: not a gaugeflow checkpoint (needs attribute 'step' and group 'model')")
            parts = {name: read_tree(f[name]) if name in f and name in sections else {} for name in SECTIONS}
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{key}={path}: unreadable checkpoint ({err})") from None
    return Checkpoint(path, int(attrs["step"]), attrs, **parts)
