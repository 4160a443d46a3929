"""Closed and open products of links: plaquettes, rectangles, Wilson lines and staples.

Link layout ``U[b, mu, x]`` from x to x + mu (DESIGN.md); the plaquette is
``P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger``.
"""

from __future__ import annotations

import torch

from gaugeflow.groups.matrix import dagger, mul, mul_dag
from gaugeflow.lattice import shift


def plaquette(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """Untraced plaquette ``P_{mu nu}(x)``, shape ``(batch, *L, N, N)``."""
    u_mu, u_nu = links[:, mu], links[:, nu]
    a = mul(u_mu, shift(u_nu, mu, 1))
    b = mul(u_nu, shift(u_mu, nu, 1))
    return mul_dag(a, b)


def wilson_line(links: torch.Tensor, mu: int, length: int) -> torch.Tensor:
    """Straight line ``U_mu(x) U_mu(x+mu) ... U_mu(x+(length-1) mu)``."""
    if length < 1:
        raise ValueError(f"a Wilson line needs length >= 1, got {length}")
    u = links[:, mu]
    line = u
    for k in range(1, length):
        line = mul(line, shift(u, mu, k))
    return line


def rectangular_loop(links: torch.Tensor, mu: int, nu: int, r: int, t: int) -> torch.Tensor:
    """Untraced ``r x t`` loop in the (mu, nu) plane: r links along mu, t along nu, anchored at x."""
    a = wilson_line(links, mu, r)
    b = wilson_line(links, nu, t)
    left = mul(a, shift(b, mu, r))
    right = mul(b, shift(a, nu, t))
    return mul_dag(left, right)


def rectangle(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """The 2x1 loop, two links along mu and one along nu."""
    return rectangular_loop(links, mu, nu, 2, 1)


def wilson_staples(links: torch.Tensor, mu: int) -> torch.Tensor:
    """Sum ``V_mu(x)`` of the staples, so that ``sum_{P contains U_mu(x)} Re tr P = Re tr(U_mu(x) V_mu(x))``.

    Forward staple ``U_nu(x+mu) U_mu(x+nu)^dag U_nu(x)^dag`` and backward staple
    ``U_nu(x-nu+mu)^dag U_mu(x-nu)^dag U_nu(x-nu)`` for every nu != mu.
    """
    d = links.shape[1]
    u_mu = links[:, mu]
    total = torch.zeros_like(u_mu)
    for nu in range(d):
        if nu == mu:
            continue
        u_nu = links[:, nu]
        u_nu_xmu = shift(u_nu, mu, 1)
        fwd = mul_dag(mul_dag(u_nu_xmu, shift(u_mu, nu, 1)), u_nu)
        # backward: build at x - nu from fields at x, then shift by -nu
        bwd_at = mul(dagger(mul(u_mu, u_nu_xmu)), u_nu)
        total = total + fwd + shift(bwd_at, nu, -1)
    return total
