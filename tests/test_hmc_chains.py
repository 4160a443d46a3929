"""Many HMC chains at once (``hmc.chains``), ``hmc.measure_every``, and the readers of multi-chain files.

The layout under test: rows of one trajectory of every chain follow each other (``chain`` =
0, 1, ..., C-1, then again), with the per-configuration datasets ``chain`` and ``trajectory``
beside them; a file of one chain has neither and is the file the single-chain job always wrote.
"""

import math

import h5py
import numpy as np
import pytest
import torch
from gaugeflow import exact
from gaugeflow.components import build_theory
from gaugeflow.io.ensemble import EnsembleWriter, read_chain_state, read_ensemble
from gaugeflow.sampling.hmc import HMC, chain_generators, chain_seed
from gaugeflow.sampling.statistics import Estimate, gamma_method, replicas

U1 = dict(name="u1_2d", _target_="gaugeflow.theories.gauge_theory", group="u1", dim=2, beta=2.0)
SU2 = dict(name="su2_2d", _target_="gaugeflow.theories.gauge_theory", group="su2", dim=2, beta=2.0)
PHI4 = dict(name="phi4_2d", _target_="gaugeflow.theories.phi4_theory", m2=-4.0, lam=8.0)
#: every dataset a file holds besides the configurations and the chain state
COLUMNS = ("action", "accepted", "delta_h", "log_p")


def hmc_config(*overrides: str):
    from gaugeflow.cli.common import CONFIG_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("hmc", overrides=["hmc.progress=false", *overrides])


def run_job(*overrides: str) -> dict:
    from gaugeflow.cli.hmc import run_hmc

    return run_hmc(hmc_config(*overrides))


def analyze(path, tmp_path, **kw):
    from gaugeflow.cli.analyze import AnalyzeJob, run_analyze
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(AnalyzeJob), {"ensemble": str(path), "plots": False, **kw})
    return run_analyze(cfg, tmp_path / "analysis")["summary"]


def datasets(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


# ---------------------------------------------------------------------------- the sampler


def test_chain_seeds():
    assert chain_seed(7, 0) == 7  # one chain is the single-chain run
    seeds = {chain_seed(s, c) for s in (0, 1, 7) for c in range(1, 50)}
    assert len(seeds) == 3 * 49 and all(0 <= x < 2 ** 63 for x in seeds)
    assert chain_seed(-3, 2) >= 0
    a, b = chain_generators(5, 3), chain_generators(5, 8)
    for g, h in zip(a, b):  # chain c's stream does not depend on the number of chains
        assert torch.equal(g.get_state(), h.get_state())


@pytest.mark.parametrize("cfg", [U1, SU2, PHI4])
def test_each_chain_of_a_batch_is_the_chain_run_alone(cfg):
    # per-chain generators: chain c of a batch draws exactly what a batch of one with its
    # generator draws, so its trajectory is that chain's (up to the batch's rounding)
    theory = build_theory(cfg, [4, 4])
    gens = chain_generators(3, 3)
    batch = HMC(theory, 4, 0.8, "omelyan", generator=gens)
    x = torch.cat([theory.start(1, "hot", g) for g in gens])
    alone = []
    for c in range(3):
        g = chain_generators(3, 3)[c]
        y, one = theory.start(1, "hot", g), HMC(theory, 4, 0.8, "omelyan", generator=g)
        steps = []
        for _ in range(4):
            steps.append(one.trajectory(y))
            y = steps[-1].fields
        alone.append(steps)
    for t in range(4):
        res = batch.trajectory(x)
        x = res.fields
        for c in range(3):
            ref = alone[c][t]
            assert torch.equal(res.accepted[c:c + 1], ref.accepted)
            assert torch.allclose(res.delta_h[c:c + 1], ref.delta_h, rtol=0, atol=1e-9)
            assert (res.fields[c:c + 1] - ref.fields).abs().max() < 1e-12
    assert not torch.equal(x[0], x[1])  # independent chains
    with pytest.raises(ValueError, match="3 generators for a batch of 2 chains"):
        batch.trajectory(x[:2])


# ---------------------------------------------------------------------------- the job, one chain


def test_one_chain_is_the_single_chain_job(tmp_path, capsys):
    # the chain the job wrote before hmc.chains existed: one generator seeded with `seed`, a hot
    # start of a batch of one, every save_every-th trajectory written. Reproduced by hand here
    # (bit for bit), and against values the unmodified job wrote for this run (to rounding).
    out = tmp_path / "one.h5"
    run_job("theory=u1_2d", "lattice.shape=[6,6]", "hmc.n_traj=7", "hmc.n_therm=3", "hmc.save_every=2", "seed=4",
            f"out={out}")
    data = datasets(out)
    assert "chain" not in data and "trajectory" not in data  # a file of one chain: today's layout
    assert {"links", "plaquette", "topological_charge", *COLUMNS} <= set(data)
    assert data["chain_state/rng_state"].shape == (5056,)
    cfg = hmc_config("theory=u1_2d", "lattice.shape=[6,6]", "out=x.h5")
    theory = build_theory({**cfg.theory, "beta": float(cfg.theory.beta)}, [6, 6])
    g = torch.Generator().manual_seed(4)
    hmc = HMC(theory, cfg.hmc.n_steps, cfg.hmc.traj_length, cfg.hmc.integrator, "analytic", g)
    x = theory.start(1, "hot", g)
    kept = []
    for i in range(10):
        res = hmc.trajectory(x)
        x = res.fields
        if i >= 3 and (i - 2) % 2 == 0:
            kept.append(res)
    assert np.array_equal(data["links"], torch.cat([r.fields for r in kept]).numpy())
    assert np.array_equal(data["action"], torch.cat([r.action for r in kept]).numpy())
    assert np.array_equal(data["delta_h"], torch.cat([r.delta_h for r in kept]).numpy())
    assert np.array_equal(data["chain_state/fields"], x.numpy())
    assert np.array_equal(data["chain_state/rng_state"], g.get_state().numpy())
    # written by the job before this change (same command): the same chain
    assert np.allclose(data["action"], [-13.879222926146765, -20.115257171309977, -17.694651040726], rtol=0,
                       atol=1e-9)
    out = tmp_path / "phi.h5"
    run_job("theory=phi4_2d", "lattice.shape=[4,4]", "hmc.n_traj=5", "hmc.n_therm=2", "seed=5", f"out={out}")
    assert np.allclose(datasets(out)["action"], [-0.5930843951539067, -3.1744685260425016, 2.272322111526,
                                                 3.6391287582858483, 1.6454464596187286], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------- the job, many chains


def test_many_chains_layout_and_reproducibility(tmp_path, capsys):
    common = ["theory=su2_2d", "lattice.shape=[4,4]", "hmc.n_traj=6", "hmc.n_therm=2", "hmc.save_every=2", "seed=3"]
    a, b, one = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "one.h5"
    summary = run_job(*common, "hmc.chains=4", f"out={a}")
    run_job(*common, "hmc.chains=4", f"out={b}")
    run_job(*common, f"out={one}")
    assert "4 chains (replicas) x 6 trajectories after 2 thermalization" in capsys.readouterr().out
    da, db, d1 = datasets(a), datasets(b), datasets(one)
    assert set(da) == set(db) and all(np.array_equal(da[k], db[k]) for k in da)  # same seed and C: same file
    assert da["links"].shape == (12, 2, 4, 4, 2, 2)
    assert da["chain"].tolist() == [0, 1, 2, 3] * 3
    assert da["trajectory"].tolist() == [2] * 4 + [4] * 4 + [6] * 4
    for k in ("plaquette", *COLUMNS):
        assert da[k].shape == (12,), k
    assert da["chain_state/fields"].shape == (4, 2, 4, 4, 2, 2) and da["chain_state/rng_state"].shape == (4, 5056)
    ens = read_ensemble(a)
    assert ens.n_chains == 4 and ens.chain_lengths() == [3, 3, 3, 3]
    assert ens.attrs["chains"] == 4 and ens.attrs["n_traj"] == 6 and ens.attrs["n_cfg"] == 12
    # independent chains: different starts, different histories
    first = da["links"][:4].reshape(4, -1)
    assert all(not np.allclose(first[i], first[j]) for i in range(4) for j in range(i))
    # chain 0 is the single-chain run with the same seed (to the batch's rounding)
    assert np.abs(da["links"][da["chain"] == 0] - d1["links"]).max() < 1e-12
    assert np.array_equal(da["accepted"][da["chain"] == 0], d1["accepted"])
    assert summary["plaquette"]["replicas"] == 4 and summary["accepted"]["replicas"] == 4
    # the summary is the Gamma method with the chains as replicas
    reps = [da["plaquette"][da["chain"] == c] for c in range(4)]
    assert summary["plaquette"]["mean"] == pytest.approx(np.mean(reps))


def test_stop_and_continue_many_chains_equals_one_run(tmp_path, capsys, monkeypatch):
    import gaugeflow.cli.hmc as job
    from gaugeflow.cli.common import UsageError

    common = ["theory=u1_2d", "lattice.shape=[4,4]", "hmc.chains=3", "hmc.save_every=2", "hmc.measure_every=2",
              "hmc.compression=lzf"]
    full, first, second = tmp_path / "full.h5", tmp_path / "first.h5", tmp_path / "second.h5"
    run_job(*common, "seed=3", "hmc.n_therm=2", "hmc.n_traj=9", f"out={full}")

    class Clock:  # one second per reading: hmc.max_time=7 stops after 7 trajectories
        t = 0.0

        def monotonic(self):
            self.t += 1.0
            return self.t

    with monkeypatch.context() as m:
        m.setattr(job, "time", Clock())
        run_job(*common, "seed=3", "hmc.n_therm=2", "hmc.n_traj=9", "hmc.max_time=7", f"out={first}")
    b = read_ensemble(first)
    assert b.attrs["stop_reason"] == "hmc.max_time" and b.attrs["n_traj"] == 5
    assert b.chain_lengths() == [2, 2, 2]  # trajectories 2 and 4 of every chain: equal lengths
    run_job(*common, "seed=99", "hmc.n_therm=0", "hmc.n_traj=4", f"hmc.continue_from={first}", f"out={second}")
    a, c = read_ensemble(full), read_ensemble(second)
    assert a.n_cfg == b.n_cfg + c.n_cfg == 12
    assert np.array_equal(a.fields, np.concatenate([b.fields, c.fields]))
    for key in a.columns:
        assert np.array_equal(a.columns[key], np.concatenate([b.columns[key], c.columns[key]]), equal_nan=True), key
    # measure_every keeps its phase across the continuation: the charge on trajectories 4 and 8
    assert np.isnan(a.columns["topological_charge"][a.columns["trajectory"] % 4 != 0]).all()
    assert not np.isnan(a.columns["topological_charge"][a.columns["trajectory"] % 4 == 0]).any()
    sa, sc = read_chain_state(full), read_chain_state(second)
    assert np.array_equal(sa.fields, sc.fields) and np.array_equal(sa.rng_state, sc.rng_state)
    # another number of chains: one line naming hmc.chains
    with pytest.raises(UsageError) as info:
        run_job(*common, "hmc.chains=2", f"hmc.continue_from={full}", f"out={tmp_path / 'x.h5'}")
    msg = str(info.value)
    assert "ensemble of 3 chains, this run has hmc.chains=2 (to continue it, pass hmc.chains=3)" in msg
    assert "\n" not in msg and not (tmp_path / "x.h5").exists()


def test_measure_every_leaves_nan_rows_the_summary_skips(tmp_path, capsys):
    out = tmp_path / "m.h5"
    summary = run_job("theory=u1_2d", "lattice.shape=[6,6]", "hmc.chains=2", "hmc.n_traj=30", "hmc.n_therm=0",
                      "hmc.measure_every=3", "seed=2", f"out={out}")
    ens = read_ensemble(out)
    q, traj = ens.columns["topological_charge"], ens.columns["trajectory"]
    assert np.isnan(q[traj % 3 != 0]).all() and np.isfinite(q[traj % 3 == 0]).all()
    assert np.isfinite(ens.columns["plaquette"]).all()  # cheap: every stored configuration
    assert ens.attrs["measure_every"] == 3
    want = gamma_method([q[(ens.chain == c) & (traj % 3 == 0)] for c in range(2)])
    got = summary["topological_charge"]
    assert math.isfinite(got["mean"]) and got["mean"] == pytest.approx(want.mean) and got["err"] == pytest.approx(want.err)
    q2 = summary["topological_charge_squared"]
    assert q2["mean"] == pytest.approx(np.nanmean(q ** 2))
    # analyze skips the same rows and agrees with the job's summary
    s = analyze(out, tmp_path)
    for key in ("topological_charge", "topological_susceptibility", "plaquette", "acceptance"):
        mine = summary["accepted" if key == "acceptance" else key]
        assert s[key]["mean"] == pytest.approx(mine["mean"]) and s[key]["err"] == pytest.approx(mine["err"]), key
    # a phi^4 field has only cheap measurements: no NaN rows
    out = tmp_path / "p.h5"
    run_job("theory=phi4_2d", "lattice.shape=[4,4]", "hmc.n_traj=4", "hmc.measure_every=2", f"out={out}")
    assert all(np.isfinite(v).all() for v in read_ensemble(out).columns.values())


def test_u1_plaquette_and_susceptibility_with_chains_as_replicas(tmp_path, capsys):
    beta, vol = 2.0, 64
    s = run_job("theory=u1_2d", f"theory.beta={beta}", "lattice.shape=[8,8]", "hmc.chains=4", "hmc.n_traj=400",
                "hmc.n_therm=30", "seed=7", f"out={tmp_path / 'u1.h5'}")
    plaq, chi = s["plaquette"], s["topological_susceptibility"]
    assert 0 < plaq["err"] < 0.01 and plaq["replicas"] == 4
    assert abs(plaq["mean"] - exact.u1_plaquette(beta, vol)) < 3 * plaq["err"], plaq
    assert abs(chi["mean"] - exact.u1_topological_susceptibility(beta, vol)) < 3 * chi["err"], chi
    assert abs(s["exp_minus_delta_h"]["mean"] - 1) < 3 * s["exp_minus_delta_h"]["err"]


def test_phi4_known_values_with_chains_as_replicas(tmp_path, capsys):
    # free field (lam = 0): <phi^2> exactly; the step keeps omega tau away from resonance
    shape, m2 = [4, 6], 0.5
    s = run_job("theory=phi4_2d", f"theory.m2={m2}", "theory.lam=0.0", f"lattice.shape=[{shape[0]},{shape[1]}]",
                "hmc.chains=4", "hmc.n_steps=6", "hmc.traj_length=0.45", "hmc.n_traj=300", "hmc.n_therm=40",
                "hmc.start=cold", "seed=3", f"out={tmp_path / 'free.h5'}")
    ks = np.meshgrid(*[2 * np.pi * np.arange(n) / n for n in shape], indexing="ij")
    want = float(np.mean(1 / (2 * (sum(4 * np.sin(k / 2) ** 2 for k in ks) + m2))))
    assert abs(s["phi2"]["mean"] - want) < 3 * s["phi2"]["err"], (s["phi2"], want)
    # interacting: the Schwinger-Dyson identity 2<S>/V + 2 lam <phi^4> = 1 (reference/EXACT.md §3)
    out = tmp_path / "int.h5"
    run_job("theory=phi4_2d", "lattice.shape=[8,8]", "hmc.chains=4", "hmc.n_traj=300", "hmc.n_therm=60", "seed=9",
            f"out={out}")
    ens = read_ensemble(out, load_fields=False)
    sd = 2 * ens.columns["action"] / 64 + 2 * 8.0 * ens.columns["phi4"]
    est = gamma_method(replicas(sd, ens.chain))
    assert est.replicas == 4 and abs(est.mean - 1) < 3 * est.err, est


# ---------------------------------------------------------------------------- readers


def two_chains(path, c0, c1, interleaved=True):
    """A 2-chain phi^4-shaped file (2x2 zero fields) with the series c0, c1 as ``plaquette``."""
    n = len(c0)
    if interleaved:
        chain, values = np.tile([0, 1], n), np.stack([c0, c1], 1).reshape(-1)
    else:
        chain, values = np.repeat([0, 1], n), np.concatenate([c0, c1])
    attrs = {"theory": "phi4_2d", "kind": "scalar", "group": "none", "shape": [2, 2], "m2": -4.0, "lam": 8.0,
             "sampler": "hmc"}
    with EnsembleWriter(path, "phi", (2, 2), torch.float64, attrs) as w:
        w.append(torch.zeros(2 * n, 2, 2, dtype=torch.float64), chain=chain, plaquette=values)
    return path


def ar1(n, a, rng):
    x = np.empty(n)
    x[0] = rng.normal()
    for i in range(1, n):
        x[i] = a * x[i - 1] + rng.normal() * math.sqrt(1 - a * a)
    return x


def test_analyze_treats_chains_as_replicas(tmp_path, capsys):
    rng = np.random.default_rng(5)
    c0, c1 = ar1(2000, 0.6, rng), ar1(2000, 0.6, rng)
    inter = analyze(two_chains(tmp_path / "i.h5", c0, c1), tmp_path)
    concat = analyze(two_chains(tmp_path / "c.h5", c0, c1, interleaved=False), tmp_path)
    want = gamma_method([c0, c1])
    # the layout does not matter, only the chain dataset: both are the replica analysis
    for s in (inter, concat):
        assert s["plaquette"]["mean"] == pytest.approx(want.mean)
        assert s["plaquette"]["err"] == pytest.approx(want.err) and s["plaquette"]["tau_int"] == pytest.approx(want.tau_int)
        assert s["_meta"]["chains"] == 2 and s["_meta"]["n_used"] == 4000
    assert "4000 configurations of 2 chains after n_therm=0 per chain" in capsys.readouterr().out
    # a copy of a chain passes for an independent replica (the file says so): the error of one
    # chain over sqrt(2); read as one interleaved series it would see the repeated rows instead
    copy = analyze(two_chains(tmp_path / "copy.h5", c0, c0.copy()), tmp_path)
    one = gamma_method(c0)
    assert copy["plaquette"]["err"] == pytest.approx(one.err / math.sqrt(2), rel=0.05)  # (windows differ a little)
    assert gamma_method(np.repeat(c0, 2)).err > 1.3 * copy["plaquette"]["err"]


def test_n_therm_is_per_chain(tmp_path, capsys):
    out = tmp_path / "t.h5"
    run_job("theory=u1_2d", "lattice.shape=[4,4]", "hmc.chains=3", "hmc.n_traj=8", "hmc.n_therm=0", f"out={out}")
    ens = read_ensemble(out)
    cut = ens.drop_therm(3)
    assert cut.n_cfg == 15 and cut.chain_lengths() == [5, 5, 5]
    assert cut.columns["trajectory"].min() == 4 and np.array_equal(cut.fields, ens.fields[9:])
    s = analyze(out, tmp_path, n_therm=3)
    assert s["_meta"]["n_used"] == 15 and s["_meta"]["n_therm"] == 3 and s["_meta"]["chains"] == 3
    plaq = ens.columns["plaquette"][ens.columns["trajectory"] > 3]
    assert s["plaquette"]["mean"] == pytest.approx(plaq.mean())
    from gaugeflow.cli.common import UsageError

    with pytest.raises(UsageError, match="n_therm=8 .per chain. leaves none of the 8 configurations of the shortest"):
        analyze(out, tmp_path, n_therm=8)
    # the forward KL's training data: the first n_therm trajectories of each chain dropped
    from gaugeflow.train.losses import ForwardKL

    theory = build_theory(dict(U1, beta=float(ens.attrs["beta"])), [4, 4])
    loss = ForwardKL(str(out), n_therm=3)
    loss.bind(theory, torch.device("cpu"), torch.float64)
    assert torch.equal(loss.data, torch.from_numpy(ens.fields[ens.columns["trajectory"] > 3]))


def test_replicas_helper():
    x = np.array([1.0, 10.0, np.nan, 20.0, 3.0, np.nan])
    chain = np.array([0, 1, 0, 1, 0, 1])
    assert [r.tolist() for r in replicas(x, chain)] == [[1.0, 3.0], [10.0, 20.0]]
    assert [r.tolist() for r in replicas(x, None)] == [[1.0, 10.0, 20.0, 3.0]]
    assert np.isnan(replicas(x, chain, skip_nan=False)[0]).any()
    assert gamma_method([np.ones(3), np.ones(4)]) == Estimate(1.0, 0.0, 0.5, 0.0, 2)
    assert math.isnan(gamma_method([np.arange(3.0), np.arange(9.0)]).tau_int)  # a replica too short
    assert math.isnan(gamma_method(replicas([np.nan, np.nan], None)).mean)
    # one replica is the series itself
    s = np.random.default_rng(1).normal(size=50)
    assert gamma_method([s]) == gamma_method(s)
