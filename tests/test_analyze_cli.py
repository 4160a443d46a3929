"""``gaugeflow analyze``: estimates against known answers, summary.json, plots, bad input.

Most checks call the job in-process on small synthetic ensembles (fast); a few run the
command as users do (subprocesses, ~3 s each).
"""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gaugeflow import exact
from gaugeflow.cli.analyze import AnalyzeJob, read_metrics, run_analyze
from gaugeflow.cli.common import UsageError
from gaugeflow.io.ensemble import EnsembleError, EnsembleWriter, read_ensemble
from gaugeflow.sampling.statistics import gamma_method

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def gaugeflow(*args, cwd, timeout=180):
    return subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def write_ensemble(path, theory="phi4_2d", sampler="hmc", **columns):
    """A tiny phi^4-shaped ensemble (2x2 zero fields) carrying the given per-configuration series."""
    n = len(next(iter(columns.values())))
    attrs = {"theory": theory, "kind": "scalar", "group": "none", "shape": [2, 2], "m2": -4.0, "lam": 8.0}
    if sampler is not None:
        attrs["sampler"] = sampler
    with EnsembleWriter(path, "phi", (2, 2), torch.float64, attrs) as w:
        if n:
            w.append(torch.zeros(n, 2, 2, dtype=torch.float64), **{k: np.asarray(v) for k, v in columns.items()})
    return path


def config(**kw):
    return OmegaConf.merge(OmegaConf.structured(AnalyzeJob), kw)


def ar1(n, a, rng):
    """Stationary AR(1) with unit variance: rho(t) = a^t, tau_int = (1 + a) / (2 (1 - a))."""
    e = rng.normal(size=n) * math.sqrt(1 - a * a)
    x = np.empty(n)
    x[0] = rng.normal()
    for i in range(1, n):
        x[i] = a * x[i - 1] + e[i]
    return x


def pngs(directory):
    return sorted(p for p in directory.iterdir() if p.suffix == ".png")


def assert_png_files(paths):
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == PNG, p


# ----------------------------------------------------------------------------- in-process


def test_chain_gamma_method_known_tau(tmp_path):
    rng = np.random.default_rng(11)
    n, a = 20000, 0.5
    tau_exact = (1 + a) / (2 * (1 - a))  # 1.5
    x = ar1(n, a, rng)
    accepted = rng.random(n) < 0.7
    log_p = -rng.normal(size=n)  # present in every HMC file; not an observable
    ens = write_ensemble(tmp_path / "ar.h5", plaquette=x, accepted=accepted, log_p=log_p)
    res = run_analyze(config(ensemble=str(ens), n_therm=100), tmp_path / "out")

    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s == res["summary"]
    assert set(s) == {"plaquette", "acceptance", "_meta"}
    assert all(set(s[k]) == {"mean", "err", "tau_int"} for k in ("plaquette", "acceptance"))
    assert s["_meta"]["method"] == "gamma_method" and s["_meta"]["n_cfg"] == n
    assert s["_meta"]["n_therm"] == 100 and s["_meta"]["n_used"] == n - 100

    p = s["plaquette"]
    # the window's error bar of tau_int (Madras-Sokal, as pyerrors gives it) sets the tolerances
    dtau = gamma_method(x[100:]).tau_int_err
    assert abs(p["tau_int"] - tau_exact) < 4 * dtau, (p, dtau)
    assert abs(p["mean"]) < 4 * p["err"]
    err_exact = math.sqrt(2 * tau_exact / (n - 100))  # unit variance
    rel = math.sqrt((dtau / (2 * tau_exact)) ** 2 + 1 / (2 * (n - 100)))
    assert abs(p["err"] / err_exact - 1) < 4 * rel, (p["err"], err_exact)

    acc = s["acceptance"]
    assert acc["mean"] == pytest.approx(accepted[100:].mean(), abs=1e-12)
    assert abs(acc["mean"] - 0.7) < 4 * acc["err"]
    assert abs(acc["err"] - math.sqrt(0.7 * 0.3 / (n - 100))) < 0.1 * acc["err"]  # independent: naive error

    plots = tmp_path / "out" / "plots"
    assert sorted(map(str, pngs(plots))) == sorted(res["plots"])
    assert {p.name for p in pngs(plots)} == {f"{o}_{k}.png" for o in ("plaquette", "acceptance")
                                            for k in ("history", "histogram", "autocorrelation")}
    assert_png_files(pngs(plots))
    assert not [p for p in plots.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_reweighted_independent_draws(tmp_path):
    # q = N(0, 1) normalised, p = exp(-(x - mu)^2 / 2) unnormalised: <x>_p = mu, Z = sqrt(2 pi),
    # Kish ESS -> exp(-mu^2), and the ratio estimator's error -> sqrt(e^{mu^2} (1 + mu^2) / n)
    rng = np.random.default_rng(5)
    n, mu = 4000, 0.5
    x = rng.normal(size=n)
    log_q = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    log_p = -0.5 * (x - mu) ** 2
    # as `gaugeflow sample sample.method=reweight` writes them
    ens = write_ensemble(tmp_path / "flow.h5", sampler="reweight", plaquette=x, x2=x**2, log_q=log_q, log_p=log_p)
    res = run_analyze(config(ensemble=str(ens)), tmp_path / "out")
    s = res["summary"]
    assert set(s) == {"plaquette", "x2", "_reweighting", "_meta"} and s["_meta"]["method"] == "reweighted"

    w = np.exp(log_p - log_q)
    for name, obs, want in (("plaquette", x, mu), ("x2", x**2, 1 + mu**2)):
        # the self-normalised estimator of exactly these draws, and the exact answer within errors
        assert s[name]["mean"] == pytest.approx((w * obs).sum() / w.sum(), rel=1e-12)
        assert abs(s[name]["mean"] - want) < 4 * s[name]["err"], (name, s[name])
    err_exact = math.sqrt(math.exp(mu**2) * (1 + mu**2) / n)
    # relative spread of that error estimate: fourth moments of w (x - mu) under q
    m2 = math.exp(mu**2) * (1 + mu**2)
    m4 = math.exp(6 * mu**2) * ((3 * mu) ** 4 + 6 * (3 * mu) ** 2 + 3)
    rel = 0.5 * math.sqrt((m4 - m2**2) / n) / m2
    assert abs(s["plaquette"]["err"] / err_exact - 1) < 4 * rel, (s["plaquette"]["err"], err_exact)

    r = s["_reweighting"]
    assert r["ess"] == pytest.approx(w.sum() ** 2 / (n * (w**2).sum()), rel=1e-12)
    assert r["n_eff"] == pytest.approx(r["ess"] * n)
    assert abs(r["log_z"] - 0.5 * math.log(2 * math.pi)) < 4 * r["log_z_err"]
    # log-normal weights of width 0.5: a light tail, thousands of effective draws, no warning
    from gaugeflow.sampling.weights import pareto_khat

    assert r["khat"] == pytest.approx(pareto_khat(log_p - log_q)) and r["khat"] < 0.5 and r["warning"] is None

    names = {p.name for p in pngs(tmp_path / "out" / "plots")}
    assert "log_w_histogram.png" in names and "plaquette_histogram.png" in names
    assert not any(n.startswith(("log_q", "log_p")) for n in names)


def test_flow_chain_with_accepted_is_a_chain(tmp_path):
    # independence Metropolis writes log_q and log_p too, but its history is a Markov chain
    rng = np.random.default_rng(2)
    x = ar1(400, 0.8, rng)
    ens = write_ensemble(tmp_path / "imh.h5", sampler="imh", plaquette=x, accepted=rng.random(400) < 0.5,
                         log_q=rng.normal(size=400), log_p=rng.normal(size=400), proposal=np.arange(400))
    s = run_analyze(config(ensemble=str(ens), plots=False), tmp_path / "out")["summary"]
    assert s["_meta"]["method"] == "gamma_method" and "_reweighting" not in s
    assert set(s) == {"plaquette", "acceptance", "_meta"}  # not log_q, log_p, the proposal index
    assert s["plaquette"]["mean"] == pytest.approx(gamma_method(x).mean)
    assert s["plaquette"]["err"] == pytest.approx(gamma_method(x).err)
    assert not (tmp_path / "out" / "plots").exists()


def test_short_series_gives_null_tau_int(tmp_path):
    ens = write_ensemble(tmp_path / "short.h5", plaquette=[0.1, 0.3, 0.2])
    run_analyze(config(ensemble=str(ens)), tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())  # strict JSON: no NaN
    assert s["plaquette"]["tau_int"] is None and s["plaquette"]["mean"] == pytest.approx(0.2)


def write_metrics(path, header, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
        fh.write(tail)
    return path


def test_training_run_metrics_and_plots(tmp_path):
    run = tmp_path / "train"
    # later columns may be added or dropped: an extra one, no grad_norm & co.
    header = ["step", "loss", "free_energy", "ess", "lr", "new_metric"]
    rows = [[s, 10.0 / s, 10.0 / s, 1 - 1.0 / s, 1e-3, s] for s in (10, 20, 30, 40)]
    # resumed from the checkpoint at step 20: steps 30 and 40 logged again, then on
    rows += [[s, 9.0 / s, 9.0 / s, 1 - 0.5 / s, 5e-4, -s] for s in (30, 40, 50)]
    write_metrics(run / "metrics.csv", header, rows, tail="60,0.1,")  # a line cut short by a kill
    res = run_analyze(config(run=str(run)), tmp_path / "out")
    s = res["summary"]
    assert set(s) == {"_training", "_meta"}
    assert s["_training"] == {"step": 50, "loss": 9.0 / 50, "free_energy": 9.0 / 50, "ess": 1 - 0.5 / 50,
                              "lr": 5e-4, "new_metric": -50.0}
    assert s["_meta"]["n_rows"] == 5
    tr = read_metrics(run / "metrics.csv")
    assert list(tr.columns["step"]) == [10, 20, 30, 40, 50] and tr.columns["new_metric"][2] == -30
    names = {p.name for p in pngs(tmp_path / "out" / "plots")}
    assert names == {"training_loss.png", "training_ess.png", "training_lr.png"}
    assert_png_files(res["plots"])

    # only the columns that exist are plotted
    write_metrics(tmp_path / "m.csv", ["step", "loss"], [[1, 2.0], [2, 1.5]])
    res = run_analyze(config(run=str(tmp_path / "m.csv")), tmp_path / "out2")
    assert [os.path.basename(p) for p in res["plots"]] == ["training_loss.png"]


@pytest.mark.parametrize(
    "make,kw,err,needle",
    [
        (None, {"ensemble": "x.h5", "n_therm": -1}, UsageError, "n_therm must be >= 0"),
        (None, {"ensemble": "x.h5", "s_tau": -1.0}, UsageError, "s_tau must be >= 0"),
        ("ens", {"n_therm": 5}, UsageError, "n_therm=5 leaves none of the 5 configurations"),
        ("empty", {}, EnsembleError, "holds no configurations"),
        ("nan_w", {}, EnsembleError, "1 log weights log_p - log_q are NaN"),
        ("reweight_no_w", {}, EnsembleError, "no 'log_q' and 'log_p'"),
        ("dir", {}, UsageError, "no metrics.csv"),
        ("nostep", {}, UsageError, "no 'step' column"),
        ("header_only", {}, UsageError, "no metrics rows yet"),
    ],
)
def test_bad_input_in_process(tmp_path, make, kw, err, needle):
    x = list(np.linspace(0, 1, 5))
    if make == "ens":
        kw["ensemble"] = str(write_ensemble(tmp_path / "e.h5", plaquette=x))
    elif make == "empty":
        kw["ensemble"] = str(write_ensemble(tmp_path / "e.h5", plaquette=[]))
    elif make == "nan_w":
        lq = [0.0, 0.0, math.nan, 0.0, 0.0]
        kw["ensemble"] = str(write_ensemble(tmp_path / "e.h5", sampler=None, plaquette=x, log_q=lq, log_p=x))
    elif make == "reweight_no_w":
        kw["ensemble"] = str(write_ensemble(tmp_path / "e.h5", sampler="flow_reweight", plaquette=x))
    elif make == "dir":
        (tmp_path / "run").mkdir()
        kw["run"] = str(tmp_path / "run")
    elif make == "nostep":
        kw["run"] = str(write_metrics(tmp_path / "run" / "metrics.csv", ["loss"], [[1.0]]))
    elif make == "header_only":
        kw["run"] = str(write_metrics(tmp_path / "run" / "metrics.csv", ["step", "loss"], []))
    with pytest.raises(err, match=needle):
        run_analyze(config(**kw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def hmc_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hmc")
    r = gaugeflow("hmc", "lattice.shape=[4,4]", "theory.beta=2.0", "hmc.n_traj=20", "hmc.n_therm=2", f"out={tmp}/e.h5",
                  f"hydra.run.dir={tmp}/h", cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp / "e.h5", r.stdout


def test_analyze_hmc_ensemble(tmp_path, hmc_run):
    ens_path, hmc_stdout = hmc_run
    r = gaugeflow("analyze", f"ensemble={ens_path}", "theory=u1_2d", "hydra.run.dir=a", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    ens = read_ensemble(ens_path, load_fields=False)
    for name in ("plaquette", "action", "topological_charge"):
        want = gamma_method(ens.columns[name])
        assert s[name]["mean"] == pytest.approx(want.mean, rel=1e-12)
        assert s[name]["err"] == pytest.approx(want.err, rel=1e-12, abs=1e-300)
    assert s["acceptance"]["mean"] == pytest.approx(ens.columns["accepted"].mean())
    # the same table `gaugeflow hmc` printed for the same chain (save_every=1): every row, exact values included
    hmc_rows = [x for x in hmc_stdout.splitlines() if x.startswith("  ")]
    assert [x.split()[0] for x in hmc_rows] == ["acceptance", "<exp(-dH)>", "plaquette", "topological_charge",
                                                "topological_charge_squared", "topological_susceptibility"]
    assert hmc_rows == [x for x in r.stdout.splitlines() if x.startswith("  ")], (hmc_stdout, r.stdout)
    # exact finite-volume plaquette of 2d U(1) at beta = 2 on 4x4, within the run's error
    assert ens.attrs["beta"] == 2.0
    want = exact.plaquette("u1", 2.0, (4, 4))
    assert s["_exact"]["plaquette"] == pytest.approx(want, rel=1e-12)
    assert s["_exact"]["log_z"] == pytest.approx(exact.log_z("u1", 2.0, (4, 4)), rel=1e-12)
    assert abs(s["plaquette"]["mean"] - want) < 3 * s["plaquette"]["err"]
    assert s["_meta"]["theory"] == "u1_2d" and s["_meta"]["sampler"] == "hmc" and s["_meta"]["n_cfg"] == 20
    # <Q^2> and chi_t = <Q^2>/V with Gamma-method errors, and their exact finite-volume values
    q2 = gamma_method(ens.columns["topological_charge"] ** 2)
    chi = s["topological_susceptibility"]
    assert set(chi) == {"mean", "err", "tau_int"} and chi["mean"] == pytest.approx(q2.mean / 16, rel=1e-12)
    assert chi["err"] == pytest.approx(q2.err / 16, rel=1e-12, abs=1e-300)
    assert s["_exact"]["topological_susceptibility"] == pytest.approx(exact.u1_topological_susceptibility(2.0, 16))
    assert f"exact {s['_exact']['topological_susceptibility']:.6g}   (= <Q^2>/V)" in r.stdout
    assert "log_p" not in s and "delta_h" not in s and "exp_minus_delta_h" in s
    plots = pngs(tmp_path / "a" / "plots")
    assert {"plaquette_history.png", "plaquette_histogram.png", "plaquette_autocorrelation.png"} <= {
        p.name for p in plots}
    assert_png_files(plots)


def test_analysis_beside_a_training_run(tmp_path):
    run = tmp_path / "train"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("train: {steps: 3}\n")
    write_metrics(run / "metrics.csv", ["step", "loss", "free_energy", "ess", "lr"],
                  [[1, 3.0, 3.0, 0.2, 1e-3], [2, 2.0, 2.0, 0.5, 1e-3], [3, 1.0, 1.0, 0.9, 5e-4]])
    rng = np.random.default_rng(0)
    ens = write_ensemble(tmp_path / "e.h5", theory="u1_2d", plaquette=rng.normal(size=50))
    r = gaugeflow("analyze", f"ensemble={ens}", f"run={run}", f"hydra.run.dir={run}", "n_therm=10",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["_training"]["step"] == 3 and s["_training"]["ess"] == 0.9
    assert s["_meta"]["n_used"] == 40 and "plaquette" in s
    names = {p.name for p in pngs(run / "plots")}
    assert {"training_loss.png", "training_ess.png", "training_lr.png", "plaquette_history.png"} <= names
    # the train job's own Hydra record is left alone
    assert (run / ".hydra" / "config.yaml").read_text() == "train: {steps: 3}\n"
    assert (run / ".hydra" / "analyze" / "config.yaml").is_file()


@pytest.mark.parametrize("case", ["missing", "wrong_theory", "not_ensemble", "nothing"])
def test_bad_input_is_one_line_exit_2(tmp_path, hmc_run, case):
    import h5py

    args = {
        "missing": ["ensemble=nope.h5"],
        "wrong_theory": [f"ensemble={hmc_run[0]}", "theory=su2_2d"],
        "not_ensemble": ["ensemble=plain.h5"],
        "nothing": [],
    }[case]
    needle = {
        "missing": "nope.h5: no such ensemble file",
        "wrong_theory": "ensemble of theory 'u1_2d', not 'su2_2d'",
        "not_ensemble": "plain.h5: not a gaugeflow ensemble",
        "nothing": "nothing to analyze",
    }[case]
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["data"] = np.arange(4.0)
    r = gaugeflow("analyze", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # neither summary.json nor plots nor Hydra's record


def test_misspelt_key_fails_in_hydra(tmp_path):
    r = gaugeflow("analyze", "ensemble=e.h5", "n_thrm=3", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode != 0 and "n_thrm" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()



# ----------------------------------------------------------------------------- issue 10: k-hat, topology


def write_u1(path, sampler, n, attrs=None, **columns):
    """A 2d U(1) 4x4 ensemble (identity links) carrying the given per-configuration series."""
    a = {"theory": "u1_2d", "_target_": "gaugeflow.theories.gauge_theory", "group": "U(1)", "shape": [4, 4], "beta": 1.0, "action": "wilson",
         "c0": 1.0, "c1": 0.0, "sampler": sampler, **(attrs or {})}
    with EnsembleWriter(path, "links", (2, 4, 4, 1, 1), torch.complex128, a) as w:
        w.append(torch.ones(n, 2, 4, 4, 1, 1, dtype=torch.complex128), **{k: np.asarray(v) for k, v in columns.items()})
    return path


def test_topological_susceptibility_chain_and_reweighted(tmp_path):
    rng = np.random.default_rng(21)
    n = 2000
    q = np.round(1.6 * ar1(n, 0.6, rng))  # an integer charge with autocorrelation
    s = run_analyze(config(ensemble=str(write_u1(tmp_path / "c.h5", "hmc", n, topological_charge=q)), plots=False),
                    tmp_path / "a")["summary"]
    want = gamma_method(q**2)
    for key, scale in (("topological_charge_squared", 1), ("topological_susceptibility", 16)):
        assert s[key]["mean"] == pytest.approx(want.mean / scale, rel=1e-12)
        assert s[key]["err"] == pytest.approx(want.err / scale, rel=1e-12)
        assert s[key]["tau_int"] == pytest.approx(want.tau_int) and s[key]["tau_int"] > 1
    assert s["_exact"]["topological_charge_squared"] == pytest.approx(exact.u1_q2(1.0, 16))
    # reweighted draws: <Q^2 w> / <w>
    log_q = rng.normal(size=n)
    log_p = 0.3 * rng.normal(size=n)
    q = rng.integers(-3, 4, size=n).astype(np.float64)
    path = write_u1(tmp_path / "r.h5", "reweight", n, topological_charge=q, log_q=log_q, log_p=log_p)
    s = run_analyze(config(ensemble=str(path), plots=False), tmp_path / "b")["summary"]
    w = np.exp(log_p - log_q)
    assert s["topological_susceptibility"]["mean"] == pytest.approx((w * q**2).sum() / w.sum() / 16, rel=1e-12)
    assert s["topological_susceptibility"]["err"] > 0


def test_heavy_tailed_weights_warn(tmp_path, capsys):
    rng = np.random.default_rng(8)
    n = 3000
    log_q = np.zeros(n)
    log_p = -1.0 * np.log(rng.random(n))  # w = 1/U: k = 1, an infinite mean
    path = write_ensemble(tmp_path / "h.h5", sampler="reweight", plaquette=rng.normal(size=n), log_q=log_q,
                          log_p=log_p)
    s = run_analyze(config(ensemble=str(path), plots=False), tmp_path / "a")["summary"]
    r = s["_reweighting"]
    assert r["khat"] > 0.7 and "Pareto k-hat" in r["warning"]
    out = capsys.readouterr()
    assert "Pareto k-hat" in out.out
    # the rows `gaugeflow sample` prints for the same weights (gaugeflow.cli.report)
    rows = [x.strip() for x in out.out.splitlines() if x.startswith("  ")]
    assert f"{'ESS (proposals)':<22} {r['ess']:.4f}   ({r['n_eff']:.1f} effective of {n})" in rows, rows
    assert f"{'log Z':<22} {r['log_z']:.6g} +- {r['log_z_err']:.2g}" in rows, rows
    lines = [x for x in out.err.splitlines() if x.startswith("warning: analyze:")]
    assert len(lines) == 1 and "error bars understate the truth" in lines[0]


def test_imh_chain_reports_its_proposals_weights(tmp_path, capsys):
    rng = np.random.default_rng(4)
    n = 200
    path = write_u1(tmp_path / "imh.h5", "imh", n, {"ess": 0.3, "khat": 0.9, "n_proposals": n},
                    plaquette=ar1(n, 0.5, rng), accepted=rng.random(n) < 0.4, log_q=rng.normal(size=n),
                    log_p=rng.normal(size=n), proposal=np.arange(n))
    s = run_analyze(config(ensemble=str(path), plots=False), tmp_path / "a")["summary"]
    p = s["_proposals"]
    assert p["ess"] == 0.3 and p["khat"] == 0.9 and p["n_eff"] == pytest.approx(60.0) and p["n_proposals"] == n
    assert "Pareto k-hat 0.90 > 0.7" in p["warning"] and "N x ESS = 60.0 < 100" in p["warning"]
    assert "_reweighting" not in s and s["_meta"]["method"] == "gamma_method"
    assert "ESS (proposals)" in capsys.readouterr().out
