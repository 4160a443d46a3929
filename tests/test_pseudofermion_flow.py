"""The conditional pseudofermion flow q(phi | U) (gaugeflow.flows.pseudofermion; Abbott et al. 2207.08945).

float64, tiny lattices. The flow is linear in phi, so q(phi | U) = N(0, L L^dagger) exactly: the
log-Jacobian and the density are checked against the dense matrix L of the map chi -> phi.
"""

from __future__ import annotations

import math

import pytest
import torch
from gaugeflow.fermions import WilsonFermions, colour_mul, gaussian_fermion
from gaugeflow.flows.pseudofermion import (
    PseudofermionFlow,
    complex_gaussian_log_prob,
    hopping_weights,
)
from gaugeflow.groups import get_group
from gaugeflow.lattice import use_shift
from gaugeflow.theories.gauge import gauge_transform
from helpers import haar

F64 = torch.float64
C128 = torch.complex128

# (group, lattice): U(1) in 2d, SU(N) in 4d
CASES = [("u1", (4, 2)), ("su2", (2, 2, 2, 2)), ("su3", (2, 2, 2, 2))]


def n_colour(group: str) -> int:
    return get_group(group).N


def randomised(flow: PseudofermionFlow, seed: int, scale: float = 0.15) -> PseudofermionFlow:
    """Every parameter moved off its (identity / zero-network) start, so each test can fail; conv
    weights by ``scale / sqrt(fan_in)`` so that the per-site matrices move by O(scale) in any d."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            fan_in = p[0].numel() if name.endswith("weight") else 1
            p.add_(scale / math.sqrt(fan_in) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def make(group: str, shape, seed: int = 0, **keys) -> PseudofermionFlow:
    keys.setdefault("n_layers", 4)
    keys.setdefault("hidden", (4,))
    return randomised(PseudofermionFlow(shape, n_colour(group), dtype=F64, **keys), seed)


def noise(links: torch.Tensor, flow: PseudofermionFlow, seed: int) -> torch.Tensor:
    shape = (links.shape[0], *flow.lattice_shape, flow.n_spin, flow.n_colour)
    return gaussian_fermion(shape, torch.Generator().manual_seed(seed), dtype=C128)


def dense_map(flow: PseudofermionFlow, links: torch.Tensor) -> torch.Tensor:
    """The complex matrix L (batch, n, n) of chi -> phi, columns = images of the unit vectors
    (index order of ``field.reshape(batch, n)``)."""
    shape = (*flow.lattice_shape, flow.n_spin, flow.n_colour)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=C128).reshape(n, *shape)
    with torch.no_grad():
        cols = [flow(links[i : i + 1].expand(n, *links.shape[1:]), basis)[0].reshape(n, n).T for i in range(links.shape[0])]
    return torch.stack(cols)


def dense_gaussian_log_prob(phi: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N_C(phi; 0, cov) = -phi^dagger cov^{-1} phi - n log pi - log det cov."""
    v = phi.reshape(phi.shape[0], -1, 1)
    quad = (v.mH @ torch.linalg.solve(cov, v))[:, 0, 0].real
    return -quad - v.shape[1] * math.log(math.pi) - torch.linalg.slogdet(cov)[1]


@pytest.mark.parametrize("boundary", ["antiperiodic", "periodic"])
@pytest.mark.parametrize("group,shape", [("u1", (4, 4)), ("su3", (2, 2, 2, 2))])
def test_round_trip(group, shape, boundary):
    flow = make(group, shape, boundary=boundary)
    links = haar(group, 2, shape, seed=1)
    chi = noise(links, flow, 2)
    phi, ld = flow(links, chi)
    back, ld_inv = flow.inverse(links, phi)
    assert phi.shape == chi.shape and ld.shape == (2,)
    assert (phi - chi).abs().max() > 0.1  # not the identity
    assert ld.abs().min() > 0.1
    assert (back - chi).abs().max() < 1e-12
    assert (ld + ld_inv).abs().max() < 1e-12


@pytest.mark.parametrize("group,shape", [("u1", (2, 2)), ("u1", (4, 2)), ("su2", (2, 2, 2, 2))])
def test_logdet_against_dense_jacobian(group, shape):
    flow = make(group, shape, seed=3)
    links = haar(group, 1, shape, seed=4)
    chi = noise(links, flow, 5)

    def real_map(x):  # R^{2n} -> R^{2n}: real and imaginary parts
        return torch.view_as_real(flow(links, torch.view_as_complex(x))[0]).reshape(-1)

    jac = torch.autograd.functional.jacobian(real_map, torch.view_as_real(chi).contiguous(), vectorize=True)
    jac = jac.reshape(real_map(torch.view_as_real(chi)).numel(), -1)
    sign, logabs = torch.linalg.slogdet(jac)
    _, ld = flow(links, chi)
    assert sign.abs() > 0.5
    assert abs(float(ld[0].detach()) - float(logabs)) < 1e-10
    # the map is complex linear: the real Jacobian is the realification of the complex L, entry
    # [(i, re/im), (j, re/im)] = [[Re L, -Im L], [Im L, Re L]]_ij, and log|det_R| = 2 log|det_C L|
    lc = dense_map(flow, links)[0]
    real = torch.stack([torch.stack([lc.real, -lc.imag], -1), torch.stack([lc.imag, lc.real], -1)], -3)
    assert (jac - real.reshape(jac.shape)).abs().max() < 1e-12  # real: [i, re/im, j, re/im]
    assert abs(2 * float(torch.linalg.slogdet(lc)[1]) - float(logabs)) < 1e-10
    # inverse log-det is minus the forward one at any point (the map is linear)
    with torch.no_grad():
        assert abs(float(flow.inverse(links, chi)[1][0]) + float(logabs)) < 1e-10


@pytest.mark.parametrize("group,shape", [("u1", (4, 2)), ("su2", (2, 2, 2, 2))])
def test_density_is_the_exact_gaussian(group, shape):
    flow = make(group, shape, seed=6)
    links = haar(group, 1, shape, seed=7).repeat(3, *([1] * (len(shape) + 3)))  # three phi of one U
    lmat = dense_map(flow, links[:1])
    cov = lmat @ lmat.mH
    phi, log_q = flow.sample(links, torch.Generator().manual_seed(8))
    with torch.no_grad():
        lp = flow.log_prob(links, phi)
    expected = dense_gaussian_log_prob(phi, cov)
    assert (log_q - expected).abs().max() < 1e-9
    assert (lp - expected).abs().max() < 1e-9
    # the map is linear: phi = L chi for the chi that sample drew
    chi = flow.inverse(links, phi)[0].reshape(3, -1, 1)
    assert ((lmat @ chi)[..., 0] - phi.reshape(3, -1)).abs().max() < 1e-12


def test_standard_complex_gaussian():
    x = gaussian_fermion((3, 2, 2, 2, 1), torch.Generator().manual_seed(0), dtype=C128)
    n = 2 * 2 * 2 * 1
    expected = -(x.abs() ** 2).reshape(3, -1).sum(1) - n * math.log(math.pi)
    assert (complex_gaussian_log_prob(x) - expected).abs().max() < 1e-13


@pytest.mark.parametrize("group,shape", [("u1", (4, 4)), ("su3", (2, 2, 2, 2))])
def test_gauge_equivariance(group, shape):
    flow = make(group, shape, seed=9)
    links = haar(group, 2, shape, seed=10)
    omega = get_group(group).random((2, *shape), torch.Generator().manual_seed(11))
    links_g = gauge_transform(links, omega)
    chi = noise(links, flow, 12)
    with torch.no_grad():
        phi, ld = flow(links, chi)
        phi_g, ld_g = flow(links_g, colour_mul(omega, chi))
        assert (phi_g - colour_mul(omega, phi)).abs().max() < 1e-12
        assert (ld_g - ld).abs().max() < 1e-12
        lq = flow.log_prob(links, phi)
        assert (flow.log_prob(links_g, colour_mul(omega, phi)) - lq).abs().max() < 1e-10
        # the test can fail: the untransformed field under transformed links is another point
        assert (flow.log_prob(links_g, phi) - lq).abs().max() > 1e-3


def roll(x: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    return torch.roll(x, n, dims=1 + axis)


@pytest.mark.parametrize(
    "axis,boundary",
    [(0, "antiperiodic"), (1, "periodic")],  # a time shift moves the antiperiodic slice: periodic there
)
def test_translation_by_two(axis, boundary):
    shape = (4, 4)
    flow = make("u1", shape, seed=13, boundary=boundary)
    links = haar("u1", 2, shape, seed=14)
    chi = noise(links, flow, 15)
    moved = torch.roll(links, 2, dims=2 + axis)
    with torch.no_grad():
        phi, ld = flow(links, chi)
        phi_t, ld_t = flow(moved, roll(chi, axis, 2))
        assert (phi_t - roll(phi, axis, 2)).abs().max() < 1e-12
        assert (ld_t - ld).abs().max() < 1e-12
        # a shift by one site swaps the parities the layers act on: no symmetry (the test can fail)
        phi_1, _ = flow(torch.roll(links, 1, dims=2 + axis), roll(chi, axis, 1))
        assert (phi_1 - roll(phi, axis, 1)).abs().max() > 1e-3


def test_gradients_reach_links_and_parameters():
    flow = make("su2", (2, 2, 2, 2), seed=16)
    links = haar("su2", 2, (2, 2, 2, 2), seed=17)
    with torch.no_grad():
        phi, _ = flow.sample(links, torch.Generator().manual_seed(18))
    # log q(phi | U) of a given phi depends on every parameter and on the links (a joint model
    # q(U) q(phi | U) trains through both); sample's own log q = log N(chi) - logdet does not see B
    links.requires_grad_(True)
    flow.log_prob(links, phi).sum().backward()
    assert links.grad is not None and torch.isfinite(torch.view_as_real(links.grad)).all()
    assert links.grad.abs().max() > 0
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_neighbours_only_through_the_geometry():
    # with shift and pad routed to hooks that see no neighbours (zeros), the map must become
    # site-local: a neighbour reached any other way (torch.roll, indexing) would still couple sites
    def no_shift(field, mu, n):
        return torch.zeros_like(field)

    def no_pad(field, mu, width, lead):
        z = torch.zeros_like(field.narrow(lead + mu, 0, 1)).expand(
            *field.shape[: lead + mu], width, *field.shape[lead + mu + 1 :]
        )
        return torch.cat([z, field, z], lead + mu)

    flow = make("u1", (4, 4), seed=26, kappa=0.2)
    links = haar("u1", 1, (4, 4), seed=27)
    chi = noise(links, flow, 28)
    bump = torch.zeros_like(chi)
    bump[0, 1, 2, 0, 0] = 1.0
    with torch.no_grad():
        coupled = flow(links, chi + bump)[0] - flow(links, chi)[0]
        with use_shift(no_shift, no_pad):
            local = flow(links, chi + bump)[0] - flow(links, chi)[0]
    assert (coupled.abs().sum((-2, -1)) > 1e-6).sum() > 1
    others = local.abs().sum((-2, -1))
    assert others[0, 1, 2] > 1e-3
    others[0, 1, 2] = 0
    assert others.max() < 1e-14


# ----------------------------------------------------------------------------- kappa initialisation


def test_one_layer_kappa_init_is_the_even_rows_of_d_dagger():
    kappa = 0.2
    links = haar("u1", 1, (4, 4), seed=19)
    flow = PseudofermionFlow((4, 4), 1, n_layers=1, kappa=kappa, dtype=F64)
    lmat = dense_map(flow, links)[0]
    ddag = WilsonFermions(kappa).operator(links).dense()[0].mH
    even = torch.tensor([(x + t) % 2 == 0 for x in range(4) for t in range(4) for _ in range(2)])
    assert (lmat[even] - ddag[even]).abs().max() < 1e-13
    assert (lmat[~even] - torch.eye(32, dtype=C128)[~even]).abs().max() == 0


def test_hopping_weights():
    assert hopping_weights(1) == [1.0]
    assert hopping_weights(2) == [1.0, 1.0]
    assert hopping_weights(5) == [0.5, 1.0, 0.5, 0.0, 0.0]


def init_quality(kappa: float, n_layers: int | None, n_links: int = 4, n_phi: int = 64):
    """(exact KL(q || p) averaged over Haar links, sample mean of log q - log p, its error) on 4x4 U(1)."""
    shape = (4, 4)
    links = haar("u1", n_links, shape, seed=20)
    flow = PseudofermionFlow(shape, 1, n_layers=n_layers or 2, kappa=None if n_layers is None else kappa, dtype=F64)
    d = WilsonFermions(kappa).operator(links).dense()
    cov_p = d.mH @ d
    lmat = dense_map(flow, links)
    m = torch.linalg.solve(cov_p, lmat @ lmat.mH)
    n = m.shape[-1]
    kl = m.diagonal(dim1=-2, dim2=-1).sum(-1).real - n - torch.linalg.slogdet(m)[1]
    reps = links.repeat_interleave(n_phi, 0)
    with torch.no_grad():
        phi, log_q = flow.sample(reps, torch.Generator().manual_seed(21))
    log_p = dense_gaussian_log_prob(phi, cov_p.repeat_interleave(n_phi, 0))
    diff = log_q - log_p
    return float(kl.mean()), float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))


def test_kappa_init_is_close_to_the_target():
    kappa = 0.2
    kl_id, _, _ = init_quality(kappa, None)
    kl2, _, _ = init_quality(kappa, 2)
    kl4, mean4, err4 = init_quality(kappa, 4)
    # measured (4 Haar links, 4x4 U(1), kappa 0.2): identity 14.3, two layers 2.2, four 0.97 nats
    assert kl4 < kl2 < kl_id / 4
    assert kl4 > 0
    assert abs(mean4 - kl4) < 5 * err4 + 1e-9  # the sampled log q - log p estimates the exact KL


# ----------------------------------------------------------------------------- devices


def test_runs_with_a_meta_default_device(meta_default):
    # built on the CPU (as a job builds its model before moving it), run with torch's default
    # device on meta: a factory call that forgets its device would fail or land on meta
    torch.set_default_device("cpu")
    flow = make("su2", (2, 2, 2, 2), seed=22, kappa=0.1)
    links = haar("su2", 2, (2, 2, 2, 2), seed=23)
    torch.set_default_device("meta")
    phi, log_q = flow.sample(links, torch.Generator().manual_seed(24))
    chi, ld = flow.inverse(links, phi)
    lp = flow.log_prob(links, phi)
    for t in (phi, log_q, chi, ld, lp):
        assert t.device.type == "cpu"
    assert (lp - log_q).abs().max() < 1e-9


def test_float32():
    # the training dtype: complex64 fields, float32 log-densities
    flow = randomised(PseudofermionFlow((4, 4), 1, kappa=0.2, hidden=(4,)), 29)
    links = haar("u1", 2, (4, 4), seed=30).to(torch.complex64)
    phi, log_q = flow.sample(links, torch.Generator().manual_seed(31))
    assert phi.dtype == torch.complex64 and log_q.dtype == torch.float32
    _, ld = flow.inverse(links, phi)
    assert ld.dtype == torch.float32 and torch.isfinite(ld).all()
    assert (flow.log_prob(links, phi) - log_q).abs().max() < 1e-3


def test_rejects_mismatched_inputs():
    flow = PseudofermionFlow((4, 4), 1, dtype=F64)
    links = haar("u1", 1, (4, 4), seed=25)
    with pytest.raises(ValueError, match="even extents"):
        PseudofermionFlow((3, 4), 1)
    with pytest.raises(ValueError, match="pseudofermion field"):
        flow(links, torch.zeros(1, 4, 4, 2, 2, dtype=C128))
    with pytest.raises(ValueError, match="complex"):
        flow(links.to(torch.complex64), torch.zeros(1, 4, 4, 2, 1, dtype=torch.complex64))
