"""L-CNN context networks (gaugeflow.flows.lcnn, Favoni et al. 2012.12901), float64: every layer is
gauge equivariant (``W -> Omega W Omega^dagger`` with ``U -> U^Omega``), the traced outputs gauge
invariant, the network translation equivariant, blind to the links it is told are not frozen, and a
spectral or residual model with ``context=lcnn`` round-trips with a gauge-invariant log q."""

from __future__ import annotations

import pytest
import torch
from gaugeflow.flows.lcnn import (
    LCNN,
    LAct,
    LBilin,
    LConv,
    LTrace,
    masked_links,
    plaquette_fields,
)
from gaugeflow.flows.masks import gauge_mask
from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import dagger
from gaugeflow.theories.gauge import gauge_transform
from helpers import haar, perturbed

F64 = torch.float64


def adjoint_transform(w, omega):
    """``W(x) -> Omega(x) W(x) Omega(x)^dagger`` of ``(batch, *L, C, N, N)``."""
    om = omega[..., None, :, :]
    return om @ w @ dagger(om)


def random_adjoint(group, batch, shape, channels, seed):
    n = get_group(group).N
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, channels, n, n, generator=gen, dtype=torch.complex128)


def net(ndim, out=3, seed=0, **kw):
    torch.manual_seed(seed)
    model = LCNN(ndim, out, **kw).to(F64)
    return model


CASES = [("su2", (4, 4)), ("su3", (4, 4)), ("su3", (2, 2, 2)), ("u1", (4, 4))]


@pytest.mark.parametrize("group,shape", CASES)
def test_each_layer_is_gauge_equivariant(group, shape):
    g = get_group(group)
    d = len(shape)
    u = haar(group, 2, shape, 1)
    omega = g.random((2, *shape), torch.Generator().manual_seed(11))
    ug = gauge_transform(u, omega)
    w = random_adjoint(group, 2, shape, 3, 2)
    wg = adjoint_transform(w, omega)
    # the inputs: plaquettes and their daggers, also with links masked out
    frozen = gauge_mask(shape, 0, 1, (1, 0, 0) if d == 2 else (1, 0, 1)).links
    mask = torch.ones(d, *shape, dtype=torch.bool)
    mask[0] = ~frozen
    for m in (None, mask):
        p, pg = plaquette_fields(masked_links(u, m)), plaquette_fields(masked_links(ug, m))
        assert (pg - adjoint_transform(p, omega)).abs().max() < 1e-12
    torch.manual_seed(0)
    layers = [(LConv(3, 4, d, reach=2).to(F64), True), (LBilin(3, 4).to(F64), False),
              (LAct(3).to(F64), False)]
    for layer, needs_links in layers:
        out = layer(w, masked_links(u, mask)) if needs_links else layer(w)
        outg = layer(wg, masked_links(ug, mask)) if needs_links else layer(wg)
        assert (outg - adjoint_transform(out, omega)).abs().max() < 1e-11, layer
        assert out.abs().max() > 1e-2
    # LConv really transports: with the links replaced, its output changes (U(1): the adjoint
    # action is trivial, transport only shifts)
    conv = layers[0][0]
    if g.N > 1:
        assert (conv(w, u) - conv(w, haar(group, 2, shape, 9))).abs().max() > 1e-2
    t, tg = LTrace()(w), LTrace()(wg)
    assert t.shape == (2, 6, *shape) and (t - tg).abs().max() < 1e-12


@pytest.mark.parametrize("group,shape", CASES)
def test_outputs_are_gauge_invariant_and_translation_equivariant(group, shape):
    g = get_group(group)
    d = len(shape)
    model = net(d, channels=(3, 3), reach=1, hidden=(4,))
    u = haar(group, 2, shape, 3)
    omega = g.random((2, *shape), torch.Generator().manual_seed(33))
    y = model(u)
    assert y.shape == (2, 3, *shape) and y.std() > 1e-3
    assert (model(gauge_transform(u, omega)) - y).abs().max() < 1e-10
    for axis in range(d):
        for n in (1, -1, 2):
            t = lambda x, n=n, axis=axis: torch.roll(x, n, dims=2 + axis)
            assert (model(t(u)) - t(y)).abs().max() < 1e-10
    # with a coupling's mask (period 2): equivariant under shifts by two sites
    m = torch.ones(d, *shape, dtype=torch.bool)
    m[0] = ~gauge_mask(shape, 0, 1, (0, 0, 0)).links
    ym = model(u, m)
    assert (model(torch.roll(u, 2, dims=2), m) - torch.roll(ym, 2, dims=2)).abs().max() < 1e-10


def test_blind_to_links_that_are_not_frozen():
    shape = (4, 4)
    model = net(2, channels=(3, 3), reach=2, hidden=(4,))
    mask = gauge_mask(shape, 1, 0, (0, 1, 0))
    frozen = torch.ones(2, *shape, dtype=torch.bool)
    frozen[1] = ~mask.links
    u = haar("su3", 2, shape, 4).requires_grad_(False)
    v = u.clone()
    v[:, 1][:, mask.links] = haar("su3", 2, shape, 5)[:, 1][:, mask.links]
    assert (model(u, frozen) - model(v, frozen)).abs().max() == 0
    assert (model(u) - model(v)).abs().max() > 1e-3  # unmasked, the same change is seen
    x = u.clone().requires_grad_(True)
    model(x, frozen).sum().backward()
    assert x.grad[:, 1][:, mask.links].abs().max() == 0 and x.grad.abs().max() > 0


def test_zero_init_and_sizes():
    model = net(2, out=5, zero_init=True)
    u = haar("su3", 1, (4, 4), 0)
    assert model(u).abs().max() == 0
    with pytest.raises(ValueError, match="lcnn_channels"):
        LCNN(2, 3, channels=())


@pytest.mark.parametrize("arch,group,shape", [("sun_spectral", "su3", [4, 4]), ("sun_spectral", "su2", [2, 2, 2]),
                                              ("residual", "su2", [4, 4]), ("residual", "u1", [4, 4])])
def test_models_with_lcnn_context_round_trip_with_gauge_invariant_log_q(arch, group, shape):
    from gaugeflow.flows import models
    from gaugeflow.flows.lcnn import LCNN as Net
    from gaugeflow.theories import gauge_theory

    theory = gauge_theory(shape, group=group, beta=2.0)
    torch.manual_seed(0)
    keys = {"active_loop": "learned"} if arch == "sun_spectral" and group == "su3" else {}
    model = getattr(models, arch)(theory, F64, hidden=[4], n_layers=4, context="lcnn", lcnn_channels=[2],
                                  zero_init=True, **keys)
    assert all(isinstance(layer.net, Net) for layer in model.flow.layers)
    perturbed(model, 0.1 if arch == "sun_spectral" else 0.3)
    with torch.no_grad():
        x, log_q = model.sample(3, torch.Generator().manual_seed(1))
        z, _ = model.flow.inverse(x)
        assert (model.log_prob(x) - log_q).abs().max() < 1e-9
        assert (model.flow(z)[0] - x).abs().max() < 1e-10
        omega = theory.group.random((3, *shape), torch.Generator().manual_seed(2))
        assert (model.log_prob(gauge_transform(x, omega)) - log_q).abs().max() < 1e-9
        assert log_q.abs().min() > 1e-3  # not the identity
    with pytest.raises(ValueError, match="context"):
        getattr(models, arch)(theory, F64, context="gnn")


def test_lcnn_coupling_logdet_against_autograd():
    # the Jacobian stays block-triangular: per-link log-dets match autograd with the L-CNN context
    import test_sun_flow as tsf
    from gaugeflow.flows.lcnn import lcnn_factory
    from gaugeflow.flows.sun import SUNPlaquetteCoupling

    mask = gauge_mask((4, 4), 0, 1, (1, 0, 0))
    torch.manual_seed(0)
    layer = SUNPlaquetteCoupling.build(mask, "su2", lcnn_factory(2, (2,), 1, (4,), zero_init=True),
                                       active_loop="learned").to(F64)
    perturbed(layer, 0.15, 3)
    u0 = haar("su2", 1, (4, 4), 4)
    _, site_ld = layer.transform(u0)
    for x in mask.links.nonzero().tolist():
        assert site_ld[(0, *x)].item() == pytest.approx(tsf.link_jacobian_logdet(layer, u0, x), abs=1e-8)
    assert site_ld.abs().max() > 1e-2
