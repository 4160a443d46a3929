"""Scalar phi^4 theory on a periodic lattice of any dimension.

Standard form (Albergo, Kanshin & Shanahan 1904.12072 eqs. 20-21; shared/reference/EXACT.md §3):
``S = sum_x [ sum_mu (phi(x+mu) - phi(x))^2 + m2 phi^2 + lam phi^4 ]`` (no 1/2 in the kinetic term).

Hopping form: ``S = sum_x [ -2 kappa sum_mu phi(x) phi(x+mu) + phi^2 + lam_tilde (phi^2 - 1)^2 ]``.
In d dimensions the two are related by ``phi = sqrt(kappa) phi_tilde``, ``lam_tilde = lam kappa^2``,
``1 - 2 lam_tilde = (2d + m2) kappa`` (up to a field-independent constant).
"""

from __future__ import annotations

import math

import torch

from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import site_sum


def _sites(phi: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, phi.dim()))


class Phi4Action:
    """``S(phi)`` in the (m2, lam) form; ``action(phi) -> S`` per configuration."""

    def __init__(self, m2: float, lam: float):
        self.m2 = float(m2)
        self.lam = float(lam)

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        d = phi.dim() - 1
        kin = sum((shift(phi, mu, 1) - phi).square() for mu in range(d))
        phi2 = phi.square()
        return site_sum(kin + self.m2 * phi2 + self.lam * phi2.square(), _sites(phi))

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        """``dS/dphi(x)``."""
        d = phi.dim() - 1
        lap = sum(shift(phi, mu, 1) + shift(phi, mu, -1) for mu in range(d))
        return 2 * (2 * d * phi - lap) + 2 * self.m2 * phi + 4 * self.lam * phi**3

    def to_hopping(self, d: int) -> tuple[float, float]:
        """(kappa, lam_tilde) of the equivalent hopping form in d dimensions."""
        # lam_tilde = lam kappa^2 and 1 - 2 lam_tilde = (2d + m2) kappa: a quadratic in kappa
        a, b = 2 * self.lam, 2 * d + self.m2
        if a == 0:
            kappa = 1.0 / b
        else:
            kappa = (-b + math.sqrt(b * b + 4 * a)) / (2 * a)
        return kappa, self.lam * kappa**2

    def __repr__(self) -> str:
        return f"Phi4Action(m2={self.m2}, lam={self.lam})"


class Phi4HoppingAction:
    """``S(phi)`` in the hopping (kappa, lam_tilde) form."""

    def __init__(self, kappa: float, lam_tilde: float):
        self.kappa = float(kappa)
        self.lam_tilde = float(lam_tilde)

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        d = phi.dim() - 1
        hop = sum(phi * shift(phi, mu, 1) for mu in range(d))
        phi2 = phi.square()
        return site_sum(-2 * self.kappa * hop + phi2 + self.lam_tilde * (phi2 - 1).square(), _sites(phi))

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        """``dS/dphi(x)``."""
        d = phi.dim() - 1
        nbr = sum(shift(phi, mu, 1) + shift(phi, mu, -1) for mu in range(d))
        return -2 * self.kappa * nbr + 2 * phi + 4 * self.lam_tilde * (phi.square() - 1) * phi

    def to_standard(self, d: int) -> tuple[float, float]:
        """(m2, lam) of the equivalent standard form in d dimensions."""
        return (1 - 2 * self.lam_tilde) / self.kappa - 2 * d, self.lam_tilde / self.kappa**2

    def __repr__(self) -> str:
        return f"Phi4HoppingAction(kappa={self.kappa}, lam_tilde={self.lam_tilde})"
