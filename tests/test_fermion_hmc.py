"""Nf = 2 Wilson fermions as HMC targets (theories/fermionic.py): the exact-determinant action and
force, HMC against reweighting, presets and bad input."""

import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from gaugeflow.errors import UsageError
from gaugeflow.fermions import WilsonFermions, log_det_normal
from gaugeflow.groups.matrix import mul
from gaugeflow.components import build_theory
from gaugeflow.observables import mean_plaquette
from gaugeflow.sampling.hmc import HMC
from gaugeflow.theories import gauge_theory, wilson_nf2_theory


@pytest.mark.parametrize("group,shape,kappa", [("u1", [4, 4], 0.25), ("su2", [2, 2, 2, 2], 0.12)])
def test_exact_determinant_force_is_the_derivative_of_the_action(group, shape, kappa):
    theory = wilson_nf2_theory(shape, group, 2.0, kappa)
    g = torch.Generator().manual_seed(1)
    links = theory.start(2, "hot", g)
    x = theory.group.random_algebra(links.shape[:-2], g, links.dtype, links.device)
    f = theory.force(links)
    eps = 1e-5
    plus, minus = mul(theory.group.exp(eps * x), links), mul(theory.group.exp(-eps * x), links)
    fd = (theory.action(plus) - theory.action(minus)) / (2 * eps)
    analytic = (x * f.transpose(-1, -2)).sum(dim=tuple(range(1, x.dim()))).real  # tr(X F)
    # central differences: O(eps^2) truncation, float64 rounding ~ 1e-16 |S| / eps
    assert torch.allclose(fd, analytic, rtol=1e-7, atol=1e-7)
    # the action is the gauge action minus log det(D^dagger D)
    ld = log_det_normal(WilsonFermions(kappa).operator(links))
    assert torch.allclose(theory.action(links), gauge_theory(shape, group, 2.0).action(links) - ld, atol=1e-10)


def _chains(theory, n_chains, n_traj, n_therm, seed):
    gen = torch.Generator().manual_seed(seed)
    hmc = HMC(theory, 8, 1.0, "omelyan", "analytic", gen)
    links = theory.start(n_chains, "cold", gen)
    kept, dh = [], []
    for t in range(n_therm + n_traj):
        r = hmc.trajectory(links)
        links = r.fields
        if t >= n_therm:
            kept.append(mean_plaquette(links).double())
            dh.append(r.delta_h.double())
    return links, torch.stack(kept, 1), torch.stack(dh, 1)


@pytest.mark.physics
def test_nf2_hmc_agrees_with_reweighted_quenched_configurations():
    """<plaquette> of the Schwinger model (4x4, beta 2, kappa 0.24): HMC on the marginal target
    exp(-S_G) det(D^dagger D) against quenched HMC reweighted by det(D^dagger D). Errors from the
    spread over independent chains (chain means for HMC, a jackknife over chains for the ratio)."""
    torch.manual_seed(0)
    shape, beta, kappa, c = [4, 4], 2.0, 0.24, 32
    _, plaq, dh = _chains(wilson_nf2_theory(shape, "u1", beta, kappa), c, 30, 8, 1)
    means = plaq.mean(1)
    nf2, nf2_err = means.mean().item(), means.std().item() / math.sqrt(c)
    expdh = torch.exp(-dh).mean(1)
    assert abs(expdh.mean().item() - 1) < 3 * expdh.std().item() / math.sqrt(c)

    quenched = gauge_theory(shape, "u1", beta)
    gen = torch.Generator().manual_seed(2)
    hmc = HMC(quenched, 8, 1.0, "omelyan", "analytic", gen)
    links = quenched.start(c, "cold", gen)
    p, w = [], []
    for t in range(8 + 60):
        links = hmc.trajectory(links).fields
        if t >= 8:
            p.append(mean_plaquette(links).double())
            w.append(log_det_normal(WilsonFermions(kappa).operator(links)).double())
    p, lw = torch.stack(p, 1), torch.stack(w, 1)
    wts = torch.exp(lw - lw.max())
    jack = np.array([((wts[m] * p[m]).sum() / wts[m].sum()).item()
                     for m in (torch.arange(c) != k for k in range(c))])
    rw, rw_err = ((wts * p).sum() / wts.sum()).item(), math.sqrt((c - 1) * jack.var())
    sigma = math.hypot(nf2_err, rw_err)
    assert abs(nf2 - rw) < 3 * sigma, (nf2, nf2_err, rw, rw_err)
    # the test has power: the determinant moves the plaquette well beyond the errors
    assert abs(nf2 - p.mean().item()) > 3 * sigma


def test_bad_fermion_input_names_the_key():
    base = {"_target_": "gaugeflow.theories.wilson_nf2_theory", "name": "schwinger_2d", "group": "u1", "beta": 2.0}
    for keys, shape, needle in [
        ({"kappa": 0.0}, [4, 4], "theory.kappa must be a positive finite number"),
        ({"kappa": float("nan")}, [4, 4], "theory.kappa must be a positive finite number"),
        ({"kappa": 0.2, "csw": 1.0}, [4, 4], "theory.csw=1.0: the clover term is for 4d"),
        ({"kappa": 0.2}, [48, 48], r"lattice.shape=\[48, 48\]: theory.fermions=exact needs a dense"),
        ({"kappa": 0.2, "nf": 3}, [4, 4], "theory.nf=3"),
        ({"kappa": 0.2, "fermions": "staggered"}, [4, 4], "theory.fermions must be one of"),
        ({"kappa": 0.2, "boundary": "open"}, [4, 4], "theory.boundary must be one of"),
    ]:
        with pytest.raises(UsageError, match=needle):
            build_theory({**base, **keys}, shape)


def test_schwinger_preset_runs_hmc_and_records_the_fermions(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "hmc", "theory=schwinger_2d", "lattice.shape=[4,4]",
                        "hmc.n_traj=3", "hmc.n_therm=1", "out=sw.h5", "hydra.run.dir=run", "hmc.progress=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "sw.h5") as f:
        assert f.attrs["theory"] == "schwinger_2d" and f.attrs["fermions"] == "exact"
        assert f.attrs["kappa"] == 0.276 and f.attrs["nf"] == 2 and f.attrs["boundary"] == "antiperiodic"
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "hmc", "theory=schwinger_2d", "theory.kappa=-1",
                        "lattice.shape=[4,4]", "out=bad.h5", "hydra.run.dir=bad"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "theory.kappa" in r.stderr
    assert not (tmp_path / "bad.h5").exists()
