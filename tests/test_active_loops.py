"""Learned active loops of the SU(N) spectral coupling (``model.active_loop=learned``,
gaugeflow.flows.sun): the staple set holds no updated link, the SU(N) projection and its closed-form
gradient, round trips, log-dets against autograd (per active link, and for the whole layer with every
link perturbed: the Jacobian is block-triangular only if the staples are frozen), gauge equivariance
and invariance of log q, translation equivariance, the model and the CLI. float64 throughout;
networks randomised away from zero (asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import test_sun_flow as tsf  # a module object: its tests are not collected again here
import torch
from gaugeflow.flows import sun
from gaugeflow.flows.conv import ConvNet
from gaugeflow.flows.masks import gauge_mask
from gaugeflow.flows.residual import _path_links
from gaugeflow.flows.sun import SUNPlaquetteCoupling, active_loop_staples, su_projection
from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import dagger
from gaugeflow.observables.loops import plaquette
from gaugeflow.theories.gauge import gauge_transform
from helpers import haar, log_series, perturbed

F64 = torch.float64


def make_layer(group, shape, mu=0, nu=1, offsets=(0, 0, 0), scale=0.15, seed=0, loops=("plaquette", "rectangle"),
               net=None):
    g = get_group(group)
    mask = gauge_mask(shape, mu, nu, offsets)
    net = net or (lambda a, b: ConvNet(a, b, (8,), ndim=len(shape), zero_init=True))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = SUNPlaquetteCoupling.build(mask, g, net, active_loop="learned", loops=loops).to(F64)
    if scale:
        perturbed(layer, scale, seed)
    return layer


# ------------------------------------------------------------------------------ staples, projection
@pytest.mark.parametrize("shape,loops,expected", [
    ((4, 4), ("plaquette", "rectangle"), 6),
    ((4, 4, 4), ("plaquette", "rectangle"), 12),
    ((4, 4, 4), ("plaquette", "rectangle", "chair"), None),
])
def test_staples_hold_no_updated_link(shape, loops, expected):
    from gaugeflow.flows.residual import staple_paths

    d = len(shape)
    for offsets in [(0, 0, 0), (1, 0, 1), (0, 1, 1)] if d > 2 else [(0, 0, 0), (1, 1, 0)]:
        mask = gauge_mask(shape, 0, 1, offsets)
        staples = active_loop_staples(mask, loops)
        assert staples[0] == ((1, 1), (0, -1), (1, -1))  # the plaquette staple first
        if expected is not None:
            assert len(staples) == expected
        else:  # some chairs cross the mask plane twice and are dropped
            assert 2 * (d - 1) + 4 * (d - 1) < len(staples) < 1 + len(staple_paths(d, 0, loops))
        act = mask.links.nonzero().tolist()
        active = {tuple(x) for x in act}
        for steps in staples:
            for rho, off in _path_links(0, steps, d):
                if rho != 0:
                    continue
                for x in act:
                    y = tuple((xi + o) % s for xi, o, s in zip(x, off, shape))
                    assert y not in active, (steps, x)


def test_su_projection_is_covariant_special_unitary_and_differentiable():
    g = get_group("su3")
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(50, 3, 3, generator=gen, dtype=torch.complex128)
    q = su_projection(m)
    eye = torch.eye(3, dtype=q.dtype)
    assert (q @ dagger(q) - eye).abs().max() < 1e-12 and (torch.linalg.det(q) - 1).abs().max() < 1e-12
    a, b = g.random((50,), gen), g.random((50,), gen)
    assert (su_projection(a @ m @ dagger(b)) - a @ q @ dagger(b)).abs().max() < 1e-12
    u = g.random((50,), gen)
    assert (su_projection(u) - u).abs().max() < 1e-12  # SU(N) elements are fixed
    # closed-form gradient, also at fully degenerate singular values (M = 2 U), where SVD's fails
    for x in (m[:4], 2 * u[:4], u[:4] + 0.3 * m[:4]):
        assert torch.autograd.gradcheck(su_projection, (x.clone().requires_grad_(True),))


# ------------------------------------------------------------------------------ layer
@pytest.mark.parametrize("group,shape,offsets", [("su2", (4, 4), (1, 0, 0)), ("su3", (4, 4), (0, 1, 0)),
                                                 ("su3", (2, 2, 2), (1, 1, 1))])
def test_round_trip_and_the_loop_is_learned(group, shape, offsets):
    n = get_group(group).N
    layer = make_layer(group, shape, mu=1, nu=0, offsets=offsets, seed=1)
    u = haar(group, 3, shape, 1)
    v, ld = layer(u)
    u2, ld_inv = layer.inverse(v)
    assert (u2 - u).abs().max() < 1e-10 and (ld + ld_inv).abs().max() < 1e-9
    moved = (v - u).abs().amax((-1, -2))
    assert moved[:, 1][:, layer.link_mask].min() > 1e-3
    assert moved[:, 0].max() == 0 and moved[:, 1][:, ~layer.link_mask].max() == 0
    assert (v @ dagger(v) - torch.eye(n, dtype=v.dtype)).abs().max() < 1e-12
    assert (torch.linalg.det(v) - 1).abs().max() < 1e-12
    # the active loop is not the plaquette, and the same loop before and after (its staple is frozen)
    w = layer.active_loops(u)
    assert (w - plaquette(u, 1, 0)[:, layer.link_mask]).abs().max() > 1e-2
    s_in = dagger(u[:, 1][:, layer.link_mask]) @ w
    s_out = dagger(v[:, 1][:, layer.link_mask]) @ layer.active_loops(v)
    assert (s_in - s_out).abs().max() < 1e-12


def test_zero_init_is_the_identity_and_zero_mixing_is_the_plaquette_coupling():
    layer = make_layer("su3", (4, 4), scale=0)
    u = haar("su3", 2, (4, 4), 0)
    for fn in (layer.forward, layer.inverse):
        v, ld = fn(u)
        assert (v - u).abs().max() < 1e-12 and ld.abs().max() < 1e-12
    # random spline parameters, zero staple weights: exactly the plaquette coupling
    learned = make_layer("su3", (4, 4), seed=2)
    plain = tsf.make_layer("su3", (4, 4), hidden=(8,), scale=0)
    with torch.no_grad():
        last = learned.net.convs[-1]
        last.weight[plain.cell.n_params:] = 0
        last.bias[plain.cell.n_params:] = 0
        for p_src, p_dst in zip(learned.net.convs, plain.net.convs):
            p_dst.weight.copy_(p_src.weight[:p_dst.weight.shape[0]])
            p_dst.bias.copy_(p_src.bias[:p_dst.bias.shape[0]])
    v1, ld1 = learned(u)
    v2, ld2 = plain(u)
    assert (v1 - v2).abs().max() < 1e-12 and (ld1 - ld2).abs().max() < 1e-10 and ld1.abs().max() > 1e-2


@pytest.mark.parametrize("group,shape", [("su2", (4, 4)), ("su3", (4, 4)), ("su3", (2, 2, 2))])
def test_logdet_against_autograd_per_active_link(group, shape):
    layer = make_layer(group, shape, offsets=(1, 0, 1) if len(shape) > 2 else (1, 0, 0), seed=4)
    u0 = haar(group, 1, shape, 4)
    for inverse in (False, True):
        _, site_ld = layer.transform(u0, inverse=inverse)
        active = layer.link_mask.nonzero().tolist()
        auto = [tsf.link_jacobian_logdet(layer, u0, x, inverse) for x in active]
        for x, a in zip(active, auto):
            assert site_ld[(0, *x)].item() == pytest.approx(a, abs=1e-8)
        assert max(abs(a) for a in auto) > 1e-2


def whole_layer_logdet(layer, u0):
    """log|det| of the autograd Jacobian of the whole layer, every link perturbed in exponential coordinates."""
    g = layer.group
    gens = g.generators(torch.complex128)
    n_links = u0[0].numel() // (g.N * g.N)
    v0 = layer(u0)[0].detach()

    def f(c):
        x = torch.einsum("...a,aij->...ij", c.reshape(*u0.shape[:-2], g.dim).to(gens.dtype), gens)
        v = layer(torch.linalg.matrix_exp(x) @ u0)[0]
        return g.to_coords(log_series(v @ dagger(v0), terms=40)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, torch.zeros(n_links * g.dim, dtype=F64))
    return torch.linalg.slogdet(jac).logabsdet.item()


def test_whole_layer_jacobian_is_triangular(monkeypatch):
    # every link moves: the determinant is the product of the per-link ones only if the staples
    # (and the context) hold no updated link
    layer = make_layer("su2", (4, 4), offsets=(1, 0, 0), seed=6)
    u0 = haar("su2", 1, (4, 4), 6)
    ld = layer(u0)[1].item()
    assert abs(ld) > 1e-2
    assert whole_layer_logdet(layer, u0) == pytest.approx(ld, abs=1e-8)
    # power: a 2x1 staple long across mu holds U_mu(x + 2 nu), an updated link; unmasked, as the
    # reference staple (weight 1), it breaks the triangular structure
    layer.staples[0] = ((1, 1), (1, 1), (0, -1), (1, -1), (1, -1))
    monkeypatch.setattr(sun, "masked_links", lambda links, frozen: links)
    assert abs(whole_layer_logdet(layer, u0) - layer(u0)[1].item()) > 1e-3


# ------------------------------------------------------------------------------ symmetries
@pytest.mark.parametrize("group,shape", [("su2", (4, 4)), ("su3", (4, 4)), ("su3", (2, 2, 2))])
def test_gauge_equivariance_and_invariance_of_logdet(group, shape):
    g = get_group(group)
    layer = make_layer(group, shape, seed=5)
    u = haar(group, 2, shape, 5)
    omega = g.random((2, *shape), torch.Generator().manual_seed(55))
    ug = gauge_transform(u, omega)
    for fn in (layer.forward, layer.inverse):
        v, ld = fn(u)
        vg, ldg = fn(ug)
        assert (vg - gauge_transform(v, omega)).abs().max() < 1e-10
        assert (ldg - ld).abs().max() < 1e-10 and ld.abs().min() > 1e-3


def test_translation_by_two_sites_is_equivariant():
    layer = make_layer("su3", (4, 4), seed=6)
    u = haar("su3", 2, (4, 4), 6)
    for axis in (0, 1):
        for n in (2, -2):
            def t(x, n=n, axis=axis):
                return torch.roll(x, n, dims=2 + axis)

            for fn in (layer.forward, layer.inverse):
                v, ld = fn(u)
                vt, ldt = fn(t(u))
                assert (vt - t(v)).abs().max() < 1e-10 and (ldt - ld).abs().max() < 1e-10


def test_model_samples_log_prob_and_gauge_invariance_of_log_q():
    from gaugeflow.flows.models import sun_spectral
    from gaugeflow.theories import gauge_theory

    for shape, n_layers in (([4, 4], 8), ([2, 2, 2], 3)):
        theory = gauge_theory(shape, group="su3", beta=2.0)
        torch.manual_seed(0)
        model = sun_spectral(theory, F64, hidden=[4], n_layers=n_layers, active_loop="learned", zero_init=True)
        perturbed(model, 0.1, 1)
        with torch.no_grad():
            x, log_q = model.sample(4, torch.Generator().manual_seed(1))
            assert (model.log_prob(x) - log_q).abs().max() < 1e-9
            omega = theory.group.random((4, *shape), torch.Generator().manual_seed(2))
            assert (model.log_prob(gauge_transform(x, omega)) - log_q).abs().max() < 1e-9
            assert log_q.abs().min() > 1e-2
    with pytest.raises(ValueError, match="active_loop"):
        sun_spectral(theory, F64, active_loop="wilson")
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="loop_mix"):
            sun_spectral(theory, F64, active_loop="learned", loop_mix=bad)


def test_cli_trains_with_learned_loops(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", "theory=su3_2d", "model=sun_spectral",
                        "model.active_loop=learned", "lattice.shape=[4,4]", "train.steps=3",
                        "train.batch_size=8", "train.eval_samples=64", "hydra.run.dir=run"],
                       check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 3" in r.stdout
    from gaugeflow.io.checkpoint import load_checkpoint

    assert "active_loop: learned" in load_checkpoint(tmp_path / "run").config
