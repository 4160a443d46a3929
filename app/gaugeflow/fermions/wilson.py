"""The Wilson–Dirac operator with an optional Sheikholeslami–Wohlert (clover) term.

``D = A - kappa H`` acting on fermion fields ``psi`` of shape ``(batch, *L, spin, colour)``:

* hopping term (Wilson, Phys. Rev. D 10 (1974) 2445)
  ``(H psi)(x) = sum_mu [ (1 - gamma_mu) U_mu(x) psi(x+mu) + (1 + gamma_mu) U_mu(x-mu)^dagger psi(x-mu) ]``;
* site term ``A = 1 - (csw kappa / 2) sum_{mu,nu} sigma_{mu nu} F_{mu nu}(x)``
  (Sheikholeslami & Wohlert, Nucl. Phys. B 259 (1985) 572) with ``sigma_{mu nu} = (i/2)
  [gamma_mu, gamma_nu]`` and the hermitian clover-leaf field strength
  ``F_{mu nu} = (Q_{mu nu} - Q_{mu nu}^dagger) / (8i)`` (traceless for SU(N)) of
  :func:`gaugeflow.observables.clover_field_strength`, ``Q`` the sum of the four leaves.
  With the anti-hermitian ``F_hat = (Q - Q^dagger)/8 = i F`` this is the usual
  ``+ csw kappa (i/2) sigma_{mu nu} F_hat_{mu nu}`` (Lüscher, Sint, Sommer, Weisz,
  hep-lat/9605038, in kappa normalisation), ``A = 1`` for ``csw = 0``.

Bare mass ``m0 = 1/(2 kappa) - d``. Boundary conditions: periodic in every direction except
time (the last lattice axis), which is antiperiodic by default. The antiperiodic sign is put
on the links ``U_t(x)`` of the global last time slice, ``x_t = L_t - 1``, before hopping; the
slice is found from :func:`gaugeflow.lattice.geometry.local_origin` and
:func:`~gaugeflow.lattice.geometry.global_shape`, so an operator built inside
:func:`gaugeflow.distributed.domain.decomposed` signs the links of the block that holds that
slice and none of the others. Every neighbour is reached through
:func:`gaugeflow.lattice.shift`: build *and* apply an operator inside the same domain context.

``gamma_5 D gamma_5 = D^dagger`` (the clover term is hermitian and commutes with gamma_5);
:meth:`WilsonDirac.apply_dagger` uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from gaugeflow.fermions.fields import fermion_shape
from gaugeflow.fermions.gamma import SpinMonomial, gamma_matrices, n_spin, sigma_munu
from gaugeflow.lattice import shift
from gaugeflow.lattice.geometry import _SHIFT_IMPL, global_shape, local_origin
from gaugeflow.observables.topology import clover_field_strength
from gaugeflow.observables.wilson import link_dims

__all__ = [
    "BOUNDARIES",
    "MAX_DENSE_UNKNOWNS",
    "WilsonDirac",
    "WilsonFermions",
    "boundary_links",
    "colour_mul",
    "colour_mul_dag",
    "kron_spin_colour",
]

BOUNDARIES = ("antiperiodic", "periodic")

#: Largest number of unknowns ``V * spin * colour`` per configuration for which a dense Dirac
#: matrix (and hence a dense determinant, O(n^3) time and O(n^2) memory) is built: 4^4 SU(3)
#: (3072) and 32x32 U(1) (2048) fit, 8^4 SU(2) (32768) does not.
MAX_DENSE_UNKNOWNS = 4096



class _from_links:
    """A cached property for tensors derived from the links, with their graph: one first computed
    without autograd (inside a CG solve, say) holds no graph, so it is recomputed the first time it is
    asked for with autograd on and differentiable links (a stale copy would silently cut the links'
    gradient)."""

    def __init__(self, fn):
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        cache = obj.__dict__.setdefault("_from_links_cache", {})
        graph = torch.is_grad_enabled() and obj.links.requires_grad
        hit = cache.get(self.name)
        if hit is None or (graph and not hit[1]):
            hit = cache[self.name] = (self.fn(obj), graph)
        return hit[0]

def colour_mul(u: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``(U psi)[..., s, i] = sum_j U[..., i, j] psi[..., s, j]``; ``u`` ``(..., N, N)``, ``psi`` ``(..., S, N)``."""
    if u.shape[-1] == 1:
        return u * psi
    return torch.matmul(psi, u.transpose(-1, -2))


def colour_mul_dag(u: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """``(U^dagger psi)[..., s, i] = sum_j conj(U[..., j, i]) psi[..., s, j]``."""
    if u.shape[-1] == 1:
        return u.conj() * psi
    return torch.matmul(psi, u.conj())


# ----------------------------------------------------------------------------- layouts
# The hopping term is one stencil over all 2d hops at once (WilsonDirac._stencil):
#   1. spin projection of every hop k = (direction mu, sign): h_k = P_k psi, P_k = the upper half of
#      (1 -+ gamma_mu) (rank S/2 in the chiral bases here), all 2d of them as one small matmul;
#   2. the colour products g_k(y) = W_k(y) h_k(y) with links precomputed once per operator, W_k(y) =
#      U_mu(y - mu) for the forward hop and U_mu(y)^dagger for the backward one;
#   3. the neighbours (H psi)(x) = sum_k R_k g_k(x + e_k), R_k the reconstruction of the full spinor
#      of (1 -+ gamma_mu) from its upper half: one gather of all 2d shifted fields (a neighbour
#      table built once through gaugeflow.lattice.shift) and one matmul that reconstructs, sums the
#      hops and adds the site term. Inside a domain context (lattice.use_shift) the gather is 2d
#      calls of gaugeflow.lattice.shift instead, so a halo exchange sees ordinary site fields.
# gamma_5 is diagonal (+1 upper, -1 lower), so D^dagger = gamma_5 D gamma_5 is the same stencil with
# gamma_5 folded into P and R. For SU(N) fields are held spin-colour-major, (batch, S, C, *L), the
# site axes innermost, so a colour product is C broadcast multiply-adds over long site vectors (the
# colour-major kernels of gaugeflow.groups.matrix); for U(1) (C = 1) the public layout
# (batch, *L, S, 1) is used as is and the colour product is one complex multiply per site and hop.


def to_internal(psi: torch.Tensor) -> torch.Tensor:
    """``(batch, *L, S, C) -> (batch, S, C, *L)`` (contiguous)."""
    return psi.movedim((-2, -1), (1, 2)).contiguous()


def from_internal(p: torch.Tensor) -> torch.Tensor:
    """``(batch, S, C, *L) -> (batch, *L, S, C)`` (contiguous)."""
    return p.movedim((1, 2), (-2, -1)).contiguous()


def _matrices_internal(m: torch.Tensor) -> torch.Tensor:
    """Colour matrices ``(batch, *L, N, N) -> (batch, N, N, *L)`` (contiguous)."""
    return m.movedim((-2, -1), (1, 2)).contiguous()


def _mul_internal(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``out[:, s, i] = sum_j u[:, i, j] p[:, s, j]`` for ``u`` ``(b, N, N, *L)``, ``p`` ``(b, S, N, *L)``."""
    n = u.shape[1]
    if n == 1:
        return u * p
    out = u[:, None, :, 0] * p[:, :, 0:1]
    for j in range(1, n):
        out = out.addcmul_(u[:, None, :, j], p[:, :, j : j + 1])
    return out


def _shift_internal(p: torch.Tensor, mu: int, n: int) -> torch.Tensor:
    """:func:`gaugeflow.lattice.shift` of a ``(b, S, C, *L)`` field (spin and colour folded into the batch)."""
    return shift(p.reshape(-1, *p.shape[3:]), mu, n).reshape(p.shape)


def boundary_links(links: torch.Tensor, boundary: str = "antiperiodic") -> torch.Tensor:
    """Links with the fermion boundary condition in time (the last axis) folded in.

    ``antiperiodic``: ``U_t(x) -> -U_t(x)`` on the global last time slice; ``periodic``: the
    links themselves. Differentiable; on a decomposed lattice (inside ``decomposed``) only the
    block holding the slice ``x_t = L_t - 1`` changes.
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"fermion boundary must be one of {list(BOUNDARIES)}, got {boundary!r}")
    if boundary == "periodic":
        return links
    d = links.shape[1]
    local = tuple(links.shape[2 : 2 + d])
    t = d - 1
    last = global_shape(local)[t] - 1
    x_t = torch.arange(local_origin(local)[t], local_origin(local)[t] + local[t], device=links.device)
    sign = torch.where(x_t == last, -1.0, 1.0).to(links.real.dtype)
    u_t = links[:, t] * sign.view(local[t], 1, 1)
    return torch.cat([links[:, :t], u_t[:, None]], dim=1)


class WilsonDirac:
    """The Wilson(-clover) Dirac operator of one batch of gauge configurations.

    Args:
        links: ``(batch, d, *L, N, N)`` complex, d = 2 or 4 (U(1) has N = 1). Fields it acts on
            have the links' dtype and device.
        kappa: hopping parameter, ``m0 = 1/(2 kappa) - d``.
        csw: clover coefficient (0: plain Wilson).
        boundary: ``"antiperiodic"`` (default) or ``"periodic"`` in time (the last axis).

    Build it inside the domain context it is applied in (module docstring). The operator is
    linear in the field and differentiable with respect to the links.
    """

    def __init__(self, links: torch.Tensor, kappa: float, csw: float = 0.0, boundary: str = "antiperiodic"):
        d, n = link_dims(links)
        self.d, self.n_colour, self.n_spin = d, n, n_spin(d)
        self.links = links
        self.kappa = float(kappa)
        self.csw = float(csw)
        self.boundary = boundary
        self.lattice_shape = tuple(links.shape[2 : 2 + d])
        self.u = boundary_links(links, boundary)
        self._gammas, self._g5, sigmas = SpinMonomial.basis(d)
        self._proj = [_projector_indices(g, d, links.dtype, links.device) for g in self._gammas]
        # the stencil (layout notes above): projections P (2d S/2, S), reconstructions R (S, 2d S/2);
        # -kappa R for D, and both with gamma_5 folded in for D^dagger
        p_mat, r_mat = _stencil_spin_matrices(d, links.dtype, links.device)
        g5 = torch.diagonal(self._g5.matrix).to(dtype=links.dtype, device=links.device)
        self._spin = {
            "hop": (p_mat, r_mat),
            "apply": (p_mat, -self.kappa * r_mat),
            "dagger": (p_mat * g5, -self.kappa * g5[:, None] * r_mat),
        }
        self._single = _SHIFT_IMPL.get() is None  # built on a whole single-process lattice
        # [(mu, nu, sigma_{mu nu}, F_{mu nu})] for mu < nu, F in the internal layout
        self._clover: list[tuple[int, int, SpinMonomial, torch.Tensor]] = []
        if self.csw != 0.0:
            for (mu, nu), sig in sigmas.items():
                f = clover_field_strength(links, mu, nu)
                self._clover.append((mu, nu, sig, _matrices_internal(f)))
        self._site_matrices: torch.Tensor | None = None
        self._site_blocks: torch.Tensor | None = None
        self._site_blocks_sm: torch.Tensor | None = None
        if self._clover:
            # A is block diagonal in chirality (sigma_{mu nu} maps upper onto upper spin components):
            # two (S/2 * N)-square blocks per site, (batch, 2, K, K, *L) in the internal layout
            k = self.block_size // 2
            a = self.site_matrices()
            blocks = torch.stack([a[..., :k, :k], a[..., k:, k:]], dim=-3)  # (batch, *L, 2, K, K)
            self._site_blocks = blocks.movedim((-3, -2, -1), (1, 2, 3)).contiguous()
            self._site_blocks_sm = blocks.reshape(blocks.shape[0], -1, 2, k, k) if n == 1 else None

    # -- facts ------------------------------------------------------------------------------
    @property
    def m0(self) -> float:
        """Bare mass ``1/(2 kappa) - d``."""
        return 1.0 / (2.0 * self.kappa) - self.d

    @property
    def dtype(self) -> torch.dtype:
        return self.links.dtype

    @property
    def device(self) -> torch.device:
        return self.links.device

    @property
    def field_shape(self) -> tuple[int, ...]:
        """``(batch, *L, spin, colour)`` of the fields it acts on (the local block on a decomposed run)."""
        return fermion_shape(self.links)

    @property
    def block_size(self) -> int:
        """Unknowns per site, ``spin * colour``."""
        return self.n_spin * self.n_colour

    def to(self, dtype: torch.dtype) -> WilsonDirac:
        """The same operator with links (and fields) of another complex dtype (mixed precision)."""
        return WilsonDirac(self.links.to(dtype), self.kappa, self.csw, self.boundary)

    def __repr__(self) -> str:
        return (
            f"WilsonDirac(d={self.d}, N={self.n_colour}, L={list(self.lattice_shape)}, kappa={self.kappa}, "
            f"csw={self.csw}, boundary={self.boundary!r})"
        )

    # -- spin helpers -----------------------------------------------------------------------
    def gamma(self, mu: int, psi: torch.Tensor) -> torch.Tensor:
        """``gamma_mu psi``."""
        return self._gammas[mu](psi)

    def gamma5(self, psi: torch.Tensor) -> torch.Tensor:
        """``gamma_5 psi``."""
        return self._g5(psi)

    # -- the operator -----------------------------------------------------------------------
    def _check(self, psi: torch.Tensor) -> None:
        if tuple(psi.shape) != self.field_shape:
            raise ValueError(
                f"fermion field of shape {tuple(psi.shape)} does not fit the operator: expected "
                f"(batch, *L, spin, colour) = {self.field_shape}"
            )

    def hop(self, psi: torch.Tensor) -> torch.Tensor:
        """Hopping term ``H psi`` (module docstring), boundary signs included."""
        self._check(psi)
        return self._public(psi, ("hop",), site=False)

    def clover(self, psi: torch.Tensor) -> torch.Tensor:
        """``C psi = sum_{mu,nu} sigma_{mu nu} F_{mu nu} psi = 2 sum_{mu<nu} sigma_{mu nu} F_{mu nu} psi`` (matrix-free)."""
        self._check(psi)
        return from_internal(self._clover_term(to_internal(psi)))

    def site_term(self, psi: torch.Tensor) -> torch.Tensor:
        """``A psi = psi - (csw kappa / 2) C psi``: the site-local part of D.

        Applied with the chirality blocks of :meth:`site_matrices` (cheaper than :meth:`clover`'s
        plane-by-plane products, which the tests compare with it)."""
        self._check(psi)
        return from_internal(self._site(to_internal(psi)))

    def apply(self, psi: torch.Tensor) -> torch.Tensor:
        """``D psi = A psi - kappa H psi``."""
        self._check(psi)
        return self._public(psi, ("apply",), site=True)

    __call__ = apply

    def apply_dagger(self, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger psi = gamma_5 D gamma_5 psi``."""
        self._check(psi)
        return self._public(psi, ("dagger",), site=True)

    def normal(self, psi: torch.Tensor) -> torch.Tensor:
        """``D^dagger D psi`` (hermitian positive definite for kappa below its critical value)."""
        self._check(psi)
        return self._public(psi, ("apply", "dagger"), site=True)

    def _public(self, psi: torch.Tensor, stages: tuple[str, ...], site: bool) -> torch.Tensor:
        """The stencil stages applied in turn to a public ``(batch, *L, S, C)`` field."""
        if self.n_colour == 1:
            x = psi.reshape(-1, self.n_spin)
            for st in stages:
                x = self._stencil_scalar(x, *self._spin[st], site)
            return x.view(psi.shape)
        p = to_internal(psi)
        for st in stages:
            p = self._stencil(p, *self._spin[st], site)
        return from_internal(p)

    # the same on internal (batch, S, C, *L) fields
    def _hop(self, p: torch.Tensor) -> torch.Tensor:
        return self._stencil(p, *self._spin["hop"], site=False)

    def _apply(self, p: torch.Tensor) -> torch.Tensor:
        return self._stencil(p, *self._spin["apply"], site=True)

    def _apply_dagger(self, p: torch.Tensor) -> torch.Tensor:
        return self._stencil(p, *self._spin["dagger"], site=True)

    # -- the stencil (layout notes at the top of the module) --------------------------------------
    def _gather_ok(self) -> bool:
        """Whether the neighbour table may replace :func:`gaugeflow.lattice.shift` (plain periodic
        shifts on a whole lattice, at construction and now)."""
        return self._single and _SHIFT_IMPL.get() is None

    def _hops(self):
        """``[(mu, n)]`` of the 2d hops: ``k = 2 mu`` forward ``(mu, +1)``, ``k = 2 mu + 1`` backward ``(mu, -1)``."""
        return [(mu, n) for mu in range(self.d) for n in (1, -1)]

    @_from_links
    def _neighbours(self) -> torch.Tensor:
        """``(2d, V)``: the site index of ``x + e_k`` for every hop k (built through :func:`shift`)."""
        v = math.prod(self.lattice_shape)
        site = torch.arange(v, device=self.device).view(1, *self.lattice_shape)
        return torch.stack([shift(site, mu, n).reshape(v) for mu, n in self._hops()])

    @_from_links
    def _neighbour_rows(self) -> torch.Tensor:
        """``(V 2d,)``: row ``x 2d + k`` of a site-major ``(V, 2d)`` field is read from row ``(x + e_k) 2d + k``."""
        k2 = 2 * self.d
        return (self._neighbours * k2 + torch.arange(k2, device=self.device)[:, None]).T.reshape(-1).contiguous()

    @_from_links
    def _stencil_links(self) -> torch.Tensor:
        """``W_k`` colour-major ``(batch, 2d, N, N, V)``: ``U_mu(y - mu)`` (forward hops, whose product
        is then moved from y to x = y - mu) and ``U_mu(y)^dagger`` (backward ones, moved to x = y + mu)."""
        ws = []
        for mu, n in self._hops():
            u = _matrices_internal(self.u[:, mu])
            ws.append(_shift_internal(u, mu, -1) if n > 0 else u.conj().transpose(1, 2))
        w = torch.stack(ws, dim=1)
        return w.reshape(*w.shape[:4], -1).contiguous()

    @_from_links
    def _stencil_phases(self) -> torch.Tensor:
        """U(1): ``W_k`` as ``(batch, V, 2d)`` complex numbers (site-major)."""
        ws = []
        for mu, n in self._hops():
            u = self.u[:, mu, ..., 0, 0]
            ws.append(shift(u, mu, -1) if n > 0 else u.conj())
        w = torch.stack(ws, dim=-1)
        return w.reshape(w.shape[0], -1, w.shape[-1]).contiguous()

    def _stencil(self, p: torch.Tensor, proj: torch.Tensor, recon: torch.Tensor, site: bool) -> torch.Tensor:
        """``site(p) + sum_k R_k W_k(x + e_k) P_k p(x + e_k)`` on an internal ``(batch, S, C, *L)`` field
        (``site``: add the site term ``A p``; without it the plain hop sum).

        One direction (a forward and a backward hop) at a time: its two projections as one matmul,
        the colour products of both, the two shifts, and the reconstruction accumulated by a matmul
        (temporaries of one field's size)."""
        b, s, c = p.shape[:3]
        lat = p.shape[3:]
        v = math.prod(lat)
        half = s // 2
        flat = p.reshape(b, s, c * v)
        w = self._stencil_links  # (b, 2d, C, C, V), hops (mu, +), (mu, -) adjacent
        out = self._site(p).reshape(b, s, c * v) if site else None
        for mu in range(self.d):
            rows = slice(2 * mu * half, (2 * mu + 2) * half)
            h = torch.matmul(proj[rows], flat).view(b, 2, half, c, v)
            wm = w[:, 2 * mu : 2 * mu + 2]
            g = wm[:, :, None, :, 0] * h[:, :, :, 0:1]
            for j in range(1, c):
                g.addcmul_(wm[:, :, None, :, j], h[:, :, :, j : j + 1])
            g = g.view(b, 2, half * c, *lat)
            # g_k(x + e_k), spin and colour folded into the batch axis of the shift
            moved = torch.stack([shift(g[:, 0].reshape(-1, *lat), mu, 1), shift(g[:, 1].reshape(-1, *lat), mu, -1)])
            moved = moved.view(2, b, half, c * v).transpose(0, 1).reshape(b, 2 * half, c * v)
            r = recon[:, rows].expand(b, s, 2 * half)
            if out is None:
                out = torch.bmm(r, moved)
            elif mu == 0:
                out = torch.baddbmm(out, r, moved)
            else:
                out.baddbmm_(r, moved)
        return out.view(p.shape)

    def _stencil_scalar(self, x: torch.Tensor, proj: torch.Tensor, recon: torch.Tensor, site: bool) -> torch.Tensor:
        """U(1): :meth:`_stencil` on a public field flattened to ``(batch * V, S)``, site-major."""
        s, k2 = self.n_spin, 2 * self.d
        half = s // 2
        w = self._stencil_phases  # (b, V, 2d)
        b, v = w.shape[:2]
        h = torch.matmul(x, proj.T).view(b, v, k2, half)
        g = h * w[..., None]
        if self._gather_ok():
            g = g.view(b, v * k2, half).index_select(1, self._neighbour_rows)
        else:
            g = g.view(b, *self.lattice_shape, k2, half)
            g = torch.stack([shift(g[..., k, :], mu, n) for k, (mu, n) in enumerate(self._hops())], dim=-2)
        g = g.reshape(b * v, k2 * half)
        if site:
            return torch.addmm(self._site_scalar(x), g, recon.T)
        return torch.matmul(g, recon.T)

    def _site_scalar(self, x: torch.Tensor) -> torch.Tensor:
        """U(1): ``A x`` on a field flattened to ``(batch * V, S)``."""
        a = self._site_blocks_sm
        if a is None:
            return x
        k = a.shape[-1]
        return torch.matmul(a, x.view(*a.shape[:3], k, 1)).view(x.shape)

    def _hop_reference(self, p: torch.Tensor) -> torch.Tensor:
        """The hopping term direction by direction on an internal field, through :func:`shift` (the
        tests compare the stencil with it)."""
        # Spin projection: (1 -+ gamma_mu) has rank S/2, and in the chiral bases used here every
        # gamma_mu maps the upper spin components onto the lower ones. Hence y = (1 - gamma) x
        # is fixed by its upper half h = x_up - (gamma x)_up, with y_low = -(gamma h)_low (as
        # gamma y = -y), and y = (1 + gamma) x by h = x_up + (gamma x)_up, y_low = +(gamma h)_low.
        # Shifts and colour products then act on half spinors only.
        half = self.n_spin // 2
        up = low = None
        for mu in range(self.d):
            perm_up, phase_up, perm_low, phase_low = self._proj[mu]
            g_up = p.index_select(1, perm_up) * phase_up  # (gamma_mu p)_up
            x_up = p[:, :half]
            h_minus = x_up - g_up
            h_plus = x_up + g_up
            a = _mul_internal(self._u_in[mu], _shift_internal(h_minus, mu, 1))  # U_mu(x) h-(x+mu)
            b = _shift_internal(_mul_internal(self._udag_in[mu], h_plus), mu, -1)  # U_mu(x-mu)^dag h+(x-mu)
            t_up = a + b
            t_low = (b - a).index_select(1, perm_low) * phase_low
            up = t_up if up is None else up.add_(t_up)
            low = t_low if low is None else low.add_(t_low)
        return torch.cat([up, low], dim=1)

    def _clover_term(self, p: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(p)
        for _, _, sig, f in self._clover:
            out = out + sig(_mul_internal(f, p), dim=1)
        return 2.0 * out

    def _site(self, p: torch.Tensor) -> torch.Tensor:
        if self._site_blocks is None:
            return p
        # out[:, c, k] = sum_l A_c[k, l] p[:, c, l] for the two chiralities c: K multiply-adds
        a = self._site_blocks
        q = p.reshape(p.shape[0], 2, -1, *p.shape[3:])
        out = a[:, :, :, 0] * q[:, :, 0:1]
        for j in range(1, q.shape[2]):
            out = out.addcmul_(a[:, :, :, j], q[:, :, j : j + 1])
        return out.view(p.shape)

    @_from_links
    def _u_in(self) -> list[torch.Tensor]:
        """``U_mu`` as ``(batch, N, N, *L)`` (internal layout; the half-lattice stencil uses it)."""
        return [_matrices_internal(self.u[:, mu]) for mu in range(self.d)]

    @_from_links
    def _udag_in(self) -> list[torch.Tensor]:
        """``U_mu^dagger`` as ``(batch, N, N, *L)``."""
        return [_matrices_internal(self.u[:, mu].conj().transpose(-1, -2)) for mu in range(self.d)]

    # -- site-local matrices (clover) --------------------------------------------------------
    def site_matrices(self) -> torch.Tensor:
        """``A(x)`` as ``(batch, *L, S*C, S*C)`` matrices, row index ``spin * C + colour``.

        The identity for plain Wilson fermions. Cached; differentiable with respect to the links.
        """
        if self._site_matrices is None:
            bs = self.block_size
            shape = (self.links.shape[0], *self.lattice_shape)
            eye = torch.eye(bs, dtype=self.dtype, device=self.device)
            if not self._clover:
                self._site_matrices = eye.expand(*shape, bs, bs)
            else:
                sig = sigma_munu(self.d, dtype=self.dtype, device=self.device)
                total = None
                for mu, nu, _, f in self._clover:
                    k = kron_spin_colour(sig[mu, nu], f.movedim((1, 2), (-2, -1)))
                    total = k if total is None else total + k
                self._site_matrices = eye - (self.csw * self.kappa) * total
        return self._site_matrices

    def apply_site_matrices(self, m: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """``m(x) psi(x)`` for site matrices ``m`` ``(batch, *L, S*C, S*C)`` (e.g. ``A^{-1}``)."""
        flat = psi.reshape(*psi.shape[:-2], self.block_size, 1)
        return torch.matmul(m, flat).reshape(psi.shape)

    # -- dense matrix ------------------------------------------------------------------------
    def dense(self, max_unknowns: int | None = None) -> torch.Tensor:
        """``D`` as a dense ``(batch, n, n)`` matrix, ``n = V * spin * colour``.

        Index order: that of ``psi.reshape(batch, n)`` for a field ``(batch, *L, spin, colour)``,
        i.e. ``((site * S) + spin) * C + colour`` with the site index row-major in
        ``(x_0, ..., x_{d-1})`` (x_{d-1}, time, fastest). Built from the formula (block by
        block, not by applying the operator), differentiable with respect to the links.
        Single-process only; refuses more than ``max_unknowns`` (default
        :data:`MAX_DENSE_UNKNOWNS`) unknowns with a ``ValueError`` naming the lattice.
        """
        local = self.lattice_shape
        if global_shape(local) != local:
            raise ValueError(
                f"a dense Dirac matrix needs the whole lattice, this is a block {list(local)} of "
                f"{list(global_shape(local))} (a domain-decomposed run)"
            )
        v = math.prod(local)
        bs = self.block_size
        n = v * bs
        limit = MAX_DENSE_UNKNOWNS if max_unknowns is None else int(max_unknowns)
        if n > limit:
            raise ValueError(
                f"dense Dirac matrix of lattice.shape={list(local)} with {self.n_spin} spin x {self.n_colour} "
                f"colour components has {n} unknowns per configuration, more than the limit {limit} "
                f"(O(n^3) time, O(n^2) memory): use the matrix-free operator and CG"
            )
        batch = self.links.shape[0]
        idx = torch.arange(v, device=self.device).view(local)
        sites = idx.reshape(-1)
        blocks = self.site_matrices().reshape(batch, v, bs, bs)
        m = torch.zeros((batch, v * v, bs, bs), dtype=self.dtype, device=self.device)
        m = m.index_add(1, sites * v + sites, blocks)
        eye_s = torch.eye(self.n_spin, dtype=self.dtype, device=self.device)
        g = [self._gammas[mu].matrix.to(dtype=self.dtype, device=self.device) for mu in range(self.d)]
        for mu in range(self.d):
            fwd = torch.roll(idx, -1, mu).reshape(-1)  # index of x + mu
            u = self.u[:, mu].reshape(batch, v, self.n_colour, self.n_colour)
            # row x, column x+mu: -kappa (1 - gamma_mu) (x) U_mu(x)
            m = m.index_add(1, sites * v + fwd, -self.kappa * kron_spin_colour(eye_s - g[mu], u))
            # row x+mu, column x: -kappa (1 + gamma_mu) (x) U_mu(x)^dagger
            m = m.index_add(1, fwd * v + sites, -self.kappa * kron_spin_colour(eye_s + g[mu], u.conj().transpose(-1, -2)))
        return m.view(batch, v, v, bs, bs).transpose(2, 3).reshape(batch, n, n)


def _projector_indices(gamma: SpinMonomial, d: int, dtype: torch.dtype, device: torch.device):
    """``(perm_up, phase_up, perm_low, phase_low)`` of a chiral-basis gamma: ``(gamma x)_up = phase_up *
    x[perm_up]`` (perm_up indexes the lower half) and ``(gamma h)_low = phase_low * h[perm_low]``
    for an upper-half ``h`` (perm_low indexes the upper half); phases shaped to broadcast over
    internal half-spinor fields ``(batch, S/2, C, *L)``."""
    perm, phase = gamma._perm, gamma._phase
    half = perm.numel() // 2
    if not (bool((perm[:half] >= half).all()) and bool((perm[half:] < half).all())):
        raise ValueError("spin projection needs gammas that map upper onto lower spin components (a chiral basis)")
    shape = (half, 1, *([1] * d))
    return (
        perm[:half].to(device),
        phase[:half].to(dtype=dtype, device=device).view(shape),
        perm[half:].to(device),
        phase[half:].to(dtype=dtype, device=device).view(shape),
    )


def _stencil_spin_matrices(d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, R)`` of the stencil's 2d hops (``k = 2 mu``: forward, ``1 - gamma_mu``; ``k = 2 mu + 1``: backward, ``1 + gamma_mu``).

    ``y = (1 + s gamma) x`` (s = -+1) is fixed by its upper half ``h = P_k x = (1 + s gamma)[:S/2] x``:
    ``gamma y = s y`` and gamma maps the upper onto the lower half in the chiral bases here, so
    ``y_low = s gamma[S/2:, :S/2] h`` and ``y = R_k h`` with ``R_k = [1; s gamma[S/2:, :S/2]]``.
    Returns ``P`` ``(2d S/2, S)`` (rows k-major) and ``R`` ``(S, 2d S/2)``."""
    g = gamma_matrices(d, dtype=torch.complex128, device="cpu")
    s_n = g.shape[-1]
    half = s_n // 2
    if bool(g[:, :half, :half].abs().any()) or bool(g[:, half:, half:].abs().any()):
        raise ValueError("spin projection needs gammas that map upper onto lower spin components (a chiral basis)")
    eye = torch.eye(s_n, dtype=torch.complex128, device="cpu")
    ps, rs = [], []
    for mu in range(d):
        for sign in (-1.0, 1.0):
            ps.append((eye + sign * g[mu])[:half])
            rs.append(torch.cat([eye[:half, :half], sign * g[mu][half:, :half]]))
    return torch.cat(ps).to(dtype=dtype, device=device), torch.cat(rs, dim=1).to(dtype=dtype, device=device)


def kron_spin_colour(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``s (x) c`` for a spin matrix ``(S, S)`` and colour matrices ``(..., N, N)``: ``(..., S*N, S*N)``,
    entry ``[(a, i), (b, j)] = s[a, b] c[i, j]``."""
    k = s[:, None, :, None] * c[..., None, :, None, :]
    sdim, n = s.shape[-1], c.shape[-1]
    return k.reshape(*c.shape[:-2], sdim * n, sdim * n)


@dataclass(frozen=True)
class WilsonFermions:
    """Wilson(-clover) fermions as a discretisation choice: ``operator(links)`` binds it to configurations.

    ``kappa``, ``csw`` and ``boundary`` as in :class:`WilsonDirac`. The forces and determinants
    of :mod:`gaugeflow.fermions.force` and :mod:`gaugeflow.fermions.determinant` take it.
    """

    kappa: float
    csw: float = 0.0
    boundary: str = "antiperiodic"

    def __post_init__(self) -> None:
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"fermion boundary must be one of {list(BOUNDARIES)}, got {self.boundary!r}")
        if not math.isfinite(self.kappa) or self.kappa <= 0:
            raise ValueError(f"kappa must be a positive number, got {self.kappa!r}")

    def operator(self, links: torch.Tensor) -> WilsonDirac:
        return WilsonDirac(links, self.kappa, self.csw, self.boundary)
