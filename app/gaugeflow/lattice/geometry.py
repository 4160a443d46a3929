"""Periodic hypercuboidal lattices of any dimension.

Field layout (DESIGN.md): the batch axis comes first and the d lattice axes follow
it, ``(batch, L_0, ..., L_{d-1}, *internal)``; a gauge field ``U`` of shape
``(batch, d, L_0, ..., L_{d-1}, N, N)`` is indexed ``U[:, mu]`` to get such a
site field for direction mu.

Every neighbour access in the physics modules goes through :func:`shift`. A
domain-decomposed run replaces the periodic ``torch.roll`` by a halo exchange
with :func:`use_shift`, without touching actions, observables or flows.

The other hooks a decomposition (:mod:`gaugeflow.distributed.domain`) installs with
:func:`use_domain`: :func:`site_sum` / :func:`site_reduce` complete a sum over this
block's sites into the sum over the whole lattice, :func:`global_shape` gives the extents
of the whole lattice (volumes and means divide by them), and :func:`coordinates` counts
from the block's global origin, so checkerboards and coupling masks built for a block
are the global ones restricted to it, and :func:`site_max` makes a decision for the whole
configuration (convergence of a fixed-point solve, a bound check that raises) the same on
every block. Without a domain all of them are the plain single-process operations.

``shift`` and ``pad`` take any depth: a loop or receptive field that reaches ``n`` sites asks
for ``shift(f, mu, n)`` or ``pad(f, mu, n)``, and a decomposed lattice fetches that many sites
(from several blocks if ``n`` exceeds a block); no layer needs a halo of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

ShiftFn = Callable[[torch.Tensor, int, int], torch.Tensor]
PadFn = Callable[[torch.Tensor, int, int, int], torch.Tensor]

_SHIFT_IMPL: contextvars.ContextVar[ShiftFn | None] = contextvars.ContextVar(
    "gaugeflow_shift_impl", default=None
)
_PAD_IMPL: contextvars.ContextVar[PadFn | None] = contextvars.ContextVar("gaugeflow_pad_impl", default=None)


class Domain(Protocol):
    """What the site-sum, volume and coordinate hooks ask of a domain decomposition."""

    def site_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The whole lattice's sum from this block's partial sum (differentiable)."""

    def global_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Extents of the whole lattice whose block has extents ``shape``."""

    def site_max(self, partial: torch.Tensor) -> torch.Tensor:
        """The whole lattice's maximum from this block's maximum (not differentiable; NaN wins).

        Optional: a domain without it makes :func:`site_max` the block's own maximum."""

    def origin(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Global coordinates of the first site of the block of extents ``shape``."""


_DOMAIN: contextvars.ContextVar[Domain | None] = contextvars.ContextVar("gaugeflow_domain", default=None)


def shift(field: torch.Tensor, mu: int, n: int = 1) -> torch.Tensor:
    """Return ``g`` with ``g[b, x] = field[b, x + n * mu_hat]`` (periodic).

    ``field`` has the batch axis first and lattice axes ``1 .. d``; trailing
    internal axes (colour indices) are carried along. ``shift(f, mu, +1)`` is
    the forward neighbour ``f(x + mu)``, ``shift(f, mu, -1)`` the backward one.
    """
    impl = _SHIFT_IMPL.get()
    if impl is not None:
        return impl(field, mu, n)
    return torch.roll(field, shifts=-n, dims=1 + mu)


def pad(field: torch.Tensor, mu: int, width: int, lead: int = 1) -> torch.Tensor:
    """Extend lattice axis mu by ``width`` periodic-image sites on each side (a halo).

    ``lead`` is the number of axes before the lattice axes (1 for ``(batch, *L)``, 2 for
    channels-first ``(batch, C, *L)``). The result has extent ``L_mu + 2 width`` along axis
    ``lead + mu``; index ``width + x`` holds site x. Convolutions read their
    neighbourhoods from such halos, which a domain-decomposed lattice fills by
    communication instead.
    """
    impl = _PAD_IMPL.get()
    if impl is not None:
        return impl(field, mu, width, lead)
    return periodic_pad(field, mu, width, lead)


def periodic_pad(field: torch.Tensor, mu: int, width: int, lead: int = 1) -> torch.Tensor:
    """:func:`pad` of a field that holds the whole of axis mu (no halo exchange)."""
    if width == 0:
        return field
    dim = lead + mu
    n = field.shape[dim]
    if width > n:
        # a halo wider than the lattice wraps more than once
        reps = -(-width // n)
        field_rep = torch.cat([field] * (2 * reps + 1), dim=dim)
        return field_rep.narrow(dim, reps * n - width, n + 2 * width)
    return _PeriodicHalo.apply(field, dim, width)


class _PeriodicHalo(torch.autograd.Function):
    """Halo by concatenation; the backward folds the halo gradients back onto the edges.

    Autograd's own backward of the two edge slices would zero-fill two full-size tensors
    per call, which dominated the cost of the convolutions' halos.
    """

    @staticmethod
    def forward(ctx, field, dim, width):
        ctx.dim, ctx.width = dim, width
        n = field.shape[dim]
        return torch.cat([field.narrow(dim, n - width, width), field, field.narrow(dim, 0, width)], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        dim, w = ctx.dim, ctx.width
        n = grad.shape[dim] - 2 * w
        g = grad.narrow(dim, w, n).clone()
        g.narrow(dim, n - w, w).add_(grad.narrow(dim, 0, w))
        g.narrow(dim, 0, w).add_(grad.narrow(dim, n + w, w))
        return g, None, None


@contextlib.contextmanager
def use_shift(fn: ShiftFn, pad_fn: PadFn | None = None) -> Iterator[None]:
    """Route every :func:`shift` (and, if given, :func:`pad`) in this context through the given functions."""
    token = _SHIFT_IMPL.set(fn)
    ptoken = _PAD_IMPL.set(pad_fn) if pad_fn is not None else None
    try:
        yield
    finally:
        _SHIFT_IMPL.reset(token)
        if ptoken is not None:
            _PAD_IMPL.reset(ptoken)


@contextlib.contextmanager
def use_domain(domain: Domain) -> Iterator[None]:
    """Route :func:`site_sum`, :func:`global_shape` and :func:`coordinates` through ``domain``."""
    token = _DOMAIN.set(domain)
    try:
        yield
    finally:
        _DOMAIN.reset(token)


def site_reduce(partial: torch.Tensor) -> torch.Tensor:
    """Complete a per-configuration sum over this block's sites into the sum over all sites.

    For sums that are already taken (e.g. by a fused kernel); the identity without a domain.
    """
    domain = _DOMAIN.get()
    return partial if domain is None else domain.site_reduce(partial)


def site_sum(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``x.sum(dims)`` over the lattice axes ``dims``, summed over the whole lattice on a decomposed run."""
    # no axes: x itself (torch's x.sum(()) would sum over every axis)
    dims = tuple(dims)
    partial = x.sum(dims) if dims else x
    domain = _DOMAIN.get()
    return partial if domain is None else domain.site_reduce(partial)


def site_max(partial: torch.Tensor) -> torch.Tensor:
    """Complete this block's maximum ``partial`` (any shape, elementwise) into the whole lattice's.

    For decisions that must be taken for the whole configuration and identically on every rank
    of a decomposed lattice (the convergence test of a fixed-point solve, a bound check that
    raises): a NaN on any block gives NaN everywhere. Not differentiable (the result is detached);
    the identity (detached) without a domain.
    """
    domain = _DOMAIN.get()
    partial = partial.detach()
    fn = None if domain is None else getattr(domain, "site_max", None)
    return partial if fn is None else fn(partial)


def site_mean(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``x.mean(dims)`` over *all* lattice axes ``dims`` (in order), over the whole lattice."""
    domain = _DOMAIN.get()
    dims = tuple(dims)
    if domain is None:
        return x.mean(dims)
    n = math.prod(domain.global_shape(tuple(x.shape[i] for i in dims)))
    return domain.site_reduce(x.sum(dims)) / n


def global_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Extents of the whole lattice of which a field of extents ``shape`` is the local block."""
    domain = _DOMAIN.get()
    shape = tuple(int(s) for s in shape)
    return shape if domain is None else tuple(domain.global_shape(shape))


def local_origin(shape: Sequence[int]) -> tuple[int, ...]:
    """Global coordinates of site 0 of the local block of extents ``shape`` (zeros without a domain)."""
    domain = _DOMAIN.get()
    return (0,) * len(shape) if domain is None else tuple(domain.origin(tuple(int(s) for s in shape)))


def validate_shape(shape: Sequence[int], key: str = "lattice.shape") -> tuple[int, ...]:
    """Check a lattice shape; raise ``ValueError`` naming ``key`` if it is not usable."""
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a list of positive integers, got {shape!r}") from None
    if len(dims) == 0:
        raise ValueError(f"{key} must have at least one extent, got {list(shape)!r}")
    if any(d != s for d, s in zip(dims, shape)) or any(d < 1 for d in dims):
        raise ValueError(f"{key} must be a list of positive integers, got {list(shape)!r}")
    return dims


@dataclass(frozen=True)
class Lattice:
    """A periodic lattice of extents ``shape = (L_0, ..., L_{d-1})``."""

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", validate_shape(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def global_shape(self) -> tuple[int, ...]:
        """Extents of the whole lattice; ``shape`` itself except on a decomposed run (:func:`use_domain`)."""
        return global_shape(self.shape)

    @property
    def volume(self) -> int:
        """Number of sites of the whole lattice (on a decomposed run, not of the local block)."""
        return math.prod(self.global_shape)

    @property
    def planes(self) -> list[tuple[int, int]]:
        """Ordered planes ``(mu, nu)`` with ``mu < nu``."""
        return [(mu, nu) for mu in range(self.ndim) for nu in range(mu + 1, self.ndim)]

    @property
    def n_plaquettes(self) -> int:
        return self.volume * self.ndim * (self.ndim - 1) // 2

    def link_shape(self, batch: int, n: int) -> tuple[int, ...]:
        return (batch, self.ndim, *self.shape, n, n)

    def site_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.shape)


def coordinates(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer coordinates, shape ``(d, L_0, ..., L_{d-1})``.

    Global ones: on a decomposed run the block's origin is added, so parities, masks and
    checkerboards of the block agree with those of the whole lattice.
    """
    origin = local_origin(shape)
    axes = [torch.arange(o, o + s, device=device) for o, s in zip(origin, shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def checkerboard(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Parity ``(sum_mu x_mu) mod 2`` of every site, shape ``(L_0, ..., L_{d-1})``."""
    return coordinates(shape, device).sum(0) % 2
