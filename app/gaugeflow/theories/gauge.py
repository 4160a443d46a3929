"""Pure gauge actions: Wilson plaquette and rectangle-improved (Symanzik, Iwasaki, DBW2).

``S = -(beta/N) sum_x [ c0 sum_{mu<nu} Re tr P_{mu nu}(x) + c1 sum_{mu != nu} Re tr R_{mu nu}(x) ]``
with ``c0 = 1 - 8 c1``, where ``R_{mu nu}`` is the 2x1 rectangle with its long side
along mu (so both orientations are summed in every plane). This normalisation, not
``beta sum (1 - Re tr P / N)``, makes ``log p = -S`` match the exact log Z of
2d theories (shared/reference/EXACT.md). Improvement coefficients:
tree-level Symanzik c1 = -1/12 (Lüscher & Weisz, Commun. Math. Phys. 97 (1985) 59),
Iwasaki c1 = -0.331 (Iwasaki, arXiv:1111.7054), DBW2 c1 = -1.4088 (QCD-TARO, hep-lat/0007048).
"""

from __future__ import annotations

import torch

from gaugeflow.groups import Group, get_group
from gaugeflow.groups.matrix import dagger_cm, mul, mul_cm, re_dot, re_trace
from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import site_reduce, site_sum
from gaugeflow.observables.loops import colour_major_links, rectangle, shift_cm

IMPROVEMENTS = {"wilson": 0.0, "symanzik": -1.0 / 12.0, "iwasaki": -0.331, "dbw2": -1.4088}


class GaugeAction:
    """Wilson or rectangle-improved gauge action; ``action(links) -> S`` per configuration."""

    def __init__(self, group: str | Group, beta: float, c1: float = 0.0):
        self.group = get_group(group)
        self.beta = float(beta)
        self.c1 = float(c1)
        self.c0 = 1.0 - 8.0 * self.c1

    @classmethod
    def named(cls, group: str | Group, beta: float, action: str = "wilson", c1: float | None = None):
        """Action by name (``wilson``, ``symanzik``, ``iwasaki``, ``dbw2``); an explicit c1 wins."""
        if action not in IMPROVEMENTS:
            raise ValueError(f"theory.action must be one of {sorted(IMPROVEMENTS)}, got {action!r}")
        return cls(group, beta, IMPROVEMENTS[action] if c1 is None else c1)

    @property
    def analytic_force(self) -> bool:
        return self.c1 == 0.0

    def plaquette_sum(self, links: torch.Tensor) -> torch.Tensor:
        """``sum_x sum_{mu<nu} Re tr P_{mu nu}(x)`` per configuration."""
        # re_dot sums over the block's sites itself: one reduction completes all chunks
        return site_reduce(_by_batch_chunks(_plaquette_sum, links))

    def rectangle_sum(self, links: torch.Tensor) -> torch.Tensor:
        d = links.shape[1]
        sites = tuple(range(1, d + 1))
        total = links.new_zeros(links.shape[0], dtype=links.real.dtype)
        for mu in range(d):
            for nu in range(d):
                if mu != nu:
                    total = total + site_sum(re_trace(rectangle(links, mu, nu)), sites)
        return total

    def __call__(self, links: torch.Tensor) -> torch.Tensor:
        s = self.c0 * self.plaquette_sum(links)
        if self.c1 != 0.0:
            s = s + self.c1 * self.rectangle_sum(links)
        return -(self.beta / self.group.N) * s

    def force(self, links: torch.Tensor) -> torch.Tensor:
        """Algebra-valued derivative ``F`` with ``dS/d eps = tr(X F)`` along ``U -> exp(eps X) U``.

        Analytic for the Wilson action (staples), autograd otherwise.
        """
        if not self.analytic_force:
            return autograd_force(self, links, self.group)
        return _by_batch_chunks(self._analytic_force, links)

    def _analytic_force(self, links: torch.Tensor) -> torch.Tensor:
        # project() runs on a colour-major view (its elementwise ops then stream over
        # sites); the single layout change back to (..., N, N) comes last
        m = _wilson_staple_products(links)
        return (-(self.beta / self.group.N) * self.group.project(m)).contiguous()

    def __repr__(self) -> str:
        return f"GaugeAction({self.group}, beta={self.beta}, c1={self.c1})"


#: Site-field elements (sites x N^2) evaluated at once by the Wilson action and force.
#: Each plane streams through about six site fields; a few configurations at a time keep
#: them in cache: 1.1-1.5x faster, more at larger batches (docs/benchmarks.md). One
#: configuration is the smallest chunk: shifts need whole lattices.
CHUNK_ELEMENTS = 1 << 16


def _by_batch_chunks(fn, links: torch.Tensor) -> torch.Tensor:
    """``fn(links)`` evaluated on slices of the batch axis and concatenated."""
    size = max(1, CHUNK_ELEMENTS // max(1, links[0, 0].numel()))
    if links.shape[0] <= size:
        return fn(links)
    return torch.cat([fn(c) for c in links.split(size)])


def _plaquette_sum(links: torch.Tensor) -> torch.Tensor:
    # Per plane: Re tr(A B^dag) with A = U_mu U_nu(x+mu), B = U_nu U_mu(x+nu): two products
    # and one contraction (summed over sites at once) instead of three products and a
    # trace. Done in the colour-major layout (gaugeflow.groups.matrix), where the N x N
    # products vectorise over sites; shifts still go through gaugeflow.lattice.shift.
    d = links.shape[1]
    u, prod, _, shift_ = _site_fields(links)
    total = None
    for mu in range(d):
        for nu in range(mu + 1, d):
            a = prod(u[mu], shift_(u[nu], mu, 1))
            b = prod(u[nu], shift_(u[mu], nu, 1))
            t = re_dot(a, b)
            total = t if total is None else total + t
    return links.new_zeros(links.shape[0], dtype=links.real.dtype) if total is None else total


def _wilson_staple_products(links: torch.Tensor) -> torch.Tensor:
    """``M_mu(x) = U_mu(x) V_mu(x)`` for every mu, ``V`` the staple sum of :func:`wilson_staples`.

    Built plane by plane from the plaquette rather than staple by staple: with
    ``A = U_mu(x) U_nu(x+mu)``, ``B = U_nu(x) U_mu(x+nu)`` and ``P = A B^dag``,

    * forward terms: ``M_mu += P_{mu nu}(x)`` and ``M_nu += P_{mu nu}(x)^dag``;
    * backward terms: ``M_mu(x) += W_mu(x - nu)`` with ``W_mu = U_mu(x+nu) A^dag U_nu(x)``
      and ``M_nu(x) += W_nu(x - mu)`` with ``W_nu = U_nu(x+mu) B^dag U_mu(x)``.

    Seven products per plane (the staple-by-staple form needs eight, plus one per link),
    in the colour-major layout; returns ``(batch, d, *L, N, N)`` as a view of colour-major
    memory (call ``.contiguous()`` for the usual layout).
    """
    d = links.shape[1]
    u, prod, dag, shift_ = _site_fields(links)
    m: list[torch.Tensor | None] = [None] * d
    for mu in range(d):
        for nu in range(mu + 1, d):
            u_nu_xmu = shift_(u[nu], mu, 1)
            u_mu_xnu = shift_(u[mu], nu, 1)
            a = prod(u[mu], u_nu_xmu)
            b = prod(u[nu], u_mu_xnu)
            a_dag, b_dag = dag(a), dag(b)
            p = prod(a, b_dag)
            w_mu = prod(prod(u_mu_xnu, a_dag), u[nu])
            w_nu = prod(prod(u_nu_xmu, b_dag), u[mu])
            t_mu = p + shift_(w_mu, nu, -1)
            t_nu = dag(p).add_(shift_(w_nu, mu, -1))
            m[mu] = t_mu if m[mu] is None else m[mu].add_(t_mu)
            m[nu] = t_nu if m[nu] is None else m[nu].add_(t_nu)
    if links.shape[-1] == 1:
        return torch.stack(m, dim=1)[..., None, None]
    return torch.stack(m, dim=1).movedim((2, 3), (-2, -1))


def _site_fields(links: torch.Tensor):
    """``(u, prod, dag, shift)``: the d link fields as site fields and the kernels acting on them.

    SU(N): colour-major ``(batch, N, N, *L)`` fields (:func:`colour_major_links`) with
    :func:`mul_cm`, :func:`dagger_cm`, :func:`shift_cm`. U(1): plain complex ``(batch, *L)``
    views with elementwise products, ``conj`` and :func:`shift` itself.
    """
    d = links.shape[1]
    if links.shape[-1] == 1:
        v = links[..., 0, 0]
        return [v[:, mu] for mu in range(d)], torch.mul, torch.conj_physical, shift
    return colour_major_links(links), mul_cm, dagger_cm, shift_cm


def autograd_force(action, links: torch.Tensor, group: Group) -> torch.Tensor:
    """Algebra-valued derivative of ``action`` by complex autograd.

    torch returns ``G`` with ``dS = Re sum conj(G) dU``; along ``dU = eps X U`` this is
    ``Re tr(X U G^dagger) = tr(X project(U G^dagger))``.
    """
    with torch.enable_grad():
        u = links.detach().requires_grad_(True)
        s = action(u).sum()
        (g,) = torch.autograd.grad(s, u)
    return group.project(u.detach() @ g.conj().transpose(-1, -2))


def gauge_transform(links: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``U_mu(x) -> Omega(x) U_mu(x) Omega(x+mu)^dagger``; omega has shape ``(batch, *L, N, N)``."""
    d = links.shape[1]
    out = []
    for mu in range(d):
        om_fwd = shift(omega, mu, 1)
        out.append(mul(mul(omega, links[:, mu]), om_fwd.conj().transpose(-1, -2)))
    return torch.stack(out, dim=1)
