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
        log_u = torch.log(torch.rand(b, generator=self.generator, dtype=torch.float64))
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
        return torch.tensor(accepted, dtype=torch.bool), torch.tensor(current, dtype=torch.int64)

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
