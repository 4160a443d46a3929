"""``loss=reinforce``: the score-function estimator (Białas, Korcyl & Stebel 2202.01314, 2308.13294).

Unbiased against the reparametrisation gradient and the closed form on a Gaussian toy, the same
loss value as the reverse KL, no backward pass through the action, and the job end to end.
"""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gaugeflow.components import instantiate_node
from gaugeflow.errors import UsageError
from gaugeflow.flows import models
from gaugeflow.flows.base import Flow, FlowLayer, FlowModel
from gaugeflow.flows.priors import GaussianPrior
from gaugeflow.theories import gauge_theory, phi4_theory, wilson_nf2_theory
from gaugeflow.train import Trainer, TrainSettings
from gaugeflow.train.losses import Reinforce, ReverseKL, reinforce, reverse_kl

DT = torch.float64
ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


class Shift(FlowLayer):
    """``y = mu + e^s z`` site by site: q is N(mu, e^{2s}), so KL(q||p) has a closed form."""

    def __init__(self, mu, log_sigma):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=DT))
        self.s = torch.nn.Parameter(torch.tensor(log_sigma, dtype=DT))

    def forward(self, x):
        return self.mu + torch.exp(self.s) * x, self.s.sum().expand(x.shape[0])

    def inverse(self, y):
        return (y - self.mu) * torch.exp(-self.s), (-self.s.sum()).expand(y.shape[0])


# target p = N(M, SIGMA^2) per site; q starts away from it so the gradient is far from zero
M, SIGMA = torch.tensor([1.0, 0.5], dtype=DT), 0.8


def gaussian_action(x):
    return ((x - M) ** 2).sum(1) / (2 * SIGMA**2)


def toy():
    return FlowModel(GaussianPrior((2,), dtype=DT), Flow([Shift([0.3, -0.2], [0.1, -0.3])]))


def grad(model, loss_fn, n, gen):
    model.zero_grad(set_to_none=True)
    loss_fn(model, gaussian_action, n, gen).loss.backward()
    layer = model.flow.layers[0]
    return torch.cat([layer.mu.grad, layer.s.grad])


def test_unbiased_against_the_reparametrisation_and_the_closed_form_gradient():
    model = toy()
    layer = model.flow.layers[0]
    with torch.no_grad():
        # d/dtheta E_q[log q + S] for q = N(mu, e^{2s}): (mu - M)/SIGMA^2 and e^{2s}/SIGMA^2 - 1
        exact = torch.cat([(layer.mu - M) / SIGMA**2, torch.exp(2 * layer.s) / SIGMA**2 - 1])
    n, batches = 4, 1500  # 4 draws: a baseline that included draw i would shrink the gradient by 3/4
    rf_gen, kl_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    rf = torch.stack([grad(model, Reinforce(), n, rf_gen) for _ in range(batches)])
    kl = torch.stack([grad(model, ReverseKL(), n, kl_gen) for _ in range(batches)])
    diff = rf - kl  # the same draws (same seed): the paired difference has the smaller error
    for est, target in [(rf, exact), (kl, exact), (diff, torch.zeros_like(exact))]:
        err = est.std(0) / math.sqrt(batches)
        assert ((est.mean(0) - target).abs() <= 4 * err).all(), (est.mean(0), target, err)
    # the test has power: a baseline that included draw i (a gradient 3/4 of this one) would miss by
    # more than 8 errors in some component
    assert (0.25 * exact.abs() > 8 * rf.std(0) / math.sqrt(batches)).any()


def test_the_baseline_removes_a_constant_in_the_action():
    # S + c (an unknown log Z) leaves each leave-one-out gradient unchanged; without a baseline
    # every gradient moves by c * grad log q, whose mean is zero but whose variance grows as c^2
    model, c = toy(), 100.0
    layer = model.flow.layers[0]
    for baseline, same in [("loo", True), ("none", False)]:
        out = []
        for action in (gaussian_action, lambda x: gaussian_action(x) + c):
            model.zero_grad(set_to_none=True)
            reinforce(model, action, 8, torch.Generator().manual_seed(2), baseline).loss.backward()
            out.append(torch.cat([layer.mu.grad, layer.s.grad]))
        assert torch.allclose(out[0], out[1], rtol=1e-10, atol=1e-12) == same, (baseline, out)


def test_one_batch_is_the_leave_one_out_formula():
    model, n = toy(), 5
    g = grad(model, Reinforce(), n, torch.Generator().manual_seed(3))
    x, log_q = model.sample(n, torch.Generator().manual_seed(3))
    f = (log_q + gaussian_action(x)).detach()
    b = (f.sum() - f) / (n - 1)
    layer = model.flow.layers[0]
    log_p = model.log_prob(x.detach())
    per_draw = [torch.cat(torch.autograd.grad(lp, [layer.mu, layer.s], retain_graph=True)) for lp in log_p]
    expected = sum((f[i] - b[i]) * per_draw[i] for i in range(n)) / n
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


def phi4(seed=0):
    theory = phi4_theory([4, 4], m2=-4.0, lam=8.0)
    torch.manual_seed(seed)
    return theory, models.affine(theory, DT, n_layers=2, hidden=(8,))


def test_the_value_is_the_reverse_kl_bound_on_the_same_draws():
    theory, model = phi4()
    a = reinforce(model, theory.action, 16, torch.Generator().manual_seed(5))
    b = reverse_kl(model, theory.action, 16, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.loss.detach(), b.loss.detach(), rtol=1e-14, atol=0)
    for x, y in [(a.log_q, b.log_q), (a.action, b.action), (a.samples, b.samples)]:
        torch.testing.assert_close(x, y, rtol=1e-14, atol=0)
    assert not (a.log_q.requires_grad or a.action.requires_grad or a.samples.requires_grad)
    assert a.loss.requires_grad


class NoBackward(torch.autograd.Function):
    """The identity whose backward raises: stands for an action one must not differentiate."""

    @staticmethod
    def forward(ctx, s):
        return s.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("the action was differentiated")


@pytest.mark.parametrize("make", ["phi4", "u1", "schwinger"])
def test_the_action_is_not_differentiated(make):
    if make == "phi4":
        theory, model = phi4()
    else:
        # schwinger: S_G - log det(D^dagger D), the dense determinant REINFORCE must not differentiate
        theory = gauge_theory([4, 4], "u1", 1.0) if make == "u1" else wilson_nf2_theory([4, 4], "u1", 2.0, 0.276)
        torch.manual_seed(0)
        model = models.u1_equivariant(theory, DT, n_layers=2, hidden=(4,))

    def action(x):
        return NoBackward.apply(theory.action(x))

    with pytest.raises(RuntimeError, match="the action was differentiated"):
        reverse_kl(model, action, 4, torch.Generator().manual_seed(0)).loss.backward()
    model.zero_grad(set_to_none=True)
    reinforce(model, action, 4, torch.Generator().manual_seed(0)).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_bad_baselines_and_batches():
    theory, model = phi4()
    with pytest.raises(UsageError, match="needs >= 2 draws per micro-batch.*train.micro_batch_size"):
        Reinforce()(model, theory.action, 1, torch.Generator().manual_seed(0))
    out = Reinforce("none")(model, theory.action, 1, torch.Generator().manual_seed(0))
    assert out.log_q.shape == (1,)
    with pytest.raises(ValueError, match="loss.baseline must be one of loo, none, got 'mean'"):
        Reinforce("mean")

    # an action whose value is not the target's (theory.logdet=stochastic: only its gradient is)
    class GradientOnly:
        exact_value = False

        def __call__(self, x):
            return theory.action(x)

    stochastic = wilson_nf2_theory([4, 4], "u1", 2.0, 0.276, logdet="stochastic").training_action
    for action in (GradientOnly(), GradientOnly().__call__, stochastic):
        with pytest.raises(UsageError, match="theory.logdet=stochastic"):
            reinforce(model, action, 4, torch.Generator().manual_seed(0))
    # the YAML's keys are the class's (components check them against the signature)
    node = {"_target_": "gaugeflow.train.losses.Reinforce", "name": "reinforce", "baseline": "none"}
    assert instantiate_node(node, "loss").baseline == "none"
    with pytest.raises(UsageError, match="loss=reinforce: loss.baseline must be one of"):
        instantiate_node({**node, "baseline": "mean"}, "loss")


def test_the_trainer_accumulates_reinforce_over_micro_batches():
    # the leave-one-out baseline is per micro-batch; each step still trains, and a micro-batch of
    # one is refused naming the key
    theory, model = phi4()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    settings = TrainSettings(steps=3, batch_size=8, micro_batch_size=4, log_every=1, eval_samples=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(theory, model, Reinforce(), opt, settings=settings)
    trainer.run()
    assert trainer.history.step == [1, 2, 3] and all(math.isfinite(v) for v in trainer.history.loss)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in trainer.history.rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    settings = TrainSettings(steps=1, batch_size=4, micro_batch_size=1, eval_samples=0)
    with pytest.raises(UsageError, match="train.micro_batch_size"):
        Trainer(theory, model, Reinforce(), opt, settings=settings).run()


def gaugeflow(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_job_trains_with_loss_reinforce(tmp_path):
    # the default theory (2d U(1)) on a 4x4 lattice with a small flow
    r = gaugeflow("loss=reinforce", "train.steps=3", "theory=u1_2d", "lattice.shape=[4,4]", "model_size=small",
                  "model.n_layers=2", "model.hidden=[4]", "train.batch_size=8", "train.log_every=1",
                  "train.eval_samples=16", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    for key in ("loss", "free_energy", "ess", "grad_norm"):
        assert all(np.isfinite(float(row[key])) for row in rows), key
    # the logged loss is the free-energy bound of the batch, as with the reverse KL
    assert all(np.isclose(float(row["loss"]), float(row["free_energy"]), rtol=1e-5) for row in rows)
    assert "reinforce" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
