"""SU(N) spectral plaquette couplings (gaugeflow.flows.sun): canonical cell, invertibility,
Jacobians against autograd in local group coordinates, gauge equivariance, and the
normalisation of the Haar pushforward. All in float64 / complex128; networks are randomised
away from their zero initialisation (asserted) so a broken inverse or Jacobian cannot pass.
"""

from __future__ import annotations

import math

import gaugeflow.flows.sun as sun
import pytest
import torch
from gaugeflow.flows.base import Flow
from gaugeflow.flows.conv import ConvNet
from gaugeflow.flows.masks import gauge_mask, gauge_mask_schedule
from gaugeflow.flows.sun import (
    CanonicalCellSpline,
    SUNPlaquetteCoupling,
    canonical_phases,
    log_weyl_density,
)
from gaugeflow.groups import SU, get_group
from gaugeflow.groups.matrix import dagger
from gaugeflow.observables.loops import plaquette
from gaugeflow.theories.gauge import gauge_transform
from helpers import haar, log_series, perturbed

F64 = torch.float64
TWO_PI = 2 * math.pi


def make_layer(group, shape, mu=0, nu=1, offsets=(0, 0, 0), hidden=(8,), scale=0.15, seed=0):
    # scale 0.15 gives raw spline parameters of O(1): far from the identity (asserted in the tests)
    # yet well conditioned; much larger ones make bins of width ~1e-3 whose inverses amplify rounding
    """A layer with a zero-initialised ConvNet; ``scale > 0`` then perturbs *every* parameter."""
    g = get_group(group)
    mask = gauge_mask(shape, mu, nu, offsets)
    with torch.random.fork_rng():
        # the hidden layers' default initialisation draws from the global generator
        torch.manual_seed(seed)
        layer = SUNPlaquetteCoupling.build(
            mask, g, lambda a, b: ConvNet(a, b, hidden, ndim=len(shape), zero_init=True)
        ).to(F64)
    if scale:
        perturbed(layer, scale, seed)
    return layer


# ------------------------------------------------------------------------------ canonical cell
@pytest.mark.parametrize("n", [2, 3, 4])
def test_canonical_phases_lie_in_the_cell_and_reproduce_the_matrix(n):
    g = get_group(f"su{n}")
    u = g.random((500,), torch.Generator().manual_seed(n))
    phases, vecs = g.eig(u)
    theta, perm = canonical_phases(phases)
    assert (theta[..., :-1] >= theta[..., 1:]).all()
    assert theta.sum(-1).abs().max() < 1e-12
    assert (theta[..., 0] - theta[..., -1]).max() <= TWO_PI
    v = vecs.gather(-1, perm[..., None, :].expand_as(vecs))
    rebuilt = (v * torch.polar(torch.ones_like(theta), theta)[..., None, :]) @ dagger(v)
    assert (rebuilt - u).abs().max() < 1e-12
    # the lift really rotates: principal phases of SU(N), N > 2, often sum to +-2 pi
    if n > 2:
        assert (torch.round(phases.sum(-1) / TWO_PI) != 0).any()


def random_gaps(n, batch, gen):
    """Uniform points of the cell: gaps are 2 pi times a flat Dirichlet vector."""
    e = -torch.log(torch.rand(batch, n, generator=gen, dtype=F64))
    return TWO_PI * (e / e.sum(-1, keepdim=True))[..., :-1]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_cell_flow_is_a_bijection_of_the_cell_with_autograd_jacobian(n):
    gen = torch.Generator().manual_seed(10 + n)
    flow = CanonicalCellSpline(n, n_bins=6, n_cond=2)
    batch = 64
    params = torch.randn(batch, flow.n_params, generator=gen, dtype=F64)
    gaps = random_gaps(n, batch, gen)
    new, ld = flow(gaps, params)
    # image in the cell: all N gaps (the last one implied) non-negative
    assert (new >= 0).all() and (new.sum(-1) <= TWO_PI + 1e-12).all()
    assert (new - gaps).abs().max() > 1e-1  # not the identity
    back, ld_inv = flow(new, params, inverse=True)
    assert (back - gaps).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-10
    # log|det dg'/dg| against autograd, point by point
    for b in range(8):
        jac = torch.autograd.functional.jacobian(lambda x: flow(x[None], params[b:b + 1])[0][0], gaps[b])
        assert ld[b].item() == pytest.approx(torch.linalg.slogdet(jac).logabsdet.item(), abs=1e-9)
    # the cell's vertices (the centre elements) are fixed points, faces map into themselves
    verts = TWO_PI * torch.eye(n, dtype=F64)[:, :-1]
    vimg, _ = flow(verts, params[:n])
    assert (vimg - verts).abs().max() < 1e-12
    face = gaps.clone()
    face[:, 0] = 0.0
    assert flow(face, params)[0][:, 0].abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_cell_flow_gradients_are_finite_at_the_vertices(n, dtype):
    # the vertices are the centre elements; all but the identity use up the stick (r = 0), where
    # d(g / r) and d log r were 1 / tiny: inf in float32 and NaN in every earlier layer of a flow
    gen = torch.Generator().manual_seed(30 + n)
    flow = CanonicalCellSpline(n, n_bins=6, n_cond=2)
    verts = (TWO_PI * torch.eye(n, dtype=F64)[:, :-1]).to(dtype)
    params = torch.randn(n, flow.n_params, generator=gen, dtype=dtype)
    for inverse in (False, True):
        g = verts.clone().requires_grad_(True)
        q = params.clone().requires_grad_(True)
        new, ld = flow(g, q, inverse=inverse)
        assert (new - verts).abs().max() < 1e-5 and torch.isfinite(ld).all()
        (1e6 * (new.sum() + ld.sum())).backward()
        assert torch.isfinite(g.grad).all() and torch.isfinite(q.grad).all()


def test_cell_flow_zero_parameters_are_the_identity():
    gen = torch.Generator().manual_seed(3)
    flow = CanonicalCellSpline(3)
    gaps = random_gaps(3, 100, gen)
    new, ld = flow(gaps, torch.zeros(100, flow.n_params, dtype=F64))
    assert (new - gaps).abs().max() < 1e-13 and ld.abs().max() < 1e-13


def test_weyl_density_su2_closed_form():
    theta = torch.linspace(0.1, 3.0, 7, dtype=F64)
    expected = torch.log(4 * torch.sin(theta) ** 2)
    assert (log_weyl_density(2 * theta[:, None]) - expected).abs().max() < 1e-13


# ------------------------------------------------------------------------------ layer basics
@pytest.mark.parametrize("group,shape", [("su2", (4, 4)), ("su3", (4, 4)), ("su3", (2, 2, 2)), ("su4", (2, 2))])
def test_zero_init_is_exactly_the_identity(group, shape):
    layer = make_layer(group, shape, scale=0)
    u = haar(group, 3, shape, 0)
    for fn in (layer.forward, layer.inverse):
        v, ld = fn(u)
        assert (v - u).abs().max() < 1e-12 and ld.abs().max() < 1e-12


@pytest.mark.parametrize(
    "group,shape,offsets",
    [
        ("su2", (4, 4), (1, 0, 0)),
        ("su3", (4, 4), (0, 1, 0)),
        ("su3", (2, 2, 2), (1, 1, 1)),
        ("su2", (2, 2, 2, 2), (0, 1, 1)),
        ("su4", (2, 2), (0, 0, 0)),
    ],
)
def test_round_trip_with_random_weights(group, shape, offsets):
    n = get_group(group).N
    layer = make_layer(group, shape, mu=1, nu=0, offsets=offsets, seed=1)
    u = haar(group, 3, shape, 1)
    v, ld = layer(u)
    u2, ld_inv = layer.inverse(v)
    assert (u2 - u).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-9
    # not the identity; only the active links moved; the result stays in SU(N)
    moved = (v - u).abs().amax((-1, -2))
    assert moved[:, 1][:, layer.link_mask].min() > 1e-3
    assert moved[:, 0].max() == 0 and moved[:, 1][:, ~layer.link_mask].max() == 0
    assert (v @ dagger(v) - torch.eye(n, dtype=v.dtype)).abs().max() < 1e-12
    assert (torch.linalg.det(v) - 1).abs().max() < 1e-12


def test_full_schedule_flow_round_trip_su3():
    shape = (4, 4)
    schedule = gauge_mask_schedule(shape)
    layers = [make_layer("su3", shape, m.mu, m.nu, m.offsets, seed=i) for i, m in enumerate(schedule)]
    flow = Flow(layers)
    u = haar("su3", 2, shape, 7)
    v, ld = flow(u)
    u2, ld_inv = flow.inverse(v)
    assert (u2 - u).abs().max() < 1e-10 and (ld + ld_inv).abs().max() < 1e-8
    assert (v - u).abs().amax((-1, -2)).min() > 1e-3  # every link changed


def test_centre_elements_are_fixed_points():
    # plaquettes equal to centre elements (fully degenerate spectra, vertices of the cell)
    g = get_group("su3")
    shape = (2, 2)
    u = g.identity((1, 2, *shape))
    z = torch.exp(torch.tensor(2j * math.pi / 3)) * torch.eye(3, dtype=torch.complex128)
    u[0, 0, 0, 0] = z
    layer = make_layer("su3", shape, seed=2)
    v, ld = layer(u)
    assert (v - u).abs().max() < 1e-12 and torch.isfinite(ld).all()


def test_build_sizes_and_errors():
    mask = gauge_mask((4, 4, 4), 0, 1, (0, 0, 0))
    layer = SUNPlaquetteCoupling.build(mask, "su3", lambda a, b: ConvNet(a, b, (4,), ndim=3), n_bins=5, n_cond=3)
    assert SUNPlaquetteCoupling.context_channels(3, 3) == 3 * 4
    assert layer.cell.n_params == 16 * (2 + 3)
    assert layer.context(haar("su3", 1, (4, 4, 4), 0)).shape == (1, 12, 4, 4, 4)
    with pytest.raises(ValueError, match="SU"):
        SUNPlaquetteCoupling(gauge_mask((2, 2), 0, 1, (0, 0, 0)), ConvNet(1, 1, ()), "u1")
    bad = SUNPlaquetteCoupling(gauge_mask((2, 2), 0, 1, (0, 0, 0)), ConvNet(1, 3, ()).to(F64), "su2")
    with pytest.raises(ValueError, match="channels"):
        bad(haar("su2", 1, (2, 2), 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_gradients_are_finite(dtype):
    # the training path: float32 by default, gradients through eigh, sort and the splines
    layer = make_layer("su3", (4, 4), seed=3).to(dtype)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    u = haar("su3", 4, (4, 4), 3).to(cdtype)
    v, ld = layer(u)
    (ld.sum() + v.real.sum()).backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert max(gr.abs().max() for gr in grads) > 0
    u2, _ = layer.inverse(v.detach())
    assert (u2 - u).abs().max() < (1e-4 if dtype == torch.float32 else 1e-12)


# ------------------------------------------------------------------------------ Jacobians
def link_jacobian_logdet(layer, u0, site, inverse=False):
    """log|det| of U_mu(site) -> U'_mu(site) in exponential coordinates at U0, everything else fixed.

    U = exp(sum_a c_a T_a) U0 maps to U' = exp(sum_a c'_a T_a) U0'. The normalised Haar measure
    in these coordinates has a density that is constant to first order at c = 0, so the
    autograd |det dc'/dc| at c = 0 is the Haar Jacobian of the link map.
    """
    g = layer.group
    mu = layer.mu
    fn = layer.inverse if inverse else layer.forward
    idx = (0, mu, *site)
    v0 = fn(u0)[0][idx].detach()

    def f(c):
        u = u0.clone()
        u[idx] = torch.linalg.matrix_exp(g.from_coords(c)) @ u0[idx]
        v = fn(u)[0][idx]
        return g.to_coords(log_series(v @ dagger(v0)))

    jac = torch.autograd.functional.jacobian(f, torch.zeros(g.dim, dtype=F64))
    return torch.linalg.slogdet(jac).logabsdet.item()


@pytest.mark.parametrize("group,shape", [("su2", (4, 4)), ("su3", (4, 4)), ("su2", (2, 2, 2)), ("su3", (2, 2, 2))])
def test_logdet_against_autograd_in_local_coordinates(group, shape):
    layer = make_layer(group, shape, offsets=(1, 0, 1) if len(shape) > 2 else (1, 0, 0), seed=4)
    u0 = haar(group, 1, shape, 4)
    for inverse in (False, True):
        _, site_ld = layer.transform(u0, inverse=inverse)
        _, total = (layer.inverse if inverse else layer.forward)(u0)
        active = layer.link_mask.nonzero().tolist()
        assert len(active) >= 1 and (site_ld[0][~layer.link_mask] == 0).all()
        auto = [link_jacobian_logdet(layer, u0, x, inverse) for x in active]
        for x, a in zip(active, auto):
            assert site_ld[(0, *x)].item() == pytest.approx(a, abs=1e-8)
        # the layer's logdet is the sum of the per-active-link Jacobians (block-triangular map)
        assert total.item() == pytest.approx(sum(auto), abs=1e-8)
        assert max(abs(a) for a in auto) > 1e-2  # a non-trivial Jacobian was tested


# ------------------------------------------------------------------------------ gauge symmetry
@pytest.mark.parametrize("group,shape", [("su2", (4, 4)), ("su3", (4, 4)), ("su3", (2, 2, 2))])
def test_gauge_equivariance(group, shape):
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
    # the active plaquette's spectrum really changed (an equivariant identity map would pass too)
    p_old = g.eigphases(plaquette(u, 0, 1)[:, layer.link_mask]).sort(-1).values
    p_new = g.eigphases(plaquette(layer(u)[0], 0, 1)[:, layer.link_mask]).sort(-1).values
    assert (p_new - p_old).abs().max() > 1e-2


# ------------------------------------------------------------------------------ normalisation
def haar_pushforward_mean(group, batch=20000, seed=9):
    """Mean and standard error of exp(logdet) over Haar samples on a 2x2 lattice (one active link)."""
    layer = make_layer(group, (2, 2), seed=seed)
    u = haar(group, batch, (2, 2), seed)
    with torch.no_grad():
        _, ld = layer(u)
    w = torch.exp(ld)
    return w.mean().item(), (w.std() / math.sqrt(batch)).item(), ld.std().item()


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_haar_pushforward_is_normalised(group, monkeypatch):
    # int |det df| dHaar = Haar(f(SU(N)^links)) = 1 for a bijection f
    mean, err, spread = haar_pushforward_mean(group)
    assert spread > 0.1  # the layer is far enough from the identity for the check to mean something
    assert abs(mean - 1) < 4 * err, (mean, err)
    # the check has power: dropping the Weyl factor J(theta')/J(theta) is detected
    monkeypatch.setattr(sun, "log_weyl_density", lambda gaps: torch.zeros_like(gaps[..., 0]))
    wrong, werr, _ = haar_pushforward_mean(group)
    assert abs(wrong - 1) > 6 * werr, (wrong, werr)


# ------------------------------------------------------------------------------ special links
C128 = torch.complex128


def centre_element(n, k, dtype=C128):
    phase = torch.tensor(2 * math.pi * k / n, dtype=F64)
    return (torch.polar(torch.ones_like(phase), phase) * torch.eye(n, dtype=C128)).to(dtype)


def special_links(group, shape, seed, dtype=C128):
    """Named link configurations (batch 2) whose plaquettes have degenerate or centre spectra.

    ``exact`` ones have plaquettes that are exactly (not just up to rounding) identity, centre
    elements or degenerate; their log-density is singular (J = 0) but finite, and it is the
    same both ways only there.
    """
    g = get_group(group)
    n, d = g.N, len(shape)
    gen = torch.Generator().manual_seed(seed)
    out = {"identity": (g.identity((2, d, *shape), dtype=dtype), True)}
    for k in range(1, n):
        out[f"centre {k}"] = (centre_element(n, k, dtype) * g.identity((2, d, *shape), dtype=dtype), True)
    out["pure gauge"] = (gauge_transform(g.identity((2, d, *shape), dtype=dtype),
                                         g.random((2, *shape), gen, dtype=dtype)), False)
    # commuting diagonal links diag(e^{ix}, ..., e^{ix}, e^{-i(n-1)x}): every plaquette degenerate
    x = (2 * torch.rand(2, d, *shape, generator=gen, dtype=F64) - 1) * math.pi
    ph = torch.stack([x] * (n - 1) + [-(n - 1) * x], -1)
    out["degenerate diagonal"] = (torch.diag_embed(torch.polar(torch.ones_like(ph), ph)).to(dtype), False)
    u = g.random((2, d, *shape), gen, dtype=dtype)
    u[torch.rand(u.shape[:-2], generator=gen) < 0.3] = torch.eye(n, dtype=dtype)
    u[torch.rand(u.shape[:-2], generator=gen) < 0.3] = centre_element(n, 1, dtype)
    out["haar with identity and centre links"] = (u, False)
    return out


@pytest.mark.parametrize(
    "group,shape,scale", [("su2", (4, 4), 0.15), ("su3", (4, 4), 0.15), ("su3", (2, 2, 2), 0.08), ("su4", (2, 2), 0.15)]
)
def test_round_trip_on_degenerate_centre_and_identity_links(group, shape, scale):
    n = get_group(group).N
    layer = make_layer(group, shape, seed=3, scale=scale)
    for name, (u, exact) in special_links(group, shape, seed=1).items():
        for fn, inv in ((layer.forward, layer.inverse), (layer.inverse, layer.forward)):
            v, ld = fn(u)
            u2, ld2 = inv(v)
            assert (u2 - u).abs().max() < 1e-10, name
            assert torch.isfinite(ld).all() and torch.isfinite(ld2).all(), name
            assert (v @ dagger(v) - torch.eye(n, dtype=v.dtype)).abs().max() < 1e-12, name
            assert (torch.linalg.det(v) - 1).abs().max() < 1e-12, name
            if exact:
                # centre plaquettes are vertices of the cell: fixed points
                assert (v - u).abs().max() == 0 and (ld + ld2).abs().max() == 0, name
            elif name.startswith("haar"):
                assert (ld + ld2).abs().max() < 1e-9, name
                assert (v - u).abs().max() > 1e-2, name  # the layer really acted


# ------------------------------------------------------------------------------ sampler vs inverse
def small_model(theory_cfg, shape, n_layers, scale, seed=1, dtype=F64):
    """A spectral flow model with zero-initialised nets, then every weight perturbed (asserted)."""
    from gaugeflow.components import build_theory
    from helpers import theory_flow

    theory = build_theory(theory_cfg, list(shape))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = theory_flow(theory, n_layers=n_layers, hidden=(8,), zero_init=True, dtype=dtype)
    zero = [p.abs().max().item() for p in model.parameters()]
    assert min(zero) == 0  # zero-initialised output layers: the model starts as the identity
    perturbed(model, scale, seed)
    assert min(p.abs().max().item() for p in model.parameters()) > 0
    return theory, model


SU3_2D = {"name": "su3_2d", "_target_": "gaugeflow.theories.gauge_theory", "group": "su3", "dim": 2, "beta": 4.0}
SU3_4D = {"name": "su3_4d", "_target_": "gaugeflow.theories.gauge_theory", "group": "su3", "dim": 4, "beta": 2.0}
OLD_AXIS = math.atan(0.6180339887498949)


def old_eig(self, u):
    """The former Group.eig (eigh of the fixed combination cos + 0.618 sin), for power checks."""
    h = 0.5 * (u + dagger(u)) - 0.5j * 0.6180339887498949 * (u - dagger(u))
    _, vecs = torch.linalg.eigh(h)
    return torch.angle((dagger(vecs) @ u @ vecs).diagonal(dim1=-2, dim2=-1)), vecs


def adversarial_draws(layer, batch, shape, seed):
    """Haar links in which every active plaquette of ``layer`` has eigenphases symmetric about the
    axis of the former eig's fixed combination, ``(a + y, a - y, -2a)`` (distinct phases, equal
    eigenvalues of that combination)."""
    g = layer.group
    gen = torch.Generator().manual_seed(seed)
    u = g.random((batch, len(shape), *shape), gen)
    mu, nu, act = layer.mu, layer.nu, layer.link_mask
    y = 0.2 + 2.5 * torch.rand(batch, int(act.sum()), generator=gen, dtype=F64)
    ph = torch.stack([OLD_AXIS + y, OLD_AXIS - y, torch.full_like(y, -2 * OLD_AXIS)], -1)
    v = g.random(y.shape, gen)
    target = (v * torch.polar(torch.ones_like(ph), ph)[..., None, :]) @ dagger(v)
    # U_mu(x) = target (U_mu(x+nu) U_nu(x+mu)^dagger U_nu(x)^dagger)^dagger makes P_{mu nu}(x) = target
    from gaugeflow.lattice import shift

    staple = u[:, nu] @ shift(u[:, mu], nu, 1) @ dagger(shift(u[:, nu], mu, 1))
    u_mu = u[:, mu].clone()
    u_mu[:, act] = target @ staple[:, act]
    u[:, mu] = u_mu
    assert (plaquette(u, mu, nu)[:, act] - target).abs().max() < 1e-12
    return u


def test_sampler_and_inverse_pass_agree_on_every_draw(monkeypatch):
    theory, model = small_model(SU3_2D, (4, 4), n_layers=8, scale=0.15)
    x, log_q = model.sample(256, torch.Generator().manual_seed(3))
    assert log_q.std() > 1.0  # far from the Haar prior (log q = 0)
    assert (model.log_prob(x) - log_q).abs().max() < 1e-10
    # gauge-transformed draws: the same log q
    omega = theory.group.random((256, 4, 4), torch.Generator().manual_seed(4))
    assert (model.log_prob(gauge_transform(x, omega)) - log_q).abs().max() < 1e-10
    # prior draws whose first active plaquettes defeat a fixed hermitian combination
    z = adversarial_draws(model.flow.layers[0], 64, (4, 4), seed=5)

    def mismatch():
        y, ld = model.flow(z)
        return (model.log_prob(y) - (model.prior.log_prob(z) - ld)).abs().max().item()

    assert mismatch() < 1e-10
    monkeypatch.setattr(SU, "eig", old_eig)
    assert mismatch() > 1e-3  # the former eig emitted links that were not the reported map


# ------------------------------------------------------------------------------ 4d training path
def autograd_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack.extend(nxt for nxt, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_4d_su3_with_identity_and_centre_links(dtype):
    # the 4d training step that used to stop with "linalg_eigh_backward: ... ill-defined"
    shape = (2, 2, 2, 2)
    theory, model = small_model(SU3_4D, shape, n_layers=None, scale=0.03, dtype=dtype)
    assert len(model.flow.layers) == 32
    cdtype = torch.complex64 if dtype == torch.float32 else C128
    g = theory.group
    gen = torch.Generator().manual_seed(2)
    special = special_links("su3", shape, seed=2, dtype=cdtype)
    z = torch.cat([g.random((2, 4, *shape), gen, dtype=cdtype)] + [u for u, _ in special.values()])
    x, ld = model.flow(z)
    loss = (theory.action(x) - ld).mean()
    assert not any("Eigh" in name for name in autograd_nodes(loss))  # no eigenvector-phase check left
    # a large loss scale, as large gradients trip torch's check in float32
    (1e6 * loss).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(gr.abs().max() > 0 for gr in grads)


def test_parameter_gradient_against_finite_differences(monkeypatch):
    shape = (2, 2, 2, 2)
    theory, model = small_model(SU3_4D, shape, n_layers=8, scale=0.03)
    z = theory.group.random((3, 4, *shape), torch.Generator().manual_seed(4))

    def loss():
        x, ld = model.flow(z)
        return (theory.action(x) - ld).mean()

    # a weight of the first layer: its gradient passes back through all eight layers
    p = model.flow.layers[0].net.net[-1].weight
    loss().backward()
    i = p.grad.abs().flatten().argmax()
    auto = p.grad.flatten()[i].item()
    h = 1e-6

    def fd():
        with torch.no_grad():
            p.view(-1)[i] += h
            up = loss().item()
            p.view(-1)[i] -= 2 * h
            down = loss().item()
            p.view(-1)[i] += h
        return (up - down) / (2 * h)

    assert abs(auto) > 0.1
    assert auto == pytest.approx(fd(), rel=1e-6)
    # power: without the closed-form dR/dP of the spectral update the gradient is off by far more
    # than the tolerance above (5e-4 relative here)
    orig = sun._SpectralRotation.apply
    monkeypatch.setattr(sun._SpectralRotation, "apply", lambda q, *rest: orig(q.detach(), *rest))
    p.grad = None
    loss().backward()
    assert p.grad.flatten()[i].item() != pytest.approx(auto, rel=1e-4)
