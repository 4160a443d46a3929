"""HDF5 ensembles: one file per ensemble, a layout other tools read with plain h5py.

Layout (a contract):

* gauge theories: dataset ``links``, complex, ``(n_cfg, d, L_0, ..., L_{d-1}, N, N)``;
  scalar theories: dataset ``phi``, real, ``(n_cfg, L_0, ..., L_{d-1})``;
* per-configuration datasets of shape ``(n_cfg,)`` where they apply: ``action`` (S),
  ``plaquette``, ``accepted``, ``log_q``, ``log_p`` (= -S), and any further measurement;
  a measurement with several values per configuration (``pion_correlator``, ``(n_cfg, T)``) has
  the configuration as its first axis. ``action`` is the action of the distribution the
  configurations follow; a file whose sampler could not afford it (pseudofermion HMC without
  its log-determinant) has no ``action`` and no ``log_p``, and readers must cope;
* file attributes: ``theory`` (preset name), ``group``, ``beta`` and the other action
  parameters, ``shape`` (integer array), ``config`` (resolved YAML), ``gaugeflow_version``,
  ``git_sha``, ``created``, ``seed``; strings are UTF-8 ``str``;
* several independent chains in one file: a per-configuration integer dataset ``chain``
  (row ``i`` belongs to chain ``chain[i]``; rows of one chain in Monte Carlo order, however
  the chains are interleaved or concatenated), and optionally ``trajectory`` (the chain's
  trajectory that produced the row). A file without ``chain`` is one chain. Readers that
  estimate errors treat the chains as replicas (:meth:`Ensemble.replicas`) and cut
  thermalisation per chain (:meth:`Ensemble.drop_therm`);
* a NaN in a per-configuration measurement: not measured on that configuration (e.g.
  ``hmc.measure_every``); readers skip NaN rows when they estimate;
* optionally a group ``chain_state`` (a Markov chain's state after its last step, what a
  continuation starts from): dataset ``fields`` (the configurations after the last
  trajectory, with the batch axis, one per chain, whether or not they were written to the
  ensemble), dataset ``rng_state`` (uint8, ``torch.Generator.get_state()``; ``(n_chains,
  state)`` when every chain has its own generator), and attributes (``rng_device``,
  ``n_traj_chain``, ...).

Chunking: the configuration dataset is stored in chunks of many configurations (about
:data:`CHUNK_BYTES` each, never fewer than one configuration, and not more than the
expected number of configurations when the writer is told it); per-configuration datasets
in chunks of up to :data:`COLUMN_CHUNK` values. Appended configurations are buffered and
written one whole chunk at a time. Optional compression (:func:`parse_compression`):
``gzip``, ``gzip:<level>`` or ``lzf``, with the shuffle filter; all are built into every
h5py, so plain h5py reads the files.

Files are written under a temporary name in the target directory and renamed when
complete, so a killed job never leaves a truncated file under the final name.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch

from gaugeflow.io.provenance import provenance

FIELD_DATASETS = ("links", "phi")
#: per-configuration dataset of chain ids (files of several chains)
CHAIN = "chain"
#: per-configuration dataset of the trajectory (of its chain, counted from 1) that produced the row
TRAJECTORY = "trajectory"
#: HDF5 group holding a chain's state after its last step (fields and random-number state)
CHAIN_STATE = "chain_state"
#: target size of one chunk of the configuration dataset (bytes, before compression)
CHUNK_BYTES = 2 << 20
#: most values in one chunk of a per-configuration dataset
COLUMN_CHUNK = 1 << 14
#: gzip level of ``gzip`` without one
DEFAULT_GZIP_LEVEL = 4


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


def parse_compression(spec: Any, key: str = "compression") -> tuple[str | None, int | None]:
    """``(filter, level)`` for h5py from a compression setting; ``ValueError`` naming ``key`` otherwise.

    ``None`` (or ``"none"``, ``""``): no compression. ``"gzip"``: deflate at level
    :data:`DEFAULT_GZIP_LEVEL`; ``"gzip:<0-9>"``: deflate at that level. ``"lzf"``: h5py's
    fast LZF filter (no level).
    """
    if spec is None or str(spec).strip().lower() in ("", "none", "null", "false"):
        return None, None
    text = str(spec).strip().lower()
    name, colon, level = text.partition(":")
    if name == "lzf" and not colon:
        return "lzf", None
    if name == "gzip":
        if not colon:
            return "gzip", DEFAULT_GZIP_LEVEL
        if level.isdigit() and 0 <= int(level) <= 9:
            return "gzip", int(level)
    raise ValueError(f"{key} must be null, gzip, gzip:<level 0-9> or lzf, got {spec!r}")


def chunk_length(field_shape, field_dtype: torch.dtype, expected: int | None = None) -> int:
    """Configurations per chunk: about :data:`CHUNK_BYTES`, at least 1, at most ``expected``."""
    nbytes = max(1, math.prod(int(s) for s in field_shape) * _np_dtype(field_dtype).itemsize)
    n = max(1, CHUNK_BYTES // nbytes)
    if expected is not None:
        n = min(n, max(1, int(expected)))
    return n


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    # no torch factory call: this must not depend on torch's default device
    table = {torch.float32: np.float32, torch.float64: np.float64, torch.complex64: np.complex64,
             torch.complex128: np.complex128, torch.float16: np.float16, torch.int64: np.int64,
             torch.int32: np.int32, torch.bool: np.bool_, torch.uint8: np.uint8}
    if dtype not in table:
        raise ValueError(f"no HDF5 dataset type for {dtype}")
    return np.dtype(table[dtype])


class EnsembleWriter:
    """Append configurations and per-configuration data to an ensemble, atomically.

    Use as a context manager: on normal exit (or :meth:`close`) the file gets its
    final name; on an exception the temporary file is removed.

    ``chunk``: configurations per HDF5 chunk (default :func:`chunk_length` of ``expected``,
    the number of configurations the caller expects to write, if known);
    ``compression``: ``None``, ``"gzip"``, ``"gzip:<level>"`` or ``"lzf"``
    (:func:`parse_compression`), applied to every dataset.
    """

    def __init__(self, path: str | os.PathLike, field_name: str, field_shape, field_dtype: torch.dtype,
                 attrs: dict[str, Any], chunk: int | None = None, compression: str | None = None,
                 expected: int | None = None):
        if field_name not in FIELD_DATASETS:
            raise ValueError(f"field dataset must be one of {FIELD_DATASETS}, got {field_name!r}")
        self.compression, self.compression_level = parse_compression(compression)
        shape = tuple(int(s) for s in field_shape)
        self.chunk = int(chunk) if chunk is not None else chunk_length(shape, field_dtype, expected)
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.column_chunk = max(1, min(COLUMN_CHUNK, int(expected) if expected else COLUMN_CHUNK))
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file = h5py.File(self.tmp, "w")
        for k, v in {**provenance(), **attrs}.items():
            self.file.attrs[k] = _attr_value(v)
        if compression is not None and self.compression is not None:
            self.file.attrs["compression"] = str(compression)
        self.field_shape = shape
        self.field = self.file.create_dataset(
            field_name, shape=(0, *shape), maxshape=(None, *shape), dtype=_np_dtype(field_dtype),
            chunks=(self.chunk, *shape), **self._filters()
        )
        self.columns: dict[str, h5py.Dataset] = {}
        self._column_names: list[str] | None = None
        self._row_shapes: dict[str, tuple[int, ...]] = {}
        self._pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._pending_n = 0
        self.n = 0  # configurations appended (written or still buffered)
        self.written = 0  # configurations in the file

    def _filters(self) -> dict[str, Any]:
        if self.compression is None:
            return {}
        return {"compression": self.compression, "compression_opts": self.compression_level, "shuffle": True}

    def append(self, fields: torch.Tensor, **columns: torch.Tensor | np.ndarray | float) -> None:
        """Append a batch ``(b, ...)`` of configurations with their per-configuration values.

        Every call passes the same columns (a new one after the first call is an error).
        """
        arr = fields.detach().cpu().numpy()
        b = arr.shape[0]
        if tuple(arr.shape[1:]) != self.field_shape:
            raise ValueError(f"configurations of shape {tuple(arr.shape[1:])}, the ensemble holds {self.field_shape}")
        cols = {}
        for name, val in columns.items():
            v = np.asarray(val.detach().cpu().numpy() if torch.is_tensor(val) else val)
            if v.ndim >= 2:  # several values per configuration: the first axis is the configuration
                if v.shape[0] != b:
                    raise ValueError(f"column {name!r} has {v.shape[0]} rows for {b} configurations")
                cols[name] = v
            else:
                cols[name] = v.reshape(b)
        if self._column_names is None:
            self._column_names = list(cols)
            self._row_shapes = {k: v.shape[1:] for k, v in cols.items()}
        elif set(cols) != set(self._column_names) or any(
                cols[k].shape[1:] != self._row_shapes.get(k, cols[k].shape[1:]) for k in cols):
            bad = [k for k in cols if k in self._row_shapes and cols[k].shape[1:] != self._row_shapes[k]]
            if bad:
                raise ValueError(f"column {bad[0]!r} has rows of shape {cols[bad[0]].shape[1:]}, earlier "
                                 f"{self._row_shapes[bad[0]]}")
            new = sorted(set(cols) - set(self._column_names))
            if new:
                raise ValueError(f"column {new[0]!r} appeared after {self.n} configurations")
            missing = sorted(set(self._column_names) - set(cols))
            raise ValueError(f"columns {missing} missing after {self.n} configurations")
        self._pending.append((arr, cols))
        self._pending_n += b
        self.n += b
        if self._pending_n >= self.chunk:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        arr = np.concatenate([a for a, _ in self._pending]) if len(self._pending) > 1 else self._pending[0][0]
        b, n0 = arr.shape[0], self.written
        self.field.resize(n0 + b, axis=0)
        self.field[n0:] = arr
        for name in self._column_names or []:
            v = np.concatenate([c[name] for _, c in self._pending])
            if name not in self.columns:
                row = tuple(v.shape[1:])
                rows = max(1, min(self.column_chunk, COLUMN_CHUNK // max(1, math.prod(row))))
                self.columns[name] = self.file.create_dataset(
                    name, shape=(0, *row), maxshape=(None, *row), dtype=v.dtype, chunks=(rows, *row),
                    **self._filters()
                )
            ds = self.columns[name]
            ds.resize(n0 + b, axis=0)
            ds[n0:] = v
        self.written = n0 + b
        self._pending, self._pending_n = [], 0

    def set_attrs(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = _attr_value(v)

    def set_chain_state(self, fields: torch.Tensor, rng_state: torch.Tensor | None = None, **attrs: Any) -> None:
        """Record the chain's state after its last step (group :data:`CHAIN_STATE`), replacing any earlier one.

        ``fields``: the current configurations ``(b, ...)``; ``rng_state``: the generator's
        ``get_state()`` (uint8); ``attrs``: e.g. ``rng_device``, ``n_traj_chain``.
        """
        if CHAIN_STATE in self.file:
            del self.file[CHAIN_STATE]
        grp = self.file.create_group(CHAIN_STATE)
        grp.create_dataset("fields", data=fields.detach().cpu().numpy())
        if rng_state is not None:
            grp.create_dataset("rng_state", data=rng_state.detach().cpu().numpy().astype(np.uint8))
        for k, v in attrs.items():
            grp.attrs[k] = _attr_value(v)

    def flush(self) -> None:
        self._write_pending()
        self.file.flush()

    def close(self) -> pathlib.Path:
        """Finish the file and move it to its final name."""
        self._write_pending()
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

    @property
    def chain(self) -> np.ndarray | None:
        """Chain id of every configuration (the ``chain`` dataset), or None for a file of one chain."""
        return self.columns.get(CHAIN)

    @property
    def n_chains(self) -> int:
        return 1 if self.chain is None else int(np.unique(self.chain).size)

    def chain_lengths(self) -> list[int]:
        """Configurations of each chain, in increasing order of chain id."""
        if self.chain is None:
            return [self.n_cfg]
        return [int(n) for n in np.unique(self.chain, return_counts=True)[1]]

    def replicas(self, name: str, skip_nan: bool = True) -> list[np.ndarray]:
        """Per-chain series of column ``name`` (:func:`gaugeflow.sampling.statistics.replicas`):
        one array per chain, NaN rows (not measured) dropped with ``skip_nan``."""
        from gaugeflow.sampling.statistics import replicas

        return replicas(self.columns[name], self.chain, skip_nan)

    def drop_therm(self, n: int) -> "Ensemble":
        """This ensemble without the first ``n`` configurations of each chain (thermalisation).

        Rows keep their order; the configurations are cut too where they were loaded. A file
        of one chain loses its first ``n`` rows.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"n_therm must be >= 0, got {n}")
        if n == 0:
            return self
        keep = np.zeros(self.n_cfg, dtype=bool)
        if self.chain is None:
            keep[n:] = True
        else:
            for c in np.unique(self.chain):
                keep[np.flatnonzero(self.chain == c)[n:]] = True
        fields = self.fields
        if fields is not None and len(fields) == self.n_cfg:
            fields = fields[keep]
        return Ensemble(self.path, self.attrs, self.field_name, int(keep.sum()), fields,
                        {k: v[keep] for k, v in self.columns.items()})

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
                if obj.shape[:1] != (n,):
                    raise EnsembleError(f"{path}: per-configuration dataset '{key}' has shape {obj.shape}, expected ({n},)"
                                        f" or ({n}, ...)")
                columns[key] = obj[()]
    except EnsembleError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise EnsembleError(f"{path}: unreadable ensemble ({err})") from None
    return Ensemble(path, attrs, name, n, fields, columns)


@dataclass
class ChainState:
    """A chain's state after its last step, as :meth:`EnsembleWriter.set_chain_state` stored it."""

    fields: np.ndarray
    rng_state: np.ndarray | None
    attrs: dict[str, Any]


def read_chain_state(path: str | os.PathLike) -> ChainState | None:
    """The :data:`CHAIN_STATE` group of an ensemble file, or None when the file has none
    (files written before it existed, or by samplers without a chain to continue)."""
    path = pathlib.Path(path)
    try:
        with h5py.File(path, "r") as f:
            grp = f.get(CHAIN_STATE)
            if not isinstance(grp, h5py.Group) or "fields" not in grp:
                return None
            rng = grp["rng_state"][()] if "rng_state" in grp else None
            return ChainState(grp["fields"][()], rng, {k: _decode(v) for k, v in grp.attrs.items()})
    except (OSError, KeyError, ValueError) as err:
        raise EnsembleError(f"{path}: unreadable chain state ({err})") from None
