"""Gauge-equivariant coupling layers for U(1) (Kanwar et al., arXiv:2003.06413).

A layer transforms the phases of its *active* plaquettes ``P_{mu nu}(x)``, x in the
mask's site set, with an invertible map of the circle whose parameters come from a
convolutional network that sees only gauge-invariant *frozen* plaquettes (cos, sin).
The link update ``U_mu(x) -> e^{i (phi' - phi)} U_mu(x)`` realises ``phi -> phi'`` on the
active plaquette and commutes with gauge transformations, so ``log q`` is gauge
invariant. With angles as local coordinates (the Haar measure is d theta / 2 pi), the
log-Jacobian is the sum over active plaquettes of ``log |d phi' / d phi|``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gaugeflow.flows.base import FlowLayer
from gaugeflow.flows.masks import GaugeMask
from gaugeflow.flows.splines import circular_rational_quadratic_spline, ncp_mixture
from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import site_sum

TWO_PI = 2 * math.pi


def plaquette_phases(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """Phase in (-pi, pi] of ``P_{mu nu}(x)`` of U(1) links ``(batch, d, *L, 1, 1)``."""
    u_mu, u_nu = links[:, mu, ..., 0, 0], links[:, nu, ..., 0, 0]
    p = u_mu * shift(u_nu, mu, 1) * (u_nu * shift(u_mu, nu, 1)).conj()
    return torch.angle(p)


class CircleTransform(nn.Module):
    """An invertible map of the circle with per-site parameters: spline or NCP mixture."""

    def __init__(self, kind: str = "spline", n_bins: int = 8, n_mix: int = 6):
        super().__init__()
        if kind not in ("spline", "ncp"):
            raise ValueError(f"model.transform must be 'spline' or 'ncp', got {kind!r}")
        self.kind, self.n_bins, self.n_mix = kind, int(n_bins), int(n_mix)

    @property
    def n_params(self) -> int:
        return 3 * self.n_bins if self.kind == "spline" else 2 * self.n_mix + 1

    def __call__(self, phi: torch.Tensor, params: torch.Tensor, inverse: bool = False):
        """``phi`` in [0, 2 pi) and ``params`` ``(..., n_params)`` -> (phi', log|d phi'/d phi|)."""
        if self.kind == "spline":
            k = self.n_bins
            w, h, d = params[..., :k], params[..., k:2 * k], params[..., 2 * k:]
            return circular_rational_quadratic_spline(phi, w, h, d, inverse=inverse)
        m = self.n_mix
        # softplus(0) = log 2: offsetting by log(e - 1) makes zero parameters give s = 1 (identity)
        s = torch.nn.functional.softplus(params[..., :m] + math.log(math.e - 1))
        weights = torch.softmax(params[..., m:2 * m], dim=-1)
        return ncp_mixture(phi, s, weights, inverse=inverse, shift=params[..., 2 * m])


class U1PlaquetteCoupling(FlowLayer):
    """One U(1) gauge-equivariant coupling; ``links`` are complex ``(batch, d, *L, 1, 1)``."""

    def __init__(self, mask: GaugeMask, net: nn.Module, transform: CircleTransform):
        super().__init__()
        self.mu, self.nu = mask.mu, mask.nu
        self.planes = list(mask.frozen)
        self.register_buffer("link_mask", mask.links.clone(), persistent=False)
        d = mask.links.dim()
        onehot = torch.zeros((d,) + (1,) * d)
        onehot[mask.mu] = 1.0
        self.register_buffer("direction", onehot, persistent=False)
        self.register_buffer("frozen", torch.stack([mask.frozen[p] for p in self.planes]), persistent=False)
        self.net = net
        self.transform = transform

    def context(self, links: torch.Tensor) -> torch.Tensor:
        """cos and sin of frozen plaquettes of every plane, zero elsewhere: ``(batch, 2 n_planes, *L)``."""
        phases = torch.stack([plaquette_phases(links, r, s) for r, s in self.planes], dim=1)
        frozen = self.frozen.to(phases.dtype)
        return torch.cat([torch.cos(phases) * frozen, torch.sin(phases) * frozen], dim=1)

    def _transform(self, links: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.net(self.context(links)).movedim(1, -1)
        phi = torch.remainder(plaquette_phases(links, self.mu, self.nu), TWO_PI)
        new_phi, logj = self.transform(phi, params, inverse=inverse)
        mask = self.link_mask.to(phi.dtype)
        # the rotation of every link, zero off direction mu: a broadcast product instead
        # of slicing and concatenating the link tensor (whose backward zero-fills it)
        delta = ((new_phi - phi) * mask).unsqueeze(1) * self.direction.to(phi.dtype)
        out = links * torch.polar(torch.ones_like(delta), delta)[..., None, None]
        sites = tuple(range(1, logj.dim()))
        return out, site_sum(logj * mask, sites)

    def forward(self, links: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(links, inverse=False)

    def inverse(self, links: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(links, inverse=True)
