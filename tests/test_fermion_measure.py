"""Fermion observables (gaugeflow.fermions.measure): against the dense inverse, the free field, gauge invariance."""

import itertools
import math

import pytest
import torch

from gaugeflow.fermions import WilsonDirac
from gaugeflow.fermions.measure import chiral_condensate, pion_correlator, point_propagator
from gaugeflow.groups import get_group
from gaugeflow.theories import gauge_transform

F64 = torch.complex128


def links_of(group, shape, batch=2, seed=0, cold=False):
    g = get_group(group)
    gen = torch.Generator().manual_seed(seed)
    full = (batch, len(shape), *shape)
    return g.identity(full, dtype=F64) if cold else g.random(full, gen, F64)


@pytest.mark.parametrize("group,shape,kappa,csw", [("u1", [4, 4], 0.2, 0.0), ("su2", [2, 2, 2, 4], 0.11, 0.0),
                                                   ("su3", [2, 2, 2, 2], 0.12, 1.0)])
def test_point_propagator_is_a_column_of_the_dense_inverse(group, shape, kappa, csw):
    op = WilsonDirac(links_of(group, shape), kappa, csw)
    g, iters = point_propagator(op, tol=1e-12)
    dinv = torch.linalg.inv(op.dense())
    batch, *lat, s, n = op.field_shape
    k = s * n
    # dense index order: psi.reshape(batch, -1); the origin's components are the first k columns
    want = dinv[:, :, :k].reshape(batch, *lat, s, n, s, n)
    assert iters > 0 and torch.allclose(g, want, atol=1e-9)
    c, _ = pion_correlator(op, tol=1e-12)
    dens = (want.abs() ** 2).sum(dim=(-4, -3, -2, -1))
    assert torch.allclose(c, dens.sum(dim=tuple(range(1, len(lat)))), rtol=1e-9)
    assert c.shape == (batch, lat[-1]) and bool((c > 0).all())


def test_correlator_and_condensate_are_gauge_invariant():
    links = links_of("su2", [2, 2, 2, 4], seed=3)
    gen = torch.Generator().manual_seed(4)
    omega = get_group("su2").random((2, 2, 2, 2, 4), gen, F64)
    moved = gauge_transform(links, omega)
    a, b = WilsonDirac(links, 0.12), WilsonDirac(moved, 0.12)
    assert torch.allclose(pion_correlator(a, tol=1e-12)[0], pion_correlator(b, tol=1e-12)[0], rtol=1e-8)
    assert torch.allclose(chiral_condensate(a), chiral_condensate(b), atol=1e-12)


@pytest.mark.parametrize("boundary", ["antiperiodic", "periodic"])
def test_free_field_condensate_is_the_momentum_sum(boundary):
    """Free Wilson fermions: tr D^{-1} / V = n_spin N / V sum_p A / (A^2 + 4 kappa^2 sum sin^2 p),
    A = 1 - 2 kappa sum cos p, time momenta shifted by pi/T when antiperiodic."""
    shape, kappa, group = [4, 6], 0.17, "u1"
    op = WilsonDirac(links_of(group, shape, batch=1, cold=True), kappa, boundary=boundary)
    total = 0.0
    for ks in itertools.product(*(range(L) for L in shape)):
        p = [2 * math.pi * k / L for k, L in zip(ks, shape)]
        if boundary == "antiperiodic":
            p[-1] += math.pi / shape[-1]
        a = 1 - 2 * kappa * sum(math.cos(x) for x in p)
        b2 = 4 * kappa**2 * sum(math.sin(x) ** 2 for x in p)
        total += a / (a * a + b2)
    want = 2 * 1 * total / math.prod(shape)
    assert chiral_condensate(op).item() == pytest.approx(want, rel=1e-12)


def test_stochastic_condensate_is_unbiased():
    links = links_of("u1", [4, 4], batch=1, seed=5)
    op = WilsonDirac(links, 0.2)
    exact = chiral_condensate(op).item()
    gen = torch.Generator().manual_seed(6)
    # 400 independent one-vector estimates: the configuration repeated along the batch
    many = WilsonDirac(links.expand(400, *links.shape[1:]).contiguous(), 0.2)
    draws = chiral_condensate(many, "stochastic", n_noise=1, generator=gen, tol=1e-12)
    err = draws.std().item() / math.sqrt(draws.numel())
    assert abs(draws.mean().item() - exact) < 4 * err and err > 0
    with pytest.raises(ValueError, match="method must be 'exact' or 'stochastic'"):
        chiral_condensate(op, "guess")
