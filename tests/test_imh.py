"""Independence Metropolis (gaugeflow.sampling.imh) on targets with known answers."""

import math

import numpy as np
import pytest
import torch

from gaugeflow.sampling.imh import IndependenceMetropolis, block_entries, gather_chain, independence_metropolis
from gaugeflow.sampling.statistics import gamma_method

# proposal q = N(0, 1), target p = N(MU, SIGMA^2): SIGMA < 1 keeps w = p/q bounded, so the
# chain is uniformly ergodic and its errors are trustworthy
MU, SIGMA = 0.4, 0.7


def log_q(x):
    return -0.5 * x**2 - 0.5 * math.log(2 * math.pi)


def log_p_tilde(x):
    # unnormalised on purpose: IMH needs p only up to a constant
    return -0.5 * ((x - MU) / SIGMA) ** 2 + 3.0


def exact_acceptance() -> float:
    """Stationary acceptance E_{x~p, y~q}[min(1, w(y)/w(x))] by quadrature on a fine grid."""
    t = np.linspace(-9.0, 9.0, 2401)
    h = t[1] - t[0]
    lq = log_q(t)
    lp = -0.5 * ((t - MU) / SIGMA) ** 2 - math.log(SIGMA * math.sqrt(2 * math.pi))
    lw = lp - lq
    px, qy = np.exp(lp)[:, None], np.exp(lq)[None, :]
    ratio = np.minimum(1.0, np.exp(lw[None, :] - lw[:, None]))
    return float((px * qy * ratio).sum() * h * h)


def draw(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return x, log_p_tilde(x) - log_q(x)


def test_chain_reproduces_gaussian_target():
    x, lw = draw(40000, 11)
    accepted, current = independence_metropolis(lw, torch.Generator().manual_seed(5))
    chain = x[current].numpy()
    # moments of p within 3 sigma of the Gamma-method error of the chain
    for series, exact in [(chain, MU), (chain**2, MU**2 + SIGMA**2), ((chain - MU) ** 3, 0.0)]:
        est = gamma_method(series)
        assert abs(est.mean - exact) < 3 * est.err, (est, exact)
        assert est.tau_int > 0.5  # rejections correlate the chain: the error must account for that
    acc = gamma_method(accepted.double().numpy())
    assert abs(acc.mean - exact_acceptance()) < 3 * acc.err, (acc, exact_acceptance())


def test_chain_differs_from_proposals():
    # the test above must be able to fail: the raw proposals have the wrong mean
    x, _ = draw(40000, 11)
    est = gamma_method(x.numpy())
    assert abs(est.mean - MU) > 10 * est.err


def test_batches_give_the_same_chain():
    _, lw = draw(3000, 2)
    acc1, cur1 = independence_metropolis(lw, torch.Generator().manual_seed(9))
    imh = IndependenceMetropolis(torch.Generator().manual_seed(9))
    parts = [imh.step(lw[a:b]) for a, b in [(0, 1), (1, 18), (18, 18), (18, 1000), (1000, 3000)]]
    assert torch.equal(torch.cat([p[0] for p in parts]), acc1)
    assert torch.equal(torch.cat([p[1] for p in parts]), cur1)
    assert imh.n_seen == 3000 and imh.n_accepted == int(acc1.sum())
    assert imh.acceptance == pytest.approx(acc1.double().mean().item())


def test_bookkeeping():
    lw = torch.tensor([0.0, 30.0, -5.0, -5.0, -5.0, 40.0, float("nan"), -math.inf, 40.0], dtype=torch.float64)
    acc, cur = independence_metropolis(lw, torch.Generator().manual_seed(0))
    # the first proposal starts the chain; a heavier one is always accepted; after it, light
    # proposals are compared with the state kept (log w = 30), not with the last rejected
    # proposal (the NeuMC bug), and are rejected (probability e^-35 each)
    assert acc.tolist() == [True, True, False, False, False, True, False, False, True]
    assert cur.tolist() == [0, 1, 1, 1, 1, 5, 5, 5, 8]


def test_equal_weights_accept_everything_and_zero_weight_start_is_left():
    acc, cur = independence_metropolis(torch.zeros(50, dtype=torch.float64), torch.Generator().manual_seed(1))
    assert bool(acc.all()) and cur.tolist() == list(range(50))
    lw = torch.tensor([-math.inf, -math.inf, -1.0], dtype=torch.float64)
    acc, cur = independence_metropolis(lw, torch.Generator().manual_seed(1))
    assert acc.tolist() == [True, False, True] and cur.tolist() == [0, 0, 2]


def test_gather_chain_carries_state_between_batches():
    x = torch.arange(10.0).reshape(5, 2)
    carried = torch.tensor([[-1.0, -2.0]])
    out = gather_chain(torch.tensor([3, 3, 5, 5, 7]), 5, x, carried)
    assert out.tolist() == [[-1, -2], [-1, -2], [0, 1], [0, 1], [4, 5]]
    with pytest.raises(ValueError):
        gather_chain(torch.tensor([3]), 5, x[:1], None)


@pytest.mark.parametrize("n_blocks,block,seed", [(2, 8, 0), (3, 5, 1), (4, 3, 2), (1, 16, 3)])
def test_blocks_of_a_distributed_step_rebuild_the_chain(n_blocks, block, seed):
    """As ``sample dist=ddp`` writes a chain: each rank its block of positions, from its own proposals
    and at most one configuration from outside the block (block_entries). Over several steps, the
    blocks concatenated are the chain of a single process, row for row."""
    g = torch.Generator().manual_seed(seed)
    n = 61
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)  # proposals, in global order
    lw = 2.0 * torch.randn(n, generator=g, dtype=torch.float64)  # low acceptance: long repeats
    _, cur_all = independence_metropolis(lw, torch.Generator().manual_seed(seed))
    want = x[cur_all]
    imh = IndependenceMetropolis(torch.Generator().manual_seed(seed))
    rows, done, needed = [], 0, 0
    while done < n:
        mine = min(block, -(-(n - done) // n_blocks))
        b = min(mine * n_blocks, n - done)
        _, current = imh.step(lw[done:done + b])
        entries = block_entries(current, done, mine, n_blocks)
        assert sum(e.count for e in entries) == b and len(entries) == n_blocks
        for r, e in enumerate(entries):
            assert e.start == done + r * mine
            if not e.count:
                assert e.entering is None
                continue
            own = x[e.start:e.start + e.count]
            local = current[r * mine:r * mine + e.count]
            assert bool((local >= e.start).all()) == (e.entering is None)
            entering = None if e.entering is None else x[e.entering]  # from its owner, or carried over
            needed += e.entering is not None
            rows.append(gather_chain(local, e.start, own, entering))
        done += b
    assert torch.equal(torch.cat(rows), want)
    assert needed > 0  # the test exercises configurations that cross blocks
