"""Fermion observables of a gauge configuration: the pion correlator and the chiral condensate.

* ``pion_correlator``: zero-momentum pseudoscalar correlator from a point source at the origin,
  ``C(t) = sum_{x_space} tr[G(x, 0) G(x, 0)^dagger]`` with ``G = D^{-1}`` (gamma_5-hermiticity turns
  ``gamma_5 G gamma_5`` into ``G^dagger``), summed over the source's spin and colour; ``t`` is the
  last lattice axis. One solve per source spin-colour component, batched.
* ``chiral_condensate``: ``(1/V) Re tr D^{-1}`` per flavour in the kappa normalisation of
  :class:`~gaugeflow.fermions.WilsonDirac` (the continuum-normalised ``<psi-bar psi>`` is
  ``-(1/(2 kappa))`` times it, up to the additive renormalisation of Wilson fermions):
  ``exact`` from the dense inverse's diagonal (small lattices), or ``stochastic`` with
  ``n_noise`` Z2 (complex ``(±1 ± i)/sqrt 2``) noise vectors per configuration, unbiased with
  a variance that falls as ``1/n_noise``.

Solves: CG on ``D^dagger D`` with the right-hand side ``D^dagger b``. Single-process (the
correlator's spatial sum and the source at the origin are whole-lattice).
"""

from __future__ import annotations

import math

import torch

from gaugeflow.fermions.solvers import cg
from gaugeflow.fermions.wilson import WilsonDirac

__all__ = ["chiral_condensate", "pion_correlator", "point_propagator"]


def _repeated(op: WilsonDirac, k: int) -> WilsonDirac:
    """The operator on each configuration repeated ``k`` times along the batch (config-major)."""
    return WilsonDirac(op.links.repeat_interleave(k, 0), op.kappa, op.csw, op.boundary)


def _solve(op: WilsonDirac, b: torch.Tensor, tol: float, maxiter: int) -> tuple[torch.Tensor, int]:
    """``D^{-1} b`` via CG on ``D^dagger D``; returns the solution and the largest iteration count."""
    r = cg(op.normal, op.apply_dagger(b), tol=tol, maxiter=maxiter)
    return r.x, int(r.iterations.max().item()) if r.iterations.numel() else 0


def point_propagator(op: WilsonDirac, *, tol: float = 1e-10, maxiter: int = 10_000) -> tuple[torch.Tensor, int]:
    """``G(x) = D^{-1}(x, 0)``, shape ``(batch, *L, spin, colour, spin_0, colour_0)``, and the CG
    iterations of the slowest solve."""
    batch, *lat, s, n = op.field_shape
    k = s * n
    rep = _repeated(op, k)
    src = torch.zeros((batch, k, *lat, s, n), dtype=op.dtype, device=op.device)
    eye = torch.eye(k, dtype=op.dtype, device=op.device).reshape(k, s, n)
    src[(slice(None), slice(None), *([0] * len(lat)))] = eye  # the origin, every spin-colour component
    x, iters = _solve(rep, src.reshape(batch * k, *lat, s, n), tol, maxiter)
    g = x.reshape(batch, s, n, *lat, s, n)  # [b, s0, a0, x..., s, a]
    d = len(lat)
    perm = (0, *range(3, 3 + d), 3 + d, 4 + d, 1, 2)
    return g.permute(perm), iters


def pion_correlator(op: WilsonDirac, *, tol: float = 1e-10, maxiter: int = 10_000) -> tuple[torch.Tensor, int]:
    """``C(t)``, shape ``(batch, T)`` (float), and the CG iterations (module docstring)."""
    g, iters = point_propagator(op, tol=tol, maxiter=maxiter)
    d = len(op.lattice_shape)
    dens = (g.real.square() + g.imag.square()).sum(dim=(-4, -3, -2, -1))  # (batch, *L)
    return dens.sum(dim=tuple(range(1, d))), iters


def chiral_condensate(op: WilsonDirac, method: str = "exact", *, n_noise: int = 4,
                      generator: torch.Generator | None = None, tol: float = 1e-10,
                      maxiter: int = 10_000) -> torch.Tensor:
    """``(1/V) Re tr D^{-1}`` per configuration, ``(batch,)`` (module docstring)."""
    volume = math.prod(op.lattice_shape)
    if method == "exact":
        dinv = torch.linalg.inv(op.dense().to(torch.complex128))
        return (torch.diagonal(dinv, dim1=-2, dim2=-1).sum(-1).real / volume).to(op.dtype.to_real())
    if method != "stochastic":
        raise ValueError(f"chiral condensate method must be 'exact' or 'stochastic', got {method!r}")
    if n_noise < 1:
        raise ValueError(f"n_noise must be >= 1, got {n_noise}")
    batch = op.field_shape[0]
    device = generator.device if generator is not None else op.device
    shape = (batch * n_noise, *op.field_shape[1:], 2)
    signs = torch.randint(0, 2, shape, generator=generator, device=device).to(op.dtype.to_real()) * 2 - 1
    eta = torch.view_as_complex(signs / math.sqrt(2.0)).to(op.device)
    x, _ = _solve(_repeated(op, n_noise), eta, tol, maxiter)
    tr = (eta.conj() * x).reshape(batch, n_noise, -1).sum(-1).real.mean(1)
    return tr / volume
