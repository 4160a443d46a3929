"""U(1) and SU(N) as objects that know their Lie algebra, exponential map and Haar measure.

Conventions
-----------
* Group elements: complex ``(..., N, N)``; U(1) uses N = 1.
* Lie algebra elements ``X`` are *anti-hermitian* (and traceless for SU(N)), so
  ``exp(X)`` is in the group. :meth:`Group.generators` returns an orthonormal
  basis ``T_a`` with ``tr(T_a^dagger T_b) = delta_ab`` (Frobenius metric); real
  coordinates of an algebra element are taken in this basis.
* :meth:`Group.project` is the projection of any matrix onto the algebra
  (the "traceless anti-hermitian part"); for a real function ``f`` of ``U`` with
  torch gradient ``G`` (``df = Re sum conj(G) dU``), the derivative along
  ``U -> exp(eps X) U`` is ``Re tr(X U G^dagger) = tr(X project(U G^dagger))``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache

import torch
from torch.autograd.function import once_differentiable

from gaugeflow.groups.matrix import dagger, eye_like, mul, trace


class Group(ABC):
    """Common interface of the compact gauge groups."""

    name: str
    N: int
    #: real dimension of the Lie algebra
    dim: int

    # -- group operations -------------------------------------------------
    def identity(self, shape: tuple[int, ...], dtype=torch.complex128, device=None) -> torch.Tensor:
        eye = torch.eye(self.N, dtype=dtype, device=device)
        return eye.expand(*shape, self.N, self.N).clone()

    @abstractmethod
    def project(self, m: torch.Tensor) -> torch.Tensor:
        """Projection of any ``(..., N, N)`` matrix onto the Lie algebra."""

    @abstractmethod
    def exp(self, x: torch.Tensor) -> torch.Tensor:
        """Exponential map from the algebra to the group."""

    def log(self, u: torch.Tensor) -> torch.Tensor:
        """Principal logarithm: the algebra element ``X`` with ``exp(X) = u`` and eigenphases in (-pi, pi]."""
        phases, vecs = self.eig(u)
        d = torch.diag_embed(torch.complex(torch.zeros_like(phases), phases))
        return vecs @ d @ dagger(vecs)

    def eig(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenphases in (-pi, pi] and unitary eigenvectors, ``u = V diag(e^{i phi}) V^dagger``.

        ``phases[..., k]`` belongs to the column ``vecs[..., :, k]``; the order is otherwise
        unspecified (callers sort, e.g. :func:`gaugeflow.flows.sun.canonical_phases`). Accurate
        to a few ulps for every unitary ``u`` (degenerate spectra, centre elements and the
        identity included): see :func:`unitary_eig`. Differentiable for losses that do not
        depend on the phases of the eigenvectors (:class:`_UnitaryEig`).
        """
        return _UnitaryEig.apply(u)

    def eigphases(self, u: torch.Tensor) -> torch.Tensor:
        """Eigenphases in (-pi, pi], shape ``(..., N)``."""
        return torch.angle(torch.linalg.eigvals(u))

    @abstractmethod
    def random(self, shape, generator=None, dtype=torch.complex128, device=None) -> torch.Tensor:
        """Haar-distributed elements of shape ``(*shape, N, N)``."""

    @abstractmethod
    def random_algebra(self, shape, generator=None, dtype=torch.complex128, device=None) -> torch.Tensor:
        """Gaussian algebra elements with density ``exp(-|X|_F^2 / 2)`` (HMC momenta)."""

    @abstractmethod
    def reunitarize(self, u: torch.Tensor) -> torch.Tensor:
        """Map a matrix near the group back onto it (removes rounding drift)."""

    # -- algebra coordinates ---------------------------------------------
    def generators(self, dtype=torch.complex128, device=None) -> torch.Tensor:
        """Orthonormal anti-hermitian basis ``(dim, N, N)``, ``tr(T_a^dagger T_b) = delta_ab``."""
        return _generators(self.N, self.name == "U(1)").to(dtype=dtype, device=device)

    def to_coords(self, x: torch.Tensor) -> torch.Tensor:
        """Real coordinates ``(..., dim)`` of algebra elements in the orthonormal basis."""
        t = self.generators(x.dtype, x.device)
        return torch.einsum("aij,...ij->...a", t.conj(), x).real

    def from_coords(self, c: torch.Tensor) -> torch.Tensor:
        t = self.generators(_complex_of(c.dtype), c.device)
        return torch.einsum("...a,aij->...ij", c.to(t.dtype), t)

    @staticmethod
    def norm2(x: torch.Tensor) -> torch.Tensor:
        """Squared Frobenius norm over the last two axes (twice the HMC kinetic energy)."""
        return (x.real.square() + x.imag.square()).sum((-1, -2))

    def __repr__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- eigen-decomposition
def _herm_part(u: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``(e^{-i a} u + e^{i a} u^dagger) / 2`` for ``rot = e^{-i a}`` (a scalar or ``(..., 1, 1)``).

    For unitary ``u = V diag(e^{i phi}) V^dagger`` this is ``V diag(cos(phi - a)) V^dagger``.
    """
    m = rot * u
    return 0.5 * (m + dagger(m))


def _offdiag_norm(r: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the off-diagonal part of ``r`` (..., N, N)."""
    off = r - torch.diag_embed(r.diagonal(dim1=-2, dim2=-1))
    return (off.real.square() + off.imag.square()).sum((-1, -2)).sqrt()


def unitary_eig(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral decomposition of unitary ``u`` (..., N, N), N >= 2, without autograd.

    Why not one fixed hermitian combination: ``H_a = herm(e^{-i a} u)`` has eigenvalues
    ``cos(phi_k - a)``, and two *distinct* eigenphases with midpoint ``m = (phi_j + phi_k) / 2 = a``
    (mod pi) give equal eigenvalues of ``H_a``: ``eigh`` then returns an arbitrary basis of
    their joint eigenspace and ``V^dagger u V`` is not diagonal. The gap of ``H_a`` between them is
    ``|sin(m - a)| |e^{i phi_j} - e^{i phi_k}|``, so the error of ``V`` is about ``eps / |sin(m - a)|``
    relative to the eigenvalue gap of ``u`` itself (a degenerate pair of ``u`` is harmless: any
    orthonormal basis of its eigenspace reconstructs ``u``).

    So the angle is chosen per matrix from ``K = P + 1`` candidates ``a_i = pi/2 + i pi / K``,
    ``P = N(N-1)/2`` pairs: each midpoint is within ``pi / 2K`` of at most one candidate, so some
    candidate has ``|sin(m - a)| >= sin(pi / 2K)`` for every pair (0.38 for SU(3)). ``a = pi/2``
    (the "sin" part; optimal for SU(2), whose midpoints are all 0) is tried on every matrix; the
    next candidates only on those whose ``V^dagger u V`` is still off-diagonal by more than
    ``16 eps`` (3.5 % of Haar SU(3) after the first), keeping the most diagonal result. The
    off-diagonal norm bounds the reconstruction error; the phases are ``angle(diag(V^dagger u V))``,
    mapped into (-pi, pi].
    """
    n = u.shape[-1]
    eps = torch.finfo(u.real.dtype).eps
    n_cand = n * (n - 1) // 2 + 1
    _, v = torch.linalg.eigh(_herm_part(u, -1j))
    r = dagger(v) @ u @ v
    res = _offdiag_norm(r)
    for i in range(1, n_cand):
        idx = (res > 16 * eps).nonzero(as_tuple=True)
        if idx[0].numel() == 0:
            break
        a = 0.5 * math.pi + i * math.pi / n_cand
        ub = u[idx]
        _, vb = torch.linalg.eigh(_herm_part(ub, complex(math.cos(a), -math.sin(a))))
        rb = dagger(vb) @ ub @ vb
        resb = _offdiag_norm(rb)
        better = resb < res[idx]
        keep = better[..., None, None]
        v = v.index_put(idx, torch.where(keep, vb, v[idx]))
        r = r.index_put(idx, torch.where(keep, rb, r[idx]))
        res = res.index_put(idx, torch.where(better, resb, res[idx]))
    phases = torch.angle(r.diagonal(dim1=-2, dim2=-1))
    # torch.angle gives -pi for e.g. -1 - 0j; the documented range is (-pi, pi]
    phases = torch.where(phases <= -math.pi, phases + 2 * math.pi, phases)
    return phases, v


class _UnitaryEig(torch.autograd.Function):
    """``u -> (phases, V)`` by :func:`unitary_eig`, with a backward for unitary ``u``.

    Why not autograd through ``eigh``: its backward divides by gaps of the *hermitian*
    combination (tiny at accidental degeneracies of that combination) and raises when
    ``Im diag(V^dagger gV)`` exceeds 1e-2, which float32 rounding alone reaches once ``|gV|`` is
    ~1e5 (seen in 4d SU(3) training), even for losses that do not depend on eigenvector phases.

    Here, with ``z = e^{i phi}`` and ``A = V^dagger du V``: ``d phi_k = Im(conj(z_k) A_kk)`` and
    ``dV = V C`` with ``C_jk = A_jk / (z_k - z_j)`` (j != k), skew-hermitian for tangent ``du``
    (``du = X u``, X anti-hermitian). So only the skew-hermitian part ``S`` of ``M = V^dagger gV``
    matters, and its diagonal (the dependence on eigenvector phases, zero for a well-defined
    loss) is dropped. The gradient is ``V F V^dagger`` with ``F_kk = i z_k g_k`` and
    ``F_jk = S_jk / conj(z_k - z_j)``, the last regularised as ``d / (|d|^2 + (16 eps)^2)`` so that
    exactly degenerate pairs contribute zero and near-degenerate ones stay finite.
    Gradients are exact along the group (all that the chain rule sees when ``u`` is a product
    of links); not twice differentiable.
    """

    @staticmethod
    def forward(ctx, u):
        with torch.no_grad():
            phases, vecs = unitary_eig(u)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(phases, vecs)
        return phases, vecs

    @staticmethod
    @once_differentiable
    def backward(ctx, g_phases, g_vecs):
        phases, vecs = ctx.saved_tensors
        z = torch.polar(torch.ones_like(phases), phases)
        f = torch.zeros_like(vecs)
        if g_phases is not None:
            f = f + torch.diag_embed(1j * z * g_phases)
        if g_vecs is not None:
            m = dagger(vecs) @ g_vecs
            skew = 0.5 * (m - dagger(m))
            d = z[..., None, :] - z[..., :, None]  # d[j, k] = z_k - z_j
            tiny = 16 * torch.finfo(phases.dtype).eps
            f = f + skew * d / (d.real.square() + d.imag.square() + tiny * tiny)
        return vecs @ f @ dagger(vecs)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype, dtype)


def _real_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


@lru_cache(maxsize=None)
def _generators(n: int, abelian: bool) -> torch.Tensor:
    """Generalised Gell-Mann matrices times i, orthonormal in the Frobenius metric."""
    if abelian:
        return torch.full((1, 1, 1), 1j, dtype=torch.complex128)
    gens = []
    for j in range(n):
        for k in range(j + 1, n):
            s = torch.zeros(n, n, dtype=torch.complex128)
            s[j, k] = s[k, j] = 1.0
            gens.append(1j * s / math.sqrt(2))
            a = torch.zeros(n, n, dtype=torch.complex128)
            a[j, k], a[k, j] = -1j, 1j
            gens.append(1j * a / math.sqrt(2))
    for l in range(1, n):
        d = torch.zeros(n, n, dtype=torch.complex128)
        d[:l, :l] = torch.eye(l)
        d[l, l] = -l
        gens.append(1j * d / math.sqrt(l * (l + 1)))
    return torch.stack(gens)


class U1(Group):
    """U(1) as 1x1 complex matrices ``e^{i theta}``."""

    name = "U(1)"
    N = 1
    dim = 1

    def project(self, m: torch.Tensor) -> torch.Tensor:
        return 1j * m.imag

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.polar(torch.ones_like(x.imag), x.imag)

    def log(self, u: torch.Tensor) -> torch.Tensor:
        return 1j * torch.angle(u)

    def eig(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.angle(u)[..., 0], torch.ones_like(u)

    def eigphases(self, u: torch.Tensor) -> torch.Tensor:
        return torch.angle(u)[..., 0]

    def random(self, shape, generator=None, dtype=torch.complex128, device=None) -> torch.Tensor:
        theta = 2 * math.pi * torch.rand(
            (*shape, 1, 1), generator=generator, dtype=_real_of(dtype), device=device
        )
        return torch.polar(torch.ones_like(theta), theta)

    def random_algebra(self, shape, generator=None, dtype=torch.complex128, device=None) -> torch.Tensor:
        w = torch.randn((*shape, 1, 1), generator=generator, dtype=_real_of(dtype), device=device)
        return torch.complex(torch.zeros_like(w), w)

    def reunitarize(self, u: torch.Tensor) -> torch.Tensor:
        return u / u.abs()

    def angle(self, u: torch.Tensor) -> torch.Tensor:
        """Phase in (-pi, pi] of U(1) elements, dropping the 1x1 matrix axes."""
        return torch.angle(u[..., 0, 0])

    def from_angle(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.polar(torch.ones_like(theta), theta)[..., None, None]


class SU(Group):
    """SU(N); closed-form exponential for N = 2 and N = 3 (Morningstar & Peardon, hep-lat/0311018)."""

    def __init__(self, n: int):
        if n < 2:
            raise ValueError(f"SU(N) needs N >= 2, got {n}")
        self.N = n
        self.name = f"SU({n})"
        self.dim = n * n - 1

    def __eq__(self, other) -> bool:
        return isinstance(other, SU) and other.N == self.N

    def __hash__(self) -> int:
        return hash(("SU", self.N))

    def project(self, m: torch.Tensor) -> torch.Tensor:
        a = 0.5 * (m - dagger(m))
        tr = trace(a) / self.N
        return a - tr[..., None, None] * eye_like(a)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        if self.N == 2:
            return _expm_su2(x)
        if self.N == 3:
            return _expm_su3(x)
        return torch.linalg.matrix_exp(x)

    def random(self, shape, generator=None, dtype=torch.complex128, device=None) -> torch.Tensor:
        # QR of a Ginibre matrix with the phases of R's diagonal fixed is Haar on U(N)
        # (Mezzadri, math-ph/0609050); dividing by det^(1/N) commutes with left
        # multiplication by SU(N), so the result is Haar on SU(N).
        n = self.N
        z = torch.randn((*shape, n, n), generator=generator, dtype=dtype, device=device)
        q, r = torch.linalg.qr(z)
        d = r.diagonal(dim1=-2, dim2=-1)
        q = q * (d / d.abs()).unsqueeze(-2)
        return _fix_det(q, n)

    def random_algebra(self, shape, generator=None, dtype=torch.complex128, device=None) -> torch.Tensor:
        # A hermitian matrix with N(0,1) coordinates along the orthonormal basis
        # {E_ii, (E_ij+E_ji)/sqrt2, i(E_ij-E_ji)/sqrt2}; the orthogonal projection
        # onto the traceless subspace keeps it isotropic there.
        n = self.N
        z = torch.randn((*shape, n, n), generator=generator, dtype=dtype, device=device)
        z = z * math.sqrt(2.0)  # complex randn has variance 1/2 per real component
        h = 0.5 * (z + dagger(z))
        h = h - (trace(h) / n)[..., None, None] * eye_like(h)
        return 1j * h

    def log(self, u: torch.Tensor) -> torch.Tensor:
        """Traceless logarithm: principal eigenphases, shifted by 2 pi where their sum is not 0.

        The sum of principal phases of an SU(N) element is 2 pi k; moving k of the
        largest (or -k of the smallest) phases down (up) by 2 pi makes it traceless.
        """
        phases, vecs = self.eig(u)
        k = torch.round(phases.sum(-1) / (2 * math.pi))
        order = torch.argsort(torch.argsort(phases, dim=-1, descending=True), dim=-1)
        down = order < k[..., None]
        up = order >= self.N + k[..., None]
        phases = phases - 2 * math.pi * down.to(phases.dtype) + 2 * math.pi * up.to(phases.dtype)
        d = torch.diag_embed(torch.complex(torch.zeros_like(phases), phases))
        return vecs @ d @ dagger(vecs)

    def reunitarize(self, u: torch.Tensor) -> torch.Tensor:
        # closest unitary matrix (polar decomposition), then remove the phase of det
        w, _, vh = torch.linalg.svd(u)
        return _fix_det(w @ vh, self.N)


def _fix_det(q: torch.Tensor, n: int) -> torch.Tensor:
    phase = torch.angle(torch.linalg.det(q))
    return q * torch.polar(torch.ones_like(phase), -phase / n)[..., None, None]


def _expm_su2(x: torch.Tensor) -> torch.Tensor:
    # X = i a.sigma  =>  X^2 = -|a|^2 and exp(X) = cos|a| + sinc(|a|) X
    a2 = (-0.5 * trace(mul(x, x)).real).clamp_min(0.0)
    a = a2.sqrt()
    c = torch.cos(a)[..., None, None]
    s = torch.sinc(a / math.pi)[..., None, None]  # sin(a)/a, smooth at 0
    return c * eye_like(x) + s * x


def _expm_su3(x: torch.Tensor) -> torch.Tensor:
    """exp(X) = f0 + f1 Q + f2 Q^2 with Q = -iX hermitian (Cayley-Hamilton; hep-lat/0311018 eqs. 16-30)."""
    q = -1j * x
    q2 = q @ q
    c0 = (trace(q2 @ q).real / 3.0)
    c1 = 0.5 * trace(q2).real
    # below this c1 the Taylor series to Q^4 is exact in double precision (error ~ c1^(5/2)/120)
    small = c1 < 1e-8
    c1s = torch.where(small, torch.ones_like(c1), c1)
    neg = c0 < 0
    c0a = torch.where(small, torch.zeros_like(c0), c0.abs())
    c0max = 2.0 * (c1s / 3.0) ** 1.5
    theta = torch.arccos((c0a / c0max).clamp(-1.0, 1.0))
    u = torch.sqrt(c1s / 3.0) * torch.cos(theta / 3.0)
    w = torch.sqrt(c1s) * torch.sin(theta / 3.0)
    xi0 = torch.sinc(w / math.pi)
    cw = torch.cos(w)
    e2iu = torch.polar(torch.ones_like(u), 2 * u)
    emiu = torch.polar(torch.ones_like(u), -u)
    h0 = (u * u - w * w) * e2iu + emiu * (8 * u * u * cw + 2j * u * (3 * u * u + w * w) * xi0)
    h1 = 2 * u * e2iu - emiu * (2 * u * cw - 1j * (3 * u * u - w * w) * xi0)
    h2 = e2iu - emiu * (cw + 3j * u * xi0)
    den = 9 * u * u - w * w
    f0, f1, f2 = h0 / den, h1 / den, h2 / den
    # c0 < 0: f_j(-c0) = (-1)^j conj(f_j(c0))
    f0 = torch.where(neg, f0.conj(), f0)
    f1 = torch.where(neg, -f1.conj(), f1)
    f2 = torch.where(neg, f2.conj(), f2)
    # Taylor branch: exp(iQ) = 1 + iQ - Q^2/2 - iQ^3/6 + Q^4/24 with Q^3 = c1 Q + c0 (CH)
    # and Q^4 = c1 Q^2 + c0 Q; dropped terms are O(c1^2)
    t0 = torch.complex(torch.ones_like(c0), -c0 / 6)
    t1 = torch.complex(c0 / 24, 1 - c1 / 6)
    t2 = torch.complex(c1 / 24 - 0.5, torch.zeros_like(c1))
    f0 = torch.where(small, t0.to(f0.dtype), f0)
    f1 = torch.where(small, t1.to(f1.dtype), f1)
    f2 = torch.where(small, t2.to(f2.dtype), f2)
    eye = eye_like(q)
    return f0[..., None, None] * eye + f1[..., None, None] * q + f2[..., None, None] * q2


_GROUP_ALIASES = {"u1": "u1", "u(1)": "u1"}


def get_group(name: str | Group) -> Group:
    """``"u1"`` / ``"U(1)"`` or ``"su2"``, ``"SU(3)"``, ``"suN"`` -> a group object."""
    if isinstance(name, Group):
        return name
    key = str(name).strip().lower().replace(" ", "")
    if _GROUP_ALIASES.get(key) == "u1":
        return U1()
    for prefix in ("su(", "su"):
        if key.startswith(prefix):
            digits = key[len(prefix):].rstrip(")")
            if digits.isdigit() and int(digits) >= 2:
                return SU(int(digits))
    raise ValueError(f"unknown gauge group {name!r}; use u1, su2, su3 or suN with N >= 2")
