"""``gaugeflow sample`` and ``gaugeflow score``: ensembles from a trained flow, scores of an ensemble,
the checkpoint-restore rule, bad input, and the issue's acceptance test against the exact plaquette."""

import hashlib
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gaugeflow import exact
from gaugeflow.io import read_ensemble
from gaugeflow.io.checkpoint import load_checkpoint, save_checkpoint

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TINY = ["model=small", "train.steps=5", "train.batch_size=16", "lattice.shape=[4,4]", "seed=1"]


def gaugeflow(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny trained run ``run/`` and a short HMC ensemble ``hmc.h5`` of the same theory and lattice."""
    d = tmp_path_factory.mktemp("sample")
    ok(gaugeflow("train", *TINY, "hydra.run.dir=run", cwd=d))
    ok(gaugeflow("hmc", "hmc.n_traj=10", "lattice.shape=[4,4]", "out=hmc.h5", "hydra.run.dir=hmc_run", cwd=d))
    return d


@pytest.fixture(scope="module")
def imh(work):
    r = ok(gaugeflow("sample", "checkpoint=run", "sample.n=40", "sample.batch_size=16", "seed=7", "out=imh.h5",
                     "hydra.run.dir=imh_run", cwd=work))
    return r


@pytest.fixture(scope="module")
def rw(work):
    r = ok(gaugeflow("sample", "checkpoint=run", "sample=reweight", "sample.n=40", "sample.batch_size=16", "seed=7",
                     "out=rw.h5", "hydra.run.dir=rw_run", cwd=work))
    return r


def test_imh_ensemble(work, imh):
    ck = load_checkpoint(work / "run")
    ens = read_ensemble(work / "imh.h5")
    assert ens.field_name == "links" and ens.fields.shape == (40, 2, 4, 4, 1, 1)
    # a float32-trained flow samples in float64 by default: complex128 links, log q exact like S
    assert ens.fields.dtype == np.complex128
    c = ens.columns
    for key in ("log_q", "log_p", "accepted", "action", "plaquette", "topological_charge", "proposal"):
        assert c[key].shape == (40,), key
    assert c["log_q"].dtype == np.float64 and c["log_p"].dtype == np.float64
    assert np.array_equal(c["log_p"], -c["action"])
    assert c["accepted"].dtype == np.bool_ and c["accepted"][0]
    assert 0 < c["accepted"].sum() < 40  # a 5-step model accepts some proposals and rejects others
    # a rejected step repeats the previous configuration together with its log q and log p
    for i in np.flatnonzero(~c["accepted"]):
        assert np.array_equal(ens.fields[i], ens.fields[i - 1])
        assert c["log_q"][i] == c["log_q"][i - 1] and c["log_p"][i] == c["log_p"][i - 1]
        assert c["proposal"][i] == c["proposal"][i - 1]
    assert np.array_equal(c["proposal"][c["accepted"]], np.flatnonzero(c["accepted"]))
    a = ens.attrs
    assert a["sampler"] == "imh" and a["theory"] == "u1_2d" and list(a["shape"]) == [4, 4]
    assert a["checkpoint"] == str(ck.path.resolve()) and a["checkpoint_sha256"] == sha256(ck.path)
    assert a["checkpoint_step"] == 5 and a["seed"] == 7 and a["n_proposals"] == 40
    assert a["model_dtype"] == "float64" and a["training_dtype"] == "float32" and a["flow_time"] == 0.0
    assert a["stop_reason"] == "completed" and (np.isfinite(a["khat"]) or np.isnan(a["khat"]))
    assert {"gaugeflow_version", "git_sha", "created", "config"} <= set(a)
    assert a["acceptance"] == pytest.approx(c["accepted"].mean())
    summary = json.loads((work / "imh_run" / "summary.json").read_text())
    for key in ("plaquette", "topological_charge"):
        assert set(summary[key]) >= {"mean", "err", "tau_int"}
    assert summary["plaquette"]["mean"] == pytest.approx(c["plaquette"].mean())
    assert summary["plaquette"]["exact"] == pytest.approx(exact.plaquette("u1", a["beta"], (4, 4)))
    assert summary["acceptance"] == pytest.approx(c["accepted"].mean())
    assert 0 < summary["ess"] <= 1 and np.isfinite(summary["log_z"]) and summary["log_z_err"] > 0
    assert summary["log_z_exact"] == pytest.approx(exact.log_z("u1", a["beta"], (4, 4)))
    assert summary["stop_reason"] == "completed" and summary["model_dtype"] == "float64"
    # Pareto k-hat beside the ESS, and the warning a 40-draw run of a 5-step flow deserves
    assert summary["khat"] == pytest.approx(a["khat"]) and summary["n_eff"] == pytest.approx(40 * summary["ess"])
    assert summary["n_eff"] < 100 and "error bars understate the truth" in summary["weights_warning"]
    warnings = [line for line in imh.stderr.splitlines() if line.startswith("warning: sample:")]
    assert len(warnings) == 1 and "N x ESS" in warnings[0], imh.stderr
    # <Q^2> and chi_t = <Q^2>/V of the chain, with the exact finite-volume values beside them
    q2 = c["topological_charge"] ** 2
    assert summary["topological_charge_squared"]["mean"] == pytest.approx(q2.mean())
    assert summary["topological_susceptibility"]["mean"] == pytest.approx(q2.mean() / 16)
    assert summary["topological_susceptibility"]["err"] == pytest.approx(summary["topological_charge_squared"]["err"] / 16)
    assert summary["topological_susceptibility"]["exact"] == pytest.approx(exact.u1_q2(a["beta"], 16) / 16)
    out = imh.stdout
    for needle in ("ESS (proposals)", "Pareto k-hat", "acceptance", "log Z", "exact", "plaquette", "tau_int",
                   "topological_susceptibility", "wrote 40"):
        assert needle in out, needle
    row = next(x for x in out.splitlines() if x.split()[:2] == ["log", "Z"])
    assert f"{summary['log_z']:.6g} +- {summary['log_z_err']:.2g}   exact {summary['log_z_exact']:.6g}" in row, row
    assert f"tau_int {summary['acceptance_tau_int']:.2f}" in next(x for x in out.splitlines() if "acceptance" in x)


def test_reweight_ensemble_holds_the_proposals_of_the_chain(work, imh, rw):
    chain, draws = read_ensemble(work / "imh.h5"), read_ensemble(work / "rw.h5")
    assert "accepted" not in draws.columns and draws.attrs["sampler"] == "reweight"
    assert {"log_q", "log_p", "plaquette"} <= set(draws.columns)
    # same seed, same proposals: every chain state is the proposal it names, across batch boundaries
    p = chain.columns["proposal"]
    assert np.array_equal(chain.fields, draws.fields[p])
    assert np.array_equal(chain.columns["log_q"], draws.columns["log_q"][p])
    summary = json.loads((work / "rw_run" / "summary.json").read_text())
    assert summary["acceptance"] is None and summary["method"] == "reweight"
    lw = draws.columns["log_p"] - draws.columns["log_q"]
    w = np.exp(lw - lw.max())
    assert summary["plaquette"]["mean"] == pytest.approx((w * draws.columns["plaquette"]).sum() / w.sum())
    assert summary["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum() / 40)
    q2 = draws.columns["topological_charge"] ** 2
    assert summary["topological_susceptibility"]["mean"] == pytest.approx((w * q2).sum() / w.sum() / 16)
    assert "acceptance" not in rw.stdout


@pytest.mark.parametrize("method", ["imh", "rw"])
def test_sample_and_analyze_of_its_file_print_the_same_rows(work, imh, rw, method):
    """One report formatter and one exact-reference path: every estimate row of `gaugeflow sample`
    (observables with their exact values, acceptance, ESS, k-hat, log Z) is the row `gaugeflow
    analyze` prints for the file it wrote."""
    job = {"imh": imh, "rw": rw}[method]
    a = ok(gaugeflow("analyze", f"ensemble={method}.h5", "plots=false", f"hydra.run.dir=a_{method}", cwd=work))
    # all but the bound F_q, which analyze does not print, and for the chain log Z of its proposals, which
    # the file (the chain's states) cannot give
    rows = [line for line in job.stdout.splitlines() if line.startswith("  ") and "F_q" not in line
            and not (method == "imh" and line.split()[:2] == ["log", "Z"])]
    assert len(rows) == 7 and "exact" in "".join(rows), job.stdout
    for line in rows:
        assert line in a.stdout.splitlines(), (line, a.stdout)
    summary = json.loads((work / f"{method}_run" / "summary.json").read_text())
    analysis = json.loads((work / f"a_{method}" / "summary.json").read_text())
    assert analysis["_exact"] == {k: v["exact"] for k, v in summary.items() if isinstance(v, dict) and "exact" in v} | {
        "log_z": summary["log_z_exact"]}


def test_score_reproduces_the_samplers_log_q(work, imh):
    ok(gaugeflow("score", "checkpoint=run", "ensemble=imh.h5", "out=imh_scores.h5", "hydra.run.dir=s1", cwd=work))
    ens = read_ensemble(work / "imh.h5")
    with h5py.File(work / "imh_scores.h5") as f:
        log_q, log_p = f["log_q"][()], f["log_p"][()]
    # log q by the inverse flow on the stored configurations = log q from sampling, to float64
    # precision: both run the float32-trained model in float64 (a float32 evaluation is off by ~1e-6)
    assert np.allclose(log_q, ens.columns["log_q"], rtol=0, atol=1e-10)
    assert np.array_equal(log_p, ens.columns["log_p"])
    summary = json.loads((work / "s1" / "summary.json").read_text())
    assert summary["model_dtype"] == "float64" and summary["log_q_vs_ensemble"]["max_abs"] < 1e-10
    # samples of p: the forward ESS 1 / (<w>_p <1/w>_p) and the k-hat of p/q over them
    lw = log_p - log_q
    assert summary["ess_kind"] == "forward"
    assert summary["ess"] == pytest.approx(1 / (np.mean(np.exp(lw - lw.max())) * np.exp(lw.max())
                                                * np.mean(np.exp(-lw))))


def test_score_hmc_ensemble(work):
    r = ok(gaugeflow("score", "checkpoint=run", "ensemble=hmc.h5", "score.batch_size=3", "hydra.run.dir=s2",
                     cwd=work))
    assert "E_p[log p~ - log q]" in r.stdout and "forward KL" in r.stdout and "exact" in r.stdout
    ck = load_checkpoint(work / "run")
    ens = read_ensemble(work / "hmc.h5")
    with h5py.File(work / "s2" / "scores.h5") as f:  # out defaults to the run directory
        log_q, log_p, attrs = f["log_q"][()], f["log_p"][()], dict(f.attrs)
    assert log_q.shape == log_p.shape == (10,) and np.all(np.isfinite(log_q))
    assert np.allclose(log_p, ens.columns["log_p"], rtol=1e-12, atol=1e-9)
    assert attrs["ensemble_sha256"] == sha256(work / "hmc.h5") and attrs["checkpoint_sha256"] == sha256(ck.path)
    assert attrs["theory"] == "u1_2d" and attrs["n_cfg"] == 10
    summary = json.loads((work / "s2" / "summary.json").read_text())
    est = summary["log_p_minus_log_q"]
    assert est["mean"] == pytest.approx((log_p - log_q).mean()) and est["err"] > 0
    log_z = exact.log_z("u1", ens.attrs["beta"], (4, 4))
    assert summary["log_z_exact"] == pytest.approx(log_z)
    assert summary["forward_kl"]["mean"] == pytest.approx(est["mean"] - log_z)


def test_overrides_apply_on_top_of_the_checkpoint(work):
    beta = read_ensemble(work / "hmc.h5", load_fields=False).attrs["beta"] + 0.5
    ok(gaugeflow("sample", "checkpoint=run", f"theory.beta={beta}", "sample.n=8", "out=b.h5", "hydra.run.dir=b",
                 cwd=work))
    a = read_ensemble(work / "b.h5", load_fields=False).attrs
    assert a["beta"] == beta and list(a["shape"]) == [4, 4]  # the lattice still comes from the checkpoint
    # recorded beside what the flow was trained at
    assert json.loads(a["target_changes"]) == {"theory.beta": {"trained": beta - 0.5, "target": beta}}
    # an explicit group choice consistent with the checkpoint is allowed and means the composed group
    ok(gaugeflow("sample", "checkpoint=run/checkpoints/step_00000005.h5", "theory=u1_2d", "model=small",
                 "sample.n=4", "out=c.h5", "hydra.run.dir=c", cwd=work))
    for args, needle in [(["model=default"], "does not fit this model"),
                         (["theory=su2_2d"], "theory=su2_2d is not on the field space the flow was trained for")]:
        r = gaugeflow("sample", "checkpoint=run", "sample.n=4", *args, "out=x.h5", "hydra.run.dir=x", cwd=work)
        one_line_error(r, needle, work, "x.h5", "x")


def one_line_error(r, needle, cwd, out, run_dir):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.stdout, r.stderr)
    assert needle in lines[0], (needle, lines[0])
    assert not (cwd / out).exists() and not (cwd / run_dir).exists()
    assert not any(p.name.startswith(f".{out}.tmp") for p in cwd.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["checkpoint=nowhere.h5"], "checkpoint=nowhere.h5: no such checkpoint file or run directory"),
    ([], "checkpoint=<checkpoint file or run directory> is required"),
    (["checkpoint=run", "sample.n=0"], "sample.n must be >= 1, got 0"),
    (["checkpoint=run", "sample.method=hmc"], "sample.method must be imh or reweight"),
])
def test_sample_bad_input(work, args, needle):
    r = gaugeflow("sample", *args, "out=bad.h5", "hydra.run.dir=bad", cwd=work)
    one_line_error(r, needle, work, "bad.h5", "bad")


def fake_ensemble(path, theory_name, shape, beta):
    """A valid ensemble file of two random configurations (no sampler run needed to test rejection)."""
    from gaugeflow.io import EnsembleWriter
    from gaugeflow.components import build_theory

    group = theory_name.split("_")[0]
    theory = build_theory({"name": theory_name, "_target_": "gaugeflow.theories.gauge_theory", "group": group, "dim": 2, "beta": beta}, shape)
    links = theory.start(2, "hot", torch.Generator().manual_seed(0))
    with EnsembleWriter(path, "links", links.shape[1:], links.dtype, theory.attributes()) as w:
        w.append(links, log_p=-theory.action(links))


def test_score_bad_input(work):
    beta = read_ensemble(work / "hmc.h5", load_fields=False).attrs["beta"]
    fake_ensemble(work / "su2.h5", "su2_2d", [4, 4], beta)
    fake_ensemble(work / "wide.h5", "u1_2d", [4, 6], beta)
    for args, needle in [
        (["checkpoint=run", "ensemble=su2.h5"], "ensemble=su2.h5: ensemble of theory 'su2_2d', not 'u1_2d'"),
        (["checkpoint=run", "ensemble=wide.h5"], "ensemble=wide.h5: lattice shape [4, 6], not [4, 4]"),
        (["checkpoint=run", "ensemble=hmc.h5", f"theory.beta={beta + 1}"], f"beta={beta} in the ensemble"),
        (["checkpoint=run", "ensemble=none.h5"], "none.h5: no such ensemble file"),
        (["checkpoint=missing", "ensemble=hmc.h5"], "checkpoint=missing: no such checkpoint"),
    ]:
        r = gaugeflow("score", *args, "out=bad.h5", "hydra.run.dir=bad", cwd=work)
        one_line_error(r, needle, work, "bad.h5", "bad")


# --- the restore rule, in process (no subprocess): merging keeps the job's schema valid --------------------


def compose(name, overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gaugeflow.cli.sample  # noqa: F401  (registers sample_schema)
    import gaugeflow.cli.score  # noqa: F401  (registers score_schema)
    from gaugeflow.cli.common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides))


SAVED = """
theory: {name: u1_2d, kind: gauge, dim: 2, default_shape: [8, 8], group: u1, beta: 3.0, c1: null,
         a_key_from_the_future: 1, hmc: {n_steps: 5, traj_length: 1.0, integrator: leapfrog, start: hot, newer: 2}}
lattice: {shape: [4, 4]}
model: {kind: null, n_layers: 2, hidden: [4], n_bins: 4, another_future_key: x}
train: {dtype: float64}
"""


@pytest.fixture
def fake_ck(tmp_path):
    save_checkpoint(tmp_path / "ck", 3, model={}, theory="u1_2d", config=SAVED)
    return tmp_path / "ck"


@pytest.mark.parametrize("job", ["sample", "score"])
def test_restore_merges_into_the_schema(fake_ck, job):
    from gaugeflow.cli.build import model_from_config, theory_from_config
    from gaugeflow.cli.restore import restore_config, training_dtype

    cfg = compose(job, ["theory.beta=2.5", "model.n_bins=6"])
    merged, ck = restore_config(cfg, str(fake_ck), overrides=["theory.beta=2.5", "model.n_bins=6"])
    assert ck.step == 3 and training_dtype(ck) == torch.float64
    t, m = merged.theory, merged.model
    assert t.beta == 2.5 and isinstance(t.beta, float)  # the override, on top of the checkpoint's 3.0
    assert t.action == "wilson"  # absent from the saved config: the builder's default
    assert "a_key_from_the_future" not in t and "newer" not in t.hmc and "another_future_key" not in m
    assert m.n_layers == 2 and list(m.hidden) == [4] and m.n_bins == 6 and m.kernel_size == 3
    assert list(merged.lattice.shape) == [4, 4]
    # an older checkpoint's `kind:` nodes are today's _target_ nodes (model.kind null: the theory's flow)
    assert t._target_ == "gaugeflow.theories.gauge_theory" and "kind" not in t
    assert m._target_ == "gaugeflow.flows.models.u1_equivariant" and "kind" not in m
    # the merged config is a valid job config: it resolves and builds theory and model
    OmegaConf.to_container(merged.theory, resolve=True, throw_on_missing=True)
    OmegaConf.to_container(merged.model, resolve=True, throw_on_missing=True)
    theory = theory_from_config(merged)
    model = model_from_config(merged, theory, torch.float64, torch.device("cpu"))
    assert theory.params["beta"] == 2.5 and len(model.flow.layers) == 2
    with pytest.raises(Exception):
        merged.theory.not_a_key = 1  # still struct: typos fail


def test_restore_group_overrides_and_errors(fake_ck, tmp_path):
    from gaugeflow.cli.common import UsageError
    from gaugeflow.cli.restore import restore_config

    cfg = compose("sample", ["model_size=small"])
    merged, _ = restore_config(cfg, fake_ck, overrides=["model_size=small"])
    assert merged.model == cfg.model and merged.theory.beta == 3.0  # composed model, saved theory
    cfg = compose("sample", ["theory=su2_2d"])
    with pytest.raises(UsageError, match="checkpoint=.*theory=su2_2d is not on the field space the flow was trained"):
        restore_config(cfg, fake_ck, overrides=["theory=su2_2d"])
    # a pure-gauge U(1) flow proposes for the Schwinger model (the trivial baseline of fermion flows)
    cfg = compose("sample", ["theory=schwinger_2d"])
    merged, _ = restore_config(cfg, fake_ck, overrides=["theory=schwinger_2d"])
    assert merged.theory._target_ == "gaugeflow.theories.wilson_nf2_theory"
    cfg = compose("sample", ["theory=qcd_4d_nf2"])
    with pytest.raises(UsageError, match="theory=qcd_4d_nf2 is not on the field space"):
        restore_config(cfg, fake_ck, overrides=["theory=qcd_4d_nf2"])
    cfg = compose("sample", ["theory.name=other"])
    with pytest.raises(UsageError, match="theory.name=other differs from the run's theory.name=u1_2d"):
        restore_config(cfg, fake_ck, overrides=["theory.name=other"], mode="resume")
    with pytest.raises(UsageError, match=r"^resume=nowhere: no such checkpoint"):
        restore_config(cfg, "nowhere", "resume", overrides=[])
    save_checkpoint(tmp_path / "bare", 1, model={}, theory="u1_2d", config="")
    with pytest.raises(UsageError, match="records no training config"):
        restore_config(cfg, tmp_path / "bare", overrides=[])
    save_checkpoint(tmp_path / "bad", 1, model={}, theory="u1_2d", config="theory: {beta: [1, 2]}\nmodel: {}\n"
                    "lattice: {shape: [4, 4]}\n")
    with pytest.raises(UsageError, match="checkpoint="):
        restore_config(compose("sample"), tmp_path / "bad", overrides=[])


# --- the acceptance test -------------------------------------------------------------------------


@pytest.mark.physics
def test_train_then_sample_matches_exact_plaquette(tmp_path):
    """`gaugeflow train` (the embedded default, shortened to 60 steps to spare CI 40 seconds) then
    `gaugeflow sample`: the IMH plaquette agrees with the exact finite-volume value within 3 sigma
    of its Gamma-method error."""
    ok(gaugeflow("train", "train.steps=60", "seed=11", "hydra.run.dir=run", cwd=tmp_path))
    r = ok(gaugeflow("sample", "checkpoint=run", "sample.n=6000", "sample.batch_size=500", "seed=12",
                     "out=ens.h5", "hydra.run.dir=s", cwd=tmp_path))
    ens = read_ensemble(tmp_path / "ens.h5", load_fields=False)
    shape = [int(s) for s in ens.attrs["shape"]]
    want = exact.plaquette("u1", ens.attrs["beta"], tuple(shape))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    est = summary["plaquette"]
    assert abs(est["mean"] - want) < 3 * est["err"], (est, want, r.stdout)
    assert est["err"] < 0.01, est  # a meaningful error: the chain mixes
    # the same draws estimate log Z: log q is a density w.r.t. the normalised Haar measure
    log_z = exact.log_z("u1", ens.attrs["beta"], tuple(shape))
    assert abs(summary["log_z"] - log_z) < 3 * summary["log_z_err"], (summary["log_z"], log_z, r.stdout)
    # and the topological susceptibility <Q^2>/V of the geometric charge (character expansion)
    chi = summary["topological_susceptibility"]
    want = exact.u1_topological_susceptibility(ens.attrs["beta"], shape[0] * shape[1])
    assert chi["exact"] == pytest.approx(want) and 0 < chi["err"] < 0.1 * want, chi
    assert abs(chi["mean"] - want) < 3 * chi["err"], (chi, want, r.stdout)


# --- precision, time budget, SIGTERM, flow time, compression (issue 10) ----------------------------------


def sample_here(*overrides):
    """``gaugeflow sample`` in this process (composed like the command; summary.json goes to the cwd)."""
    from gaugeflow.cli.sample import run_sample

    return run_sample(compose("sample", overrides))


def merged_model(checkpoint, dtype):
    from gaugeflow.cli.build import theory_from_config
    from gaugeflow.cli.restore import restore_config, restore_model

    cfg, ck = restore_config(compose("sample"), str(checkpoint), overrides=[])
    theory = theory_from_config(cfg)
    return theory, restore_model(cfg, theory, ck, torch.device("cpu"), dtype=dtype)


def test_sample_dtype_float64_by_default_float32_halves_the_file(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [f"checkpoint={work / 'run'}", "sample=reweight", "sample.n=32", "sample.batch_size=16", "seed=3",
              "sample.progress=false"]
    sample_here(*common, "out=f64.h5")
    s32 = sample_here(*common, "sample.dtype=float32", "out=f32.h5")
    assert s32["model_dtype"] == "float32"
    with h5py.File("f64.h5") as f, h5py.File("f32.h5") as g:
        assert f["links"].dtype == np.complex128 and g["links"].dtype == np.complex64
        assert f.attrs["model_dtype"] == "float64" and g.attrs["model_dtype"] == "float32"
        assert f["links"].id.get_storage_size() == 2 * g["links"].id.get_storage_size()
        links64, log_q64 = torch.from_numpy(f["links"][()]), f["log_q"][()]
        links32, log_q32 = torch.from_numpy(g["links"][()]), g["log_q"][()]
        assert f["log_q"].dtype == g["log_q"].dtype == np.float64
    # the same weights evaluated in float64: the default's log q is exact, float32's is not
    _, model = merged_model(work / "run", torch.float64)
    with torch.no_grad():
        exact64 = model.log_prob(links64).numpy()
        exact32 = model.log_prob(links32.to(torch.complex128)).numpy()
    assert np.abs(exact64 - log_q64).max() < 1e-10
    err = np.abs(exact32 - log_q32).max()
    assert 1e-9 < err < 1e-3, err


def test_restore_in_float64_equals_building_in_float64(work):
    """Loading float32 weights into a model built in float64 (what sample and score do)."""
    from gaugeflow.cli.build import model_from_config
    from gaugeflow.cli.restore import restore_config

    theory, model = merged_model(work / "run", torch.float64)
    cfg, ck = restore_config(compose("sample"), str(work / "run"), overrides=[])
    ref = model_from_config(cfg, theory, torch.float64, torch.device("cpu"))
    ref.load_state_dict(ck.model)
    assert all(t.dtype in (torch.float64, torch.complex128) for t in [*model.parameters(), *model.buffers()]
               if t.is_floating_point() or t.is_complex())
    with torch.no_grad():
        a = model.sample(8, torch.Generator().manual_seed(0))
        b = ref.sample(8, torch.Generator().manual_seed(0))
    assert a[0].dtype == torch.complex128 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_max_time_ends_sampling_with_the_file_written(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = sample_here(f"checkpoint={work / 'run'}", "sample.n=64", "sample.batch_size=16", "seed=3",
                          "sample.max_time=0.001", "sample.progress=false", "out=short.h5")
    # the first batch always runs (a file with data); then the budget is spent
    ens = read_ensemble(tmp_path / "short.h5")
    assert ens.n_cfg == 16 and ens.attrs["stop_reason"] == "sample.max_time" and ens.attrs["n_proposals"] == 16
    assert ens.columns["accepted"].shape == (16,) and ens.attrs["n_cfg"] == 16
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == on_disk["stop_reason"] == "sample.max_time" and on_disk["n"] == 16
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("value,needle", [("abc", "sample.max_time must be seconds or HH:MM:SS"),
                                          ("-5", "sample.max_time must be positive")])
def test_bad_max_time(work, value, needle, tmp_path, monkeypatch):
    from gaugeflow.cli.common import UsageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=needle):
        sample_here(f"checkpoint={work / 'run'}", f"sample.max_time={value}", "out=x.h5")


def test_sigterm_ends_sampling_quickly_with_the_file_written(work):
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "gaugeflow.cli.main", "sample", "checkpoint=run", "sample.n=100000000",
                          "sample.batch_size=16", "out=term.h5", "hydra.run.dir=term"], cwd=work, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(work.glob(".term.h5.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # sampling, some batches in
        assert p.poll() is None, p.communicate()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, (out, err)
    assert elapsed < 30, elapsed
    ens = read_ensemble(work / "term.h5", load_fields=False)
    assert ens.n_cfg > 0 and ens.n_cfg % 16 == 0 and ens.attrs["stop_reason"] == "SIGTERM"
    assert json.loads((work / "term" / "summary.json").read_text())["stop_reason"] == "SIGTERM"
    assert "stopped by SIGTERM" in out and not list(work.glob(".term.h5.tmp-*"))


def test_flow_time_rule():
    from gaugeflow.cli.sample import sample_flow_time

    def cfg(mine, theirs="absent"):
        theory = {} if theirs == "absent" else {"default_flow_time": theirs}
        return OmegaConf.create({"sample": {"flow_time": mine}, "theory": theory})

    assert sample_flow_time(cfg(None)) == 0.0  # no key in the theory: the unflowed field
    assert sample_flow_time(cfg(None, 0.5)) == 0.5  # the theory's default
    assert sample_flow_time(cfg(None, None)) == 0.0
    assert sample_flow_time(cfg(0.25, 0.5)) == 0.25  # an explicit value wins


def test_flow_time_reaches_the_4d_charge(tmp_path, monkeypatch):
    """A (random-weight) 4d U(1) flow: sample.flow_time is the Wilson-flow time of the clover charge."""
    from gaugeflow.cli.build import model_from_config, theory_from_config

    # the checkpoint in the older `kind:` form; the job's config in today's
    saved = ("theory: {name: u1_4d, kind: gauge, group: u1, dim: 4, default_shape: [4, 4, 4, 4], beta: 1.0, "
             "action: wilson}\nlattice: {shape: [4, 4, 4, 4]}\n"
             "model: {kind: u1_equivariant, n_layers: 1, hidden: [4]}\ntrain: {dtype: float32}\n")
    sections = ("theory: {_target_: gaugeflow.theories.gauge_theory, name: u1_4d, group: u1, dim: 4, "
                "default_shape: [4, 4, 4, 4], beta: 1.0, action: wilson}\nlattice: {shape: [4, 4, 4, 4]}\n"
                "model: {_target_: gaugeflow.flows.models.u1_equivariant, n_layers: 1, hidden: [4]}\n")
    cfg = OmegaConf.merge(compose("sample"), OmegaConf.create(sections))
    theory = theory_from_config(cfg)
    torch.manual_seed(0)
    model = model_from_config(cfg, theory, torch.float32, torch.device("cpu"))
    save_checkpoint(tmp_path / "ck4", 1, model=model.state_dict(), theory="u1_4d", config=saved)
    monkeypatch.chdir(tmp_path)
    common = [f"checkpoint={tmp_path / 'ck4'}", "sample=reweight", "sample.n=4", "seed=2", "sample.progress=false"]
    sample_here(*common, "sample.flow_time=0", "out=t0.h5")
    sample_here(*common, "sample.flow_time=0.1", "out=t1.h5")
    a, b = read_ensemble(tmp_path / "t0.h5"), read_ensemble(tmp_path / "t1.h5")
    assert np.array_equal(a.fields, b.fields) and np.array_equal(a.columns["plaquette"], b.columns["plaquette"])
    assert a.attrs["flow_time"] == 0.0 and b.attrs["flow_time"] == 0.1
    q0, q1 = a.columns["topological_charge"], b.columns["topological_charge"]
    assert np.all(np.isfinite(q1)) and not np.allclose(q0, q1)
    # the theory's own measurement at that flow time, of the configurations as stored
    want = theory.measure(torch.from_numpy(b.fields), 0.1)["topological_charge"].double().numpy()
    assert np.allclose(q1, want, rtol=0, atol=1e-9)


def test_compression(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [f"checkpoint={work / 'run'}", "sample.n=32", "sample.batch_size=16", "seed=3", "sample.progress=false"]
    sample_here(*common, "out=plain.h5")
    sample_here(*common, "sample.compression=gzip", "out=gz.h5")
    with h5py.File(tmp_path / "plain.h5") as f, h5py.File(tmp_path / "gz.h5") as g:
        assert f["links"].compression is None and g["links"].compression == "gzip"
        assert np.array_equal(f["links"][()], g["links"][()]) and np.array_equal(f["log_q"][()], g["log_q"][()])
    from gaugeflow.cli.common import UsageError

    with pytest.raises(UsageError, match="sample.compression must be"):
        sample_here(*common, "sample.compression=zip", "out=bad.h5")
