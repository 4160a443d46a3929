"""Scalar and U(1) flows: invertibility, Jacobians against autograd, gauge and translation symmetry."""

import math

import pytest
import torch

from gaugeflow.flows.masks import gauge_mask, gauge_mask_schedule
from gaugeflow.flows import models
from helpers import theory_flow
from gaugeflow.groups import get_group
from gaugeflow.lattice import shift
from gaugeflow.components import build_theory
from gaugeflow.theories import gauge_transform

U1 = dict(name="u1_2d", _target_="gaugeflow.theories.gauge_theory", group="u1", dim=2, beta=2.0)
PHI4 = dict(name="phi4", _target_="gaugeflow.theories.phi4_theory", m2=-4.0, lam=8.0)


def randomize(model, seed=0):
    """Re-draw every parameter with torch's default initialisation, biases included (a
    zero-initialised last layer is the identity), so the flow is far from the identity."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-0.1, 0.1)
    return model


# -- masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 4), (2, 6), (2, 4, 2), (2, 2, 2, 4)])
def test_mask_schedule_updates_each_link_once_and_no_plaquette_twice(shape):
    d = len(shape)
    count = torch.zeros((d, *shape), dtype=torch.int64)
    for m in gauge_mask_schedule(shape):
        count[m.mu] += m.links.long()
        upd = m.links[None]
        for nu in range(d):
            if nu != m.mu:
                # U_mu(x) and U_mu(x + nu) share the plaquette P_{mu nu}(x): never both updated
                assert not (upd & shift(upd, nu, 1)).any()
        # frozen plaquettes contain no updated link; the active plaquette is not frozen
        for (r, s), frozen in m.frozen.items():
            if m.mu in (r, s):
                other = s if r == m.mu else r
                touched = (upd | shift(upd, other, 1))[0]
                assert torch.equal(frozen, ~touched)
        key = tuple(sorted((m.mu, m.nu)))
        assert not (m.frozen[key] & m.links).any()
    assert torch.equal(count, torch.ones_like(count))


def test_mask_rejects_odd_extents():
    with pytest.raises(ValueError, match="even lattice extents"):
        gauge_mask((4, 5), 0, 1, (0, 0, 0))


# -- scalar flows ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["affine", "spline"])
@pytest.mark.parametrize("shape", [[4, 4], [2, 2, 2], [6]])
def test_scalar_round_trip(kind, shape):
    theory = build_theory(PHI4, shape)
    model = randomize(getattr(models, kind)(theory, n_layers=4, hidden=(8,), dtype=torch.float64))
    x = torch.randn((3, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, ld = model.flow(x)
    x2, ld_inv = model.flow.inverse(y)
    assert (x2 - x).abs().max() < 1e-10
    # log-derivatives of steep spline bins amplify the 1e-13 round-trip error of x: relative bound
    assert (ld + ld_inv).abs().max() < 1e-10 * ld.abs().max()
    assert (y - x).abs().max() > 1e-2  # not the identity


@pytest.mark.parametrize("kind", ["affine", "spline"])
@pytest.mark.parametrize("shape", [[2, 2], [2, 2, 2]])
def test_scalar_logdet_against_autograd(kind, shape):
    theory = build_theory(PHI4, shape)
    model = randomize(getattr(models, kind)(theory, n_layers=3, hidden=(8,), dtype=torch.float64), seed=1)
    x = torch.randn((1, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    n = x.numel()
    jac = torch.autograd.functional.jacobian(lambda v: model.flow(v.view(1, *shape))[0].reshape(n), x.reshape(n))
    _, ld = model.flow(x)
    assert ld.item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-10)


def test_scalar_model_density_consistency():
    theory = build_theory(PHI4, [4, 4])
    model = randomize(models.affine(theory, n_layers=4, hidden=(8,), dtype=torch.float64))
    x, log_q = model.sample(5, torch.Generator().manual_seed(0))
    assert (model.log_prob(x) - log_q).abs().max() < 1e-10


def test_scalar_translation_equivariance_by_mask_period():
    theory = build_theory(PHI4, [4, 6])
    model = randomize(models.spline(theory, n_layers=2, hidden=(8,), dtype=torch.float64))
    x = torch.randn((2, 4, 6), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # the checkerboard has period 2: translating by two sites commutes with the flow
    y, ld = model.flow(x)
    ys, lds = model.flow(shift(x, 1, 2))
    assert (ys - shift(y, 1, 2)).abs().max() < 1e-12 and (lds - ld).abs().max() < 1e-10
    # translating by one site does not (the masks are not invariant under it)
    y1, _ = model.flow(shift(x, 1, 1))
    assert (y1 - shift(y, 1, 1)).abs().max() > 1e-3


def test_zero_init_is_identity():
    for cfg, shape in [(PHI4, [4, 4]), (U1, [4, 4])]:
        theory = build_theory(cfg, shape)
        model = theory_flow(theory, n_layers=4, hidden=(8,), zero_init=True, dtype=torch.float64)
        x = theory.start(2, "hot", torch.Generator().manual_seed(0))
        y, ld = model.flow(x)
        assert (y - x).abs().max() < 1e-12 and ld.abs().max() < 1e-12


# -- U(1) gauge-equivariant flows ---------------------------------------------------------------

def u1_model(shape, n_layers=8, transform="spline", seed=0):
    # torch's default (fan-in scaled) initialisation: far from the identity, yet a deep
    # composition stays well conditioned (steep bins amplify the round-off of each inverse
    # by the inverse slope, layer after layer)
    torch.manual_seed(seed)
    theory = build_theory(dict(U1, dim=len(shape)), shape)
    model = models.u1_equivariant(theory, n_layers=n_layers, hidden=(8,), transform=transform,
                             dtype=torch.float64)
    return theory, model


@pytest.mark.parametrize("transform", ["spline", "ncp"])
@pytest.mark.parametrize("shape", [(4, 4), (2, 4, 2), (2, 2, 2, 2)])
def test_u1_round_trip(shape, transform):
    theory, model = u1_model(shape, n_layers=len(gauge_mask_schedule(shape)), transform=transform)
    u = theory.start(2, "hot", torch.Generator().manual_seed(1))
    v, ld = model.flow(u)
    u2, ld_inv = model.flow.inverse(v)
    assert (u2 - u).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-9
    moved = (v - u).abs().amax(dim=(0, 2, 3, 4, 5)) if len(shape) == 2 else (v - u).abs().flatten(2).amax((0, 2))
    assert (moved > 1e-3).all()  # every direction's links changed
    assert ((v.abs() - 1).abs() < 1e-12).all()


@pytest.mark.parametrize("transform", ["spline", "ncp"])
def test_u1_logdet_against_autograd_2x2(transform):
    # all 8 link angles of a 2x2 lattice as coordinates; the Haar measure is flat in them
    theory, model = u1_model((2, 2), n_layers=3, transform=transform, seed=2)
    theta = 2 * math.pi * torch.rand((1, 2, 2, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(t):
        u = torch.polar(torch.ones_like(t), t).view(1, 2, 2, 2, 1, 1)
        v, _ = model.flow(u)
        return torch.angle(v[..., 0, 0] * u[..., 0, 0].conj()).reshape(-1) + t.reshape(-1)

    jac = torch.autograd.functional.jacobian(f, theta)
    jac = jac.reshape(8, 8)
    _, ld = model.flow(torch.polar(torch.ones_like(theta), theta).view(1, 2, 2, 2, 1, 1))
    assert ld.item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-10)
    assert abs(ld.item()) > 1e-3


@pytest.mark.parametrize("shape", [(4, 4), (2, 4, 2), (2, 2, 2, 2)])
def test_u1_gauge_equivariance(shape):
    theory, model = u1_model(shape, n_layers=4)
    g = torch.Generator().manual_seed(4)
    u = theory.start(2, "hot", g)
    omega = get_group("u1").random((2, *shape), g)
    v, ld = model.flow(u)
    vt, ldt = model.flow(gauge_transform(u, omega))
    assert (vt - gauge_transform(v, omega)).abs().max() < 1e-11
    assert (ldt - ld).abs().max() < 1e-10
    lq, lqt = model.log_prob(u), model.log_prob(gauge_transform(u, omega))
    assert (lq - lqt).abs().max() < 1e-10


def test_u1_translation_equivariance_by_mask_period():
    theory, model = u1_model((4, 4), n_layers=8)
    u = theory.start(1, "hot", torch.Generator().manual_seed(5))

    def translate(w, mu, n):
        return shift(w.transpose(0, 1), mu, n).transpose(0, 1)

    v, ld = model.flow(u)
    vt, ldt = model.flow(translate(u, 0, 2))
    assert (vt - translate(v, 0, 2)).abs().max() < 1e-11 and (ldt - ld).abs().max() < 1e-10


def test_u1_sample_and_log_prob_agree():
    theory, model = u1_model((4, 4), n_layers=8)
    x, log_q = model.sample(4, torch.Generator().manual_seed(6))
    assert (model.log_prob(x) - log_q).abs().max() < 1e-9


def test_u1_density_is_normalised():
    # pushing Haar forward gives a normalised density: E_Haar[q(U)] = 1 (log q w.r.t. Haar)
    theory, model = u1_model((2, 2), n_layers=4, seed=7)
    u = theory.start(20000, "hot", torch.Generator().manual_seed(8))
    with torch.no_grad():
        w = torch.exp(model.log_prob(u))
    assert abs(w.mean().item() - 1) < 5 * w.std().item() / math.sqrt(w.numel())


def test_u1_rectangle_context_is_the_frozen_2x1_loops():
    """Rectangle phases equal the action's 2x1 loops; a rectangle is frozen exactly when none of
    its six links is updated by the layer (brute force over sites and links)."""
    import itertools

    from gaugeflow.flows.masks import gauge_mask_schedule
    from gaugeflow.flows.u1 import frozen_rectangles, rectangle_phases
    from gaugeflow.observables.loops import rectangle

    shape = (4, 4, 4)
    links = torch.polar(torch.ones(2, 3, *shape, 1, 1, dtype=torch.float64),
                        torch.rand(2, 3, *shape, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6.3)
    for rho, sigma in [(0, 1), (1, 0), (2, 1)]:
        want = torch.angle(rectangle(links, rho, sigma)[..., 0, 0])
        got = rectangle_phases(links, rho, sigma)
        assert torch.allclose(torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi, torch.zeros_like(got),
                              atol=1e-12)
    for mask in gauge_mask_schedule(shape)[:6]:
        rects = frozen_rectangles(mask.links, mask.mu)
        for (rho, sigma), frozen in rects.items():
            for x in itertools.product(*(range(n) for n in shape)):
                def site(*steps):
                    y = list(x)
                    for axis, n in steps:
                        y[axis] = (y[axis] + n) % shape[axis]
                    return tuple(y)
                loop = [(rho, site()), (rho, site((rho, 1))), (sigma, site((rho, 2))),
                        (rho, site((rho, 1), (sigma, 1))), (rho, site((sigma, 1))), (sigma, site())]
                touched = any(direction == mask.mu and bool(mask.links[y]) for direction, y in loop)
                assert bool(frozen[x]) == (not touched), (mask.mu, rho, sigma, x)
