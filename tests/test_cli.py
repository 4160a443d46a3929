"""The ``gaugeflow`` command as users and job scripts run it (subprocesses)."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from gaugeflow.io import read_ensemble

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def gaugeflow(*args, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "gaugeflow.cli.main", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=timeout,
    )


def test_no_job_prints_usage(tmp_path):
    r = gaugeflow(cwd=tmp_path)
    assert r.returncode == 2 and "usage: gaugeflow" in r.stdout
    r = gaugeflow("nosuch", cwd=tmp_path)
    assert r.returncode == 2 and "unknown job 'nosuch'" in r.stderr


def test_hmc_writes_ensemble(tmp_path):
    out = tmp_path / "su2.h5"
    r = gaugeflow("hmc", "theory=su2_2d", "lattice.shape=[4,6]", "hmc.n_traj=6", "hmc.n_therm=2",
                  "hmc.save_every=2", "seed=5", f"out={out}", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "acceptance" in r.stdout and "plaquette" in r.stdout and "exact" in r.stdout
    assert "<exp(-dH)>" in r.stdout and "tau_int" in r.stdout
    ens = read_ensemble(out)
    assert ens.n_cfg == 3 and ens.fields.shape == (3, 2, 4, 6, 2, 2) and ens.fields.dtype == np.complex128
    for key in ("action", "plaquette", "accepted", "log_p", "delta_h"):
        assert ens.columns[key].shape == (3,)
    assert np.allclose(ens.columns["log_p"], -ens.columns["action"])
    with h5py.File(out) as f:
        attrs = dict(f.attrs)
    assert attrs["theory"] == "su2_2d" and attrs["group"] == "SU(2)" and attrs["beta"] == 2.0
    assert list(attrs["shape"]) == [4, 6] and attrs["seed"] == 5
    assert "n_traj: 6" in attrs["config"]
    assert {"gaugeflow_version", "git_sha", "created"} <= set(attrs)
    # the same seed reproduces the chain
    out2 = tmp_path / "again.h5"
    gaugeflow("hmc", "theory=su2_2d", "lattice.shape=[4,6]", "hmc.n_traj=6", "hmc.n_therm=2",
              "hmc.save_every=2", "seed=5", f"out={out2}", "hydra.run.dir=run2", cwd=tmp_path)
    assert np.array_equal(read_ensemble(out2).fields, ens.fields)


def test_phi4_and_continue_chain(tmp_path):
    first = tmp_path / "a.h5"
    r = gaugeflow("hmc", "theory=phi4_2d", "hmc.n_traj=3", "hmc.n_therm=0", f"out={first}", "hydra.run.dir=r1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = read_ensemble(first)
    assert a.field_name == "phi" and a.fields.shape == (3, 8, 8) and a.fields.dtype == np.float64
    second = tmp_path / "b.h5"
    r = gaugeflow("hmc", "theory=phi4_2d", "hmc.n_traj=2", "hmc.n_therm=0", "hmc.n_steps=1",
                  "hmc.traj_length=1e-9", f"hmc.continue_from={first}", f"out={second}", "hydra.run.dir=r2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    b = read_ensemble(second)
    # a vanishing trajectory leaves the configuration where the first file ended
    assert np.abs(b.fields[0] - a.fields[-1]).max() < 1e-6
    assert b.attrs["continued_from"] == str(first)


def test_max_time_ends_cleanly(tmp_path):
    out = tmp_path / "t.h5"
    r = gaugeflow("hmc", "theory=su3_4d", "hmc.n_traj=100000", "hmc.n_therm=0", "hmc.max_time=00:00:02",
                  f"out={out}", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stopped by hmc.max_time" in r.stdout
    ens = read_ensemble(out)
    assert 0 < ens.n_cfg < 100000 and ens.attrs["stop_reason"] == "hmc.max_time"


def test_sigterm_ends_cleanly(tmp_path):
    out = tmp_path / "s.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gaugeflow.cli.main", "hmc", "theory=su3_4d", "hmc.n_traj=100000", "hmc.n_therm=0",
         f"out={out}", "hydra.run.dir=run"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # wait until the chain is running: the temporary file appears once the job started
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".s.h5.tmp") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    assert read_ensemble(out).attrs["stop_reason"] == "SIGTERM"
    assert not any(p.name.startswith(".s.h5.tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "args,needle",
    [
        (["lattice.shape=[0,8]"], "lattice.shape"),
        (["lattice.shape=[8,8,8]"], "lattice.shape=[8, 8, 8] has 3 extents"),
        (["hmc.n_traj=-1"], "hmc.n_traj must be >= 0"),
        (["hmc.chains=0"], "hmc.chains must be >= 1"),
        (["hmc.measure_every=0"], "hmc.measure_every must be >= 1"),
        (["hmc.max_time=soon"], "hmc.max_time"),
        (["hmc.integrator=euler"], "hmc.integrator"),
        (["hmc.continue_from=missing.h5"], "missing.h5: no such ensemble file"),
        (["theory.action=luscher"], "theory.action"),
        (["theory.beta=nan"], "theory.beta must be finite"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    r = gaugeflow("hmc", *args, "out=o.h5", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "run").exists()


def test_continue_from_other_theory(tmp_path):
    out = tmp_path / "u1.h5"
    gaugeflow("hmc", "hmc.n_traj=1", "hmc.n_therm=0", f"out={out}", "hydra.run.dir=r1", cwd=tmp_path)
    r = gaugeflow("hmc", "theory=su2_2d", f"hmc.continue_from={out}", "out=o.h5", "hydra.run.dir=r2", cwd=tmp_path)
    assert r.returncode == 2 and "theory 'u1_2d', not 'su2_2d'" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["theory=nosuch"], "Available options in 'theory'"),
        (["hmc.n_trj=5"], "n_trj"),
        (["hmc.n_traj=many"], "hmc.n_traj"),
    ],
)
def test_hydra_errors_are_short(tmp_path, args, needle):
    r = gaugeflow("hmc", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_multirun_sweep(tmp_path):
    r = gaugeflow("hmc", "-m", "theory.beta=1.0,3.0", "hmc.n_traj=2", "hmc.n_therm=0", "out=ens.h5",
                  "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # out is relative to the working directory: use the job's output dir for sweeps
    r = gaugeflow("hmc", "-m", "theory.beta=1.0,3.0", "hmc.n_traj=2", "hmc.n_therm=0",
                  "hydra.sweep.dir=sweep2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    betas = sorted(read_ensemble(tmp_path / "sweep2" / str(i) / "ensemble.h5").attrs["beta"] for i in (0, 1))
    assert betas == [1.0, 3.0]


def test_a_peer_failure_is_one_line_exit_1(capsys):
    # a rank that died mid-run (raised by the collectives' guard) ends every job the same way
    from gaugeflow.cli.common import guarded
    from gaugeflow.distributed import PeerFailure

    def job(cfg):
        raise PeerFailure("rank 0 of 2: all_reduce failed after 0.3 s: rank 1 did not report within 30 s (exited "
                          "or hung)\nsecond line", [1])

    with pytest.raises(SystemExit) as exit_:
        guarded(job)(None)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err == ["error: rank 0 of 2: all_reduce failed after 0.3 s: rank 1 did not "
                                             "report within 30 s (exited or hung)"]
