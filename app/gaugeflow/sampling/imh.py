"""Independence Metropolis–Hastings over flow proposals.

The flow-based Markov chain of Albergo, Kanwar & Shanahan, "Flow-based generative
models for Markov chain Monte Carlo in lattice field theory", Phys. Rev. D 100 (2019)
034515, arXiv:1904.12072: proposals ``x'`` are independent draws of the model q, and
the chain moves from ``x`` to ``x'`` with probability ``min(1, w(x') / w(x))``, where
``w = p~ / q`` and ``log w = log p~ - log q = -S - log q`` (p~ unnormalised). The chain
is exact for p whatever q is, provided q covers p.

The decisions depend only on the sequence of log weights and of uniform numbers, so
proposals can be fed in batches of any size: :class:`IndependenceMetropolis` carries the
chain state (the index and log weight of the current configuration) from one batch to
the next and produces the same chain as one pass over all proposals.

>>> imh = IndependenceMetropolis(torch.Generator().manual_seed(0))
>>> accepted, current = imh.step(torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
>>> accepted.tolist(), current.tolist()  # equal weights: every proposal is accepted
([True, True, True], [0, 1, 2])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class IndependenceMetropolis:
    """Independence Metropolis chain over a stream of proposals given by their log weights.

    ``generator`` is a CPU :class:`torch.Generator`: the uniform numbers are drawn on
    the CPU in float64 whatever device made the proposals, so the chain does not depend
    on the device, and ``torch.rand`` on the CPU yields the same stream however it is
    split into batches.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator
        #: proposals seen so far (the global index of the next proposal)
        self.n_seen = 0
        #: global index of the chain's current configuration; -1 before the first proposal
        self.current = -1
        #: log weight of the current configuration (float64)
        self.current_log_w = -math.inf
        #: proposals accepted so far, the first one included
        self.n_accepted = 0

    def step(self, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the chain over the next proposals, in order.

        ``log_w``: log weights ``log p~ - log q`` of the proposals, shape ``(b,)``. A NaN
        weight counts as ``-inf`` (a proposal of zero weight is never accepted, unless it
        is the first one). Returns ``accepted`` (bool, ``(b,)``) and ``current`` (int64,
        ``(b,)``): the global index of the proposal that is the chain's configuration after
        each step. A rejected step repeats the previous configuration, with its own log q
        and log p, which is why the index rather than a flag is returned. The first proposal
        of the chain is always accepted: it starts the chain.
        """
        lw = log_w.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        lw = torch.nan_to_num(lw, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        b = lw.numel()
        # on the CPU, explicitly: never torch's default device (which may be an accelerator)
        log_u = torch.log(torch.rand(b, generator=self.generator, dtype=torch.float64, device="cpu"))
        accepted = [False] * b
        current = [0] * b
        c, cw, base = self.current, self.current_log_w, self.n_seen
        # a Python loop over floats: the chain is sequential, and per-element torch calls
        # would cost far more than the arithmetic
        for i, (u, w) in enumerate(zip(log_u.tolist(), lw.tolist())):
            # -inf - (-inf) is NaN and compares False: a zero-weight state is left only for a
            # proposal of nonzero weight
            if c < 0 or u < w - cw:
                c, cw = base + i, w
                accepted[i] = True
            current[i] = c
        self.current, self.current_log_w = c, cw
        self.n_seen += b
        n_acc = sum(accepted)
        self.n_accepted += n_acc
        return (torch.tensor(accepted, dtype=torch.bool, device="cpu"),
                torch.tensor(current, dtype=torch.int64, device="cpu"))

    @property
    def acceptance(self) -> float:
        """Fraction of proposals accepted so far."""
        return self.n_accepted / self.n_seen if self.n_seen else math.nan


def independence_metropolis(log_w: torch.Tensor, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of :class:`IndependenceMetropolis` over all proposals: ``(accepted, current)``."""
    return IndependenceMetropolis(generator).step(log_w)


def gather_chain(current: torch.Tensor, offset: int, batch: torch.Tensor,
                 carried: torch.Tensor | None) -> torch.Tensor:
    """Chain states of one batch: rows of ``batch`` (proposals ``offset .. offset+b-1``) or
    the configuration ``carried`` over from before the batch (one row), as ``current`` says.

    Any index below ``offset`` is the state the chain was in when the batch began, so one
    carried row suffices.
    """
    local = current.to(batch.device) - offset
    if carried is None:
        if bool((local < 0).any()):
            raise ValueError("chain refers to a configuration before this batch but none was carried")
        return batch[local]
    rows = torch.cat([carried.reshape(1, *batch.shape[1:]).to(batch), batch])
    return rows[torch.where(local >= 0, local + 1, torch.zeros_like(local))]


@dataclass(frozen=True)
class BlockEntry:
    """Chain positions ``start .. start+count-1`` of one block of a step, and the global index of the
    configuration its first row needs from outside the block (None: the block needs nothing)."""

    start: int
    count: int
    entering: int | None


def block_entries(current: torch.Tensor, offset: int, block: int, n_blocks: int) -> list[BlockEntry]:
    """Split a step of the chain (``current``: proposal index of each position, positions and
    proposals ``offset ..``) into ``n_blocks`` consecutive blocks of ``block`` positions, the last
    ones shorter or empty, as ranks hold the proposals of a distributed step.

    Within a block the chain sits on the block's own proposals or on the state it was in when the
    block began: ``current[i] <= i`` and ``current`` never decreases. So a block's rows are
    :func:`gather_chain` of its own proposals and at most one configuration from outside, the one
    named by ``entering`` (a proposal of an earlier block or the state carried over from an earlier
    step). A block whose first proposal is accepted needs none.

    >>> [(e.start, e.count, e.entering) for e in block_entries(torch.tensor([0, 0, 2, 2, 2]), 0, 2, 3)]
    [(0, 2, None), (2, 2, None), (4, 1, 2)]
    """
    b = current.numel()
    out = []
    for r in range(n_blocks):
        lo = r * block
        count = max(0, min(block, b - lo))
        entering = None
        if count:
            first = int(current[lo])
            if first < offset + lo:
                entering = first
        out.append(BlockEntry(offset + lo, count, entering))
    return out
