"""Flows sample exactly what they can represent: toy targets reach ESS > 0.99."""

import math
from types import SimpleNamespace

import torch

from gaugeflow.flows.base import Flow, FlowModel
from gaugeflow.flows.conv import ConvNet
from gaugeflow.flows.masks import gauge_mask
from gaugeflow.flows.priors import HaarPrior
from gaugeflow.flows.u1 import CircleTransform, U1PlaquetteCoupling, plaquette_phases
from gaugeflow.sampling.weights import effective_sample_size, log_z_estimate
from gaugeflow.train.losses import PathGradient
from gaugeflow.train.schedules import Cosine
from gaugeflow.train.trainer import Trainer, TrainSettings


def test_u1_one_plaquette_toy_is_learned_exactly():
    # Target: S = -beta sum_{x in S} cos phi_{01}(x) over the active plaquettes of one mask.
    # Under Haar links these plaquettes are independent and uniform, and one coupling layer
    # maps each by the same circle spline: the exact target (von Mises plaquettes) is in
    # the model family, so training must reach ESS ~ 1 and log Z = |S| log I0(beta).
    torch.manual_seed(0)
    shape, beta = (4, 4), 1.5
    mask = gauge_mask(shape, 0, 1, (0, 0, 0))
    transform = CircleTransform("spline", n_bins=8)
    # the optimum is a constant spline: a bias-only net (kernel 1, no hidden layer) suffices
    layer = U1PlaquetteCoupling(mask, ConvNet(2, transform.n_params, (), 1, 2, zero_init=True), transform)
    model = FlowModel(HaarPrior("u1", shape, dtype=torch.complex128), Flow([layer])).double()
    sites = mask.links.to(torch.float64)

    def action(u):
        return -beta * (torch.cos(plaquette_phases(u, 0, 1)) * sites).sum((1, 2))

    g = torch.Generator().manual_seed(1)
    # path gradients have vanishing variance at the optimum, so the fit converges to ESS ~ 1
    # (the target is a bare action: the trainer needs nothing else of a theory)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    settings = TrainSettings(steps=600, batch_size=256, log_every=100, eval_samples=0)
    Trainer(SimpleNamespace(action=action), model, PathGradient(), opt, Cosine(opt, 600), settings, generator=g).run()
    with torch.no_grad():
        x, log_q = model.sample(4000, g)
        log_w = -action(x) - log_q
    assert effective_sample_size(log_w) > 0.99
    from scipy.special import i0

    n_active = int(mask.links.sum())
    log_z, err = log_z_estimate(log_w)
    assert abs(log_z - n_active * math.log(i0(beta))) < 5 * err + 1e-12
