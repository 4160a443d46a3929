"""The standard per-configuration measurements written to ensembles and analysed by HMC runs."""

from __future__ import annotations

import torch

from gaugeflow.groups import Group

#: Wilson-flow step of the measurements. Lüscher's RK3 integrator has a local error
#: O(eps^4): at eps = 0.05 the flowed clover charge differs from eps = 0.01 by ~1e-6
#: (tests/test_observables.py), far below its integer spacing, at a fifth of the cost.
FLOW_STEP = 0.05


def measure_gauge(
    links: torch.Tensor, group: Group, flow_time: float = 0.0, flow_step: float = FLOW_STEP
) -> dict[str, torch.Tensor]:
    """Mean plaquette, and the topological charge where the theory has one.

    2d U(1): the geometric (integer) charge; 4d: the clover charge after Wilson flow
    to ``flow_time`` in steps of at most ``flow_step`` (0 = unsmoothed; the theory
    presets' ``default_flow_time`` is the jobs' default). Other cases carry no charge entry.
    """
    from gaugeflow.observables.topology import topological_charge
    from gaugeflow.observables.wilson import mean_plaquette

    out = {"plaquette": mean_plaquette(links)}
    d = links.shape[1]
    if (d == 2 and group.N == 1) or d == 4:
        out["topological_charge"] = topological_charge(links, flow_time=flow_time, eps=flow_step, group=group)
    return out


def measure_scalar(phi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Magnetisation ``M = mean phi``, ``|M|``, ``V M^2`` (two-point susceptibility), <phi^2>, <phi^4>."""
    sites = tuple(range(1, phi.dim()))
    vol = phi[0].numel()
    m = phi.mean(sites)
    return {
        "magnetization": m,
        "abs_magnetization": m.abs(),
        "susceptibility": vol * m.square(),
        "phi2": phi.square().mean(sites),
        "phi4": phi.pow(4).mean(sites),
    }
