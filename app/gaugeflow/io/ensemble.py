"""HDF5 ensembles: one file per ensemble, a layout other tools read with plain h5py.

Layout (a contract):

* gauge theories: dataset ``links``, complex, ``(n_cfg, d, L_0, ..., L_{d-1}, N, N)``;
  scalar theories: dataset ``phi``, real, ``(n_cfg, L_0, ..., L_{d-1})``;
* per-configuration datasets of shape ``(n_cfg,)`` where they apply: ``action`` (S),
  ``plaquette``, ``accepted``, ``log_q``, ``log_p`` (= -S), and any further measurement;
* file attributes: ``theory`` (preset name), ``group``, ``beta`` and the other action
  parameters, ``shape`` (integer array), ``config`` (resolved YAML), ``gaugeflow_version``,
  ``git_sha``, ``created``, ``seed``; strings are UTF-8 ``str``.

Files are written under a temporary name in the target directory and renamed when
complete, so a killed job never leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch

from gaugeflow.io.provenance import provenance

FIELD_DATASETS = ("links", "phi")


class EnsembleError(ValueError):
    """A file that is not a usable ensemble; the message is one line naming the file."""


def _attr_value(v: Any) -> Any:
    if isinstance(v, str):
        return v  # h5py stores str as variable-length UTF-8
    if isinstance(v, bool):
        return np.bool_(v)
    if isinstance(v, (list, tuple)):
        return np.asarray(v, dtype=np.int64 if all(isinstance(x, (int, np.integer)) for x in v) else np.float64)
    return v


class EnsembleWriter:
    """Append configurations and per-configuration data to an ensemble, atomically.

    Use as a context manager: on normal exit (or :meth:`close`) the file gets its
    final name; on an exception the temporary file is removed.
    """

    def __init__(self, path: str | os.PathLike, field_name: str, field_shape, field_dtype: torch.dtype,
                 attrs: dict[str, Any], chunk: int = 1):
        if field_name not in FIELD_DATASETS:
            raise ValueError(f"field dataset must be one of {FIELD_DATASETS}, got {field_name!r}")
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file = h5py.File(self.tmp, "w")
        for k, v in {**provenance(), **attrs}.items():
            self.file.attrs[k] = _attr_value(v)
        np_dtype = torch.empty(0, dtype=field_dtype).numpy().dtype
        shape = tuple(field_shape)
        self.field = self.file.create_dataset(
            field_name, shape=(0, *shape), maxshape=(None, *shape), dtype=np_dtype, chunks=(chunk, *shape)
        )
        self.columns: dict[str, h5py.Dataset] = {}
        self.n = 0

    def append(self, fields: torch.Tensor, **columns: torch.Tensor | np.ndarray | float) -> None:
        """Append a batch ``(b, ...)`` of configurations with their per-configuration values."""
        arr = fields.detach().cpu().numpy()
        b = arr.shape[0]
        self.field.resize(self.n + b, axis=0)
        self.field[self.n:] = arr
        for name, val in columns.items():
            v = np.asarray(val.detach().cpu().numpy() if torch.is_tensor(val) else val).reshape(b)
            if name not in self.columns:
                if self.n:
                    raise ValueError(f"column {name!r} appeared after {self.n} configurations")
                self.columns[name] = self.file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=v.dtype)
            ds = self.columns[name]
            ds.resize(self.n + b, axis=0)
            ds[self.n:] = v
        self.n += b

    def set_attrs(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = _attr_value(v)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> pathlib.Path:
        """Finish the file and move it to its final name."""
        self.file.attrs["n_cfg"] = self.n
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "EnsembleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Ensemble:
    path: pathlib.Path
    attrs: dict[str, Any]
    field_name: str
    n_cfg: int
    #: the configurations loaded (all, only the last, or None when not requested)
    fields: np.ndarray | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def theory(self) -> str:
        return str(self.attrs["theory"])

    def tensor(self) -> torch.Tensor:
        if self.fields is None:
            raise EnsembleError(f"{self.path}: configurations were not loaded")
        return torch.from_numpy(np.asarray(self.fields))


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_ensemble(path: str | os.PathLike, load_fields: bool = True, last_only: bool = False) -> Ensemble:
    """Read and validate an ensemble file; raises :class:`EnsembleError` with a one-line message.

    ``last_only`` loads just the final configuration (to continue a chain).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise EnsembleError(f"{path}: no such ensemble file")
    if not h5py.is_hdf5(path):
        raise EnsembleError(f"{path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            names = [n for n in FIELD_DATASETS if n in f]
            if "theory" not in attrs or "shape" not in attrs or len(names) != 1:
                raise EnsembleError(
                    f"{path}: not a gaugeflow ensemble (needs attributes 'theory', 'shape' and one of "
                    f"the datasets {list(FIELD_DATASETS)})"
                )
            name = names[0]
            ds = f[name]
            shape = [int(s) for s in np.atleast_1d(attrs["shape"])]
            d = len(shape)
            if name == "links":
                ok = ds.dtype.kind == "c" and ds.ndim == d + 4 and list(ds.shape[2:2 + d]) == shape \
                    and ds.shape[1] == d and ds.shape[-1] == ds.shape[-2]
                want = f"complex (n_cfg, {d}, {', '.join(map(str, shape))}, N, N)"
            else:
                ok = ds.dtype.kind == "f" and ds.ndim == d + 1 and list(ds.shape[1:]) == shape
                want = f"real (n_cfg, {', '.join(map(str, shape))})"
            if not ok:
                raise EnsembleError(f"{path}: dataset '{name}' has dtype {ds.dtype} and shape {ds.shape}, expected {want}")
            n = ds.shape[0]
            if last_only and n == 0:
                raise EnsembleError(f"{path}: ensemble holds no configurations")
            fields = ds[n - 1:n] if last_only else (ds[()] if load_fields else None)
            columns = {}
            for key, obj in f.items():
                if key == name or not isinstance(obj, h5py.Dataset):
                    continue
                if obj.shape != (n,):
                    raise EnsembleError(f"{path}: per-configuration dataset '{key}' has shape {obj.shape}, expected ({n},)")
                columns[key] = obj[()]
    except EnsembleError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise EnsembleError(f"{path}: unreadable ensemble ({err})") from None
    return Ensemble(path, attrs, name, n, fields, columns)
