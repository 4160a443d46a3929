"""Lattice domain decomposition: one configuration split into blocks over a grid of ranks.

``dist.lattice_grid = [P_0, ..., P_{d-1}]`` cuts lattice axis mu into ``P_mu`` equal blocks;
the ``prod(P)`` ranks holding the blocks of one configuration form a *lattice group*. A world
of ``prod(P) * D`` ranks runs D such groups side by side (data parallel over the remaining
ranks): global rank ``r`` is lattice rank ``r % prod(P)`` of data-parallel replica
``r // prod(P)``, so the ranks of one lattice group are consecutive (on one node, where the
halo traffic is cheapest).

Physics code is unchanged: :func:`decomposed` installs, through the hooks of
:mod:`gaugeflow.lattice.geometry`,

* ``shift`` and ``pad`` that take the sites beyond the block from the neighbouring blocks by
  point-to-point messages (a differentiable halo exchange, :class:`_Fetch`);
* ``site_sum``: the block's sum followed by an all-reduce over the lattice group
  (:class:`_SiteAllReduce`), so actions, log-densities and log-Jacobians are those of the
  whole configuration, identical on every rank of the group;
* global coordinates (checkerboards and coupling masks of a block are the global ones
  restricted to it) and the global shape (volumes and means).

Axes with one rank keep the local periodic implementation and never communicate.

Gradients. Everything downstream of a site sum is computed redundantly (and identically) on
every rank of a lattice group, so the all-reduce's backward is the *identity*: each rank's
upstream gradient already is the whole gradient (as for Megatron's reduce-from-tensor-parallel
region). ``torch.distributed.nn.functional.all_reduce`` back-propagates an all-reduce of the
gradient instead, which multiplies every field gradient (HMC forces by autograd, path
gradients) by the group size; it is not used. The halo exchange's backward is its adjoint:
halo gradients go back to the ranks owning those sites and are added there. Hence autograd
gives every rank exactly its block of the single-process gradient with respect to the field.
A parameter is used on every block, so its single-process gradient is the *sum* over the
lattice group of the ranks' gradients; :meth:`Decomposition.reduce_gradients` sums over the
lattice group and averages over data-parallel replicas. (A parameter used after a site sum,
on the replicated part, would be counted once per block by that sum; no model has one.)

Usage (every rank of the world; see docs/domain_decomposition.md)::

    d = Decomposition((16, 16, 16, 16), lattice_grid=(2, 2, 1, 1))
    local = build_theory(cfg.theory, d.local_shape)
    with decomposed(d):
        model = sun_spectral(local)             # masks of the local block, global parities
        d.broadcast_parameters(model)         # one initialisation for all ranks
        x, log_q = model.sample(batch, gen)   # gen seeded per rank: blocks are independent
        loss = (log_q + local.action(x)).mean()
        loss.backward()
        d.reduce_gradients(model.parameters())
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from gaugeflow.distributed.wire import from_wire, to_wire
from gaugeflow.lattice import geometry

__all__ = ["Decomposition", "decomposed", "grid_layout"]

#: a block must be a whole number of mask periods: checkerboards and gauge masks repeat every 2 sites
MASK_PERIOD = 2


def grid_layout(
    shape: Sequence[int], lattice_grid: Sequence[int], lattice_rank: int, period: int = MASK_PERIOD
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(block_coords, local_shape, origin)`` of lattice rank ``lattice_rank`` (row-major grid).

    Raises ``ValueError`` naming ``dist.lattice_grid`` if the grid does not cut ``shape`` into
    equal blocks whose split extents are multiples of ``period``.
    """
    shape = geometry.validate_shape(shape)
    try:
        grid = tuple(int(p) for p in lattice_grid)
    except (TypeError, ValueError):
        raise ValueError(f"dist.lattice_grid must be a list of positive integers, got {lattice_grid!r}") from None
    if len(grid) != len(shape) or any(p < 1 for p in grid):
        raise ValueError(
            f"dist.lattice_grid={list(lattice_grid)} must give a positive number of ranks for each of the "
            f"{len(shape)} axes of lattice.shape={list(shape)}"
        )
    if any(s % p for s, p in zip(shape, grid)):
        raise ValueError(f"dist.lattice_grid={list(grid)} does not divide lattice.shape={list(shape)} evenly")
    local = tuple(s // p for s, p in zip(shape, grid))
    if any(p > 1 and n % period for n, p in zip(local, grid)):
        raise ValueError(
            f"dist.lattice_grid={list(grid)} cuts lattice.shape={list(shape)} into blocks {list(local)}; "
            f"every split axis needs a local extent that is a multiple of {period} (the period of "
            f"checkerboards and gauge coupling masks)"
        )
    size = math.prod(grid)
    if not 0 <= lattice_rank < size:
        raise ValueError(f"lattice rank {lattice_rank} out of range for dist.lattice_grid={list(grid)}")
    coords, rest = [], lattice_rank
    for p in reversed(grid):
        coords.append(rest % p)
        rest //= p
    coords = tuple(reversed(coords))
    origin = tuple(c * n for c, n in zip(coords, local))
    return coords, local, origin


def _resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a lazy conjugation or negation bit materialised (``to_wire`` cannot view those as real)."""
    return t.resolve_conj().resolve_neg()


class _Fetch(torch.autograd.Function):
    """``out[i]`` on the block at grid coordinate ``c`` is ``slabs[i]`` of the block at ``c + qs[i]``
    along ``axis`` (periodic in the grid): every rank sends its slab i to the block ``qs[i]``
    behind it and receives from the one ``qs[i]`` ahead. The adjoint fetches with ``-qs``.
    """

    @staticmethod
    def forward(ctx, decomp, axis, qs, *slabs):
        ctx.decomp, ctx.axis, ctx.qs = decomp, axis, qs
        return tuple(decomp._exchange(axis, qs, slabs))

    @staticmethod
    def backward(ctx, *grads):
        # apply (not _exchange) so that the backward is itself differentiable
        back = _Fetch.apply(ctx.decomp, ctx.axis, tuple(-q for q in ctx.qs), *grads)
        return (None, None, None, *back)


class _SiteAllReduce(torch.autograd.Function):
    """Sum of the blocks' partial sums over the lattice group; the backward is the identity
    (module docstring: the loss downstream is replicated on every rank of the group)."""

    @staticmethod
    def forward(ctx, partial, group):
        out = _resolved(partial).clone(memory_format=torch.contiguous_format)
        dist.all_reduce(to_wire(out), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Decomposition:
    """The block of a lattice of extents ``shape`` that this rank holds, and its communication.

    Args:
        shape: global lattice extents ``(L_0, ..., L_{d-1})``.
        lattice_grid: ranks per axis ``(P_0, ..., P_{d-1})`` (``dist.lattice_grid``).
        period: split axes need local extents that are multiples of it (coupling masks).

    Needs an initialised default process group whose size is a multiple of ``prod(lattice_grid)``.
    Every rank of the world must construct it (it creates the subgroups collectively).

    Attributes: ``global_shape``, ``lattice_grid``, ``coords`` (this block's grid coordinates),
    ``local_shape``, ``origin`` (global coordinates of its first site), ``lattice_rank`` /
    ``lattice_size`` / ``group`` (the lattice group), ``dp_index`` / ``dp_size`` / ``dp_group``
    (this rank's data-parallel replica and the group of ranks holding the same block).
    """

    def __init__(self, shape: Sequence[int], lattice_grid: Sequence[int], period: int = MASK_PERIOD):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Decomposition needs an initialised torch.distributed default process group")
        world, rank = dist.get_world_size(), dist.get_rank()
        grid_layout(shape, lattice_grid, 0, period)  # validates, raising errors that name dist.lattice_grid
        grid = tuple(int(p) for p in lattice_grid)
        size = math.prod(grid)
        if world % size:
            raise ValueError(
                f"dist.lattice_grid={list(grid)} needs {size} ranks per configuration, which does not "
                f"divide the world size {world}"
            )
        self.lattice_size, self.dp_size = size, world // size
        self.lattice_rank, self.dp_index = rank % size, rank // size
        self.coords, self.local_shape, self.origin = grid_layout(shape, grid, self.lattice_rank, period)
        self.global_shape = tuple(int(s) for s in shape)
        self.lattice_grid = grid
        if self.dp_size == 1:
            self.group = dist.group.WORLD
            self.dp_group = None
        else:
            # new_group is collective over the world: every rank creates every group, in order
            self.group = self.dp_group = None
            for i in range(self.dp_size):
                g = dist.new_group(list(range(i * size, (i + 1) * size)))
                if i == self.dp_index:
                    self.group = g
            for j in range(size):
                g = dist.new_group(list(range(j, world, size)))
                if j == self.lattice_rank:
                    self.dp_group = g

    def __repr__(self) -> str:
        return (
            f"Decomposition(shape={list(self.global_shape)}, lattice_grid={list(self.lattice_grid)}, "
            f"coords={list(self.coords)}, local_shape={list(self.local_shape)}, dp={self.dp_index}/{self.dp_size})"
        )

    # -- geometry ---------------------------------------------------------------------------
    def _peer(self, axis: int, q: int) -> int:
        """Lattice-group rank of the block ``q`` steps along ``axis`` (periodic)."""
        c = list(self.coords)
        c[axis] = (c[axis] + q) % self.lattice_grid[axis]
        r = 0
        for ci, p in zip(c, self.lattice_grid):
            r = r * p + ci
        return r

    def _check(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if shape != self.local_shape:
            raise ValueError(
                f"a field with lattice extents {list(shape)} inside a decomposition of lattice.shape="
                f"{list(self.global_shape)} with dist.lattice_grid={list(self.lattice_grid)}: expected the "
                f"local block {list(self.local_shape)} (build theories and models for d.local_shape)"
            )
        return shape

    def global_shape_of(self, shape: Sequence[int]) -> tuple[int, ...]:
        self._check(shape)
        return self.global_shape

    def origin_of(self, shape: Sequence[int]) -> tuple[int, ...]:
        self._check(shape)
        return self.origin

    # -- communication ----------------------------------------------------------------------
    def _exchange(self, axis: int, qs: Sequence[int], slabs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``slabs[i]`` to the block ``qs[i]`` behind, receive the one ``qs[i]`` ahead: all at once."""
        # autograd hands the adjoint lazily conjugated / negated views (the backward of a dagger):
        # gloo needs their values materialised
        sends = [to_wire(_resolved(s)) for s in slabs]
        recvs = [torch.empty_like(b) for b in sends]
        reqs = []
        for tag, (q, sb, rb) in enumerate(zip(qs, sends, recvs)):
            # a distinct tag per piece: with two ranks on the axis both pieces of a halo
            # travel between the same pair of ranks
            reqs.append(dist.isend(sb, group=self.group, group_dst=self._peer(axis, -q), tag=tag))
            reqs.append(dist.irecv(rb, group=self.group, group_src=self._peer(axis, q), tag=tag))
        for r in reqs:
            r.wait()
        return [from_wire(rb, s.dtype) for rb, s in zip(recvs, slabs)]

    def window(self, field: torch.Tensor, axis: int, dim: int, start: int, length: int) -> torch.Tensor:
        """Sites ``origin + start .. origin + start + length - 1`` (global, periodic) of lattice axis
        ``axis`` (tensor axis ``dim``): the local ones by slicing, the others by a halo exchange."""
        n = field.shape[dim]
        if n != self.local_shape[axis]:
            lead = dim - axis
            self._check(field.shape[lead : lead + len(self.local_shape)])
        p = self.lattice_grid[axis]
        pieces = []  # (q, lo, hi): sites lo..hi-1 of the block q steps ahead
        pos, end = start, start + length
        while pos < end:
            q = pos // n
            lo, hi = pos - q * n, min(end - q * n, n)
            pieces.append((q, lo, hi))
            pos = q * n + hi
        remote = [i for i, (q, _, _) in enumerate(pieces) if q % p]
        parts = [field.narrow(dim, lo, hi - lo) for _, lo, hi in pieces]
        if remote:
            got = _Fetch.apply(self, axis, tuple(pieces[i][0] for i in remote), *(parts[i] for i in remote))
            for i, g in zip(remote, got):
                parts[i] = g
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def shift(self, field: torch.Tensor, mu: int, n: int = 1) -> torch.Tensor:
        """:func:`gaugeflow.lattice.shift` of a block ``(batch, *local_shape, ...)``."""
        if self.lattice_grid[mu] == 1:
            return torch.roll(field, shifts=-n, dims=1 + mu)
        return self.window(field, mu, 1 + mu, n, field.shape[1 + mu])

    def pad(self, field: torch.Tensor, mu: int, width: int, lead: int = 1) -> torch.Tensor:
        """:func:`gaugeflow.lattice.pad` of a block: the halo holds the neighbouring blocks' sites."""
        if self.lattice_grid[mu] == 1 or width == 0:
            return geometry.periodic_pad(field, mu, width, lead)
        dim = lead + mu
        return self.window(field, mu, dim, -width, field.shape[dim] + 2 * width)

    def site_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the whole lattice from this block's partial sum (identity backward)."""
        if self.lattice_size == 1:
            return partial
        return _SiteAllReduce.apply(partial, self.group)

    def site_max(self, partial: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of the blocks' ``partial`` over the lattice group (detached; NaN on any
        block gives NaN: gloo's MAX would drop it)."""
        partial = partial.detach()
        if self.lattice_size == 1:
            return partial
        nan = torch.isnan(partial)
        buf = torch.stack([torch.where(nan, torch.full_like(partial, math.inf), partial), nan.to(partial.dtype)])
        buf = buf.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return torch.where(buf[1] > 0, torch.full_like(partial, math.nan), buf[0])

    # -- whole fields (tests, I/O) ----------------------------------------------------------
    def scatter(self, field: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """This rank's block of a global ``field`` whose lattice axes start at ``lead``
        (1 for ``(batch, *L)``, 2 for links ``(batch, d, *L, N, N)``). No communication:
        every rank passes the whole field. Differentiable (a slice)."""
        for mu, (o, n) in enumerate(zip(self.origin, self.local_shape)):
            field = field.narrow(lead + mu, o, n)
        return field.contiguous()

    def gather(self, block: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """The whole field on every rank of the lattice group from each rank's ``block``."""
        if self.lattice_size == 1:
            return block.detach().clone()
        wire = to_wire(_resolved(block.detach()))
        bufs = [torch.empty_like(wire) for _ in range(self.lattice_size)]
        dist.all_gather(bufs, wire, group=self.group)
        d = len(self.global_shape)
        out_shape = list(block.shape)
        out_shape[lead : lead + d] = self.global_shape
        out = block.new_empty(out_shape)
        for r, b in enumerate(bufs):
            _, _, origin = grid_layout(self.global_shape, self.lattice_grid, r, 1)
            view = out
            for mu, (o, n) in enumerate(zip(origin, self.local_shape)):
                view = view.narrow(lead + mu, o, n)
            view.copy_(from_wire(b, block.dtype))
        return out

    # -- parameters -------------------------------------------------------------------------
    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum parameter gradients over the lattice group and average them over replicas.

        Then every rank holds the single-process gradient of the mean of the replicas' losses.
        (A DDP wrapper over the whole world would average over the lattice group as well and
        give ``1 / lattice_size`` of it.) One all-reduce over the world does both.
        """
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads or dist.get_world_size() == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(to_wire(flat))
        if self.dp_size > 1:
            flat /= self.dp_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_parameters(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy parameters and buffers of global rank ``src`` to every rank (one initialisation)."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                buf = to_wire(t.data)  # a view of t when t is contiguous, else a copy written back
                dist.broadcast(buf, src)
                if not t.data.is_contiguous():
                    t.data.copy_(from_wire(buf, t.dtype))


class _DomainHooks:
    """The :class:`gaugeflow.lattice.geometry.Domain` face of a decomposition."""

    def __init__(self, decomp: Decomposition):
        self.decomp = decomp

    def site_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.decomp.site_reduce(partial)

    def global_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.decomp.global_shape_of(shape)

    def site_max(self, partial: torch.Tensor) -> torch.Tensor:
        return self.decomp.site_max(partial)

    def origin(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.decomp.origin_of(shape)


@contextlib.contextmanager
def decomposed(decomp: Decomposition) -> Iterator[Decomposition]:
    """Run the physics on ``decomp``'s local block: shifts, halos, site sums, coordinates and
    volumes of :mod:`gaugeflow.lattice` become those of the whole lattice.

    Build models inside it, for the local block (``build_model(cfg.model, theory_for(local_shape), dtype)``):
    masks are built once from coordinates, which must be the global ones.
    """
    with geometry.use_shift(decomp.shift, decomp.pad), geometry.use_domain(_DomainHooks(decomp)):
        yield decomp
