"""Continuous gauge flows (gaugeflow.flows.continuous), float64 on tiny lattices: round trips,
log-dets against autograd Jacobians of the whole discretised flow in local coordinates, gauge and
translation equivariance, the integrator's order against an RKMK4 solution of the same ODE, the
invertibility bound, checkpointed steps, the builder through the config and the CLI, and
construction under a meta default device. Weights are randomised away from zero (the flows are
asserted to move links)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gaugeflow.flows.continuous import ContinuousGaugeFlow, continuous
from gaugeflow.flows.residual import FixedPointError
from gaugeflow.groups import get_group
from gaugeflow.groups.matrix import dagger
from gaugeflow.theories import gauge_theory
from gaugeflow.theories.gauge import gauge_transform
from helpers import haar, log_series

F64 = torch.float64
CONF = Path(__file__).resolve().parents[1] / "conf"


def make_flow(group, shape, scale=0.3, seed=0, **keys) -> ContinuousGaugeFlow:
    """The ODE layer of ``continuous(...)`` with its weights moved by ``scale`` N(0, 1) noise."""
    keys = {"hidden": [4], "n_steps": 1, "activation": "tanh", **keys}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = continuous(gauge_theory(list(shape), group=group, beta=1.0), F64, **keys)
    if scale:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    (flow,) = model.flow.layers
    return flow


@pytest.mark.parametrize("group,shape,keys", [
    ("u1", (4, 4), {"scheme": "strang"}), ("su2", (4, 4), {"n_steps": 2}), ("su3", (4, 4), {"features": False}),
    ("su2", (2, 2, 2, 2), {"loops": ["plaquette"], "features": False})])
def test_round_trip_stays_on_the_group_and_moves_every_link(group, shape, keys):
    g = get_group(group)
    flow = make_flow(group, shape, seed=1, **keys)
    u = haar(group, 2, shape, 1)
    v, ld = flow(u)
    u2, ld_inv = flow.inverse(v)
    assert (u2 - u).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-10 and ld.abs().min() > 1e-2
    assert (v - u).abs().amax((-1, -2)).min() > 1e-4  # every link moved
    eye = torch.eye(g.N, dtype=v.dtype)
    assert (v @ dagger(v) - eye).abs().max() < 1e-12
    if g.N > 1:
        assert (torch.linalg.det(v) - 1).abs().max() < 1e-12


@pytest.mark.parametrize("group,shape,scheme", [("u1", (2, 2), "strang"), ("su2", (2, 2), "strang"),
                                                 ("su3", (2, 2), "strang"), ("su2", (2, 2), "lie")])
def test_logdet_against_autograd_jacobian_of_the_whole_flow(group, shape, scheme):
    """All links perturbed, ``U = exp(sum_a c_a T_a) U0``: the full Jacobian dc'/dc at c = 0 of
    ``V = exp(sum_a c'_a T_a) V0`` (exponential coordinates, where Haar is Lebesgue to first order)
    has the flow's log-det, forward and inverse (whose implicit sub-steps go through fixed points)."""
    g = get_group(group)
    flow = make_flow(group, shape, seed=4, scheme=scheme, scale=0.5)
    u0 = haar(group, 1, shape, 4)
    gens = g.generators(torch.complex128)
    n_links = u0[0].numel() // (g.N * g.N)
    for fn in (flow.forward, flow.inverse):
        v0, ld = fn(u0)
        v0 = v0.detach()

        def f(c, fn=fn, v0=v0):
            x = torch.einsum("...a,aij->...ij", c.reshape(*u0.shape[:-2], g.dim).to(gens.dtype), gens)
            v = fn(torch.linalg.matrix_exp(x) @ u0)[0]
            return g.to_coords(log_series(v @ dagger(v0), terms=40)).reshape(-1)

        jac = torch.autograd.functional.jacobian(f, torch.zeros(n_links * g.dim, dtype=F64), vectorize=True)
        auto = torch.linalg.slogdet(jac)
        assert auto.sign.item() == 1
        assert ld.item() == pytest.approx(auto.logabsdet.item(), abs=1e-9)
        assert abs(ld.item()) > 1e-2


def test_gauge_invariance_of_log_q_and_translation_equivariance():
    for group, shape, keys in [("u1", (4, 4), {}), ("su3", (4, 4), {"scheme": "strang"}),
                               ("su2", (2, 2, 2, 2), {"features": False, "loops": ["plaquette", "chair"]})]:
        g = get_group(group)
        theory = gauge_theory(list(shape), group=group, beta=1.0)
        torch.manual_seed(0)
        model = continuous(theory, F64, hidden=[4], n_steps=1, **keys)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
            x, log_q = model.sample(2, torch.Generator().manual_seed(1))
            assert (model.log_prob(x) - log_q).abs().max() < 1e-9
            assert (log_q - model.prior.log_prob(x)).abs().min() > 1e-2  # not the identity
            omega = g.random((2, *shape), torch.Generator().manual_seed(2))
            assert (model.log_prob(gauge_transform(x, omega)) - log_q).abs().max() < 1e-9
            if group != "u1":
                continue
            (flow,) = model.flow.layers
            v, ld = flow(x)
            vg, ldg = flow(gauge_transform(x, omega))
            assert (vg - gauge_transform(v, omega)).abs().max() < 1e-10 and (ldg - ld).abs().max() < 1e-10
            for axis in range(len(shape)):  # the masks have period 2
                def t(y, axis=axis):
                    return torch.roll(y, 2, dims=2 + axis)

                vt, ldt = flow(t(x))
                assert (vt - t(v)).abs().max() < 1e-10 and (ldt - ld).abs().max() < 1e-10


def _rkmk4(flow: ContinuousGaugeFlow, u: torch.Tensor, n: int) -> torch.Tensor:
    """Runge-Kutta-Munthe-Kaas (order 4) solution of ``dU/dt = Z(U, t) U`` on [0, 1]: an independent
    integrator of the same vector field (``flow.vector_field``), with dexp^{-1} truncated at order 4."""
    group = flow.potentials[0].group

    def comm(a, b):
        return a @ b - b @ a

    def dexpinv(om, a):
        return a - 0.5 * comm(om, a) + comm(om, comm(om, a)) / 12

    h = 1.0 / n
    for s in range(n):
        t = s * h
        k1 = flow.vector_field(u, t)
        k2 = dexpinv(h / 2 * k1, flow.vector_field(group.exp(h / 2 * k1) @ u, t + h / 2))
        k3 = dexpinv(h / 2 * k2, flow.vector_field(group.exp(h / 2 * k2) @ u, t + h / 2))
        k4 = dexpinv(h * k3, flow.vector_field(group.exp(h * k3) @ u, t + h))
        u = group.exp(h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)) @ u
    return u


def test_integrator_order_against_rkmk4():
    """The discrete map converges to the ODE's solution as n_steps grows, at the scheme's order:
    ``max |U_n - U_ref|`` for n = 4, 8, 16 (one ODE: the same weights, ``max_rate`` fixed, a smooth
    activation) falls by ``2^order`` per doubling: strang 2, lie 1. The reference is RKMK4 with 16
    steps (its own error there, measured against 64 steps: 2e-5, below 2 % of the smallest
    difference compared)."""
    u = haar("su2", 1, (4, 4), 11)
    flows = {(scheme, n): make_flow("su2", (4, 4), seed=12, scale=0.5, scheme=scheme, n_steps=n, max_rate=1.5)
             for scheme in ("strang", "lie") for n in (4, 8, 16)}
    state = flows["strang", 4].state_dict()
    for f in flows.values():
        f.load_state_dict(state)
    with torch.no_grad():
        ref = _rkmk4(flows["strang", 4], u, 16)
        err = {key: (f(u)[0] - ref).abs().max().item() for key, f in flows.items()}
    for scheme, order in (("strang", 2), ("lie", 1)):
        assert err[scheme, 4] > 1e-2  # a non-trivial flow
        for a, b in ((4, 8), (8, 16)):
            assert 2 ** order * 0.8 < err[scheme, a] / err[scheme, b] < 2 ** order * 1.4, err


def test_the_invertibility_bound():
    theory = gauge_theory([4, 4], group="su3", beta=1.0)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="max_step"):
            continuous(theory, F64, max_step=bad)
    # max_rate * substep must stay below max_step: 4 * (1/2) / 2 = 1 > 0.9
    with pytest.raises(ValueError, match="max_rate"):
        continuous(theory, F64, n_steps=1, max_rate=4.0)
    with pytest.raises(ValueError, match="max_rate"):
        continuous(theory, F64, n_steps=2, scheme="lie", max_rate=2.0)
    continuous(theory, F64, n_steps=2, scheme="strang", max_rate=3.6)  # exactly at the bound: allowed
    # huge raw coefficients are scaled into tau * sum_k |c_k| < max_step
    flow = make_flow("su3", (4, 4), scale=50.0, max_step=0.7)
    p = flow.potentials[0]
    u = haar("su3", 2, (4, 4), 0)
    lam = flow.substep * p.rates(u, 0.25).abs().sum(-1)
    assert 0.6 < lam.max() < 0.7
    v, ld = flow(u)
    assert (flow.inverse(v)[0] - u).abs().max() < 1e-10 and torch.isfinite(ld).all()
    # a NaN from the network is reported, not propagated
    with torch.no_grad():
        next(p.net.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="bound"):
        flow(u)


def test_fixed_point_failure_is_reported_naming_the_substep():
    flow = make_flow("su2", (4, 4), seed=7, scale=1.0, scheme="strang")
    u = haar("su2", 1, (4, 4), 7)
    v, _ = flow(u)
    for p in flow.potentials:
        p.max_iter = 2
    with pytest.raises(FixedPointError, match=r"MaskPotential\(mu=.*t=0.5, tau=.*did not converge in 2"):
        flow.inverse(v)
    with pytest.raises(FixedPointError):  # the strang step's adjoint half is implicit: sampling solves too
        flow(u)


def test_checkpointed_steps_give_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        flow = make_flow("su2", (2, 2), seed=9, n_steps=2, checkpoint=ckpt, features=False, scheme="strang")
        u = haar("su2", 2, (2, 2), 9)
        v, ld = flow(u)
        _, ld_inv = flow.inverse(v.detach())
        (ld.sum() + ld_inv.sum() + v.real.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in flow.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-10 * max(1.0, grads[0].abs().max().item())
    assert grads[0].abs().max() > 1e-3


def test_builds_through_the_config_and_records_its_keys():
    from gaugeflow.components import build_model, resolved_model_spec
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF / "model" / "continuous.yaml")
    for group in ("u1", "su3"):
        theory = gauge_theory([4, 4], group=group, beta=1.0)
        spec = resolved_model_spec(node, theory)
        assert spec["max_rate"] == pytest.approx(0.9 / 0.5) and spec["n_steps"] == 2 and spec["scheme"] == "lie"
        model = build_model(node, theory, torch.float32)
        x, log_q = model.sample(2)
        assert torch.isfinite(log_q).all()
        assert (model.log_prob(x) - log_q).abs().max() < 1e-3


def test_construction_under_a_meta_default_device(meta_default):
    theory = gauge_theory([4, 4], group="su3", beta=1.0)
    torch.set_default_device("cpu")  # a job builds the model before it moves it to its device
    torch.manual_seed(0)
    model = continuous(theory, F64, hidden=[4], n_steps=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4)))
    torch.set_default_device("meta")
    with torch.no_grad():
        x, log_q = model.sample(2, torch.Generator().manual_seed(5))
        log_q2 = model.log_prob(x)
    assert all(t.device.type == "cpu" for t in (x, log_q, log_q2))
    assert torch.allclose(log_q, log_q2, atol=1e-8)


def test_gaugeflow_train_model_continuous(tmp_path):
    """``gaugeflow train theory=<u1_2d, su3_2d> model=continuous lattice.shape=[4,4] train.steps=3``
    (one Hydra multirun: one interpreter for both)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", "-m", "theory=u1_2d,su3_2d",
                        "model=continuous", "lattice.shape=[4,4]", "train.steps=3", "train.batch_size=4",
                        "train.eval_samples=8", "model.n_steps=1", "model.hidden=[4]",
                        "hydra.sweep.dir=sweep"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ESS (independent draws") == 2, r.stdout[-2000:]
    from gaugeflow.io.checkpoint import load_checkpoint

    for i, name in enumerate(("u1_2d", "su3_2d")):
        ck = load_checkpoint(tmp_path / "sweep" / str(i))
        assert ck.step == 3 and ck.theory == name and "gaugeflow.flows.continuous.continuous" in ck.config
