"""Residual (stout-like) gauge flows (gaugeflow.flows.residual), float64 on tiny lattices: round
trips, log-dets against autograd Jacobians of the whole layer in local coordinates, gauge and
translation equivariance, the invertibility bound, the fixed-point inverse, the builder and config.
Networks are randomised away from zero (the layers are asserted to move links)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gaugeflow.flows.conv import ConvNet
from gaugeflow.flows.masks import gauge_mask
from gaugeflow.flows.residual import FixedPointError, ResidualCoupling, staple_paths
from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import dagger
from gaugeflow.theories.gauge import gauge_transform
from helpers import haar, log_series

F64 = torch.float64

CASES = [("u1", (4, 4)), ("su2", (4, 4)), ("su3", (4, 4)), ("su2", (2, 2, 2, 2))]


def make_layer(group, shape, mu=0, offsets=None, scale=0.5, seed=0, loops=("plaquette", "rectangle"), **kw):
    d = len(shape)
    if offsets is None:
        offsets = (1, 0, 1) if d > 2 else (1, 0, 0)
    mask = gauge_mask(shape, mu, (mu + 1) % d, offsets)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = ResidualCoupling(mask, group, lambda a, b: ConvNet(a, b, (8,), ndim=d, zero_init=True),
                                 loops=loops, **kw).to(F64)
    if scale:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


@pytest.mark.parametrize("group,shape", CASES)
def test_round_trip_and_only_active_links_move(group, shape):
    g = get_group(group)
    layer = make_layer(group, shape, mu=1, seed=1)
    u = haar(group, 3, shape, 1)
    v, ld = layer(u)
    u2, ld_inv = layer.inverse(v)
    assert (u2 - u).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-10
    moved = (v - u).abs().amax((-1, -2))
    assert moved[:, 1][:, layer.link_mask].min() > 1e-4
    assert moved[:, 0].max() == 0 and moved[:, 1][:, ~layer.link_mask].max() == 0
    eye = torch.eye(g.N, dtype=v.dtype)
    assert (v @ dagger(v) - eye).abs().max() < 1e-12
    if g.N > 1:
        assert (torch.linalg.det(v) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("group,shape", CASES)
def test_logdet_against_autograd_jacobian_of_the_whole_layer(group, shape):
    """All links perturbed, ``U = exp(sum_a c_a T_a) U0``, ``U' = exp(sum_a c'_a T_a) U0'``: the full
    (block-triangular) Jacobian dc'/dc at c = 0 in these coordinates, where Haar is Lebesgue to
    first order, has the layer's log-det (forward and inverse)."""
    g = get_group(group)
    layer = make_layer(group, shape, seed=4)
    u0 = haar(group, 1, shape, 4)
    gens = g.generators(torch.complex128)
    n_links = u0[0].numel() // (g.N * g.N)
    for fn in (layer.forward, layer.inverse):
        v0, ld = fn(u0)
        v0 = v0.detach()

        def f(c, fn=fn, v0=v0):
            x = torch.einsum("...a,aij->...ij", c.reshape(*u0.shape[:-2], g.dim).to(gens.dtype), gens)
            u = torch.linalg.matrix_exp(x) @ u0
            v = fn(u)[0]
            return g.to_coords(log_series(v @ dagger(v0), terms=40)).reshape(-1)

        jac = torch.autograd.functional.jacobian(f, torch.zeros(n_links * g.dim, dtype=F64), vectorize=True)
        auto = torch.linalg.slogdet(jac)
        assert auto.sign.item() == 1
        assert ld.item() == pytest.approx(auto.logabsdet.item(), abs=1e-9)
        assert abs(ld.item()) > 1e-2  # a non-trivial Jacobian


@pytest.mark.parametrize("group,shape", CASES[:3] + [("su3", (2, 2, 2))])
def test_gauge_equivariance_and_invariance_of_log_q(group, shape):
    g = get_group(group)
    layer = make_layer(group, shape, seed=5)
    u = haar(group, 2, shape, 5)
    omega = g.random((2, *shape), torch.Generator().manual_seed(55))
    ug = gauge_transform(u, omega)
    for fn in (layer.forward, layer.inverse):
        v, ld = fn(u)
        vg, ldg = fn(ug)
        assert (vg - gauge_transform(v, omega)).abs().max() < 1e-10
        assert (ldg - ld).abs().max() < 1e-10
        assert ld.abs().min() > 1e-3


@pytest.mark.parametrize("group,shape", [("u1", (4, 4)), ("su3", (4, 4)), ("su2", (2, 2, 2, 2))])
def test_translation_by_two_sites_is_equivariant(group, shape):
    layer = make_layer(group, shape, seed=6)
    u = haar(group, 2, shape, 6)
    for axis in range(len(shape)):
        for n in (2, -2) if shape[axis] > 2 else (2,):
            def t(x, n=n, axis=axis):
                return torch.roll(x, n, dims=2 + axis)

            for fn in (layer.forward, layer.inverse):
                v, ld = fn(u)
                vt, ldt = fn(t(u))
                assert (vt - t(v)).abs().max() < 1e-10 and (ldt - ld).abs().max() < 1e-10


def test_model_log_prob_of_samples_and_gauge_invariance_of_log_q():
    from gaugeflow.flows.models import residual
    from gaugeflow.theories import gauge_theory

    for group, shape in [("u1", [4, 4]), ("su2", [4, 4]), ("su2", [2, 2, 2, 2])]:
        theory = gauge_theory(shape, group=group, beta=1.0)
        torch.manual_seed(0)
        model = residual(theory, F64, hidden=[4], n_layers=3 if len(shape) == 4 else None)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            x, log_q = model.sample(3, torch.Generator().manual_seed(1))
            assert (model.log_prob(x) - log_q).abs().max() < 1e-9
            g = get_group(group)
            omega = g.random((3, *shape), torch.Generator().manual_seed(2))
            assert (model.log_prob(gauge_transform(x, omega)) - log_q).abs().max() < 1e-9
            assert (log_q - model.prior.log_prob(x)).abs().min() > 1e-3  # not the identity


def test_zero_init_is_the_identity():
    for group, shape in CASES:
        layer = make_layer(group, shape, scale=0)
        u = haar(group, 2, shape, 0)
        for fn in (layer.forward, layer.inverse):
            v, ld = fn(u)
            assert (v - u).abs().max() < 1e-14 and ld.abs().max() < 1e-14


def test_the_invertibility_bound():
    mask = gauge_mask((4, 4), 0, 1, (0, 0, 0))
    net = lambda a, b: ConvNet(a, b, (4,), ndim=2)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="max_step"):
            ResidualCoupling(mask, "su2", net, max_step=bad)
    # huge raw coefficients are scaled into sum_k |c_k| < max_step
    layer = make_layer("su3", (4, 4), scale=50.0, max_step=0.7)
    u = haar("su3", 2, (4, 4), 0)
    c = layer.coefficients(u)
    lam = c.abs().sum(-1)
    assert lam.max() < 0.7 and lam.max() > 0.6
    v, ld = layer(u)
    u2, _ = layer.inverse(v)
    assert (u2 - u).abs().max() < 1e-10 and torch.isfinite(ld).all()
    # a NaN from the network is reported, not propagated
    with torch.no_grad():
        next(layer.net.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="bound"):
        layer(u)


def test_fixed_point_inverse_converges_and_reports_failure():
    layer = make_layer("su3", (4, 4), seed=7, scale=2.0)
    u = haar("su3", 2, (4, 4), 7)
    v, _ = layer(u)
    layer.inverse(v)
    n_iter = layer.last_iterations
    assert 3 < n_iter < layer.max_iter
    layer.max_iter = 2
    with pytest.raises(FixedPointError, match=r"ResidualCoupling\(mu=0.*did not converge in 2 iterations"):
        layer.inverse(v)
    # a looser tolerance stops earlier
    layer.max_iter, layer.tol = 1000, 1e-4
    layer.inverse(v)
    assert layer.last_iterations < n_iter


def test_inverse_gradients_are_the_implicit_ones():
    """d/dtheta of log_prob at fixed x against central finite differences (path-gradient score)."""
    layer = make_layer("su2", (4, 4), seed=8)
    u = haar("su2", 2, (4, 4), 8)
    w = torch.randn(u.shape + (2,), generator=torch.Generator().manual_seed(9), dtype=F64)

    def loss():
        x, ld = layer.inverse(u)
        return ld.sum() + (x.real * w[..., 0] + x.imag * w[..., 1]).sum()

    p = list(layer.net.parameters())[-1]  # the output bias: one per staple
    layer.zero_grad()
    loss().backward()
    grad = p.grad.clone()
    h = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(p.numel()):
            p.view(-1)[i] += h
            up = loss()
            p.view(-1)[i] -= 2 * h
            dn = loss()
            p.view(-1)[i] += h
            fd.view(-1)[i] = (up - dn) / (2 * h)
    assert (grad - fd).abs().max() < 1e-6 * max(1.0, fd.abs().max().item())
    assert fd.abs().max() > 1e-3


def test_staples_hold_exactly_one_active_link():
    # the 2x1 loops long across mu hold two active links: never candidates; chairs are filtered
    paths = staple_paths(4, 0, ("plaquette", "rectangle", "chair"))
    assert sum(k == "plaquette" for k, _ in paths) == 6 and sum(k == "rectangle" for k, _ in paths) == 12
    layer = make_layer("su2", (4, 4, 4, 4), loops=("plaquette", "rectangle", "chair"), scale=0)
    kinds = [k for k, _ in layer.staples]
    assert kinds.count("plaquette") == 6 and kinds.count("rectangle") == 12
    assert 0 < kinds.count("chair") < 72
    with pytest.raises(ValueError, match="loops"):
        staple_paths(2, 0, ("hexagon",))


def test_builds_through_the_config():
    from gaugeflow.components import build_model
    from gaugeflow.theories import gauge_theory
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "residual.yaml")
    for group, shape in [("u1", [4, 4]), ("su3", [4, 4])]:
        theory = gauge_theory(shape, group=group, beta=1.0)
        model = build_model(node, theory, torch.float32)
        assert len(model.flow.layers) == 16
        x, log_q = model.sample(2)
        assert torch.isfinite(log_q).all()
        assert (model.log_prob(x) - log_q).abs().max() < 1e-3
