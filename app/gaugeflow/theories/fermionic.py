"""Gauge theories with Nf = 2 degenerate Wilson(-clover) fermions: the targets HMC and flows sample.

``fermions="exact"``: the marginal target ``p(U) ∝ exp(-S_G(U)) det(D^dagger D)``, i.e. the action
``S(U) = S_G(U) - log det(D^dagger D)`` with a batched dense log-determinant (small lattices only:
:data:`gaugeflow.fermions.MAX_DENSE_UNKNOWNS`), its force from the analytic trace formula.

``fermions="pseudofermion"``: the joint target over links and one pseudofermion field ``phi``,
``S(U, phi) = S_G(U) + phi^dagger (D^dagger D)^{-1} phi``; ``phi`` is refreshed by a heat bath at
the start of every trajectory (:meth:`PseudofermionAction.refresh`), so the links' marginal is the
same ``exp(-S_G) det(D^dagger D)`` (Weingarten & Petcher 1981; Gottlieb et al. 1987).

Both actions expose the interface the HMC job uses (the contract of a fermionic action):

* ``action(links)``: the action of the Hamiltonian (the joint one for pseudofermions);
* ``gauge_action(links)``, ``fermion_action(links)``: its two parts (``fermion_action`` is
  ``-log det(D^dagger D)`` for ``exact``, ``phi^dagger (D^dagger D)^{-1} phi`` for pseudofermions);
* ``force(links) = gauge_force(links) + fermion_force(links)`` (the split serves multiple time
  scales, Sexton & Weingarten 1992);
* ``refresh(links, generators)`` (pseudofermions only): draw the auxiliary fields at the start of a
  trajectory, one generator per chain (or one for the batch);
* ``fermion_logdet(links)``: ``log det(D^dagger D)`` (dense; small lattices);
* ``solver_stats()``: CG iterations and seconds since the last call (and resets them);
* ``measurements(links, generator)``: per-configuration fermion observables.

Nf = 2 because ``det(D^dagger D) = |det D|^2`` is two degenerate flavours; other Nf need a rational
approximation (RHMC), left for later, as is twisted mass.
"""

from __future__ import annotations

import torch

from gaugeflow.fermions import (
    MAX_DENSE_UNKNOWNS,
    WilsonFermions,
    cg,
    determinant_force,
    gaussian_fermion,
    inner,
    log_det_normal,
    n_spin,
    pseudofermion_force,
)
from gaugeflow.theories.gauge import GaugeAction

FERMIONS = ("exact", "pseudofermion")


class _FermionicAction:
    """What both Nf = 2 actions share: the gauge part, solver bookkeeping and measurements."""

    fermions_kind = ""

    def __init__(self, gauge: GaugeAction, fermions: WilsonFermions, max_unknowns: int = MAX_DENSE_UNKNOWNS):
        self.gauge, self.fermions, self.max_unknowns = gauge, fermions, int(max_unknowns)
        self.group = gauge.group
        self.tol, self.maxiter = 1e-10, 10_000
        self.condensate = "auto"  # exact | stochastic | auto (exact where the dense matrix is allowed)
        self.n_noise = 4
        self._iterations, self._seconds = 0, 0.0

    def _count(self, iterations: int, seconds: float) -> None:
        self._iterations += int(iterations)
        self._seconds += float(seconds)

    def solver_stats(self) -> dict[str, float]:
        out = {"cg_iterations": self._iterations, "solve_seconds": self._seconds}
        self._iterations, self._seconds = 0, 0.0
        return out

    def gauge_action(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge(links)

    def gauge_force(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge.force(links)

    def __call__(self, links: torch.Tensor) -> torch.Tensor:
        return self.gauge(links) + self.fermion_action(links).to(links.real.dtype)

    def force(self, links: torch.Tensor) -> torch.Tensor:
        """The algebra-valued ``F`` of :meth:`GaugeAction.force` for the whole action."""
        return self.gauge_force(links) + self.fermion_force(links)

    def fermion_logdet(self, links: torch.Tensor) -> torch.Tensor:
        """``log det(D^dagger D)`` per configuration (dense: small lattices)."""
        return log_det_normal(self.fermions.operator(links), "dense", self.max_unknowns)

    def measurements(self, links: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``pion_correlator`` ``(batch, T)`` and ``chiral_condensate`` (per flavour; exact from the
        dense inverse where allowed, else Z2-stochastic with ``n_noise`` vectors)."""
        import time

        from gaugeflow.fermions.measure import chiral_condensate, pion_correlator

        op = self.fermions.operator(links)
        t0 = time.perf_counter()
        corr, iters = pion_correlator(op, tol=self.tol, maxiter=self.maxiter)
        method = self.condensate
        if method == "auto":
            method = "exact" if dense_unknowns(op.lattice_shape, op.n_colour) <= self.max_unknowns else "stochastic"
        pbp = chiral_condensate(op, method, n_noise=self.n_noise, generator=generator, tol=self.tol,
                                maxiter=self.maxiter)
        self._count(iters, time.perf_counter() - t0)
        return {"pion_correlator": corr, "chiral_condensate": pbp}


class Nf2ExactAction(_FermionicAction):
    """``S(U) = S_G(U) - log det(D^dagger D)`` per configuration (dense determinant)."""

    fermions_kind = "exact"

    def fermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return -self.fermion_logdet(links)

    def fermion_force(self, links: torch.Tensor) -> torch.Tensor:
        return determinant_force(self.fermions, links, "analytic", self.max_unknowns)


class PseudofermionAction(_FermionicAction):
    """``S(U) = S_G(U) + phi^dagger (D^dagger D)^{-1} phi`` with the current pseudofermion ``phi``.

    ``refresh(links, generators)`` draws ``phi = D^dagger eta`` for the configurations about to
    move (the HMC job calls it at the start of every trajectory); the action and the force use
    that ``phi`` until the next refresh. CG to ``tol`` relative residual, at most ``maxiter``
    iterations (:class:`gaugeflow.fermions.SolverNotConverged` otherwise).
    """

    fermions_kind = "pseudofermion"

    def __init__(self, gauge: GaugeAction, fermions: WilsonFermions, tol: float = 1e-10, maxiter: int = 10_000,
                 max_unknowns: int = MAX_DENSE_UNKNOWNS):
        super().__init__(gauge, fermions, max_unknowns)
        self.tol, self.maxiter = float(tol), int(maxiter)
        self.phi: torch.Tensor | None = None

    def refresh(self, links: torch.Tensor, generators=None) -> torch.Tensor:
        """Heat bath ``phi = D^dagger eta``; ``generators``: one for the batch, or one per chain
        (chain ``c`` draws its noise from ``generators[c]`` alone)."""
        op = self.fermions.operator(links)
        if isinstance(generators, (list, tuple)):
            eta = torch.cat([gaussian_fermion((1, *op.field_shape[1:]), g, op.dtype, op.device) for g in generators])
        else:
            eta = gaussian_fermion(op.field_shape, generators, op.dtype, op.device)
        self.phi = op.apply_dagger(eta)
        return self.phi

    def _phi(self, links: torch.Tensor) -> torch.Tensor:
        if self.phi is None or self.phi.shape[0] != links.shape[0]:
            raise RuntimeError("PseudofermionAction.refresh(links, generators) must draw phi before the action "
                               "is evaluated")
        return self.phi

    def _solve(self, links: torch.Tensor) -> torch.Tensor:
        import time

        op = self.fermions.operator(links.detach())
        t0 = time.perf_counter()
        r = cg(op.normal, self._phi(links), tol=self.tol, maxiter=self.maxiter)
        self._count(int(r.iterations.max().item()), time.perf_counter() - t0)
        return r.x

    def fermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return inner(self._phi(links), self._solve(links)).real

    def pseudofermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return self.fermion_action(links)

    def fermion_force(self, links: torch.Tensor) -> torch.Tensor:
        return pseudofermion_force(self.fermions, links, self._phi(links), tol=self.tol, maxiter=self.maxiter,
                                   x=self._solve(links))


def dense_unknowns(shape, group_n: int) -> int:
    """Unknowns ``V * spin * colour`` of one configuration's Dirac matrix."""
    v = 1
    for s in shape:
        v *= int(s)
    return v * n_spin(len(shape)) * int(group_n)
