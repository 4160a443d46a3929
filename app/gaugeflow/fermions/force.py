"""HMC forces of the fermion actions, in the algebra convention of ``GaugeAction.force``.

For a link variation ``U_mu(x) -> exp(eps T) U_mu(x)`` (T in the Lie algebra) a force is the
algebra element ``F_mu(x)`` with ``dS/d eps = tr(T F_mu(x))``; shape ``(batch, d, *L, N, N)``.

* Pseudofermions (two flavours), ``S_pf = phi^dagger (D^dagger D)^{-1} phi``. With
  ``X = (D^dagger D)^{-1} phi`` and ``Y = D X``, ``dS_pf = -2 Re Y^dagger dD X``. The hopping part
  is analytic:

      F_mu(x) = 2 kappa P[ sum_s |((1 - gamma_mu) U_mu(x) X(x+mu))_s> <Y(x)_s|
                          - sum_s |X(x)_s> <((1 + gamma_mu) U_mu(x) Y(x+mu))_s| ]

  (colour outer products summed over spin, P the projection onto the algebra, U with the
  boundary sign); the clover part is the autograd force of ``-2 Re <Y, A(U) X>`` at fixed X, Y.
* Exact determinant, ``S_det = -log det(D^dagger D) = -2 Re log det D``, ``dS_det = -2 Re tr(D^{-1} dD)``:
  ``method="autograd"`` differentiates the dense slogdet; ``method="analytic"`` uses the trace
  formula with the blocks of the dense inverse,

      F_mu(x) = 2 kappa P[ U_mu(x) G^-_mu(x) - G^+_mu(x) U_mu(x)^dagger ],
      G^-_mu(x) = tr_spin[(1 - gamma_mu) D^{-1}_{x+mu, x}],  G^+_mu(x) = tr_spin[(1 + gamma_mu) D^{-1}_{x, x+mu}],

  plus the clover part by autograd of ``-2 Re sum_x tr(D^{-1}_{xx} A_x(U))`` at fixed D^{-1}.

The pseudofermion force goes through the geometry (shifts, site sums) and works on a
decomposed lattice; the determinant force is dense and single-process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gaugeflow.fermions.determinant import log_det_normal
from gaugeflow.fermions.fields import gaussian_fermion, inner
from gaugeflow.fermions.gamma import SpinMonomial, gamma_matrices
from gaugeflow.fermions.solvers import cg
from gaugeflow.fermions.wilson import WilsonDirac, WilsonFermions, colour_mul
from gaugeflow.groups.matrix import dagger, mul
from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import site_sum
from gaugeflow.observables.topology import clover_field_strength
from gaugeflow.observables.wilson import group_of

__all__ = [
    "autograd_link_force",
    "determinant_force",
    "fermion_determinant_action",
    "pseudofermion_action",
    "pseudofermion_force",
    "pseudofermion_heatbath",
]


def autograd_link_force(fn: Callable[[torch.Tensor], torch.Tensor], links: torch.Tensor) -> torch.Tensor:
    """Algebra-valued derivative of ``fn(links).sum()`` by complex autograd.

    torch's gradient ``G`` obeys ``dS = Re sum conj(G) dU``; along ``dU = eps T U`` that is
    ``tr(T P(U G^dagger))`` (as ``gaugeflow.theories.gauge.autograd_force``).
    """
    group = group_of(links)
    with torch.enable_grad():
        u = links.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(u).sum(), u)
    return group.project(mul(u.detach(), dagger(g)))


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_s |a_s><b_s|``: colour matrices ``[..., i, j] = sum_s a[..., s, i] conj(b[..., s, j])``."""
    return torch.einsum("...si,...sj->...ij", a, b.conj())


def hopping_derivative(op: WilsonDirac, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Algebra element ``G`` with ``d/d eps Re <left, D right> = tr(T G)`` from the hopping term alone."""
    group = group_of(op.links)
    out = []
    for mu in range(op.d):
        u = op.u[:, mu]
        a = colour_mul(u, shift(right, mu, 1))
        b = a - op.gamma(mu, a)  # (1 - gamma_mu) U_mu(x) X(x+mu)
        c = colour_mul(u, shift(left, mu, 1))
        z = c + op.gamma(mu, c)  # (1 + gamma_mu) U_mu(x) Y(x+mu)
        out.append(group.project(_outer(b, left) - _outer(right, z)))
    return -op.kappa * torch.stack(out, dim=1)


def _clover_derivative(fermions: WilsonFermions, links: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    """``G`` with ``d/d eps Re <left, A(U) right> = tr(T G)`` (autograd at fixed fields).

    ``<Y, (sigma (x) F) X> = sum_x tr(F W)`` with ``W = sum_s |(sigma X)_s><Y_s|``, so with
    ``A = 1 - csw kappa sum_{mu<nu} sigma_{mu nu} F_{mu nu}`` only the clover field strengths are
    differentiated (the spin contractions are done once, outside autograd).
    """
    d = links.shape[1]
    left, right = left.detach(), right.detach()
    _, _, sigmas = SpinMonomial.basis(d)
    w = {plane: _outer(sig(right), left) for plane, sig in sigmas.items()}
    return clover_contraction_force(links, w, -(fermions.csw * fermions.kappa))


def clover_contraction_force(links: torch.Tensor, weights: dict, scale: float) -> torch.Tensor:
    """Force of ``scale * sum_{mu<nu} sum_x Re tr(F_{mu nu}(U) W_{mu nu})`` at fixed ``weights``
    ``W`` (keyed by plane): autograd through the clover field strengths only."""
    sites = tuple(range(1, links.shape[1] + 1))

    def surrogate(u: torch.Tensor) -> torch.Tensor:
        total = None
        for (mu, nu), w_plane in weights.items():
            f = clover_field_strength(u, mu, nu)
            t = site_sum(torch.einsum("...ij,...ji->...", f, w_plane).real, sites)
            total = t if total is None else total + t
        return scale * total

    return autograd_link_force(surrogate, links)


def pseudofermion_heatbath(op: WilsonDirac, generator: torch.Generator | None = None) -> torch.Tensor:
    """``phi = D^dagger eta`` with ``eta`` of density ``exp(-eta^dagger eta)``: phi then has density
    ``exp(-phi^dagger (D^dagger D)^{-1} phi)``. Noise on the links' device (the generator's)."""
    eta = gaussian_fermion(op.field_shape, generator, op.dtype, op.device)
    return op.apply_dagger(eta)


def pseudofermion_action(
    fermions: WilsonFermions, links: torch.Tensor, phi: torch.Tensor, *, tol: float = 1e-10, maxiter: int = 10_000
) -> torch.Tensor:
    """``S_pf = phi^dagger (D^dagger D)^{-1} phi`` per configuration (CG to ``tol``)."""
    op = fermions.operator(links)
    x = cg(op.normal, phi, tol=tol, maxiter=maxiter).x
    return inner(phi, x).real


def pseudofermion_force(
    fermions: WilsonFermions,
    links: torch.Tensor,
    phi: torch.Tensor,
    *,
    tol: float = 1e-10,
    maxiter: int = 10_000,
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """Force of ``S_pf = phi^dagger (D^dagger D)^{-1} phi`` (module docstring).

    ``x``: ``(D^dagger D)^{-1} phi`` if already solved (e.g. by the action), else solved by CG.
    """
    op = fermions.operator(links.detach())
    if x is None:
        x = cg(op.normal, phi, tol=tol, maxiter=maxiter).x
    y = op.apply(x)
    force = -2.0 * hopping_derivative(op, y, x)
    if fermions.csw != 0.0:
        force = force - 2.0 * _clover_derivative(fermions, links, y, x)
    return force


def fermion_determinant_action(
    fermions: WilsonFermions, links: torch.Tensor, method: str = "dense", max_unknowns: int | None = None
) -> torch.Tensor:
    """``S_det = -log det(D^dagger D)`` per configuration (dense; ``method`` as :func:`log_det_normal`)."""
    return -log_det_normal(fermions.operator(links), method, max_unknowns)


def determinant_force(
    fermions: WilsonFermions, links: torch.Tensor, method: str = "analytic", max_unknowns: int | None = None
) -> torch.Tensor:
    """Force of ``S_det = -log det(D^dagger D)``: ``"analytic"`` (trace formula) or ``"autograd"``."""
    if method == "autograd":
        return autograd_link_force(lambda u: fermion_determinant_action(fermions, u, "dense", max_unknowns), links)
    if method != "analytic":
        raise ValueError(f"determinant force method must be 'analytic' or 'autograd', got {method!r}")
    op = fermions.operator(links.detach())
    dense = op.dense(max_unknowns)
    dinv = torch.linalg.inv(dense.to(torch.complex128)).to(op.dtype)
    batch, v = links.shape[0], dense.shape[-1] // op.block_size
    s, n = op.n_spin, op.n_colour
    blocks = dinv.view(batch, v, op.block_size, v, op.block_size).transpose(2, 3)  # [b, row site, col site]
    shape = op.lattice_shape
    idx = torch.arange(v, device=op.device).view(shape)
    sites = idx.reshape(-1)
    eye = torch.eye(s, dtype=op.dtype, device=op.device)
    gammas = gamma_matrices(op.d, dtype=op.dtype, device=op.device)
    group = group_of(links)
    out = []
    for mu in range(op.d):
        fwd = torch.roll(idx, -1, mu).reshape(-1)
        g = gammas[mu]
        minus = (blocks[:, fwd, sites]).reshape(batch, v, s, n, s, n)  # D^{-1}_{x+mu, x}
        plus = (blocks[:, sites, fwd]).reshape(batch, v, s, n, s, n)  # D^{-1}_{x, x+mu}
        g_minus = torch.einsum("st,bvtisj->bvij", eye - g, minus)
        g_plus = torch.einsum("st,bvtisj->bvij", eye + g, plus)
        u = op.u[:, mu].reshape(batch, v, n, n)
        f = group.project(mul(u, g_minus) - mul(g_plus, dagger(u)))
        out.append((2.0 * op.kappa) * f.reshape(batch, *shape, n, n))
    force = torch.stack(out, dim=1)
    if fermions.csw != 0.0:
        diag = blocks[:, sites, sites].detach()  # D^{-1}_{xx}, (batch, V, bs, bs)

        def surrogate(u: torch.Tensor) -> torch.Tensor:
            a = fermions.operator(u).site_matrices().reshape(batch, v, op.block_size, op.block_size)
            return -2.0 * (diag * a.transpose(-1, -2)).sum((1, 2, 3)).real

        force = force + autograd_link_force(surrogate, links)
    return force
