"""The HMC job with dynamical fermions (``gaugeflow hmc theory=schwinger_2d`` / ``qcd_4d_nf2``):
pseudofermion refresh per chain, the nested (multiple time scale) integrator, the fermion keys,
the file layout (marginal ``action`` where the log-determinant is known, correlators, CG cost),
solver failures, continuation, and ``analyze`` of the files."""

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from gaugeflow.errors import UsageError
from gaugeflow.fermions import SolverNotConverged
from gaugeflow.io.ensemble import read_chain_state, read_ensemble
from gaugeflow.sampling.correlators import correlator_analysis, cosh_mass, fold
from gaugeflow.sampling.hmc import HMC, chain_generators, marginal_action
from gaugeflow.theories import wilson_nf2_theory

SW = ["theory=schwinger_2d", "lattice.shape=[4,4]"]
PF = [*SW, "theory.fermions=pseudofermion"]
#: datasets every file of a fermion run has (besides links, chain, trajectory, chain_state)
FERMION_COLUMNS = ("gauge_action", "pion_correlator", "chiral_condensate", "cg_iterations", "solve_seconds",
                   "accepted", "delta_h", "plaquette", "topological_charge")


def hmc_config(*overrides: str):
    from gaugeflow.cli.common import CONFIG_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("hmc", overrides=["hmc.progress=false", *overrides])


def run_job(*overrides: str) -> dict:
    from gaugeflow.cli.hmc import run_hmc

    return run_hmc(hmc_config(*overrides))


def analyze(path, out_dir, plots=False):
    from gaugeflow.cli.analyze import AnalyzeJob, run_analyze
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(AnalyzeJob), {"ensemble": str(path), "plots": plots})
    return run_analyze(cfg, out_dir)


def datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def exp_dh_within_errors(delta_h, n_sigma=4.0):
    w = np.exp(-np.asarray(delta_h, dtype=np.float64))
    err = w.std(ddof=1) / math.sqrt(w.size)
    return abs(w.mean() - 1.0) <= n_sigma * err + 1e-3, (w.mean(), err)


# ---------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_nested_schedule_spends_the_trajectory_on_each_scale(integrator):
    theory = wilson_nf2_theory([4, 4], "u1", 2.0, 0.25)
    n, m = 4, 3
    hmc = HMC(theory, n, 0.8, integrator, gauge_steps=m)
    ops = hmc.schedule()
    drift = sum(a for op, a, _ in ops if op == "drift")
    gauge = sum(a for op, a, _ in ops if op == "kick")
    fermion = sum(b for op, _, b in ops if op == "kick")
    assert drift == pytest.approx(0.8) and gauge == pytest.approx(0.8) and fermion == pytest.approx(0.8)
    # adjacent kicks merged: kicks and drifts alternate, starting and ending with a kick
    assert [op for op, _, _ in ops] == ["kick", "drift"] * (len(ops) // 2) + ["kick"]
    n_fermion = sum(1 for op, _, b in ops if op == "kick" and b != 0)
    n_gauge = sum(1 for op, a, _ in ops if op == "kick" and a != 0)
    assert n_fermion == (n + 1 if integrator == "leapfrog" else 2 * n + 1)
    assert n_gauge == (n * m + 1 if integrator == "leapfrog" else 2 * (2 * n * m) + 1)
    with pytest.raises(ValueError, match="gauge_steps"):
        HMC(theory, n, 1.0, integrator, gauge_steps=0)
    from gaugeflow.theories import gauge_theory

    with pytest.raises(ValueError, match="no separate gauge and fermion forces"):
        HMC(gauge_theory([4, 4], "u1", 2.0), n, 1.0, integrator, gauge_steps=2)


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
def test_nested_integrator_is_reversible_with_eps_squared_energy_violation(integrator):
    theory = wilson_nf2_theory([4, 4], "u1", 2.0, 0.25)
    g = torch.Generator().manual_seed(3)
    links = theory.start(3, "hot", g)
    hmc = HMC(theory, 6, 1.0, integrator, generator=g, gauge_steps=3)
    p = hmc.momenta(links)
    u1, p1 = hmc.integrate(links, p)
    u0, p0 = hmc.integrate(u1, -p1)
    assert torch.allclose(u0, links, atol=1e-10) and torch.allclose(-p0, p, atol=1e-10)
    assert not torch.allclose(u1, links, atol=1e-3)  # it moved

    def rms_dh(n_steps):
        h = HMC(theory, n_steps, 1.0, integrator, gauge_steps=3)
        x, q = h.integrate(links, p)
        return (h.hamiltonian(x, q)[0] - h.hamiltonian(links, p)[0]).square().mean().sqrt().item()

    ratio = rms_dh(12) / rms_dh(24)
    assert 3.0 < ratio < 5.5, ratio  # O(eps^2): halving eps divides dH by ~4
    # the finer gauge scale is another integrator: dH changes (here, where the gauge force
    # dominates, it shrinks)
    one = HMC(theory, 12, 1.0, integrator)
    x, q = one.integrate(links, p)
    rms_one = (one.hamiltonian(x, q)[0] - one.hamiltonian(links, p)[0]).square().mean().sqrt().item()
    assert rms_dh(12) < 0.5 * rms_one


def test_pseudofermion_refresh_uses_each_chains_own_generator():
    """Chain c of a batch (momenta, then pseudofermions, then the Metropolis uniform from its own
    generator) is, to rounding, chain c run alone."""
    theory = wilson_nf2_theory([4, 4], "u1", 2.0, 0.25, fermions="pseudofermion")
    gens = chain_generators(5, 3)
    links = torch.cat([theory.start(1, "hot", g) for g in gens])
    hmc = HMC(theory, 5, 0.5, "omelyan", generator=gens)
    for _ in range(2):
        res = hmc.trajectory(links)
        links = res.fields
    alone_gen = chain_generators(5, 3)[2]
    alone_links = theory.start(1, "hot", alone_gen)
    alone = HMC(wilson_nf2_theory([4, 4], "u1", 2.0, 0.25, fermions="pseudofermion"), 5, 0.5, "omelyan",
                generator=alone_gen)
    for _ in range(2):
        r = alone.trajectory(alone_links)
        alone_links = r.fields
    assert torch.allclose(links[2:], alone_links, atol=1e-9)
    assert torch.equal(gens[2].get_state(), alone_gen.get_state())
    assert set(res.parts) == {"gauge_action", "fermion_action"}
    assert torch.allclose(res.parts["gauge_action"] + res.parts["fermion_action"], res.action, atol=1e-12)
    # the marginal action of the links: S_G - log det(D^dagger D), whatever the pseudofermions
    exact = wilson_nf2_theory([4, 4], "u1", 2.0, 0.25)
    assert torch.allclose(marginal_action(theory, links), exact.action(links), atol=1e-10)


def test_correlator_analysis_of_an_exact_cosh():
    t_len, m = 8, 0.6
    c = np.array([math.cosh(m * (t_len / 2 - t)) for t in range(t_len)])
    rng = np.random.default_rng(0)
    reps = [c * (1 + 0.01 * rng.standard_normal((40, 1))) for _ in range(2)]
    res = correlator_analysis(reps)
    assert len(res["correlator"]) == t_len // 2 + 1 and len(res["effective_mass"]) == t_len // 2
    assert all(abs(e.mean - m) < 1e-9 for e in res["effective_mass"])
    assert np.allclose(fold(c[None])[0], c[: t_len // 2 + 1])
    assert math.isnan(cosh_mass(0.9, 0, 8)[0])  # no solution below ratio 1


# ---------------------------------------------------------------------------- the job


def test_exact_determinant_job_file(tmp_path, capsys):
    out = tmp_path / "ex.h5"
    summary = run_job(*SW, "hmc.chains=2", "hmc.n_traj=6", "hmc.n_therm=2", "hmc.measure_every=2", f"out={out}")
    text = capsys.readouterr().out
    d = datasets(out)
    n = 12
    for key in (*FERMION_COLUMNS, "action", "log_p", "fermion_logdet"):
        assert d[key].shape[0] == n, key
    assert "pseudofermion_action" not in d
    assert d["pion_correlator"].shape == (n, 4)
    measured = d["trajectory"] % 2 == 0
    assert np.isnan(d["pion_correlator"][~measured]).all() and np.isfinite(d["pion_correlator"][measured]).all()
    assert np.isnan(d["chiral_condensate"][~measured]).all() and np.isfinite(d["chiral_condensate"][measured]).all()
    assert np.isfinite(d["plaquette"]).all()
    assert np.abs(d["action"] - (d["gauge_action"] - d["fermion_logdet"])).max() < 1e-10
    assert np.array_equal(d["log_p"], -d["action"])
    # the exact action really is S_G - log det(D^dagger D) of the stored links
    theory = wilson_nf2_theory([4, 4], "u1", 2.0, 0.276)
    assert np.allclose(theory.action(torch.from_numpy(d["links"])).numpy(), d["action"], atol=1e-10)
    ok, info = exp_dh_within_errors(d["delta_h"])
    assert ok, info
    with h5py.File(out) as f:
        assert f.attrs["fermions"] == "exact" and f.attrs["kappa"] == 0.276 and f.attrs["gauge_steps"] == 1
        assert f.attrs["cg_tol"] == 1e-10 and f.attrs["cg_maxiter"] == 10000 and bool(f.attrs["measure_logdet"])
    assert "chiral_condensate" in summary and summary["pion_effective_mass"]["form"] == "cosh"
    assert "pion m_eff(t=0)" in text and "chiral_condensate" in text and "CG per trajectory" in text
    assert "gauge_action" not in text  # extensive: in the file and the summary, not the table


def test_pseudofermion_job_with_logdet(tmp_path, capsys):
    out = tmp_path / "pf.h5"
    run_job(*PF, "hmc.measure_logdet=true", "hmc.chains=2", "hmc.n_traj=4", "hmc.n_therm=1", "hmc.cg_tol=1e-12",
            f"out={out}")
    text = capsys.readouterr().out
    d = datasets(out)
    n = 8
    for key in (*FERMION_COLUMNS, "action", "log_p", "fermion_logdet", "pseudofermion_action"):
        assert d[key].shape[0] == n, key
    assert d["pion_correlator"].shape == (n, 4) and np.isfinite(d["pion_correlator"]).all()
    assert np.abs(d["action"] - (d["gauge_action"] - d["fermion_logdet"])).max() < 1e-10
    theory = wilson_nf2_theory([4, 4], "u1", 2.0, 0.276)  # the marginal of the pseudofermion target
    assert np.allclose(theory.action(torch.from_numpy(d["links"])).numpy(), d["action"], atol=1e-10)
    assert (d["cg_iterations"] > 0).all() and (d["solve_seconds"] > 0).all()
    # one value per trajectory, the same for every chain of it
    assert np.array_equal(d["cg_iterations"][0::2], d["cg_iterations"][1::2])
    assert (d["pseudofermion_action"] > 0).all()
    ok, info = exp_dh_within_errors(d["delta_h"])
    assert ok, info
    with h5py.File(out) as f:
        assert f.attrs["cg_tol"] == 1e-12 and f.attrs["cg_iterations_per_trajectory"] > 0
        assert json.loads(f.attrs["pseudofermion_options"]) == {"even_odd": False, "hasenbusch": [],
                                                                  "mixed_precision": False}
    assert "CG per trajectory" in text and "iterations" in text


def test_pseudofermion_file_without_action_and_its_analysis(tmp_path, capsys):
    out = tmp_path / "nold.h5"
    run_job(*PF, "hmc.chains=2", "hmc.n_traj=5", "hmc.n_therm=1", f"out={out}")
    d = datasets(out)
    assert "action" not in d and "log_p" not in d and "fermion_logdet" not in d
    assert d["gauge_action"].shape == d["pseudofermion_action"].shape == (10,)
    capsys.readouterr()
    res = analyze(out, tmp_path / "an", plots=True)
    cap = capsys.readouterr()
    s = res["summary"]
    assert "action" not in s and math.isfinite(s["chiral_condensate"]["mean"])
    meff = s["pion_effective_mass"]
    assert meff["t"] == [0, 1] and all(math.isfinite(x) for x in meff["mean"] + meff["err"])
    assert len(s["pion_correlator"]["mean"]) == 3
    assert "pion m_eff(t=0)" in cap.out and "pion m_eff(t=1)" in cap.out and "chiral_condensate" in cap.out
    assert "has no 'action'" in cap.err
    assert (tmp_path / "an" / "plots" / "pion_correlator.png").stat().st_size > 0
    # the correlator's rows go into the effective mass, errors by the Gamma method over the replicas
    ens = read_ensemble(out)
    reps = [ens.columns["pion_correlator"][ens.chain == c] for c in range(2)]
    want = correlator_analysis(reps)["effective_mass"]
    assert meff["mean"] == pytest.approx([e.mean for e in want]) and meff["err"] == pytest.approx([e.err for e in want])


def test_gauge_steps_change_dh_and_keep_exp_dh_one(tmp_path):
    common = [*SW, "hmc.chains=4", "hmc.n_traj=8", "hmc.n_therm=0", "hmc.n_steps=4", "seed=7",
              "hmc.fermion_measurements=false"]
    run_job(*common, f"out={tmp_path / 'a.h5'}")
    run_job(*common, "hmc.gauge_steps=3", f"out={tmp_path / 'b.h5'}")
    a, b = datasets(tmp_path / "a.h5"), datasets(tmp_path / "b.h5")
    assert "pion_correlator" not in b and "chiral_condensate" not in b
    assert not np.allclose(a["delta_h"][:4], b["delta_h"][:4])  # same start, same momenta, another integrator
    ok, info = exp_dh_within_errors(b["delta_h"])
    assert ok, info
    with h5py.File(tmp_path / "b.h5") as f:
        assert f.attrs["gauge_steps"] == 3


def test_continuation_of_a_pseudofermion_chain_is_bitwise(tmp_path):
    common = [*PF, "hmc.chains=2", "hmc.n_therm=1", "hmc.measure_logdet=true"]
    run_job(*common, "seed=4", "hmc.n_traj=4", f"out={tmp_path / 'full.h5'}")
    run_job(*common, "seed=4", "hmc.n_traj=2", f"out={tmp_path / 'first.h5'}")
    run_job(*PF, "hmc.chains=2", "hmc.n_therm=0", "hmc.measure_logdet=true", "seed=99", "hmc.n_traj=2",
            f"hmc.continue_from={tmp_path / 'first.h5'}", f"out={tmp_path / 'second.h5'}")
    full, first, second = (datasets(tmp_path / f"{x}.h5") for x in ("full", "first", "second"))
    for key, v in full.items():
        if key == "solve_seconds":
            continue  # wall-clock time
        if key.startswith("chain_state"):
            assert np.array_equal(v, second[key]), key
        else:
            assert np.array_equal(v, np.concatenate([first[key], second[key]]), equal_nan=True), key


def test_solver_failure_mid_run_keeps_a_continuable_file(tmp_path, monkeypatch, capsys):
    from gaugeflow.cli.hmc import SolverFailure
    from gaugeflow.theories.fermionic import PseudofermionAction

    common = [*PF, "hmc.n_therm=0", "hmc.chains=2", "seed=1", "hmc.n_steps=4"]
    run_job(*common, "hmc.n_traj=4", f"out={tmp_path / 'full.h5'}")
    calls = {"n": 0}
    original = PseudofermionAction.fermion_force

    def failing(self, links):
        calls["n"] += 1
        if calls["n"] == 2 * 9 + 3:  # in the third trajectory (9 forces per trajectory of 4 Omelyan steps)
            raise SolverNotConverged(torch.tensor([0.5, 1e-12]), torch.tensor([7, 7]), 1e-10, 7)
        return original(self, links)

    monkeypatch.setattr(PseudofermionAction, "fermion_force", failing)
    with pytest.raises(SolverFailure, match=r"did not converge at trajectory 3: relative residual 5\.000e-01"):
        run_job(*common, "hmc.n_traj=4", f"out={tmp_path / 'cut.h5'}")
    assert "stopped by SolverNotConverged at trajectory 3" in capsys.readouterr().out
    ens = read_ensemble(tmp_path / "cut.h5")
    assert ens.n_cfg == 4 and ens.attrs["stop_reason"] == "SolverNotConverged at trajectory 3"
    assert read_chain_state(tmp_path / "cut.h5").attrs["n_traj_chain"] == 2
    monkeypatch.setattr(PseudofermionAction, "fermion_force", original)
    # the chain state is the state before the failed trajectory: continuing it retries that trajectory
    run_job(*PF, "hmc.n_therm=0", "hmc.chains=2", "hmc.n_steps=4", "hmc.n_traj=2",
            f"hmc.continue_from={tmp_path / 'cut.h5'}", f"out={tmp_path / 'rest.h5'}")
    full, cut, rest = (datasets(tmp_path / f"{x}.h5") for x in ("full", "cut", "rest"))
    for key in ("links", "delta_h", "accepted", "pion_correlator", "chiral_condensate", "gauge_action"):
        assert np.array_equal(full[key], np.concatenate([cut[key], rest[key]]), equal_nan=True), key


def test_cg_cap_too_small_is_one_line_exit_1_with_a_valid_file(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "hmc", *PF, "hmc.cg_maxiter=2", "hmc.n_traj=3",
                        "hmc.n_therm=0", "out=cap.h5", "hydra.run.dir=run", "hmc.progress=false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hmc: CG did not converge at trajectory 1")
    assert "relative residual" in lines[0] and "hmc.cg_maxiter=2" in lines[0]
    ens = read_ensemble(tmp_path / "cap.h5")
    assert ens.n_cfg == 0 and ens.attrs["stop_reason"].startswith("SolverNotConverged")
    assert read_chain_state(tmp_path / "cap.h5") is not None
    assert not any(p.name.startswith(".cap.h5.tmp") for p in tmp_path.iterdir())


def test_fermion_keys_on_a_theory_without_fermions_and_bad_values(tmp_path):
    for key in ("hmc.gauge_steps=2", "hmc.measure_logdet=true", "hmc.cg_tol=1e-8", "hmc.cg_maxiter=5",
                "hmc.fermion_measurements=false"):
        with pytest.raises(UsageError, match=f"{key.split('=')[0]}=.*theory u1_2d has no dynamical fermions"):
            run_job("theory=u1_2d", "lattice.shape=[4,4]", key, f"out={tmp_path / 'x.h5'}")
    for key, needle in [("hmc.gauge_steps=0", "hmc.gauge_steps must be >= 1"),
                        ("hmc.cg_tol=0", "hmc.cg_tol must be > 0"),
                        ("hmc.cg_maxiter=0", "hmc.cg_maxiter must be >= 1"),
                        ("hmc.force=autograd", "hmc.force=autograd: the pseudofermion force")]:
        with pytest.raises(UsageError, match=needle):
            run_job(*PF, key, f"out={tmp_path / 'x.h5'}")
    with pytest.raises(UsageError, match=r"hmc.measure_logdet=true: lattice.shape=\[4, 4, 4, 8\] needs a dense"):
        run_job("theory=qcd_4d_nf2", "lattice.shape=[4,4,4,8]", "hmc.measure_logdet=true", f"out={tmp_path / 'x.h5'}")
    assert not (tmp_path / "x.h5").exists()


def test_qcd_nf2_job_on_a_tiny_lattice(tmp_path, capsys):
    out = tmp_path / "qcd.h5"
    run_job("theory=qcd_4d_nf2", "lattice.shape=[2,2,2,2]", "hmc.n_traj=2", "hmc.n_therm=0", "hmc.n_steps=6",
            f"out={out}")
    text = capsys.readouterr().out
    d = datasets(out)
    assert d["links"].shape == (2, 4, 2, 2, 2, 2, 3, 3)
    assert d["pion_correlator"].shape == (2, 2) and np.isfinite(d["pion_correlator"]).all()
    assert "action" not in d and d["pseudofermion_action"].shape == (2,)
    assert (d["cg_iterations"] > 0).all()
    assert "CG per trajectory" in text and "pion m_eff(t=0)" in text
