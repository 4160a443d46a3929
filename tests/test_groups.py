import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import dagger, trace

GROUPS = ["u1", "su2", "su3", "su4"]


def unitarity_error(u):
    n = u.shape[-1]
    return (u @ dagger(u) - torch.eye(n, dtype=u.dtype)).abs().amax()


@pytest.mark.parametrize("name", GROUPS)
def test_haar_elements_are_in_group(name, gen):
    g = get_group(name)
    u = g.random((500,), gen)
    assert u.shape == (500, g.N, g.N) and u.dtype == torch.complex128
    assert unitarity_error(u) < 1e-12
    if g.N > 1:
        assert (torch.linalg.det(u) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["su2", "su3", "su4"])
def test_haar_moments(name, gen):
    # E|tr U|^2 = 1 and E tr U = 0 for the Haar measure of SU(N), N >= 2; E|tr U|^4 = 2 for N >= 4
    g = get_group(name)
    n = 40000
    tr = trace(g.random((n,), gen))
    a2 = tr.abs().square()
    assert abs(a2.mean() - 1) < 5 * a2.std() / math.sqrt(n)
    assert tr.real.mean().abs() < 5 * tr.real.std() / math.sqrt(n)
    if g.N >= 4:
        a4 = a2.square()
        assert abs(a4.mean() - 2) < 5 * a4.std() / math.sqrt(n)


def test_haar_is_left_invariant(gen):
    # distribution of Re tr(V U) for fixed V equals that of Re tr U: compare means of |tr|^2 moments
    g = get_group("su3")
    v = g.random((1,), gen)
    u = g.random((40000,), gen)
    x = trace(v @ u)
    # E tr(VU) = 0 and E|tr VU|^2 = 1 only if the distribution of U absorbs V
    assert x.real.mean().abs() < 5 * x.real.std() / 200
    assert abs(x.abs().square().mean() - 1) < 5 * x.abs().square().std() / 200


def test_u1_haar_is_uniform(gen):
    g = get_group("u1")
    phases = g.angle(g.random((50000,), gen))
    # Fourier moments of the uniform distribution vanish
    for k in (1, 2, 3):
        assert torch.exp(1j * k * phases).mean().abs() < 5 / math.sqrt(50000)


@pytest.mark.parametrize("name", GROUPS)
def test_algebra_projection(name, gen):
    g = get_group(name)
    m = torch.randn((100, g.N, g.N), dtype=torch.complex128, generator=gen)
    x = g.project(m)
    assert (x + dagger(x)).abs().max() < 1e-15
    if g.N > 1:
        assert trace(x).abs().max() < 1e-14
    assert (g.project(x) - x).abs().max() < 1e-15  # a projection


@pytest.mark.parametrize("name", GROUPS)
def test_generators_orthonormal(name):
    g = get_group(name)
    t = g.generators()
    assert t.shape == (g.dim, g.N, g.N)
    gram = torch.einsum("aij,bij->ab", t.conj(), t)
    assert (gram - torch.eye(g.dim)).abs().max() < 1e-15
    assert (g.project(t) - t).abs().max() < 1e-15


@pytest.mark.parametrize("name", GROUPS)
def test_coordinates_round_trip(name, gen):
    g = get_group(name)
    c = torch.randn((50, g.dim), dtype=torch.float64, generator=gen)
    assert (g.to_coords(g.from_coords(c)) - c).abs().max() < 1e-14


@pytest.mark.parametrize("name", GROUPS)
def test_random_algebra_is_unit_gaussian(name, gen):
    g = get_group(name)
    x = g.random_algebra((20000,), gen)
    assert (g.project(x) - x).abs().max() < 1e-14
    c = g.to_coords(x)
    cov = c.T @ c / c.shape[0]
    # sample covariance of unit Gaussians: standard error ~ 1/sqrt(n)
    assert (cov - torch.eye(g.dim, dtype=cov.dtype)).abs().max() < 5 / math.sqrt(20000)


@pytest.mark.parametrize("name", ["su2", "su3", "su4"])
@pytest.mark.parametrize("scale", [1e-9, 1e-4, 0.3, 2.0, 10.0])
def test_exp_matches_matrix_exp(name, scale, gen):
    g = get_group(name)
    x = scale * g.random_algebra((200,), gen)
    u = g.exp(x)
    ref = torch.linalg.matrix_exp(x)
    assert (u - ref).abs().max() < 1e-13 * max(1.0, scale)
    assert unitarity_error(u) < 1e-13 * max(1.0, scale)


def test_u1_exp_log():
    g = get_group("u1")
    theta = torch.linspace(-3.1, 3.1, 101, dtype=torch.float64)
    x = 1j * theta[:, None, None].to(torch.complex128)
    assert (g.log(g.exp(x)) - x).abs().max() < 1e-14


@pytest.mark.parametrize("name", ["su2", "su3", "su4"])
def test_exp_log_round_trip(name, gen):
    g = get_group(name)
    # eigenphases of 0.3 * unit-Gaussian algebra elements stay well inside (-pi, pi)
    x = 0.3 * g.random_algebra((300,), gen)
    assert (g.log(g.exp(x)) - x).abs().max() < 1e-12
    u = g.random((300,), gen)
    y = g.log(u)
    assert (g.project(y) - y).abs().max() < 1e-12  # traceless anti-hermitian
    assert (g.exp(y) - u).abs().max() < 1e-12


@pytest.mark.parametrize("phases", [(0.3, 0.3, -0.6), (math.pi / 2, math.pi / 2, math.pi), (0.0, 0.0, 0.0)])
def test_log_of_degenerate_elements(phases, gen):
    g = get_group("su3")
    v = g.random((4,), gen)
    d = torch.diag_embed(torch.polar(torch.ones(3, dtype=torch.float64), torch.tensor(phases, dtype=torch.float64)))
    u = v @ d @ dagger(v)
    assert (g.exp(g.log(u)) - u).abs().max() < 1e-12
    # compare eigenvalues e^{i phi}, not phases: pi and -pi are the same eigenvalue
    for method in (g.eigphases, lambda m: g.eig(m)[0]):
        got = torch.polar(torch.ones(4, 3, dtype=torch.float64), method(u))
        want = torch.polar(torch.ones(3, dtype=torch.float64), torch.tensor(phases, dtype=torch.float64))
        dist = (got[:, :, None] - want[None, None, :]).abs().amin(1)
        assert dist.max() < 1e-12  # eigenvalues of a normal matrix are well conditioned


@pytest.mark.parametrize("name", GROUPS)
def test_eig_decomposition(name, gen):
    g = get_group(name)
    u = g.random((100,), gen)
    phases, vecs = g.eig(u)
    rebuilt = vecs @ torch.diag_embed(torch.polar(torch.ones_like(phases), phases)) @ dagger(vecs)
    assert (rebuilt - u).abs().max() < 1e-12
    if g.N > 1:
        # det = 1: phases sum to a multiple of 2 pi
        k = phases.sum(-1) / (2 * math.pi)
        assert (k - k.round()).abs().max() < 1e-12


@pytest.mark.parametrize("name", GROUPS)
def test_reunitarize(name, gen):
    g = get_group(name)
    u = g.random((100,), gen)
    noisy = u + 1e-6 * torch.randn(u.shape, dtype=u.dtype, generator=gen)
    r = g.reunitarize(noisy)
    assert unitarity_error(r) < 1e-13
    assert (r - u).abs().max() < 1e-5
    if g.N > 1:
        assert (torch.linalg.det(r) - 1).abs().max() < 1e-13
    assert (g.reunitarize(u) - u).abs().max() < 1e-13


@settings(max_examples=40, deadline=None)
@given(coords=st.lists(st.floats(-3, 3), min_size=8, max_size=8))
def test_su3_exp_property(coords):
    g = get_group("su3")
    x = g.from_coords(torch.tensor(coords, dtype=torch.float64))
    assert (g.exp(x) - torch.linalg.matrix_exp(x)).abs().max() < 1e-12


def test_get_group_names():
    assert get_group("U(1)").N == 1
    assert get_group("SU(3)").N == 3
    assert get_group("su5").dim == 24
    with pytest.raises(ValueError, match="unknown gauge group"):
        get_group("so3")


def test_complex64(gen):
    g = get_group("su3")
    u = g.random((10,), gen, dtype=torch.complex64)
    assert u.dtype == torch.complex64 and unitarity_error(u) < 1e-5
    x = g.random_algebra((10,), gen, dtype=torch.complex64)
    assert g.exp(x).dtype == torch.complex64
