"""Pseudofermion monomials of Nf = 2 Wilson(-clover) HMC: even/odd, Hasenbusch, mixed precision.

The two-flavour weight ``det(D^dagger D)`` is written as a product of factors, each carried by
one *monomial*: a term of the action with its own auxiliary field, heat bath and force. Every
factor appears once (one pseudofermion field per factor; several copies of one operator would
change Nf).

**Even/odd** (:class:`~gaugeflow.fermions.EvenOdd` eliminates the odd sites):
``det D = det D_oo * det D_hat`` with the Schur complement ``D_hat = D_ee - D_eo D_oo^{-1} D_oe``
on the even sites, so

    det(D^dagger D) = |det D_oo|^2 * det(D_hat^dagger D_hat),
    S = phi_e^dagger (D_hat^dagger D_hat)^{-1} phi_e  -  2 log|det D_oo|.

``D_oo = A_oo`` is the site-local clover block (the identity without clover, when the second
term is absent); :class:`SiteLogDetMonomial` carries it.

**Hasenbusch** mass preconditioning (hep-lat/0107019) with ``kappa_1 < ... < kappa_n < kappa``
and ``M_i = M(kappa_i)``, ``M_{n+1} = M(kappa)`` (``M = D`` or ``D_hat``):

    det(M^dagger M) = det(M_1^dagger M_1) * prod_i det(M_{i+1}^dagger M_{i+1}) / det(M_i^dagger M_i),
    S_1 = phi_1^dagger (M_1^dagger M_1)^{-1} phi_1,
    S_i = phi_i^dagger M_i (M_{i+1}^dagger M_{i+1})^{-1} M_i^dagger phi_i     (:class:`HasenbuschRatioMonomial`).

``int dphi exp(-phi^dagger Q phi) = pi^n / det Q``: the factor a Gaussian monomial of kernel Q
puts on the links is ``1 / det Q`` (:meth:`Monomial.log_weight_dense`).

**Heat baths** (``eta`` of density ``exp(-eta^dagger eta)``): ``phi_1 = M_1^dagger eta`` and
``phi_i = M_i^{-dagger} M_{i+1}^dagger eta = M_i (M_i^dagger M_i)^{-1} M_{i+1}^dagger eta`` (one
solve), so that ``S_i = |eta|^2`` and ``phi`` has density ``exp(-S)``.

**Forces** (the algebra convention of ``GaugeAction.force``: ``dS/d eps = tr(T F)`` along
``U -> exp(eps T) U``). With ``G_M(l, r)`` the algebra element of ``d Re<l, M r>`` at fixed
fields (:meth:`FermionMatrix.derivative`):

* ``S = phi^dagger (M^dagger M)^{-1} phi``: ``X = (M^dagger M)^{-1} phi``, ``Y = M X``,
  ``dS = -2 Re<Y, dM X>``, ``F = -2 G_M(Y, X)``;
* ``S = chi^dagger (N^dagger N)^{-1} chi`` with ``chi = M^dagger phi``: ``X = (N^dagger N)^{-1} chi``,
  ``Y = N X``, ``dS = 2 Re<phi, dM X> - 2 Re<Y, dN X>``, ``F = 2 G_M(phi, X) - 2 G_N(Y, X)``;
* the Schur complement: ``dD_hat = dD_ee - dD_eo D_oo^{-1} D_oe - D_eo D_oo^{-1} dD_oe +
  D_eo D_oo^{-1} dD_oo D_oo^{-1} D_oe``, so ``Re<l, dD_hat r> = Re<L, dD R>`` for the full-lattice
  fields ``R = (r, -D_oo^{-1} D_oe r)`` and ``L = (l, -D_oo^{-dagger} D_eo^dagger l)`` with
  ``D_oo^{-dagger} D_eo^dagger l = gamma_5 D_oo^{-1} D_oe gamma_5 l``: the full operator's
  hopping derivative (:func:`~gaugeflow.fermions.hopping_derivative`) plus its clover derivative;
* ``S = -2 log|det A_oo|``: ``dS = -2 Re sum_{x odd} tr(A_x^{-1} dA_x)``, by autograd of the
  clover field strengths contracted with ``A_x^{-1}`` at fixed ``A^{-1}``.

**Mixed precision**: the solves of ``M^dagger M`` run as :func:`~gaugeflow.fermions.cg_mixed`
(complex64 inner CG, complex128 residuals) to the same float64 tolerance.

Everything is batched, takes its device from the links, and goes through the geometry (works
inside a domain context, except the dense checks).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from gaugeflow.fermions.evenodd import ODD, EvenOdd
from gaugeflow.fermions.fields import gaussian_fermion, inner
from gaugeflow.fermions.force import (
    _clover_derivative,
    autograd_link_force,
    hopping_derivative,
)
from gaugeflow.fermions.gamma import sigma_munu
from gaugeflow.fermions.solvers import SolveResult, cg, cg_mixed
from gaugeflow.fermions.wilson import WilsonFermions
from gaugeflow.lattice.geometry import site_sum
from gaugeflow.observables.topology import clover_field_strength

__all__ = [
    "FermionMatrix",
    "HasenbuschRatioMonomial",
    "Monomial",
    "SiteLogDetMonomial",
    "SolverOptions",
    "TwoFlavourMonomial",
    "build_monomials",
    "check_hasenbusch",
]


@dataclass(frozen=True)
class SolverOptions:
    """How the monomials solve ``M^dagger M x = b``: CG to relative residual ``tol`` (at most
    ``maxiter`` iterations), with ``mixed_precision`` by :func:`cg_mixed` (complex64 inner solves
    to ``inner_tol``, float64 residuals) when the links are complex128."""

    tol: float = 1e-10
    maxiter: int = 10_000
    mixed_precision: bool = False
    inner_tol: float = 1e-5


class FermionMatrix:
    """The operator a pseudofermion sees: ``M = D`` (full lattice) or ``M = D_hat`` (even sites).

    ``D_hat = D_ee - D_eo D_oo^{-1} D_oe`` of :class:`EvenOdd`; its fields are the packed
    even-site fields ``(batch, V/2, spin, colour)``.
    """

    def __init__(self, fermions: WilsonFermions, links: torch.Tensor, even_odd: bool = False):
        self.fermions = fermions
        self.links = links
        self.op = fermions.operator(links)
        self.eo = EvenOdd(self.op) if even_odd else None
        self._low: FermionMatrix | None = None

    @property
    def even_odd(self) -> bool:
        return self.eo is not None

    @property
    def field_shape(self) -> tuple[int, ...]:
        shape = self.op.field_shape
        if self.eo is None:
            return shape
        return (shape[0], math.prod(self.op.lattice_shape) // 2, *shape[-2:])

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.apply(x) if self.eo is None else self.eo.schur(x)

    __call__ = apply

    def apply_dagger(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.apply_dagger(x) if self.eo is None else self.eo.schur_dagger(x)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``M^dagger M x``."""
        return self.apply_dagger(self.apply(x))

    def low(self, dtype: torch.dtype = torch.complex64) -> FermionMatrix:
        """The same operator in ``dtype`` (cached): the inner operator of mixed-precision solves."""
        if self._low is None or self._low.dtype != dtype:
            self._low = FermionMatrix(self.fermions, self.links.detach().to(dtype), self.eo is not None)
        return self._low

    def dense(self) -> torch.Tensor:
        """``M`` as a dense matrix (small lattices; the packed even-site order for ``D_hat``)."""
        return self.op.dense() if self.eo is None else self.eo.schur_dense()

    def full_fields(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-lattice ``(L, R)`` with ``Re<left, dM right> = Re<L, dD R>`` (the fields themselves for ``M = D``)."""
        if self.eo is None:
            return left, right
        eo, g5 = self.eo, self.op.gamma5
        r_o = eo.d_oo_inv(eo.d_oe(right))
        l_o = g5(eo.d_oo_inv(eo.d_oe(g5(left))))
        return eo.join(left, -l_o), eo.join(right, -r_o)

    def derivative(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The algebra element ``G`` with ``d/d eps Re<left, M right> = tr(T G)`` at fixed fields."""
        big_l, big_r = self.full_fields(left.detach(), right.detach())
        g = hopping_derivative(self.op, big_l, big_r)
        if self.fermions.csw != 0.0:
            g = g + _clover_derivative(self.fermions, self.links.detach(), big_l, big_r)
        return g


def _noise(shape, generators, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``exp(-eta^dagger eta)`` noise: from one generator for the batch, or chain ``c`` from ``generators[c]``."""
    if isinstance(generators, (list, tuple)):
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]} chains")
        return torch.cat([gaussian_fermion((1, *shape[1:]), g, dtype, device) for g in generators])
    return gaussian_fermion(shape, generators, dtype, device)


class Monomial:
    """One term of the fermion action.

    ``refresh(links, generators)`` draws the auxiliary field (if any) at the start of a
    trajectory; ``action(links)`` (``(batch,)``) and ``force(links)`` (algebra-valued, ``(batch, d,
    *L, N, N)``) use it until the next refresh. ``log_weight_dense(links)``: ``log`` of the factor
    of ``det(D^dagger D)`` this monomial carries, ``-log det Q`` for a Gaussian of kernel ``Q``
    (dense; small lattices; for checks). ``stats()``: solver iterations (the batch's maximum,
    summed over solves) and seconds since the last call.
    """

    name = "monomial"

    def __init__(self) -> None:
        self.iterations, self.seconds, self.solves = 0, 0.0, 0

    def refresh(self, links: torch.Tensor, generators=None) -> None:
        """Draw the auxiliary field (nothing for a monomial without one)."""

    def action(self, links: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def force(self, links: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_weight_dense(self, links: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        out = {"cg_iterations": self.iterations, "solve_seconds": self.seconds, "solves": self.solves}
        self.iterations, self.seconds, self.solves = 0, 0.0, 0
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class _PseudofermionMonomial(Monomial):
    """A Gaussian monomial ``phi^dagger Q(U) phi`` with its field ``phi`` and solver."""

    def __init__(self, even_odd: bool, solver: SolverOptions | None):
        super().__init__()
        self.even_odd = bool(even_odd)
        self.solver = solver or SolverOptions()
        self.phi: torch.Tensor | None = None

    def _field(self, links: torch.Tensor) -> torch.Tensor:
        if self.phi is None or self.phi.shape[0] != links.shape[0]:
            raise RuntimeError(f"{self!r}: refresh(links, generators) must draw the pseudofermion before the "
                               "action or force is evaluated")
        return self.phi

    def solve(self, m: FermionMatrix, b: torch.Tensor) -> torch.Tensor:
        """``(M^dagger M)^{-1} b`` to the solver tolerance (mixed precision if asked and useful)."""
        s = self.solver
        t0 = time.perf_counter()
        if s.mixed_precision and b.dtype == torch.complex128:
            low = m.low()
            r: SolveResult = cg_mixed(m.normal, b, low.normal, tol=s.tol, maxiter=s.maxiter, inner_tol=s.inner_tol)
        else:
            r = cg(m.normal, b, tol=s.tol, maxiter=s.maxiter)
        self.iterations += int(r.iterations.max().item()) if r.iterations.numel() else 0
        self.seconds += time.perf_counter() - t0
        self.solves += 1
        return r.x


class TwoFlavourMonomial(_PseudofermionMonomial):
    """``S = phi^dagger (M^dagger M)^{-1} phi`` with ``M = D(kappa)`` or ``D_hat(kappa)``; heat bath
    ``phi = M^dagger eta``; factor ``det(M^dagger M)``."""

    def __init__(self, fermions: WilsonFermions, even_odd: bool = False, solver: SolverOptions | None = None):
        super().__init__(even_odd, solver)
        self.fermions = fermions
        self.name = f"{'eo_' if even_odd else ''}pf(kappa={fermions.kappa:g})"

    def matrix(self, links: torch.Tensor) -> FermionMatrix:
        return FermionMatrix(self.fermions, links, self.even_odd)

    def refresh(self, links: torch.Tensor, generators=None) -> torch.Tensor:
        m = self.matrix(links.detach())
        eta = _noise(m.field_shape, generators, m.dtype, m.device)
        self.phi = m.apply_dagger(eta)
        return self.phi

    def action(self, links: torch.Tensor) -> torch.Tensor:
        phi = self._field(links)
        x = self.solve(self.matrix(links.detach()), phi)
        return inner(phi, x).real

    def force(self, links: torch.Tensor) -> torch.Tensor:
        phi = self._field(links)
        m = self.matrix(links.detach())
        x = self.solve(m, phi)
        return -2.0 * m.derivative(m.apply(x), x)

    def kernel_dense(self, links: torch.Tensor) -> torch.Tensor:
        """Dense ``Q = (M^dagger M)^{-1}``."""
        m = self.matrix(links).dense()
        return torch.linalg.inv(m.conj().transpose(-1, -2) @ m)

    def log_weight_dense(self, links: torch.Tensor) -> torch.Tensor:
        """``log det(M^dagger M) = 2 log|det M|``."""
        return 2.0 * torch.linalg.slogdet(self.matrix(links).dense())[1]


class HasenbuschRatioMonomial(_PseudofermionMonomial):
    """``S = phi^dagger M (N^dagger N)^{-1} M^dagger phi`` with ``M = M(kappa_heavy)``, ``N = M(kappa_light)``;
    heat bath ``phi = M^{-dagger} N^dagger eta``; factor ``det(N^dagger N) / det(M^dagger M)``."""

    def __init__(self, heavy: WilsonFermions, light: WilsonFermions, even_odd: bool = False,
                 solver: SolverOptions | None = None):
        super().__init__(even_odd, solver)
        self.heavy, self.light = heavy, light
        self.name = f"{'eo_' if even_odd else ''}ratio(kappa={light.kappa:g}/{heavy.kappa:g})"

    def matrices(self, links: torch.Tensor) -> tuple[FermionMatrix, FermionMatrix]:
        return FermionMatrix(self.heavy, links, self.even_odd), FermionMatrix(self.light, links, self.even_odd)

    def refresh(self, links: torch.Tensor, generators=None) -> torch.Tensor:
        m, n = self.matrices(links.detach())
        eta = _noise(m.field_shape, generators, m.dtype, m.device)
        # phi = M^{-dagger} w with w = N^dagger eta, and M^{-dagger} = M (M^dagger M)^{-1}
        self.phi = m.apply(self.solve(m, n.apply_dagger(eta)))
        return self.phi

    def action(self, links: torch.Tensor) -> torch.Tensor:
        phi = self._field(links)
        m, n = self.matrices(links.detach())
        chi = m.apply_dagger(phi)
        return inner(chi, self.solve(n, chi)).real

    def force(self, links: torch.Tensor) -> torch.Tensor:
        phi = self._field(links)
        m, n = self.matrices(links.detach())
        x = self.solve(n, m.apply_dagger(phi))
        return 2.0 * m.derivative(phi, x) - 2.0 * n.derivative(n.apply(x), x)

    def kernel_dense(self, links: torch.Tensor) -> torch.Tensor:
        """Dense ``Q = M (N^dagger N)^{-1} M^dagger``."""
        m, n = (a.dense() for a in self.matrices(links))
        return m @ torch.linalg.solve(n.conj().transpose(-1, -2) @ n, m.conj().transpose(-1, -2))

    def log_weight_dense(self, links: torch.Tensor) -> torch.Tensor:
        """``log det(N^dagger N) - log det(M^dagger M)``."""
        m, n = (a.dense() for a in self.matrices(links))
        return 2.0 * (torch.linalg.slogdet(n)[1] - torch.linalg.slogdet(m)[1])


class SiteLogDetMonomial(Monomial):
    """``S = -2 log|det A_oo|``: the odd-site clover blocks ``D_oo = A_oo`` that even/odd
    preconditioning leaves out of the Schur complement (factor ``|det D_oo|^2``). No auxiliary field;
    force by autograd of the clover field strengths at fixed ``A^{-1}`` (module docstring)."""

    def __init__(self, fermions: WilsonFermions, parity: int = ODD):
        super().__init__()
        if fermions.csw == 0.0:
            raise ValueError("the site-block log-determinant is a constant (zero) without the clover term")
        self.fermions, self.parity = fermions, int(parity)
        self.name = f"logdet_{'oo' if parity == ODD else 'ee'}(kappa={fermions.kappa:g}, csw={fermions.csw:g})"

    def _blocks(self, links: torch.Tensor) -> tuple[EvenOdd, torch.Tensor]:
        eo = EvenOdd(self.fermions.operator(links))
        return eo, eo.op.site_matrices()[:, eo.masks[self.parity]]

    def action(self, links: torch.Tensor) -> torch.Tensor:
        _, a = self._blocks(links)
        logabs = torch.linalg.slogdet(a)[1].sum(1)
        return -2.0 * site_sum(logabs, ())

    def log_weight_dense(self, links: torch.Tensor) -> torch.Tensor:
        return -self.action(links)

    def force(self, links: torch.Tensor) -> torch.Tensor:
        links = links.detach()
        eo = EvenOdd(self.fermions.operator(links))
        op = eo.op
        d, s, n = op.d, op.n_spin, op.n_colour
        mask = eo.masks[self.parity].to(op.dtype)
        ainv = torch.linalg.inv(op.site_matrices())
        ainv = (ainv * mask[..., None, None]).reshape(*ainv.shape[:-2], s, n, s, n)  # [.., b, j, a, i]
        sig = sigma_munu(d, dtype=op.dtype, device=op.device)
        planes = [(mu, nu) for mu in range(d) for nu in range(mu + 1, d)]
        # tr(A^{-1} dA) = -csw kappa sum_{mu<nu} tr(dF_{mu nu} W_{mu nu}), W[j, i] = sum_ab sig[a, b] A^{-1}[(b, j), (a, i)]
        w = {p: torch.einsum("ab,...bjai->...ji", sig[p], ainv) for p in planes}
        sites = tuple(range(1, d + 1))
        coef = self.fermions.csw * self.fermions.kappa

        def surrogate(u: torch.Tensor) -> torch.Tensor:
            total = None
            for (mu, nu), wp in w.items():
                f = clover_field_strength(u, mu, nu)
                t = site_sum(torch.einsum("...ij,...ji->...", f, wp).real, sites)
                total = t if total is None else total + t
            return 2.0 * coef * total  # = -2 Re sum tr(A^{-1} A(u)) + const

        return autograd_link_force(surrogate, links)


def check_hasenbusch(kappa: float, hasenbusch, key: str = "theory.hasenbusch") -> list[float]:
    """The Hasenbusch kappas as floats: positive, strictly increasing, each below ``kappa``
    (``ValueError`` naming ``key`` otherwise)."""
    if hasenbusch is None:
        return []
    if isinstance(hasenbusch, (str, bytes)) or not hasattr(hasenbusch, "__iter__"):
        raise ValueError(f"{key} must be a list of hopping parameters kappa_1 < ... < kappa_n < kappa, "
                         f"got {hasenbusch!r}")
    out = []
    for k in hasenbusch:
        try:
            out.append(float(k))
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a list of numbers, got {list(hasenbusch)!r}") from None
    if not all(math.isfinite(k) and k > 0 for k in out):
        raise ValueError(f"{key}={out}: every Hasenbusch kappa must be a positive finite number")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"{key}={out}: the Hasenbusch kappas must increase (heaviest first, kappa_1 < ... < kappa_n)")
    if out and out[-1] >= kappa:
        raise ValueError(f"{key}={out}: every Hasenbusch kappa must be below theory.kappa={kappa} (a heavier "
                         "quark)")
    return out


def build_monomials(fermions: WilsonFermions, even_odd: bool = False, hasenbusch=(),
                    solver: SolverOptions | None = None) -> list[Monomial]:
    """The monomials of ``det(D^dagger D)`` (module docstring), in the order their fields are drawn:
    ``[pf(kappa_1), ratio(kappa_1 -> kappa_2), ..., ratio(kappa_n -> kappa)]`` plus, with even/odd
    and clover, the ``-2 log|det D_oo|`` term. Without Hasenbusch kappas: one pseudofermion of ``kappa``."""
    kappas = [*check_hasenbusch(fermions.kappa, hasenbusch), fermions.kappa]
    levels = [WilsonFermions(k, fermions.csw, fermions.boundary) for k in kappas[:-1]] + [fermions]
    out: list[Monomial] = [TwoFlavourMonomial(levels[0], even_odd, solver)]
    out += [HasenbuschRatioMonomial(h, l, even_odd, solver) for h, l in itertools.pairwise(levels)]
    if even_odd and fermions.csw != 0.0:
        out.append(SiteLogDetMonomial(fermions, ODD))
    return out

