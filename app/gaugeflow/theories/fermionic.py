"""Gauge theories with Nf = 2 degenerate Wilson(-clover) fermions: the targets HMC and flows sample.

``fermions="exact"``: the marginal target ``p(U) ∝ exp(-S_G(U)) det(D^dagger D)``, i.e. the action
``S(U) = S_G(U) - log det(D^dagger D)`` with a batched dense log-determinant (small lattices only:
:data:`gaugeflow.fermions.MAX_DENSE_UNKNOWNS`), its force from the analytic trace formula.

``fermions="pseudofermion"``: the joint target over links and one pseudofermion field ``phi``,
``S(U, phi) = S_G(U) + phi^dagger (D^dagger D)^{-1} phi``; ``phi`` is refreshed by a heat bath at
the start of every trajectory (:meth:`PseudofermionAction.refresh`), so the links' marginal is the
same ``exp(-S_G) det(D^dagger D)`` (Weingarten & Petcher 1981; Gottlieb et al. 1987).

Nf = 2 because ``det(D^dagger D) = |det D|^2`` is two degenerate flavours; other Nf need a rational
approximation (RHMC), left for later, as is twisted mass.
"""

from __future__ import annotations

import torch

from gaugeflow.fermions import (
    MAX_DENSE_UNKNOWNS,
    WilsonFermions,
    determinant_force,
    log_det_normal,
    n_spin,
    pseudofermion_action,
    pseudofermion_force,
    pseudofermion_heatbath,
)
from gaugeflow.theories.gauge import GaugeAction

FERMIONS = ("exact", "pseudofermion")


class Nf2ExactAction:
    """``S(U) = S_G(U) - log det(D^dagger D)`` per configuration (dense determinant)."""

    fermions_kind = "exact"

    def __init__(self, gauge: GaugeAction, fermions: WilsonFermions, max_unknowns: int = MAX_DENSE_UNKNOWNS):
        self.gauge, self.fermions, self.max_unknowns = gauge, fermions, int(max_unknowns)
        self.group = gauge.group

    def fermion_logdet(self, links: torch.Tensor) -> torch.Tensor:
        """``log det(D^dagger D)`` per configuration."""
        return log_det_normal(self.fermions.operator(links), "dense", self.max_unknowns)

    def gauge_action(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge(links)

    def __call__(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge(links) - self.fermion_logdet(links).to(links.real.dtype)

    def force(self, links: torch.Tensor) -> torch.Tensor:
        """The algebra-valued ``F`` of :meth:`GaugeAction.force` for the whole action."""
        return self.gauge.force(links) + determinant_force(self.fermions, links, "analytic", self.max_unknowns)


class PseudofermionAction:
    """``S(U) = S_G(U) + phi^dagger (D^dagger D)^{-1} phi`` with the current pseudofermion ``phi``.

    ``refresh(links, generator)`` draws ``phi = D^dagger eta`` for the configurations about to
    move (the HMC job calls it at the start of every trajectory); the action and the force use
    that ``phi`` until the next refresh. CG to ``tol`` relative residual, at most ``maxiter``
    iterations (:class:`gaugeflow.fermions.SolverNotConverged` otherwise).
    """

    fermions_kind = "pseudofermion"

    def __init__(self, gauge: GaugeAction, fermions: WilsonFermions, tol: float = 1e-10, maxiter: int = 10_000):
        self.gauge, self.fermions = gauge, fermions
        self.group = gauge.group
        self.tol, self.maxiter = float(tol), int(maxiter)
        self.phi: torch.Tensor | None = None

    def refresh(self, links: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.phi = pseudofermion_heatbath(self.fermions.operator(links), generator)
        return self.phi

    def _phi(self, links: torch.Tensor) -> torch.Tensor:
        if self.phi is None or self.phi.shape[0] != links.shape[0]:
            raise RuntimeError("PseudofermionAction.refresh(links, generator) must draw phi before the action "
                               "is evaluated")
        return self.phi

    def gauge_action(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge(links)

    def pseudofermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return pseudofermion_action(self.fermions, links, self._phi(links), tol=self.tol, maxiter=self.maxiter)

    def __call__(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge(links) + self.pseudofermion_action(links).to(links.real.dtype)

    def force(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge.force(links) + pseudofermion_force(self.fermions, links, self._phi(links), tol=self.tol,
                                                             maxiter=self.maxiter)


def dense_unknowns(shape, group_n: int) -> int:
    """Unknowns ``V * spin * colour`` of one configuration's Dirac matrix."""
    v = 1
    for s in shape:
        v *= int(s)
    return v * n_spin(len(shape)) * int(group_n)
