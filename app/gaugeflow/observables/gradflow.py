"""Wilson (gradient) flow, M. Lüscher, JHEP 08 (2010) 071, arXiv:1006.4518.

The flow ``dV_mu(x)/dt = Z_mu(x) V_mu(x)`` with ``Z = -g0^2 d S_w``. With Lüscher's
``S_w = (1/g0^2) sum_{oriented p} Re tr(1 - V(p))`` = ``(2/g0^2) sum_{unoriented p}``
and his generators ``tr(T^a T^b) = -delta_ab / 2``, the Lie derivative is
``g0^2 d_{x,mu} S_w = project(V_mu(x) S_mu(x))`` where ``S_mu`` is the staple sum of
:func:`~gaugeflow.observables.loops.wilson_staples` (each unoriented plaquette once)
and ``project`` the traceless anti-hermitian part: the factor 2 of the orientations
cancels the 1/2 of the generator norm. Hence ``Z = -project(V S)``.

Abelian check of the normalisation: for U(1) with small angles
``d theta_mu/dt = sum_nu dbar_nu F_{nu mu}`` (``dbar`` the backward difference), so in
2d the plaquette angle obeys ``dF/dt = Laplacian F`` with unit coefficient, the
heat equation of the continuum flow ``dB/dt = D_nu G_{nu mu}``.

Integration by Lüscher's third-order Runge-Kutta scheme (1006.4518, appendix C)::

    W1 = exp(Z0/4) W0
    W2 = exp(8/9 Z1 - 17/36 Z0) W1
    W3 = exp(3/4 Z2 - 8/9 Z1 + 17/36 Z0) W2,      Zi = eps Z(Wi)

Each factor is a group exponential, so the flowed field stays in the group up to
rounding; no reunitarisation is applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from gaugeflow.groups import Group
from gaugeflow.groups.matrix import mul
from gaugeflow.observables.loops import wilson_staples
from gaugeflow.observables.topology import energy_density_clover
from gaugeflow.observables.wilson import group_of, link_dims

__all__ = ["FlowRecord", "wilson_flow_generator", "wilson_flow_step", "wilson_flow"]


@dataclass
class FlowRecord:
    """Measurements along a flow, one row per flow time (t = 0 included).

    ``t``: ``(n_steps + 1,)`` float64; ``energy`` (clover ``E``, Lüscher's normalisation)
    and ``t2_energy`` (``t^2 E``): ``(n_steps + 1, batch)``; ``extra``: any further
    observables asked for, by name, each ``(n_steps + 1, ...)``.
    """

    t: torch.Tensor
    energy: torch.Tensor
    t2_energy: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def wilson_flow_generator(links: torch.Tensor, group: str | Group | None = None) -> torch.Tensor:
    """``Z_mu(x) = -project(V_mu(x) S_mu(x))`` for all mu, shape of ``links`` (algebra-valued)."""
    d, _ = link_dims(links)
    g = group_of(links, group)
    return torch.stack([-g.project(mul(links[:, mu], wilson_staples(links, mu))) for mu in range(d)], dim=1)


def wilson_flow_step(links: torch.Tensor, eps: float, group: str | Group | None = None) -> torch.Tensor:
    """One step of Lüscher's RK3 integrator (1006.4518 appendix C) of size ``eps``."""
    g = group_of(links, group)
    z0 = eps * wilson_flow_generator(links, g)
    w1 = mul(g.exp(0.25 * z0), links)
    z1 = eps * wilson_flow_generator(w1, g)
    zc = (8.0 / 9.0) * z1 - (17.0 / 36.0) * z0
    w2 = mul(g.exp(zc), w1)
    z2 = eps * wilson_flow_generator(w2, g)
    return mul(g.exp(0.75 * z2 - zc), w2)


def wilson_flow(
    links: torch.Tensor,
    t: float,
    eps: float = 0.01,
    measure: bool | Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    group: str | Group | None = None,
) -> torch.Tensor | tuple[torch.Tensor, FlowRecord]:
    """Flow ``links`` to flow time ``t`` (lattice units) with steps of at most ``eps``.

    The interval is split into ``n = ceil(t / eps)`` equal steps so that the flow ends
    exactly at ``t``. Returns the flowed links; with ``measure`` true (or a mapping
    ``name -> f(links)``, measured in addition to E) returns ``(links, FlowRecord)``
    with ``E(t)`` and ``t^2 E(t)`` from the clover field strength at every step.
    """
    link_dims(links)
    if t < 0:
        raise ValueError(f"flow time must be >= 0, got {t}")
    if eps <= 0:
        raise ValueError(f"flow step eps must be > 0, got {eps}")
    g = group_of(links, group)
    # the small slack keeps t/eps = 10.000000000000002 from adding a step
    n_steps = math.ceil(t / eps - 1e-9) if t > 0 else 0
    h = t / n_steps if n_steps else 0.0

    extra_fns = dict(measure) if isinstance(measure, Mapping) else {}
    want = bool(measure) or bool(extra_fns)
    energies: list[torch.Tensor] = []
    extras: dict[str, list[torch.Tensor]] = {k: [] for k in extra_fns}

    def record(v: torch.Tensor) -> None:
        energies.append(energy_density_clover(v))
        for name, fn in extra_fns.items():
            extras[name].append(fn(v))

    v = links
    if want:
        record(v)
    for _ in range(n_steps):
        v = wilson_flow_step(v, h, g)
        if want:
            record(v)
    if not want:
        return v
    times = torch.arange(n_steps + 1, dtype=torch.float64, device=links.device) * h
    energy = torch.stack(energies)
    t2e = times.to(energy.dtype)[:, None] ** 2 * energy
    rec = FlowRecord(
        t=times,
        energy=energy,
        t2_energy=t2e,
        extra={k: torch.stack(vals) for k, vals in extras.items()},
    )
    return v, rec
