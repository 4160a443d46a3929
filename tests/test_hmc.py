import math

import numpy as np
import pytest
import torch

from gaugeflow import exact
from gaugeflow.sampling.hmc import HMC
from gaugeflow.components import build_theory

U1 = dict(name="u1_2d", _target_="gaugeflow.theories.gauge_theory", group="u1", dim=2, beta=2.0)
SU2 = dict(name="su2_2d", _target_="gaugeflow.theories.gauge_theory", group="su2", dim=2, beta=2.0)
SU3 = dict(name="su3_2d", _target_="gaugeflow.theories.gauge_theory", group="su3", dim=2, beta=4.0)
SU3_4D = dict(name="su3_4d", _target_="gaugeflow.theories.gauge_theory", group="su3", dim=4, beta=5.5)
PHI4 = dict(name="phi4_2d", _target_="gaugeflow.theories.phi4_theory", m2=-4.0, lam=8.0)


def flip(p):
    return -p


@pytest.mark.parametrize("cfg,shape", [(U1, [4, 4]), (SU3, [4, 4]), (dict(SU3_4D, action="iwasaki"), [2, 2, 2, 2]), (PHI4, [4, 4])])
@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_integrator_is_reversible(cfg, shape, integrator, gen):
    theory = build_theory(cfg, shape)
    hmc = HMC(theory, 7, 0.7, integrator, generator=gen)
    x0 = theory.start(2, "cold" if not theory.is_gauge else "hot", gen)
    if not theory.is_gauge:
        x0 = x0 + 0.3 * torch.randn(x0.shape, dtype=x0.dtype, generator=gen)
    p0 = hmc.momenta(x0)
    x1, p1 = hmc.integrate(x0, p0)
    x2, p2 = hmc.integrate(x1, flip(p1))
    assert (x2 - x0).abs().max() < 1e-11
    assert (p2 + p0).abs().max() < 1e-11
    assert (x1 - x0).abs().max() > 1e-2  # the trajectory went somewhere


@pytest.mark.parametrize("cfg,shape,order", [(U1, [6, 6], 2), (SU3, [4, 4], 2), (PHI4, [6, 6], 2)])
@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_energy_violation_scales_as_eps_squared(cfg, shape, order, integrator, gen):
    # second-order integrators: dH = A eps^2 + O(eps^4) at fixed trajectory length; the
    # batch sum of |dH| keeps a configuration with accidentally small A from spoiling the ratio
    theory = build_theory(cfg, shape)
    x0 = theory.start(8, "hot", gen) if theory.is_gauge else 0.4 * torch.randn((8, *shape), dtype=torch.float64, generator=gen)
    p0 = HMC(theory, 1, 1.0, integrator, generator=gen).momenta(x0)
    dh = []
    for n in (32, 64, 128):
        hmc = HMC(theory, n, 0.5, integrator)
        h0, _ = hmc.hamiltonian(x0, p0)
        h1, _ = hmc.hamiltonian(*hmc.integrate(x0, p0))
        dh.append((h1 - h0).abs().sum().item())
    ratios = [dh[0] / dh[1], dh[1] / dh[2]]
    for r in ratios:
        assert 2 ** order * 0.8 < r < 2 ** order * 1.2, (dh, ratios)


def test_analytic_and_autograd_forces_give_the_same_chain():
    theory = build_theory(SU2, [4, 4])
    runs = []
    for force in ("analytic", "autograd"):
        g = torch.Generator().manual_seed(7)
        hmc = HMC(theory, 5, 1.0, "leapfrog", force, g)
        x = theory.start(2, "hot", g)
        for _ in range(3):
            x = hmc.trajectory(x).fields
        runs.append(x)
    assert (runs[0] - runs[1]).abs().max() < 1e-11


def test_rejected_trajectory_keeps_configuration(gen):
    # a huge step size makes every proposal fail the Metropolis test
    theory = build_theory(U1, [4, 4])
    hmc = HMC(theory, 1, 50.0, "leapfrog", generator=gen)
    x = theory.start(4, "hot", gen)
    res = hmc.trajectory(x)
    assert not res.accepted.any()
    assert torch.equal(res.fields, x)
    assert torch.allclose(res.action, theory.action(x))


def chains(theory, n_chains, n_therm, n_traj, n_steps, length, seed, measure):
    g = torch.Generator().manual_seed(seed)
    hmc = HMC(theory, n_steps, length, "omelyan", generator=g)
    x = theory.start(n_chains, "hot" if theory.is_gauge else "cold", g)
    for _ in range(n_therm):
        x = hmc.trajectory(x).fields
    samples, boltz = [], []
    for _ in range(n_traj):
        res = hmc.trajectory(x)
        x = res.fields
        samples.append(measure(x))
        boltz.append(torch.exp(-res.delta_h))
    per_chain = torch.stack(samples).mean(0).numpy()  # chains are independent: errors from their spread
    mean = per_chain.mean()
    err = per_chain.std(ddof=1) / math.sqrt(n_chains)
    return mean, err, torch.stack(boltz)


def free_field_phi2(shape, m2):
    # S = phi^T (K + m2) phi with K the lattice Laplacian: <phi(x)^2> = (1/V) sum_k 1/(2 (khat^2 + m2))
    ks = np.meshgrid(*[2 * np.pi * np.arange(n) / n for n in shape], indexing="ij")
    khat2 = sum(4 * np.sin(k / 2) ** 2 for k in ks)
    return float(np.mean(1 / (2 * (khat2 + m2))))


@pytest.mark.parametrize("shape", [[6], [4, 6], [2, 2, 4]])
def test_free_scalar_field(shape):
    # Each Fourier mode is an oscillator turned by omega tau per trajectory; keeping
    # omega tau in (0.4, 2.3) for all modes (omega^2 = 2(khat^2 + m2) <= 25 here) avoids
    # the near-resonance omega tau ~ pi that freezes a mode's amplitude (Mackenzie 1989).
    theory = build_theory(dict(name="free", _target_="gaugeflow.theories.phi4_theory", m2=0.5, lam=0.0), shape)
    mean, err, _ = chains(theory, 32, 40, 100, 6, 0.45, 3, lambda x: x.square().flatten(1).mean(1))
    assert abs(mean - free_field_phi2(shape, 0.5)) < 3 * err


@pytest.mark.physics
@pytest.mark.parametrize(
    "cfg,shape,exact_value",
    [
        (dict(U1, beta=2.0), [8, 8], exact.u1_plaquette(2.0, 64)),
        (dict(U1, beta=4.0), [8, 8], exact.u1_plaquette(4.0, 64)),
        (dict(U1, beta=3.0), [16, 16], exact.u1_plaquette(3.0, 256)),
        (dict(SU2, beta=2.0), [8, 8], exact.sun_plaquette(2, 2.0, 64)),
        (dict(SU2, beta=4.0), [4, 4], exact.sun_plaquette(2, 4.0, 16)),
        (dict(SU3, beta=4.0), [8, 8], exact.sun_plaquette(3, 4.0, 64)),
        (dict(SU3, beta=6.0), [4, 4], exact.sun_plaquette(3, 6.0, 16)),
    ],
    ids=["u1-8-b2", "u1-8-b4", "u1-16-b3", "su2-8-b2", "su2-4-b4", "su3-8-b4", "su3-4-b6"],
)
def test_hmc_reproduces_exact_plaquette(cfg, shape, exact_value):
    from gaugeflow.observables import mean_plaquette

    theory = build_theory(cfg, shape)
    mean, err, boltz = chains(theory, 16, 30, 60, 8, 1.0, 11, mean_plaquette)
    assert abs(mean - exact_value) < 3 * err, (mean, err, exact_value)
    # <exp(-dH)> = 1 (Creutz): a check of reversibility and area preservation
    assert abs(boltz.mean().item() - 1) < 4 * boltz.std().item() / math.sqrt(boltz.numel())


@pytest.mark.physics
def test_hmc_topological_susceptibility_u1():
    from gaugeflow.observables import topological_charge_u1_2d

    theory = build_theory(dict(U1, beta=1.0), [8, 8])
    mean, err, _ = chains(theory, 16, 20, 100, 6, 1.0, 5, lambda x: topological_charge_u1_2d(x).square())
    assert abs(mean - exact.u1_q2(1.0, 64)) < 3 * err, (mean, err)


@pytest.mark.physics
def test_phi4_schwinger_dyson_identity():
    # EXACT.md §3: 2<S>/V + 2 lam <phi^4> = 1 for any correct sampler
    theory = build_theory(PHI4, [8, 8])
    lam, vol = 8.0, 64

    def sd(x):
        return 2 * theory.action(x) / vol + 2 * lam * x.pow(4).mean((1, 2))

    mean, err, _ = chains(theory, 16, 100, 200, 7, 0.7, 9, sd)
    assert abs(mean - 1) < 3 * err, (mean, err)


# ---------------------------------------------------------------------------- the hmc job


def hmc_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from gaugeflow.cli.common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("hmc", overrides=["hmc.progress=false", *overrides])


def run_job(*overrides: str) -> dict:
    from gaugeflow.cli.hmc import run_hmc

    return run_hmc(hmc_config(*overrides))


def test_continued_chain_equals_uninterrupted_chain(tmp_path, capsys):
    import h5py

    from gaugeflow.cli.restore import sha256_file
    from gaugeflow.io.ensemble import read_chain_state, read_ensemble

    common = ["theory=su2_2d", "lattice.shape=[4,4]", "hmc.save_every=2", "hmc.compression=lzf"]
    full, first, second = tmp_path / "full.h5", tmp_path / "first.h5", tmp_path / "second.h5"
    run_job(*common, "seed=3", "hmc.n_therm=2", "hmc.n_traj=6", f"out={full}")
    run_job(*common, "seed=3", "hmc.n_therm=2", "hmc.n_traj=3", f"out={first}")
    # another seed: the continuation's random numbers come from the file, not from seed
    run_job(*common, "seed=99", "hmc.n_therm=0", "hmc.n_traj=3", f"hmc.continue_from={first}", f"out={second}")
    a, b, c = read_ensemble(full), read_ensemble(first), read_ensemble(second)
    # trajectories 2, 4, 6 of the chain are written: 2 in the first file, 4 and 6 in the second;
    # the first file's last trajectory (3) is not among its configurations: the continuation
    # starts from its chain state
    assert (a.n_cfg, b.n_cfg, c.n_cfg) == (3, 1, 2)
    assert np.array_equal(a.fields, np.concatenate([b.fields, c.fields]))
    for key in ("action", "accepted", "delta_h", "plaquette", "log_p"):
        assert np.array_equal(a.columns[key], np.concatenate([b.columns[key], c.columns[key]])), key
    sa, sc = read_chain_state(full), read_chain_state(second)
    assert np.array_equal(sa.fields, sc.fields) and np.array_equal(sa.rng_state, sc.rng_state)
    assert sa.attrs["n_traj_chain"] == sc.attrs["n_traj_chain"] == 6
    assert c.attrs["continued_from"] == str(first) and c.attrs["trajectory_offset"] == 3
    assert c.attrs["continued_from_sha256"] == sha256_file(first)
    with h5py.File(first) as f:  # what a plain h5py reader sees
        assert f["chain_state/rng_state"].dtype == np.uint8 and f["chain_state/fields"].shape == (1, 2, 4, 4, 2, 2)
        assert f.attrs["continued_from"] == "" and f.attrs["trajectory_offset"] == 0


@pytest.mark.parametrize(
    "changes,needle",
    [
        (["theory.beta=6.0"], "theory.beta=2.6, not 6.0"),
        (["theory.action=wilson", "theory.beta=6.0"], "theory.action='iwasaki', not 'wilson'"),
        (["theory.c1=-0.3"], "theory.c1=-0.331, not -0.3"),
        (["lattice.shape=[4,6]"], "lattice.shape=[4, 4], not [4, 6]"),
        (["theory=su2_2d"], "theory 'su3_2d', not 'su2_2d'"),
    ],
)
def test_continuation_checks_every_theory_parameter(tmp_path, changes, needle, capsys):
    from gaugeflow.cli.common import UsageError

    src = tmp_path / "iw.h5"
    base = ["theory=su3_2d", "theory.action=iwasaki", "theory.beta=2.6", "lattice.shape=[4,4]", "hmc.n_therm=0"]
    run_job(*base, "hmc.n_traj=1", f"out={src}")
    with pytest.raises(UsageError) as info:
        run_job(*base, *changes, "hmc.n_traj=1", f"hmc.continue_from={src}", f"out={tmp_path / 'o.h5'}")
    msg = str(info.value)
    assert needle in msg and "\n" not in msg and f"hmc.continue_from={src}" in msg, msg
    assert not (tmp_path / "o.h5").exists()


def test_continuation_of_a_phi4_chain_checks_the_couplings(tmp_path, capsys):
    from gaugeflow.cli.common import UsageError

    src = tmp_path / "phi.h5"
    run_job("theory=phi4_2d_hopping", "lattice.shape=[4,4]", "hmc.n_traj=1", "hmc.n_therm=0", f"out={src}")
    with pytest.raises(UsageError, match=r"theory.kappa=0.3, not 0.28 \(to continue it, pass theory.kappa=0.3\)"):
        run_job("theory=phi4_2d_hopping", "theory.kappa=0.28", "lattice.shape=[4,4]", f"hmc.continue_from={src}",
                f"out={tmp_path / 'o.h5'}")


def test_continuation_of_an_older_file_or_another_device(tmp_path, capsys):
    import shutil

    import h5py

    from gaugeflow.cli.common import UsageError
    from gaugeflow.io.ensemble import read_ensemble

    src = tmp_path / "a.h5"
    common = ["lattice.shape=[4,4]", "hmc.n_therm=0"]
    run_job(*common, "hmc.n_traj=2", f"out={src}")
    other = tmp_path / "cuda.h5"
    shutil.copy(src, other)
    with h5py.File(other, "r+") as f:
        f["chain_state"].attrs["rng_device"] = "cuda"
    with pytest.raises(UsageError, match="a cuda generator's, this run's device is cpu"):
        run_job(*common, f"hmc.continue_from={other}", f"out={tmp_path / 'o.h5'}")
    old = tmp_path / "old.h5"
    shutil.copy(src, old)
    with h5py.File(old, "r+") as f:
        del f["chain_state"]
    run_job(*common, "hmc.n_traj=1", "hmc.n_steps=1", "hmc.traj_length=1e-9", f"hmc.continue_from={old}",
            f"out={tmp_path / 'b.h5'}")
    assert "holds no chain state" in capsys.readouterr().err
    # the last stored configuration starts the chain (a vanishing trajectory keeps it)
    assert np.abs(read_ensemble(tmp_path / "b.h5").fields[0] - read_ensemble(src).fields[-1]).max() < 1e-8


def test_flow_time_default_comes_from_the_theory():
    for name, t in (("u1_2d", 0.0), ("su2_2d", 0.0), ("u1_4d", 0.5), ("su2_4d", 0.5), ("su3_4d", 0.5)):
        cfg = hmc_config(f"theory={name}", "out=x.h5")
        assert cfg.theory.default_flow_time == t and cfg.hmc.flow_time == t, name
    assert hmc_config("theory=su3_4d", "theory.default_flow_time=1.0", "out=x.h5").hmc.flow_time == 1.0
    assert hmc_config("theory=su3_4d", "hmc.flow_time=0.25", "out=x.h5").hmc.flow_time == 0.25


def test_susceptibility_in_the_summary(tmp_path, capsys):
    summary = run_job("theory=su2_4d", "lattice.shape=[2,2,2,2]", "hmc.n_traj=6", "hmc.n_therm=0",
                      f"out={tmp_path / 'a.h5'}")
    q2, chi = summary["topological_charge_squared"], summary["topological_susceptibility"]
    assert chi["mean"] == pytest.approx(q2["mean"] / 16) and chi["err"] == pytest.approx(q2["err"] / 16)
    out = capsys.readouterr().out
    assert "topological_charge_squared" in out and "topological_susceptibility" in out
    assert "(= <Q^2>/V, clover charge at flow time t=0.5)" in out


@pytest.mark.physics
def test_hmc_job_topological_susceptibility_u1(tmp_path, capsys):
    # the job's own summary: chi_t = <Q^2>/V with the Gamma-method error of the Q^2 series
    beta = 2.0
    summary = run_job("theory=u1_2d", f"theory.beta={beta}", "lattice.shape=[8,8]", "hmc.n_traj=2000",
                      "hmc.n_therm=50", "seed=11", f"out={tmp_path / 'u1.h5'}")
    chi = summary["topological_susceptibility"]
    want = exact.u1_topological_susceptibility(beta, 64)
    assert 0 < chi["err"] < 0.2 * want, chi  # a test that can fail: the error resolves chi_t
    assert abs(chi["mean"] - want) < 4 * chi["err"], (chi, want)
    line = next(x for x in capsys.readouterr().out.splitlines() if "topological_susceptibility" in x)
    assert f"exact {want:.6g}" in line, line
