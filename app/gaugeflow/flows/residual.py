"""Residual (stout-like) gauge-equivariant flows for U(1) and SU(N) in any dimension.

The layer of Abbott et al. (arXiv:2401.10874), after Lüscher's gradient-flow maps
(arXiv:0907.5491) and stout smearing (Morningstar & Peardon, hep-lat/0311018), in the masks of
Abbott et al. (arXiv:2305.02402, :mod:`gaugeflow.flows.masks`).

Map
---
For each *active* link ``U = U_mu(x)`` (x in ``mask.links``) and a set of closed loops through it,
written ``U S_k(x)`` with ``S_k`` the *staple* (the path from ``x + mu`` back to ``x``),

    U' = exp(Z) U,    Z = P( U M ),    M = sum_k c_k(x) S_k(x),

with ``P`` the projection onto the Lie algebra (traceless anti-hermitian part; ``i Im`` for U(1)),
i.e. ``Z`` is (minus, in the Frobenius metric) the group derivative of the gauge-invariant potential
``phi = sum_k c_k Re tr(U S_k)``. Only staples that contain **no active link** of the layer are used
(checked on the mask when the layer is built; e.g. the 2x1 loops with their long side
transverse to mu are dropped, they hold two active links), so ``M`` is fixed while ``U`` moves and
the map is per link. Loops: ``plaquette`` (2 (d - 1) staples), ``rectangle`` (2x1 with the long
side along mu, 4 (d - 1)), ``chair`` (bent 6-link loops, d > 2; those with two active links
dropped). The coefficients ``c_k(x)`` come from a context network of gauge-invariant traces of
*frozen* plaquettes (or, ``model.context=lcnn``, an L-CNN of the frozen links,
:mod:`gaugeflow.flows.lcnn`); ``Z`` transforms as ``Omega(x) Z Omega(x)^dagger``, so the layer is gauge
equivariant and its log-Jacobian gauge invariant.

Bound (invertibility)
---------------------
Staples are unitary (``||S_k||_2 = 1``), ``P`` is an orthogonal projection and ``exp`` is
1-Lipschitz on anti-hermitian matrices (``e^A - e^B = int_0^1 e^{sA} (A - B) e^{(1-s)B} ds``), so in
the Frobenius norm ``||Z(U) - Z(V)|| <= lambda ||U - V||`` with ``lambda = sum_k |c_k(x)|``. For
``lambda < 1`` the map ``U -> exp(-Z(U)) U'`` is a contraction of the unitary group, with a unique
fixed point (the map is bijective) reached geometrically at rate lambda, and the Jacobian below
is ``1 + K`` with ``||K|| <= lambda < 1`` (positive determinant). The layer enforces

    c_k = max_step * r_k / (1 + sum_j |r_j|),    so    lambda < max_step < 1,

with ``r`` the raw network outputs; ``max_step`` outside ``(0, 1)`` is refused, and every call
checks ``lambda < 1`` (a NaN from the network is reported, not propagated).

Log-det
-------
In right-trivialised exponential coordinates ``U = e^X U_0`` (where the normalised Haar measure is
Lebesgue to first order) the derivative is ``J = Ad_{e^Z} (1 + phi(ad_Z) L)`` with
``L X = P(X U M)``, ``phi(A) = (1 - e^{-A}) / A``; ``Ad`` is orthogonal, so per link

    log|det J| = log det(1 + phi(ad_Z) L)     ((N^2 - 1) x (N^2 - 1); phi via one matrix_exp),

and for U(1) (``ad_Z = 0``) ``log(1 + Re(U M))``: the angle map ``theta' = theta + Im(e^{i theta} M)``.
The layer's log-det is the sum over active links (frozen links do not move).

Inverse
-------
Fixed-point iteration ``U <- exp(-Z(U)) U'`` from ``U = U'`` until successive iterates differ by less
than ``tol`` (relative to the link norm ``sqrt(N)``; default 1e-12 in float64, 1e-6 in float32) on
every active link, at most ``max_iter`` times; otherwise :class:`FixedPointError` names the layer
and the residual. The converged links are then refined by one Newton step through the exact
``J`` written so that autograd sees the implicit-function derivative (``dU U^-1 = -J^{-1} dr`` with
``r = P(F(U) U'^dagger)``): gradients of ``log_prob`` (path-gradient training) are exact, not
those of the last iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gaugeflow.flows.base import SiteLogDetLayer
from gaugeflow.flows.masks import GaugeMask
from gaugeflow.groups import Group, get_group
from gaugeflow.groups.matrix import dagger, mul, trace
from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import site_max
from gaugeflow.observables.loops import plaquette

__all__ = ["LOOP_TYPES", "FixedPointError", "ResidualCoupling", "staple_paths"]

LOOP_TYPES = ("plaquette", "rectangle", "chair")

Step = tuple[int, int]  # (direction, +1 / -1)


class FixedPointError(RuntimeError):
    """The fixed-point inverse of a residual layer did not converge."""


def staple_paths(d: int, mu: int, loops: Sequence[str]) -> list[tuple[str, tuple[Step, ...]]]:
    """Candidate staples of ``U_mu(x)``: paths from ``x + mu`` back to ``x`` of the given loop types."""
    loops = tuple(loops)
    bad = [k for k in loops if k not in LOOP_TYPES]
    if bad or not loops:
        raise ValueError(f"model.loops must be a non-empty subset of {list(LOOP_TYPES)}, got {list(loops)}")
    out: list[tuple[str, tuple[Step, ...]]] = []
    others = [r for r in range(d) if r != mu]
    signed = [(r, s) for r in others for s in (1, -1)]
    for kind in LOOP_TYPES:  # fixed order, whatever the order of ``loops``
        if kind not in loops:
            continue
        for a in signed:
            na = (a[0], -a[1])
            if kind == "plaquette":
                out.append((kind, (a, (mu, -1), na)))
            elif kind == "rectangle":  # 2 along mu, U_mu(x) first or second of its pair
                out.append((kind, ((mu, 1), a, (mu, -1), (mu, -1), na)))
                out.append((kind, (a, (mu, -1), (mu, -1), na, (mu, 1))))
            else:
                for b in signed:
                    if b[0] == a[0]:
                        continue
                    nb = (b[0], -b[1])
                    out.append((kind, (a, (mu, -1), b, na, nb)))
                    out.append((kind, (b, a, nb, (mu, -1), na)))
                    out.append((kind, (a, b, (mu, -1), nb, na)))
    return out


def _path_links(mu: int, steps: Sequence[Step], d: int) -> list[tuple[int, tuple[int, ...]]]:
    """The links ``(direction, offset of its base from x)`` a staple of ``U_mu(x)`` passes."""
    r = [0] * d
    r[mu] = 1
    links = []
    for nu, s in steps:
        if s > 0:
            links.append((nu, tuple(r)))
            r[nu] += 1
        else:
            r[nu] -= 1
            links.append((nu, tuple(r)))
    if any(r):
        raise ValueError(f"staple {steps} of direction {mu} is not closed")
    return links


def _shift_to(field: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``field(x + offset)`` for a site field ``(batch, *L, ...)``."""
    for axis, n in enumerate(offset):
        if n:
            field = shift(field, axis, n)
    return field


class _LinkShifts:
    """``U_nu(x + r)`` of links ``(batch, d, *L, N, N)``, each computed once (memoised on ``(nu, r)``, and
    ``r`` built axis by axis from its memoised prefix).

    The staples of one layer share most of their shifted links (a 4d layer with rectangles and
    chairs has ~80 staples of 3 to 5 links, but few distinct ``(nu, r)``); on a decomposed lattice
    every shift along a split axis is a halo exchange, so sharing them is what keeps the number of
    messages per layer small.
    """

    def __init__(self, links: torch.Tensor):
        self.links = links
        self._cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def __call__(self, nu: int, offset: Sequence[int]) -> torch.Tensor:
        key = (nu, tuple(int(n) for n in offset))
        f = self._cache.get(key)
        if f is None:
            moved = [a for a, n in enumerate(key[1]) if n]
            if not moved:
                f = self.links[:, nu]
            else:
                prefix = list(key[1])
                prefix[moved[-1]] = 0
                f = shift(self(nu, prefix), moved[-1], key[1][moved[-1]])
            self._cache[key] = f
        return f


def _staple(links: torch.Tensor, mu: int, steps: Sequence[Step], shifts: _LinkShifts | None = None) -> torch.Tensor:
    """Product of the links along a staple of ``U_mu(x)``: ``(batch, *L, N, N)``.

    ``shifts``: a :class:`_LinkShifts` of ``links`` shared by the staples of one layer (optional)."""
    d = links.shape[1]
    if shifts is None:
        shifts = _LinkShifts(links)
    prod = None
    for (nu, s), (_, base) in zip(steps, _path_links(mu, steps, d)):
        f = shifts(nu, base)
        if s < 0:
            f = dagger(f)
        prod = f if prod is None else mul(prod, f)
    return prod


def _phi_matrix(a: torch.Tensor) -> torch.Tensor:
    """``(1 - e^{-A}) / A = int_0^1 e^{-tA} dt`` of real square matrices ``(..., D, D)``: the top-right
    block of ``exp([[-A, 1], [0, 0]])``."""
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device).expand(a.shape)
    top = torch.cat([-a, eye], dim=-1)
    big = torch.cat([top, torch.zeros_like(top)], dim=-2)
    return torch.linalg.matrix_exp(big)[..., :n, n:]


def plaquette_features_per_plane(n: int) -> int:
    """Channels of :func:`plaquette_trace_features` per plane: Re, Im of P for U(1); Re tr P^k / N
    (k < N) for SU(2), whose traces are real; Re and Im for N > 2."""
    return 2 if n == 1 else (n - 1) * (1 if n == 2 else 2)


def plaquette_trace_features(links: torch.Tensor, planes, frozen, n: int) -> torch.Tensor:
    """Re (and Im where not zero) of ``tr P^k / N``, k = 1 .. max(N-1, 1), of every plane's
    plaquettes, times that plane's frozen mask: ``(batch, planes * features_per_plane, *L)``. By
    Newton's identities these power sums (with det P = 1) fix a plaquette's spectrum, i.e. every
    gauge-invariant property of a single plaquette; the context of spectral and residual couplings."""
    feats = []
    for (r, s), mask in zip(planes, frozen):
        p = plaquette(links, r, s)
        pk = p
        for k in range(1, max(n, 2)):
            t = trace(pk) / n
            parts = (t.real,) if n == 2 else (t.real, t.imag)
            feats.extend(f * mask.to(f.dtype) for f in parts)
            if k < n - 1:
                pk = pk @ p
    return torch.stack(feats, dim=1)


class ResidualCoupling(SiteLogDetLayer):
    """One residual (stout-like) layer; see the module docstring.

    Args:
        mask: active links ``U_mu(x)`` and frozen plaquettes (:func:`gaugeflow.flows.masks.gauge_mask`).
        group: U(1) or SU(N) (object or name).
        net_factory: ``(context_channels, n_staples) -> module`` mapping ``(batch, C, *L)`` to
            ``(batch, n_staples, *L)``; zero outputs make the layer the identity.
        loops: loop types of the potential (``plaquette``, ``rectangle``, ``chair``).
        max_step: bound on ``sum_k |c_k|`` at every site, in (0, 1).
        tol, max_iter: the fixed-point inverse's tolerance (relative to the link norm; ``None``:
            1e-12 in float64, 1e-6 in float32) and iteration cap.
    """

    def __init__(self, mask: GaugeMask, group: str | Group, net_factory: Callable[[int, int], nn.Module],
                 loops: Sequence[str] = ("plaquette", "rectangle"), max_step: float = 0.9,
                 tol: float | None = None, max_iter: int = 1000):
        super().__init__()
        self.group = get_group(group)
        max_step = float(max_step)
        if not 0.0 < max_step < 1.0:
            raise ValueError(
                f"model.max_step must lie in (0, 1): the residual map is invertible for sum_k |c_k| < 1, "
                f"got {max_step}")
        if int(max_iter) < 1:
            raise ValueError(f"model.max_iter must be >= 1, got {max_iter}")
        if tol is not None and not float(tol) > 0:
            raise ValueError(f"model.tol must be > 0, got {tol}")
        self.max_step, self.tol, self.max_iter = max_step, (None if tol is None else float(tol)), int(max_iter)
        self.mu, self.nu, self.offsets = mask.mu, mask.nu, mask.offsets
        d = mask.links.dim()
        self.planes = list(mask.frozen)
        self.register_buffer("link_mask", mask.links.clone(), persistent=False)
        self.register_buffer("frozen", torch.stack([mask.frozen[p] for p in self.planes]), persistent=False)
        frozen_links = torch.ones((d, *mask.links.shape), dtype=torch.bool, device=mask.links.device)
        frozen_links[mask.mu] = ~mask.links
        self.register_buffer("frozen_links", frozen_links, persistent=False)
        # keep the staples whose links are all frozen: no U_mu(x + r) with x and x + r both active
        act = mask.links[None]
        self.staples: list[tuple[str, tuple[Step, ...]]] = []
        seen = set()
        for kind, steps in staple_paths(d, mask.mu, loops):
            path = _path_links(mask.mu, steps, d)
            key = frozenset(path)
            if key in seen:
                continue
            seen.add(key)
            if any(nu == mask.mu and (act & _shift_to(act, off)).any() for nu, off in path):
                continue
            self.staples.append((kind, steps))
        if not self.staples:
            raise ValueError(f"no loop of {list(loops)} holds a single active link of this mask")
        self.net = net_factory(self.context_channels(d, self.group.N), len(self.staples))
        self.last_iterations = 0

    def __repr__(self) -> str:
        return f"ResidualCoupling(mu={self.mu}, nu={self.nu}, offsets={self.offsets})"

    @property
    def name(self) -> str:
        return repr(self)

    # context -------------------------------------------------------------------------------
    @staticmethod
    def features_per_plane(n: int) -> int:
        return plaquette_features_per_plane(n)

    @classmethod
    def context_channels(cls, ndim: int, n: int) -> int:
        return ndim * (ndim - 1) // 2 * cls.features_per_plane(n)

    def context(self, links: torch.Tensor) -> torch.Tensor:
        """Re (Im) of ``tr P^k / N`` (k < N; U(1): Re, Im P) of the frozen plaquettes, zero elsewhere."""
        return plaquette_trace_features(links, self.planes, self.frozen, self.group.N)

    def net_output(self, links: torch.Tensor) -> torch.Tensor:
        """The context network's raw output ``(batch, n_staples, *L)``, from frozen links only: a net with
        ``takes_links = True`` (:class:`gaugeflow.flows.lcnn.LCNN`, ``model.context=lcnn``) reads the links
        with the active ones masked out, any other net the invariant features of :meth:`context`."""
        if getattr(self.net, "takes_links", False):
            return self.net(links, self.frozen_links)
        return self.net(self.context(links))

    def coefficients(self, links: torch.Tensor) -> torch.Tensor:
        """Bounded coefficients ``c`` ``(batch, A, n_staples)`` at the active sites (the bound is checked)."""
        raw = self.net_output(links).movedim(1, -1)[:, self.link_mask]
        if raw.shape[-1] != len(self.staples):
            raise ValueError(f"net gives {raw.shape[-1]} channels, {self.name} has {len(self.staples)} staples")
        c = self.max_step * raw / (1 + raw.abs().sum(-1, keepdim=True))
        lam = c.detach().abs().sum(-1)
        # the largest on the whole lattice (site_max): every block of a decomposed lattice raises or none
        lam_max = site_max(lam.max()) if lam.numel() else None
        if lam_max is not None and not bool(lam_max < 1):  # NaN fails too
            raise FloatingPointError(
                f"{self.name}: sum_k |c_k| = {lam_max.item()} violates the invertibility bound < 1")
        return c

    def staple_sum(self, links: torch.Tensor) -> torch.Tensor:
        """``M = sum_k c_k S_k`` at the active sites, ``(batch, A, N, N)``; frozen in this layer."""
        c = self.coefficients(links)
        shifts = _LinkShifts(links)  # one shift (halo exchange) per distinct link offset, not per staple link
        s = torch.stack([_staple(links, self.mu, steps, shifts)[:, self.link_mask] for _, steps in self.staples],
                        dim=2)
        return (c.to(s.dtype)[..., None, None] * s).sum(2)

    # per-link map ------------------------------------------------------------------------
    def _generators(self, dtype, device):
        g = self.group.generators(dtype, device)
        tt = torch.einsum("bji,ajk->baik", g.conj(), g)  # T_b^dagger T_a
        comm = torch.einsum("cij,ajk->caik", g, g) - torch.einsum("aij,cjk->caik", g, g)
        f = torch.einsum("bji,caji->cba", g.conj(), comm).real  # Re tr(T_b^dagger [T_c, T_a])
        return g, tt, f

    def jacobian(self, omega: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``1 + phi(ad_Z) L`` ``(..., D, D)`` for ``omega = U M`` and ``Z = P(omega)``."""
        _, tt, f = self._generators(omega.dtype, omega.device)
        lmat = torch.einsum("baij,...ji->...ba", tt, omega).real
        eye = torch.eye(lmat.shape[-1], dtype=lmat.dtype, device=lmat.device)
        if self.group.N == 1:
            return eye + lmat
        ad = torch.einsum("...c,cba->...ba", self.group.to_coords(z), f.to(lmat.dtype))
        return eye + _phi_matrix(ad) @ lmat

    def _step(self, u: torch.Tensor, m: torch.Tensor):
        omega = mul(u, m)
        z = self.group.project(omega)
        return omega, z

    def _logdet(self, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        omega, z = self._step(u, m)
        if self.group.N == 1:
            return torch.log1p(omega.real[..., 0, 0])
        return torch.linalg.slogdet(self.jacobian(omega, z)).logabsdet

    def _tol(self, dtype: torch.dtype) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-12 if dtype in (torch.float64, torch.complex128) else 1e-6

    def _solve(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Fixed point of ``U = exp(-Z(U)) y`` (no autograd); raises :class:`FixedPointError`.

        The iteration is per link, so on a decomposed lattice each block iterates until its own
        links have converged (no message per iteration); one :func:`site_max` of the final changes
        then decides for the whole lattice, so every block raises or none does. (A block that stops
        before the slowest one differs from the single-process iterate by ~``tol``; the Newton step
        of :meth:`transform` squares that away.)
        """
        tol = self._tol(y.dtype) * math.sqrt(self.group.N)
        with torch.no_grad():
            u, res, it = y, float("inf"), 0
            for it in range(1, self.max_iter + 1):
                _, z = self._step(u, m)
                new = mul(self.group.exp(-z), y)
                res = (new - u).abs().square().sum((-1, -2)).sqrt().max().item() if new.numel() else 0.0
                u = new
                if res <= tol or not math.isfinite(res):
                    break
            self.last_iterations = it
            res = site_max(torch.tensor(res, dtype=torch.float64, device=y.device)).item()  # whole lattice (NaN wins)
            if res <= tol:
                return u
        raise FixedPointError(
            f"{self.name}: fixed-point inverse did not converge in {self.max_iter} iterations "
            f"(last change {res:.3e} > tol {tol:.1e}, per link, Frobenius norm)")

    # layer -------------------------------------------------------------------------------
    def _scatter(self, links: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        mu = self.mu
        u_mu = links[:, mu].clone()
        u_mu[:, self.link_mask] = new
        return torch.cat([links[:, :mu], u_mu[:, None], links[:, mu + 1:]], dim=1)

    def transform(self, links: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_links, per-site log|det|)`` with the log-det ``(batch, *L)`` zero off the active links."""
        m = self.staple_sum(links)
        u = links[:, self.mu][:, self.link_mask]
        if not inverse:
            _, z = self._step(u, m)
            new = mul(self.group.exp(z), u)
            ld = self._logdet(u, m)
        else:
            x = self._solve(u.detach(), m.detach())
            # one Newton step whose autograd derivative is the implicit one (module docstring);
            # its value moves x by O(residual^2)
            omega, z = self._step(x, m)
            r = self.group.project(mul(mul(self.group.exp(z), x), dagger(u)))
            with torch.no_grad():
                om_d, z_d = omega.detach(), z.detach()
                e = self.group.exp(z_d)
                jac = self.jacobian(om_d, z_d)
            rot = mul(mul(dagger(e), r), e)
            xi = -torch.linalg.solve(jac, self.group.to_coords(rot)[..., None])[..., 0]
            new = mul(self.group.exp(self.group.from_coords(xi).to(x.dtype)), x)
            ld = -self._logdet(new, m)
        site = ld.new_zeros(links.shape[0], *self.link_mask.shape)
        site[:, self.link_mask] = ld
        return self._scatter(links, new), site
