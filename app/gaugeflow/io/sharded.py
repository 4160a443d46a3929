"""Sharded checkpoints: every rank writes its own shards, no rank ever holds the full model.

Layout (a user contract, like :mod:`gaugeflow.io.checkpoint`'s single file)::

    <run dir>/checkpoints/step_<8-digit step>/
        manifest.json     what the checkpoint holds and where (below)
        shard_<rank>.h5   one per rank of the writing job

The directory is written as ``checkpoints/.step_<8d>.tmp-<id>/`` and renamed when every rank's
shard and the manifest are complete, so a ``step_*`` directory is always whole; a job killed
while writing leaves only a hidden ``.tmp-`` directory.

``manifest.json``: ``format`` (``"gaugeflow-sharded-checkpoint"``), ``version`` (1), ``step``,
``world_size``, ``theory``, ``config`` (resolved YAML), ``gaugeflow_version``, ``git_sha``,
``created``, ``save_id`` (also an attribute of every shard: shards of different saves never
mix), ``files`` (``shard_<rank>.h5`` for rank 0 .. world-1), ``mesh`` (shape and ranks of the
device mesh of the sharded parameters, or null) and ``tensors``: for every tensor
(``model/<state-dict key>``, ``optim/<parameter name>/<state key>``) its global ``shape``,
``dtype``, ``placements`` (``["Shard(0)"]`` for FSDP's default, ``["Replicate()"]`` for a
tensor every rank holds whole) and ``shards``: a list of ``{"rank", "offset", "shape"}``, the
box of the global tensor stored in ``shard_<rank>.h5`` (empty shards and replicated copies are
not stored; each element of the tensor is in exactly one box).

``shard_<rank>.h5``: attributes ``format``, ``rank``, ``world_size``, ``step``, ``save_id``;
datasets ``tensors/<tensor name>`` (the box; attributes ``offset``, ``global_shape``,
``torch_dtype``; bfloat16 as its uint16 bits), group ``rng/`` with this rank's RNG states and,
in ``shard_0.h5`` only, group ``meta/`` with the optimizer's param groups (parameters by name),
its non-tensor state and the scheduler state. Groups are written by
:func:`gaugeflow.io.tree.write_tree`; nothing is pickled, and plain h5py reads everything.

Optimizer state is stored by parameter *name*, not by torch's positional index, so a checkpoint
loads into an optimizer over the same named parameters however they are sharded.

Resharding rule: a tensor is a set of boxes; a rank loading it computes the box it needs from
its current placements (the whole tensor when not sharded) and reads the intersecting parts of
the saved boxes (HDF5 hyperslabs: only those bytes are read). Hence any world size can load
any checkpoint, 1 included, and :func:`export_consolidated` writes the single-file form of
:mod:`gaugeflow.io.checkpoint` (for small models: it assembles every tensor in memory).

RNG states are per rank. Loading returns the states of the loading rank if that rank existed in
the writing job, else ``None`` (the caller then starts a fresh stream, e.g. keyed by seed, rank
and step). With a different world size the global batch is split differently anyway, so a
resumed run is a valid continuation but not the sample stream an uninterrupted run would draw.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import secrets
import shutil
import zlib
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist

from gaugeflow.io.checkpoint import SECTIONS, CheckpointError, list_checkpoints
from gaugeflow.io.provenance import provenance
from gaugeflow.io.tree import _TORCH_DTYPES, _key, read_tree, write_tree

__all__ = [
    "FORMAT",
    "ShardedCheckpoint",
    "export_consolidated",
    "list_any_checkpoints",
    "load_sharded",
    "resolve_any_checkpoint",
    "save_sharded",
    "sharded_path",
]

FORMAT = "gaugeflow-sharded-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_DIR = re.compile(r"^step_(\d{8})$")
_FILE = re.compile(r"^step_(\d{8})\.h5$")
_TENSOR_MARK = "__tensor__"  # in meta/optim/state: this value is a tensor entry


def sharded_path(run_dir: str | os.PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# placements: which box of the global tensor a rank holds


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _placement_text(p) -> str:
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(p, Shard):  # _StridedShard (TP + FSDP) is no subclass of Shard: refused below
        return f"Shard({p.dim})"
    if isinstance(p, Replicate):
        return "Replicate()"
    raise ValueError(f"sharded checkpoints support Shard and Replicate placements, not {p!r}")


def _parse_placement(text: str) -> int | None:
    """Shard(d) -> d, Replicate() -> None."""
    m = re.fullmatch(r"Shard\((\d+)\)", text)
    if m:
        return int(m.group(1))
    if text == "Replicate()":
        return None
    raise ValueError(f"unknown placement {text!r}")


def _box(shape: list[int], placements: list[str], mesh_shape: list[int], coord: list[int]) -> tuple[list[int], list[int]]:
    """(offset, shape) of the local part at mesh coordinate ``coord``.

    DTensor's rule (``Shard._local_shard_size_and_offset``): ``Shard(d)`` on a mesh dimension of
    size n cuts the current extent L along d into chunks of ``ceil(L / n)`` (as
    ``torch.chunk``); trailing chunks may be short or empty. Mesh dimensions apply in order,
    each on what the previous ones left.
    """
    offset, local = [0] * len(shape), list(shape)
    for placement, n, c in zip(placements, mesh_shape, coord):
        d = _parse_placement(placement)
        if d is None:
            continue
        chunk = -(-local[d] // n) if local[d] else 0
        start = min(c * chunk, local[d])
        local[d] = max(0, min(chunk, local[d] - start))
        offset[d] += start
    return offset, local


def _mesh_layout(mesh) -> tuple[list[int], dict[int, list[int]]]:
    """Mesh shape and the mesh coordinate of every global rank in it."""
    ranks = mesh.mesh
    coords = {}
    for flat, r in enumerate(ranks.flatten().tolist()):
        coords[int(r)] = [int(i) for i in np.unravel_index(flat, tuple(ranks.shape))]
    return [int(s) for s in ranks.shape], coords


def _local_box(t: torch.Tensor, rank: int) -> tuple[list[int], list[int]]:
    """The box of the global tensor that ``t`` holds on ``rank`` (everything when not a DTensor)."""
    if not _is_dtensor(t):
        return [0] * t.dim(), list(t.shape)
    mesh_shape, coords = _mesh_layout(t.device_mesh)
    box = _box(list(t.shape), [_placement_text(p) for p in t.placements], mesh_shape, coords[rank])
    if list(t.to_local().shape) != box[1]:  # our rule disagrees with torch's: never load wrongly
        raise ValueError(f"local shape {list(t.to_local().shape)} of a {list(t.shape)} tensor with placements "
                         f"{t.placements} differs from the expected {box[1]}")
    return box


# ---------------------------------------------------------------------------------------------
# what a model and an optimizer hold


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _optim_order(model: torch.nn.Module, optim) -> list[list[str]]:
    """The optimizer's parameters by name, per param group, in the optimizer's order."""
    names = _param_names(model)
    groups = []
    for group in optim.param_groups:
        try:
            groups.append([names[id(p)] for p in group["params"]])
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not in the model") from None
    return groups


def _entries(model: torch.nn.Module, optim) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors to store by entry name, and the optimizer's non-tensor part (``meta/optim``)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model state {key!r} is not a tensor")
        tensors[f"model/{key}"] = value.detach()
    meta: dict = {}
    if optim is not None:
        order = _optim_order(model, optim)
        sd = optim.state_dict()
        flat = [name for group in order for name in group]
        state: dict[str, dict] = {}
        for idx, values in sd["state"].items():
            name = flat[idx]
            state[name] = {}
            for k, v in values.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim/{name}/{k}"] = v.detach()
                    state[name][k] = _TENSOR_MARK
                else:
                    state[name][k] = v
        groups = []
        for group, names in zip(sd["param_groups"], order):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(names)})
        meta["optim"] = {"param_groups": groups, "state": state}
    return tensors, meta


def _describe(tensors: Mapping[str, torch.Tensor], world: int) -> tuple[dict, dict | None]:
    """Manifest ``tensors`` and ``mesh``; the same on every rank (it is computed, not gathered)."""
    out, mesh_info = {}, None
    for name, t in tensors.items():
        shape = [int(s) for s in t.shape]
        entry: dict[str, Any] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
        if _is_dtensor(t):
            mesh_shape, coords = _mesh_layout(t.device_mesh)
            if mesh_info is None:
                mesh_info = {"shape": mesh_shape, "ranks": t.device_mesh.mesh.flatten().tolist(),
                             "dim_names": list(t.device_mesh.mesh_dim_names or [])}
            placements = [_placement_text(p) for p in t.placements]
            boxes = {r: _box(shape, placements, mesh_shape, c) for r, c in sorted(coords.items())}
        else:
            placements = ["Replicate()"]
            boxes = {0: ([0] * len(shape), shape)}
        shards, seen = [], set()
        for r, (off, loc) in boxes.items():
            key = (tuple(off), tuple(loc))
            # an empty box holds nothing; a box already held by a lower rank is a replica
            if math.prod(loc) == 0 or key in seen:
                continue
            seen.add(key)
            shards.append({"rank": r, "offset": off, "shape": loc})
        entry.update(placements=placements, shards=shards)
        out[name] = entry
    return out, mesh_info


# ---------------------------------------------------------------------------------------------
# collectives (none at all on one process)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device():
    from gaugeflow.distributed.fsdp import collective_device

    return collective_device()


def _broadcast_int(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(t, 0)
    return int(t.item())


def _all_flags(flag: int) -> list[int]:
    """Every rank's small integer (all-gather), e.g. a failure flag or a digest."""
    t = torch.tensor([flag], dtype=torch.int64, device=_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


# ---------------------------------------------------------------------------------------------
# save


def _write_box(group: h5py.Group, name: str, data: torch.Tensor, offset, global_shape) -> None:
    t = data.detach().cpu().contiguous()
    arr = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    ds = group.create_dataset(name, data=arr)
    ds.attrs["offset"] = np.asarray(offset, dtype=np.int64)
    ds.attrs["global_shape"] = np.asarray(global_shape, dtype=np.int64)
    ds.attrs["torch_dtype"] = str(t.dtype).removeprefix("torch.")


def _write_shard(path: pathlib.Path, rank: int, world: int, step: int, save_id: str,
                 tensors: Mapping[str, torch.Tensor], described: Mapping[str, dict], rng: dict | None,
                 meta: dict | None) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT + "/shard"
        f.attrs["rank"] = rank
        f.attrs["world_size"] = world
        f.attrs["step"] = int(step)
        f.attrs["save_id"] = save_id
        group = f.create_group("tensors")
        for name, t in tensors.items():
            mine = [s for s in described[name]["shards"] if s["rank"] == rank]
            if not mine:
                continue
            local = t.to_local() if _is_dtensor(t) else t
            _write_box(group, _dataset_path(name), local, mine[0]["offset"], described[name]["shape"])
        write_tree(f.create_group("rng"), dict(rng or {}))
        if meta is not None:
            write_tree(f.create_group("meta"), meta)


def _dataset_path(name: str) -> str:
    """Path of a tensor entry inside ``tensors/`` (``/`` in names escaped as in io.tree)."""
    section, rest = name.split("/", 1)
    if section == "optim":
        pname, k = rest.rsplit("/", 1)
        return f"optim/{_key(pname)}/{_key(k)}"
    return f"{section}/{_key(rest)}"


def save_sharded(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, optim=None, *,
                 sched_state: dict | None = None, rng_states_this_rank: dict | None = None, theory: str = "",
                 config: str = "", keep: int | None = None) -> pathlib.Path:
    """Write ``<run dir>/checkpoints/step_<8d>/`` from every rank; returns its path.

    Collective over the whole world (shard files are named by global rank): every rank calls it with its own ``rng_states_this_rank`` (e.g.
    ``{"sampler": gen.get_state()}``); ``model`` and ``optim`` are FSDP-sharded (each rank writes
    its ``DTensor`` shards) or replicated (rank 0 writes the tensors). ``sched_state``,
    ``theory`` and ``config`` are taken from rank 0. ``keep`` removes all but the newest
    ``keep`` steps, counting both single-file and directory checkpoints.

    If any rank fails to write, every rank raises :class:`CheckpointError` naming the ranks, and
    the temporary directory is removed; a complete older checkpoint is never touched.
    """
    from gaugeflow.distributed.fsdp import reshard

    rank, world = _rank_world()
    distributed = world > 1
    final = sharded_path(run_dir, step)
    reshard(model)  # parameters must be the sharded ones (see reshard_after_forward=False)
    tensors, meta = _entries(model, optim)
    described, mesh_info = _describe(tensors, world)
    if rank == 0:
        meta["sched"] = dict(sched_state or {})
    # rank 0 writes the manifest from its own view: make sure every rank agrees with it
    digest = zlib.crc32(json.dumps(described, sort_keys=True).encode())
    save_id = secrets.randbits(62)
    if distributed:
        if len(set(_all_flags(digest))) != 1:
            raise CheckpointError(f"checkpoint {final}: the ranks disagree on the model or optimizer layout")
        save_id = _broadcast_int(save_id)
    token = f"{save_id:016x}"
    tmp = final.parent / f".{final.name}.tmp-{token}"
    failure = None
    if rank == 0:
        try:
            tmp.mkdir(parents=True, exist_ok=False)
        except OSError as err:
            failure = err
    if distributed:  # outside any try: every rank takes part in every collective, in the same order
        dist.barrier()
    if failure is None:  # without the directory the other ranks fail here too, and say so below
        try:
            _write_shard(tmp / f"shard_{rank}.h5", rank, world, step, token, tensors, described,
                         rng_states_this_rank, meta if rank == 0 else None)
        except Exception as err:  # noqa: BLE001 - reported to every rank below
            failure = err
    failed = [r for r, f in enumerate(_all_flags(int(failure is not None))) if f] if distributed \
        else ([0] if failure else [])
    if not failed and rank == 0:
        try:
            manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "world_size": world,
                        "theory": str(theory), "config": str(config), **provenance(), "save_id": token,
                        "files": [f"shard_{r}.h5" for r in range(world)], "mesh": mesh_info, "tensors": described}
            text = json.dumps(manifest, indent=1)
            with open(tmp / MANIFEST, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            _install(tmp, final, token)
            if keep is not None and keep > 0:
                _prune(run_dir, keep)
        except Exception as err:  # noqa: BLE001
            failure = err
            failed = [0]
    if distributed:  # rank 0's rename is the commit: nobody returns before it (or its failure)
        if _broadcast_int(int(bool(failed))) and not failed:
            failed = [0]
    if failed:  # (every rank agrees by now)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if distributed:  # nobody returns while the half-written directory still exists
            dist.barrier()
        what = f": {_one_line(failure)}" if failure is not None else ""
        who = ", ".join(str(r) for r in failed)
        raise CheckpointError(f"checkpoint {final}: writing failed on rank{'s' if len(failed) > 1 else ''} {who}{what}")
    return final


def _install(tmp: pathlib.Path, final: pathlib.Path, token: str) -> None:
    """Rename the finished directory into place (a directory cannot replace a non-empty one)."""
    old = None
    if final.exists():  # the same step written again (e.g. after a resume): move the old aside
        old = final.with_name(f".{final.name}.old-{token}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(path: pathlib.Path) -> int:
    m = _DIR.match(path.name) or _FILE.match(path.name)
    return int(m.group(1))


def list_any_checkpoints(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Checkpoints of a run directory in both forms (``step_*.h5``, ``step_*/``), oldest first.

    At equal steps the file comes first, so the directory (the form written by the run) is the
    latest.
    """
    d = pathlib.Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if _DIR.match(p.name) and p.is_dir()]
    return sorted([*list_checkpoints(run_dir), *dirs], key=lambda p: (_step_of(p), p.is_dir()))


def _prune(run_dir, keep: int) -> None:
    found = list_any_checkpoints(run_dir)
    steps = sorted({_step_of(p) for p in found})
    drop = set(steps[:-keep])
    for p in found:
        if _step_of(p) in drop:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def resolve_any_checkpoint(spec: str | os.PathLike, key: str = "checkpoint") -> pathlib.Path:
    """A single-file checkpoint, a sharded ``step_*/`` directory, or a run directory (its latest
    checkpoint of either form). Errors are one-line :class:`CheckpointError` naming the path."""
    p = pathlib.Path(spec)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / MANIFEST).exists() or _DIR.match(p.name):
            if not (p / MANIFEST).is_file():
                raise CheckpointError(f"{key}={p / MANIFEST}: missing manifest (an incomplete or foreign sharded checkpoint)")
            return p
        found = list_any_checkpoints(p)
        if not found:
            raise CheckpointError(f"{key}={p}: run directory holds no checkpoints/step_*.h5 or checkpoints/step_*/")
        return found[-1]
    raise CheckpointError(f"{key}={p}: no such checkpoint file or run directory")


# ---------------------------------------------------------------------------------------------
# sources: where a loader reads boxes from


def _read_box(ds: h5py.Dataset, offset, shape, dtype_name: str) -> torch.Tensor:
    sel = tuple(slice(int(o), int(o) + int(n)) for o, n in zip(offset, shape))
    arr = ds[sel] if sel else ds[()]
    t = torch.from_numpy(np.array(arr))  # np.array copies: writable, owned memory
    if dtype_name == "bfloat16":
        return t.view(torch.bfloat16)
    return t.to(_TORCH_DTYPES[dtype_name])


def _overlap(a_off, a_shape, b_off, b_shape):
    """Intersection of two boxes as (offset, shape), or None."""
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a_off, a_shape, b_off, b_shape)]
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return None
    return lo, [h - lo_ for lo_, h in zip(lo, hi)]


class _ShardedSource:
    """A ``step_*/`` directory: manifest + lazily opened shard files."""

    form = "sharded"

    def __init__(self, path: pathlib.Path, key: str):
        self.path, self.key = path, key
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{key}={mpath}: missing manifest (an incomplete or foreign sharded checkpoint)")
        try:
            manifest = json.loads(mpath.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
            if int(manifest.get("version", 0)) > VERSION:
                raise ValueError(f"version {manifest['version']} is newer than this gaugeflow reads ({VERSION})")
            self.world = int(manifest["world_size"])
            self.step = int(manifest["step"])
            self.tensors = manifest["tensors"]
            files = manifest["files"]
            if len(files) != self.world:
                raise ValueError(f"{len(files)} files listed for world size {self.world}")
            for name, entry in self.tensors.items():
                for s in entry["shards"]:
                    if not 0 <= int(s["rank"]) < self.world:
                        raise ValueError(f"tensor {name}: shard of rank {s['rank']} beyond world size {self.world}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{key}={mpath}: corrupt manifest ({_one_line(err)})") from None
        self.manifest = manifest
        # every file exists and is HDF5 up front: all ranks fail alike instead of some later
        for r, name in enumerate(files):
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{key}={f}: missing shard of rank {r}")
            if not h5py.is_hdf5(f):
                raise CheckpointError(f"{key}={f}: corrupt shard (not an HDF5 file)")
        self._files: dict[int, h5py.File] = {}
        self.meta = self._meta()

    def _file(self, rank: int) -> h5py.File:
        if rank not in self._files:
            fpath = self.path / self.manifest["files"][rank]
            try:
                f = h5py.File(fpath, "r")
                sid = f.attrs.get("save_id")
                sid = sid.decode() if isinstance(sid, bytes) else sid
                if sid != self.manifest["save_id"] or int(f.attrs.get("rank", -1)) != rank:
                    f.close()
                    raise CheckpointError(f"{self.key}={fpath}: shard of another save (save_id {sid}, "
                                          f"manifest {self.manifest['save_id']})")
            except CheckpointError:
                raise
            except (OSError, KeyError, ValueError) as err:
                raise CheckpointError(f"{self.key}={fpath}: corrupt shard ({_one_line(err)})") from None
            self._files[rank] = f
        return self._files[rank]

    def _guard(self, rank: int, what, *args):
        fpath = self.path / self.manifest["files"][rank]
        try:
            return what(self._file(rank), *args)
        except CheckpointError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{self.key}={fpath}: corrupt shard ({_one_line(err)})") from None

    def _meta(self) -> dict:
        return self._guard(0, lambda f: read_tree(f["meta"]) if "meta" in f else {})

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.tensors[name]["dtype"]

    def read(self, name: str, offset, shape) -> torch.Tensor:
        entry = self.tensors[name]
        out = torch.empty(shape, dtype=_TORCH_DTYPES[entry["dtype"]])
        if out.numel() == 0:
            return out
        covered = 0
        for s in entry["shards"]:
            hit = _overlap(offset, shape, s["offset"], s["shape"])  # 0-d: always ([], [])
            if hit is None:
                continue
            lo, n = hit
            src = [a - b for a, b in zip(lo, s["offset"])]

            def get(f, src=src, n=n):
                part = _read_box(f["tensors"][_dataset_path(name)], src, n, entry["dtype"])
                if list(part.shape) != list(n):  # the file does not hold the box the manifest says
                    raise ValueError(f"{name}: read {list(part.shape)} where the manifest promises {list(n)}")
                return part

            part = self._guard(int(s["rank"]), get)
            dst = tuple(slice(a - b, a - b + m) for a, b, m in zip(lo, offset, n))
            out[dst] = part
            covered += part.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.key}={self.path / MANIFEST}: tensor {name} is not fully covered by its shards")
        return out

    def rng(self, rank: int) -> dict | None:
        if rank >= self.world:
            return None
        return self._guard(rank, lambda f: read_tree(f["rng"]) if "rng" in f else {})

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class _FileSource:
    """A single-file checkpoint (io.checkpoint layout): whole tensors, optimizer by index."""

    form = "file"

    def __init__(self, path: pathlib.Path, key: str, optim_order: list[list[str]] | None):
        self.path, self.key = path, key
        if not h5py.is_hdf5(path):
            raise CheckpointError(f"{key}={path}: not an HDF5 file")
        try:
            self.f = h5py.File(path, "r")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.f.attrs.items()}
            if "step" not in attrs or "model" not in self.f:
                raise CheckpointError(f"{key}={path}: not a gaugeflow checkpoint (needs attribute 'step' and group 'model')")
            self.step = int(attrs["step"])
            self.world = 1
            self.manifest = {"theory": attrs.get("theory", ""), "config": attrs.get("config", ""),
                             "world_size": 1, "step": self.step}
            self.datasets: dict[str, h5py.Dataset] = {}
            for k in self._keys(self.f["model"]):
                self.datasets[f"model/{k}"] = self.f["model"][_key(k)]
            self.meta = {"sched": read_tree(self.f["sched"]) if "sched" in self.f else {}}
            if "optim" in self.f and optim_order is not None and "state" in self.f["optim"]:
                flat = [n for g in optim_order for n in g]
                groups = read_tree(self.f["optim"]["param_groups"]) if "param_groups" in self.f["optim"] else []
                state: dict[str, dict] = {}
                sgroup = self.f["optim"]["state"]
                for idx in self._keys(sgroup):
                    if not isinstance(idx, int) or idx >= len(flat):
                        raise ValueError(f"optimizer state of parameter {idx!r}, but the optimizer has {len(flat)}")
                    name = flat[idx]
                    state[name] = {}
                    for k in self._keys(sgroup[str(idx)]):
                        node = sgroup[str(idx)][_key(k)]
                        if self._kind(node) == "tensor":
                            self.datasets[f"optim/{name}/{k}"] = node
                            state[name][k] = _TENSOR_MARK
                        else:
                            state[name][k] = _tree_leaf(node)
                fixed = []
                for g in groups:
                    fixed.append({**{k: v for k, v in g.items() if k != "params"},
                                  "params": [flat[i] for i in g["params"]]})
                self.meta["optim"] = {"param_groups": fixed, "state": state}
            self.rng_all = read_tree(self.f["rng"]) if "rng" in self.f else {}
        except CheckpointError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
            raise CheckpointError(f"{key}={path}: unreadable checkpoint ({_one_line(err)})") from None

    @staticmethod
    def _kind(node) -> str:
        kind = node.attrs.get("__kind__")
        return kind.decode() if isinstance(kind, bytes) else str(kind)

    @staticmethod
    def _keys(group: h5py.Group) -> list:
        # the keys of a tree dict, in order and with their types (int keys of optimizer states)
        names = group.attrs["__keys__"]
        names = names.split(",") if names else []
        kinds = group.attrs["__key_kinds__"].split(",") if names else []
        out = []
        for n, kk in zip(names, kinds):
            n = n.replace("\\x2c", ",").replace("\\x2f", "/")
            out.append(int(n) if kk == "int" else n)
        return out

    def names(self) -> list[str]:
        return list(self.datasets)

    def shape(self, name: str) -> list[int]:
        return list(self.datasets[name].shape)

    def dtype(self, name: str) -> str:
        d = self.datasets[name].attrs["torch_dtype"]
        return d.decode() if isinstance(d, bytes) else str(d)

    def read(self, name: str, offset, shape) -> torch.Tensor:
        try:
            return _read_box(self.datasets[name], offset, shape, self.dtype(name))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{self.key}={self.path}: unreadable checkpoint ({_one_line(err)})") from None

    def rng(self, rank: int) -> dict | None:
        # the trainer's single-file convention: rank 0's keys bare, rank r's with a _rank<r> suffix
        suffix = f"_rank{rank}"
        if rank == 0:
            found = {k: v for k, v in self.rng_all.items() if not re.search(r"_rank\d+$", k)}
        else:
            found = {k[: -len(suffix)]: v for k, v in self.rng_all.items() if k.endswith(suffix)}
        return found or None

    def close(self) -> None:
        self.f.close()


def _tree_leaf(node):
    """One leaf of an io.tree group (a 0-d dataset written by write_tree)."""
    from gaugeflow.io.tree import _read

    return _read(node)


# ---------------------------------------------------------------------------------------------
# load


@dataclasses.dataclass
class ShardedCheckpoint:
    """What :func:`load_sharded` restored besides the tensors it copied into model and optimizer."""

    path: pathlib.Path
    step: int
    form: str  # "sharded" (a step_*/ directory) or "file" (single-file checkpoint)
    saved_world_size: int
    rng: dict | None  # this rank's RNG states; None if this rank did not exist in the saving job
    sched: dict
    theory: str
    config: str
    manifest: dict


def _copy_into(source, name: str, target: torch.Tensor, rank: int) -> None:
    offset, shape = _local_box(target, rank)
    data = source.read(name, offset, shape)
    with torch.no_grad():  # to_local() of a DTensor parameter is then a view of its shard storage
        local = target.to_local() if _is_dtensor(target) else target
        local.copy_(data.to(device=local.device, dtype=local.dtype))


def load_sharded(spec: str | os.PathLike, model: torch.nn.Module, optim=None, *, key: str = "checkpoint",
                 rank: int | None = None, strict: bool = True) -> ShardedCheckpoint:
    """Load a checkpoint of either form into ``model`` (and ``optim``), resharding as needed.

    ``spec`` is anything :func:`resolve_any_checkpoint` takes. Each rank reads only the parts of
    the saved shards that overlap the part of each tensor it holds now (the whole tensor for an
    unsharded model), so the saving and the loading world sizes are independent. No collective
    is involved; call it on every rank. ``optim`` must be built over the model's (sharded)
    parameters, in the same param-group order as when saving; its state, hyperparameters
    included, is replaced. ``rank`` (default: this process's rank) selects the RNG states
    returned. ``strict`` refuses tensors missing on either side.

    Returns a :class:`ShardedCheckpoint` with step, this rank's RNG states (None for a rank the
    saving job did not have), scheduler state, theory and config. Errors (missing or corrupt
    manifest or shard, a model that does not fit) are one-line :class:`CheckpointError`.
    """
    from gaugeflow.distributed.fsdp import reshard

    path = resolve_any_checkpoint(spec, key)
    rank = _rank_world()[0] if rank is None else int(rank)
    reshard(model)  # copy into the sharded parameters, never into gathered copies
    order = _optim_order(model, optim) if optim is not None else None
    source = _ShardedSource(path, key) if path.is_dir() else _FileSource(path, key, order)
    try:
        targets = {f"model/{k}": v for k, v in model.state_dict(keep_vars=True).items()}
        have = [n for n in source.names() if n.startswith("model/")]
        if strict:
            missing = [n for n in targets if n not in have]
            extra = [n for n in have if n not in targets]
            if missing or extra:
                what = f"lacks {missing[0][6:]}" if missing else f"has {extra[0][6:]}, which the model lacks"
                n = len(missing) + len(extra)
                raise CheckpointError(f"{key}={path}: does not fit this model: checkpoint {what}"
                                      f"{f' (and {n - 1} more differences)' if n > 1 else ''}")
        # every check before the first copy: a checkpoint that does not fit leaves the model as it was
        for name, target in targets.items():
            if name in have and list(target.shape) != source.shape(name):
                raise CheckpointError(f"{key}={path}: does not fit this model: {name[6:]} has shape "
                                      f"{source.shape(name)} in the checkpoint, {list(target.shape)} in the model")
        if optim is not None:
            _check_optim(source, order, key, path)
        for name, target in targets.items():
            if name in have:
                _copy_into(source, name, target, rank)
        if optim is not None:
            _load_optim(source, model, optim, order, rank, key, path)
        return ShardedCheckpoint(path=path, step=source.step, form=source.form, saved_world_size=source.world,
                                 rng=source.rng(rank), sched=dict(source.meta.get("sched", {})),
                                 theory=str(source.manifest.get("theory", "")),
                                 config=str(source.manifest.get("config", "")), manifest=source.manifest)
    finally:
        source.close()


def _check_optim(source, order, key: str, path) -> None:
    saved = source.meta.get("optim")
    if saved is None:
        raise CheckpointError(f"{key}={path}: holds no optimizer state")
    if [g["params"] for g in saved["param_groups"]] != order:
        raise CheckpointError(f"{key}={path}: the optimizer's parameter groups differ from the checkpoint's")


def _load_optim(source, model, optim, order, rank: int, key: str, path) -> None:
    saved = source.meta["optim"]
    groups = saved["param_groups"]
    params = {name: p for name, p in model.named_parameters()}
    template = optim.state_dict()
    flat = [n for g in order for n in g]
    state = {}
    for idx, name in enumerate(flat):
        if name not in saved["state"]:
            continue
        p = params[name]
        values = {}
        for k, v in saved["state"][name].items():
            if v != _TENSOR_MARK:
                values[k] = v
                continue
            entry = f"optim/{name}/{k}"
            gshape = source.shape(entry)
            if _is_dtensor(p) and gshape == list(p.shape):
                from torch.distributed.tensor import DTensor

                offset, shape = _local_box(p, rank)
                local = source.read(entry, offset, shape).to(p.device)
                values[k] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
            else:  # a scalar such as Adam's step, or state of an unsharded parameter
                values[k] = source.read(entry, [0] * len(gshape), gshape).to(
                    p.device if gshape == list(p.shape) else "cpu")
        state[idx] = values
    new_groups = []
    for g_saved, g_now in zip(groups, template["param_groups"]):
        new_groups.append({**{k: v for k, v in g_saved.items() if k != "params"}, "params": g_now["params"]})
    try:
        optim.load_state_dict({"state": state, "param_groups": new_groups})
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{key}={path}: optimizer state does not fit ({_one_line(err)})") from None


# ---------------------------------------------------------------------------------------------
# consolidation


def export_consolidated(sharded_dir: str | os.PathLike, out_file: str | os.PathLike | None = None) -> pathlib.Path:
    """Write a sharded checkpoint as one file in :mod:`gaugeflow.io.checkpoint`'s layout.

    Default ``out_file``: ``step_<8d>.h5`` beside the directory, where
    :func:`~gaugeflow.io.checkpoint.load_checkpoint` and ``resume=<run dir>`` find it. The
    optimizer state gets torch's positional keys again (parameters numbered in param-group
    order), RNG states keep rank 0's keys and add ``_rank<r>`` to rank r's (the trainer's
    single-file convention). Every tensor is assembled in this process's memory: meant for
    models that fit in one process. Written under a temporary name and renamed.
    """
    sharded_dir = pathlib.Path(sharded_dir)
    source = _ShardedSource(sharded_dir, "checkpoint")
    out = pathlib.Path(out_file) if out_file is not None else sharded_dir.with_name(f"{sharded_dir.name}.h5")
    try:
        def whole(name):
            shape = source.shape(name)
            return source.read(name, [0] * len(shape), shape)

        model = {n[len("model/"):]: whole(n) for n in source.names() if n.startswith("model/")}
        optim: dict = {}
        saved = source.meta.get("optim")
        if saved is not None:
            flat = [n for g in saved["param_groups"] for n in g["params"]]
            index = {n: i for i, n in enumerate(flat)}
            state = {}
            for name in flat:
                if name in saved["state"]:
                    state[index[name]] = {k: whole(f"optim/{name}/{k}") if v == _TENSOR_MARK else v
                                          for k, v in saved["state"][name].items()}
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                      for g in saved["param_groups"]]
            optim = {"state": state, "param_groups": groups}
        rng: dict = {}
        for r in range(source.world):
            for k, v in (source.rng(r) or {}).items():
                rng[k if r == 0 else f"{k}_rank{r}"] = v
        sched = dict(source.meta.get("sched", {}))
    finally:
        source.close()
    m = source.manifest
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            for k in ("gaugeflow_version", "git_sha", "created"):
                f.attrs[k] = str(m.get(k, ""))
            f.attrs["step"] = int(m["step"])
            f.attrs["theory"] = str(m.get("theory", ""))
            f.attrs["config"] = str(m.get("config", ""))
            f.attrs["consolidated_from"] = str(sharded_dir)
            for name, content in zip(SECTIONS, (model, optim, sched, rng)):
                write_tree(f.create_group(name), content)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
