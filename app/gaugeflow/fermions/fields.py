"""Fermion fields ``(batch, L_0, ..., L_{d-1}, spin, colour)``: shapes, inner products, noise.

Inner products sum over every axis but the batch axis and complete the sum with
:func:`gaugeflow.lattice.geometry.site_reduce`, so on a domain-decomposed lattice they are the
whole lattice's, identical on every rank of a lattice group. They accept full fields and
half-lattice (even/odd packed) fields ``(batch, V/2, spin, colour)`` alike.
"""

from __future__ import annotations

import math

import torch

from typing import NamedTuple

from gaugeflow.fermions.gamma import n_spin
from gaugeflow.lattice.geometry import site_reduce

__all__ = ["JointField", "cat_fields", "fermion_shape", "gaussian_fermion", "inner", "links_of", "norm2"]


def fermion_shape(links: torch.Tensor) -> tuple[int, ...]:
    """Shape ``(batch, *L, spin, colour)`` of a fermion field on the lattice of ``links``."""
    d, n = links.shape[1], links.shape[-1]
    return (links.shape[0], *links.shape[2 : 2 + d], n_spin(d), n)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b> = sum_x a(x)^dagger b(x)`` per configuration (complex, ``(batch,)``)."""
    return site_reduce((a.conj() * b).reshape(a.shape[0], -1).sum(1))


def norm2(a: torch.Tensor) -> torch.Tensor:
    """``|a|^2`` per configuration (real, ``(batch,)``)."""
    return site_reduce(torch.view_as_real(a).square().reshape(a.shape[0], -1).sum(1))


def gaussian_fermion(shape, generator: torch.Generator | None = None, dtype=torch.complex128, device=None):
    """Complex Gaussian noise with density ``exp(-eta^dagger eta)`` (variance 1/2 per real component).

    ``device`` defaults to the generator's device (never torch's default device).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    real = dtype.to_real()
    z = torch.randn((*shape, 2), generator=generator, dtype=real, device=device) / math.sqrt(2.0)
    return torch.view_as_complex(z)


class JointField(NamedTuple):
    """A configuration of the joint target over links and pseudofermions, ``p(U, phi) ∝
    exp(-S_G(U) - phi^dagger (D^dagger D)^{-1} phi)``: what a joint flow ``q(U) q(phi | U)`` draws
    (Albergo et al. 2106.05934, Abbott et al. 2207.08945).

    ``links`` ``(batch, d, *L, N, N)``, ``phi`` ``(batch, *L, spin, colour)``. It answers the few
    tensor questions the trainer and the samplers ask of a batch of fields (``shape``,
    ``detach``, ``to``, rows by ``select``) so that one loop serves both kinds of field.
    """

    links: torch.Tensor
    phi: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The links' shape: ``shape[0]`` is the batch."""
        return self.links.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.links.dtype

    @property
    def device(self) -> torch.device:
        return self.links.device

    def detach(self) -> "JointField":
        return JointField(self.links.detach(), self.phi.detach())

    def to(self, *args, **kwargs) -> "JointField":
        return JointField(self.links.to(*args, **kwargs), self.phi.to(*args, **kwargs))

    def select(self, rows) -> "JointField":
        """The configurations ``rows`` (an index, slice or index tensor over the batch)."""
        return JointField(self.links[rows], self.phi[rows])


def links_of(fields):
    """The links of a batch of fields (a :class:`JointField`'s, or the tensor itself)."""
    return fields.links if isinstance(fields, JointField) else fields


def cat_fields(parts: list):
    """``torch.cat`` over the batch for tensors and :class:`JointField` alike."""
    if isinstance(parts[0], JointField):
        return JointField(torch.cat([p.links for p in parts]), torch.cat([p.phi for p in parts]))
    return torch.cat(parts)
