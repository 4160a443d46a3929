"""Continuous (ODE) gauge-equivariant flows for U(1) and SU(N) in any dimension, with exact densities.

After Bacchio, Kessel, Schaefer & Vaitl (arXiv:2212.08469) and Gerdes, de Haan, Bondesan & Cheng
(arXiv:2410.13161): the links follow the gauge-equivariant ODE

    dU_l/dt = Z_l(U, t) U_l,    t in [0, 1],  U(0) ~ Haar,

with ``Z_l`` the group gradient (projected to the Lie algebra) of a learned gauge-invariant
potential, a sum over Wilson loops (plaquettes, 2x1 rectangles, chairs) with coefficients that
depend on t (a Legendre expansion) and, with ``features=True``, on frozen gauge-invariant
features (traces of plaquettes) through a context network.

The map actually applied, and whose density is returned, is the *discretised* flow. It is built
from the masks of :mod:`gaugeflow.flows.masks` and the exponential per-link update of
:mod:`gaugeflow.flows.residual` (reused, not copied: every sub-step is a
:class:`~gaugeflow.flows.residual.ResidualCoupling` whose coefficients are ``h * c(t)``):

Vector field
------------
For a mask m with active links A_m, let ``phi_m(U, t) = sum_{l in A_m} sum_k c_{l,k}(t) Re tr(U_l S_{l,k})``
over the loops ``U_l S_{l,k}`` of the chosen types that hold exactly one active link (their
staples ``S`` and the context features are frozen). On an active link the (minus, in the
Frobenius metric) group gradient of phi_m is ``Z_l = P(U_l M_l)``, ``M_l = sum_k c_{l,k} S_{l,k}``,
which moves U_l alone. The ODE is ``dU/dt = F(U, t) = sum_m F_m(U, t)``, ``F_m`` this field on
A_m and zero elsewhere: each link belongs to one mask of the schedule, and there ``Z_l`` is
the gradient of a gauge-invariant loop potential. (With plaquettes only and coefficients that
depend on t and the loop type only, ``F`` is the gradient flow of ``sum_P c(t) Re tr P``,
Bacchio et al.'s potential; loops with two active links in a mask -- the 2x1 loops long across
mu -- are left out, as in the residual layer, so that each sub-step's Jacobian is per link.)

Integrator
----------
Step size ``h = 1 / n_steps``; coefficients at the midpoint ``t_s = (s + 1/2) h`` of step s.
``Phi^m_tau: U_l -> exp(tau Z_l(U)) U_l`` on A_m is the explicit Lie-Euler step of ``F_m``
(structure preserving: links stay in the group) and ``Phi*^m_tau`` its adjoint, the implicit step
``U_l' = exp(tau Z_l(U')) U_l`` (= the inverse of the explicit step with ``-tau``; a fixed-point
solve, as the residual layer's inverse). Schemes:

- ``strang`` (order 2): ``Psi_h = Psi*_{h/2} o Psi_{h/2}`` with
  ``Psi_tau = Phi^{m_K}_tau o ... o Phi^{m_1}_tau`` and its adjoint ``Psi*_tau = Phi*^{m_1}_tau o ...
  o Phi*^{m_K}_tau``: a symmetric composition of a consistent method, hence second order
  (Hairer, Lubich & Wanner, Geometric Numerical Integration, II.4 and IV.8).
- ``lie`` (order 1, the default): ``Psi_h`` (one explicit sweep over the masks per step). Sampling
  (and reverse-KL training) then needs no fixed-point solve; strang's implicit half costs one
  per mask and step, which dominated its training time on a CPU (docs/flows.md).

``tests/test_continuous_flow.py`` measures both orders against an RKMK4 (Munthe-Kaas) solution
of the same ODE.

Exact density
-------------
Every sub-step is an invertible per-link map with the residual layer's exact log-det
(``log det(1 + phi(ad_Z) L)``, ``log(1 + Re(U M))`` for U(1)), so ``log q`` is exact for the
discrete map -- no trace estimator anywhere. Invertibility: the coefficients are bounded,
``c = max_rate * r / sqrt(1 + K |r|^2)`` (K staples; ``sum_k |c_k| <= sqrt(K) |c| < max_rate``, and
smooth in r, so the ODE's field is smooth where ``r`` crosses zero), and a sub-step of
size tau has Lipschitz constant ``lambda = tau * sum_k |c_k| < tau * max_rate``; the builder
requires ``tau * max_rate <= max_step < 1`` (tau = h/2 for strang, h for lie), which makes
every explicit step a bijection and every implicit step a contraction
(:mod:`gaugeflow.flows.residual`, "Bound"). Each call checks ``lambda < 1`` (NaNs raise).

Gauge equivariance: features are gauge invariant and staples covariant, so every sub-step is
equivariant and ``log q`` gauge invariant; the masks have period 2, so the flow is
equivariant under translations by two sites.

Memory: ``checkpoint=True`` runs every integration step under ``torch.utils.checkpoint``
(non-reentrant): only the links between steps are kept, each step's internals are recomputed
in backward (gradients identical to the plain flow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from gaugeflow.flows.base import Flow, FlowLayer, FlowModel
from gaugeflow.flows.conv import ConvNet
from gaugeflow.flows.masks import GaugeMask, gauge_mask_schedule
from gaugeflow.flows.priors import HaarPrior
from gaugeflow.flows.residual import ResidualCoupling
from gaugeflow.groups import Group
from gaugeflow.groups.group import SU
from gaugeflow.lattice.geometry import site_max, site_sum

__all__ = ["SCHEMES", "ContinuousGaugeFlow", "MaskPotential", "continuous", "legendre"]

SCHEMES = ("strang", "lie")


def legendre(t: float, n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Legendre polynomials ``P_0 .. P_{n-1}`` at ``2 t - 1`` (t in [0, 1]), shape ``(n,)``."""
    x = 2.0 * float(t) - 1.0
    vals = [1.0, x][:n]
    for k in range(1, n - 1):
        vals.append(((2 * k + 1) * x * vals[k] - k * vals[k - 1]) / (k + 1))
    return torch.tensor(vals, dtype=dtype, device=device)


class _SU2(SU):
    """SU(2) whose ``exp`` has finite gradients at ``X = 0``.

    ``gaugeflow.groups``' closed-form SU(2) exponential differentiates ``sqrt(|a|^2)`` and gives NaN
    gradients at exactly ``X = 0``, which the residual inverse's Newton step meets whenever the
    fixed point is reached to the last bit (the continuous flow's implicit sub-steps do so in
    sampling). ``matrix_exp`` is exact to rounding too and smooth at 0. (Drop once the group's own
    exponential is fixed.)"""

    def __init__(self):
        super().__init__(2)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(x)


class _TimeTable(nn.Module):
    """Coefficients that depend on t only: ``raw_k(t) = sum_b a_{k b} P_b(2t - 1)``."""

    def __init__(self, n_staples: int, n_basis: int, zero_init: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_staples, n_basis) if zero_init
                                   else 0.1 * torch.randn(n_staples, n_basis))

    def forward(self) -> torch.Tensor:
        return self.weight


class MaskPotential(ResidualCoupling):
    """The loop potential of one mask, applied as a sub-step ``U_l -> exp(tau P(U_l M_l(t))) U_l``.

    A :class:`~gaugeflow.flows.residual.ResidualCoupling` (staples, exact per-link log-det,
    fixed-point inverse with its tolerance, cap and implicit gradients) whose coefficients are
    ``tau * c(t)``, with ``c(t, x) = max_rate * r / sqrt(1 + K |r|^2)`` (K staples) and
    ``r_k = sum_b raw_{k b}(x) P_b(2 t - 1)``; ``raw`` from a context net of the frozen plaquettes
    (``net_factory``) or, with ``net_factory=None``, a table of parameters (t only).
    Use :meth:`apply`, which fixes ``(t, tau)`` for the duration of one call.
    """

    def __init__(self, mask: GaugeMask, group: str | Group, n_basis: int,
                 net_factory: Callable[[int, int], nn.Module] | None, loops: Sequence[str],
                 max_step: float, max_rate: float, tol: float | None = None, max_iter: int = 1000,
                 zero_init: bool = False):
        n_basis = int(n_basis)
        if n_basis < 1:
            raise ValueError(f"model.n_basis must be >= 1, got {n_basis}")
        if net_factory is None:
            def factory(_c_in: int, k: int) -> nn.Module:
                return _TimeTable(k, n_basis, zero_init)
        else:
            def factory(c_in: int, k: int) -> nn.Module:
                return net_factory(c_in, k * n_basis)
        super().__init__(mask, group, factory, loops=loops, max_step=max_step, tol=tol, max_iter=max_iter)
        if self.group == SU(2):
            self.group = _SU2()
        self.n_basis, self.features, self.max_rate = n_basis, net_factory is not None, float(max_rate)
        self._at: tuple[float, float, bool] | None = None  # (t, tau, check the bound) during one call

    def __repr__(self) -> str:
        at = "" if self._at is None else f", t={self._at[0]:.4g}, tau={self._at[1]:+.4g}"
        return f"MaskPotential(mu={self.mu}, nu={self.nu}, offsets={self.offsets}{at})"

    def rates(self, links: torch.Tensor, t: float) -> torch.Tensor:
        """The ODE's coefficients ``c(t)``: ``(batch, A, n_staples)`` (``(n_staples,)`` without features)."""
        if self.features:
            raw = self.net(self.context(links)).movedim(1, -1)[:, self.link_mask]
            raw = raw.unflatten(-1, (len(self.staples), self.n_basis))
        else:
            raw = self.net()
        r = raw @ legendre(t, self.n_basis, raw.dtype, raw.device)
        # smooth (analytic) in r, unlike r / (1 + sum |r|): the ODE's field stays smooth in U and t
        return self.max_rate * r / torch.sqrt(1 + r.shape[-1] * r.square().sum(-1, keepdim=True))

    def coefficients(self, links: torch.Tensor) -> torch.Tensor:
        if self._at is None:
            raise RuntimeError(f"{self.name}: call apply(links, t, tau, inverse), not the layer itself")
        t, tau, check = self._at
        c = tau * self.rates(links, t)
        lam = c.detach().abs().sum(-1)
        # the whole lattice's largest (site_max): every block of a decomposed lattice raises or none
        lam_max = site_max(lam.max()) if check and lam.numel() else None
        if lam_max is not None and not bool(lam_max < 1):  # NaN fails too
            raise FloatingPointError(
                f"{self.name}: tau * sum_k |c_k| = {lam_max.item()} violates the invertibility bound < 1")
        return c

    def velocity(self, links: torch.Tensor, t: float) -> torch.Tensor:
        """The ODE's ``Z_l = P(U_l M_l(t))`` on the active links, ``(batch, A, N, N)``."""
        self._at = (float(t), 1.0, False)  # a rate, not a step: no invertibility bound to check
        try:
            m = self.staple_sum(links)
        finally:
            self._at = None
        return self.group.project(links[:, self.mu][:, self.link_mask] @ m)

    def apply(self, links: torch.Tensor, t: float, tau: float, inverse: bool = False):
        """``(links, per-site log|det|)`` of the sub-step of size ``tau`` at time ``t`` (or its inverse)."""
        self._at = (float(t), float(tau), True)
        try:
            return self.transform(links, inverse=inverse)
        finally:
            self._at = None


class ContinuousGaugeFlow(FlowLayer):
    """The discretised gauge ODE on [0, 1]: ``n_steps`` steps of ``scheme`` over the masks.

    Args:
        potentials: one :class:`MaskPotential` per mask of a schedule that updates every link once.
        n_steps: integration steps, ``h = 1 / n_steps``.
        scheme: ``strang`` (second order) or ``lie`` (first order); module docstring.
        checkpoint: run each step under ``torch.utils.checkpoint`` when gradients are needed.
    """

    def __init__(self, potentials: Sequence[MaskPotential], n_steps: int, scheme: str = "strang",
                 checkpoint: bool = False):
        super().__init__()
        if int(n_steps) < 1:
            raise ValueError(f"model.n_steps must be >= 1, got {n_steps}")
        if scheme not in SCHEMES:
            raise ValueError(f"model.scheme must be one of {list(SCHEMES)}, got {scheme!r}")
        self.potentials = nn.ModuleList(potentials)
        self.n_steps, self.scheme, self.checkpoint = int(n_steps), scheme, bool(checkpoint)

    @property
    def h(self) -> float:
        return 1.0 / self.n_steps

    @property
    def substep(self) -> float:
        """Size of one sub-step (``h / 2`` for strang, ``h`` for lie)."""
        return self.h / 2 if self.scheme == "strang" else self.h

    def vector_field(self, links: torch.Tensor, t: float) -> torch.Tensor:
        """The right-hand side ``Z(U, t)`` of the ODE, ``dU/dt = Z U``: algebra elements of the links' shape."""
        z = torch.zeros_like(links)
        for p in self.potentials:
            z_mu = z[:, p.mu]
            z_mu[:, p.link_mask] = p.velocity(links, t)
        return z

    def _sweeps(self, inverse: bool) -> list[tuple[list[MaskPotential], float, bool]]:
        """The sub-steps of one integration step: ``(potentials in order, tau, inverse transform)``."""
        ps = list(self.potentials)
        if self.scheme == "lie":
            return [(ps, self.h, False)] if not inverse else [(ps[::-1], self.h, True)]
        tau = self.h / 2
        if not inverse:  # explicit sweep m_1..m_K, then the adjoint (implicit) sweep m_K..m_1
            return [(ps, tau, False), (ps[::-1], -tau, True)]
        return [(ps, -tau, False), (ps[::-1], tau, True)]

    def _step(self, links: torch.Tensor, s: int, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t = (s + 0.5) * self.h
        total = links.new_zeros(links.shape[0], *links.shape[2:2 + links.shape[1]], dtype=links.real.dtype)
        for ps, tau, inv in self._sweeps(inverse):
            for p in ps:
                links, ld = p.apply(links, t, tau, inverse=inv)
                total = total + ld
        return links, total

    def _run(self, links: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        site = None
        steps = range(self.n_steps - 1, -1, -1) if inverse else range(self.n_steps)
        for s in steps:
            if self.checkpoint and torch.is_grad_enabled():
                links, ld = _checkpoint(self._step, links, s, inverse, use_reentrant=False)
            else:
                links, ld = self._step(links, s, inverse)
            site = ld if site is None else site + ld
        return links, site_sum(site.flatten(1), (1,))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(y, inverse=True)


def _substep(n_steps: int, scheme: str) -> float:
    return (0.5 if scheme == "strang" else 1.0) / int(n_steps)


def _rate(n_steps, scheme, max_step, max_rate) -> float:
    """``max_rate`` (null: ``max_step / substep``), checked against the invertibility bound."""
    tau = _substep(n_steps, scheme)
    if max_rate is None:
        return float(max_step) / tau
    max_rate = float(max_rate)
    if not max_rate > 0:
        raise ValueError(f"model.max_rate must be > 0, got {max_rate}")
    if max_rate * tau > float(max_step) * (1 + 1e-12):
        raise ValueError(
            f"model.max_rate * substep = {max_rate} * {tau:.4g} = {max_rate * tau:.4g} exceeds model.max_step = "
            f"{max_step}: a sub-step would not be provably invertible; raise n_steps or lower max_rate")
    return max_rate


def continuous(theory, dtype: torch.dtype = torch.float32, *, n_steps: int = 2, scheme: str = "lie",
               loops: Sequence[str] = ("plaquette", "rectangle"), n_basis: int = 4, features: bool = True,
               hidden: Sequence[int] = (8,), kernel_size: int = 3, activation: str = "leaky_relu",
               zero_init: bool = False, max_step: float = 0.9, max_rate: float | None = None,
               tol: float | None = None, max_iter: int = 1000, checkpoint: bool = False) -> FlowModel:
    """Continuous gauge-equivariant flow (Bacchio et al. 2212.08469, Gerdes et al. 2410.13161):
    ``dU/dt = Z(U, t) U`` with Z the group gradient of a loop potential whose coefficients depend on
    t (``n_basis`` Legendre polynomials) and, with ``features``, on frozen plaquettes; integrated by
    ``n_steps`` steps of ``scheme`` built from exact per-mask exponential updates, so ``log q`` is
    exact for the discrete map. See :mod:`gaugeflow.flows.continuous`."""
    if not theory.is_gauge:
        raise ValueError(f"model=continuous needs a gauge theory, got {theory.name}")
    if scheme not in SCHEMES:
        raise ValueError(f"model.scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if int(n_steps) < 1:
        raise ValueError(f"model.n_steps must be >= 1, got {n_steps}")
    if not 0.0 < float(max_step) < 1.0:
        raise ValueError(f"model.max_step must lie in (0, 1): the sub-steps are invertible for "
                         f"tau * sum_k |c_k| < 1, got {max_step}")
    rate = _rate(n_steps, scheme, max_step, max_rate)
    d = theory.lattice.ndim
    hidden = tuple(int(x) for x in hidden)

    def net(c_in: int, c_out: int) -> nn.Module:
        return ConvNet(c_in, c_out, hidden, kernel_size, d, activation=activation, zero_init=zero_init)

    pots = [MaskPotential(mask, theory.group, n_basis, net if features else None, tuple(loops), max_step,
                          rate, tol=tol, max_iter=max_iter, zero_init=zero_init)
            for mask in gauge_mask_schedule(theory.lattice.shape)]
    flow = ContinuousGaugeFlow(pots, n_steps, scheme, checkpoint)
    prior = HaarPrior(theory.group, theory.lattice.shape,
                      dtype=torch.complex64 if dtype == torch.float32 else torch.complex128)
    return FlowModel(prior, Flow([flow])).to(dtype)


def _resolve(theory, keys: dict) -> dict:
    """``max_rate: null`` is ``max_step / substep``: record the number."""
    n, scheme, ms = keys.get("n_steps", 2), keys.get("scheme", "lie"), keys.get("max_step", 0.9)
    if keys.get("max_rate") is None and scheme in SCHEMES and int(n) >= 1:
        return {**keys, "max_rate": float(ms) / _substep(n, scheme)}
    return keys


continuous.resolve_keys = _resolve
