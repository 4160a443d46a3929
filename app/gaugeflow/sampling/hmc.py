"""Hybrid Monte Carlo (Duane, Kennedy, Pendleton & Roweth, Phys. Lett. B 195 (1987) 216).

Scalar fields move as ``phi -> phi + eps p``; gauge links as ``U -> exp(eps P) U`` with
``P`` in the Lie algebra. The kinetic energy is ``|P|_F^2 / 2`` in both cases, so the
momentum refresh is a unit Gaussian in the orthonormal coordinates of
:mod:`gaugeflow.groups`. Integrators: leapfrog and the second-order minimum-norm
(Omelyan) scheme with lambda = 0.1931833275037836 (Omelyan, Mryglod & Folk,
Comput. Phys. Commun. 151 (2003) 272; Takaishi & de Forcrand hep-lat/0505020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaugeflow.groups.matrix import mul
from gaugeflow.theories.theory import Theory

OMELYAN_LAMBDA = 0.1931833275037836
INTEGRATORS = ("leapfrog", "omelyan")


@dataclass
class TrajectoryResult:
    fields: torch.Tensor
    accepted: torch.Tensor  # bool, per configuration
    delta_h: torch.Tensor  # H(end) - H(start), per configuration
    action: torch.Tensor  # S of the configurations kept


class HMC:
    """HMC updates of a batch of independent chains of ``theory``."""

    def __init__(
        self,
        theory: Theory,
        n_steps: int,
        traj_length: float,
        integrator: str = "leapfrog",
        force: str = "analytic",
        generator: torch.Generator | None = None,
    ):
        if n_steps < 1:
            raise ValueError(f"hmc.n_steps must be >= 1, got {n_steps}")
        if not traj_length > 0:
            raise ValueError(f"hmc.traj_length must be > 0, got {traj_length}")
        if integrator not in INTEGRATORS:
            raise ValueError(f"hmc.integrator must be one of {list(INTEGRATORS)}, got {integrator!r}")
        if force not in ("analytic", "autograd"):
            raise ValueError(f"hmc.force must be 'analytic' or 'autograd', got {force!r}")
        self.theory = theory
        self.n_steps = int(n_steps)
        self.eps = float(traj_length) / self.n_steps
        self.integrator = integrator
        self.force_method = force
        self.generator = generator

    # -- field space --------------------------------------------------------
    def momenta(self, fields: torch.Tensor) -> torch.Tensor:
        if self.theory.is_gauge:
            return self.theory.group.random_algebra(fields.shape[:-2], self.generator, fields.dtype, fields.device)
        return torch.randn(fields.shape, generator=self.generator, dtype=fields.dtype, device=fields.device)

    def kinetic(self, p: torch.Tensor) -> torch.Tensor:
        if self.theory.is_gauge:
            return 0.5 * self.theory.group.norm2(p).flatten(1).sum(1)
        return 0.5 * p.square().flatten(1).sum(1)

    def drift(self, fields: torch.Tensor, p: torch.Tensor, dt: float) -> torch.Tensor:
        if self.theory.is_gauge:
            return mul(self.theory.group.exp(dt * p), fields)
        return fields + dt * p

    def kick(self, fields: torch.Tensor, p: torch.Tensor, dt: float) -> torch.Tensor:
        return p + dt * self.theory.force(fields, self.force_method)

    # -- integration -------------------------------------------------------
    def integrate(self, fields: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Molecular-dynamics trajectory; reversible and area preserving."""
        eps, n = self.eps, self.n_steps
        if self.integrator == "leapfrog":
            p = self.kick(fields, p, 0.5 * eps)
            for i in range(n):
                fields = self.drift(fields, p, eps)
                p = self.kick(fields, p, eps if i < n - 1 else 0.5 * eps)
            return fields, p
        lam = OMELYAN_LAMBDA
        p = self.kick(fields, p, lam * eps)
        for i in range(n):
            fields = self.drift(fields, p, 0.5 * eps)
            p = self.kick(fields, p, (1 - 2 * lam) * eps)
            fields = self.drift(fields, p, 0.5 * eps)
            # adjacent end/start kicks of consecutive steps merge into one
            p = self.kick(fields, p, 2 * lam * eps if i < n - 1 else lam * eps)
        return fields, p

    def hamiltonian(self, fields: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.theory.action(fields)
        return self.kinetic(p) + s, s

    @torch.no_grad()
    def trajectory(self, fields: torch.Tensor) -> TrajectoryResult:
        """One HMC trajectory with a Metropolis test for every configuration of the batch."""
        p0 = self.momenta(fields)
        h0, s0 = self.hamiltonian(fields, p0)
        new, p1 = self.integrate(fields, p0)
        if self.theory.is_gauge:
            # removes rounding drift off the group; O(1e-15), far below the dH resolution
            new = self.theory.group.reunitarize(new)
        h1, s1 = self.hamiltonian(new, p1)
        dh = h1 - h0
        u = torch.rand(dh.shape, generator=self.generator, dtype=dh.dtype, device=dh.device)
        accept = u < torch.exp(-dh)
        shape = (-1,) + (1,) * (fields.dim() - 1)
        out = torch.where(accept.view(shape), new, fields)
        return TrajectoryResult(out, accept, dh, torch.where(accept, s1, s0))
