"""Flows with dynamical fermions: the differentiable joint action, the stochastic log-det gradient,
joint models q(U) q(phi | U) and the jobs that train, sample and score them (docs/fermions.md)."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from gaugeflow.fermions import JointField, WilsonFermions, gaussian_fermion, log_det_normal
from gaugeflow.fermions.gradients import pseudofermion_action, stochastic_logdet
from gaugeflow.groups import get_group
from gaugeflow.theories import wilson_nf2_theory

from helpers import haar


def _algebra(links, seed):
    n = links.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*links.shape, generator=gen, dtype=torch.float64) \
        + 1j * torch.randn(*links.shape, generator=gen, dtype=torch.float64)
    x = 0.5 * (a - a.conj().transpose(-1, -2))
    if n > 1:
        x = x - torch.eye(n, dtype=x.dtype) * (torch.diagonal(x, dim1=-2, dim2=-1).sum(-1) / n)[..., None, None]
    return x


def _moved(links, x, t):
    return torch.linalg.matrix_exp(t * x) @ links


@pytest.mark.parametrize("group,shape,csw", [("u1", (4, 4), 0.0), ("su2", (2, 2, 2, 2), 1.0)])
def test_pseudofermion_action_value_and_gradients_are_exact(group, shape, csw):
    links = haar(group, 2, shape, 1).to(torch.complex128)
    wf = WilsonFermions(0.2, csw)
    phi = gaussian_fermion((2, *shape, 2 if len(shape) == 2 else 4, links.shape[-1]), torch.Generator().manual_seed(2))
    x = _algebra(links, 3)

    def dense_action(t, p):
        m = wf.operator(_moved(links, x, t)).dense()
        mm = m.conj().transpose(-1, -2) @ m
        v = p.reshape(p.shape[0], -1)
        return (v.conj().unsqueeze(1) @ torch.linalg.solve(mm, v.unsqueeze(-1))).real.reshape(-1)

    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    p = phi.clone().requires_grad_(True)
    s, iters = pseudofermion_action(wf.operator(_moved(links, x, t)), p, tol=1e-13)
    assert iters > 0
    t2 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    p2 = phi.clone().requires_grad_(True)
    ref = dense_action(t2, p2)
    torch.testing.assert_close(s, ref, rtol=1e-10, atol=1e-10)
    gt, gp = torch.autograd.grad(s.sum(), (t, p))
    rt, rp = torch.autograd.grad(ref.sum(), (t2, p2))
    torch.testing.assert_close(gt, rt, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gp, rp, rtol=1e-8, atol=1e-8)


def test_stochastic_logdet_gradient_is_unbiased():
    """The mean of the surrogate's gradient over many noise vectors is d log det(D^dagger D), within
    its standard error (one configuration repeated: one noise vector per copy, one batched solve)."""
    links = haar("u1", 1, (4, 4), 5).to(torch.complex128)
    wf = WilsonFermions(0.24)
    x = _algebra(links, 6)
    n = 12000
    t = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    moved = torch.linalg.matrix_exp(t.view(-1, 1, 1, 1, 1, 1) * x) @ links
    surrogate, _ = stochastic_logdet(wf.operator(moved), torch.Generator().manual_seed(7), tol=1e-12)
    assert float(surrogate.detach().abs().max()) == 0.0  # zero-valued: no information in its value
    (g,) = torch.autograd.grad(surrogate.sum(), t)
    t0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    exact = log_det_normal(wf.operator(_moved(links, x, t0)), "dense")
    (ge,) = torch.autograd.grad(exact.sum(), t0)
    err = g.std().item() / math.sqrt(n)
    assert abs(g.mean().item() - ge.item()) < 4 * err, (g.mean().item(), ge.item(), err)
    # the check has teeth: a zero, a sign flip or a factor 2 in the gradient lies beyond 4 errors
    assert 4 * err < 0.5 * abs(ge.item())


def test_stochastic_training_action_value_and_preset_key():
    theory = wilson_nf2_theory((4, 4), "u1", 2.0, 0.25, logdet="stochastic", logdet_noise=2)
    links = haar("u1", 3, (4, 4), 8).to(torch.complex128)
    val = theory.training_action(links)
    torch.testing.assert_close(val, theory.action.gauge_action(links))
    assert theory.training_action.exact_value is False
    assert "logdet" not in theory.params  # a training choice, not part of the target
    with pytest.raises(ValueError, match="theory.logdet must be one of"):
        wilson_nf2_theory((4, 4), "u1", 2.0, 0.25, logdet="hutchinson")
    with pytest.raises(ValueError, match="theory.logdet_noise"):
        wilson_nf2_theory((4, 4), "u1", 2.0, 0.25, logdet="stochastic", logdet_noise=0)


def test_joint_field_behaves_like_a_batch():
    from gaugeflow.fermions import cat_fields, links_of

    links = haar("u1", 3, (2, 2), 0)
    phi = torch.zeros(3, 2, 2, 2, 1, dtype=torch.complex64)
    f = JointField(links, phi)
    assert f.shape[0] == 3 and links_of(f) is links and links_of(links) is links
    both = cat_fields([f, f.select(slice(0, 1))])
    assert both.links.shape[0] == 4 and both.phi.shape[0] == 4
    assert f.to(torch.complex128).phi.dtype == torch.complex128
