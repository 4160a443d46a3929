"""Topological charge and the clover field strength.

* 2d U(1): the geometric charge ``Q = (1/2pi) sum_x arg P_01(x)``, ``arg`` in
  ``[-pi, pi]`` (Kanwar et al., arXiv:2003.06413, eqs. 6-7). It is an exact integer
  on every configuration: each link enters two plaquettes with opposite signs, so
  the unreduced angles sum to zero and the reduced ones to a multiple of 2 pi.
* 4d: the clover ("field-theoretic") charge
  ``Q = (1/(32 pi^2)) sum_x eps_{mu nu rho sigma} tr F_{mu nu}(x) F_{rho sigma}(x)``
  with the hermitian clover field strength (Lüscher, arXiv:1006.4518, section 3;
  clover leaves as in Sheikholeslami & Wohlert, Nucl. Phys. B 259 (1985) 572).
  It approaches an integer only for smooth fields, hence the optional gradient flow.
* The action density ``E = (1/2) sum_{mu,nu} tr F_{mu nu}^2``, Lüscher's
  ``E = -(1/2) tr G_{mu nu} G_{mu nu}`` (1006.4518) written with hermitian
  ``F = -i G``.
"""

from __future__ import annotations

import itertools
import math

import torch

from gaugeflow.groups import Group
from gaugeflow.groups.matrix import dagger, eye_like, mul, re_trace_mul, trace
from gaugeflow.lattice import shift
from gaugeflow.observables.loops import plaquette
from gaugeflow.observables.wilson import link_dims

__all__ = [
    "topological_charge_u1_2d",
    "clover_field_strength",
    "energy_density_clover",
    "topological_charge_density_clover",
    "topological_charge_clover",
    "topological_charge",
]


def topological_charge_u1_2d(links: torch.Tensor, rounded: bool = True) -> torch.Tensor:
    """Geometric charge of 2d U(1), ``(1/2pi) sum_x arg P_01(x)`` (arXiv:2003.06413); ``(batch,)``.

    The angles come from ``torch.angle`` (range ``[-pi, pi]``, no ``remainder``, so the
    float32 ``remainder(x, 2pi) == 2pi`` trap of DESIGN.md cannot occur) and are summed
    in float64 so that rounding error stays far below 1/2 for any practical volume.
    ``rounded=True`` returns the nearest integer (as a float of the links' real dtype);
    ``rounded=False`` exposes the raw sum, e.g. to check it is integral.
    """
    d, n = link_dims(links)
    if d != 2 or n != 1:
        raise ValueError(f"the geometric charge needs 2d U(1) links (d=2, N=1), got d={d}, N={n}")
    phi = torch.angle(plaquette(links, 0, 1)[..., 0, 0]).to(torch.float64)
    q = phi.sum((1, 2)) / (2 * math.pi)
    if rounded:
        q = torch.round(q)
    return q.to(links.real.dtype)


def clover_field_strength(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """Hermitian clover field strength ``F_{mu nu}(x)``, shape ``(batch, *L, N, N)``.

    ``F = (Q - Q^dag) / (8i)`` minus its trace part (for SU(N); U(1) keeps it, it is
    the whole field), where ``Q`` is the sum of the four plaquettes ("leaves") in the
    (mu, nu) plane that start and end at x, all traversed in the same sense
    (mu first, then nu, for the leaf in the upper-right quadrant). Each leaf is the
    plaquette of a neighbouring site transported to x, so it is gauge covariant,
    ``F(x) -> Omega(x) F(x) Omega(x)^dag``. With ``U = exp(a A)`` and anti-hermitian
    ``G`` one has ``F = -i a^2 G + O(a^4)``. ``F_{nu mu} = -F_{mu nu}``.
    """
    d, n = link_dims(links)
    if mu == nu or not (0 <= mu < d and 0 <= nu < d):
        raise ValueError(f"need two different directions in 0..{d - 1}, got mu={mu}, nu={nu}")
    u_mu, u_nu = links[:, mu], links[:, nu]
    leaf1 = plaquette(links, mu, nu)  # x -> x+mu -> x+mu+nu -> x+nu -> x
    # leaf in the (-mu, +nu) quadrant: P(x-mu) transported by U_mu(x-mu), i.e.
    # U_mu(y)^dag P(y) U_mu(y) built at y = x - mu and moved to x.
    leaf2 = shift(mul(dagger(u_mu), mul(leaf1, u_mu)), mu, -1)
    # (-mu, -nu) quadrant: leaf2 of x - nu transported by U_nu(x - nu)
    leaf3 = shift(mul(dagger(u_nu), mul(leaf2, u_nu)), nu, -1)
    # (+mu, -nu) quadrant: P(x-nu) transported by U_nu(x-nu)
    leaf4 = shift(mul(dagger(u_nu), mul(leaf1, u_nu)), nu, -1)
    q = leaf1 + leaf2 + leaf3 + leaf4
    f = (q - dagger(q)) / 8j
    if n > 1:
        f = f - (trace(f) / n)[..., None, None] * eye_like(f)
    return f


def _clover_planes(links: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    d, _ = link_dims(links)
    return {(mu, nu): clover_field_strength(links, mu, nu) for mu in range(d) for nu in range(mu + 1, d)}


def energy_density_clover(links: torch.Tensor) -> torch.Tensor:
    """Site average of ``E(x) = (1/2) sum_{mu,nu} tr F_{mu nu}(x)^2 = sum_{mu<nu} tr F_{mu nu}^2``; ``(batch,)``.

    Lüscher's normalisation (arXiv:1006.4518): ``E = -(1/2) tr G G`` with anti-hermitian
    ``G``, so ``t^2 <E>`` is the flow scale observable. Non-negative because F is hermitian.
    Works in any d >= 2.
    """
    d, _ = link_dims(links)
    total = links.new_zeros(links.shape[0], dtype=links.real.dtype)
    for f in _clover_planes(links).values():
        total = total + re_trace_mul(f, f).mean(tuple(range(1, d + 1)))
    return total


def _permutation_sign(perm: tuple[int, ...]) -> int:
    sign = 1
    for i in range(len(perm)):
        for j in range(i + 1, len(perm)):
            if perm[i] > perm[j]:
                sign = -sign
    return sign


def topological_charge_density_clover(links: torch.Tensor) -> torch.Tensor:
    """``q(x) = (1/(32 pi^2)) eps_{mu nu rho sigma} tr F_{mu nu}(x) F_{rho sigma}(x)``, shape ``(batch, *L)``.

    The explicit sum over the 24 permutations (not a sum of traces of F^2, DESIGN.md);
    it equals ``(1/(4 pi^2)) tr(F_01 F_23 - F_02 F_13 + F_03 F_12)``. Only d = 4.
    """
    d, _ = link_dims(links)
    if d != 4:
        raise ValueError(f"the clover topological charge is defined in d = 4, got d = {d}")
    planes = _clover_planes(links)

    def field(mu: int, nu: int) -> tuple[int, torch.Tensor]:
        return (1, planes[(mu, nu)]) if mu < nu else (-1, planes[(nu, mu)])

    density = None
    for perm in itertools.permutations(range(4)):
        s1, f1 = field(perm[0], perm[1])
        s2, f2 = field(perm[2], perm[3])
        # tr of a product of two hermitian matrices is real; the imaginary part is rounding
        term = (_permutation_sign(perm) * s1 * s2) * re_trace_mul(f1, f2)
        density = term if density is None else density + term
    return density / (32 * math.pi**2)


def topological_charge_clover(links: torch.Tensor) -> torch.Tensor:
    """Clover topological charge ``sum_x q(x)`` in d = 4 (arXiv:1006.4518); ``(batch,)``, not rounded."""
    return topological_charge_density_clover(links).sum((1, 2, 3, 4))


def topological_charge(
    links: torch.Tensor,
    flow_time: float = 0.0,
    eps: float = 0.01,
    group: str | Group | None = None,
) -> torch.Tensor:
    """Topological charge per configuration, ``(batch,)``, chosen by dimension.

    * d = 2, U(1): the (rounded, integer) geometric charge of arXiv:2003.06413.
    * d = 4, any group: the clover charge, after Wilson flow to ``flow_time`` (step
      ``eps``, Lüscher arXiv:1006.4518) when ``flow_time > 0``.
    Anything else raises ``ValueError`` (e.g. 2d SU(N) has no topological sectors).
    """
    d, n = link_dims(links)
    if flow_time < 0:
        raise ValueError(f"flow_time must be >= 0, got {flow_time}")
    if not ((d == 2 and n == 1) or d == 4):
        raise ValueError(
            f"topological charge is implemented for 2d U(1) (geometric) and 4d (clover); got d={d}, N={n}"
        )
    if flow_time > 0:
        # imported here: gradflow imports this module for the energy density
        from gaugeflow.observables.gradflow import wilson_flow

        links = wilson_flow(links, flow_time, eps=eps, group=group)
    if d == 2:
        return topological_charge_u1_2d(links)
    return topological_charge_clover(links)
