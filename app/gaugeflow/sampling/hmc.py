"""Hybrid Monte Carlo (Duane, Kennedy, Pendleton & Roweth, Phys. Lett. B 195 (1987) 216).

Scalar fields move as ``phi -> phi + eps p``; gauge links as ``U -> exp(eps P) U`` with
``P`` in the Lie algebra. The kinetic energy is ``|P|_F^2 / 2`` in both cases, so the
momentum refresh is a unit Gaussian in the orthonormal coordinates of
:mod:`gaugeflow.groups`. Integrators: leapfrog and the second-order minimum-norm
(Omelyan) scheme with lambda = 0.1931833275037836 (Omelyan, Mryglod & Folk,
Comput. Phys. Commun. 151 (2003) 272; Takaishi & de Forcrand hep-lat/0505020).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gaugeflow.groups.matrix import mul
from gaugeflow.theories.theory import Theory

OMELYAN_LAMBDA = 0.1931833275037836
INTEGRATORS = ("leapfrog", "omelyan")


def chain_seed(seed: int, chain: int) -> int:
    """Seed of chain ``chain`` of a run seeded with ``seed``.

    Chain 0 uses ``seed`` itself, so a run of one chain is the single-chain run; chain
    ``c > 0`` uses 63 bits of ``numpy.random.SeedSequence((seed, c))``, a hash that
    separates the streams of different chains and seeds. A chain's seed depends on
    ``(seed, c)`` only, not on how many chains run beside it.
    """
    if chain == 0:
        return int(seed)
    import numpy as np

    hi, lo = np.random.SeedSequence([int(seed) % (1 << 64), int(chain)]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


def chain_generators(seed: int, n_chains: int, device=None) -> list[torch.Generator]:
    """One generator per chain, chain ``c`` seeded with :func:`chain_seed` ``(seed, c)``."""
    kw = {} if device is None else {"device": device}
    return [torch.Generator(**kw).manual_seed(chain_seed(seed, c)) for c in range(int(n_chains))]


@dataclass
class TrajectoryResult:
    fields: torch.Tensor
    accepted: torch.Tensor  # bool, per configuration
    delta_h: torch.Tensor  # H(end) - H(start), per configuration
    action: torch.Tensor  # S of the configurations kept


class HMC:
    """HMC updates of a batch of independent chains of ``theory``.

    Every configuration of the batch is its own chain: its own momenta, its own Metropolis
    test (``accepted`` and ``delta_h`` per configuration), nothing shared but the lattice and
    the action. ``generator``: one ``torch.Generator`` for the whole batch, or a sequence of
    them, one per chain (the batch size must then equal its length): chain ``c`` draws its
    momenta and its Metropolis uniform from ``generator[c]`` alone, in the order a batch of
    one would, so its stream does not depend on how many chains run beside it.
    """

    def __init__(
        self,
        theory: Theory,
        n_steps: int,
        traj_length: float,
        integrator: str = "leapfrog",
        force: str = "analytic",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
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
        if isinstance(generator, Sequence):
            generator = list(generator)
            if not generator:
                raise ValueError("HMC needs at least one generator in a sequence of generators")
        self.generator = generator

    def _draw(self, batch: int, fn: Callable[[int, torch.Generator | None], torch.Tensor]) -> torch.Tensor:
        """``fn(batch, generator)`` from the one generator, or ``fn(1, generator[c])`` per chain, stacked."""
        if not isinstance(self.generator, list):
            return fn(batch, self.generator)
        if len(self.generator) != batch:
            raise ValueError(f"{len(self.generator)} generators for a batch of {batch} chains")
        return torch.cat([fn(1, g) for g in self.generator])

    # -- field space --------------------------------------------------------
    def momenta(self, fields: torch.Tensor) -> torch.Tensor:
        if self.theory.is_gauge:
            shape = fields.shape[1:-2]
            return self._draw(fields.shape[0], lambda b, g: self.theory.group.random_algebra(
                (b, *shape), g, fields.dtype, fields.device))
        shape = fields.shape[1:]
        return self._draw(fields.shape[0], lambda b, g: torch.randn(
            (b, *shape), generator=g, dtype=fields.dtype, device=fields.device))

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
        u = self._draw(dh.shape[0], lambda b, g: torch.rand((b,), generator=g, dtype=dh.dtype, device=dh.device))
        accept = u < torch.exp(-dh)
        shape = (-1,) + (1,) * (fields.dim() - 1)
        out = torch.where(accept.view(shape), new, fields)
        return TrajectoryResult(out, accept, dh, torch.where(accept, s1, s0))
