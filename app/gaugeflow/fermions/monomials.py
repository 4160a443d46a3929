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

from gaugeflow.fermions.evenodd import EVEN, ODD, EvenOdd
from gaugeflow.fermions.fields import gaussian_fermion, inner
from gaugeflow.fermions.force import (
    _clover_derivative,
    clover_contraction_force,
    hopping_derivative,
)
from gaugeflow.fermions.gamma import sigma_munu
from gaugeflow.fermions.solvers import SolveResult, cg, cg_mixed
from gaugeflow.fermions.wilson import (
    WilsonDirac,
    WilsonFermions,
    _mul_internal,
    _shift_internal,
    from_internal,
    to_internal,
)
from gaugeflow.lattice import checkerboard
from gaugeflow.lattice.geometry import global_shape, site_sum

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


class _HalfLattice:
    """A dedicated half-lattice stencil for the Schur complement (single-process lattices).

    Fields of one parity are held in the operator's internal spin-colour-major layout, packed
    along time: ``(batch, S, C, L_0, ..., L_{d-2}, L_t/2)``, the site ``(x', t = 2j + b)`` at
    ``(x', j)`` with ``b = (P - parity(x', 0)) mod 2`` fixed by the parity P; this is
    :class:`EvenOdd`'s packed order. A neighbour in a direction ``mu < t`` sits at the same
    ``(x' +- mu, j)``; in time at ``j`` or ``j +- 1`` depending on ``b``. The hopping term is
    spin-projected as in :meth:`WilsonDirac.hop` (it uses that operator's internal blocks) and
    costs half the full-lattice hop.
    """

    def __init__(self, op: WilsonDirac):
        self.op = op
        d, lat = op.d, op.lattice_shape
        self.t = d - 1
        par = checkerboard(lat, device=op.device)[..., 0::2]  # parity of (x', 2j)
        self.bits = [((p - par) % 2).bool() for p in (EVEN, ODD)]
        self.u = [[self.pack(u, p) for u in op._u_in] for p in (EVEN, ODD)]
        self.udag = [[self.pack(u, p) for u in op._udag_in] for p in (EVEN, ODD)]
        self.a_ee = self.a_oo_inv = None
        blocks = op._site_blocks  # (batch, 2, K, K, *L) or None
        if blocks is not None:
            inv = torch.linalg.inv(blocks.movedim((2, 3), (-2, -1))).movedim((-2, -1), (2, 3)).contiguous()
            self.a_ee, self.a_oo_inv = self.pack(blocks, EVEN), self.pack(inv, ODD)

    def pack(self, f: torch.Tensor, parity: int) -> torch.Tensor:
        """The sites of ``parity`` of ``(..., *L)`` as ``(..., *L', L_t/2)``."""
        pairs = f.unflatten(-1, (f.shape[-1] // 2, 2))
        return torch.where(self.bits[parity], pairs[..., 1], pairs[..., 0])

    def unpack(self, h: torch.Tensor, parity: int) -> torch.Tensor:
        """Inverse of :meth:`pack`, zeros on the other parity."""
        z = torch.zeros_like(h)
        b = self.bits[parity]
        return torch.stack([torch.where(b, z, h), torch.where(b, h, z)], dim=-1).flatten(-2)

    def _fwd(self, h: torch.Tensor, mu: int, out: int) -> torch.Tensor:
        """``h(x + mu)`` at the sites of parity ``out`` (``h`` on the other parity)."""
        if mu != self.t:
            return _shift_internal(h, mu, 1)
        return torch.where(self.bits[out], _shift_internal(h, mu, 1), h)

    def _bwd(self, h: torch.Tensor, mu: int, out: int) -> torch.Tensor:
        """``h(x - mu)`` at the sites of parity ``out``."""
        if mu != self.t:
            return _shift_internal(h, mu, -1)
        return torch.where(self.bits[out], h, _shift_internal(h, mu, -1))

    def hop(self, p: torch.Tensor, out: int) -> torch.Tensor:
        """``(H p)`` on the sites of parity ``out`` for ``p`` on the other parity (as ``WilsonDirac._hop``)."""
        op, half = self.op, self.op.n_spin // 2
        up = low = None
        for mu in range(op.d):
            perm_up, phase_up, perm_low, phase_low = op._proj[mu]
            g_up = p.index_select(1, perm_up) * phase_up
            x_up = p[:, :half]
            a = _mul_internal(self.u[out][mu], self._fwd(x_up - g_up, mu, out))
            b = self._bwd(_mul_internal(self.udag[1 - out][mu], x_up + g_up), mu, out)
            t_up = a + b
            t_low = (b - a).index_select(1, perm_low) * phase_low
            up = t_up if up is None else up.add_(t_up)
            low = t_low if low is None else low.add_(t_low)
        return torch.cat([up, low], dim=1)

    @staticmethod
    def site(a: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
        """Chirality blocks ``a`` ``(batch, 2, K, K, *Lh)`` applied site by site (identity for None)."""
        if a is None:
            return p
        q = p.reshape(p.shape[0], 2, -1, *p.shape[3:])
        out = a[:, :, :, 0] * q[:, :, 0:1]
        for j in range(1, q.shape[2]):
            out = out.addcmul_(a[:, :, :, j], q[:, :, j : j + 1])
        return out.view(p.shape)

    def schur(self, p: torch.Tensor) -> torch.Tensor:
        """``D_hat p = A_ee p - kappa^2 H_eo A_oo^{-1} H_oe p``."""
        k2 = self.op.kappa * self.op.kappa
        return self.site(self.a_ee, p) - k2 * self.hop(self.site(self.a_oo_inv, self.hop(p, ODD)), EVEN)


class FermionMatrix:
    """The operator a pseudofermion sees: ``M = D`` (full lattice) or ``M = D_hat`` (even sites).

    ``D_hat = D_ee - D_eo D_oo^{-1} D_oe`` is the Schur complement of :class:`EvenOdd`
    (``D_hat x = A x - kappa^2 H A^{-1} H x`` on the even sites). Its fields ("M-fields") are held
    in a format of this class: on a single-process lattice packed along time in the operator's
    internal layout (:class:`_HalfLattice`, half the flops of a full-lattice hop); inside a domain
    context (or with ``half_lattice=False``) full-lattice fields with zeros on the odd sites (``H``
    maps one parity onto the other, so no masking is needed; twice the flops). Convert with :meth:`from_packed` / :meth:`to_packed`
    (:class:`EvenOdd`'s ``(batch, V/2, spin, colour)``, the order of :meth:`dense`) and
    :meth:`to_full`; for ``M = D`` they are the identity on ``(batch, *L, spin, colour)`` fields.
    """

    def __init__(self, fermions: WilsonFermions, links: torch.Tensor, even_odd: bool = False,
                 half_lattice: bool | None = None):
        self.fermions = fermions
        self.links = links
        self.op = fermions.operator(links)
        self.eo = EvenOdd(self.op) if even_odd else None
        whole = global_shape(self.op.lattice_shape) == self.op.lattice_shape
        if half_lattice and not whole:
            raise ValueError("the half-lattice stencil is single-process (this lattice is a block of a decomposed one)")
        use_half = whole if half_lattice is None else bool(half_lattice)
        self.half = _HalfLattice(self.op) if self.eo is not None and use_half else None
        self._ainv: torch.Tensor | None = None
        self._low: FermionMatrix | None = None

    @property
    def even_odd(self) -> bool:
        return self.eo is not None

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the independent components: ``(batch, V/2, spin, colour)`` for ``D_hat``."""
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

    # -- field formats -----------------------------------------------------------------------------
    def from_packed(self, packed: torch.Tensor) -> torch.Tensor:
        """An M-field from :class:`EvenOdd`'s packed even-site field (the identity for ``M = D``)."""
        if self.eo is None:
            return packed
        if self.half is None:
            return self.eo.unpack(packed, EVEN)
        lat = self.op.lattice_shape
        return to_internal(packed.reshape(packed.shape[0], *lat[:-1], lat[-1] // 2, *packed.shape[-2:]))

    def to_packed(self, x: torch.Tensor) -> torch.Tensor:
        """:class:`EvenOdd`'s packed ``(batch, V/2, spin, colour)`` field of an M-field."""
        if self.eo is None:
            return x
        if self.half is None:
            return self.eo.pack(x, EVEN)
        full = from_internal(x)
        return full.reshape(full.shape[0], -1, *full.shape[-2:])

    def to_full(self, x: torch.Tensor) -> torch.Tensor:
        """The full-lattice ``(batch, *L, spin, colour)`` field of an M-field (zeros on the odd sites)."""
        if self.half is None:
            return x
        return from_internal(self.half.unpack(x, EVEN))

    # -- the operator --------------------------------------------------------------------------------
    def _site_inv(self, x: torch.Tensor) -> torch.Tensor:
        """``A^{-1} x`` site by site on a full-lattice field (the identity without clover)."""
        if self.fermions.csw == 0.0:
            return x
        if self._ainv is None:
            self._ainv = torch.linalg.inv(self.op.site_matrices())
        return self.op.apply_site_matrices(self._ainv, x)

    def _schur_full(self, x: torch.Tensor) -> torch.Tensor:
        op = self.op
        return op.site_term(x) - (op.kappa * op.kappa) * op.hop(self._site_inv(op.hop(x)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.eo is None:
            return self.op.apply(x)
        if self.half is None:
            return self._schur_full(x)
        return self.half.schur(x)

    __call__ = apply

    def _g5(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.gamma5(x) if self.half is None else self.op._g5(x, dim=1)

    def apply_dagger(self, x: torch.Tensor) -> torch.Tensor:
        """``M^dagger x = gamma_5 M gamma_5 x``."""
        if self.eo is None:
            return self.op.apply_dagger(x)
        return self._g5(self.apply(self._g5(x)))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``M^dagger M x``."""
        if self.eo is None:
            return self.op.normal(x)
        return self.apply_dagger(self.apply(x))

    def low(self, dtype: torch.dtype = torch.complex64) -> FermionMatrix:
        """The same operator in ``dtype`` (cached): the inner operator of mixed-precision solves."""
        if self._low is None or self._low.dtype != dtype:
            self._low = FermionMatrix(self.fermions, self.links.detach().to(dtype), self.eo is not None,
                                      self.half is not None)
        return self._low

    def dense(self) -> torch.Tensor:
        """``M`` as a dense matrix (small lattices; for ``D_hat`` in the packed order of :meth:`to_packed`)."""
        return self.op.dense() if self.eo is None else self.eo.schur_dense()

    # -- derivative -----------------------------------------------------------------------------------
    def full_fields(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-lattice ``(L, R)`` with ``Re<left, dM right> = Re<L, dD R>`` (the fields themselves for ``M = D``).

        ``R = r - D_oo^{-1} D_oe r = r + kappa A^{-1} H r`` and ``L = l + kappa gamma_5 A^{-1} H gamma_5 l``
        for the full-lattice ``r``, ``l`` (module docstring)."""
        if self.eo is None:
            return left, right
        op, g5 = self.op, self.op.gamma5
        r, l = self.to_full(right), self.to_full(left)
        big_r = r + op.kappa * self._site_inv(op.hop(r))
        big_l = l + op.kappa * g5(self._site_inv(op.hop(g5(l))))
        return big_l, big_r

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
        eta = m.from_packed(_noise(m.noise_shape, generators, m.dtype, m.device))
        self.phi = m.apply_dagger(eta)
        # S(U, phi) at the links of the refresh is |eta|^2 exactly (phi^dagger (M^dagger M)^{-1} phi with
        # phi = M^dagger eta): the trajectory's start action, no solve needed
        self.refresh_action = inner(eta, eta).real
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
        eta = m.from_packed(_noise(m.noise_shape, generators, m.dtype, m.device))
        # phi = M^{-dagger} w with w = N^dagger eta, and M^{-dagger} = M (M^dagger M)^{-1}
        self.phi = m.apply(self.solve(m, n.apply_dagger(eta)))
        # S = phi^dagger M (N^dagger N)^{-1} M^dagger phi = |eta|^2 at the links of the refresh (to the
        # solver's tolerance of phi)
        self.refresh_action = inner(eta, eta).real
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
        coef = self.fermions.csw * self.fermions.kappa
        # 2 coef sum tr(F W) = -2 Re sum tr(A^{-1} A(u)) + const
        return clover_contraction_force(links, w, 2.0 * coef)


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

