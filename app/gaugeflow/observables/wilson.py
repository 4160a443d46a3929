"""Wilson loops: mean plaquette, rectangular ``r x t`` loops and Polyakov loops.

Conventions follow DESIGN.md: links ``U[b, mu, x]`` of shape
``(batch, d, L_0, ..., L_{d-1}, N, N)``, U(1) with N = 1, and every neighbour
reached through :func:`gaugeflow.lattice.shift`. Traces are normalised by N, so a
cold (identity) configuration gives 1 for every loop. References: K. G. Wilson,
Phys. Rev. D 10 (1974) 2445 (Wilson loops); A. M. Polyakov, Phys. Lett. B 72 (1978)
477 (Polyakov loop).
"""

from __future__ import annotations

import torch

from gaugeflow.groups import Group, get_group
from gaugeflow.groups.matrix import dagger, mul, re_trace, re_trace_mul, trace
from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import global_shape, site_mean
from gaugeflow.observables.loops import rectangular_loop

__all__ = [
    "link_dims",
    "group_of",
    "mean_plaquette",
    "wilson_loop",
    "polyakov_loop",
    "polyakov_loop_abs",
]


def link_dims(links: torch.Tensor) -> tuple[int, int]:
    """``(d, N)`` of a link tensor ``(batch, d, L_0..L_{d-1}, N, N)``; raises on any other layout."""
    if links.ndim < 6 or links.shape[-1] != links.shape[-2] or links.ndim != links.shape[1] + 4:
        raise ValueError(
            "gauge links must have shape (batch, d, L_0, ..., L_{d-1}, N, N) with d >= 2, "
            f"got {tuple(links.shape)}"
        )
    if not links.is_complex():
        raise ValueError(f"gauge links must be a complex tensor, got dtype {links.dtype}")
    return links.shape[1], links.shape[-1]


def group_of(links: torch.Tensor, group: str | Group | None = None) -> Group:
    """The gauge group of ``links``: ``group`` if given, else U(1) for N = 1 and SU(N) otherwise."""
    if group is not None:
        return get_group(group)
    n = links.shape[-1]
    return get_group("u1" if n == 1 else f"su{n}")


def _site_axes(d: int) -> tuple[int, ...]:
    return tuple(range(1, d + 1))


def mean_plaquette(links: torch.Tensor) -> torch.Tensor:
    """``<Re tr P_{mu nu}(x) / N>`` over all sites and planes ``mu < nu``; shape ``(batch,)``."""
    d, n = link_dims(links)
    sites = _site_axes(d)
    total = links.new_zeros(links.shape[0], dtype=links.real.dtype)
    for mu in range(d):
        u_mu = links[:, mu]
        for nu in range(mu + 1, d):
            u_nu = links[:, nu]
            # Re tr(A B^dag) with A = U_mu U_nu(x+mu), B = U_nu U_mu(x+nu): the
            # closing product is never formed, only its trace.
            a = mul(u_mu, shift(u_nu, mu, 1))
            b = mul(u_nu, shift(u_mu, nu, 1))
            total = total + site_mean(re_trace_mul(a, dagger(b)), sites)
    return total / (n * d * (d - 1) // 2)


def wilson_loop(links: torch.Tensor, r: int, t: int) -> torch.Tensor:
    """``<Re tr W_{r x t} / N>`` over sites, planes ``mu < nu`` and both orientations; shape ``(batch,)``.

    Both orientations means the loop with r links along mu and t along nu, and the
    one with r along nu and t along mu. For ``r == t`` the two are the same loop
    traversed backwards, whose real trace is identical, so it is evaluated once.
    ``wilson_loop(U, 1, 1) == mean_plaquette(U)``.
    """
    d, n = link_dims(links)
    if r < 1 or t < 1:
        raise ValueError(f"Wilson loop extents must be >= 1, got r={r}, t={t}")
    sites = _site_axes(d)
    shapes = [(r, t)] if r == t else [(r, t), (t, r)]
    total = links.new_zeros(links.shape[0], dtype=links.real.dtype)
    for mu in range(d):
        for nu in range(mu + 1, d):
            for a, b in shapes:
                total = total + site_mean(re_trace(rectangular_loop(links, mu, nu, a, b)), sites)
    return total / (n * len(shapes) * d * (d - 1) // 2)


def _line_around(u_mu: torch.Tensor, mu: int, length: int) -> torch.Tensor:
    """``U_mu(x) U_mu(x+mu) ... U_mu(x+(length-1) mu)`` by binary doubling (O(log L) products)."""
    result = None
    offset = 0  # result covers the links [x, x + offset mu)
    power, plen = u_mu, 1  # power covers [x, x + plen mu)
    while length:
        if length & 1:
            piece = shift(power, mu, offset) if offset else power
            result = piece if result is None else mul(result, piece)
            offset += plen
        length >>= 1
        if length:
            power = mul(power, shift(power, mu, plen))
            plen *= 2
    return result


def polyakov_loop(links: torch.Tensor, mu: int = -1) -> torch.Tensor:
    """Polyakov loop ``<tr prod_k U_mu(x + k mu) / N>`` averaged over the lattice; complex, ``(batch,)``.

    The product winds once around the periodic direction ``mu`` (default: the last
    axis, the usual Euclidean time). Its trace is the same at every site of a line
    along mu, so averaging over all sites equals averaging over the orthogonal slice;
    taking all sites avoids indexing a lattice axis, which a domain-decomposed
    :func:`~gaugeflow.lattice.shift` would not see.
    """
    d, n = link_dims(links)
    if not -d <= mu < d:
        raise ValueError(f"direction mu={mu} out of range for d={d}")
    mu = mu % d
    # the loop winds around the whole lattice, not the local block of a decomposed run
    length = global_shape(links.shape[2 : 2 + d])[mu]
    loop = _line_around(links[:, mu], mu, length)
    return site_mean(trace(loop), _site_axes(d)) / n


def polyakov_loop_abs(links: torch.Tensor, mu: int = -1) -> torch.Tensor:
    """``|<P>|``, the modulus of the volume-averaged Polyakov loop (real, ``(batch,)``).

    Averaging before the modulus makes this invariant under global centre
    transformations, the usual order parameter of deconfinement.
    """
    return polyakov_loop(links, mu).abs()
