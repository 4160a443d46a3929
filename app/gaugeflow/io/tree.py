"""Nested Python state (state dicts, optimizer and scheduler states) <-> HDF5 groups, without pickle.

Tensors become datasets (attribute ``torch_dtype``; bfloat16 is stored as its uint16 bits),
dicts become groups, lists and tuples become groups of items ``"0", "1", ...``, and
``None``, bool, int, float and str become zero-dimensional datasets; every node carries a
``__kind__`` attribute. Keys keep their order and their type (optimizer states use int
keys); a ``/`` in a key is escaped. Reading never unpickles anything.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import torch

_KIND = "__kind__"


def _key(k: Any) -> str:
    return str(k).replace("/", "\\x2f")


def _unkey(k: str, kind: str) -> Any:
    k = k.replace("\\x2f", "/")
    return int(k) if kind == "int" else k


def write_tree(group: h5py.Group, obj: Any) -> None:
    """Write ``obj`` (a dict) into ``group``."""
    if not isinstance(obj, dict):
        raise TypeError(f"top level must be a dict, got {type(obj).__name__}")
    _write_dict(group, obj)


def _write_dict(group: h5py.Group, obj: dict) -> None:
    group.attrs[_KIND] = "dict"
    key_kinds = []
    for k, v in obj.items():
        key_kinds.append("int" if isinstance(k, int) else "str")
        _write_item(group, _key(k), v)
    group.attrs["__key_kinds__"] = ",".join(key_kinds)
    group.attrs["__keys__"] = ",".join(_key(k).replace(",", "\\x2c") for k in obj)


def _write_item(group: h5py.Group, name: str, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        data = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        ds = group.create_dataset(name, data=data)
        ds.attrs[_KIND] = "tensor"
        ds.attrs["torch_dtype"] = str(t.dtype).removeprefix("torch.")
    elif isinstance(v, np.ndarray):
        ds = group.create_dataset(name, data=v)
        ds.attrs[_KIND] = "ndarray"
    elif isinstance(v, dict):
        _write_dict(group.create_group(name), v)
    elif isinstance(v, (list, tuple)):
        g = group.create_group(name)
        g.attrs[_KIND] = "tuple" if isinstance(v, tuple) else "list"
        g.attrs["__len__"] = len(v)
        for i, item in enumerate(v):
            _write_item(g, str(i), item)
    elif v is None or isinstance(v, (bool, int, float, str, np.generic)):
        kind = "none" if v is None else type(v.item() if isinstance(v, np.generic) else v).__name__
        ds = group.create_dataset(name, data=np.asarray(0 if v is None else v, dtype=None if not isinstance(v, str) else h5py.string_dtype()))
        ds.attrs[_KIND] = kind
    else:
        raise TypeError(f"cannot store {type(v).__name__} at {group.name}/{name}")


_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)}


def read_tree(group: h5py.Group) -> dict:
    """Inverse of :func:`write_tree`."""
    return _read(group)


def _read(obj: h5py.Group | h5py.Dataset) -> Any:
    kind = obj.attrs.get(_KIND)
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind == "dict":
        names = obj.attrs["__keys__"]
        names = names.split(",") if names else []
        kinds = obj.attrs["__key_kinds__"].split(",") if names else []
        out = {}
        for n, kk in zip(names, kinds):
            n = n.replace("\\x2c", ",")
            out[_unkey(n, kk)] = _read(obj[n])
        return out
    if kind in ("list", "tuple"):
        items = [_read(obj[str(i)]) for i in range(int(obj.attrs["__len__"]))]
        return tuple(items) if kind == "tuple" else items
    if kind == "tensor":
        dtype = _TORCH_DTYPES[obj.attrs["torch_dtype"]]
        t = torch.from_numpy(np.array(obj[()]))  # np.array copies: the tensor owns writable memory
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t.to(dtype)
    if kind == "ndarray":
        return np.asarray(obj[()])
    if kind == "none":
        return None
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](obj[()])
    if kind == "str":
        v = obj[()]
        return v.decode() if isinstance(v, bytes) else str(v)
    raise ValueError(f"{obj.name}: not written by gaugeflow (no {_KIND} attribute)")
