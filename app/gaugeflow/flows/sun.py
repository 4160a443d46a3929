"""Gauge-equivariant spectral coupling layers for SU(N).

The layer of Boyda, Kanwar, Racaniere, Rezende, Albergo, Cranmer, Hackett & Shanahan,
"Sampling using SU(N) gauge equivariant flows", arXiv:2008.05456, in the d-dimensional
masking of Abbott et al., arXiv:2305.02402 (see :mod:`gaugeflow.flows.masks`).

For every *active* plaquette ``P = P_{mu nu}(x)`` (x in ``mask.links``) write
``P = V diag(e^{i theta}) V^dagger`` with the eigenphases in the canonical cell (below),
transform ``theta -> theta'`` with a flow of the cell whose parameters come from a network
that sees only gauge-invariant features of *frozen* plaquettes, keep ``V``, and set

    P' = V diag(e^{i theta'}) V^dagger,     U_mu(x) -> P' P^dagger U_mu(x).

Under ``U_mu(x) -> Omega(x) U_mu(x) Omega(x + mu)^dagger`` the plaquette is conjugated,
``V -> Omega(x) V`` and the phases do not change, so the layer is gauge equivariant and its
log-Jacobian gauge invariant. Since the staple of ``P`` holds no updated link, the update
realises ``P -> P'`` exactly.

Canonical cell
--------------
The conjugacy classes of SU(N) are the maximal torus modulo the Weyl group; for a simply
connected group this is the Weyl alcove: lifts ``theta_1 >= ... >= theta_N`` with
``sum_i theta_i = 0`` and ``theta_1 - theta_N <= 2 pi``. Every class has exactly one such lift
(:func:`canonical_phases`). Its ``N - 1`` independent coordinates are taken as the gaps
``g_i = theta_i - theta_{i+1}``, i < N, between neighbouring eigenvalues on the circle; with
the last gap ``g_N = 2 pi - sum_{i<N} g_i`` the cell is the simplex ``{g >= 0, sum g = 2 pi}``.
For SU(2) this is ``theta = g_1 / 2`` in ``[0, pi]`` (eigenvalues ``e^{+-i theta}``).

The cell flow (:class:`CanonicalCellSpline`) maps the simplex to the box ``[0, 1]^{N-1}`` by
stick breaking, ``z_k = g_k / r_k`` with the remaining stick ``r_k = 2 pi - sum_{j<k} g_j``,
applies monotone rational-quadratic splines of ``[0, 1]`` (Durkan et al. 1906.04032)
autoregressively, ``z'_k = s_k(z_k; a_k + sum_{j<k, m} B_{kjm} cos(m pi z_j))`` (a truncated
cosine series in the earlier coordinates, coefficients ``a, B`` per site from the network),
and maps back, ``g'_k = z'_k r'_k``. Stick breaking is a diffeomorphism of the open box onto
the open simplex; the autoregressive spline map is a triangular map of the box whose k-th
component is, for fixed ``z_{<k}``, an increasing bijection of ``[0, 1]`` (so it is invertible
coordinate by coordinate, with Jacobian the product of the diagonal slopes), so the composite
is a diffeomorphism of the open cell onto itself. The splines fix 0 and 1, so every face
``g_k = 0`` (``z_k = 0``) and ``g_N = 0`` (``z_j = 1``, after which the later ``z`` drop out)
is mapped bijectively onto itself: the map is a homeomorphism of the closed cell, the centre
elements (its vertices) are fixed points, degenerate eigenvalues stay degenerate and ``P'`` is
well defined there too. Independent splines per coordinate (``n_cond=0``) are the special
case without conditioning; the cosine conditioner only adds expressivity.

Jacobian
--------
Densities are w.r.t. the normalised Haar measure (DESIGN.md). The Weyl integration formula
``dU = J(theta) d^{N-1}theta dV / const`` (``dV`` on SU(N)/T) with

    J(theta) = prod_{i<j} |e^{i theta_i} - e^{i theta_j}|^2 = prod_{i<j} 4 sin^2((theta_i - theta_j)/2)

and ``U -> P = U S`` (right translation by the fixed staple, Haar invariant) give, per active
link,

    log|det| = log|det d theta'/d theta| + log J(theta') - log J(theta),

where ``theta -> g`` is linear with a constant Jacobian, so ``d theta'/d theta`` may be taken
in gap coordinates: ``log|det dg'/dg| = sum_k [log s_k'(z_k) + log r'_k - log r_k]``. The layer's
log-determinant is the sum over active links (no other link moves).

Exactly degenerate active plaquettes (``J = 0``, e.g. a cold start) are a null set: the layer
stays finite there (``J`` is clamped to the smallest normal number) and fixes such points
when the flow is the identity, but the log-determinant there is not the limiting value.

Learned active loops
--------------------
With ``active_loop="learned"`` the loop whose spectrum is transformed is no longer the plaquette
but ``W = U_mu(x) S~(x)`` with a learned staple

    S~ = Pi( S_0 + sum_{k>0} c_k(x) S_k ),     Pi(M) = Q e^{-i arg det Q / N},  M = Q H (polar),

``S_0`` the (mu, nu) plaquette staple (so ``U S_0 = P_{mu nu}(x)``) and ``S_k`` further staples of
``U_mu(x)`` (paths from ``x + mu`` back to ``x``: the other plaquette staples, the 2x1 loops long
along mu, chairs in d > 2; :func:`gaugeflow.flows.residual.staple_paths`). The staples enter only
if they hold **no updated link** (no ``U_mu(y)`` with y in ``mask.links``; checked on the mask when
the layer is built, see :func:`active_loop_staples`; with the masks of :mod:`gaugeflow.flows.masks`
every plaquette and 2x1 staple passes, chairs that cross the mask plane twice are dropped), and the
real coefficients ``c_k`` come from the context network of frozen, gauge-invariant features. So
``S~`` is fixed while ``U_mu(x)`` moves, ``W`` holds the active link once, ``U -> W = U S~`` is a right
translation (Haar invariant), and the spectral map ``W -> W'`` with ``U' = W' S~^dagger`` has exactly the
log-det above. ``S~`` transforms as ``Omega(x + mu) S~ Omega(x)^dagger`` (the polar factor is
covariant and ``det Q`` invariant), so ``W`` is conjugated at x and the layer stays equivariant.

The coefficients are bounded, ``c_k = b r_k / (1 + sum_j |r_j|)`` with the network outputs ``r`` and
``b = loop_mix sin(pi / N)``, ``0 < loop_mix < 1``. Then ``M = S_0 (1 + X)`` with
``||X||_2 <= sum |c_k| < b < 1``: ``M`` is invertible (its polar factor unique and smooth, singular
values ``>= 1 - b``), and each eigenvalue of ``1 + X`` has ``|arg| < arcsin b``, so
``|arg det Q| < N arcsin b < pi``: the principal branch of ``arg det`` never jumps and ``S~`` is a
smooth function of the frozen links. Zero network outputs give ``S~ = S_0``, the plaquette
coupling. The polar factor is differentiated in closed form (:class:`_PolarFactor`, through a
Sylvester equation with denominators ``s_i + s_j >= 2 (1 - b)``), finite at degenerate singular values.

Gradients
---------
The update ``R = V diag(e^{i delta}) V^dagger`` does not depend on the phases of the columns of ``V``
nor on the basis chosen inside a degenerate eigenspace, but autograd through ``eigh`` sees ``V``
alone: its backward divides rounding noise by eigenvalue gaps and raises
(``linalg_eigh_backward: ... ill-defined``) once float32 rounding of a large ``dL/dV`` looks like a
dependence on the phases (4d SU(3) training did). So ``V`` is used detached, the eigenphases carry
their own gradient (:meth:`Group.eig`; ``d phi_k = Im(conj(z_k) v_k^dagger dP v_k)``, no gaps), and the
dependence of ``R`` on ``P`` at fixed ``delta`` is differentiated in closed form
(:class:`_SpectralRotation`): in the eigenbasis, ``dR = L o (V^dagger dP V)`` off the diagonal with the
divided differences ``L_jk = (e^{i delta_k} - e^{i delta_j}) / (e^{i theta_k} - e^{i theta_j})`` (Daleckii-Krein),
evaluated as a ratio of sines of half phase differences. ``L`` is bounded (the cell map keeps
degenerate pairs degenerate) and finite at exact degeneracies, so the gradient is finite on
every input, identity and centre links included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from gaugeflow.flows.base import SiteLogDetLayer
from gaugeflow.flows.lcnn import masked_links
from gaugeflow.flows.masks import GaugeMask
from gaugeflow.flows.residual import (
    Step,
    _LinkShifts,
    _path_links,
    _shift_to,
    _staple,
    plaquette_features_per_plane,
    plaquette_trace_features,
    staple_paths,
)
from gaugeflow.flows.splines import rational_quadratic_spline
from gaugeflow.groups import SU, Group, get_group
from gaugeflow.groups.matrix import dagger
from gaugeflow.observables.loops import plaquette

__all__ = [
    "ACTIVE_LOOPS",
    "CanonicalCellSpline",
    "SUNPlaquetteCoupling",
    "active_loop_staples",
    "canonical_phases",
    "log_weyl_density",
    "phase_shift_from_gaps",
    "su_projection",
]

TWO_PI = 2 * math.pi
ACTIVE_LOOPS = ("plaquette", "learned")


# ----------------------------------------------------------------------------- canonical cell
def canonical_phases(phases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lift eigenphases of SU(N) elements into the canonical cell.

    ``phases`` ``(..., N)`` in any order with ``sum = 0 (mod 2 pi)``, e.g. principal ones from
    :meth:`Group.eig`. Returns ``(theta, perm)`` with ``theta_1 >= ... >= theta_N``,
    ``sum theta = 0`` and ``theta_1 - theta_N <= 2 pi``, and ``theta[..., i] = phases[..., perm[..., i]]``
    modulo 2 pi (so ``perm`` reorders the eigenvectors to match).

    Principal phases sorted in descending order already span less than 2 pi and sum to
    ``2 pi k``; moving the k largest down by 2 pi (k > 0) or the -k smallest up (k < 0) keeps the
    span below 2 pi and makes the sum zero: a cyclic rotation of the sorted list.
    """
    n = phases.shape[-1]
    srt, perm = torch.sort(phases, dim=-1, descending=True, stable=True)
    k = torch.round(phases.sum(-1) / TWO_PI).to(torch.long)
    idx = torch.arange(n, device=phases.device) + k[..., None]
    wrap = torch.div(idx, n, rounding_mode="floor")
    j = idx - n * wrap
    theta = srt.gather(-1, j) - TWO_PI * wrap.to(phases.dtype)
    return theta, perm.gather(-1, j)


def phase_shift_from_gaps(dg: torch.Tensor) -> torch.Tensor:
    """Phase changes ``(..., N)`` with zero sum whose gap changes are ``dg`` ``(..., N-1)``.

    ``theta_i = theta_1 - c_i`` with ``c_i = sum_{j<i} g_j``; ``sum theta = 0`` fixes
    ``theta_1 = mean(c)``, so ``theta = mean(c) - c`` is linear in the gaps.
    """
    c = torch.cat([torch.zeros_like(dg[..., :1]), torch.cumsum(dg, dim=-1)], dim=-1)
    return c.mean(-1, keepdim=True) - c


def log_weyl_density(gaps: torch.Tensor) -> torch.Tensor:
    """``log J = sum_{i<j} log 4 sin^2((theta_i - theta_j)/2)`` from the gaps ``(..., N-1)``.

    ``theta_i - theta_j`` (i < j) is a sum of consecutive gaps, in ``[0, 2 pi]``, so the sines are
    non-negative; they are clamped to the smallest normal number at degeneracies.
    """
    n = gaps.shape[-1] + 1
    c = torch.cat([torch.zeros_like(gaps[..., :1]), torch.cumsum(gaps, dim=-1)], dim=-1)
    i, j = torch.triu_indices(n, n, 1, device=gaps.device)
    chord = (2 * torch.sin(0.5 * (c[..., j] - c[..., i]))).clamp_min(torch.finfo(gaps.dtype).tiny)
    return 2 * torch.log(chord).sum(-1)


def _stick_grad_guard(rem: torch.Tensor, value: torch.Tensor, fn: Callable) -> torch.Tensor:
    """``value`` (a function of the remaining stick ``rem``, computed with ``rem`` clamped at the
    smallest normal number) with its gradient taken as that of ``fn(max(rem, eps))``.

    Why: at the vertices of the cell other than the identity (centre elements, e.g. gaps
    ``(2 pi, 0)`` for SU(3)) the stick is used up, ``rem = 0``, and ``g / rem``, ``log rem`` have
    derivatives ``1 / tiny``: inf times anything in float32, then NaN in every earlier layer. The
    value is left as it was (so the map and its log-det do not change); only where ``rem < eps``,
    which rounding alone produces, the gradient through this step is dropped.
    """
    thr = torch.finfo(rem.dtype).eps
    live = rem > thr
    return torch.where(live, fn(rem.clamp_min(thr)), value.detach())


class CanonicalCellSpline(nn.Module):
    """Autoregressive stick-breaking spline flow of the SU(N) canonical cell (module docstring).

    ``forward(gaps, params, inverse=False) -> (new_gaps, log|det d new_gaps / d gaps|)`` with
    ``gaps`` ``(..., N-1)`` and unconstrained ``params`` ``(..., n_params)``. Per coordinate
    k = 0..N-2 the parameters hold a spline block ``a_k`` (``3 n_bins + 1``: widths, heights,
    knot slopes as :func:`rational_quadratic_spline` takes them) followed by ``k * n_cond``
    blocks ``B_{kjm}`` multiplying ``cos(m pi z_j)``, m = 1..n_cond. All-zero parameters give
    the identity.
    """

    def __init__(self, n: int, n_bins: int = 8, n_cond: int = 2):
        super().__init__()
        if n < 2:
            raise ValueError(f"the canonical cell needs N >= 2, got {n}")
        if n_bins < 1 or n_cond < 0:
            raise ValueError(f"need n_bins >= 1 and n_cond >= 0, got {n_bins}, {n_cond}")
        self.n, self.n_bins, self.n_cond = int(n), int(n_bins), int(n_cond)

    @staticmethod
    def count(n: int, n_bins: int = 8, n_cond: int = 2) -> int:
        """Number of parameters per site."""
        block = 3 * n_bins + 1
        return block * ((n - 1) + n_cond * (n - 1) * (n - 2) // 2)

    @property
    def n_params(self) -> int:
        return self.count(self.n, self.n_bins, self.n_cond)

    def extra_repr(self) -> str:
        return f"N={self.n}, n_bins={self.n_bins}, n_cond={self.n_cond}"

    # simplex <-> box ----------------------------------------------------------------
    @staticmethod
    def to_box(gaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stick breaking ``z_k = g_k / r_k``; returns ``(z, sum_k log r_k) = (z, log det dg/dz)``."""
        tiny = torch.finfo(gaps.dtype).tiny
        rem = torch.full_like(gaps[..., 0], TWO_PI)
        zs, log_rem = [], torch.zeros_like(rem)
        for k in range(gaps.shape[-1]):
            r = rem.clamp_min(tiny)
            z = (gaps[..., k] / r).clamp(0.0, 1.0)
            zs.append(_stick_grad_guard(rem, z, lambda q, k=k: (gaps[..., k] / q).clamp(0.0, 1.0)))
            log_rem = log_rem + _stick_grad_guard(rem, torch.log(r), torch.log)
            # rounding can push the remaining stick a hair below zero at the far face
            rem = (rem - gaps[..., k]).clamp_min(0.0)
        return torch.stack(zs, dim=-1), log_rem

    @staticmethod
    def from_box(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`to_box`: ``g_k = z_k r_k`` with ``r_{k+1} = r_k (1 - z_k)``.

        Returns ``(g, sum_k log r_k)``.
        """
        tiny = torch.finfo(z.dtype).tiny
        rem = torch.full_like(z[..., 0], TWO_PI)
        gs, log_rem = [], torch.zeros_like(rem)
        for k in range(z.shape[-1]):
            gs.append(z[..., k] * rem)
            log_rem = log_rem + _stick_grad_guard(rem, torch.log(rem.clamp_min(tiny)), torch.log)
            rem = rem * (1.0 - z[..., k])
        return torch.stack(gs, dim=-1), log_rem

    # box -> box ------------------------------------------------------------------------
    def _spline_params(self, params: torch.Tensor, k: int, cond: torch.Tensor | None) -> torch.Tensor:
        """Raw spline parameters of coordinate k given the earlier *input* coordinates ``cond`` ``(..., k)``."""
        block = 3 * self.n_bins + 1
        off = block * (k + self.n_cond * k * (k - 1) // 2)
        raw = params[..., off:off + block]
        if k == 0 or self.n_cond == 0:
            return raw
        m = torch.arange(1, self.n_cond + 1, device=cond.device, dtype=cond.dtype)
        feats = torch.cos(math.pi * cond[..., :, None] * m).flatten(-2)  # (..., k * n_cond)
        coef = params[..., off + block:off + block * (1 + k * self.n_cond)]
        coef = coef.unflatten(-1, (k * self.n_cond, block))
        return raw + (feats[..., :, None] * coef).sum(-2)

    def box_map(self, z: torch.Tensor, params: torch.Tensor, inverse: bool = False):
        """The autoregressive spline map of ``[0, 1]^{N-1}``; returns ``(z', sum_k log |dz'_k/dz_k|)``.

        Coordinate k's spline is conditioned on the *input* coordinates ``z_{<k}`` of the forward
        map; the inverse recovers them one by one (a triangular map: Jacobian = diagonal product).
        """
        if params.shape[-1] != self.n_params:
            raise ValueError(f"expected {self.n_params} spline parameters per site, got {params.shape[-1]}")
        kb = self.n_bins
        out, logdet = [], torch.zeros_like(z[..., 0])
        for k in range(self.n - 1):
            cond = None
            if k > 0:
                cond = torch.stack(out, dim=-1) if inverse else z[..., :k]
            raw = self._spline_params(params, k, cond)
            y, ld = rational_quadratic_spline(
                z[..., k], raw[..., :kb], raw[..., kb:2 * kb], raw[..., 2 * kb:], inverse=inverse
            )
            out.append(y)
            logdet = logdet + ld
        return torch.stack(out, dim=-1), logdet

    def forward(self, gaps: torch.Tensor, params: torch.Tensor, inverse: bool = False):
        z, log_r_in = self.to_box(gaps)
        z_new, ld = self.box_map(z, params, inverse)
        new_gaps, log_r_out = self.from_box(z_new)
        return new_gaps, ld + log_r_out - log_r_in


class _SpectralRotation(torch.autograd.Function):
    """``(P, delta) -> R = V diag(e^{i delta}) V^dagger`` for ``P = V diag(e^{i theta}) V^dagger``.

    ``V`` and ``theta`` are passed in (detached) from the decomposition of ``P``; ``P`` itself only
    routes the gradient. Backward, with ``K = V^dagger G V`` for the incoming gradient ``G``:
    ``dL/d delta_k = Im(e^{-i delta_k} K_kk)`` and ``dL/dP = V (K o conj(L)) V^dagger`` with the divided
    differences (``w = e^{i delta}``, ``z = e^{i theta}``)

        L_jk = (w_k - w_j) / (z_k - z_j)
             = e^{i (delta_j + delta_k - theta_j - theta_k) / 2} sin((delta_k - delta_j) / 2) / sin((theta_k - theta_j) / 2),

    the derivative of ``R`` along ``P`` at fixed ``delta`` for any ``dP`` (eigenprojector
    perturbation of a normal matrix; ``L_kk`` = 0). No eigenvector phase enters. The cell map
    keeps degenerate pairs degenerate, so ``L`` is bounded; the sine in the denominator is
    clamped at ``1e3 eps`` (``s / max(s^2, tau^2)``), which sets ``L`` to 0 at exact degeneracies and
    changes it only on pairs closer than that.
    """

    @staticmethod
    def forward(ctx, p, delta, vecs, theta):  # p: only routes the gradient
        ctx.save_for_backward(vecs, theta, delta)
        return (vecs * torch.polar(torch.ones_like(delta), delta)[..., None, :]) @ dagger(vecs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_rot):
        vecs, theta, delta = ctx.saved_tensors
        k = dagger(vecs) @ g_rot @ vecs
        w_conj = torch.polar(torch.ones_like(delta), -delta)
        g_delta = (w_conj * k.diagonal(dim1=-2, dim2=-1)).imag
        tau = 1e3 * torch.finfo(theta.dtype).eps
        s = torch.sin(0.5 * (theta[..., None, :] - theta[..., :, None]))  # [j, k]: (theta_k - theta_j) / 2
        num = torch.sin(0.5 * (delta[..., None, :] - delta[..., :, None]))
        mag = num * s / torch.maximum(s * s, torch.full_like(s, tau * tau))
        arg = 0.5 * (delta[..., None, :] + delta[..., :, None] - theta[..., None, :] - theta[..., :, None])
        lo = mag * torch.polar(torch.ones_like(arg), arg)
        g_p = vecs @ (k * lo.conj()) @ dagger(vecs)
        return g_p, g_delta, None, None


class _PolarFactor(torch.autograd.Function):
    """Unitary polar factor ``Q`` of an invertible ``M = Q H`` (``H = (M^dagger M)^{1/2}``), from the SVD.

    Backward in closed form: ``dQ = Q Omega`` with anti-hermitian ``Omega`` solving
    ``H Omega + Omega H = Q^dagger dM - dM^dagger Q``; in the eigenbasis ``V`` of ``H`` (singular values ``s``)
    this divides by ``s_i + s_j``, so for an incoming gradient ``G``

        dL/dM = Q V [ (V^dagger (Q^dagger G - G^dagger Q) V) / (s_i + s_j) ] V^dagger.

    No singular vector phase enters and degenerate singular values are harmless (torch's SVD
    backward is undefined there, e.g. at ``M`` proportional to a unitary).
    """

    @staticmethod
    def forward(ctx, m):
        w, s, vh = torch.linalg.svd(m)
        q = w @ vh
        ctx.save_for_backward(q, dagger(vh), s)
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        q, v, s = ctx.saved_tensors
        a = dagger(q) @ g
        k = dagger(v) @ (a - dagger(a)) @ v
        k = k / (s[..., :, None] + s[..., None, :]).to(k.dtype)
        return q @ v @ k @ dagger(v)


def su_projection(m: torch.Tensor) -> torch.Tensor:
    """``Pi(M) = Q e^{-i arg det Q / N}``: the unitary polar factor of invertible ``M`` ``(..., N, N)`` with
    its determinant set to 1 (principal branch; smooth where ``|arg det Q| < pi``, module docstring)."""
    q = _PolarFactor.apply(m)
    phase = torch.angle(torch.linalg.det(q))
    return q * torch.polar(torch.ones_like(phase), -phase / m.shape[-1])[..., None, None]


def active_loop_staples(mask: GaugeMask, loops: Sequence[str]) -> list[tuple[Step, ...]]:
    """Staples of the learned active loop of ``mask``'s links: the (mu, nu) plaquette staple first,
    then those of :func:`gaugeflow.flows.residual.staple_paths` (``loops``) that hold no updated link.

    A staple of ``U_mu(x)`` passes links ``U_rho(x + r)``; only ``U_mu(y)``, y in ``mask.links``, move,
    so it is dropped when, for some active x, ``x + r`` is active too (``rho = mu``). Duplicates
    (the same set of links) are dropped. The mask has period 2, so this is decided on the mask once.
    """
    d, mu, nu = mask.links.dim(), mask.mu, mask.nu
    ref = ((nu, 1), (mu, -1), (nu, -1))  # U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger: U S_0 = P_{mu nu}(x)
    act = mask.links[None]  # shift works on (batch, *L)
    out, seen = [], set()
    for steps in [ref] + [st for _, st in staple_paths(d, mu, loops)]:
        path = _path_links(mu, steps, d)
        key = frozenset(path)
        if key in seen:
            continue
        if any(rho == mu and bool((act & _shift_to(act, off)).any()) for rho, off in path):
            if steps == ref:
                raise ValueError(f"the plaquette staple of mask {mask.offsets} holds an updated link")
            continue
        seen.add(key)
        out.append(steps)
    return out


# ----------------------------------------------------------------------------------- layer
class SUNPlaquetteCoupling(SiteLogDetLayer):
    """One SU(N) gauge-equivariant spectral coupling (Boyda et al. 2008.05456); see the module docstring.

    Args:
        mask: which links ``U_mu(x)`` are updated (through ``P_{mu nu}(x)``) and which
            plaquettes are frozen (:func:`gaugeflow.flows.masks.gauge_mask`).
        net: ``(batch, context_channels, *L) -> (batch, out_channels, *L)``, e.g. a
            :class:`gaugeflow.flows.conv.ConvNet`; ``zero_init=True`` makes the layer the identity.
            A net with ``takes_links = True`` (:class:`gaugeflow.flows.lcnn.LCNN`) is called as
            ``net(links, frozen_links)`` instead and reads the frozen links itself.
            ``out_channels = param_channels + n_mix`` (:meth:`n_mix`: 0 for the plaquette loop).
        group: an SU(N) group or its name (``"su2"``, ``"su3"``, ...).
        n_bins: spline bins per cell coordinate.
        n_cond: cosine features per earlier coordinate in the autoregressive conditioner.
        active_loop: ``"plaquette"`` (the loop is ``P_{mu nu}(x)``) or ``"learned"`` (module
            docstring, "Learned active loops").
        loops: staple types of the learned loop (``plaquette``, ``rectangle``, ``chair``).
        loop_mix: in (0, 1); bound ``sum_k |c_k| < loop_mix sin(pi / N)`` on the learned staple weights.

    Links are complex ``(batch, d, *L, N, N)``. ``forward``/``inverse`` return the links and
    ``log|det J|`` per configuration w.r.t. the normalised Haar measure; :meth:`transform`
    also gives the per-site contributions.
    """

    def __init__(self, mask: GaugeMask, net: nn.Module, group: str | Group, n_bins: int = 8, n_cond: int = 2,
                 active_loop: str = "plaquette", loops: Sequence[str] = ("plaquette", "rectangle"),
                 loop_mix: float = 0.9):
        super().__init__()
        group = get_group(group)
        if not isinstance(group, SU):
            raise ValueError(f"SUNPlaquetteCoupling needs an SU(N) group, got {group}")
        self.group = group
        self.mu, self.nu = mask.mu, mask.nu
        self.planes = list(mask.frozen)
        self.register_buffer("link_mask", mask.links.clone(), persistent=False)
        self.register_buffer("frozen", torch.stack([mask.frozen[p] for p in self.planes]), persistent=False)
        frozen_links = torch.ones((mask.links.dim(), *mask.links.shape), dtype=torch.bool, device=mask.links.device)
        frozen_links[mask.mu] = ~mask.links
        self.register_buffer("frozen_links", frozen_links, persistent=False)
        self.net = net
        self.cell = CanonicalCellSpline(group.N, n_bins, n_cond)
        self.active_loop = self.check_active_loop(active_loop)
        self.staples: list[tuple[Step, ...]] = []
        self.loop_bound = 0.0
        if self.active_loop == "learned":
            loop_mix = float(loop_mix)
            if not 0.0 < loop_mix < 1.0:
                raise ValueError(f"model.loop_mix must lie in (0, 1), got {loop_mix}")
            self.staples = active_loop_staples(mask, loops)
            self.loop_bound = loop_mix * math.sin(math.pi / group.N)

    @staticmethod
    def check_active_loop(active_loop: str) -> str:
        if active_loop not in ACTIVE_LOOPS:
            raise ValueError(f"model.active_loop must be one of {list(ACTIVE_LOOPS)}, got {active_loop!r}")
        return active_loop

    @property
    def n_mix(self) -> int:
        """Network channels that weigh the staples of a learned loop (all but the reference one)."""
        return max(len(self.staples) - 1, 0)

    # sizes of the network's input and output ----------------------------------------------
    @staticmethod
    def features_per_plane(n: int) -> int:
        # tr P^k of SU(2) is real: its imaginary part would be a channel of zeros
        return plaquette_features_per_plane(n)

    @classmethod
    def context_channels(cls, ndim: int, n: int) -> int:
        return ndim * (ndim - 1) // 2 * cls.features_per_plane(n)

    @staticmethod
    def param_channels(n: int, n_bins: int = 8, n_cond: int = 2) -> int:
        return CanonicalCellSpline.count(n, n_bins, n_cond)

    @classmethod
    def build(
        cls,
        mask: GaugeMask,
        group: str | Group,
        net_factory: Callable[[int, int], nn.Module],
        n_bins: int = 8,
        n_cond: int = 2,
        active_loop: str = "plaquette",
        loops: Sequence[str] = ("plaquette", "rectangle"),
        loop_mix: float = 0.9,
    ) -> SUNPlaquetteCoupling:
        """A layer whose network is ``net_factory(context_channels, param_channels + n_mix)``."""
        group = get_group(group)
        ndim = mask.links.dim()
        n_mix = 0
        if cls.check_active_loop(active_loop) == "learned":
            n_mix = len(active_loop_staples(mask, loops)) - 1
        net = net_factory(cls.context_channels(ndim, group.N), cls.param_channels(group.N, n_bins, n_cond) + n_mix)
        return cls(mask, net, group, n_bins, n_cond, active_loop, loops, loop_mix)

    # pieces ------------------------------------------------------------------------------
    def context(self, links: torch.Tensor) -> torch.Tensor:
        """Re (and for N > 2 Im) of ``tr P^k / N``, k = 1..N-1, of every plane's frozen plaquettes,
        zero elsewhere: ``(batch, context_channels, *L)``.

        By Newton's identities these power sums (with det P = 1) fix the spectrum, i.e. every
        gauge-invariant property of a single plaquette.
        """
        return plaquette_trace_features(links, self.planes, self.frozen, self.group.N)

    def net_output(self, links: torch.Tensor) -> torch.Tensor:
        """The context network's output ``(batch, out_channels, *L)``, from frozen links only."""
        if getattr(self.net, "takes_links", False):
            return self.net(links, self.frozen_links)
        return self.net(self.context(links))

    def loop_staple(self, links: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """``S~ = Pi(S_0 + sum_k c_k S_k)`` at the active sites ``(batch, A, N, N)`` from the raw network
        outputs ``raw`` ``(batch, A, n_mix)`` (module docstring); frozen in this layer."""
        u = masked_links(links, self.frozen_links)  # the staples hold no updated link (checked at build)
        shifts = _LinkShifts(u)  # one shift (halo exchange) per distinct link offset, not per staple link
        s = torch.stack([_staple(u, self.mu, steps, shifts)[:, self.link_mask] for steps in self.staples], dim=2)
        m = s[:, :, 0]
        if self.n_mix:
            c = self.loop_bound * raw / (1 + raw.abs().sum(-1, keepdim=True))
            m = m + (c.to(s.dtype)[..., None, None] * s[:, :, 1:]).sum(2)
        return su_projection(m)

    def active_loops(self, links: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """The loops ``W`` whose spectra the layer transforms, at the active sites ``(batch, A, N, N)``."""
        if self.active_loop == "plaquette":
            return plaquette(links, self.mu, self.nu)[:, self.link_mask]
        if raw is None:
            raw = self.net_output(links).movedim(1, -1)[:, self.link_mask][..., self.cell.n_params:]
        return links[:, self.mu][:, self.link_mask] @ self.loop_staple(links, raw)

    def transform(self, links: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_links, logdet)`` with the per-site log-determinant ``(batch, *L)`` (zero off the mask)."""
        mu, mask = self.mu, self.link_mask
        out = self.net_output(links).movedim(1, -1)[:, mask]  # (batch, A, n_params + n_mix)
        n_params = self.cell.n_params
        if out.shape[-1] != n_params + self.n_mix:
            raise ValueError(
                f"net gives {out.shape[-1]} channels, the cell flow needs {n_params} "
                f"(SUNPlaquetteCoupling.param_channels) and the active loop {self.n_mix}"
            )
        params = out[..., :n_params]
        # only active loops are diagonalised: cheaper, and degenerate passive ones
        # cannot poison gradients through masked-out branches
        p = self.active_loops(links, out[..., n_params:])  # (batch, A, N, N)
        phases, vecs = self.group.eig(p)
        theta, perm = canonical_phases(phases)
        # V only enters through R below, whose P-derivative is taken in closed form (module docstring)
        vecs = vecs.detach().gather(-1, perm[..., None, :].expand_as(vecs))
        gaps = theta[..., :-1] - theta[..., 1:]
        new_gaps, logdet = self.cell(gaps, params, inverse=inverse)
        logdet = logdet + log_weyl_density(new_gaps) - log_weyl_density(gaps)
        # P' P^dagger = V diag(e^{i (theta' - theta)}) V^dagger; the phase change is built from the
        # gap change so that it sums to zero (det stays 1) and vanishes when the gaps do.
        # U' = P' P^dagger U = P' S^dagger for the plaquette and for a learned loop alike
        delta = phase_shift_from_gaps(new_gaps - gaps)
        rot = _SpectralRotation.apply(p, delta, vecs, theta.detach())
        u_mu = links[:, mu].clone()
        u_mu[:, mask] = rot @ links[:, mu][:, mask]
        out = torch.cat([links[:, :mu], u_mu[:, None], links[:, mu + 1:]], dim=1)
        site_logdet = logdet.new_zeros(links.shape[0], *mask.shape)
        site_logdet[:, mask] = logdet
        return out, site_logdet
