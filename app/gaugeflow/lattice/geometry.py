"""Periodic hypercuboidal lattices of any dimension.

Field layout (DESIGN.md): the batch axis comes first and the d lattice axes follow
it, ``(batch, L_0, ..., L_{d-1}, *internal)``; a gauge field ``U`` of shape
``(batch, d, L_0, ..., L_{d-1}, N, N)`` is indexed ``U[:, mu]`` to get such a
site field for direction mu.

Every neighbour access in the physics modules goes through :func:`shift`. A
domain-decomposed run replaces the periodic ``torch.roll`` by a halo exchange
with :func:`use_shift`, without touching actions, observables or flows.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

ShiftFn = Callable[[torch.Tensor, int, int], torch.Tensor]
PadFn = Callable[[torch.Tensor, int, int, int], torch.Tensor]

_SHIFT_IMPL: contextvars.ContextVar[ShiftFn | None] = contextvars.ContextVar(
    "gaugeflow_shift_impl", default=None
)
_PAD_IMPL: contextvars.ContextVar[PadFn | None] = contextvars.ContextVar("gaugeflow_pad_impl", default=None)


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
    def volume(self) -> int:
        v = 1
        for s in self.shape:
            v *= s
        return v

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
    """Integer coordinates, shape ``(d, L_0, ..., L_{d-1})``."""
    axes = [torch.arange(s, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def checkerboard(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Parity ``(sum_mu x_mu) mod 2`` of every site, shape ``(L_0, ..., L_{d-1})``."""
    return coordinates(shape, device).sum(0) % 2
