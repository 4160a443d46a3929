"""Euclidean gamma matrices and their cheap action on the spin index of fermion fields.

* d = 2 (two spin components): ``gamma_0 = sigma_1``, ``gamma_1 = sigma_2``,
  ``gamma_5 = sigma_3 = -i gamma_0 gamma_1``.
* d = 4 (four spin components): the DeGrand–Rossi basis (DeGrand & Rossi, Comput. Phys.
  Commun. 60 (1990) 211; the basis of Chroma/QDP++), a chiral basis with
  ``gamma_5 = gamma_0 gamma_1 gamma_2 gamma_3 = diag(1, 1, -1, -1)``. ``gamma_mu`` belongs to
  lattice axis mu, so DeGrand–Rossi's ``gamma_4`` (time) is ``gamma_3`` here, time being the
  last lattice axis.

All gammas are hermitian, square to one and anticommute. ``sigma_{mu nu} = (i/2)[gamma_mu,
gamma_nu]`` is hermitian. Every one of these matrices (and every product of gammas) has
exactly one non-zero entry per row, so it acts on a field as a permutation of the spin
components times phases (:class:`SpinMonomial`), which is what the Dirac operators use.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["SpinMonomial", "gamma5", "gamma_matrices", "n_spin", "sigma_munu"]


def n_spin(d: int) -> int:
    """Number of spin components in ``d`` dimensions (2 or 4)."""
    if d == 2:
        return 2
    if d == 4:
        return 4
    raise ValueError(f"Wilson fermions are implemented for d = 2 and d = 4 lattices, got d = {d}")


@cache
def _gammas_cpu(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    # built on the CPU explicitly (a default device of meta or cuda must not leak into the cache)
    cpu = dict(dtype=torch.complex128, device="cpu")
    if d == 2:
        s1 = torch.tensor([[0, 1], [1, 0]], **cpu)
        s2 = torch.tensor([[0, -1j], [1j, 0]], **cpu)
        s3 = torch.tensor([[1, 0], [0, -1]], **cpu)
        return torch.stack([s1, s2]), s3
    if d == 4:
        i = 1j
        gx = torch.tensor([[0, 0, 0, i], [0, 0, i, 0], [0, -i, 0, 0], [-i, 0, 0, 0]], **cpu)
        gy = torch.tensor([[0, 0, 0, -1], [0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 0]], **cpu)
        gz = torch.tensor([[0, 0, i, 0], [0, 0, 0, -i], [-i, 0, 0, 0], [0, i, 0, 0]], **cpu)
        gt = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], **cpu)
        g = torch.stack([gx, gy, gz, gt])
        return g, g[0] @ g[1] @ g[2] @ g[3]
    n_spin(d)  # raises
    raise AssertionError


def gamma_matrices(d: int, dtype=torch.complex128, device=None) -> torch.Tensor:
    """``(d, S, S)``: ``gamma_mu`` for lattice axis mu (module docstring for the basis)."""
    return _gammas_cpu(d)[0].to(dtype=dtype, device=device)


def gamma5(d: int, dtype=torch.complex128, device=None) -> torch.Tensor:
    """``(S, S)``: ``gamma_5`` (``sigma_3`` in 2d, ``gamma_0 gamma_1 gamma_2 gamma_3`` in 4d)."""
    return _gammas_cpu(d)[1].to(dtype=dtype, device=device)


def sigma_munu(d: int, dtype=torch.complex128, device=None) -> torch.Tensor:
    """``(d, d, S, S)``: ``sigma_{mu nu} = (i/2) [gamma_mu, gamma_nu]`` (zero for mu = nu)."""
    g = _gammas_cpu(d)[0]
    comm = g[:, None] @ g[None, :] - g[None, :] @ g[:, None]
    return (0.5j * comm).to(dtype=dtype, device=device)


class SpinMonomial:
    """A spin matrix with one non-zero entry per row, applied as a permutation times phases.

    ``M psi`` for a field ``psi`` of shape ``(..., S, C)`` is ``phase[s] * psi[..., perm[s], :]``
    with ``perm[s]`` the column of row s's non-zero entry ``phase[s]``.
    """

    def __init__(self, matrix: torch.Tensor):
        m = matrix.detach().to(device="cpu", dtype=torch.complex128)
        nz = m.abs() > 1e-12
        if not bool((nz.sum(-1) == 1).all()):
            raise ValueError("SpinMonomial needs exactly one non-zero entry per row")
        perm = nz.to(torch.int64).argmax(-1)
        self.matrix = matrix
        self._perm = perm
        self._phase = m.gather(-1, perm[:, None])[:, 0]
        self._cache: dict = {}
        self.identity_perm = bool((perm == torch.arange(perm.numel(), device="cpu")).all())

    def _on(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = (self._perm.to(device), self._phase.to(dtype=dtype, device=device))
        return self._cache[key]

    def __call__(self, psi: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """``M psi`` on the spin axis ``dim`` (``-2`` for ``(..., S, C)`` fields)."""
        perm, phase = self._on(psi.dtype, psi.device)
        dim = dim % psi.ndim
        phase = phase.view(-1, *([1] * (psi.ndim - dim - 1)))
        if self.identity_perm:
            return psi * phase
        return psi.index_select(dim, perm) * phase

    @classmethod
    def basis(cls, d: int) -> tuple[list[SpinMonomial], SpinMonomial, dict[tuple[int, int], SpinMonomial]]:
        """``(gammas, gamma5, sigmas)`` for dimension d; sigmas keyed by ``(mu, nu)``, mu < nu."""
        return _basis(d)


@cache
def _basis(d: int):
    g, g5 = _gammas_cpu(d)
    sig = sigma_munu(d, device="cpu")
    sigmas = {(mu, nu): SpinMonomial(sig[mu, nu]) for mu in range(d) for nu in range(mu + 1, d)}
    return [SpinMonomial(g[mu]) for mu in range(d)], SpinMonomial(g5), sigmas
