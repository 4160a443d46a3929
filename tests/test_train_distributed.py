"""``gaugeflow train`` on several CPU processes (gloo), started by the test as a launcher would."""

import csv
import os
import subprocess
import sys

import h5py
import numpy as np

from gaugeflow.io.checkpoint import load_checkpoint
from torch.distributed.elastic.utils.distributed import get_free_port

SMALL = ["model=small", "model.n_layers=4", "model.hidden=[8]", "train.batch_size=16", "train.steps=8",
         "train.log_every=2", "train.checkpoint_every=4", "train.eval_samples=32", "seed=3", "lattice.shape=[4,4]",
         "dist.device=cpu", "dist.timeout_s=60"]


def launch(n, *args, cwd, job="train"):
    """Start ``n`` ranks with torchrun's variables; returns their CompletedProcess-like results."""
    port = str(get_free_port())
    procs = []
    for r in range(n):
        env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
               "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "gaugeflow.cli.main", job, *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        out.append((p.returncode, so, se))
    return out


def weights(path):
    with h5py.File(path) as f:
        return {k: f["model"][k][()] for k in f["model"]}


def test_data_parallel_run_and_bitwise_resume(tmp_path):
    full = launch(2, *SMALL, "dist=ddp", "hydra.run.dir=full", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in full), [se for _, _, se in full]
    (_, out0, _), (_, out1, _) = full
    assert "on 2 ranks (2 replicas x 1 lattice blocks)" in out0 and "ESS" in out0
    assert out1 == ""  # only rank 0 reports
    ck = load_checkpoint(tmp_path / "full")
    assert ck.step == 8 and {"sampler", "sampler_rank1"} <= set(ck.rng)
    assert not np.array_equal(ck.rng["sampler"], ck.rng["sampler_rank1"])  # independent streams per rank
    rows = list(csv.DictReader(open(tmp_path / "full" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]  # one writer

    part = launch(2, *SMALL, "dist=ddp", "train.stop_after=3", "hydra.run.dir=part", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in part), [se for _, _, se in part]
    resumed = launch(2, *SMALL, "dist=ddp", "resume=part", "hydra.run.dir=ignored", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in resumed), [se for _, _, se in resumed]
    a = weights(tmp_path / "full" / "checkpoints" / "step_00000008.h5")
    b = weights(tmp_path / "part" / "checkpoints" / "step_00000008.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_domain_decomposed_training(tmp_path):
    # with a budget the schedule is re-planned every step by rank 0's clock (a broadcast that
    # every rank must join, or the run would hang)
    r = launch(2, *SMALL, "dist=ddp", "dist.lattice_grid=[2,1]", "train.max_time=120", "hydra.run.dir=grid",
               cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in r), [se for _, _, se in r]
    assert "shape=[4, 4] on 2 ranks (1 replicas x 2 lattice blocks)" in r[0][1]
    rows = list(csv.DictReader(open(tmp_path / "grid" / "metrics.csv")))
    assert all(np.isfinite(float(row[k])) for row in rows for k in ("loss", "ess", "plaquette"))
    # the plaquette of whole configurations lies in [-1, 1]: the blocks were summed, not averaged twice
    assert all(-1 <= float(row["plaquette"]) <= 1 for row in rows)


def test_layout_errors_are_one_line(tmp_path):
    r = launch(2, *SMALL, "dist=ddp", "dist.lattice_grid=[3,1]", "hydra.run.dir=bad", cwd=tmp_path)
    for rc, _, se in r:
        lines = se.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "dist.lattice_grid" in lines[0], se
    r = launch(2, *SMALL, "hydra.run.dir=bad2", cwd=tmp_path)  # two ranks but dist=none
    assert all(rc == 2 and "dist.strategy=none" in se for rc, _, se in r), r


def test_fsdp_sharded_checkpoints_resume_and_sample(tmp_path):
    args = [*SMALL, "dist=fsdp"]
    full = launch(2, *args, "hydra.run.dir=full", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in full), [se for _, _, se in full]
    step_dir = tmp_path / "full" / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in step_dir.iterdir()) == ["manifest.json", "shard_0.h5", "shard_1.h5"]
    part = launch(2, *args, "train.stop_after=3", "hydra.run.dir=part", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in part), [se for _, _, se in part]
    resumed = launch(2, *args, "resume=part", "hydra.run.dir=ignored", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in resumed), [se for _, _, se in resumed]
    from gaugeflow.io.sharded import export_consolidated

    a = weights(export_consolidated(step_dir, tmp_path / "a.h5"))
    tool = subprocess.run([sys.executable, "tools/consolidate.py", str(tmp_path / "part"), "-o", str(tmp_path / "b.h5")],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=120)
    assert tool.returncode == 0, tool.stderr
    b = weights(tmp_path / "b.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a single process continues the sharded run (another world size) and samples from it
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", "resume=full", "train.steps=10",
                          "hydra.run.dir=x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert load_checkpoint(tmp_path / "full").step == 10  # a single-file checkpoint after the sharded ones
    s = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "sample", f"checkpoint={step_dir}",
                        "sample.n=64", "out=e.h5", "hydra.run.dir=s"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert s.returncode == 0, s.stderr


def test_sampling_on_two_ranks(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gaugeflow.cli.main", "train", *SMALL[:-2], "hydra.run.dir=run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = launch(2, "checkpoint=run", "sample.n=45", "sample.batch_size=8", "dist=ddp", "dist.device=cpu",
                 "out=e.h5", "hydra.run.dir=s", cwd=tmp_path, job="sample")
    assert all(rc == 0 for rc, _, _ in out), [se for _, _, se in out]
    assert "45 IMH steps" in out[0][1] and out[1][1] == ""
    from gaugeflow.io import read_ensemble

    ens = read_ensemble(tmp_path / "e.h5")
    assert ens.n_cfg == 45 and ens.fields.shape[1:] == (2, 4, 4, 1, 1)
    with h5py.File(tmp_path / "e.h5") as f:
        lq, lp = f["log_q"][()], f["log_p"][()]
        # the written log p is the action of the written configurations (rank 1's draws included)
        from gaugeflow.components import build_theory

        th = build_theory(dict(name="u1_2d", _target_="gaugeflow.theories.gauge_theory", group="u1", dim=2, beta=float(f.attrs["beta"])), [4, 4])
        import torch

        assert np.allclose(-th.action(torch.as_tensor(f["links"][()])).numpy(), lp, atol=1e-9)
        assert np.isfinite(lq).all()
