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

        A normal matrix is diagonalised by the hermitian ``cos`` and ``sin`` parts it
        commutes with; ``eigh`` of a generic combination of them returns an
        orthonormal basis even for degenerate eigenphases, where ``linalg.eig`` does not.
        """
        c = 0.6180339887498949  # generic mixing: no accidental degeneracy of cos + c sin
        h = 0.5 * (u + dagger(u)) - 0.5j * c * (u - dagger(u))
        _, vecs = torch.linalg.eigh(h)
        phases = torch.angle((dagger(vecs) @ u @ vecs).diagonal(dim1=-2, dim2=-1))
        return phases, vecs

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
