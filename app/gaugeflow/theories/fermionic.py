"""Gauge theories with Nf = 2 degenerate Wilson(-clover) fermions: the targets HMC and flows sample.

``fermions="exact"``: the marginal target ``p(U) ∝ exp(-S_G(U)) det(D^dagger D)``, i.e. the action
``S(U) = S_G(U) - log det(D^dagger D)`` with a batched dense log-determinant (small lattices only:
:data:`gaugeflow.fermions.MAX_DENSE_UNKNOWNS`), its force from the analytic trace formula.

``fermions="pseudofermion"``: the joint target over links and pseudofermion fields, by default one,
``S(U, phi) = S_G(U) + phi^dagger (D^dagger D)^{-1} phi``; the fields are refreshed by a heat bath at
the start of every trajectory (:meth:`PseudofermionAction.refresh`), so the links' marginal is the
same ``exp(-S_G) det(D^dagger D)`` (Weingarten & Petcher 1981; Gottlieb et al. 1987). Options
``even_odd``, ``hasenbusch`` and ``mixed_precision`` split ``det(D^dagger D)`` into other monomials
(:mod:`gaugeflow.fermions.monomials`) with the same marginal.

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

import time
from dataclasses import replace

import torch

from gaugeflow.fermions import (
    MAX_DENSE_UNKNOWNS,
    JointField,
    WilsonFermions,
    determinant_force,
    log_det_normal,
    n_spin,
)
from gaugeflow.fermions.monomials import (
    Monomial,
    SolverOptions,
    build_monomials,
    check_hasenbusch,
)
from gaugeflow.theories.gauge import GaugeAction

FERMIONS = ("exact", "pseudofermion")
#: how training takes the determinant of a marginal flow's target (``theory.logdet``)
LOGDET = ("dense", "stochastic")


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

    def __call__(self, links: torch.Tensor) -> torch.Tensor:
        if isinstance(links, JointField):
            raise ValueError("a joint model draws pseudofermions: it needs theory.fermions=pseudofermion "
                             "(this is theory.fermions=exact)")
        return super().__call__(links)

    def fermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return -self.fermion_logdet(links)

    def fermion_force(self, links: torch.Tensor) -> torch.Tensor:
        return determinant_force(self.fermions, links, "analytic", self.max_unknowns)


class PseudofermionAction(_FermionicAction):
    """``S(U) = S_G(U) + sum_k S_k(U, phi_k)``: the pseudofermion monomials of ``det(D^dagger D)``.

    Options (:mod:`gaugeflow.fermions.monomials` has the formulas):

    * ``even_odd``: pseudofermions on the even sites with the Schur complement ``D_hat`` of
      :class:`~gaugeflow.fermions.EvenOdd`, plus ``-2 log|det D_oo|`` with the clover term;
    * ``hasenbusch``: kappas ``kappa_1 < ... < kappa_n < kappa`` of mass preconditioning, one
      pseudofermion per factor ``det(M_1^dagger M_1) prod_i det(M_{i+1}^dagger M_{i+1}) / det(M_i^dagger M_i)``;
    * ``mixed_precision``: solves by :func:`~gaugeflow.fermions.cg_mixed` (complex64 inner CG,
      complex128 residuals to the same ``tol``).

    Without options it is the plain ``phi^dagger (D^dagger D)^{-1} phi`` with ``phi = D^dagger eta``.
    ``refresh(links, generators)`` draws every pseudofermion for the configurations about to move
    (the HMC job calls it at the start of every trajectory; chain ``c`` draws from
    ``generators[c]`` alone, the monomials in order); the action and the force use those fields
    until the next refresh. CG to ``tol`` relative residual, at most ``maxiter`` iterations
    (:class:`gaugeflow.fermions.SolverNotConverged` otherwise).
    """

    fermions_kind = "pseudofermion"


    def __call__(self, fields) -> torch.Tensor:
        """For links: the action of the links' own distribution, ``S_G - log det(D^dagger D)``
        (dense: small lattices), what marginal flows learn and what files record as ``action``.
        For a :class:`~gaugeflow.fermions.JointField` ``(U, phi)``: the joint action ``S_G(U) +
        phi^dagger (D^dagger D)^{-1} phi`` (:meth:`joint_action`), what joint flows learn. HMC's
        Hamiltonian is ``gauge_action + fermion_action`` with the pseudofermions of the trajectory,
        and :meth:`force` is that Hamiltonian's force."""
        if isinstance(fields, JointField):
            return self.joint_action(fields)
        sg = self.gauge(fields)
        return sg - self.fermion_logdet(fields).to(sg.dtype)

    def joint_action(self, fields: JointField) -> torch.Tensor:
        """``S_G(U) + phi^dagger (D^dagger D)^{-1} phi`` per configuration, differentiable in the
        links and in ``phi`` (one CG solve each, :func:`gaugeflow.fermions.gradients.pseudofermion_action`).

        The joint density ``exp(-S)`` integrates over ``phi`` to ``pi^n det(D^dagger D) exp(-S_G)``
        (``n`` complex components): the links' marginal, times a constant.
        """
        from gaugeflow.fermions.gradients import pseudofermion_action

        if self.even_odd or self.hasenbusch:
            raise ValueError("joint models draw one full-lattice pseudofermion: they need theory.even_odd=false "
                             "and theory.hasenbusch=[]")
        t0 = time.perf_counter()
        # the solve in float64 whatever the model's dtype: a complex64 CG cannot reach tol ~ 1e-10
        op = self.fermions.operator(fields.links.to(torch.complex128))
        s, iters = pseudofermion_action(op, fields.phi.to(torch.complex128), tol=self.tol, maxiter=self.maxiter)
        self._count(iters, time.perf_counter() - t0)
        sg = self.gauge(fields.links)
        return sg + s.to(sg.dtype)

    def joint_parts(self, fields: JointField) -> dict[str, torch.Tensor]:
        """``gauge_action`` and ``pseudofermion_action`` of joint configurations (no graph)."""
        with torch.no_grad():
            sg = self.gauge(fields.links)
            return {"gauge_action": sg, "pseudofermion_action": self.joint_action(fields) - sg}

    def __init__(self, gauge: GaugeAction, fermions: WilsonFermions, tol: float = 1e-10, maxiter: int = 10_000,
                 max_unknowns: int = MAX_DENSE_UNKNOWNS, even_odd: bool = False, hasenbusch=(),
                 mixed_precision: bool = False):
        self._solver = SolverOptions(float(tol), int(maxiter), bool(mixed_precision))
        self.monomials: list[Monomial] = []
        super().__init__(gauge, fermions, max_unknowns)
        self.tol, self.maxiter = float(tol), int(maxiter)
        self.even_odd = bool(even_odd)
        self.hasenbusch = check_hasenbusch(fermions.kappa, hasenbusch)
        self.monomials = build_monomials(fermions, self.even_odd, self.hasenbusch, self._solver)

    # -- solver settings, shared by the monomials ---------------------------------------------
    def _set_solver(self, **changes) -> None:
        self._solver = replace(self._solver, **changes)
        for m in self.monomials:
            if hasattr(m, "solver"):
                m.solver = self._solver

    @property
    def tol(self) -> float:
        return self._solver.tol

    @tol.setter
    def tol(self, value: float) -> None:
        self._set_solver(tol=float(value))

    @property
    def maxiter(self) -> int:
        return self._solver.maxiter

    @maxiter.setter
    def maxiter(self, value: int) -> None:
        self._set_solver(maxiter=int(value))

    @property
    def mixed_precision(self) -> bool:
        return self._solver.mixed_precision

    @mixed_precision.setter
    def mixed_precision(self, value: bool) -> None:
        self._set_solver(mixed_precision=bool(value))

    @property
    def options(self) -> dict:
        """``{"even_odd", "hasenbusch", "mixed_precision"}`` as built."""
        return {"even_odd": self.even_odd, "hasenbusch": list(self.hasenbusch),
                "mixed_precision": self.mixed_precision}

    # -- pseudofermion fields ---------------------------------------------------------------------
    @property
    def pseudofermions(self) -> list[torch.Tensor | None]:
        """The current field of every pseudofermion monomial, in drawing order."""
        return [m.phi for m in self.monomials if hasattr(m, "phi")]

    @property
    def phi(self) -> torch.Tensor | None:
        """The first pseudofermion field (the only one without Hasenbusch kappas)."""
        return self.monomials[0].phi if self.monomials else None

    @phi.setter
    def phi(self, value: torch.Tensor | None) -> None:
        self.monomials[0].phi = value

    def refresh(self, links: torch.Tensor, generators=None) -> torch.Tensor:
        """Heat bath of every pseudofermion; ``generators``: one for the batch, or one per chain
        (chain ``c`` draws its noise from ``generators[c]`` alone). Returns the first field."""
        for m in self.monomials:
            m.refresh(links, generators)
        return self.phi

    # -- action and force -------------------------------------------------------------------------
    def fermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return _summed(m.action(links) for m in self.monomials)

    def pseudofermion_action(self, links: torch.Tensor) -> torch.Tensor:
        return self.fermion_action(links)

    def refresh_fermion_action(self, links: torch.Tensor) -> torch.Tensor:
        """:meth:`fermion_action` at the links of the last :meth:`refresh`, without its solves: a
        heat-bath monomial's action there is its noise's ``|eta|^2`` (exactly; the solve would
        reproduce it to the CG tolerance). Valid only until the links move."""
        known = (getattr(m, "refresh_action", None) for m in self.monomials)
        return _summed(m.action(links) if s is None else s for m, s in zip(self.monomials, known))

    def monomial_actions(self, links: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: S_k}`` per monomial."""
        return {m.name: m.action(links) for m in self.monomials}

    def fermion_force(self, links: torch.Tensor) -> torch.Tensor:
        return _summed(m.force(links) for m in self.monomials)

    def solver_stats(self) -> dict[str, float]:
        for m in self.monomials:
            st = m.stats()
            self._count(st["cg_iterations"], st["solve_seconds"])
        return super().solver_stats()

    def monomial_stats(self) -> dict[str, dict[str, float]]:
        """``{name: {cg_iterations, solve_seconds, solves}}`` per monomial since the last call of this
        or :meth:`solver_stats`; the totals stay in what the next :meth:`solver_stats` reports."""
        out = {}
        for m in self.monomials:
            st = m.stats()
            self._count(st["cg_iterations"], st["solve_seconds"])
            out[m.name] = st
        return out


class StochasticMarginalAction:
    """The training action of marginal flows with ``theory.logdet=stochastic``: its value is the
    gauge action ``S_G`` and its gradient that of ``S_G - log det(D^dagger D)`` in expectation,
    the log-determinant's gradient estimated with ``n_noise`` Gaussian vectors and one CG solve
    each (:func:`gaugeflow.fermions.gradients.stochastic_logdet`): no dense matrix, so marginal
    flows train where the dense determinant is out of reach.

    ``exact_value = False`` tells the trainer that per-batch ESS and free energy from this value
    would describe another target (the trainer leaves them empty); the final evaluation and the
    samplers use the theory's exact action. Joint configurations get the (exact) joint action.
    The noise comes from torch's global generator of the links' device (seeded by the job).
    """

    exact_value = False

    def __init__(self, action: _FermionicAction, n_noise: int = 1):
        if int(n_noise) < 1:
            raise ValueError(f"theory.logdet_noise must be >= 1, got {n_noise}")
        self.action, self.n_noise = action, int(n_noise)

    def __call__(self, fields) -> torch.Tensor:
        from gaugeflow.fermions.gradients import stochastic_logdet

        if isinstance(fields, JointField):
            return self.action(fields)
        act = self.action
        t0 = time.perf_counter()
        # in float64 whatever the model's dtype (a complex64 CG cannot reach tol ~ 1e-10)
        est, iters = stochastic_logdet(act.fermions.operator(fields.to(torch.complex128)), None, self.n_noise,
                                       tol=act.tol, maxiter=act.maxiter)
        act._count(iters, time.perf_counter() - t0)
        sg = act.gauge(fields)
        return sg - est.to(sg.dtype)


def _summed(terms):
    """The sum of the monomials' terms, in monomial order (no zero tensor to guess a shape for)."""
    total = None
    for t in terms:
        total = t if total is None else total + t
    return total


def dense_unknowns(shape, group_n: int) -> int:
    """Unknowns ``V * spin * colour`` of one configuration's Dirac matrix."""
    v = 1
    for s in shape:
        v *= int(s)
    return v * n_spin(len(shape)) * int(group_n)
