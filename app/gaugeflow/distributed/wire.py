"""Tensors as gloo can move them: gloo carries neither complex nor bool tensors."""

from __future__ import annotations

import torch


def to_wire(t: torch.Tensor) -> torch.Tensor:
    """A contiguous real or integer *view* of ``t`` (complex -> trailing (re, im) axis, bool -> uint8);
    a view, so that receiving into it writes ``t`` when ``t`` was contiguous."""
    t = t.contiguous()
    if t.is_complex():
        return torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t


def from_wire(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`to_wire` for a buffer received for a tensor of ``dtype``."""
    if dtype.is_complex:
        return torch.view_as_complex(buf.contiguous())
    if dtype == torch.bool:
        return buf.view(torch.bool)
    return buf
