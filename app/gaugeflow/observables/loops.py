"""Closed and open products of links: plaquettes, rectangles, Wilson lines and staples.

Link layout ``U[b, mu, x]`` from x to x + mu (DESIGN.md); the plaquette is
``P_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger``.
"""

from __future__ import annotations

import torch

from gaugeflow.groups.matrix import dagger, mul, mul_dag
from gaugeflow.lattice import shift


def colour_major_links(links: torch.Tensor) -> list[torch.Tensor]:
    """``[U_mu for mu in range(d)]``, each in the colour-major layout ``(batch, N, N, *L)``.

    One transposing copy of the whole field for N > 1 (each direction comes out contiguous);
    for U(1) (N = 1) only views. See :mod:`gaugeflow.groups.matrix` for the layout.
    """
    b, d = links.shape[:2]
    sites = links.shape[2:-2]
    n = links.shape[-1]
    if n == 1:
        x = links.movedim((-2, -1), (2, 3))
        return [x[:, mu] for mu in range(d)]
    v = links.reshape(b, d, -1, n, n).permute(1, 0, 3, 4, 2).contiguous()
    return [v[mu].view(b, n, n, *sites) for mu in range(d)]


def shift_cm(field: torch.Tensor, mu: int, n: int = 1) -> torch.Tensor:
    """:func:`gaugeflow.lattice.shift` of a colour-major field ``(batch, N, N, *L)``.

    The colour indices are folded into the batch axis, so the field reaches ``shift`` as
    ``batch * N * N`` plain site fields ``(batch * N * N, *L)`` with the lattice axes at
    ``1 .. d``; a halo-exchange shift sees nothing new.
    """
    k = field.shape[0] * field.shape[1] * field.shape[2]
    return shift(field.reshape(k, *field.shape[3:]), mu, n).reshape(field.shape)


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
