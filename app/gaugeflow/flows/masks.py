"""Masks for coupling layers: site checkerboards for scalar fields and
active / passive / frozen patterns for gauge-equivariant plaquette couplings.

Gauge couplings (Kanwar et al. 2003.06413, generalised to d dimensions as in
Abbott et al. 2305.02402) update links ``U_mu(x)`` on a subset S of sites. S is fixed
by the parities of three coordinates: ``x_mu = a`` and ``x_nu = b`` (mod 2), and for
d > 2 ``sum_{rho not in {mu, nu}} x_rho = p`` (mod 2). Then no plaquette contains two
updated links: along every transverse direction rho, x and x + rho lie in different
parity classes. For x in S the plaquette ``P_{mu nu}(x)`` is *active* (its transform
defines the link update), every other plaquette containing an updated link is
*passive*, and plaquettes without updated links are *frozen* and feed the context
network. The pattern needs even extents only, updates 1/4 (d = 2) or 1/8 (d > 2) of
the mu-links per layer, and the ``2 * 2 * (2 if d > 2 else 1)`` offsets times d
directions update every link.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from gaugeflow.lattice import coordinates, shift


def checkerboard_mask(shape, parity: int = 0, device=None) -> torch.Tensor:
    """Bool mask of sites with ``sum_mu x_mu = parity`` (mod 2)."""
    return coordinates(shape, device).sum(0) % 2 == parity


@dataclass(frozen=True)
class GaugeMask:
    """Masks of one gauge coupling layer; site masks have the lattice shape."""

    mu: int
    nu: int
    offsets: tuple[int, int, int]
    links: torch.Tensor  # bool L: U_mu(x) updated at x
    frozen: dict[tuple[int, int], torch.Tensor]  # (rho, sigma), rho < sigma -> bool L


def gauge_mask(shape, mu: int, nu: int, offsets: tuple[int, int, int], device=None) -> GaugeMask:
    """Masks for updating ``U_mu`` through active plaquettes in the (mu, nu) plane."""
    shape = tuple(shape)
    d = len(shape)
    if d < 2 or mu == nu or not (0 <= mu < d and 0 <= nu < d):
        raise ValueError(f"gauge masks need d >= 2 and mu != nu in range(d), got d={d}, mu={mu}, nu={nu}")
    if any(s % 2 for s in shape):
        raise ValueError(f"gauge coupling masks need even lattice extents, got {list(shape)}")
    a, b, p = offsets
    x = coordinates(shape, device)
    sel = (x[mu] % 2 == a) & (x[nu] % 2 == b)
    others = [r for r in range(d) if r not in (mu, nu)]
    if others:
        sel = sel & (sum(x[r] for r in others) % 2 == p)
    elif p != 0:
        raise ValueError("in d = 2 the third parity offset must be 0")
    frozen = {}
    upd = sel[None]  # shift works on (batch, *L)
    for rho, sigma in itertools.combinations(range(d), 2):
        if mu not in (rho, sigma):
            frozen[(rho, sigma)] = torch.ones(shape, dtype=torch.bool, device=device)
            continue
        # P_{rho sigma}(y) holds U_mu(y) and U_mu(y + other), with other the second direction
        other = sigma if rho == mu else rho
        touched = upd | shift(upd, other, 1)
        frozen[(rho, sigma)] = ~touched[0]
    return GaugeMask(mu, nu, (a, b, p), sel, frozen)


def gauge_mask_schedule(shape, device=None) -> list[GaugeMask]:
    """A sequence of masks that updates every link of the lattice exactly once.

    The active plane of direction mu is (mu, mu + 1 mod d).
    """
    d = len(shape)
    ps = (0, 1) if d > 2 else (0,)
    out = []
    for mu in range(d):
        nu = (mu + 1) % d
        for a, b, p in itertools.product((0, 1), (0, 1), ps):
            out.append(gauge_mask(shape, mu, nu, (a, b, p), device))
    return out
