"""Gauge-equivariant coupling layers for U(1) (Kanwar et al., arXiv:2003.06413).

A layer transforms the phases of its *active* plaquettes ``P_{mu nu}(x)``, x in the
mask's site set, with an invertible map of the circle whose parameters come from a
convolutional network that sees only gauge-invariant loops the layer leaves unchanged:
*frozen* plaquettes and, optionally, frozen 2x1 rectangles (cos and sin of their phases).
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


def plaquettes(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """``P_{mu nu}(x)`` (complex, unit modulus) of U(1) links ``(batch, d, *L, 1, 1)``."""
    u_mu, u_nu = links[:, mu, ..., 0, 0], links[:, nu, ..., 0, 0]
    return u_mu * shift(u_nu, mu, 1) * (u_nu * shift(u_mu, nu, 1)).conj()


def plaquette_phases(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """Phase in (-pi, pi] of ``P_{mu nu}(x)`` of U(1) links ``(batch, d, *L, 1, 1)``."""
    return torch.angle(plaquettes(links, mu, nu))


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


def rectangles(links: torch.Tensor, rho: int, sigma: int) -> torch.Tensor:
    """The 2x1 loop ``U_rho(x) U_rho(x+rho) U_sigma(x+2rho) U_rho(x+rho+sigma)^* U_rho(x+sigma)^* U_sigma(x)^*``."""
    u_r, u_s = links[:, rho, ..., 0, 0], links[:, sigma, ..., 0, 0]
    u_r1 = shift(u_r, rho, 1)
    top = shift(u_r * u_r1, sigma, 1)  # U_rho(x+sigma) U_rho(x+rho+sigma)
    return u_r * u_r1 * shift(u_s, rho, 2) * (u_s * top).conj()


def rectangle_phases(links: torch.Tensor, rho: int, sigma: int) -> torch.Tensor:
    """Phase in (-pi, pi] of the 2x1 loop :func:`rectangles`."""
    return torch.angle(rectangles(links, rho, sigma))


def frozen_rectangles(updated: torch.Tensor, mu: int) -> dict[tuple[int, int], torch.Tensor]:
    """Sites x whose 2x1 loop ``R_{rho sigma}(x)`` (2 along rho) contains no updated link ``U_mu``.

    ``updated`` is the bool site mask of updated ``U_mu`` links. The masks are periodic with
    period 2, so rolling them on a decomposed block's local extents (multiples of 2) agrees
    with the global lattice.
    """
    d = updated.dim()

    def at(*steps: tuple[int, int]) -> torch.Tensor:  # updated(x + sum n e_axis)
        m = updated
        for axis, n in steps:
            m = torch.roll(m, -n, axis)
        return m

    out = {}
    for rho in range(d):
        for sigma in range(d):
            if rho == sigma:
                continue
            if rho == mu:  # U_mu at x, x+mu, x+sigma, x+mu+sigma
                touched = at() | at((mu, 1)) | at((sigma, 1)) | at((mu, 1), (sigma, 1))
            elif sigma == mu:  # U_mu at x and x+2rho
                touched = at() | at((rho, 2))
            else:
                touched = torch.zeros_like(updated)
            out[(rho, sigma)] = ~touched
    return out


class U1PlaquetteCoupling(FlowLayer):
    """One U(1) gauge-equivariant coupling; ``links`` are complex ``(batch, d, *L, 1, 1)``.

    ``rectangles=True`` adds the frozen 2x1 loops of both orientations in every plane to the
    context (Kanwar et al. 2003.06413 feed frozen plaquettes and 2x1 loops); the network then
    takes ``2 (n_planes + 2 n_planes)`` input channels (:meth:`n_context`).
    """

    @staticmethod
    def n_context(d: int, rectangles: bool) -> int:
        n_planes = d * (d - 1) // 2
        return 2 * n_planes + (4 * n_planes if rectangles else 0)

    def __init__(self, mask: GaugeMask, net: nn.Module, transform: CircleTransform, rectangles: bool = False):
        super().__init__()
        self.mu, self.nu = mask.mu, mask.nu
        self.planes = list(mask.frozen)
        self.register_buffer("link_mask", mask.links.clone(), persistent=False)
        # flat indices of the updated sites: the circle map runs on these only (1/4 of the
        # sites in 2d, 1/8 in d > 2), the rest of the lattice keeps its phases
        self.register_buffer("active", mask.links.flatten().nonzero().squeeze(1), persistent=False)
        d = mask.links.dim()
        onehot = torch.zeros((d,) + (1,) * d)
        onehot[mask.mu] = 1.0
        self.register_buffer("direction", onehot, persistent=False)
        self.register_buffer("frozen", torch.stack([mask.frozen[p] for p in self.planes]), persistent=False)
        self.rectangles = bool(rectangles)
        if self.rectangles:
            rects = frozen_rectangles(mask.links, mask.mu)
            self.rect_types = list(rects)
            self.register_buffer("frozen_rect", torch.stack([rects[k] for k in self.rect_types]), persistent=False)
        self.net = net
        self.transform = transform

    def context(self, links: torch.Tensor) -> torch.Tensor:
        """cos and sin of the frozen loops, zero elsewhere: ``(batch, n_context, *L)``."""
        loops = [plaquettes(links, r, s) for r, s in self.planes]
        frozen = self.frozen
        if self.rectangles:
            loops += [rectangles(links, r, s) for r, s in self.rect_types]
            frozen = torch.cat([frozen, self.frozen_rect])
        # a loop is a unit complex number: (cos, sin) of its phase are its real and imaginary parts
        loops = torch.stack(loops, dim=1)
        frozen = frozen.to(loops.real.dtype)
        return torch.cat([loops.real * frozen, loops.imag * frozen], dim=1)

    def _transform(self, links: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch, sites = links.shape[0], links.shape[2:-2]
        params = self.net(self.context(links)).flatten(2).index_select(2, self.active).transpose(1, 2)
        phi = torch.remainder(plaquette_phases(links, self.mu, self.nu), TWO_PI).flatten(1)
        phi_a = phi.index_select(1, self.active)
        new_phi, logj = self.transform(phi_a, params.contiguous(), inverse=inverse)
        # scatter back onto the lattice: zero rotation and zero log-Jacobian off the active sites
        zeros = phi.new_zeros(batch, phi.shape[1])
        rot = zeros.index_copy(1, self.active, new_phi - phi_a).reshape(batch, *sites)
        logj = zeros.index_copy(1, self.active, logj).reshape(batch, *sites)
        # the rotation of every link, zero off direction mu: a broadcast product instead
        # of slicing and concatenating the link tensor (whose backward zero-fills it)
        delta = rot.unsqueeze(1) * self.direction.to(phi.dtype)
        out = links * torch.polar(torch.ones_like(delta), delta)[..., None, None]
        return out, site_sum(logj, tuple(range(1, logj.dim())))

    def forward(self, links: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(links, inverse=False)

    def inverse(self, links: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(links, inverse=True)
