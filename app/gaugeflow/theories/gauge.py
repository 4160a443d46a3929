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
from gaugeflow.groups.matrix import mul, re_trace, re_trace_mul
from gaugeflow.lattice import shift
from gaugeflow.observables.loops import plaquette, rectangle, wilson_staples

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
        d = links.shape[1]
        sites = tuple(range(1, d + 1))
        total = links.new_zeros(links.shape[0], dtype=links.real.dtype)
        for mu in range(d):
            u_mu = links[:, mu]
            for nu in range(mu + 1, d):
                u_nu = links[:, nu]
                # Re tr(A B^dag) with A = U_mu U_nu(x+mu), B = U_nu U_mu(x+nu): two
                # products and one trace contraction instead of three products.
                a = mul(u_mu, shift(u_nu, mu, 1))
                b = mul(u_nu, shift(u_mu, nu, 1))
                total = total + re_trace_mul(a, b.conj().transpose(-1, -2)).sum(sites)
        return total

    def rectangle_sum(self, links: torch.Tensor) -> torch.Tensor:
        d = links.shape[1]
        sites = tuple(range(1, d + 1))
        total = links.new_zeros(links.shape[0], dtype=links.real.dtype)
        for mu in range(d):
            for nu in range(d):
                if mu != nu:
                    total = total + re_trace(rectangle(links, mu, nu)).sum(sites)
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
        d = links.shape[1]
        f = [self.group.project(mul(links[:, mu], wilson_staples(links, mu))) for mu in range(d)]
        return -(self.beta / self.group.N) * torch.stack(f, dim=1)

    def __repr__(self) -> str:
        return f"GaugeAction({self.group}, beta={self.beta}, c1={self.c1})"


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
