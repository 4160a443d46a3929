"""Hybrid Monte Carlo (Duane, Kennedy, Pendleton & Roweth, Phys. Lett. B 195 (1987) 216).

Scalar fields move as ``phi -> phi + eps p``; gauge links as ``U -> exp(eps P) U`` with
``P`` in the Lie algebra. The kinetic energy is ``|P|_F^2 / 2`` in both cases, so the
momentum refresh is a unit Gaussian in the orthonormal coordinates of
:mod:`gaugeflow.groups`. Integrators: leapfrog and the second-order minimum-norm
(Omelyan) scheme with lambda = 0.1931833275037836 (Omelyan, Mryglod & Folk,
Comput. Phys. Commun. 151 (2003) 272; Takaishi & de Forcrand hep-lat/0505020).

Theories with dynamical fermions (:mod:`gaugeflow.theories.fermionic`) add two things:

* **Pseudofermion refresh.** An action with ``refresh(fields, generators)`` gets its auxiliary
  fields drawn at the start of every trajectory, after the momenta: chain ``c`` draws its momenta
  and then its pseudofermion noise from its own generator (or the batch from the one generator).
  A theory without ``refresh`` draws exactly what it drew before.
* **Multiple time scales** (Sexton & Weingarten, Nucl. Phys. B380 (1992) 665). With
  ``gauge_steps = m > 1`` and an action that has ``gauge_force`` and ``fermion_force``, the outer
  scheme (leapfrog or Omelyan, ``n_steps`` steps of ``eps``) kicks with the fermion force only,
  and each of its drifts (one per leapfrog step, two of ``eps/2`` per Omelyan step) becomes
  ``m`` steps of the same scheme with the gauge force only. Kicks that meet at the same fields
  (the end of one inner integration, the fermion kick, the start of the next) are applied as one
  momentum update, each force evaluated once. ``m = 1`` is the one-scale integrator with the total
  force (for leapfrog the nested scheme with ``m = 1`` is the same thing). Both are symmetric
  compositions of symplectic maps: reversible, area preserving, O(eps^2) energy violation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    action: torch.Tensor  # S of the configurations kept (the Hamiltonian's: joint for pseudofermions)
    #: for an action with ``gauge_action`` and ``fermion_action``: those parts of ``action`` for the
    #: configurations kept (the fermion part with the pseudofermions of this trajectory); else empty
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


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
        gauge_steps: int = 1,
    ):
        if n_steps < 1:
            raise ValueError(f"hmc.n_steps must be >= 1, got {n_steps}")
        if not traj_length > 0:
            raise ValueError(f"hmc.traj_length must be > 0, got {traj_length}")
        if integrator not in INTEGRATORS:
            raise ValueError(f"hmc.integrator must be one of {list(INTEGRATORS)}, got {integrator!r}")
        if force not in ("analytic", "autograd"):
            raise ValueError(f"hmc.force must be 'analytic' or 'autograd', got {force!r}")
        if int(gauge_steps) != gauge_steps or gauge_steps < 1:
            raise ValueError(f"hmc.gauge_steps must be an integer >= 1, got {gauge_steps}")
        if gauge_steps > 1 and not has_split_force(theory.action):
            raise ValueError(f"hmc.gauge_steps={gauge_steps}: theory {theory.name} has no separate gauge and "
                             "fermion forces (multiple time scales are for theories with dynamical fermions)")
        self.theory = theory
        self.gauge_steps = int(gauge_steps)
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

    def gauge_force(self, fields: torch.Tensor) -> torch.Tensor:
        """The gauge part of the force (``hmc.force=autograd``: by autograd of ``gauge_action``)."""
        act = self.theory.action
        if self.force_method == "autograd":
            from gaugeflow.theories.gauge import autograd_force

            return autograd_force(act.gauge_action, fields, self.theory.group)
        return act.gauge_force(fields)

    def fermion_force(self, fields: torch.Tensor) -> torch.Tensor:
        """The fermion part of the force (always the action's own: analytic)."""
        return self.theory.action.fermion_force(fields)

    # -- integration -------------------------------------------------------
    def schedule(self) -> list[tuple[str, float, float]]:
        """The nested integrator as a list of operations: ``("drift", dt, 0)`` and
        ``("kick", dt_gauge, dt_fermion)`` (``p += dt_gauge F_G + dt_fermion F_F`` at the current
        fields), adjacent kicks merged. For ``gauge_steps = 1`` a kick's two coefficients are equal."""
        eps, n, m = self.eps, self.n_steps, self.gauge_steps
        lam = OMELYAN_LAMBDA
        ops: list[list] = []

        def kick(g: float, f: float) -> None:
            if ops and ops[-1][0] == "kick":
                ops[-1][1] += g
                ops[-1][2] += f
            else:
                ops.append(["kick", g, f])

        def inner(tau: float) -> None:
            h = tau / m
            for _ in range(m):
                if self.integrator == "leapfrog":
                    kick(0.5 * h, 0.0)
                    ops.append(["drift", h, 0.0])
                    kick(0.5 * h, 0.0)
                else:
                    kick(lam * h, 0.0)
                    ops.append(["drift", 0.5 * h, 0.0])
                    kick((1 - 2 * lam) * h, 0.0)
                    ops.append(["drift", 0.5 * h, 0.0])
                    kick(lam * h, 0.0)

        for _ in range(n):
            if self.integrator == "leapfrog":
                kick(0.0, 0.5 * eps)
                inner(eps)
                kick(0.0, 0.5 * eps)
            else:
                kick(0.0, lam * eps)
                inner(0.5 * eps)
                kick(0.0, (1 - 2 * lam) * eps)
                inner(0.5 * eps)
                kick(0.0, lam * eps)
        return [tuple(op) for op in ops]

    def integrate(self, fields: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Molecular-dynamics trajectory; reversible and area preserving."""
        if self.gauge_steps > 1:
            return self._integrate_nested(fields, p)
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

    def _integrate_nested(self, fields: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for op, a, b in self.schedule():
            if op == "drift":
                fields = self.drift(fields, p, a)
                continue
            if a != 0.0:
                p = p + a * self.gauge_force(fields)
            if b != 0.0:
                p = p + b * self.fermion_force(fields)
        return fields, p

    def hamiltonian(self, fields: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, _ = self._action(fields)
        return self.kinetic(p) + s, s

    def _action(self, fields: torch.Tensor, fresh: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``S`` and, for a fermionic action, its parts (their sum is ``action(fields)``, bit for bit).
        ``fresh``: the pseudofermions were just drawn at ``fields``, whose fermion action is then
        known without a solve (``refresh_fermion_action``)."""
        act = self.theory.action
        if not has_parts(act):
            return act(fields), {}
        sg = act.gauge_action(fields)
        known = getattr(act, "refresh_fermion_action", None) if fresh else None
        sf = (known(fields) if known is not None else act.fermion_action(fields)).to(sg.dtype)
        return sg + sf, {"gauge_action": sg, "fermion_action": sf}

    def refresh(self, fields: torch.Tensor) -> None:
        """Draw the action's auxiliary fields (pseudofermions) for this trajectory, if it has any:
        one generator per chain where the HMC has them, else the batch's one."""
        act = self.theory.action
        if hasattr(act, "refresh"):
            if isinstance(self.generator, list) and len(self.generator) != fields.shape[0]:
                raise ValueError(f"{len(self.generator)} generators for a batch of {fields.shape[0]} chains")
            act.refresh(fields, self.generator)

    @torch.no_grad()
    def trajectory(self, fields: torch.Tensor) -> TrajectoryResult:
        """One HMC trajectory with a Metropolis test for every configuration of the batch.

        Random numbers of each chain, in this order: momenta, the action's auxiliary fields
        (pseudofermions, where it has ``refresh``), the Metropolis uniform."""
        p0 = self.momenta(fields)
        self.refresh(fields)
        s0, parts0 = self._action(fields, fresh=True)
        h0 = self.kinetic(p0) + s0
        new, p1 = self.integrate(fields, p0)
        if self.theory.is_gauge:
            # removes rounding drift off the group; O(1e-15), far below the dH resolution
            new = self.theory.group.reunitarize(new)
        s1, parts1 = self._action(new)
        h1 = self.kinetic(p1) + s1
        dh = h1 - h0
        u = self._draw(dh.shape[0], lambda b, g: torch.rand((b,), generator=g, dtype=dh.dtype, device=dh.device))
        accept = u < torch.exp(-dh)
        shape = (-1,) + (1,) * (fields.dim() - 1)
        out = torch.where(accept.view(shape), new, fields)
        parts = {k: torch.where(accept, parts1[k], parts0[k]) for k in parts1}
        return TrajectoryResult(out, accept, dh, torch.where(accept, s1, s0), parts)


def has_parts(action) -> bool:
    """Whether ``action`` exposes the fermionic interface's two parts (``gauge_action``, ``fermion_action``)."""
    return callable(getattr(action, "gauge_action", None)) and callable(getattr(action, "fermion_action", None))


def has_split_force(action) -> bool:
    """Whether ``action`` has separate ``gauge_force`` and ``fermion_force`` (multiple time scales)."""
    return callable(getattr(action, "gauge_force", None)) and callable(getattr(action, "fermion_force", None))


def marginal_action(theory: Theory, fields: torch.Tensor) -> torch.Tensor:
    """The action of the distribution of the fields alone: ``theory.action(fields)``, except for an
    action with auxiliary fields (pseudofermions: it has ``refresh``), whose links' marginal is
    ``S_G - log det(D^dagger D)`` (``gauge_action - fermion_logdet``; dense: small lattices)."""
    act = theory.action
    if hasattr(act, "refresh") and hasattr(act, "fermion_logdet") and hasattr(act, "gauge_action"):
        sg = act.gauge_action(fields)
        return sg - act.fermion_logdet(fields).to(sg.dtype)
    return act(fields)
