"""Lattice domain decomposition (gaugeflow.distributed.domain) against single-process runs.

The test starts 2 and 4 CPU processes (gloo) itself. The single-process values are computed
here, in the parent, and handed to every process (forked where the platform can), which
checks its block (or the gathered field) against them to 1e-12 in float64: actions and their
field gradients, observables, halo exchanges (values, adjoint, double backward), periodic
convolutions, coupling masks, flow forward / inverse outputs, log|det J| and parameter
gradients of ``(log q + S).mean()`` for the U(1) equivariant, SU(2) and SU(3) spectral and
scalar affine models; with 4 processes also a 2-way lattice x 2-way data-parallel run. All
checks for one world size run in one start of the processes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gaugeflow.distributed.domain import Decomposition, decomposed, grid_layout
from gaugeflow.flows.conv import periodic_conv
from gaugeflow.flows.masks import gauge_mask_schedule
from gaugeflow.flows import models
from helpers import theory_flow
from gaugeflow.lattice import Lattice, checkerboard, pad, shift
from gaugeflow.observables.wilson import mean_plaquette, polyakov_loop, wilson_loop
from gaugeflow.components import build_theory
from torch.distributed.elastic.utils.distributed import get_free_port

TOL = dict(rtol=1e-12, atol=1e-12)

# flow cases: (name, theory config, global shape, lattice grid, layers, hidden)
FLOWS = {
    2: [
        ("u1", dict(name="u1", _target_="gaugeflow.theories.gauge_theory", group="u1", beta=2.0, action="symanzik"), (8, 8), (2, 1), 4, (6,)),
        ("su2", dict(name="su2", _target_="gaugeflow.theories.gauge_theory", group="su2", beta=2.0, action="iwasaki"), (8, 8), (1, 2), 3, (6,)),
        ("phi4", dict(name="phi4", _target_="gaugeflow.theories.phi4_theory", m2=-4.0, lam=8.0), (8, 8), (2, 1), 4, (6,)),
    ],
    4: [
        ("u1", dict(name="u1", _target_="gaugeflow.theories.gauge_theory", group="u1", beta=2.0, action="symanzik"), (8, 8), (2, 2), 4, (6,)),
        ("su3_4d", dict(name="su3", _target_="gaugeflow.theories.gauge_theory", group="su3", beta=5.0), (4, 4, 4, 4), (2, 2, 1, 1), 2, (4,)),
        ("phi4_4d", dict(name="phi4", _target_="gaugeflow.theories.phi4_theory", form="hopping", kappa=0.1, lam_tilde=0.5), (4, 4, 4, 4),
         (2, 1, 2, 1), 2, (4,)),
        # 2 blocks per configuration x 2 data-parallel replicas, one half of the batch each
        ("u1_dp", dict(name="u1", _target_="gaugeflow.theories.gauge_theory", group="u1", beta=2.0), (8, 8), (2, 1), 4, (6,)),
    ],
}
# halo cases: (global field shape, lattice grid); the field has a trailing internal axis
HALOS = {2: [((8, 6), (2, 1)), ((4, 8, 4), (1, 2, 1))], 4: [((8, 8), (2, 2)), ((4, 4, 4, 4), (1, 2, 1, 2))]}
SHIFTS = (1, -1, 3, -5, 9)
WIDTHS = (1, 2, 5)
BATCH = 4


def _theory(cfg, shape):
    cfg = dict(cfg, dim=len(shape))
    return build_theory(cfg, shape)


def _model(theory, n_layers, hidden, seed=None):
    model = theory_flow(theory, n_layers=n_layers, hidden=hidden, zero_init=True, dtype=torch.float64)
    if seed is not None:
        # away from the zero-initialised identity, with spline parameters of O(1) whatever the
        # kernel volume 3^d (larger ones make the inverse ill-conditioned, asserted below)
        gen = torch.Generator().manual_seed(seed)
        scale = 0.15 / 3 ** ((theory.lattice.ndim - 2) / 2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _field(theory, seed):
    gen = torch.Generator().manual_seed(seed)
    return theory.start(BATCH, "hot", gen, torch.float64)


def _lead(theory):
    return 2 if theory.is_gauge else 1


# -- single-process references (parent) ----------------------------------------------------

def _flow_reference(name, cfg, shape, n_layers, hidden, seed):
    theory = _theory(cfg, shape)
    model = _model(theory, n_layers, hidden, seed)
    z = _field(theory, seed + 1)
    y, ld = model.flow(z)
    x, ld_inv = model.flow.inverse(y.detach())
    assert (y - z).abs().max() > 1e-2, "the flow must not be the identity"
    assert (x - z).abs().max() < 1e-10, "a well-conditioned reference flow"
    log_q = model.prior.log_prob(z) - ld
    s = theory.action(y)
    (log_q + s).mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    links = z.detach().requires_grad_(True)
    s0 = theory.action(links)
    (field_grad,) = torch.autograd.grad(s0.sum(), links)
    out = dict(state=model.state_dict(), z=z, y=y, ld=ld, x=x, ld_inv=ld_inv,
               log_q=log_q, s=s, grads=grads, s0=s0, field_grad=field_grad)
    out = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    if theory.is_gauge:
        out["obs"] = _observables(z)
    return out


def _observables(links):
    d = links.shape[1]
    return torch.stack([mean_plaquette(links), wilson_loop(links, 1, 2), polyakov_loop(links, 0).real,
                        polyakov_loop(links, d - 1).imag])


def _conv_reference(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, *shape), generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((2, 3, *[5] * len(shape)), generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn((2, 2, *shape), generator=gen, dtype=torch.float64)
    y = periodic_conv(x, w)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, w))
    return dict(x=x.detach(), w=w.detach(), g=g, y=y.detach(), gx=gx, gw=gw)


def _reference(world):
    ref = {"flows": {}, "conv": {}}
    for i, (name, cfg, shape, grid, n_layers, hidden) in enumerate(FLOWS[world]):
        ref["flows"][name] = _flow_reference(name, cfg, shape, n_layers, hidden, seed=10 * i + 1)
    for shape, grid in HALOS[world]:
        if len(shape) <= 3:
            ref["conv"][shape] = _conv_reference(shape, seed=len(shape))
    return ref


# -- the processes ---------------------------------------------------------------------------

def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _check_halos(shape, grid):
    """shift / pad of a decomposed field: values and the adjoint against the global ones."""
    d = Decomposition(shape, grid)
    gen = torch.Generator().manual_seed(7)
    xg = torch.randn((2, *shape, 3), generator=gen, dtype=torch.complex128)
    x = d.scatter(xg).requires_grad_(True)
    nd = len(shape)
    for mu in range(nd):
        for n in SHIFTS:
            up = torch.randn((2, *shape, 3), generator=gen, dtype=torch.complex128)  # same on every rank
            with decomposed(d):
                y = shift(x, mu, n)
            _close(y, d.scatter(torch.roll(xg, -n, 1 + mu)), f"shift mu={mu} n={n}")
            (gx,) = torch.autograd.grad((y * d.scatter(up).conj()).real.sum(), x)
            # adjoint of a permutation: the upstream gradient shifted back
            _close(gx, d.scatter(torch.roll(up, n, 1 + mu)), f"shift backward mu={mu} n={n}")
        for w in WIDTHS:
            with decomposed(d):
                y = pad(x, mu, w)
            n_loc = d.local_shape[mu]
            idx = (torch.arange(n_loc + 2 * w) + d.origin[mu] - w) % shape[mu]
            block = xg
            for nu in range(nd):
                if nu != mu:
                    block = block.narrow(1 + nu, d.origin[nu], d.local_shape[nu])
            _close(y, block.index_select(1 + mu, idx), f"pad mu={mu} w={w}")
            # every rank's halo gradient, rebuilt on every rank, accumulated by global autograd
            ups = [torch.randn(y.shape, generator=torch.Generator().manual_seed(100 * r + w), dtype=y.dtype)
                   for r in range(d.lattice_size)]
            (gx,) = torch.autograd.grad((y * ups[d.lattice_rank]).real.sum(), x)
            xr = xg.clone().requires_grad_(True)
            total = 0
            for r in range(d.lattice_size):
                _, _, origin = grid_layout(shape, grid, r)
                b = xr
                for nu in range(nd):
                    if nu != mu:
                        b = b.narrow(1 + nu, origin[nu], d.local_shape[nu])
                ir = (torch.arange(n_loc + 2 * w) + origin[mu] - w) % shape[mu]
                total = total + (b.index_select(1 + mu, ir) * ups[r]).real.sum()
            (gref,) = torch.autograd.grad(total, xr)
            _close(gx, d.scatter(gref), f"pad backward mu={mu} w={w}")
    # the backward is differentiable too (double backward: Hessian-vector products, forces of flows)
    c, v = (torch.randn((2, *shape, 3), generator=gen, dtype=torch.float64) for _ in range(2))
    xr = x.detach().real.requires_grad_(True)
    mu = max(range(nd), key=lambda a: grid[a])
    with decomposed(d):
        (g,) = torch.autograd.grad((d.scatter(c) * shift(xr, mu, 1).square()).sum(), xr, create_graph=True)
        (hv,) = torch.autograd.grad((g * d.scatter(v)).sum(), xr)
    expected = torch.roll(2 * c * torch.roll(v, -1, 1 + mu), 1, 1 + mu)
    _close(hv, d.scatter(expected), "shift double backward")
    with decomposed(d):
        cb = checkerboard(d.local_shape)
    _close(cb, d.scatter(checkerboard(shape)[None])[0], "checkerboard")
    # gather inverts scatter
    _close(d.gather(x.detach()), xg, "gather")
    return d


def _check_conv(d, ref):
    x = d.scatter(ref["x"], lead=2).requires_grad_(True)
    w = ref["w"].clone().requires_grad_(True)
    with decomposed(d):
        y = periodic_conv(x, w)
    _close(y, d.scatter(ref["y"], lead=2), "conv")
    gx, gw = torch.autograd.grad((y * d.scatter(ref["g"], lead=2)).sum(), (x, w))
    _close(gx, d.scatter(ref["gx"], lead=2), "conv input gradient")
    dist.all_reduce(gw, group=d.group)
    _close(gw, ref["gw"], "conv weight gradient (summed over blocks)")


def _check_flow(name, cfg, shape, grid, n_layers, hidden, ref):
    d = Decomposition(shape, grid)
    theory = _theory(cfg, d.local_shape)
    lead = _lead(theory)
    rows = slice(None)
    if d.dp_size > 1:
        per = BATCH // d.dp_size
        rows = slice(d.dp_index * per, (d.dp_index + 1) * per)
    with decomposed(d):
        model = _model(theory, n_layers, hidden)
    model.load_state_dict(ref["state"])
    # masks built for the block are the global masks restricted to it
    for i, layer in enumerate(model.flow.layers):
        if theory.is_gauge:
            schedule = gauge_mask_schedule(shape)
            expected = schedule[i % len(schedule)].links
            _close(layer.link_mask, d.scatter(expected[None])[0], f"{name} mask {i}")
        else:
            _close(layer.active, d.scatter((checkerboard(shape) == i % 2)[None])[0], f"{name} mask {i}")
    z = d.scatter(ref["z"][rows], lead)
    with decomposed(d):
        y, ld = model.flow(z)
        log_q = model.prior.log_prob(z) - ld
        s = theory.action(y)
        loss = (log_q + s).mean()
        x, ld_inv = model.flow.inverse(y.detach())
        assert theory.lattice.volume == math.prod(shape)
    _close(d.gather(y, lead), ref["y"][rows], f"{name} forward")
    _close(ld, ref["ld"][rows], f"{name} log|det J| forward")
    _close(log_q, ref["log_q"][rows], f"{name} log q")
    _close(s, ref["s"][rows], f"{name} action of the flow's output")
    _close(d.gather(x, lead), ref["x"][rows], f"{name} inverse")
    _close(ld_inv, ref["ld_inv"][rows], f"{name} log|det J| inverse")
    loss.backward()
    d.reduce_gradients(model.parameters())
    for k, p in model.named_parameters():
        _close(p.grad, ref["grads"][k], f"{name} gradient of {k}")
    # the action and its field gradient: each rank gets its block of the global gradient
    links = z.detach().requires_grad_(True)
    with decomposed(d):
        s0 = theory.action(links)
        (g,) = torch.autograd.grad(s0.sum(), links)
        obs = _observables(links.detach()) if theory.is_gauge else None
    _close(s0, ref["s0"][rows], f"{name} action")
    _close(g, d.scatter(ref["field_grad"][rows], lead), f"{name} field gradient of the action")
    if obs is not None:
        _close(obs, ref["obs"][:, rows], f"{name} plaquette / Wilson loop / Polyakov loops")


def _worker(rank, world, port, ref):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for shape, grid in HALOS[world]:
            d = _check_halos(shape, grid)
            if shape in ref["conv"]:
                _check_conv(d, ref["conv"][shape])
        for name, cfg, shape, grid, n_layers, hidden in FLOWS[world]:
            _check_flow(name, cfg, shape, grid, n_layers, hidden, ref["flows"][name])
        # one initialisation for all ranks
        torch.manual_seed(rank)
        net = torch.nn.Linear(3, 2, dtype=torch.float64)
        d.broadcast_parameters(net)
        weights = [torch.empty_like(net.weight) for _ in range(world)]
        dist.all_gather(weights, net.weight.detach())
        assert all(torch.equal(w, weights[0]) for w in weights)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_decomposed_run_equals_single_process(world):
    ref = _reference(world)
    # fork: the processes inherit the imported torch and gaugeflow instead of importing them
    # again (4 s instead of 20 s per world on two loaded cores); spawn where there is no fork
    fork = "fork" in mp.get_all_start_methods() and not dist.is_initialized()
    method = "fork" if fork else "spawn"
    mp.start_processes(_worker, args=(world, get_free_port(), ref), nprocs=world, join=True, start_method=method)


def test_grid_errors_name_the_config_key():
    assert grid_layout((8, 4), (2, 2), 3) == ((1, 1), (4, 2), (4, 2))
    with pytest.raises(ValueError, match=r"dist.lattice_grid=\[2, 1\].*multiple of 2"):
        grid_layout((6, 6), (2, 1), 0)  # blocks of 3 sites: half a mask period
    with pytest.raises(ValueError, match="dist.lattice_grid=.*divide"):
        grid_layout((8, 8), (3, 1), 0)
    with pytest.raises(ValueError, match="dist.lattice_grid"):
        grid_layout((8, 8), (2,), 0)


def test_hooks_are_inert_without_a_domain():
    from gaugeflow.lattice.geometry import global_shape, local_origin, site_mean, site_sum

    x = torch.randn(3, 4, 6, dtype=torch.float64)
    assert torch.equal(site_sum(x, (1, 2)), x.sum((1, 2))) and torch.equal(site_mean(x, (1, 2)), x.mean((1, 2)))
    assert global_shape((4, 6)) == (4, 6) and local_origin((4, 6)) == (0, 0) and Lattice((4, 6)).volume == 24
