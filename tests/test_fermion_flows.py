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


def _joint_theory(shape=(4, 4), kappa=0.22):
    return wilson_nf2_theory(shape, "u1", 2.0, kappa, fermions="pseudofermion")


def test_joint_model_density_and_gauge_invariance():
    from gaugeflow.flows.joint import joint

    theory = _joint_theory()
    model = joint(theory, torch.float64, gauge_keys={"n_layers": 2, "hidden": [4]}, n_layers=2, hidden=[4])
    with torch.no_grad():
        for p in model.pseudofermion.parameters():  # away from the start, so invariance is not trivial
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        x, log_q = model.sample(4, torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.log_prob(x), log_q, rtol=0, atol=1e-10)
        # U -> U^Omega, phi -> Omega phi: a U(1) phase per site
        omega = torch.exp(1j * torch.rand((4, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                          * 2 * math.pi)
        links = x.links.clone()
        for mu in range(2):
            links[:, mu] = omega[..., None, None] * x.links[:, mu] * torch.roll(omega, -1, mu + 1).conj()[..., None, None]
        moved = JointField(links, omega[..., None, None] * x.phi)
        torch.testing.assert_close(model.log_prob(moved), log_q, rtol=0, atol=1e-9)
        torch.testing.assert_close(theory.action(moved), theory.action(x), rtol=1e-10, atol=1e-9)
    with pytest.raises(TypeError, match="JointField"):
        model.log_prob(x.links)


def test_pseudo_marginal_weights_average_to_the_marginal():
    """exp of the several-phi log weight averages to the marginal weight exp(-S_G) det(D^dagger D)/q(U)
    (per configuration, within the standard error of the draws)."""
    from gaugeflow.flows.joint import joint, marginal_log_weights

    theory = _joint_theory((2, 2), kappa=0.15)
    model = joint(theory, torch.float64, gauge_keys={"n_layers": 2, "hidden": [4]}, n_layers=4, hidden=[4])
    with torch.no_grad():
        links, log_q_u = model.gauge.sample(2, torch.Generator().manual_seed(3))
        exact = -theory.action(links) - log_q_u  # the marginal weight, dense determinant
        gen = torch.Generator().manual_seed(4)
        n = 3000  # one phi per copy of each configuration, all in one batch
        single = marginal_log_weights(model, theory.action, links.repeat(n, 1, 1, 1, 1, 1), log_q_u.repeat(n), 1, gen)
    ratio = torch.exp(single.view(n, 2) - exact)  # (draws, batch): mean 1 if the estimator is unbiased
    mean, err = ratio.mean(0), ratio.std(0) / math.sqrt(ratio.shape[0])
    assert bool(((mean - 1).abs() < 4 * err).all()), (mean, err)
    assert bool((err < 0.05).all())


def test_joint_action_needs_the_plain_pseudofermion():
    theory = wilson_nf2_theory((4, 4), "u1", 2.0, 0.2, fermions="pseudofermion", even_odd=True)
    links = haar("u1", 1, (4, 4), 0).to(torch.complex128)
    with pytest.raises(ValueError, match="theory.even_odd=false"):
        theory.action(JointField(links, torch.zeros(1, 4, 4, 2, 1, dtype=torch.complex128)))
    exact = wilson_nf2_theory((4, 4), "u1", 2.0, 0.2)
    with pytest.raises(ValueError, match="theory.fermions=pseudofermion"):
        exact.action(JointField(links, torch.zeros(1, 4, 4, 2, 1, dtype=torch.complex128)))


def _cli(job, *args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", job, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_joint_model_trains_samples_and_scores(tmp_path):
    """train model=joint -> sample (pseudofermions kept) -> score the pairs: the file follows the
    fermion schema and score reproduces the sampler's log q."""
    small = ["theory=schwinger_2d", "theory.fermions=pseudofermion", "lattice.shape=[4,4]", "theory.kappa=0.2",
             "model=joint", "model.n_layers=2", "model.hidden=[4]", "model.gauge_keys={n_layers: 2, hidden: [4]}"]
    r = _cli("train", *small, "train.steps=2", "train.batch_size=8", "train.eval_samples=16", "hydra.run.dir=run",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("sample", "checkpoint=run", "sample.n=12", "sample.batch_size=6", "sample.keep_pseudofermion=true",
             "out=j.h5", "hydra.run.dir=s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with h5py.File(tmp_path / "j.h5") as f:
        assert f["pseudofermion"].shape == (12, 4, 4, 2, 1)
        assert f.attrs["fermions"] == "pseudofermion"
        assert "action" not in f  # the links' marginal is not computed; the weight is the joint one
        lp = f["log_p"][()]
        np.testing.assert_allclose(lp, -(f["gauge_action"][()] + f["pseudofermion_action"][()]), rtol=1e-12)
        assert f["pion_correlator"].shape == (12, 4)
    r = _cli("score", "checkpoint=run", "ensemble=j.h5", "hydra.run.dir=sc", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "|log q - sampled|" in r.stdout


def test_keep_pseudofermion_is_refused_where_no_pseudofermion_is_drawn():
    """sample.keep_pseudofermion=true needs a theory with fermions, a joint model and one process."""
    from types import SimpleNamespace

    from gaugeflow.cli.sample import _fermion_plan
    from gaugeflow.errors import UsageError
    from gaugeflow.flows.joint import joint
    from gaugeflow.flows.models import u1_equivariant
    from gaugeflow.theories import gauge_theory

    theory = _joint_theory()
    q_joint = joint(theory, torch.float64, gauge_keys={"n_layers": 2, "hidden": [4]}, n_layers=2, hidden=[4])
    q_links = u1_equivariant(theory, torch.float64, n_layers=2, hidden=[4])
    keep = SimpleNamespace(keep_pseudofermion=True, fermion_measurements=False)
    assert _fermion_plan(keep, theory, q_joint, 1) == {"joint": True, "keep": True, "measure": False}
    with pytest.raises(UsageError, match="this theory has no pseudofermions"):
        _fermion_plan(keep, gauge_theory([4, 4], "u1", 2.0), q_links, 1)
    with pytest.raises(UsageError, match="this model draws no pseudofermions"):
        _fermion_plan(keep, theory, q_links, 1)
    with pytest.raises(UsageError, match="single-process runs"):
        _fermion_plan(keep, theory, q_joint, 2)


def test_marginal_flow_with_stochastic_logdet_trains(tmp_path):
    """theory.logdet=stochastic: the per-step physics columns stay empty (the value is S_G only), the
    final evaluation uses the exact marginal action."""
    import csv

    r = _cli("train", "theory=schwinger_2d", "theory.logdet=stochastic", "theory.kappa=0.2", "lattice.shape=[4,4]",
             "model=small", "train.steps=2", "train.batch_size=8", "train.eval_samples=32", "hydra.run.dir=run",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert rows and all(row["ess"] == "nan" for row in rows)
    assert "ESS (independent draws, n=32)" in r.stdout
