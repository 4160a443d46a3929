"""Decomposed-equals-whole tests for the gauge flows of issue 14 (dist.lattice_grid).

The residual flow (plaquette, 2x1 rectangle and chair staples), the continuous flow (strang:
explicit and implicit, fixed-point, sub-steps), spectral SU(N) couplings with learned active
loops, and L-CNN context networks of reach 2 (transports over two sites, then a ConvNet head)
reach further than one site: rectangles two sites along mu, L-CNNs ``reach`` per block plus the
plaquette, a ConvNet ``(k - 1) / 2`` per layer. The geometry's ``shift(f, mu, n)`` and ``pad(f, mu, w)``
fetch whatever depth a call asks for from the neighbouring blocks (tests/test_domain.py checks
them for widths beyond a block), so these layers need nothing of their own. Blocks of extent 2
along a split axis make every 2-site loop and reach-2 transport cross a block boundary or wrap
onto the block itself through the neighbour.

As tests/test_domain.py: the single-process values are computed in the parent (float64), the
workers (gloo, forked) build the same model for their block inside ``decomposed(d)``, load the
parent's weights and compare to 1e-12: forward output (gathered), log|det J| forward and
inverse, the inverse of the forward output, log q, the action of the output, the parameter
gradients of ``(log q + S).mean()`` (summed over blocks by ``reduce_gradients``) and the gradient
with respect to the prior sample (each rank: its block). With 2 processes the lattice is cut
along one axis; with 4 along two.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gaugeflow.components import build_theory
from gaugeflow.distributed.domain import Decomposition, decomposed
from gaugeflow.flows import models
from gaugeflow.flows.continuous import continuous
from gaugeflow.flows.masks import gauge_mask_schedule
from gaugeflow.flows.residual import FixedPointError, ResidualCoupling
from gaugeflow.groups import get_group
from gaugeflow.lattice.geometry import site_max
from torch.distributed.elastic.utils.distributed import get_free_port

TOL = dict(rtol=1e-12, atol=1e-12)
BATCH = 2


def _gauge(group, beta=2.0, action="wilson"):
    return dict(name=group, _target_="gaugeflow.theories.gauge_theory", group=group, beta=beta, action=action)


# (name, theory config, global shape, lattice grid, builder, builder keys)
CASES = {
    2: [
        # 2x1 rectangles along the split axis on blocks of 2 sites; n_layers=8 passes mu = 0 and 1
        ("residual_su2", _gauge("su2"), (4, 4), (2, 1), "residual",
         dict(n_layers=8, hidden=(4,), loops=("plaquette", "rectangle"))),
        # chairs (d > 2), rectangles and plaquettes of SU(3) in 4d, cut along axis 0 (mu = 0 layers);
        # a pointwise context net (4d convolutions are slow on a CPU; the 2d cases have 3x3 ones)
        ("residual_su3_4d", _gauge("su3", 5.0), (4, 4, 4, 4), (2, 1, 1, 1), "residual",
         dict(n_layers=2, hidden=(2,), kernel_size=1, loops=("plaquette", "rectangle", "chair"))),
        # L-CNN context of reach 2 (two blocks of transports), on blocks of 2 sites along axis 1
        ("residual_lcnn_u1", _gauge("u1"), (4, 4), (1, 2), "residual",
         dict(n_layers=8, hidden=(3,), loops=("plaquette", "rectangle"), context="lcnn", lcnn_channels=(2, 2),
              lcnn_reach=2)),
        # strang: explicit sub-steps, then implicit (fixed-point) ones, forward and inverse
        ("continuous_su2", _gauge("su2"), (4, 4), (2, 1), "continuous",
         dict(n_steps=1, scheme="strang", hidden=(3,), n_basis=2, loops=("plaquette", "rectangle"), max_step=0.5)),
        # learned active loops from rectangle staples, with an L-CNN context of reach 2
        ("sun_learned_su3", _gauge("su3"), (4, 4), (2, 1), "sun_spectral",
         dict(n_layers=8, hidden=(4,), n_bins=4, active_loop="learned", loops=("plaquette", "rectangle"))),
        ("sun_learned_lcnn_su3", _gauge("su3"), (4, 4), (1, 2), "sun_spectral",
         dict(n_layers=8, hidden=(3,), n_bins=4, active_loop="learned", loops=("plaquette", "rectangle"),
              context="lcnn", lcnn_channels=(2, 2), lcnn_reach=2)),
    ],
    4: [
        # both axes cut: corners of rectangles and reach-2 transports come from the diagonal block
        ("residual_lcnn_su2", _gauge("su2"), (4, 4), (2, 2), "residual",
         dict(n_layers=8, hidden=(3,), loops=("plaquette", "rectangle"), context="lcnn", lcnn_channels=(2,),
              lcnn_reach=2)),
        ("continuous_u1", _gauge("u1"), (4, 8), (2, 2), "continuous",
         dict(n_steps=1, scheme="strang", hidden=(3,), n_basis=2, loops=("plaquette", "rectangle"), max_step=0.5)),
        ("sun_learned_su2", _gauge("su2"), (4, 4), (2, 2), "sun_spectral",
         dict(n_layers=8, hidden=(3,), n_bins=4, active_loop="learned", loops=("plaquette", "rectangle"))),
    ],
}


def _theory(cfg, shape):
    return build_theory(dict(cfg, dim=len(shape)), shape)


def _model(theory, builder, keys, seed=None):
    build = continuous if builder == "continuous" else getattr(models, builder)
    model = build(theory, torch.float64, **keys)
    if seed is not None:
        # a fixed random initialisation, away from the identity (smaller for the spline couplings,
        # whose inverse is ill-conditioned with large spline parameters)
        gen = torch.Generator().manual_seed(seed)
        scale = 0.15 if builder == "sun_spectral" else 0.3
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _field(theory, seed):
    return theory.start(BATCH, "hot", torch.Generator().manual_seed(seed), torch.float64)


def _run(model, theory, z):
    """Forward, log q, action, loss; inverse of the forward output."""
    y, ld = model.flow(z)
    log_q = model.prior.log_prob(z) - ld
    s = theory.action(y)
    x, ld_inv = model.flow.inverse(y.detach())
    return y, ld, log_q, s, x, ld_inv


def _reference(name, cfg, shape, builder, keys, seed):
    theory = _theory(cfg, shape)
    model = _model(theory, builder, keys, seed)
    z = _field(theory, seed + 1).requires_grad_(True)
    y, ld, log_q, s, x, ld_inv = _run(model, theory, z)
    assert (y - z).abs().max() > 1e-2, f"{name}: the flow must not be the identity"
    assert (x - z).abs().max() < 1e-10, f"{name}: inverse(forward(z)) == z"
    assert (ld + ld_inv).abs().max() < 1e-10, f"{name}: log-dets of forward and inverse cancel"
    (log_q + s).mean().backward()
    out = dict(state=model.state_dict(), z=z, y=y, ld=ld, log_q=log_q, s=s, x=x, ld_inv=ld_inv, z_grad=z.grad,
               grads={k: p.grad.clone() for k, p in model.named_parameters()})
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _check(name, cfg, shape, grid, builder, keys, ref):
    d = Decomposition(shape, grid)
    theory = _theory(cfg, d.local_shape)
    with decomposed(d):
        model = _model(theory, builder, keys)
    model.load_state_dict(ref["state"])
    z = d.scatter(ref["z"], lead=2).requires_grad_(True)
    with decomposed(d):
        y, ld, log_q, s, x, ld_inv = _run(model, theory, z)
        (log_q + s).mean().backward()
    _close(d.gather(y, lead=2), ref["y"], f"{name} forward")
    _close(ld, ref["ld"], f"{name} log|det J| forward")
    _close(log_q, ref["log_q"], f"{name} log q")
    _close(s, ref["s"], f"{name} action of the flow's output")
    _close(d.gather(x, lead=2), ref["x"], f"{name} inverse")
    _close(ld_inv, ref["ld_inv"], f"{name} log|det J| inverse")
    _close(z.grad, d.scatter(ref["z_grad"], lead=2), f"{name} gradient with respect to the prior sample")
    d.reduce_gradients(model.parameters())
    for k, p in model.named_parameters():
        _close(p.grad, ref["grads"][k], f"{name} gradient of {k}")


def _check_site_max(world):
    d = Decomposition((4, 4), (world, 1) if world == 2 else (2, 2))
    r = d.lattice_rank
    with decomposed(d):
        m = site_max(torch.tensor([float(r), -float(r), 0.5], dtype=torch.float64))
        _close(m, torch.tensor([world - 1.0, 0.0, 0.5], dtype=torch.float64), "site_max")
        # a NaN on one block is a NaN everywhere (every rank takes the same failure branch)
        m = site_max(torch.tensor(float("nan") if r == world - 1 else 1.0, dtype=torch.float64))
        assert torch.isnan(m), "site_max must propagate a NaN from any block"


def _check_fixed_point_agreement(world):
    """A fixed-point inverse that fails on one block fails on every block (no rank left waiting
    in the next halo exchange), and one that converges everywhere returns everywhere."""
    d = Decomposition((4, 4), (world, 1) if world == 2 else (2, 2))
    with decomposed(d):
        mask = gauge_mask_schedule(d.local_shape)[0]
        layer = ResidualCoupling(mask, "su2", lambda c, k: torch.nn.Identity(), loops=("plaquette",), max_iter=3)
    group = get_group("su2")
    gen = torch.Generator().manual_seed(5 + d.lattice_rank)
    n_active = int(mask.links.sum())
    y = group.random((BATCH, n_active), gen).to(torch.complex128)
    m = 0.5 * group.random((BATCH, n_active), gen).to(torch.complex128)
    # the last block needs many iterations (contraction rate ~0.5), the others none (M = 0)
    m_here = m if d.lattice_rank == d.lattice_size - 1 else torch.zeros_like(m)
    with decomposed(d), pytest.raises(FixedPointError, match="did not converge in 3 iterations"):
        layer._solve(y, m_here)
    layer.max_iter = 200
    with decomposed(d):
        u = layer._solve(y, m_here)
    _close(u, layer._solve(y, m_here), "fixed point on a block")


def _worker(rank, world, port, refs):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _check_site_max(world)
        _check_fixed_point_agreement(world)
        for name, cfg, shape, grid, builder, keys in CASES[world]:
            _check(name, cfg, shape, grid, builder, keys, refs[name])
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_decomposed_flows_equal_whole_lattice(world):
    # one thread: these tensors are tiny, and thread pools on loaded cores mostly spin (10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {name: _reference(name, cfg, shape, builder, keys, seed=11 * i + 3)
                for i, (name, cfg, shape, grid, builder, keys) in enumerate(CASES[world])}
    finally:
        torch.set_num_threads(threads)
    fork = "fork" in mp.get_all_start_methods() and not dist.is_initialized()
    mp.start_processes(_worker, args=(world, get_free_port(), refs), nprocs=world, join=True,
                       start_method="fork" if fork else "spawn")


def test_site_max_is_inert_without_a_domain():
    x = torch.tensor([1.0, float("nan")], requires_grad=True)
    m = site_max(x)
    assert not m.requires_grad and m[0] == 1.0 and torch.isnan(m[1])
