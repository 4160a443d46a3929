"""``gaugeflow train``: checkpoints, bitwise resume, stop conditions, bad input."""

import csv
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from gaugeflow.io.checkpoint import load_checkpoint

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
SMALL = ["model=small", "model.n_layers=4", "model.hidden=[8]", "train.batch_size=16", "train.steps=12",
         "train.log_every=2", "train.checkpoint_every=4", "train.eval_samples=64", "seed=3"]


def gaugeflow(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def weights(path):
    with h5py.File(path) as f:
        return {k: f["model"][k][()] for k in f["model"]}


def test_train_writes_checkpoints_and_metrics(tmp_path):
    r = gaugeflow(*SMALL, "train.keep=2", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ESS (independent draws" in r.stdout and "log Z estimate" in r.stdout
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000008.h5", "step_00000012.h5"]  # keep=2
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 12 and ck.theory == "u1_2d" and "batch_size: 16" in ck.config
    with h5py.File(ck.path) as f:
        assert {"model", "optim", "sched", "rng"} <= set(f) and isinstance(f.attrs["gaugeflow_version"], str)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "free_energy", "ess", "var_log_w", "plaquette", "lr", "grad_norm", "seconds_per_step",
                "samples_per_second", "peak_memory_mb"):
        assert np.isfinite(float(rows[-1][key])), key


def test_resume_is_bitwise_identical(tmp_path):
    full = gaugeflow(*SMALL, "hydra.run.dir=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    part = gaugeflow(*SMALL, "train.stop_after=5", "hydra.run.dir=part", cwd=tmp_path)
    assert part.returncode == 0 and "stopped by train.stop_after" in part.stdout
    assert load_checkpoint(tmp_path / "part").step == 5
    resumed = gaugeflow(*SMALL, "resume=part", "hydra.run.dir=ignored", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = weights(tmp_path / "full" / "checkpoints" / "step_00000012.h5")
    b = weights(tmp_path / "part" / "checkpoints" / "step_00000012.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "part" / "metrics.csv"))]
    assert steps == [2, 4, 6, 8, 10, 12]  # the resumed run appends to the same history


def test_bad_input(tmp_path):
    for args, needle in [(["train.steps=0"], "train.steps"), (["loss=forward_kl"], "loss.ensemble"),
                         (["resume=nowhere.h5"], "resume=nowhere.h5"), (["model.kind=affine"], "model.kind=affine"),
                         (["sched.horizon=time"], "sched.horizon=time"), (["sched.horizon=walltime"], "sched.horizon")]:
        r = gaugeflow(*args, "hydra.run.dir=run", cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
        assert not (tmp_path / "run").exists()
    ok = gaugeflow(*SMALL, "hydra.run.dir=u1", cwd=tmp_path)
    assert ok.returncode == 0
    r = gaugeflow(*SMALL, "theory=su2_2d", "resume=u1", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2 and "theory 'u1_2d', not 'su2_2d'" in r.stderr


def test_optimizer_schedule_and_accumulation_from_the_command_line(tmp_path):
    r = gaugeflow(*SMALL, "optim=sgd", "sched=step", "sched.step_size=4", "sched.gamma=0.5", "sched.warmup_steps=2",
                  "train.micro_batch_size=8", "train.lr=0.01", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    # the lr each step trained with: warm-up 2 (steps 1, 2), then halving every 4 steps
    lrs = {int(row["step"]): float(row["lr"]) for row in rows}
    assert lrs[2] == 0.01 and lrs[6] == 0.01 and lrs[8] == 0.005 and lrs[10] == 0.005 and lrs[12] == 0.0025
    with h5py.File(load_checkpoint(tmp_path / "run").path) as f:
        assert "momentum_buffer" in str(list(f["optim"]["state"]["0"]))


def test_time_horizon_decays_the_cosine_within_max_time(tmp_path):
    # train.steps far beyond the budget (the default sched.horizon=auto with a max_time): the
    # cosine is planned for the steps that fit in train.max_time, so the lr has decayed to near
    # zero when the budget ends (the budget counts from the process start, imports included)
    r = gaugeflow(*SMALL, "train.steps=1000000", "train.max_time=12", "train.log_every=1",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0 and "stopped by train.max_time" in r.stdout, r.stderr
    lrs = [float(row["lr"]) for row in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    assert len(lrs) > 10 and lrs[0] == pytest.approx(5e-3, rel=1e-3)
    assert all(b <= a for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.1 * lrs[0]


def test_forward_kl_from_an_hmc_ensemble(tmp_path):
    hmc = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "hmc", "lattice.shape=[4,4]", "hmc.n_traj=20",
                          "hmc.n_therm=5", "out=ens.h5", "hydra.run.dir=h"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert hmc.returncode == 0, hmc.stderr
    r = gaugeflow(*SMALL, "lattice.shape=[4,4]", "loss=forward_kl", "loss.ensemble=ens.h5", "loss.n_therm=2",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    # the loss is E_p[-log q]; ESS and F_q come from fresh draws of q
    assert all(np.isfinite(float(row[k])) for row in rows for k in ("loss", "ess", "free_energy", "plaquette"))
    # (a missing file and another theory are the reader's and the shape check's errors, tested elsewhere)
    for args, needle in [(["loss.ensemble=ens.h5", "lattice.shape=[4,6]"], "lattice shape [4, 4], not [4, 6]"),
                         (["loss.ensemble=ens.h5", "lattice.shape=[4,4]", "theory.beta=1.5"], "ensemble has beta=1.0")]:
        bad = gaugeflow(*SMALL, "loss=forward_kl", *args, "hydra.run.dir=bad", cwd=tmp_path)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, bad.stderr)
        assert not (tmp_path / "bad").exists()


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    # a loss that turns NaN after four steps (as an overflowing action would): three skipped
    # steps in a row end the run, naming the last good checkpoint, which stays untouched
    (tmp_path / "nanloss.py").write_text(
        "import torch\n"
        "from gaugeflow.train.losses import ReverseKL\n"
        "class NaNAfter(ReverseKL):\n"
        "    calls = 0\n"
        "    def __call__(self, *a, **k):\n"
        "        out = super().__call__(*a, **k)\n"
        "        NaNAfter.calls += 1\n"
        "        if NaNAfter.calls > 4:\n"
        "            out.loss = out.loss * float('nan')\n"
        "        return out\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", *SMALL, "loss._target_=nanloss.NaNAfter",
                        "train.max_nonfinite=3", "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    good = tmp_path / "run" / "checkpoints" / "step_00000004.h5"
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "training stopped at step 7" in lines[0] and "3 consecutive steps with a non-finite loss" in lines[0]
    assert "run/checkpoints/step_00000004.h5" in lines[0]
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]


@pytest.mark.parametrize("preset", ["kanwar2020_u1", "boyda2020_su3", "su3_4d_4444"])
def test_experiment_presets_train_a_few_steps(tmp_path, preset):
    r = gaugeflow(f"experiment={preset}", "train.steps=2", "train.batch_size=2", "train.log_every=1",
                  "train.eval_samples=4", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(row["step"]) for row in rows] == [1, 2] and np.isfinite(float(rows[-1]["loss"]))
    assert load_checkpoint(tmp_path / "run").step == 2


def test_wandb_logger_offline_without_network(tmp_path):
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path),
           "WANDB_CONFIG_DIR": str(tmp_path / "wcfg"), "WANDB_CACHE_DIR": str(tmp_path / "wcache")}
    env.pop("PYTEST_CURRENT_TEST", None)
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", *SMALL, "logger=wandb",
                        "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), list((tmp_path / "run").rglob("*"))
    assert (tmp_path / "run" / "wandb_id.txt").is_file()
    assert {p.name for p in (tmp_path / "run" / "plots").iterdir()} >= {"training_loss.png", "training_ess.png"}


def test_resume_takes_the_run_configuration_from_the_checkpoint(tmp_path):
    first = gaugeflow(*SMALL, "train.steps=20", "train.stop_after=4", "theory.beta=1.7", "lattice.shape=[4,6]",
                      "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # nothing repeated: steps, beta, lattice and model come from the checkpoint
    r = gaugeflow("train.stop_after=2", "resume=run", "hydra.run.dir=other", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 6 and "beta: 1.7" in ck.config and "steps: 20" in ck.config
    assert "shape=[4, 6]" in r.stdout and not (tmp_path / "other" / "checkpoints").exists()
    # an explicit key applies on top
    r = gaugeflow("train.stop_after=2", "train.lr=0.001", "resume=run", "hydra.run.dir=other", cwd=tmp_path)
    assert r.returncode == 0 and "lr: 0.001" in load_checkpoint(tmp_path / "run").config


@pytest.mark.slow  # sweeps are also run by test_cli.py::test_multirun_sweep
def test_multirun_sweep(tmp_path):
    r = gaugeflow("-m", *SMALL, "train.steps=2", "theory.beta=1.0,2.0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    betas = sorted(float(load_checkpoint(tmp_path / "sweep" / str(i)).config.split("beta: ")[1].split()[0])
                   for i in (0, 1))
    assert betas == [1.0, 2.0]


def test_sigterm_then_resume_is_bitwise_identical(tmp_path):
    import signal
    import time

    args = [*SMALL, "train.steps=200", "train.log_every=1", "train.checkpoint_every=1000"]
    full = gaugeflow(*args, "hydra.run.dir=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, "-m", "gaugeflow.cli.main", "train", *args, "hydra.run.dir=part"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "part" / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as a batch system does before the kill
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM" in stdout, stderr
    assert "evaluation: skipped (SIGTERM)" in stdout and "ESS (independent" not in stdout  # within the grace
    stopped = load_checkpoint(tmp_path / "part").step
    assert 0 < stopped < 200
    resumed = gaugeflow("resume=part", "hydra.run.dir=ignored", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = weights(tmp_path / "full" / "checkpoints" / "step_00000200.h5")
    b = weights(tmp_path / "part" / "checkpoints" / "step_00000200.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)
