"""The standard per-configuration measurements written to ensembles and analysed by HMC runs."""

from __future__ import annotations

import torch

from gaugeflow.groups import Group


def measure_gauge(links: torch.Tensor, group: Group, flow_time: float = 0.0) -> dict[str, torch.Tensor]:
    """Mean plaquette, and the topological charge where the theory has one.

    2d U(1): the geometric (integer) charge; 4d: the clover charge after Wilson flow
    to ``flow_time`` (0 = unsmoothed). Other cases carry no charge entry.
    """
    from gaugeflow.observables.topology import topological_charge
    from gaugeflow.observables.wilson import mean_plaquette

    out = {"plaquette": mean_plaquette(links)}
    d = links.shape[1]
    if (d == 2 and group.N == 1) or d == 4:
        out["topological_charge"] = topological_charge(links, flow_time=flow_time)
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
