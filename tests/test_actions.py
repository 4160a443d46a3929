import math

import pytest
import torch

from gaugeflow.groups import get_group, mul
from gaugeflow.lattice import shift
from gaugeflow.theories import GaugeAction, Phi4Action, Phi4HoppingAction, autograd_force, gauge_transform
from gaugeflow.theories.gauge import IMPROVEMENTS

CASES = [("u1", (4, 6)), ("su2", (4, 2, 4)), ("su3", (2, 4, 2, 2)), ("u1", (2, 2, 4, 2)), ("su2", (6, 4))]


def random_links(name, shape, gen, batch=2):
    g = get_group(name)
    return g, g.random((batch, len(shape), *shape), gen)


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("action", sorted(IMPROVEMENTS))
def test_gauge_invariance(name, shape, action, gen):
    g, u = random_links(name, shape, gen)
    s = GaugeAction.named(g, 1.7, action)
    omega = g.random((2, *shape), gen)
    s0, s1 = s(u), s(gauge_transform(u, omega))
    assert (s0 - s1).abs().max() < 1e-12 * s0.abs().max()


@pytest.mark.parametrize("name,shape", CASES)
def test_translation_invariance(name, shape, gen):
    g, u = random_links(name, shape, gen)
    s = GaugeAction.named(g, 2.0, "iwasaki")
    moved = shift(u.transpose(0, 1), 1, 1).transpose(0, 1)  # translate each direction's links by one site
    assert (s(u) - s(moved)).abs().max() < 1e-12 * s(u).abs().max()


@pytest.mark.parametrize("name,shape", CASES)
def test_cold_configuration(name, shape):
    g = get_group(name)
    u = g.identity((1, len(shape), *shape))
    d, vol = len(shape), math.prod(shape)
    n_plaq, n_rect = vol * d * (d - 1) // 2, vol * d * (d - 1)
    for action, c1 in IMPROVEMENTS.items():
        s = GaugeAction.named(g, 3.0, action)
        expect = -3.0 * ((1 - 8 * c1) * n_plaq + c1 * n_rect)
        assert s(u).item() == pytest.approx(expect, rel=1e-14)


def constant_flux_u1(shape, f, dtype=torch.float64):
    """2d U(1) field whose every plaquette has phase f (f = 2 pi n / V on the torus)."""
    l0, l1 = shape
    x0 = torch.arange(l0, dtype=dtype)[:, None].expand(l0, l1)
    x1 = torch.arange(l1, dtype=dtype)[None, :].expand(l0, l1)
    a1 = f * x0
    a0 = torch.zeros(l0, l1, dtype=dtype)
    a0[-1] = -f * l0 * x1[-1]
    phases = torch.stack([a0, a1])[None]
    return torch.polar(torch.ones_like(phases), phases)[..., None, None]


@pytest.mark.parametrize("action", sorted(IMPROVEMENTS))
def test_improved_action_on_constant_flux(action):
    # plaquettes carry phase f, 2x1 rectangles 2f in both orientations:
    # S = -beta V [c0 cos f + 2 c1 cos 2f]; c0 + 8 c1 = 1 makes S - S(1) = beta V f^2/2 + O(f^4)
    shape, n = (6, 8), 1
    f = 2 * math.pi * n / 48
    u = constant_flux_u1(shape, f)
    s = GaugeAction.named("u1", 1.3, action)
    c0, c1 = s.c0, s.c1
    assert c0 + 8 * c1 == pytest.approx(1.0)
    expect = -1.3 * 48 * (c0 * math.cos(f) + 2 * c1 * math.cos(2 * f))
    assert s(u).item() == pytest.approx(expect, rel=1e-13)


@pytest.mark.parametrize("name,shape", CASES)
def test_wilson_force_analytic_equals_autograd(name, shape, gen):
    g, u = random_links(name, shape, gen)
    s = GaugeAction(g, 2.3)
    assert s.analytic_force
    assert (s.force(u) - autograd_force(s, u, g)).abs().max() < 1e-13


@pytest.mark.parametrize("name,shape", CASES[:3])
@pytest.mark.parametrize("action", ["wilson", "dbw2"])
def test_force_is_directional_derivative(name, shape, action, gen):
    # dS/d eps along U -> exp(eps X) U equals sum tr(X F); central difference error O(eps^2)
    g, u = random_links(name, shape, gen, batch=1)
    s = GaugeAction.named(g, 1.1, action)
    x = g.random_algebra(u.shape[:-2], gen)
    f = s.force(u)
    exact = torch.einsum("...ij,...ji->", x, f).real.item()
    eps = 1e-5
    fd = (s(mul(g.exp(eps * x), u)) - s(mul(g.exp(-eps * x), u))) / (2 * eps)
    assert fd.item() == pytest.approx(exact, rel=1e-7, abs=1e-7)


def test_named_action_errors():
    with pytest.raises(ValueError, match="theory.action"):
        GaugeAction.named("su3", 1.0, "luscher")
    assert GaugeAction.named("su3", 1.0, "iwasaki", c1=-0.5).c1 == -0.5


@pytest.mark.parametrize("shape", [(8,), (4, 6), (2, 4, 2)])
def test_phi4_forces(shape, gen):
    phi = torch.randn((3, *shape), dtype=torch.float64, generator=gen)
    for action in (Phi4Action(-4.0, 8.0), Phi4Action(0.5, 0.0), Phi4HoppingAction(0.3, 0.5)):
        x = phi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(action(x).sum(), x)
        assert (action.grad(phi) - g).abs().max() < 1e-12


@pytest.mark.parametrize("shape", [(8,), (4, 6), (2, 4, 2)])
def test_phi4_hopping_form_is_the_same_theory(shape, gen):
    # S_std(sqrt(kappa) phi~) - S_hop(phi~) is a field-independent constant (lam~ V)
    std = Phi4Action(-1.3, 2.5)
    kappa, lam_tilde = std.to_hopping(len(shape))
    hop = Phi4HoppingAction(kappa, lam_tilde)
    assert hop.to_standard(len(shape)) == pytest.approx((-1.3, 2.5), rel=1e-12)
    phis = torch.randn((5, *shape), dtype=torch.float64, generator=gen)
    diff = std(math.sqrt(kappa) * phis) - hop(phis)
    vol = math.prod(shape)
    assert (diff + lam_tilde * vol).abs().max() < 1e-11


def test_phi4_reference_couplings():
    # EXACT.md §3: m2 = -4 in 2d gives lam~ = 1/2 and kappa = (2 lam)^(-1/2)
    for lam, kappa in [(8.0, 0.25), (6.975, 0.26774), (5.113, 0.31271)]:
        k, lt = Phi4Action(-4.0, lam).to_hopping(2)
        assert lt == pytest.approx(0.5) and k == pytest.approx(kappa, abs=5e-6)


def test_phi4_free_field_value():
    # constant field: kinetic term vanishes, S = V (m2 phi^2 + lam phi^4)
    phi = torch.full((1, 4, 4), 0.7, dtype=torch.float64)
    assert Phi4Action(-4.0, 8.0)(phi).item() == pytest.approx(16 * (-4 * 0.49 + 8 * 0.7**4))
