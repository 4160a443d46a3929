"""How one training job spreads over processes: data-parallel replicas x lattice blocks.

The trainer talks to :class:`Parallel` only; with one process every method is the identity, so
the single-process path stays bitwise what it was. Ranks ``r`` hold lattice block
``r % prod(lattice_grid)`` of replica ``r // prod(lattice_grid)`` (:mod:`gaugeflow.distributed.domain`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from gaugeflow.distributed.init import DistContext, rank_seed
from gaugeflow.distributed.wire import from_wire, to_wire

STRATEGIES = ("none", "ddp", "fsdp")


class Parallel:
    """The process layout of a job and the few collectives a training loop needs.

    Args:
        ctx: the job's :class:`DistContext` (single process: no process group).
        shape: the global lattice extents.
        lattice_grid: ranks per lattice axis, or None (every rank holds whole configurations).
    """

    def __init__(self, ctx: DistContext, shape: Sequence[int], lattice_grid: Sequence[int] | None = None,
                 strategy: str = "ddp"):
        if strategy not in STRATEGIES:
            raise ValueError(f"dist.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        self.ctx = ctx
        self.strategy = strategy if ctx.is_distributed else "none"
        self.rank, self.world = ctx.rank, ctx.world_size
        self.decomp = None
        grid = [int(p) for p in lattice_grid] if lattice_grid else None
        if grid is not None and math.prod(grid) > 1:
            if not ctx.is_distributed:
                raise ValueError(f"dist.lattice_grid={grid} needs {math.prod(grid)} ranks per configuration, "
                                 "but this is a single process")
            from gaugeflow.distributed.domain import Decomposition

            with ctx.guard("lattice decomposition"):
                self.decomp = Decomposition(shape, grid)
        elif grid is not None and len(grid) != len(shape):
            raise ValueError(f"dist.lattice_grid={grid} needs one entry per lattice axis {list(shape)}")
        if self.decomp is not None and self.strategy == "fsdp":
            raise ValueError("dist.lattice_grid with dist.strategy=fsdp is not supported: use dist=ddp with a "
                             "lattice grid, or fsdp over whole configurations")
        self.replicas = self.decomp.dp_size if self.decomp else self.world
        self.replica = self.decomp.dp_index if self.decomp else self.rank
        self.local_shape = tuple(self.decomp.local_shape) if self.decomp else tuple(int(s) for s in shape)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.ctx.is_distributed

    def seed(self, seed: int) -> int:
        """This rank's sampling seed: the job's seed on one process, independent streams otherwise."""
        return int(seed) if not self.active else rank_seed(int(seed), self.rank)

    @contextlib.contextmanager
    def physics(self) -> Iterator[None]:
        """Where theories and models run: on this rank's block when the lattice is decomposed."""
        if self.decomp is None:
            yield
            return
        from gaugeflow.distributed.domain import decomposed

        with decomposed(self.decomp):
            yield

    def local_batch(self, batch: int) -> tuple[int, int]:
        """This replica's share of a global batch and the effective global batch.

        A global batch that the replicas do not divide is rounded up to the next multiple (12
        ranks per Aurora node must not turn a default of 256 into an error after the queue wait):
        returns ``(ceil(batch / replicas), replicas * ceil(batch / replicas))``.
        """
        per = -(-int(batch) // self.replicas)
        return per, per * self.replicas

    def prepare(self, model: torch.nn.Module, activation_checkpointing: bool = False,
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                reduce_dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
        """One initialisation on every rank, then FSDP2 sharding (``fsdp``) or activation checkpointing.
        Build the optimizer afterwards. ``reduce_dtype`` applies under mixed precision
        (``param_dtype``): bfloat16 gradient sums lose the small updates, so float32 by default;
        without it gradients are reduced in the model's dtype."""
        self.broadcast_parameters(model)
        if self.strategy == "fsdp":
            from gaugeflow.distributed.fsdp import shard_flow_model

            return shard_flow_model(model, reshard_after_forward=reshard_after_forward, param_dtype=param_dtype,
                                    reduce_dtype=reduce_dtype if param_dtype is not None else None,
                                    activation_checkpointing=activation_checkpointing)
        if param_dtype is not None:
            raise ValueError("dist.param_dtype (mixed precision) needs dist.strategy=fsdp")
        if activation_checkpointing:
            from gaugeflow.distributed.fsdp import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        return model

    # -- collectives ----------------------------------------------------------------------
    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's initial weights everywhere (they agree already when seeded alike; this makes sure)."""
        if not self.active:
            return
        with self.ctx.guard("broadcast of the initial weights"), torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Gradients of the global batch mean on every rank (sum over lattice blocks, mean over replicas)."""
        params = [p for p in parameters if p.requires_grad]
        if not self.active or self.strategy == "fsdp":  # FSDP reduce-scatters in backward
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with self.ctx.guard("gradient all-reduce"):
            if self.decomp is not None:
                self.decomp.reduce_gradients(params)
            else:
                from gaugeflow.distributed.fsdp import allreduce_gradients

                allreduce_gradients(params)

    def gather_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample values of every replica's batch, concatenated (replica order)."""
        if not self.active or self.replicas == 1:
            return t
        group = self.decomp.dp_group if self.decomp is not None else None
        wire = to_wire(t)
        parts = [torch.empty_like(wire) for _ in range(self.replicas)]
        with self.ctx.guard("all-gather"):
            dist.all_gather(parts, wire, group=group)
        return from_wire(torch.cat(parts), t.dtype)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (stop decisions must agree)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.ctx.device)
        with self.ctx.guard("stop agreement"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (a small picklable value such as the run directory) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        with self.ctx.guard("broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.is_main else None
        with self.ctx.guard("gather"):
            dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        self.ctx.barrier()
